"""Deterministic mixing of several datasets in given proportions (Megatron's --data-path 0.3 a 0.7 b).

The k-th sample of dataset d is due at time (k + 1/2) / w_d; merging all datasets' due times in
order (ties to the lower dataset index) gives the blend. After any n samples each dataset has
supplied within one or two samples of n * w_d (a Webster/Sainte-Lague apportionment), with
no randomness: the member datasets are shuffled themselves.
"""

import numpy as np
import torch


def build_blend_index(weights, num_samples: int) -> tuple[np.ndarray, np.ndarray]:
    """(dataset_index, dataset_sample_index) of the first `num_samples` blended samples."""
    weights = np.asarray(weights, dtype=np.float64)
    if weights.ndim != 1 or len(weights) == 0 or (weights <= 0).any() or not np.isfinite(weights).all():
        raise ValueError(f"blend weights {weights.tolist()} must be positive finite numbers")
    weights = weights / weights.sum()
    # Enough due times per dataset that the first num_samples never run out of any of them.
    per_dataset = np.ceil(weights * (num_samples + len(weights))).astype(np.int64) + 1
    due = np.concatenate([(np.arange(n) + 0.5) / w for n, w in zip(per_dataset, weights)])
    owner = np.repeat(np.arange(len(weights), dtype=np.int16), per_dataset)
    local = np.concatenate([np.arange(n, dtype=np.int64) for n in per_dataset])
    order = np.argsort(due, kind="stable")[:num_samples]
    return owner[order], local[order]


class BlendedDataset(torch.utils.data.Dataset):
    """Serves `datasets[dataset_index[i]][dataset_sample_index[i]]`, the arrays of build_blend_index.

    A member that the blend never draws from (its weight is too small for the sample count) may be None.
    """

    def __init__(self, datasets, dataset_index: np.ndarray, dataset_sample_index: np.ndarray):
        self.datasets = list(datasets)
        self.dataset_index, self.dataset_sample_index = dataset_index, dataset_sample_index
        counts = np.bincount(dataset_index, minlength=len(self.datasets))
        if len(counts) != len(self.datasets):
            raise ValueError(f"the blend index names {len(counts)} datasets but {len(self.datasets)} were given")
        for i, (dataset, needed) in enumerate(zip(self.datasets, counts)):
            available = 0 if dataset is None else len(dataset)
            if available < needed:
                raise ValueError(f"blended dataset member {i} has {available} samples; the blend needs {needed}")

    def __len__(self) -> int:
        return len(self.dataset_index)

    def __getitem__(self, index: int) -> dict:
        return self.datasets[self.dataset_index[index]][int(self.dataset_sample_index[index])]
