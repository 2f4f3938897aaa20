"""When to stop early: SIGTERM / SIGUSR1, --exit-interval, --exit-duration-in-mins.

A cluster that preempts a job sends SIGTERM (SLURM: `--signal=USR1@90` sends SIGUSR1 ahead of
the time limit) to the processes, maybe not to all of them at the same instant. The handler
only records the signal; at the next iteration boundary every rank takes part in one small
all-reduce (MAX) of "signal seen" and "time is up", so all ranks agree to stop at the same
iteration, save a checkpoint, and exit with status 0. Restarted with the same command (--load
pointing at --save), the job resumes there.
"""

import signal
import time

import torch
import torch.distributed as dist

from megatronish import parallel_state

EXIT_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class ExitConditions:
    """Install with `ExitConditions(args)` once distributed is up; call `check(iteration)` after each
    iteration on every rank (a collective); `close()` restores the previous signal handlers."""

    def __init__(self, exit_interval: int | None = None, exit_duration_in_mins: float | None = None):
        self.exit_interval = exit_interval
        self.exit_duration_in_mins = exit_duration_in_mins
        self.start = time.monotonic()
        self.received: int | None = None
        self._previous = {}
        for signum in EXIT_SIGNALS:
            try:
                self._previous[signum] = signal.signal(signum, self._on_signal)
            except ValueError:  # not the main thread: signals cannot be handled here
                pass

    def _on_signal(self, signum, frame) -> None:
        self.received = signum

    def check(self, iteration: int) -> str | None:
        """Why to stop after `iteration` (the same answer on every rank), or None to go on."""
        time_is_up = (self.exit_duration_in_mins is not None
                      and time.monotonic() - self.start > self.exit_duration_in_mins * 60.0)
        flags = torch.tensor([float(self.received or 0), float(time_is_up)], device=parallel_state.get_device())
        parallel_state.all_reduce_in_group(flags, op=dist.ReduceOp.MAX)
        if flags[0] > 0:
            return f"received {signal.Signals(int(flags[0])).name}"
        if flags[1] > 0:
            return f"--exit-duration-in-mins {self.exit_duration_in_mins} reached"
        if self.exit_interval and iteration % self.exit_interval == 0:
            return f"--exit-interval {self.exit_interval}"
        return None

    def close(self) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous = {}
