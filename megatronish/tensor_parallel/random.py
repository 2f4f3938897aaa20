"""Random streams for tensor parallelism, and activation recompute that replays them.

Two streams drive dropout:
- the default generator, seeded alike on every TP rank of a stage (`seed + 100 * pp_rank`): dropout
  on replicated activations (outside TP regions) draws the same mask on every TP rank;
- the tracker's "model-parallel-rng" stream, seeded with that + 2718 + tp_rank: dropout on
  partitioned activations (attention heads split across ranks) draws a different mask on each
  TP rank, as a single process would on different heads.

The tracker keeps each named stream as a saved generator state and swaps it into the default
generator of the compute device inside `fork()`. It works on CPU and CUDA alike.

torch.compile cannot trace a swap of generator states, and Inductor would draw the masks of traced
dropout with its own generator. So dropout masks (and the seeds of the dropout kernel) are drawn by
two custom ops that take the stream's name, `dropout_keep_mask` and `dropout_seed`: compiled or not,
a mask comes from the same stream, in the same order, as in eager mode.
"""

import contextlib
import functools

import torch
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

from megatronish import parallel_state

_MODEL_PARALLEL_RNG_TRACKER_NAME = "model-parallel-rng"
TP_RNG_STREAM = _MODEL_PARALLEL_RNG_TRACKER_NAME  # the per-TP-rank stream, for the rng_stream of the dropout ops
_TP_SEED_OFFSET = 2718
_PP_SEED_OFFSET = 100


def _device_type() -> str:
    return parallel_state.get_device().type


def _get_rng_state(device_type: str) -> torch.Tensor:
    return torch.cuda.get_rng_state() if device_type == "cuda" else torch.get_rng_state()


def _set_rng_state(state: torch.Tensor, device_type: str) -> None:
    if device_type == "cuda":
        torch.cuda.set_rng_state(state)
    else:
        torch.set_rng_state(state)


class RNGStatesTracker:
    """Named random streams that can be entered with `fork(name)` and saved/restored as a dict."""

    def __init__(self):
        self.states: dict[str, torch.Tensor] = {}
        self.seeds: set[int] = set()

    def reset(self) -> None:
        self.states, self.seeds = {}, set()

    def get_states(self) -> dict[str, torch.Tensor]:
        return {name: state.clone() for name, state in self.states.items()}

    def set_states(self, states: dict[str, torch.Tensor]) -> None:
        self.states = {name: state.clone() for name, state in states.items()}

    def add(self, name: str, seed: int) -> None:
        if seed in self.seeds:
            raise ValueError(f"seed {seed} is already used by another RNG stream; pick a different seed")
        if name in self.states:
            raise ValueError(f"RNG stream {name!r} already exists; call reset() first to re-seed it")
        device_type = _device_type()
        saved = _get_rng_state(device_type)
        if device_type == "cuda":
            torch.cuda.manual_seed(seed)
        else:
            torch.manual_seed(seed)
        self.states[name] = _get_rng_state(device_type)
        _set_rng_state(saved, device_type)
        self.seeds.add(seed)

    @contextlib.contextmanager
    def fork(self, name: str = _MODEL_PARALLEL_RNG_TRACKER_NAME):
        """Draw from stream `name` inside the block; the default stream is left untouched."""
        if name not in self.states:
            raise KeyError(
                f"RNG stream {name!r} is not set: call megatronish.tensor_parallel.model_parallel_manual_seed(seed) first"
            )
        device_type = _device_type()
        saved = _get_rng_state(device_type)
        _set_rng_state(self.states[name], device_type)
        try:
            yield
        finally:
            self.states[name] = _get_rng_state(device_type)
            _set_rng_state(saved, device_type)


_RNG_TRACKER = RNGStatesTracker()


def get_cuda_rng_tracker() -> RNGStatesTracker:
    """The process-wide tracker (named for Megatron compatibility; it works on CPU too)."""
    return _RNG_TRACKER


get_rng_tracker = get_cuda_rng_tracker


def model_parallel_manual_seed(seed: int, layout=None) -> None:
    """Seed the default stream with seed + 100 * pp_rank and the per-TP-rank stream with that + 2718 + tp_rank.

    Pipeline stages draw from streams of their own (as in Megatron): with one seed everywhere,
    layers of equal shape on different stages would drop out the same units. `layout` defaults
    to the current one (megatronish.parallel_state).
    """
    layout = layout or parallel_state.get_layout()
    seed = seed + _PP_SEED_OFFSET * layout.pp_rank
    torch.manual_seed(seed)  # also seeds every CUDA device
    tp_seed = seed + _TP_SEED_OFFSET + layout.tp_rank
    _RNG_TRACKER.reset()
    _RNG_TRACKER.add(_MODEL_PARALLEL_RNG_TRACKER_NAME, tp_seed)


def _drawing_from(stream: str | None):
    """Draw from the tracker's stream `stream`, or from the default generator when None."""
    return _RNG_TRACKER.fork(stream) if stream is not None else contextlib.nullcontext()


