r"""Structured statistics of a convolution's patches, without unfolding the whole layer.

With ``a_{n,r}`` the im2col patch of example ``n`` at output position ``r`` (the order of
``weight.reshape(C_out, -1)``, a constant-1 bias coordinate last with ``bias=True``), as in
:mod:`kfac_kernels.ops.patch_covariance`:

* :func:`patch_mean`: ``\bar a_n = (1/R) \sum_r a_{n,r}``, ``(groups, N, D_g)`` -- the rows of
  K-FAC-reduce (Eschenhagen et al. (2023), Eq. 10) and the per-example vectors of two-level
  K-FAC. Each kernel offset's strided window of the (padded) input is averaged: ``O(k_h k_w)``
  passes over the input, no unfolded tensor.
* :func:`patch_covariance_diagonal`: the diagonal of ``alpha \sum a a^T`` (expand: over all
  patches; reduce: over the mean patches). In expand form the diagonal entry of coordinate
  ``(channel, offset)`` is the sum of the squared input over the window that offset reads: a
  strided window sum of ``\sum_n x^2``, ``O(N C H W + C k_h k_w H_out W_out)``.
* :func:`patch_covariance_blocks`: the diagonal blocks of contiguous coordinate ranges
  ``widths`` (blocks need not follow channel boundaries, e.g. SINGD's block-diagonal factors of
  size ``k``). Expand form unfolds the patches of a few channels at a time -- a chunk ending
  where a block and a channel end together, ``k / gcd(k_h k_w, k)`` channels for equal blocks
  of size ``k`` -- so the temporary is bounded by the chunk, never the whole layer.

Each has an eager reference (``F.unfold``) in :func:`patch_statistics_eager`, the definition the
tests compare against. These are composite torch computations (no separate kernels).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .patch_covariance import ConvGeometry, check_input, padded_input

_OP = "patch_statistics"


def _windows(x4: torch.Tensor, geom: ConvGeometry):
    """The strided window of every kernel offset of a zero-padded ``x4``, offsets row-major."""
    (kh, kw), (sh, sw), (dh, dw) = geom.kernel, geom.stride, geom.dilation
    oh, ow = geom.out_size
    for u in range(kh):
        for v in range(kw):
            yield x4[:, :, u * dh:u * dh + sh * (oh - 1) + 1:sh,
                     v * dw:v * dw + sw * (ow - 1) + 1:sw]


def _append_bias(rows: torch.Tensor, bias: bool, value: float = 1.0) -> torch.Tensor:
    if not bias:
        return rows
    return torch.cat([rows, rows.new_full((*rows.shape[:-1], 1), value)], dim=-1)


def patch_mean(x: torch.Tensor, kernel_size, stride=1, padding=0, dilation=1, groups: int = 1,
               *, bias: bool = False, padding_mode: str = "zeros") -> torch.Tensor:
    """``(groups, N, D_g)``: every example's patch averaged over the output positions (see the
    module docstring), in ``x``'s dtype."""
    check_input(x, groups)
    x4, geom = padded_input(x, kernel_size, stride, padding, dilation, padding_mode,
                            pad_zeros=True)
    cols = torch.stack([w.mean(dim=(2, 3)) for w in _windows(x4, geom)], dim=2)  # (N, C, k)
    n, c, k = cols.shape
    rows = cols.reshape(n, groups, (c // groups) * k).transpose(0, 1)
    return _append_bias(rows, bias)


def patch_rows(x: torch.Tensor, kernel_size, stride=1, padding=0, dilation=1, groups: int = 1,
               *, bias: bool = False, padding_mode: str = "zeros") -> torch.Tensor:
    """``(groups, N * R, D_g)``: every patch ``a_{n,r}`` as a row (example-major), in ``x``'s
    dtype -- the unfolded tensor itself, for callers that keep the expand rows because there are
    no more of them than coordinates (``N R <= D_g``: no larger than the Gram ``A``)."""
    check_input(x, groups)
    x4, geom = padded_input(x, kernel_size, stride, padding, dilation, padding_mode,
                            pad_zeros=True)
    patches = F.unfold(x4, geom.kernel, dilation=geom.dilation, stride=geom.stride)
    n, width, r = patches.shape
    rows = patches.reshape(n, groups, width // groups, r).permute(1, 0, 3, 2)
    return _append_bias(rows.reshape(groups, n * r, width // groups), bias)


def _mean_alpha(n: int, geom: ConvGeometry, mode: str) -> float:
    return 1.0 / n if mode == "reduce" else 1.0 / (n * geom.positions)


def patch_covariance_diagonal(x: torch.Tensor, kernel_size, stride=1, padding=0, dilation=1,
                              groups: int = 1, *, mode: str = "expand", bias: bool = False,
                              padding_mode: str = "zeros", alpha: float | None = None
                              ) -> torch.Tensor:
    """``(groups, D_g)``: the diagonal of ``alpha * sum a a^T`` (default ``alpha``: the mean,
    as :func:`~kfac_kernels.ops.patch_covariance`), in ``x``'s dtype."""
    check_input(x, groups)
    _check_mode(mode)
    if mode == "reduce":
        rows = patch_mean(x, kernel_size, stride, padding, dilation, groups, bias=bias,
                          padding_mode=padding_mode)
        if alpha is None:
            alpha = 1.0 / x.shape[0]
        return (rows * rows).sum(dim=1) * alpha
    # Every padding mode copies pixels (or adds zeros), so it commutes with squaring and with
    # the sum over the batch: pad the (1, C, H, W) sum of squares, not the input.
    squares = (x * x).sum(dim=0, keepdim=True)
    squares, geom = padded_input(squares, kernel_size, stride, padding, dilation, padding_mode,
                                 pad_zeros=True)
    if alpha is None:
        alpha = _mean_alpha(x.shape[0], geom, mode)
    diag = torch.stack([w.sum(dim=(0, 2, 3)) for w in _windows(squares, geom)], dim=-1)
    diag = diag.reshape(groups, -1) * alpha                        # channel-major, then offsets
    return _append_bias(diag, bias, float(x.shape[0] * geom.positions) * alpha)


def _check_mode(mode: str) -> None:
    if mode not in ("expand", "reduce"):
        raise ValueError(f"{_OP}: mode must be 'expand' or 'reduce', got {mode!r}")


def _check_widths(widths, dim: int) -> list[int]:
    widths = [int(w) for w in widths]
    if not widths or any(w < 1 for w in widths) or sum(widths) != dim:
        raise ValueError(f"{_OP}: widths must be positive and sum to the patch dimension {dim} "
                         f"(bias coordinate included), got {widths}")
    return widths


def _chunks(widths: list[int], per_channel: int, channels: int) -> list[tuple[int, int, int, int]]:
    """``(first channel, last channel + 1, first block, last block + 1)`` per chunk: a chunk
    closes where a block ends on a channel boundary (or at the last block)."""
    out, c0, b0, end = [], 0, 0, 0
    for b, w in enumerate(widths):
        end += w
        at_boundary = end % per_channel == 0 and end // per_channel <= channels
        if at_boundary or b == len(widths) - 1:
            c1 = min(channels, math.ceil(end / per_channel))
            out.append((c0, c1, b0, b + 1))
            c0, b0 = c1, b + 1
    return out


def patch_covariance_blocks(x: torch.Tensor, kernel_size, stride=1, padding=0, dilation=1,
                            groups: int = 1, *, widths, mode: str = "expand", bias: bool = False,
                            padding_mode: str = "zeros", alpha: float | None = None
                            ) -> list[torch.Tensor]:
    """The diagonal blocks of ``alpha * sum a a^T`` over the coordinate ranges ``widths``
    (summing to ``D_g``, the bias coordinate included): a list of ``(groups, w, w)``."""
    check_input(x, groups)
    _check_mode(mode)
    if mode == "reduce":
        rows = patch_mean(x, kernel_size, stride, padding, dilation, groups, bias=bias,
                          padding_mode=padding_mode)
        widths = _check_widths(widths, rows.shape[-1])
        if alpha is None:
            alpha = 1.0 / x.shape[0]
        return _row_blocks(rows, widths, alpha)
    x4, geom = padded_input(x, kernel_size, stride, padding, dilation, padding_mode,
                            pad_zeros=True)
    if alpha is None:
        alpha = _mean_alpha(x.shape[0], geom, mode)
    per_channel = geom.kernel[0] * geom.kernel[1]
    cg = x4.shape[1] // groups
    widths = _check_widths(widths, cg * per_channel + int(bias))
    out: list[list[torch.Tensor]] = [[] for _ in widths]
    count = x4.shape[0] * geom.positions
    for g in range(groups):
        for c0, c1, b0, b1 in _chunks(widths, per_channel, cg):
            # The chunk's rows: the patch coordinates of channels c0..c1 (and the bias last).
            rows = x4.new_zeros(count, 0)
            if c1 > c0:  # (a last chunk may hold the bias coordinate alone)
                patches = F.unfold(x4[:, g * cg + c0:g * cg + c1], geom.kernel,
                                   dilation=geom.dilation, stride=geom.stride)
                rows = patches.transpose(1, 2).reshape(count, -1)
            if b1 == len(widths) and bias:
                rows = torch.cat([rows, rows.new_ones(count, 1)], dim=1)
            start = 0  # a chunk starts where its first block starts
            for b in range(b0, b1):
                part = rows[:, start:start + widths[b]]
                out[b].append(part.T @ part * alpha)
                start += widths[b]
    return [torch.stack(parts) for parts in out]


def _row_blocks(rows: torch.Tensor, widths: list[int], alpha: float) -> list[torch.Tensor]:
    out, start = [], 0
    for w in widths:
        part = rows[..., start:start + w]
        out.append(part.mT @ part * alpha)
        start += w
    return out


def patch_statistics_eager(x: torch.Tensor, kernel_size, stride=1, padding=0, dilation=1,
                           groups: int = 1, *, mode: str = "expand", bias: bool = False,
                           padding_mode: str = "zeros") -> torch.Tensor:
    """The definition: ``(groups, m, D_g)`` rows from ``F.unfold`` (every patch for expand,
    the mean patch of each example for reduce), bias coordinate last."""
    x4, geom = padded_input(x, kernel_size, stride, padding, dilation, padding_mode,
                            pad_zeros=True)
    patches = F.unfold(x4, geom.kernel, dilation=geom.dilation, stride=geom.stride)  # (N, D, R)
    n, d, r = patches.shape
    per_group = patches.reshape(n, groups, d // groups, r)
    if mode == "reduce":
        rows = per_group.mean(dim=3).transpose(0, 1)
    else:
        rows = per_group.permute(1, 0, 3, 2).reshape(groups, n * r, d // groups)
    return _append_bias(rows, bias)
