"""The parallel layout as a value: how the ranks split the model (TP, PP) and the data (DP).

    dims = ParallelDims.for_world(8, tp=2, pp=2)        # sizes only: TP 2 x PP 2 x DP 2, no groups
    layout = ParallelLayout.build(tp=2, pp=2)           # collective: this rank's coordinates and groups
    ColumnParallelLinear(..., tp_group=layout.tp_group)

Rank order is Megatron's: TP ranks are adjacent, then DP, then PP,
    rank = tp_rank + tp * (dp_rank + dp * pp_rank),
so a TP group stays inside a node (its all-reduces need the fast links), DP replicas of one
stage come next, and pipeline stages (point-to-point traffic only) cross nodes.

A layout owns its process groups; nothing here is global, so two layouts can live in one
process (tests build a TP=2 and a TP=1 model side by side). `megatronish.parallel_state` keeps
one "current" layout for the Megatron-core getters that users' scripts call.
"""

import weakref
from dataclasses import dataclass, field
from datetime import timedelta

import torch.distributed as dist

from megatronish.shm_collectives import SharedMemoryCollectives

# The shared-memory collectives of each CPU TP group (see shm_collectives.py), found by the communication
# ops from the group they are given. Weak keys: a group that is gone takes its entry with it.
_SHARED_MEMORY: "weakref.WeakKeyDictionary[dist.ProcessGroup, SharedMemoryCollectives]" = weakref.WeakKeyDictionary()


def shared_memory_for(group: dist.ProcessGroup) -> SharedMemoryCollectives | None:
    """The shared-memory collectives of a TP group built by a ParallelLayout, else None (use the backend)."""
    return _SHARED_MEMORY.get(group)


