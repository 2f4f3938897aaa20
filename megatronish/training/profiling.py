"""--profile: a torch.profiler trace of a few iterations on chosen ranks (Megatron's flags; it defaults to
nsys, here torch.profiler always, which needs nothing outside PyTorch)."""

import os

import torch


class StepProfiler:
    """Records iterations (start, end] of the training loop on the ranks asked for; `step(iteration)` after
    each iteration. The trace is a Chrome trace JSON (chrome://tracing, Perfetto, TensorBoard's profiler)."""

    def __init__(self, args, rank: int):
        self.enabled = args.profile and rank in args.profile_ranks
        self.start, self.end, self.rank = args.profile_step_start, args.profile_step_end, rank
        self.folder = args.tensorboard_dir or "profile"
        self.profiler = None
        self.path = None

    def step(self, iteration: int) -> None:
        if not self.enabled:
            return
        if iteration == self.start:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if torch.cuda.is_available():
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            self.profiler = torch.profiler.profile(activities=activities, record_shapes=True)
            self.profiler.__enter__()
        elif iteration == self.end and self.profiler is not None:
            self.stop()

    def stop(self) -> None:
        """End the recording (also when training stops before --profile-step-end) and write the trace."""
        if self.profiler is None:
            return
        self.profiler.__exit__(None, None, None)
        os.makedirs(self.folder, exist_ok=True)
        self.path = os.path.join(self.folder, f"profile_rank{self.rank}_iterations{self.start + 1}-{self.end}.json")
        self.profiler.export_chrome_trace(self.path)
        print(f"rank {self.rank}: wrote the profile of iterations {self.start + 1}-{self.end} to {self.path}")
        self.profiler = None
