r"""``nn.LayerNorm`` / ``nn.BatchNorm1d`` / ``nn.BatchNorm2d`` with affine parameters
(Yu & Tatebe, Sec. 4.3).

The affine parameters ``[gamma_c, beta_c]`` of channel ``c`` act like a linear layer on the input
``[a_hat_c, 1]`` (``a_hat`` the normalised activation), shared by every channel, so ``A`` is the
``2 x 2`` second moment of ``[a_hat, 1]`` over all elements (never partitioned), and ``G`` is the
second moment of the per-example output gradients summed over every axis but the batch and the
parameters' axes (whatever ``kfac_approx`` says). The gradient matrix is
``[d gamma | d beta]``, ``(1, C, 2)``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..ops.patch_covariance import accumulation_dtype
from .base import LayerAdapter, gram_of_rows, with_ones, write_scaled

NORM_TYPES = (nn.LayerNorm, nn.BatchNorm1d, nn.BatchNorm2d)


class NormAdapter(LayerAdapter):
    """``nn.LayerNorm`` (parameters over the trailing ``normalized_shape``) and
    ``nn.BatchNorm1d/2d`` (parameters over channel dim 1), with affine parameters."""

    partitionable_inputs = False  # A is one 2 x 2 block

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

    def grad_matrix(self) -> torch.Tensor | None:
        w = self.weight
        if w.grad is None:
            return None
        cols = [w.grad.reshape(-1)]
        b = self.bias
        if b is not None:
            cols.append(b.grad.reshape(-1) if b.grad is not None
                        else torch.zeros_like(w.grad).reshape(-1))
        return torch.stack(cols, dim=1).unsqueeze(0)

    def set_grad_matrix(self, mat: torch.Tensor, scale: torch.Tensor | None = None) -> None:
        w, b = self.weight, self.bias
        write_scaled(w.grad, mat[0, :, 0].reshape(w.shape), scale)
        if b is not None:
            if b.grad is None:
                b.grad = torch.empty_like(b)
            write_scaled(b.grad, mat[0, :, 1].reshape(b.shape), scale)

    def normalized(self, x: torch.Tensor) -> torch.Tensor:
        """``a_hat`` exactly as the module normalises in training mode (batch statistics)."""
        m = self.module
        if self.is_layer_norm:
            return F.layer_norm(x, m.normalized_shape, None, None, m.eps)
        return F.batch_norm(x, None, None, None, None, True, 0.0, m.eps)

    def input_gram(self, x, approx, layout, dtype, backend, current=None, decay=1.0, alpha=1.0,
                   context=None):
        if x.numel() == 0:
            return current, 0
        a = self.normalized(x.to(accumulation_dtype(x.dtype))).to(dtype)
        s1, s2, count = a.sum(), (a * a).sum(), a.numel()
        if self.bias is not None:
            full = torch.stack([torch.stack([s2, s1]), torch.stack([s1, s1.new_tensor(count)])])
        else:
            full = s2.reshape(1, 1)
        full = (full * alpha).unsqueeze(0)
        if layout.kind == "diagonal":
            full = torch.diagonal(full, dim1=-2, dim2=-1)
        new = [full] if layout.kind == "blocks" else full
        if current is not None:
            new = ([n + decay * c for n, c in zip(new, current)] if layout.kind == "blocks"
                   else new + decay * current)
        return new, count

    def _per_example_sums(self, grad: torch.Tensor) -> torch.Tensor:
        """``(1, N, C)``: output gradients summed over every axis but the batch and the
        parameters' axes."""
        n = grad.shape[0]
        if self.is_layer_norm:
            sums = grad.reshape(n, -1, self.channels).sum(dim=1)
        else:
            sums = grad.reshape(n, self.channels, -1).sum(dim=2)
        return sums.unsqueeze(0)

    def output_rows(self, grad, approx, context=None, groups=None):
        return self._per_example_sums(grad)

    def batch_and_positions(self, grad, context=None):
        n = grad.shape[0]
        return n, (grad.numel() // (n * self.channels) if n * self.channels else 0)

    def batched_output(self, g: torch.Tensor) -> torch.Tensor:
        return g

    def example_inputs(self, x, dtype):
        """``(1, N, D)``: each example's mean normalised activation (and the bias coordinate)."""
        a = self.normalized(x.to(dtype))
        rows = a.reshape(a.shape[0], -1).mean(dim=1, keepdim=True)[None]
        if self.bias is not None:
            rows = with_ones(rows)
        return rows


__all__ = ["NORM_TYPES", "NormAdapter", "gram_of_rows"]