# Tagged nondeterministic_seeded, so that a compiled graph never merges two draws. Being custom ops, they
# are not recomputed in backward either (only torch's allowlisted ops are), except inside checkpoint()
# regions, whose policy below keeps them.
@torch.library.custom_op("megatronish::dropout_keep_mask", mutates_args=(), tags=(torch.Tag.nondeterministic_seeded,))
def dropout_keep_mask(like: torch.Tensor, keep_prob: float, stream: str | None) -> torch.Tensor:
    """A bool mask of like's shape, each entry True with probability keep_prob, drawn from `stream`."""
    with _drawing_from(stream):
        return torch.empty(like.shape, dtype=torch.bool, device=like.device).bernoulli_(keep_prob)


@dropout_keep_mask.register_fake
def _(like, keep_prob, stream):
    return torch.empty(like.shape, dtype=torch.bool, device=like.device)


@torch.library.custom_op("megatronish::dropout_seed", mutates_args=(), tags=(torch.Tag.nondeterministic_seeded,))
def dropout_seed(like: torch.Tensor, stream: str | None) -> torch.Tensor:
    """One int64 seed on like's device, drawn from `stream` (the fused dropout kernel makes its mask from it)."""
    with _drawing_from(stream):
        return torch.randint(0, 2**62, (1,), dtype=torch.int64, device=like.device)


@dropout_seed.register_fake
def _(like, stream):
    return torch.empty(1, dtype=torch.int64, device=like.device)


def model_parallel_cuda_manual_seed(seed: int, layout=None) -> None:
    """Megatron-core's name for model_parallel_manual_seed (it seeds CPU runs too)."""
    model_parallel_manual_seed(seed, layout)


def get_expert_parallel_rng_tracker_name() -> str:
    """The tracker stream Megatron-core's expert layers draw from (no expert parallelism here: never added)."""
    return "expert-parallel-rng"


def _capture_rng():
    device_type = _device_type()
    return device_type, _get_rng_state(device_type), torch.get_rng_state(), _RNG_TRACKER.get_states()


def _restore_rng(captured):
    device_type, device_state, cpu_state, tracker_states = captured
    torch.set_rng_state(cpu_state)
    if device_type == "cuda":
        torch.cuda.set_rng_state(device_state)
    _RNG_TRACKER.set_states(tracker_states)


class CheckpointFunction(torch.autograd.Function):
    """Run `fn` without keeping its activations; rerun it in backward with the same randomness."""

    @staticmethod
    def forward(ctx, fn, *args):
        ctx.fn = fn
        ctx.rng = _capture_rng()
        ctx.tensor_positions = [i for i, a in enumerate(args) if torch.is_tensor(a)]
        ctx.non_tensor_args = [None if torch.is_tensor(a) else a for a in args]
        ctx.save_for_backward(*(a for a in args if torch.is_tensor(a)))
        with torch.no_grad():
            return fn(*args)

    @staticmethod
    def backward(ctx, *grads):
        args = list(ctx.non_tensor_args)
        for position, saved in zip(ctx.tensor_positions, ctx.saved_tensors):
            args[position] = saved.detach().requires_grad_(saved.requires_grad)

        after_forward = _capture_rng()
        _restore_rng(ctx.rng)
        with torch.enable_grad():
            outputs = ctx.fn(*args)
        _restore_rng(after_forward)

        outputs = outputs if isinstance(outputs, tuple) else (outputs,)
        pairs = [(o, g) for o, g in zip(outputs, grads) if torch.is_tensor(o) and o.requires_grad and g is not None]
        if pairs:
            torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
        input_grads = tuple(a.grad if torch.is_tensor(a) else None for a in args)
        return (None, *input_grads)


def _keep_random_draws(ctx, op, *args, **kwargs):
    if op in (torch.ops.megatronish.dropout_keep_mask.default, torch.ops.megatronish.dropout_seed.default):
        return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


def checkpoint(function, distribute_saved_activations: bool, *args):
    """Activation recompute, Megatron-core's signature: `function(*args)` whose dropout masks are replayed
    exactly in backward. `distribute_saved_activations` (Megatron: keep a 1/TP slice of the saved input per
    rank) only saves memory; here each rank keeps its whole input, with the same results."""
    if not isinstance(distribute_saved_activations, bool):
        raise TypeError(f"checkpoint(function, distribute_saved_activations, *args): the second argument must be "
                        f"a bool, got {type(distribute_saved_activations).__name__} (pass False, then the inputs)")
    if torch.compiler.is_compiling():
        # Dynamo cannot trace CheckpointFunction (it saves and restores generator states). torch's own
        # checkpoint traces; its policy keeps the masks and seeds that function drew instead of drawing them
        # again in backward, from a stream that has moved on since.
        return torch.utils.checkpoint.checkpoint(
            function, *args, use_reentrant=False,
            context_fn=functools.partial(create_selective_checkpoint_contexts, _keep_random_draws))
    return CheckpointFunction.apply(function, *args)
