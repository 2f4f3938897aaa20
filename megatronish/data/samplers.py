"""The pretraining sampler and data loader: global batches walked in order from consumed_samples.

Samples are consumed in groups of micro_batch_size x data_parallel_size consecutive indices;
data-parallel rank r takes the r-th micro-batch of each group. A training iteration draws
global_batch / (micro_batch x dp) such micro-batches (gradient accumulation), so after any
number of iterations exactly consumed_samples = iterations x global_batch samples are used, and
restarting with that number serves the very batches an uninterrupted run would have served.
Tensor-parallel ranks of one data-parallel group pass the same data_parallel_rank and so read
identical batches. The dataset is already shuffled (GPTDataset), hence no shuffling here.
"""

import torch

from megatronish.stop_signals import ignore_stop_signals


class PretrainingSampler:
    """Yields lists of `micro_batch_size` dataset indices for one data-parallel rank; the last
    incomplete group of micro-batches is dropped, so every rank yields the same number."""

    def __init__(
        self,
        total_samples: int,
        consumed_samples: int,
        micro_batch_size: int,
        data_parallel_rank: int,
        data_parallel_size: int,
    ):
        if micro_batch_size < 1 or data_parallel_size < 1:
            raise ValueError(
                f"micro_batch_size ({micro_batch_size}) and data_parallel_size ({data_parallel_size}) must be positive"
            )
        if not 0 <= data_parallel_rank < data_parallel_size:
            raise ValueError(f"data_parallel_rank {data_parallel_rank} is not in [0, {data_parallel_size})")
        if total_samples < 1:
            raise ValueError(f"the dataset is empty (total_samples={total_samples})")
        if not 0 <= consumed_samples < total_samples:
            raise ValueError(
                f"consumed_samples {consumed_samples} must lie in [0, {total_samples}): the dataset has "
                f"{total_samples} samples; build it with more samples to train further"
            )
        self.total_samples, self.consumed_samples = total_samples, consumed_samples
        self.micro_batch_size = micro_batch_size
        self.data_parallel_rank, self.data_parallel_size = data_parallel_rank, data_parallel_size

    def _group_starts(self) -> range:
        group = self.micro_batch_size * self.data_parallel_size
        return range(self.consumed_samples, self.total_samples - group + 1, group)

    def __len__(self) -> int:
        return len(self._group_starts())

    def __iter__(self):
        offset = self.data_parallel_rank * self.micro_batch_size
        for start in self._group_starts():
            yield list(range(start + offset, start + offset + self.micro_batch_size))


def micro_batches_of_rank(consumed_samples: int, global_batch_size: int, micro_batch_size: int, rank: int,
                          size: int) -> list[list[int]]:
    """The dataset indices of the micro-batches that rank `rank` of `size` takes from the global batch starting
    at `consumed_samples`: micro-batch k (samples k x micro_batch_size on) goes to rank k mod `size`, the rule
    of PretrainingSampler at data-parallel size `size`. Ranks take one micro-batch more or less when `size`
    does not divide the micro-batches (fault-tolerant DP, where `size` is the number of live replicas)."""
    count = global_batch_size // micro_batch_size
    return [list(range(consumed_samples + k * micro_batch_size, consumed_samples + (k + 1) * micro_batch_size))
            for k in range(rank, count, size)]


def build_pretraining_data_loader(
    dataset,
    consumed_samples: int,
    micro_batch_size: int,
    data_parallel_rank: int,
    data_parallel_size: int,
    num_workers: int = 0,
):
    """A DataLoader yielding this rank's micro-batches as dicts of [micro_batch, s] tensors
    (tokens, labels, loss_mask, position_ids), starting after `consumed_samples`; None when
    `dataset` is None (an empty split)."""
    if dataset is None:
        return None
    sampler = PretrainingSampler(
        len(dataset), consumed_samples, micro_batch_size, data_parallel_rank, data_parallel_size
    )
    return torch.utils.data.DataLoader(
        dataset,
        batch_sampler=sampler,
        num_workers=num_workers,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=num_workers > 0,
        worker_init_fn=ignore_stop_signals,  # the rank saves at SIGTERM: its workers must outlive the signal
    )
