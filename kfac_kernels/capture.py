"""The curvature capture: one set of hooks per model that feeds every curvature method.

Adapters (:mod:`kfac_kernels.layers`) own the hooks of their modules and hand what they see to
:meth:`Capture.record`: a layer's input on the forward pass, and the output tensors whose
gradients the backward pass will produce. The capture decides whether to capture (training
mode, gradients enabled, a factor-update step) and passes each input and each output gradient
on to the *consumers* subscribed to that layer -- the curvature blocks of K-FAC, BD-KFAC and
SINGD, the coarse statistics of two-level K-FAC -- with the weight of the output gradient:

* ``G`` terms are weighted by ``m``, which turns gradients of the user's loss
  ``L = c * sum(per-example losses)`` into the curvature of ``L``: ``1/c`` for the empirical
  Fisher (``loss_average``: ``None`` -> 1, ``"batch"`` -> ``N``, ``"batch+sequence"`` -> ``N R``,
  times the micro-batches of gradient accumulation), ``1`` (type-2) or ``1/mc_samples`` (MC)
  when the backward vectors are columns of a factorisation of the Hessian of ``L`` already;
  divided by the square of a GradScaler's scale, and by the number of processes when the
  statistics are summed across them (``G`` is the ranks' average, see
  :mod:`kfac_kernels.distributed`).

The output-gradient hook is registered on the output *tensor* in the forward hook, so it sees
the gradient w.r.t. the output as it was then: a following ``nn.ReLU(inplace=True)`` (which makes
module backward hooks fail) is handled, the factor receiving the gradient w.r.t. the
pre-activation output.

A consumer implements ``add_forward(adapter, x, context, index)`` and
``add_backward(adapter, grad, context, index, multiplier, group)``; ``index`` counts the forward
calls of the layer since :meth:`Capture.new_step` (it pairs an input with its gradients),
``context`` is what the adapter recorded at forward time (e.g. the graph of each row), ``group``
names the group of a grouped output (the query/key/value projections of attention).
"""
from __future__ import annotations

import warnings
import weakref
from functools import partial
from typing import Callable

import torch

LOSS_AVERAGES = (None, "batch", "batch+sequence")
KFAC_APPROXES = ("expand", "reduce")


# The optimizers capturing each module (weakly: a dropped optimizer leaves no trace here).
_CAPTURED_BY: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def weak_method(method: Callable) -> Callable:
    """A callable that calls the bound ``method`` while its object lives (else returns None):
    what hooks hold instead of the optimizer itself."""
    ref = weakref.WeakMethod(method)

    def call(*args, **kwargs):
        bound = ref()
        return None if bound is None else bound(*args, **kwargs)
    return call


def default_factor_dtype(param: torch.Tensor) -> torch.dtype:
    """Factors of low-precision layers are kept in fp32; fp32/fp64 layers keep their dtype."""
    return torch.float32 if param.dtype in (torch.float16, torch.bfloat16) else param.dtype


