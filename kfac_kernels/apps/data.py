"""Small real data sets that ship with the dependencies (no download), as ready-made tensors.

:func:`load_digits_split` returns scikit-learn's bundled handwritten digits (1797 images of
8 x 8 pixels, 10 classes) as ``(N, 1, 8, 8)`` tensors, split into train and test sets.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

NUM_CLASSES = 10
IMAGE_SHAPE = (1, 8, 8)


class DigitsSplit(NamedTuple):
    """Train and test tensors of the digits data set and the statistics used to standardise them.

    ``x_*`` are ``(N, 1, 8, 8)`` images, ``y_*`` are ``(N,)`` int64 labels in ``0..9``; ``mean``
    and ``std`` are the training-set pixel statistics (after scaling to ``[0, 1]``) that both
    sets were standardised with.
    """

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    mean: float
    std: float


def _stratified_split(y: torch.Tensor, test_fraction: float, seed: int) -> tuple[torch.Tensor,
                                                                                  torch.Tensor]:
    """Indices (train, test): per class, a seeded shuffle and the first ``round(n_c * f)`` to
    test, so both sets keep the class proportions. Deterministic for a given ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    train, test = [], []
    for c in torch.unique(y).tolist():
        idx = torch.nonzero(y == c).flatten()
        idx = idx[torch.randperm(idx.numel(), generator=gen)]
        n_test = int(round(idx.numel() * test_fraction))
        test.append(idx[:n_test])
        train.append(idx[n_test:])
    # Sorted, so the order of the rows does not depend on the class loop.
    return torch.cat(train).sort().values, torch.cat(test).sort().values


def load_digits_split(seed: int = 0, test_fraction: float = 0.2, *,
                      dtype: torch.dtype = torch.float32,
                      device: torch.device | str = "cpu") -> DigitsSplit:
    """scikit-learn's digits as standardised ``(N, 1, 8, 8)`` tensors with a stratified split.

    Pixels (integers ``0..16``) are scaled to ``[0, 1]`` and then standardised with the mean and
    standard deviation over all pixels of the training images (one scalar each, so the images keep
    their spatial structure). The split is stratified by class and fixed by ``seed``: the same
    ``seed`` always gives the same train and test sets.

    Args:
        seed: seed of the train/test split.
        test_fraction: fraction of each class that goes to the test set, in ``(0, 1)``.
        dtype: floating dtype of the images.
        device: device of all returned tensors.
    """
    if isinstance(test_fraction, bool) or not isinstance(test_fraction, (int, float)) or not (
            0.0 < test_fraction < 1.0):
        raise ValueError(f"load_digits_split: test_fraction must be in (0, 1), got "
                         f"{test_fraction!r}")
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"load_digits_split: dtype must be a floating torch.dtype, got {dtype!r}")
    from sklearn.datasets import load_digits  # bundled with scikit-learn: works offline

    data = load_digits()
    x = torch.as_tensor(data.data, dtype=torch.float64).reshape(-1, *IMAGE_SHAPE) / 16.0
    y = torch.as_tensor(data.target, dtype=torch.int64)
    train_idx, test_idx = _stratified_split(y, float(test_fraction), int(seed))
    x_train, x_test = x[train_idx], x[test_idx]
    mean = float(x_train.mean())
    std = float(x_train.std())
    x_train = ((x_train - mean) / std).to(device=device, dtype=dtype).contiguous()
    x_test = ((x_test - mean) / std).to(device=device, dtype=dtype).contiguous()
    return DigitsSplit(x_train, y[train_idx].to(device), x_test, y[test_idx].to(device),
                       mean, std)
