r"""Block-diagonal Kronecker factors (BD-KFAC, seed 000 Sec. 4): partitions and layer adapters.

A layer's input features ``S_1 .. S_n`` and output features ``T_1 .. T_n`` are partitioned into
near-equal contiguous parts, the last absorbing the remainder (seed 000 Sec. 4.1-4.2), and only
the diagonal blocks

.. math::

    A_i = \mathbb{E}[a_{S_i} a_{S_i}^\top], \qquad G_i = \mathbb{E}[g_{T_i} g_{T_i}^\top]

are accumulated -- never the dense factors. The adapters here return, where the dense adapters of
:mod:`kfac_kernels.layers` return one ``(groups, D, D)`` sum, a list of ``(groups, D_i, D_i)``
block sums:

* ``nn.Linear``: blocks of the input rows' columns (the bias coordinate joins the last block).
* ``nn.Conv1d`` / ``nn.Conv2d``: input-channel blocks of ``|S_i| k_h k_w`` patch coordinates,
  computed by :func:`kfac_kernels.ops.patch_covariance`'s kernels straight from the input (no
  im2col); with ``groups > 1`` every group is partitioned the same way.
* ``nn.LayerNorm`` / ``nn.BatchNorm1d`` / ``nn.BatchNorm2d`` (seed 000 Sec. 4.3): the affine
  parameters ``[gamma, beta]`` of channel ``c`` act like a linear layer on the input
  ``[a_hat_c, 1]`` (``a_hat`` the normalised activation), so ``A`` is the fixed ``2 x 2`` second
  moment of ``[a_hat, 1]`` over all elements (no partition), and ``G`` is block-diagonal over
  channel partitions of the per-example output gradients summed over the non-parameter axes.
  The gradient matrix is ``[d gamma | d beta]``, ``(1, C, 2)``.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ._backend import resolve_backend
from .layers import ConvAdapter, LayerAdapter, LinearAdapter
from .ops.gradient_covariance import gradient_rows
from .ops.patch_covariance import (Segments, accumulation_dtype, as_4d, conv_geometry,
                                   patch_gram, pre_pad)
from .ops.symmetric_factor_update import symmetric_factor_update

NORM_TYPES = (nn.LayerNorm, nn.BatchNorm1d, nn.BatchNorm2d)


def partition_sizes(features: int, num_blocks: int | None = None,
                    block_size: int | None = None) -> list[int]:
    """Sizes of the contiguous parts ``S_1 .. S_n`` of ``features`` coordinates.

    ``num_blocks``: ``min(num_blocks, features)`` near-equal parts; ``block_size``:
    ``max(1, features // block_size)`` parts of ``block_size``. The last part absorbs the
    remainder in both cases (seed 000 Sec. 4.1).
    """
    if block_size is not None:
        n = max(1, features // block_size)
        return [block_size] * (n - 1) + [features - block_size * (n - 1)]
    n = max(1, min(int(num_blocks), features))
    q = features // n
    return [q] * (n - 1) + [features - q * (n - 1)]


def _offsets(sizes: list[int]) -> list[int]:
    out, start = [], 0
    for s in sizes:
        out.append(start)
        start += s
    return out


def _rows_blocks(current: list[torch.Tensor] | None, rows: torch.Tensor, widths: list[int],
                 alpha: float, backend: str) -> list[torch.Tensor]:
    """``current_i + alpha * rows_i^T rows_i`` for the column blocks ``rows_i`` of
    ``rows`` (``(groups, m, sum(widths))``)."""
    out = []
    for i, (c0, w) in enumerate(zip(_offsets(widths), widths)):
        prev = None if current is None else current[i]
        out.append(symmetric_factor_update(prev, rows[..., c0:c0 + w], 0.0 if prev is None else 1.0,
                                           alpha, backend=backend))
    return out


class BlockMixin:
    """Shared by the block adapters: the partitions of one layer and the G side."""

    in_blocks: list[int]    # input features (Linear) / channels per group (Conv) per block
    out_blocks: list[int]   # output features per group per block

    def set_partition(self, num_blocks: int | None, block_size: int | None) -> None:
        self.in_blocks = partition_sizes(self.in_partition_features, num_blocks, block_size)
        self.out_blocks = partition_sizes(self.out_features_per_group, num_blocks, block_size)

    @property
    def in_partition_features(self) -> int:
        """How many input coordinates (channels for a convolution) are partitioned."""
        raise NotImplementedError

    @property
    def positions_per_feature(self) -> int:
        """Patch coordinates per partitioned input coordinate (``k_h k_w`` for a convolution)."""
        return 1

    @property
    def a_block_widths(self) -> list[int]:
        """Widths ``|S_i| * k`` of the A blocks, the bias coordinate in the last."""
        k = self.positions_per_feature
        widths = [s * k for s in self.in_blocks]
        if self.bias is not None:
            widths[-1] += 1
        return widths

    @property
    def g_block_widths(self) -> list[int]:
        return list(self.out_blocks)

    def accumulate_output(self, current, grad, kfac_approx, dtype, alpha, backend):
        rows = gradient_rows(self.batched_output(grad), self.channel_dim, self.groups,
                             kfac_approx).to(dtype)
        return _rows_blocks(current, rows, self.g_block_widths, alpha, backend)


class BlockLinearAdapter(BlockMixin, LinearAdapter):
    @property
    def in_partition_features(self) -> int:
        return self.weight.shape[1]

    def accumulate_input(self, current, x, kfac_approx, dtype, backend):
        rows, count = self.input_rows(x, kfac_approx)
        if count == 0:
            return current, 0
        return _rows_blocks(current, rows.to(dtype), self.a_block_widths, 1.0, backend), count


class BlockConvAdapter(BlockMixin, ConvAdapter):
    @property
    def in_partition_features(self) -> int:
        return self.weight.shape[1]  # input channels per group

    @property
    def positions_per_feature(self) -> int:
        return math.prod(self.weight.shape[2:])

    def accumulate_input(self, current, x, kfac_approx, dtype, backend):
        """Each block is one batched segment of the patch-covariance kernels: the same channel
        range of every group, ``(groups, D_i, D_i)``, never unfolded."""
        m = self.module
        if x.dim() == self.spatial_dims + 1:
            x = x.unsqueeze(0)
        n = x.shape[0]
        if n == 0:
            return current, 0
        chosen = resolve_backend(backend, x.device, "patch_covariance")
        if chosen == "eager" or accumulation_dtype(x.dtype) != dtype:
            x = x.to(dtype)
        geom = conv_geometry(tuple(x.shape[2:]), m.kernel_size, m.stride, m.padding, m.dilation)
        x, geom = pre_pad(x, geom, m.padding_mode)
        x4 = as_4d(x)
        cg = x.shape[1] // self.groups
        reduce = kfac_approx == "reduce"
        out = []
        last = len(self.in_blocks) - 1
        for i, (c0, size) in enumerate(zip(_offsets(self.in_blocks), self.in_blocks)):
            seg = Segments(self.groups, c0, cg, size, self.bias is not None and i == last)
            prev = None if current is None else current[i]
            out.append(patch_gram(x4, geom, seg, reduce, prev, 0.0 if prev is None else 1.0, 1.0,
                                  chosen).to(dtype))
        return out, (n if reduce else n * geom.positions)


class NormAdapter(BlockMixin, LayerAdapter):
    """``nn.LayerNorm`` (parameters over the trailing ``normalized_shape``) and
    ``nn.BatchNorm1d/2d`` (parameters over channel dim 1), with affine parameters."""

    def __init__(self, name: str, module: nn.Module):
        super().__init__(name, module)
        self.is_layer_norm = isinstance(module, nn.LayerNorm)
        self.channel_dim = -1 if self.is_layer_norm else 1

    @property
    def channels(self) -> int:
        return self.weight.numel()

    @property
    def out_features_per_group(self) -> int:
        return self.channels

    @property
    def in_features_per_group(self) -> int:
        return 2 if self.bias is not None else 1

    @property
    def in_partition_features(self) -> int:
        return 1

    def set_partition(self, num_blocks, block_size) -> None:
        self.in_blocks = [1]
        self.out_blocks = partition_sizes(self.channels, num_blocks, block_size)

    @property
    def a_block_widths(self) -> list[int]:
        return [self.in_features_per_group]

    def grad_matrix(self) -> torch.Tensor | None:
        w = self.weight
        if w.grad is None:
            return None
        cols = [w.grad.reshape(-1)]
        b = self.bias
        if b is not None:
            cols.append(b.grad.reshape(-1) if b.grad is not None else torch.zeros_like(w.grad).reshape(-1))
        return torch.stack(cols, dim=1).unsqueeze(0)

    def set_grad_matrix(self, mat: torch.Tensor) -> None:
        w, b = self.weight, self.bias
        w.grad.copy_(mat[0, :, 0].reshape(w.shape))
        if b is not None:
            if b.grad is None:
                b.grad = torch.empty_like(b)
            b.grad.copy_(mat[0, :, 1].reshape(b.shape))

    def _normalized(self, x: torch.Tensor) -> torch.Tensor:
        """``a_hat`` exactly as the module normalises in training mode (batch statistics)."""
        m = self.module
        if self.is_layer_norm:
            return F.layer_norm(x, m.normalized_shape, None, None, m.eps)
        return F.batch_norm(x, None, None, None, None, True, 0.0, m.eps)

    def accumulate_input(self, current, x, kfac_approx, dtype, backend):
        if x.numel() == 0:
            return current, 0
        a = self._normalized(x.to(accumulation_dtype(x.dtype))).to(dtype)
        s1, s2, count = a.sum(), (a * a).sum(), a.numel()
        if self.bias is not None:
            block = torch.stack([torch.stack([s2, s1]),
                                 torch.stack([s1, s1.new_tensor(float(count))])])
        else:
            block = s2.reshape(1, 1)
        block = block.unsqueeze(0)
        return [block if current is None else current[0] + block], count

    def _per_example_sums(self, grad: torch.Tensor) -> torch.Tensor:
        """``(1, N, C)``: output gradients summed over every axis but the batch and the
        parameters' axes."""
        n = grad.shape[0]
        if self.is_layer_norm:
            sums = grad.reshape(n, -1, self.channels).sum(dim=1)
        else:
            sums = grad.reshape(n, self.channels, -1).sum(dim=2)
        return sums.unsqueeze(0)

    def accumulate_output(self, current, grad, kfac_approx, dtype, alpha, backend):
        rows = self._per_example_sums(grad).to(dtype)
        return _rows_blocks(current, rows, self.g_block_widths, alpha, backend)

    def batch_and_positions(self, g: torch.Tensor) -> tuple[int, int]:
        n = g.shape[0]
        return n, (g.numel() // (n * self.channels) if n * self.channels else 0)

    def batched_output(self, g: torch.Tensor) -> torch.Tensor:
        return g


def make_block_adapter(name: str, module: nn.Module, num_blocks: int | None,
                       block_size: int | None) -> LayerAdapter | None:
    """The block adapter of ``module`` (partitioned), or ``None`` if its type is unsupported."""
    adapter: BlockMixin | None = None
    if isinstance(module, nn.Linear) and not isinstance(
            module, nn.modules.linear.NonDynamicallyQuantizableLinear):
        adapter = BlockLinearAdapter(name, module)
    elif isinstance(module, (nn.Conv1d, nn.Conv2d)):
        adapter = BlockConvAdapter(name, module)
    elif isinstance(module, NORM_TYPES):
        if getattr(module, "weight", None) is None:
            return None  # no affine parameters: nothing to precondition
        adapter = NormAdapter(name, module)
    if adapter is not None:
        adapter.set_partition(num_blocks, block_size)
    return adapter
