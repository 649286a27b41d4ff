"""Small models used by the ``kfac-train`` command, the examples and the end-to-end tests."""
from __future__ import annotations

import torch
from torch import nn


class DigitsCNN(nn.Sequential):
    """A small CNN for ``(N, 1, 8, 8)`` digit images (about 38k parameters)::

        Conv2d(1, 16, 3, padding=1) -> ReLU -> Conv2d(16, 32, 3, padding=1) -> ReLU
        -> MaxPool2d(2) -> Flatten -> Linear(32*4*4, 64) -> ReLU -> Linear(64, num_classes)

    The ReLUs are in-place (the curvature capture handles that). Every layer with weights is
    one K-FAC supports, so K-FAC preconditions all of them.

    Args:
        num_classes: number of outputs (logits).
        channels: output channels of the two convolutions.
        hidden: width of the hidden linear layer.
    """

    def __init__(self, num_classes: int = 10, channels: tuple[int, int] = (16, 32),
                 hidden: int = 64):
        c1, c2 = channels
        super().__init__(
            nn.Conv2d(1, c1, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(c1, c2, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(c2 * 4 * 4, hidden),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, num_classes),
        )


def num_parameters(model: nn.Module) -> int:
    """Number of trainable scalars of ``model``."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def build_digits_cnn(seed: int, *, dtype: torch.dtype = torch.float32,
                     device: torch.device | str = "cpu") -> DigitsCNN:
    """A :class:`DigitsCNN` initialised from ``seed`` (the global RNG is left as it was)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = DigitsCNN()
    return model.to(device=device, dtype=dtype)
