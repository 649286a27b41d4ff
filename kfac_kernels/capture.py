"""Curvature capture: forward hooks for layer inputs, tensor hooks for output gradients.

The gradient w.r.t. a module's output is read from a hook on the output *tensor*, registered in
the module's forward hook. Such a hook sees the gradient of the tensor as it was when the hook was
registered, so a following ``nn.ReLU(inplace=True)`` (which makes module backward hooks fail) is
handled: the factor receives the gradient w.r.t. the pre-activation output.

Both sides are accumulated as sums by the kernel-backed ops -- :func:`kfac_kernels.ops.patch_covariance`
for convolution inputs (never unfolded), :func:`kfac_kernels.ops.symmetric_factor_update` for linear
inputs and :func:`kfac_kernels.ops.gradient_covariance` for output gradients -- so several forward/backward passes before a step (a module called twice, gradient
accumulation, type-2 and MC backward passes) add up:

* ``A = (sum of input rows' outer products) / (number of rows)`` -- the average input second
  moment of seed 001, Eq. 7 (expand) and Eq. 10 (reduce).
* ``G = multiplier * (sum of output-gradient rows' outer products)``, where the multiplier turns
  gradients of the user's loss ``L = c * sum(per-example losses)`` into the curvature of ``L``:
  ``1/c`` for the empirical Fisher (``loss_average``: ``None`` -> 1, ``"batch"`` -> ``N``,
  ``"batch+sequence"`` -> ``N * R``), and ``1`` (type-2) or ``1/mc_samples`` (MC) when the
  backward vectors are already columns of a factorisation of the Hessian of ``L``.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Callable

import torch

from .layers import LayerAdapter

LOSS_AVERAGES = (None, "batch", "batch+sequence")
KFAC_APPROXES = ("expand", "reduce")


@dataclass
class Accumulator:
    """Unnormalised per-step sums for one layer (stacked over groups)."""

    a_sum: torch.Tensor | None = None
    a_rows: int = 0
    g_sum: torch.Tensor | None = None
    g_passes: int = 0


def default_factor_dtype(param: torch.Tensor) -> torch.dtype:
    """Factors of low-precision layers are kept in fp32; fp32/fp64 layers keep their dtype."""
    return torch.float32 if param.dtype in (torch.float16, torch.bfloat16) else param.dtype


class CurvatureCapture:
    """Hooks that accumulate the Kronecker factors of a set of layers.

    Args:
        adapters: qualified module name -> adapter.
        kfac_approx: ``"expand"`` or ``"reduce"``.
        loss_average: how the user's loss was reduced (see module docstring).
        factor_dtype: dtype of factors, or ``None`` for :func:`default_factor_dtype`.
        backend: kernel backend for the accumulation.
        loss_scale: callable returning the current loss scale of a GradScaler (or ``None``);
            output gradients are divided by it.
        train_only: capture only from modules in training mode (so evaluation forwards run with
            gradients enabled do not leak into an optimizer's factors).
    """

    def __init__(self, adapters: dict[str, LayerAdapter], *, kfac_approx: str = "expand",
                 loss_average: str | None = "batch", factor_dtype: torch.dtype | None = None,
                 backend: str = "auto", loss_scale: Callable[[], float | None] | None = None,
                 train_only: bool = False):
        self.adapters = adapters
        self.kfac_approx = kfac_approx
        self.loss_average = loss_average
        self.factor_dtype = factor_dtype
        self.backend = backend
        self.loss_scale = loss_scale
        self.train_only = train_only
        self.capture_inputs = True
        self.capture_grads = True
        # When set, every captured output gradient is weighted by this instead of 1/c.
        self.grad_multiplier: float | None = None
        # Micro-batches per optimizer step whose losses the user averaged (gradient
        # accumulation): the loss is the mean over all of them, so 1/c grows by this factor.
        self.accumulation_steps = 1
        self.acc: dict[str, Accumulator] = {name: Accumulator() for name in adapters}
        self._handles: list = []

    # --- hook management ----------------------------------------------------------------------
    def attach(self) -> "CurvatureCapture":
        for name, adapter in self.adapters.items():
            self._handles.append(
                adapter.module.register_forward_hook(partial(self._forward_hook, name)))
        return self

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def __enter__(self) -> "CurvatureCapture":
        return self.attach()

    def __exit__(self, *exc) -> None:
        self.detach()

    def reset(self) -> None:
        self.acc = {name: Accumulator() for name in self.adapters}

    # --- hooks --------------------------------------------------------------------------------
    def dtype_of(self, name: str) -> torch.dtype:
        return self.factor_dtype or default_factor_dtype(self.adapters[name].weight)

    def _forward_hook(self, name: str, module, args, output) -> None:
        if not torch.is_grad_enabled() or not self.adapters[name].trainable:
            return
        if self.train_only and not module.training:
            return
        if not (self.capture_inputs or self.capture_grads):
            return
        adapter = self.adapters[name]
        if self.capture_inputs:
            acc = self.acc[name]
            acc.a_sum, count = adapter.accumulate_input(acc.a_sum, args[0].detach(),
                                                        self.kfac_approx, self.dtype_of(name),
                                                        self.backend)
            acc.a_rows += count
        if isinstance(output, torch.Tensor) and output.requires_grad:
            output.register_hook(partial(self._grad_hook, name))

    def _grad_hook(self, name: str, grad: torch.Tensor) -> None:
        if not self.capture_grads:
            return
        adapter = self.adapters[name]
        n, r = adapter.batch_and_positions(grad)
        if n * r == 0:
            return
        multiplier = self.multiplier(n, r)
        acc = self.acc[name]
        acc.g_sum = adapter.accumulate_output(acc.g_sum, grad.detach(), self.kfac_approx,
                                              self.dtype_of(name), multiplier, self.backend)
        acc.g_passes += 1

    def multiplier(self, n: int, r: int) -> float:
        """Weight of ``g g^T`` for an output gradient of ``n`` examples and ``r`` positions."""
        if self.grad_multiplier is not None:
            multiplier = self.grad_multiplier
        elif self.loss_average is None:
            multiplier = 1.0
        elif self.loss_average == "batch":
            multiplier = float(n * self.accumulation_steps)
        else:
            multiplier = float(n * r * self.accumulation_steps)
        scale = self.loss_scale() if self.loss_scale is not None else None
        if scale:
            multiplier /= float(scale) ** 2
        return multiplier

    # --- results ------------------------------------------------------------------------------
    def factors(self, name: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(A, G)`` stacked over groups, or ``None`` if either side saw no data."""
        acc = self.acc[name]
        if acc.a_sum is None or acc.g_sum is None or acc.a_rows == 0:
            return None
        return acc.a_sum / acc.a_rows, acc.g_sum
