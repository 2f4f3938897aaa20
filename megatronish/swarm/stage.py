"""One pipeline stage of the GPT, held whole by one process: what a SWARM peer computes.

A peer serves whichever trainer asks, in any order, so it keeps no activations between calls:
    forward(inputs)                                   -> the stage's outputs
    backward(step, micro_batch, inputs, grad_output)  -> the gradient of the inputs; the parameters'
                                                         gradients are added to that step's sum
    forward_backward(step, micro_batch, inputs, labels, loss_mask, num_microbatches)
                                                      -> (loss, gradient of the inputs): the last stage
`backward` recomputes the forward from the inputs sent with it (as hivemind's ModuleBackend does),
so it may run on another peer of the stage than the forward did, and a backward lost with a dead
peer can be replayed on any peer; a peer that ran the forward itself, at the same weights, keeps
its graph for a while (`keep_forwards`) and skips the recomputation. The random streams are seeded
per call (the trainer sends the seed), so a recomputation draws the forward's dropout masks.

Gradient sums are kept per training step (`StepGradients`: a flat fp32 buffer laid out like the
DDP gradient buffer, and the micro-batches it holds), so the next step's micro-batches can arrive
while a step is being committed. Committing step t on every peer of the stage:
    sum_parts(t, attempt, parts)    the stage's gradient: every holder's part, in the order given
    embedding_part / set_embedding_gradient   tied embeddings: the first and last stage add each other's
                                    part of the word-embedding gradient (Megatron sums it over the
                                    embedding group; here the two stages exchange it)
    squared_norm(t)                 this stage's share of the global gradient norm (each parameter once)
    apply(t, attempt, norm)         clip by the global norm, AdamW, LR schedule: iteration t -> t + 1
The optimizer, the clipping rule and the LR schedule are pretrain_gpt.py's (built by the same
functions); only the gradient norm is summed over the stages by whoever commits the step.
"""

import hashlib
import math
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from megatronish.model import GPTModel, TransformerConfig
from megatronish.optimizer import DistributedDataParallel, clip_grads_by_norm_, counted_in_grad_norm
from megatronish.parallel_layout import ParallelLayout
from megatronish.tensor_parallel import model_parallel_manual_seed
from megatronish.training.checkpoint_format import Block
from megatronish.training.checkpointing import checkpoint_blocks, checkpoint_description, load_checkpoint
from megatronish.training.progress import TrainingProgress
from megatronish.training.training import build_optimizer, masked_mean_loss


class Refused(RuntimeError):
    """A call the stage turns down; whoever called goes elsewhere (another peer, a replay, a state download)."""


class StaleStep(Refused):
    """An apply whose gradient sum this stage does not hold (another attempt, or none): the caller
    must download the stage's state from a peer that applied it."""


@dataclass
class StepGradients:
    """The sum of the parameter gradients of the micro-batches one peer ran for one training step."""
    flat: torch.Tensor
    micro_batches: set = field(default_factory=set)
    samples: int = 0


