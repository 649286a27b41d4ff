r"""Gradient covariance: the output-side Kronecker factor G of a linear or convolution layer.

For output gradients ``g_{n,r}`` (example ``n``, weight-sharing position ``r``; a conv's spatial
positions or a linear layer's middle dims):

.. math::

    \text{expand:}\quad G \leftarrow \text{decay}\, G + \alpha \sum_{n,r} g_{n,r} g_{n,r}^\top
    \qquad
    \text{reduce:}\quad G \leftarrow \text{decay}\, G + \alpha \sum_n \Big(\sum_r g_{n,r}\Big)
    \Big(\sum_r g_{n,r}\Big)^\top

with one factor per group (channels split evenly). The rows are a view of ``grad`` whenever its
layout allows (features last: linear layers, channels_last convolutions), otherwise one copy of
the gradient (O(grad) memory, never more); the sum of outer products and the moving average are
one call of :func:`symmetric_factor_update` (one triangle, mirrored).
"""
from __future__ import annotations

import torch

from .symmetric_factor_update import symmetric_factor_update

_OP = "gradient_covariance"


def gradient_rows(grad: torch.Tensor, channel_dim: int, groups: int, mode: str) -> torch.Tensor:
    """``(groups, rows, channels // groups)``: one row per (example, position) for expand, per
    example (summed over positions) for reduce. ``grad``'s first dim is the batch."""
    if grad.dim() == 1:
        grad = grad.unsqueeze(0)
    channel_dim = channel_dim % grad.dim()
    if channel_dim == 0:
        raise ValueError(f"{_OP}: channel_dim must not be the batch dim")
    moved = grad.movedim(channel_dim, -1)  # a view
    n, c = moved.shape[0], moved.shape[-1]
    if c % groups != 0:
        raise ValueError(f"{_OP}: {c} channels are not divisible by groups={groups}")
    per_example = moved.reshape(n, -1, groups, c // groups)  # a view when the layout allows
    if mode == "reduce":
        rows = per_example.sum(dim=1)
    else:
        rows = per_example.reshape(-1, groups, c // groups)
    return rows.transpose(0, 1)


def gradient_covariance(grad: torch.Tensor, *, channel_dim: int = -1, groups: int = 1,
                        mode: str = "expand", factor: torch.Tensor | None = None,
                        decay: float = 0.0, alpha: float = 1.0, out_dtype: torch.dtype | None = None,
                        backend: str = "auto") -> torch.Tensor:
    """``decay * factor + alpha * sum`` (see the module docstring) as ``(groups, C_g, C_g)``.

    Args:
        grad: output gradient, batch first; ``channel_dim`` holds the features (``-1`` for
            ``nn.Linear``, ``1`` for convolutions).
        groups: number of channel groups (one factor each).
        mode: ``"expand"`` or ``"reduce"``.
        factor: stored factor to decay (``None``: start from zero).
        out_dtype: dtype of the result and of the accumulation (default: ``factor``'s dtype, else
            fp32 for fp16/bf16 gradients and ``grad.dtype`` otherwise).
        backend: as for :func:`symmetric_factor_update`.
    """
    if not isinstance(grad, torch.Tensor):
        raise TypeError(f"{_OP}: grad must be a torch.Tensor, got {type(grad).__name__}")
    if mode not in ("expand", "reduce"):
        raise ValueError(f"{_OP}: mode must be 'expand' or 'reduce', got {mode!r}")
    if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1:
        raise ValueError(f"{_OP}: groups must be a positive int, got {groups!r}")
    if out_dtype is None:
        if factor is not None:
            out_dtype = factor.dtype
        elif grad.dtype in (torch.float16, torch.bfloat16):
            out_dtype = torch.float32
        else:
            out_dtype = grad.dtype
    rows = gradient_rows(grad, channel_dim, groups, mode).to(out_dtype)
    return symmetric_factor_update(factor, rows, decay if factor is not None else 0.0, alpha,
                                   backend=backend)
