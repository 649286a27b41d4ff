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
import torch.nn.functional as F
from torch import nn

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
        return self.module.weight.requires_grad

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

    def output_positions(self, g: torch.Tensor) -> torch.Tensor:
        """Output gradient as ``(groups, N, R, d_out_g)``."""
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

    def output_rows(self, g: torch.Tensor, kfac_approx: str) -> torch.Tensor:
        pos = self.output_positions(g)
        groups, n, r, d = pos.shape
        if kfac_approx == "expand":
            return pos.reshape(groups, n * r, d)
        return pos.sum(dim=2)

    def batch_and_positions(self, g: torch.Tensor) -> tuple[int, int]:
        """``(N, R)`` of an output (gradient) tensor."""
        pos_shape = self.output_positions(g).shape
        return pos_shape[1], pos_shape[2]


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

    def output_positions(self, g: torch.Tensor) -> torch.Tensor:
        return self._split(g)


class ConvAdapter(LayerAdapter):
    """``nn.Conv1d`` / ``nn.Conv2d``: rows are im2col patches (channel-major, then kernel
    positions, matching ``weight.reshape(C_out, -1)``), one factor pair per group. Padding is
    applied exactly as the module applies it (``"same"``, ``"valid"``, every ``padding_mode``).
    """

    def __init__(self, name: str, module: nn.Module):
        super().__init__(name, module)
        self.groups = module.groups
        self.spatial_dims = 1 if isinstance(module, nn.Conv1d) else 2

    def _pad(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...]]:
        """Pad ``x`` as the module does; returns the padded input and the padding left for
        unfold (zero when padding was applied here)."""
        m = self.module
        if m.padding_mode != "zeros" or isinstance(m.padding, str):
            mode = "constant" if m.padding_mode == "zeros" else m.padding_mode
            # _reversed_padding_repeated_twice is what nn.ConvNd itself passes to F.pad; for
            # "same" it holds the asymmetric split PyTorch uses (left = total // 2).
            x = F.pad(x, m._reversed_padding_repeated_twice, mode=mode)
            return x, (0,) * self.spatial_dims
        return x, tuple(m.padding)

    def input_positions(self, x: torch.Tensor) -> torch.Tensor:
        m = self.module
        if x.dim() == self.spatial_dims + 1:  # unbatched input
            x = x.unsqueeze(0)
        x, padding = self._pad(x)
        if self.spatial_dims == 1:
            x = x.unsqueeze(2)
            kernel, stride, dilation = (1, *m.kernel_size), (1, *m.stride), (1, *m.dilation)
            padding = (0, *padding)
        else:
            kernel, stride, dilation = m.kernel_size, m.stride, m.dilation
        patches = F.unfold(x, kernel, dilation=dilation, padding=padding, stride=stride)
        n, _, r = patches.shape
        patches = patches.reshape(n, self.groups, -1, r)
        return patches.permute(1, 0, 3, 2)

    def output_positions(self, g: torch.Tensor) -> torch.Tensor:
        if g.dim() == self.spatial_dims + 1:
            g = g.unsqueeze(0)
        n, c = g.shape[:2]
        g = g.reshape(n, self.groups, c // self.groups, -1)
        return g.permute(1, 0, 3, 2)


def make_adapter(name: str, module: nn.Module) -> LayerAdapter | None:
    """The adapter for ``module`` or ``None`` if its type is not supported."""
    # nn.MultiheadAttention's out_proj is a Linear subclass applied functionally: its hooks never
    # fire, so it is not adapted here (it is reported as unsupported instead).
    if isinstance(module, nn.Linear) and not isinstance(
            module, nn.modules.linear.NonDynamicallyQuantizableLinear):
        return LinearAdapter(name, module)
    if isinstance(module, (nn.Conv1d, nn.Conv2d)):
        return ConvAdapter(name, module)
    return None
