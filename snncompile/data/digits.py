"""scikit-learn's 8x8 handwritten digits: the embedded default (1,797 real scans, no download)."""

from __future__ import annotations

import torch

from . import Dataset, Split

__all__ = ["load_digits"]


def load_digits(test_fraction: float = 0.2, seed: int = 0) -> Dataset:
    """Digits as ``[N, 1, 8, 8]`` float32 in [0, 1], with a fixed seeded stratified-free split.

    Args:
        test_fraction: share of samples held out for testing.
        seed: seed of the permutation that makes the split (recorded in the run's config).
    """
    from sklearn.datasets import load_digits as _sk_load

    bunch = _sk_load()
    x = torch.tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(bunch.target, dtype=torch.long)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    n_test = int(round(len(y) * test_fraction))
    test_idx, train_idx = order[:n_test], order[n_test:]
    return Dataset(
        name="digits",
        train=Split(x[train_idx], y[train_idx]),
        test=Split(x[test_idx], y[test_idx]),
        classes=[str(i) for i in range(10)],
        info={"source": "sklearn.datasets.load_digits", "split_seed": seed, "test_fraction": test_fraction},
    )
