"""Parameter all-gathers that land only when waited for, to test --overlap-param-gather.

On CPU the real gathers of a tiny model finish long before anything reads the parameters, so a
missing wait would go unnoticed. Inside `slow_param_gathers()` each overlapped gather completes at
once, but the other DP ranks' shards of every bucket read NaN until the bucket's handle is waited
for: whatever reads parameters without waiting (a forward, the next step, a checkpoint, the
parameter norm, a generated sample) meets NaN instead of values that happen to be right already.
"""

import contextlib

from megatronish.optimizer import DistributedDataParallel


class _GatherLandingOnWait:
    def __init__(self, region, gathered):
        self.region, self.gathered = region, gathered

    def wait(self) -> bool:
        self.region.copy_(self.gathered)
        return True


@contextlib.contextmanager
def slow_param_gathers():
    """Within this block (in a rank process), overlapped parameter all-gathers land only when waited for."""
    real = DistributedDataParallel.all_gather_params

    def gather_landing_on_wait(ddp: DistributedDataParallel) -> None:
        real(ddp)
        if not ddp.overlap_param_gather or ddp.dp_size == 1:
            return
        ddp.finish_param_sync()
        for bucket in ddp.buckets:
            region = ddp.param_buffer[bucket.start:bucket.end]
            gathered = region.clone()
            start, end = (offset - bucket.start for offset in bucket.shard(ddp.dp_rank, ddp.dp_size))
            region[:start].fill_(float("nan"))
            region[end:].fill_(float("nan"))
            bucket.param_gather = _GatherLandingOnWait(region, gathered)

    DistributedDataParallel.all_gather_params = gather_landing_on_wait
    try:
        yield
    finally:
        DistributedDataParallel.all_gather_params = real