class StageWorker:
    """Stage `stage` of `num_stages` of the GPT the arguments describe (pretrain_gpt.py's flags),
    with its optimizer and LR schedule. Not thread-safe: one thread runs every call."""

    def __init__(self, args, config: TransformerConfig, stage: int, num_stages: int, keep_forwards: int = 0):
        self.stage, self.num_stages = stage, num_stages
        self.layout = ParallelLayout.standalone_stage(stage, num_stages)
        self.model = GPTModel(config, seed=args.seed, layout=self.layout)
        self.ddp = DistributedDataParallel(self.model, layout=self.layout)
        # The optimizer does not clip: the norm that clips is the whole model's, summed over the stages.
        self.optimizer, self.scheduler = build_optimizer(args, self.ddp, clip_grad=0.0)
        self.clip_grad, self.global_batch_size, self.seed = args.clip_grad, args.global_batch_size, args.seed
        self.iteration = 0
        self.params = list(self.ddp.param_range)  # the flat buffers' order
        self.names = {param: name for name, param in self.model.named_parameters()}
        self.step_gradients: dict[int, StepGradients] = {}
        self.pending: dict[int, tuple[int, torch.Tensor]] = {}  # step -> (attempt, the stage's gradient sum)
        self.own_embedding_part: dict[int, torch.Tensor] = {}
        self.keep_forwards = keep_forwards
        self.saved_forwards: OrderedDict[int, tuple] = OrderedDict()  # micro-batch -> (iteration, inputs, graph)
        self.recomputed = 0  # backward passes that had to recompute their forward
        shared = [p for p in self.params if getattr(p, "shared_embedding", False)]
        self.tied_embedding = shared[0] if shared else None  # pp > 1 with tied embeddings, first or last stage

    @property
    def is_first(self) -> bool:
        return self.model.pre_process

    @property
    def is_last(self) -> bool:
        return self.model.post_process

    # ------------------------------------------------------------------ forward and backward

    def forward(self, inputs: torch.Tensor, seed: int, micro_batch: int | None = None) -> torch.Tensor:
        """The stage's outputs. With a `micro_batch`, the autograd graph is kept (the newest `keep_forwards`
        of them), so that a backward of that micro-batch on this peer at this iteration skips recomputing."""
        keep = micro_batch is not None and self.keep_forwards > 0
        with self._seeded(seed), torch.set_grad_enabled(keep):
            differentiable = self._differentiable(inputs) if keep else inputs
            output = self._run(differentiable)
        if keep:
            self.saved_forwards[micro_batch] = (self.iteration, inputs, differentiable, output)
            while len(self.saved_forwards) > self.keep_forwards:
                self.saved_forwards.popitem(last=False)
        return output.detach()

    def backward(self, step: int, micro_batch: int, samples: int, inputs: torch.Tensor, grad_output: torch.Tensor,
                 seed: int) -> torch.Tensor | None:
        """Add the parameters' gradients to step `step`'s sum (once per micro-batch), return the gradient of
        the inputs (None on the first stage: token ids have none). The forward is recomputed from `inputs`
        unless this peer ran it at this iteration (same weights) on the same inputs and still holds it."""
        iteration, saved_inputs, differentiable, output = self.saved_forwards.pop(micro_batch, (None,) * 4)
        with self._seeded(seed), torch.enable_grad():
            if iteration != self.iteration or not torch.equal(saved_inputs, inputs):
                differentiable = self._differentiable(inputs)
                output = self._run(differentiable)
                self.recomputed += 1
            grads = torch.autograd.grad(output, self._wrt(differentiable), grad_output, allow_unused=True)
        return self._keep(step, micro_batch, samples, grads)

    def forward_backward(self, step: int, micro_batch: int, samples: int, inputs: torch.Tensor,
                         labels: torch.Tensor, loss_mask: torch.Tensor, num_microbatches: int,
                         seed: int) -> tuple[float, torch.Tensor | None]:
        """The last stage: the micro-batch's loss (pretrain_gpt.py's masked mean), and its backward
        with the loss divided by the micro-batches per step, as the pipeline schedules do."""
        if not self.is_last:
            raise ValueError(f"forward_backward runs on the last stage ({self.num_stages - 1}), this is stage "
                             f"{self.stage}: call forward/backward here")
        with self._seeded(seed), torch.enable_grad():
            inputs = self._differentiable(inputs)
            loss, _ = masked_mean_loss(loss_mask, self._run(inputs, labels))
            grads = torch.autograd.grad(loss / num_microbatches, self._wrt(inputs), allow_unused=True)
        return loss.item(), self._keep(step, micro_batch, samples, grads)

    def benchmark(self, kind: str, batch_size: int, seq_length: int) -> None:
        """One `kind` computation ("forward", "backward", "forward_backward") on made-up inputs of this
        shape, nothing kept: how a peer measures its speed before the first trainer calls it."""
        tokens = torch.zeros(batch_size, seq_length, dtype=torch.long)
        inputs = tokens if self.is_first else torch.randn(seq_length, batch_size, self.model.config.hidden_size,
                                                          dtype=self.model.config.params_dtype)
        if kind == "forward":
            self.forward(inputs, seed=0)
            return
        with self._seeded(0), torch.enable_grad():
            inputs = self._differentiable(inputs)
            output = self._run(inputs, tokens if kind == "forward_backward" else None)
            torch.autograd.grad(output.float().mean(), self._wrt(inputs), allow_unused=True)

    def _run(self, inputs: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        if self.is_first:
            return self.model(inputs, labels=labels)
        self.model.set_input_tensor(inputs)
        seq_length, batch = inputs.shape[:2]
        # Later stages read only the shape of the token ids (sequence length, positions 0..s-1).
        return self.model(torch.zeros(batch, seq_length, dtype=torch.long), labels=labels)

    def _differentiable(self, inputs: torch.Tensor) -> torch.Tensor:
        return inputs if self.is_first else inputs.detach().requires_grad_()

    def _wrt(self, inputs: torch.Tensor) -> list[torch.Tensor]:
        return self.params if self.is_first else self.params + [inputs]

    def _keep(self, step: int, micro_batch: int, samples: int, grads) -> torch.Tensor | None:
        if step < self.iteration:
            raise StaleStep(f"step {step} is already applied here (iteration {self.iteration}): the trainer "
                              "sent a backward for a committed step")
        sums = self.step_gradients.get(step)
        if sums is None:
            sums = self.step_gradients[step] = StepGradients(torch.zeros_like(self.ddp.grad_buffer))
        if micro_batch not in sums.micro_batches:  # a retried call must not count twice
            views = [v for v, g in zip(self._views(sums.flat), grads) if g is not None]
            torch._foreach_add_(views, [g for g in grads[:len(self.params)] if g is not None])
            sums.micro_batches.add(micro_batch)
            sums.samples += samples
        return None if self.is_first else grads[-1]

    def _views(self, flat: torch.Tensor) -> list[torch.Tensor]:
        return [flat[start:end].view_as(param) for param, (start, end) in self.ddp.param_range.items()]

    @contextmanager
    def _seeded(self, seed: int):
        with torch.random.fork_rng(devices=[]):
            model_parallel_manual_seed(seed, self.layout)
            yield

    # ------------------------------------------------------------------ committing a step

    def part(self, step: int, micro_batches: list[int]) -> torch.Tensor:
        """A copy of this peer's gradient sum for `step`, if it holds exactly `micro_batches` (else Refused)."""
        sums = self.step_gradients.get(step)
        held = sorted(sums.micro_batches) if sums else []
        if held != sorted(micro_batches):
            raise Refused(f"stage {self.stage} holds micro-batches {held} of step {step}, not "
                             f"{sorted(micro_batches)}: its part cannot be used")
        return sums.flat.clone()

    def sum_parts(self, step: int, attempt: int, parts: list[torch.Tensor]) -> None:
        """The stage's gradient for `step`: the holders' parts added in the given order (the same order,
        and so the same bits, on every peer of the stage)."""
        total = torch.zeros_like(self.ddp.grad_buffer)
        for part in parts:
            total.add_(part)
        self.pending[step] = (attempt, total)
        if self.tied_embedding is not None:
            self.own_embedding_part[step] = self._slice(total, self.tied_embedding).clone()

    def embedding_part(self, step: int, attempt: int) -> torch.Tensor:
        """This stage's own part of the tied word-embedding gradient of `step` (before the exchange)."""
        self._pending(step, attempt)
        if step not in self.own_embedding_part:
            raise ValueError(f"stage {self.stage} holds no copy of tied word embeddings")
        return self.own_embedding_part[step]

    def set_embedding_gradient(self, step: int, attempt: int, total: torch.Tensor) -> None:
        """The tied word-embedding gradient of `step`: the sum of both stages' parts (computed by the caller as
        first + last on both stages: the same bits, since a + b == b + a in IEEE arithmetic)."""
        self._slice(self._pending(step, attempt), self.tied_embedding).copy_(total)

    def squared_norm(self, step: int, attempt: int) -> float:
        """Sum of squares of this stage's gradients, each parameter counted once in the whole model (the
        last stage's copy of tied embeddings not at all), as pretrain_gpt.py's norm counts them."""
        total = self._pending(step, attempt)
        counted = [view for view, param in zip(self._views(total), self.params)
                   if counted_in_grad_norm(param, self.layout)]
        if not counted:
            return 0.0
        return torch.stack(torch._foreach_norm(counted, 2.0)).float().square().sum().item()

    def apply(self, step: int, attempt: int, global_norm: float) -> bool:
        """Iteration step -> step + 1: clip by the global norm, AdamW, LR schedule. A non-finite norm
        skips the update (as pretrain_gpt.py does) but not the iteration. Returns whether it updated."""
        total = self._pending(step, attempt)
        if step != self.iteration:
            raise StaleStep(f"stage {self.stage} is at iteration {self.iteration}, cannot apply step {step}")
        updated = math.isfinite(global_norm)
        if updated:
            self.ddp.grad_buffer.copy_(total)
            if self.clip_grad > 0:
                clip_grads_by_norm_([self.ddp.grad_buffer], global_norm, self.clip_grad)
            updated, _ = self.optimizer.step()
            if updated:
                self.scheduler.step(self.global_batch_size)
        self._advance_to(step + 1)
        return updated

    def _pending(self, step: int, attempt: int) -> torch.Tensor:
        held_attempt, total = self.pending.get(step, (None, None))
        if held_attempt != attempt:
            raise StaleStep(f"stage {self.stage} holds no gradient sum of step {step} attempt {attempt} "
                              f"(it holds attempt {held_attempt})")
        return total

    def _slice(self, flat: torch.Tensor, param) -> torch.Tensor:
        start, end = self.ddp.param_range[param]
        return flat[start:end]

    def _advance_to(self, iteration: int) -> None:
        """Forget every step before `iteration` (sums of old steps: retries that came too late) and the kept
        forwards (their graphs hold the weights the step is about to change in place)."""
        self.iteration = iteration
        self.saved_forwards.clear()
        for table in (self.step_gradients, self.pending, self.own_embedding_part):
            for step in [s for s in table if s < iteration]:
                del table[step]

    # ------------------------------------------------------------------ state

    def state(self) -> dict:
        """Everything a new peer of the stage needs: weights, Adam state, LR schedule, iteration."""
        return {"iteration": self.iteration, "optimizer": self.optimizer.sharded_state_by_name(),
                "scheduler": self.scheduler.state_dict()}

    def load_state(self, state: dict) -> None:
        self.optimizer.load_state_by_name(state["optimizer"])  # sets the weights too
        self.scheduler.load_state_dict(state["scheduler"])
        self._advance_to(state["iteration"])

    def load_checkpoint(self, load_dir: str) -> bool:
        """This stage's tensors from a megatronish checkpoint (pretrain_gpt.py's or a SWARM run's, any
        layout: names are global). False when `load_dir` holds none yet."""
        progress = load_checkpoint(load_dir, [self.model], self.optimizer, self.scheduler, load_rng=False)
        if progress is None:
            return False
        self._advance_to(progress.iteration)
        return True

    def checkpoint_part(self, args) -> tuple[dict, dict]:
        """(tensors, checkpoint.json) of this stage at its iteration, copied: a writer thread may save them
        while the stage trains on (swarm/checkpoint.py assembles the stages' parts)."""
        optimizer_state = self.optimizer.sharded_state_by_name()  # copies already
        blocks = {name: Block(block.local.clone(), block.global_shape, block.offsets) if name.startswith("model.")
                  else block for name, block in checkpoint_blocks([self.model], optimizer_state).items()}
        progress = TrainingProgress(iteration=self.iteration,
                                    consumed_train_samples=self.iteration * self.global_batch_size)
        return blocks, checkpoint_description(progress, [self.model], optimizer_state, self.scheduler, args,
                                              all_stages=False)

    def digest(self) -> str:
        """A short hash of the weights: equal on two peers exactly when their weights are bit-identical."""
        hasher = hashlib.sha1()
        for name, param in sorted((name, p) for p, name in self.names.items()):
            hasher.update(name.encode())
            hasher.update(param.detach().contiguous().numpy().tobytes())
        return hasher.hexdigest()[:16]
