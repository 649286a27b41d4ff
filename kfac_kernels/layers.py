"""Layer adapters: how a supported module's inputs and output gradients become rows of X^T X.

Each adapter turns a layer input into ``(groups, rows, D)`` and an output gradient into
``(groups, rows, d_out)``, where a row is one example of the weight-sharing sum:

* ``expand`` (seed 001, Eq. 7): one row per example and weight-sharing position, ``N * R`` rows.
* ``reduce`` (seed 001, Eq. 10): one row per example; inputs are averaged over the ``R``
  positions, output gradients summed over them.

The bias is folded in as a last input coordinate equal to 1, so ``kron(G, A)`` is the curvature
block of the row-major flattening of ``[W | b]`` with ``W`` reshaped to ``(d_out, -1)``. A
convolution with ``groups > 1`` has one factor pair per group, stacked along the first dim.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from ._backend import resolve_backend
from .ops.patch_covariance import (Segments, accumulation_dtype, as_4d, conv_geometry,
                                   patch_gram, pre_pad)
from .ops.gradient_covariance import gradient_covariance
from .ops.symmetric_factor_update import symmetric_factor_update

SUPPORTED_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d)


class LayerAdapter:
    """Base adapter. ``name`` is the qualified module name, ``module`` the module."""

    groups: int = 1

    def __init__(self, name: str, module: nn.Module):
        self.name = name
        self.module = module

    # --- parameters -------------------------------------------------------------------------
    @property
    def weight(self) -> nn.Parameter:
        return self.module.weight

    @property
    def bias(self) -> nn.Parameter | None:
        """The bias if it exists and trains (a frozen bias is not part of the curvature block)."""
        b = self.module.bias
        return b if b is not None and b.requires_grad else None

    @property
    def trainable(self) -> bool:
        return self.weight.requires_grad

    def params(self) -> list[nn.Parameter]:
        return [p for p in (self.weight, self.bias) if p is not None]

    @property
    def out_features_per_group(self) -> int:
        return self.weight.shape[0] // self.groups

    @property
    def in_features_per_group(self) -> int:
        """Width of A: the input (patch) dimension of one group, plus one for the bias."""
        return math.prod(self.weight.shape[1:]) + (1 if self.bias is not None else 0)

    def grad_matrix(self) -> torch.Tensor | None:
        """``[dW | db]`` as ``(groups, d_out_g, D_g)``, or ``None`` if ``weight.grad`` is None."""
        w = self.weight
        if w.grad is None:
            return None
        mat = w.grad.reshape(self.groups, self.out_features_per_group, -1)
        b = self.bias
        if b is not None:
            db = b.grad if b.grad is not None else torch.zeros_like(b)
            mat = torch.cat([mat, db.reshape(self.groups, -1, 1)], dim=2)
        return mat

    def set_grad_matrix(self, mat: torch.Tensor) -> None:
        """Write a ``(groups, d_out_g, D_g)`` matrix back into ``weight.grad`` / ``bias.grad``."""
        w = self.weight
        b = self.bias
        if b is not None:
            wmat, bcol = mat[..., :-1], mat[..., -1]
            if b.grad is None:
                b.grad = torch.empty_like(b)
            b.grad.copy_(bcol.reshape(b.shape))
        else:
            wmat = mat
        w.grad.copy_(wmat.reshape(w.shape))

    # --- rows ---------------------------------------------------------------------------------
    def input_positions(self, x: torch.Tensor) -> torch.Tensor:
        """Layer input as ``(groups, N, R, D_g)`` without the bias coordinate."""
        raise NotImplementedError

    def batched_output(self, g: torch.Tensor) -> torch.Tensor:
        """An output (gradient) with its batch dim (added for unbatched calls)."""
        raise NotImplementedError

    def input_rows(self, x: torch.Tensor, kfac_approx: str) -> tuple[torch.Tensor, int]:
        """Rows for A and their count (the normaliser: ``N * R`` for expand, ``N`` for reduce)."""
        pos = self.input_positions(x)
        groups, n, r, d = pos.shape
        if kfac_approx == "expand":
            rows = pos.reshape(groups, n * r, d)
        else:
            rows = pos.mean(dim=2)
        if self.bias is not None:
            ones = rows.new_ones((*rows.shape[:-1], 1))
            rows = torch.cat([rows, ones], dim=-1)
        return rows, rows.shape[1]

    def accumulate_input(self, current: torch.Tensor | None, x: torch.Tensor, kfac_approx: str,
                         dtype: torch.dtype, backend: str) -> tuple[torch.Tensor | None, int]:
        """``current + sum of input-row outer products`` (``(groups, D, D)``, ``dtype``) and the
        number of rows added; ``current=None`` starts a sum."""
        rows, count = self.input_rows(x, kfac_approx)
        if count == 0:
            return current, 0
        rows = rows.to(dtype)
        decay = 0.0 if current is None else 1.0
        return symmetric_factor_update(current, rows, decay, 1.0, backend=backend), count

    channel_dim = -1  # where an output (gradient) holds the features

    def accumulate_output(self, current: torch.Tensor | None, grad: torch.Tensor,
                          kfac_approx: str, dtype: torch.dtype, alpha: float,
                          backend: str) -> torch.Tensor:
        """``current + alpha * sum of output-gradient row outer products`` (``(groups, d, d)``)."""
        return gradient_covariance(self.batched_output(grad), channel_dim=self.channel_dim, groups=self.groups,
                                   mode=kfac_approx, factor=current, decay=1.0, alpha=alpha,
                                   out_dtype=dtype, backend=backend)

    def batch_and_positions(self, g: torch.Tensor) -> tuple[int, int]:
        """``(N, R)`` of an output (gradient) tensor."""
        g = self.batched_output(g)
        n, c = g.shape[0], g.shape[self.channel_dim]
        return n, (g.numel() // (n * c) if n * c else 0)


class LinearAdapter(LayerAdapter):
    """``nn.Linear`` on inputs ``(*, d_in)``: the dims between the batch dim and the features are
    the weight-sharing dim ``R`` (their product); a 1-D input is one example."""

    @staticmethod
    def _split(t: torch.Tensor) -> torch.Tensor:
        if t.dim() == 1:
            return t.reshape(1, 1, 1, -1)
        return t.reshape(1, t.shape[0], -1, t.shape[-1])

    def input_positions(self, x: torch.Tensor) -> torch.Tensor:
        return self._split(x)

    def batched_output(self, g: torch.Tensor) -> torch.Tensor:
        return g.unsqueeze(0) if g.dim() == 1 else g


class ConvAdapter(LayerAdapter):
    """``nn.Conv1d`` / ``nn.Conv2d``: A is the patch covariance of the input (patches
    channel-major, then kernel positions, matching ``weight.reshape(C_out, -1)``), one factor pair
    per group. Padding is applied exactly as the module applies it (``"same"``, ``"valid"``,
    every ``padding_mode``).
    """

    def __init__(self, name: str, module: nn.Module):
        super().__init__(name, module)
        self.groups = module.groups
        self.spatial_dims = 1 if isinstance(module, nn.Conv1d) else 2

    def accumulate_input(self, current, x, kfac_approx, dtype, backend):
        """Through :func:`kfac_kernels.ops.patch_covariance`'s kernels: the patches are never
        unfolded (except by the eager backend, whose definition that is)."""
        m = self.module
        if x.dim() == self.spatial_dims + 1:  # unbatched input
            x = x.unsqueeze(0)
        n = x.shape[0]
        if n == 0:
            return current, 0
        chosen = resolve_backend(backend, x.device, "patch_covariance")
        if chosen == "eager" or accumulation_dtype(x.dtype) != dtype:
            x = x.to(dtype)
        geom = conv_geometry(tuple(x.shape[2:]), m.kernel_size, m.stride, m.padding, m.dilation)
        x, geom = pre_pad(x, geom, m.padding_mode)
        cg = x.shape[1] // self.groups
        seg = Segments(self.groups, 0, cg, cg, self.bias is not None)
        reduce = kfac_approx == "reduce"
        decay = 0.0 if current is None else 1.0
        out = patch_gram(as_4d(x), geom, seg, reduce, current, decay, 1.0, chosen)
        return out.to(dtype), (n if reduce else n * geom.positions)

    channel_dim = 1

    def batched_output(self, g: torch.Tensor) -> torch.Tensor:
        return g.unsqueeze(0) if g.dim() == self.spatial_dims + 1 else g


def make_adapter(name: str, module: nn.Module) -> LayerAdapter | None:
    """The adapter for ``module`` or ``None`` if its type is not supported.

    ``nn.MultiheadAttention`` (whose ``out_proj`` is a Linear subclass applied functionally, so
    its own hooks never fire) and ``nn.Embedding`` are adapted in
    :func:`kfac_kernels.curvature.find_adapters` (:mod:`kfac_kernels.transformer_layers`).
    """
    if isinstance(module, nn.Linear) and not isinstance(
            module, nn.modules.linear.NonDynamicallyQuantizableLinear):
        return LinearAdapter(name, module)
    if isinstance(module, (nn.Conv1d, nn.Conv2d)):
        return ConvAdapter(name, module)
    return None
