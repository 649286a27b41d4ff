"""Kronecker factors of a model's curvature, usable on their own (e.g. Laplace approximations)."""
from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from . import _arguments as args
from ._backend import BACKENDS
from .blocks import KroneckerBlock
from .capture import KFAC_APPROXES, LOSS_AVERAGES, Capture, default_factor_dtype
from .layers import SUPPORTED_NAMES, find_adapters, validate_skip_modules
from .losses import (check_loss_fn, inverse_coefficient, loss_coefficient, mc_grad_output,
                     type2_grad_outputs)

FISHER_TYPES = ("empirical", "mc", "type-2")


def curvature_backward(capture: Capture, loss_fn, outputs: torch.Tensor,
                       targets: torch.Tensor, fisher_type: str, mc_samples: int,
                       generator: torch.Generator | None, params: list[torch.Tensor]) -> None:
    """Run the backward passes that feed the output-gradient factors (graph is retained).

    ``params`` are the leaves to differentiate (the layers' weights): using
    ``torch.autograd.grad`` leaves every ``.grad`` untouched.
    """
    def backprop(grad_outputs):
        torch.autograd.grad(outputs, params, grad_outputs=grad_outputs, retain_graph=True,
                            allow_unused=True)

    previous = (capture.inputs_on, capture.grads_on, capture.grad_multiplier, capture.loss_scale)
    # These vectors are not multiplied by a GradScaler's scale, so none is divided out.
    capture.inputs_on, capture.grads_on, capture.loss_scale = False, True, None
    try:
        if fisher_type == "empirical":
            loss = loss_fn(outputs, targets)
            c = loss_coefficient(loss_fn, outputs, targets)
            capture.grad_multiplier = inverse_coefficient(c)
            torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
        elif fisher_type == "type-2":
            capture.grad_multiplier = 1.0
            for column in type2_grad_outputs(loss_fn, outputs, targets):
                backprop(column)
        else:
            capture.grad_multiplier = 1.0 / mc_samples
            for _ in range(mc_samples):
                backprop(mc_grad_output(loss_fn, outputs, targets, generator))
    finally:
        capture.inputs_on, capture.grads_on, capture.grad_multiplier, capture.loss_scale = previous


def check_common(who: str, kfac_approx, fisher_type, loss_average, mc_samples, backend,
                 generator) -> None:
    """Argument checks shared by :func:`kronecker_factors` and the optimizers."""
    args.choice(who, "kfac_approx", kfac_approx, KFAC_APPROXES)
    args.choice(who, "fisher_type", fisher_type, FISHER_TYPES)
    if loss_average not in LOSS_AVERAGES:
        raise ValueError(f"{who}: loss_average must be None, 'batch' or 'batch+sequence', got "
                         f"{loss_average!r}")
    args.positive_int(who, "mc_samples", mc_samples)
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"{who}: backend must be one of {BACKENDS}, got {backend!r}")
    args.instance(who, "generator", generator, torch.Generator, "a torch.Generator")


def kronecker_factors(model: nn.Module, loss_fn: nn.Module, inputs, targets: torch.Tensor, *,
                      kfac_approx: str = "expand", fisher_type: str = "empirical",
                      loss_average: str | None = "batch", mc_samples: int = 1,
                      backend: str = "auto", generator: torch.Generator | None = None,
                      skip_modules: Iterable = ()) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """K-FAC factors ``(A, G)`` of every supported layer for one batch.

    Returns a dict from each supported module's qualified name (as in ``model.named_modules()``)
    to ``(A, G)`` such that ``kron(G, A)`` approximates the GGN/Fisher block of the loss
    ``loss_fn(model(inputs), targets)`` *as computed* (its reduction included) for the row-major
    flattening of ``[W | b]``: ``W`` reshaped to ``(d_out, -1)``, the bias as the last column (so
    the bias coordinate is last in ``A``). A convolution with ``groups > 1`` gives stacked
    ``(groups, D_g, D_g)`` and ``(groups, d_out_g, d_out_g)`` factors, one pair per group.

    Args:
        model: the network; ``nn.Linear`` (any input rank) and ``nn.Conv1d``/``nn.Conv2d``
            layers with trainable weights are covered, other parameterised modules are reported
            in a warning.
        loss_fn: ``nn.CrossEntropyLoss``, ``nn.MSELoss`` or ``nn.BCEWithLogitsLoss`` with
            reduction ``"mean"``/``"sum"``.
        inputs: passed to ``model`` (a tuple is unpacked).
        targets: passed to ``loss_fn``.
        kfac_approx: ``"expand"`` (Eschenhagen et al. (2023), Eq. 7) or ``"reduce"`` (Eq. 10).
        fisher_type: ``"empirical"`` (gradients of the loss), ``"mc"`` (``mc_samples`` labels
            sampled from the model) or ``"type-2"`` (exact: Hessian factor columns).
        loss_average: how the loss was reduced; must agree with ``loss_fn.reduction`` (``None``
            for ``"sum"``, ``"batch"``/``"batch+sequence"`` for ``"mean"``).
        backend: kernel backend of the factor accumulation.
        generator: random generator for ``"mc"``.
        skip_modules: module names (fnmatch patterns) or types to leave out.

    The model is run in its current mode (train/eval); no ``.grad`` is modified.
    """
    who = "kronecker_factors"
    if not isinstance(model, nn.Module):
        raise TypeError(f"{who}: model must be a torch.nn.Module, got {type(model).__name__}")
    check_common(who, kfac_approx, fisher_type, loss_average, mc_samples, backend, generator)
    check_loss_fn(loss_fn, loss_average, who)
    skip_modules = validate_skip_modules(model, skip_modules, who)
    adapters = find_adapters(model, skip_modules, who, kfac_approx=kfac_approx)
    if not adapters:
        raise ValueError(f"{who}: the model has no supported layers ({SUPPORTED_NAMES}) with "
                         "trainable weights")
    capture = Capture(adapters, loss_average=loss_average, train_only=False)
    blocks = {name: KroneckerBlock(name, a, approx=kfac_approx,
                                   dtype=default_factor_dtype(a.weight), backend=backend)
              for name, a in adapters.items()}
    for name, block in blocks.items():
        capture.subscribe(name, block)
    params = [p for a in adapters.values() for p in a.params()]
    with capture, torch.enable_grad():
        capture.grads_on = False
        outputs = model(*inputs) if isinstance(inputs, tuple) else model(inputs)
        if not isinstance(outputs, torch.Tensor):
            raise TypeError(f"{who}: the model must return a tensor, got "
                            f"{type(outputs).__name__}")
        if not outputs.requires_grad:
            raise ValueError(f"{who}: the model output does not require grad; are the "
                             "parameters frozen or is the forward run under torch.no_grad()?")
        curvature_backward(capture, loss_fn, outputs, targets, fisher_type, mc_samples,
                           generator, params)
    result = {}
    for name, block in blocks.items():
        if block.pending is None or not block.pending.complete:
            continue  # the module did not take part in this forward/backward
        block.fold_pending(0.0)
        pair = tuple(value if layout.kind != "diagonal" else torch.diag_embed(value)
                     for value, layout in zip(block.factors(), (block.a_layout, block.g_layout)))
        for side, factor in zip("AG", pair):
            if not torch.isfinite(factor).all():
                raise ValueError(
                    f"{who}: the {side} factor of module {name!r} is not finite: the layer's "
                    f"{'inputs' if side == 'A' else 'output gradients'} contain NaN or inf")
        if adapters[name].groups == 1:
            pair = (pair[0][0], pair[1][0])
        result[name] = pair
    return result