class Capture:
    """Hooks of a set of adapters (name -> adapter) and the consumers they feed.

    Args:
        adapters: qualified module name -> adapter.
        loss_average: how the user's loss was reduced (see the module docstring).
        loss_scale: callable returning the current loss scale of a GradScaler (a float, a 0-d
            tensor on the device, or ``None``).
        train_only: capture only from modules in training mode (evaluation forwards run with
            gradients enabled do not leak into an optimizer's statistics).
    """

    def __init__(self, adapters: dict, *, loss_average: str | None = "batch",
                 loss_scale: Callable[[], float | torch.Tensor | None] | None = None,
                 train_only: bool = True):
        self.adapters = adapters
        self.loss_average = loss_average
        self.loss_scale = loss_scale
        self.train_only = train_only
        self.inputs_on = True
        self.grads_on = True
        # When set, every output gradient is weighted by this instead of 1/c (MC / type-2
        # passes, or a loss whose coefficient is known).
        self.grad_multiplier: float | None = None
        # Micro-batches per step whose losses the user averaged (gradient accumulation).
        self.accumulation_steps = 1
        # Processes whose statistics are summed: G-side terms are divided by it (averaged).
        self.world_size = 1
        self.consumers: dict[str, list] = {name: [] for name in adapters}
        self._calls: dict[str, int] = {}
        self._handles: list = []

    # --- wiring -------------------------------------------------------------------------------
    def subscribe(self, name: str, consumer) -> None:
        """Feed layer ``name``'s inputs and output gradients to ``consumer`` as well."""
        self.consumers[name].append(consumer)

    def attach(self) -> "Capture":
        seen = set()
        for adapter in self.adapters.values():
            for handle in adapter.attach(self):
                if id(handle) not in seen:
                    seen.add(id(handle))
                    self._handles.append(handle)
        return self

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    @property
    def attached(self) -> bool:
        return bool(self._handles)

    def claim(self, owner, who: str) -> None:
        """Record ``owner`` (an optimizer) as capturing this capture's modules, warn once if
        another live optimizer already captures some of them (both would precondition the same
        gradients), and detach the hooks when ``owner`` is garbage collected (the hooks hold
        the capture, never the optimizer, so dropping the optimizer ends the capture)."""
        others = {}
        for name, adapter in self.adapters.items():
            for other in _CAPTURED_BY.get(adapter.module, ()):
                if other is not owner and getattr(other, "capture", None) is not None \
                        and other.capture.attached:
                    others.setdefault(type(other).__name__, []).append(name)
            _CAPTURED_BY.setdefault(adapter.module, weakref.WeakSet()).add(owner)
        if others:
            kind, names = next(iter(others.items()))
            warnings.warn(
                f"{who}: modules {names} are already captured by a {kind} created earlier on "
                f"this model; both will update from and precondition the same gradients. Call "
                f"remove_hooks() on the earlier one (or drop it) first", UserWarning, stacklevel=4)
        weakref.finalize(owner, self.detach)

    def __enter__(self) -> "Capture":
        return self.attach()

    def __exit__(self, *exc) -> None:
        self.detach()

    def new_step(self) -> None:
        """Forget the per-step call counts (each consumer clears its own pending sums)."""
        self._calls = {}

    # --- events from the adapters' hooks --------------------------------------------------------
    def active(self, adapter, module) -> bool:
        if not torch.is_grad_enabled() or not adapter.trainable:
            return False
        if self.train_only and not module.training:
            return False
        return self.inputs_on or self.grads_on

    def record(self, adapter, module, x, outputs, context=None) -> None:
        """A forward call of ``adapter``'s layer: its input ``x`` (detached here) and its
        output tensor(s) -- a tensor, or ``(group, tensor)`` pairs for grouped outputs."""
        if not self.active(adapter, module):
            return
        name = adapter.name
        index = self._calls.get(name, 0)
        self._calls[name] = index + 1
        if self.inputs_on:
            x = x.detach() if isinstance(x, torch.Tensor) else tuple(t.detach() for t in x)
            for consumer in self.consumers[name]:
                consumer.add_forward(adapter, x, context, index)
        if isinstance(outputs, torch.Tensor):
            outputs = [(None, outputs)]
        for group, out in outputs:
            if isinstance(out, torch.Tensor) and out.requires_grad:
                out.register_hook(partial(self._grad_hook, adapter, context, index, group))

    def _grad_hook(self, adapter, context, index, group, grad: torch.Tensor) -> None:
        if not self.grads_on:
            return
        n, r = adapter.batch_and_positions(grad, context)
        if n * r == 0:
            return
        multiplier = self.multiplier(n, r)
        grad = grad.detach()
        # Weights known on the device only -- a count of targets (``grad_multiplier``), a
        # GradScaler's scale -- are applied to the gradient (g -> sqrt(m) g, g / scale) rather
        # than read on the host, which would wait for a GPU in the middle of the backward pass.
        # Low-precision gradients are unscaled in float32 (in fp16 they would underflow).
        scale = self.loss_scale() if self.loss_scale is not None else None
        device_weight = isinstance(multiplier, torch.Tensor) or isinstance(scale, torch.Tensor)
        if device_weight and grad.dtype in (torch.float16, torch.bfloat16):
            grad = grad.float()
        if isinstance(multiplier, torch.Tensor):
            grad = grad * multiplier.sqrt().to(grad.device, grad.dtype)
            multiplier = 1.0
        if isinstance(scale, torch.Tensor):
            grad = grad * scale.reciprocal().to(grad.device, grad.dtype)
        elif scale:
            multiplier /= float(scale) ** 2
        for consumer in self.consumers[adapter.name]:
            consumer.add_backward(adapter, grad, context, index, multiplier, group)

    def multiplier(self, n: int, r: int) -> float | torch.Tensor:
        """Weight of ``g g^T`` for an output gradient of ``n`` examples and ``r`` positions (a
        0-d tensor where :attr:`grad_multiplier` is one), before the loss scale."""
        if self.grad_multiplier is not None:
            multiplier = self.grad_multiplier
        elif self.loss_average is None:
            multiplier = 1.0
        elif self.loss_average == "batch":
            multiplier = float(n * self.accumulation_steps)
        else:
            multiplier = float(n * r * self.accumulation_steps)
        return multiplier / self.world_size


def grad_scaler_scale(scaler) -> torch.Tensor | float | None:
    """The current scale of an enabled ``torch.amp.GradScaler`` as a 0-d tensor on its device
    (no host read); a float before its first ``scale()`` made one; ``None`` without one."""
    if scaler is None or not scaler.is_enabled():
        return None
    tensor = getattr(scaler, "_scale", None)
    return tensor if isinstance(tensor, torch.Tensor) else scaler.get_scale()


class DetachesHooksOnExit:
    """``with optimizer:``: the optimizer's hooks are detached from the model at the end of the
    block (its ``remove_hooks()``), for every optimizer and preconditioner of the package."""

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.remove_hooks()
