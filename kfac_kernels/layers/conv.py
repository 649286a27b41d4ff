"""``nn.Conv1d`` / ``nn.Conv2d``: A is the covariance of the input patches, never unfolded.

The patches are channel-major, then kernel positions (the order of ``weight.reshape(C_out,
-1)``), one factor pair per group; padding is applied exactly as the module applies it
(``"same"``, ``"valid"``, every ``padding_mode``). The statistics come from the conv ops
(:func:`kfac_kernels.ops.patch_covariance` for dense factors and channel-aligned blocks,
:func:`~kfac_kernels.ops.patch_covariance_diagonal`,
:func:`~kfac_kernels.ops.patch_covariance_blocks` and :func:`~kfac_kernels.ops.patch_mean` for the
others), which pick the kernel.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from .. import ops
from .base import DENSE, LayerAdapter, Layout, as_dense, gram_of_rows, rows_fit


class ConvAdapter(LayerAdapter):
    channel_dim = 1
    rows_statistics = True

    def __init__(self, name: str, module: nn.Module):
        super().__init__(name, module)
        self.groups = module.groups
        self.spatial_dims = 1 if isinstance(module, nn.Conv1d) else 2
        self.input_unit = math.prod(module.weight.shape[2:])

    def _batched(self, x: torch.Tensor) -> torch.Tensor:
        return x.unsqueeze(0) if x.dim() == self.spatial_dims + 1 else x

    def batched_output(self, g: torch.Tensor) -> torch.Tensor:
        return g.unsqueeze(0) if g.dim() == self.spatial_dims + 1 else g

    def _conv_args(self) -> tuple:
        m = self.module
        return m.kernel_size, m.stride, m.padding, m.dilation, self.groups

    def _count(self, x: torch.Tensor, approx: str) -> int:
        if approx == "reduce":
            return x.shape[0]
        m = self.module
        geom = ops.conv_geometry(tuple(x.shape[2:]), m.kernel_size, m.stride, m.padding,
                                 m.dilation)
        return x.shape[0] * geom.positions

    def _channel_blocks(self, layout: Layout) -> list[int] | None:
        """The channel counts of ``layout``'s blocks if every block ends on a channel boundary
        (the bias coordinate in the last), else ``None``."""
        unit, bias = self.input_unit, int(self.bias is not None)
        widths = list(layout.widths)
        widths[-1] -= bias
        if any(w <= 0 or w % unit for w in widths):
            return None
        return [w // unit for w in widths]

    def input_rows(self, x, approx, context=None):
        if approx != "reduce":
            raise ValueError(f"module {self.name!r}: the expand rows of a convolution are its "
                             "unfolded patches, which are never formed")
        x = self._batched(x)
        rows = ops.patch_mean(x, *self._conv_args(), bias=self.bias is not None,
                              padding_mode=self.module.padding_mode)
        return rows, x.shape[0]

    def input_gram(self, x, approx, layout, dtype, backend, current=None, decay=1.0, alpha=1.0,
                   context=None):
        x = self._batched(x)
        if x.shape[0] == 0:
            return current, 0
        count = self._count(x, approx)
        bias = self.bias is not None
        if layout.kind == "rows":
            if approx == "reduce" or rows_fit(current, count, self.in_features_per_group):
                # Few patches (late CNN stages): the unfolded patches are no larger than the
                # Gram; reduce rows are the mean patches.
                rows, _ = (self.input_rows(x, approx) if approx == "reduce" else
                           (ops.patch_rows(x.to(dtype), *self._conv_args(), bias=bias,
                                           padding_mode=self.module.padding_mode), count))
                return gram_of_rows(current, rows.to(dtype), layout, decay, alpha,
                                    backend), count
            current, layout = as_dense(current, backend), DENSE
        kw = dict(mode=approx, bias=bias, padding_mode=self.module.padding_mode)
        channels = self._channel_blocks(layout) if layout.kind == "blocks" else None
        if layout.kind == "dense" or channels is not None:
            out = ops.patch_covariance(x, *self._conv_args(), num_blocks=channels, stacked=True,
                                       factor=current, decay=decay, alpha=alpha,
                                       out_dtype=dtype, backend=backend, **kw)
            return out, count
        x = x.to(dtype)
        if layout.kind == "diagonal":
            new = ops.patch_covariance_diagonal(x, *self._conv_args(), alpha=alpha, **kw)
            return (new if current is None else new.add_(current, alpha=decay)), count
        new = ops.patch_covariance_blocks(x, *self._conv_args(), widths=layout.widths,
                                          alpha=alpha, **kw)
        if current is not None:
            new = [n.add_(c, alpha=decay) for n, c in zip(new, current)]
        return new, count

    def example_inputs(self, x, dtype):
        return self.input_rows(self._batched(x).to(dtype), "reduce")[0]