@dataclass(frozen=True)
class ParallelDims:
    """The sizes of a layout: tp x pp x dp ranks, with `virtual_pp` model chunks per pipeline stage
    (interleaved 1F1B; None for one chunk). Checks itself; builds no groups (the planner uses it too)."""
    tp: int = 1
    pp: int = 1
    dp: int = 1
    virtual_pp: int | None = None

    def __post_init__(self):
        for name in ("tp", "pp", "dp"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} size must be a positive integer, got {value!r}")
        if self.virtual_pp is not None:
            if not isinstance(self.virtual_pp, int) or self.virtual_pp < 1:
                raise ValueError(f"virtual pipeline size must be a positive integer or None, got {self.virtual_pp!r}")
            if self.virtual_pp > 1 and self.pp == 1:
                raise ValueError(f"virtual pipeline size {self.virtual_pp} needs pipeline parallelism: set a "
                                 "pipeline-model-parallel size > 1 or drop the virtual stages")

    @classmethod
    def for_world(cls, world_size: int, tp: int = 1, pp: int = 1, virtual_pp: int | None = None) -> "ParallelDims":
        """TP and PP as given, DP = world / (TP x PP); fails naming each size when they do not divide."""
        if tp < 1 or pp < 1 or world_size % (tp * pp) != 0:
            raise ValueError(
                f"world size {world_size} is not divisible by tensor-model-parallel size {tp} x "
                f"pipeline-model-parallel size {pp} = {tp * pp}: launch a multiple of {tp * pp} ranks or choose "
                f"TP and PP sizes whose product divides {world_size}")
        return cls(tp, pp, world_size // (tp * pp), virtual_pp)

    @property
    def world_size(self) -> int:
        return self.tp * self.pp * self.dp

    @property
    def num_model_chunks(self) -> int:
        return self.virtual_pp or 1

    def coordinates(self, rank: int) -> tuple[int, int, int]:
        """(tp_rank, dp_rank, pp_rank) of a global rank."""
        return rank % self.tp, (rank // self.tp) % self.dp, rank // (self.tp * self.dp)

    def rank(self, tp_rank: int, dp_rank: int, pp_rank: int) -> int:
        return tp_rank + self.tp * (dp_rank + self.dp * pp_rank)

    def tp_groups(self) -> list[list[int]]:
        return [[self.rank(t, d, p) for t in range(self.tp)] for p in range(self.pp) for d in range(self.dp)]

    def dp_groups(self) -> list[list[int]]:
        return [[self.rank(t, d, p) for d in range(self.dp)] for p in range(self.pp) for t in range(self.tp)]

    def pp_groups(self) -> list[list[int]]:
        return [[self.rank(t, d, p) for p in range(self.pp)] for d in range(self.dp) for t in range(self.tp)]

    def model_parallel_groups(self) -> list[list[int]]:
        """TP x PP: the ranks that together hold one replica of the model."""
        return [[self.rank(t, d, p) for p in range(self.pp) for t in range(self.tp)] for d in range(self.dp)]

    def embedding_groups(self) -> list[list[int]]:
        """First and last stage of each pipeline: they hold the two copies of tied word embeddings."""
        return [[group[0], group[-1]] for group in self.pp_groups()] if self.pp > 1 else []


@dataclass(eq=False)
class ParallelLayout:
    """This rank's place in a TP x PP x DP layout and the process groups it communicates over."""
    dims: ParallelDims
    rank: int
    tp_group: dist.ProcessGroup
    dp_group: dist.ProcessGroup
    pp_group: dist.ProcessGroup
    model_parallel_group: dist.ProcessGroup        # TP x PP (one model replica)
    embedding_group: dist.ProcessGroup | None      # first + last stage of this pipeline (PP > 1 and on those stages)
    timeout: timedelta | None = None
    tp_ranks: list[int] = field(default_factory=list)
    dp_ranks: list[int] = field(default_factory=list)
    pp_ranks: list[int] = field(default_factory=list)

    @classmethod
    def build(cls, tp: int = 1, pp: int = 1, virtual_pp: int | None = None, *,
              timeout: timedelta | None = None) -> "ParallelLayout":
        """Create the groups of a TP x PP x DP layout over the initialized world. Every rank must call it."""
        if not dist.is_initialized():
            raise RuntimeError("torch.distributed is not initialized: call megatronish.parallel_state."
                               "initialize_distributed() (or torch.distributed.init_process_group) first")
        dims = ParallelDims.for_world(dist.get_world_size(), tp, pp, virtual_pp)
        rank = dist.get_rank()
        groups = {}
        # Every rank takes part in creating every group, in the same order (torch.distributed requires it).
        for name, enumeration in (("tp", dims.tp_groups()), ("dp", dims.dp_groups()), ("pp", dims.pp_groups()),
                                  ("mp", dims.model_parallel_groups()), ("embedding", dims.embedding_groups())):
            groups[name] = (None, [])
            for ranks in enumeration:
                group = dist.new_group(ranks, timeout=timeout)
                if rank in ranks:
                    groups[name] = (group, ranks)
        layout = cls(dims, rank, groups["tp"][0], groups["dp"][0], groups["pp"][0], groups["mp"][0],
                     groups["embedding"][0], timeout, groups["tp"][1], groups["dp"][1], groups["pp"][1])
        if dist.get_backend(layout.tp_group) == "gloo":  # CPU ranks: TP activations go through shared memory
            shared_memory = SharedMemoryCollectives.create(layout.tp_group, layout.tp_ranks,
                                                           timeout or timedelta(minutes=30))
            if shared_memory is not None:
                _SHARED_MEMORY[layout.tp_group] = shared_memory
        return layout

    @classmethod
    def standalone_stage(cls, stage: int, num_stages: int) -> "ParallelLayout":
        """Pipeline stage `stage` of `num_stages`, held whole by this one process (a SWARM peer).

        No other rank shares the stage, so every group is this process's world of one (start
        torch.distributed as a single process first) and there is no embedding group: whoever
        drives the stage sums the tied-embedding gradients of the first and last stage itself.
        """
        if not dist.is_initialized() or dist.get_world_size() != 1:
            raise RuntimeError("a standalone pipeline stage needs torch.distributed started as a world of one "
                               "(megatronish.parallel_state.initialize_distributed() without torchrun's variables)")
        if not 0 <= stage < num_stages:
            raise ValueError(f"stage {stage} is outside the {num_stages} pipeline stage(s): use 0..{num_stages - 1}")
        world = dist.group.WORLD
        # rank = the stage: in a TP 1 x PP num_stages x DP 1 layout, global rank k is pipeline stage k.
        return cls(ParallelDims(pp=num_stages), stage, world, world, world, world, None,
                   tp_ranks=[0], dp_ranks=[0], pp_ranks=[0])

    def destroy(self) -> None:
        """Stop using this layout's shared memory (the groups themselves live until the world ends)."""
        _SHARED_MEMORY.pop(self.tp_group, None)

    # -- sizes and this rank's coordinates --
    @property
    def tp(self) -> int:
        return self.dims.tp

    @property
    def pp(self) -> int:
        return self.dims.pp

    @property
    def dp(self) -> int:
        return self.dims.dp

    @property
    def tp_rank(self) -> int:
        return self.dims.coordinates(self.rank)[0]

    @property
    def dp_rank(self) -> int:
        return self.dims.coordinates(self.rank)[1]

    @property
    def pp_rank(self) -> int:
        return self.dims.coordinates(self.rank)[2]

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp - 1

    @property
    def next_stage_rank(self) -> int:
        """Global rank of the next pipeline stage (the first stage after the last: interleaving wraps around)."""
        return self.pp_ranks[(self.pp_rank + 1) % self.pp]

    @property
    def prev_stage_rank(self) -> int:
        return self.pp_ranks[(self.pp_rank - 1) % self.pp]

    def describe(self) -> str:
        virtual = f" ({self.dims.virtual_pp} virtual stages each)" if self.dims.virtual_pp else ""
        return f"TP {self.tp} x PP {self.pp}{virtual} x DP {self.dp}"
