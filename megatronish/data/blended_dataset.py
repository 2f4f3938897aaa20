"""Mixing several datasets in given proportions (--data-path 0.3 a 0.7 b): Megatron-core's BlendedDataset.

Sample i of the blend comes from the dataset furthest behind its share: the one with the largest
w_d * max(i, 1) - (samples it gave so far), ties to the lower index (Megatron's
build_blending_indices, greedy and deterministic; the member datasets are shuffled themselves).
The (dataset_index, dataset_sample_index) arrays are cached in Megatron's layout (index_cache.py).
"""

import numpy as np
import torch

from megatronish.data import index_cache

_BLEND_ARRAYS = ("dataset_index", "dataset_sample_index")


def normalize(weights) -> list[float]:
    """Weights divided by their sum, in float64 (as Megatron does it, so that the fractions agree bit for bit)."""
    w = np.asarray(weights, dtype=np.float64)
    return (w / w.sum()).tolist()


def build_blend_index(weights, size: int) -> tuple[np.ndarray, np.ndarray]:
    """(dataset_index int16, dataset_sample_index int64) of the first `size` blended samples.

    A plain loop (about a microsecond per sample for a few datasets); the result is cached.
    """
    weights = [float(w) for w in weights]
    if not weights or any(not w > 0 or not np.isfinite(w) for w in weights):
        raise ValueError(f"blend weights {weights} must be positive finite numbers")
    counts = [0] * len(weights)
    dataset_index = np.zeros(size, dtype=np.int16)
    dataset_sample_index = np.zeros(size, dtype=np.int64)
    for i in range(size):
        x = max(float(i), 1.0)
        best, best_error = 0, weights[0] * x - counts[0]
        for d in range(1, len(weights)):
            error = weights[d] * x - counts[d]
            if error > best_error:
                best, best_error = d, error
        dataset_index[i] = best
        dataset_sample_index[i] = counts[best]
        counts[best] += 1
    return dataset_index, dataset_sample_index


class BlendedDataset(torch.utils.data.Dataset):
    """`size` samples drawn from `datasets` in the proportions `weights` (normalized here)."""

    def __init__(self, datasets: list, weights, size: int, split_name: str, write_dir: str, cache_dirs: list):
        self.datasets, self.weights, self.size, self.split_name = list(datasets), normalize(weights), size, split_name
        arrays, _ = index_cache.find(cache_dirs, self.description(), _BLEND_ARRAYS)
        if arrays is None or len(arrays["dataset_index"]) != size:
            arrays = dict(zip(_BLEND_ARRAYS, build_blend_index(self.weights, size)))
            index_cache.save(write_dir, self.description(), arrays)
        self.dataset_index, self.dataset_sample_index = arrays["dataset_index"], arrays["dataset_sample_index"]
        counts = np.bincount(self.dataset_index, minlength=len(self.datasets))
        for i, (dataset, needed) in enumerate(zip(self.datasets, counts)):
            if len(dataset) < needed:
                raise ValueError(f"the {split_name} blend needs {needed} samples of member {i} "
                                 f"({dataset.dataset_path}), which has {len(dataset)}")

    def description(self) -> dict:
        return {"class": "BlendedDataset", "datasets": [d.description() for d in self.datasets],
                "split": self.split_name, "weights": self.weights, "size": self.size}

    def __len__(self) -> int:
        return len(self.dataset_index)

    def __getitem__(self, index: int) -> dict:
        return self.datasets[self.dataset_index[index]][int(self.dataset_sample_index[index])]
