"""Kronecker factors of a model's curvature, usable on their own (e.g. Laplace approximations)."""
from __future__ import annotations

import fnmatch
import warnings
from typing import Iterable

import torch
from torch import nn

from ._backend import BACKENDS
from .capture import KFAC_APPROXES, LOSS_AVERAGES, CurvatureCapture
from .layers import LayerAdapter, make_adapter
from .losses import check_loss_fn, loss_coefficient, mc_grad_output, type2_grad_outputs

FISHER_TYPES = ("empirical", "mc", "type-2")


def _skipped(name: str, module: nn.Module, skip_modules) -> bool:
    for entry in skip_modules:
        if isinstance(entry, str) and fnmatch.fnmatchcase(name, entry):
            return True
        if isinstance(entry, type) and isinstance(module, entry):
            return True
    return False


def validate_skip_modules(model: nn.Module, skip_modules, who: str) -> tuple:
    if isinstance(skip_modules, (str, type)):
        skip_modules = (skip_modules,)
    try:
        skip_modules = tuple(skip_modules)
    except TypeError:
        raise TypeError(f"{who}: skip_modules must be an iterable of module names (str, "
                        f"fnmatch patterns allowed) or nn.Module types, got "
                        f"{type(skip_modules).__name__}") from None
    names = [name for name, _ in model.named_modules()]
    for entry in skip_modules:
        if isinstance(entry, type) and issubclass(entry, nn.Module):
            continue
        if not isinstance(entry, str):
            raise TypeError(f"{who}: skip_modules entries must be module names (str) or "
                            f"nn.Module types, got {entry!r}")
        if not any(fnmatch.fnmatchcase(n, entry) for n in names):
            raise ValueError(f"{who}: skip_modules names {entry!r}, which matches no module of "
                             "the model")
    return skip_modules


def _transformer_adapters(name: str, module: nn.Module, skip_modules, who: str):
    """Adapters of an ``nn.Embedding`` or ``nn.MultiheadAttention`` (``None`` for other
    types): a list of ``(name, adapter)``."""
    from .transformer_layers import (AttentionInProjAdapter, AttentionOutProjAdapter,
                                     EmbeddingAdapter, unsupported_attention_reason)
    if isinstance(module, nn.Embedding):
        if module.sparse:
            raise ValueError(f"{who}: module {name!r} is an nn.Embedding with sparse=True; "
                             "its sparse gradients cannot be preconditioned: use sparse=False "
                             f"or skip_modules=[{name!r}]")
        return [(name, EmbeddingAdapter(name, module))]
    if isinstance(module, nn.MultiheadAttention):
        reason = unsupported_attention_reason(module)
        if reason is not None:
            raise ValueError(
                f"{who}: module {name!r} (nn.MultiheadAttention) is not supported: {reason}. "
                f"Pass skip_modules=[{name!r}, {name + '.out_proj'!r}] or build the attention "
                "from nn.Linear projections")
        out = [(name, AttentionInProjAdapter(name, module))]
        out_name = f"{name}.out_proj" if name else "out_proj"
        if not _skipped(out_name, module.out_proj, skip_modules):
            out.append((out_name, AttentionOutProjAdapter(out_name, module.out_proj, module)))
        return out
    return None


def _tie(adapters: dict, kfac_approx: str | None, who: str) -> dict:
    """Replace an ``nn.Embedding`` and an ``nn.Linear`` that share their weight Parameter by
    one :class:`~kfac_kernels.transformer_layers.TiedEmbeddingAdapter` (named after the
    Linear); any other sharing of a weight between adapted layers is refused."""
    from .transformer_layers import EmbeddingAdapter, TiedEmbeddingAdapter
    from .layers import LinearAdapter
    owners: dict[int, list[str]] = {}
    for name, adapter in adapters.items():
        owners.setdefault(id(adapter.weight), []).append(name)
    for names in owners.values():
        if len(names) == 1:
            continue
        kinds = {type(adapters[n]) for n in names}
        if len(names) != 2 or kinds != {EmbeddingAdapter, LinearAdapter}:
            raise ValueError(f"{who}: modules {names} share one weight Parameter; only an "
                             "nn.Embedding tied to an output nn.Linear is supported: pass "
                             "skip_modules=[...] for the others")
        emb_name = next(n for n in names if isinstance(adapters[n], EmbeddingAdapter))
        head_name = next(n for n in names if n != emb_name)
        if kfac_approx == "reduce":
            raise ValueError(f"{who}: the weight tied between {emb_name!r} and {head_name!r} "
                             "needs kfac_approx='expand' (seed 003 App. A.1 defines it for "
                             "sequence outputs)")
        emb, head = adapters.pop(emb_name), adapters.pop(head_name)
        adapters[head_name] = TiedEmbeddingAdapter(head_name, emb.module, head_name,
                                                   head.module)
    return adapters


def find_adapters(model: nn.Module, skip_modules: Iterable = (), who: str = "kfac_kernels",
                  warn: bool = True, kfac_approx: str | None = None) -> dict[str, LayerAdapter]:
    """Adapters for every supported module with a trainable weight, by qualified name.

    Modules that own trainable parameters but have no adapter are listed in one warning (their
    gradients are left as they are); ``skip_modules`` silences it for the modules it names.
    An ``nn.MultiheadAttention`` named ``name`` gives the adapters ``name`` (its packed
    ``in_proj``) and ``name.out_proj``; an ``nn.Embedding`` whose weight is the weight of an
    ``nn.Linear`` gives one tied adapter named after the Linear.
    """
    adapters: dict[str, LayerAdapter] = {}
    unsupported = []
    handled: set[int] = set()
    for name, module in model.named_modules():
        if _skipped(name, module, skip_modules) or id(module) in handled:
            continue
        found = _transformer_adapters(name, module, skip_modules, who)
        if found is None:
            adapter = make_adapter(name, module)
            found = [(name, adapter)] if adapter is not None else None
        if found is not None:
            for key, adapter in found:
                handled.add(id(adapter.module))
                if adapter.trainable:
                    adapters[key] = adapter
            if isinstance(module, nn.MultiheadAttention):
                handled.add(id(module.out_proj))
                extra = [n for n in ("bias_k", "bias_v") if getattr(module, n) is not None
                         and getattr(module, n).requires_grad]
                if extra:
                    unsupported.append(f"{name}.{'/'.join(extra)} (nn.MultiheadAttention)")
            continue
        own = [p for p in module.parameters(recurse=False) if p.requires_grad]
        if own:
            unsupported.append(f"{name or '<root>'} ({type(module).__name__})")
    if unsupported and warn:
        warnings.warn(
            f"{who}: no Kronecker-factored curvature for modules "
            f"{', '.join(unsupported)}; their gradients are used unchanged. Pass "
            "skip_modules=[...] with their names or types to silence this warning.",
            stacklevel=3)
    return _tie(adapters, kfac_approx, who)


def curvature_backward(capture: CurvatureCapture, loss_fn, outputs: torch.Tensor,
                       targets: torch.Tensor, fisher_type: str, mc_samples: int,
                       generator: torch.Generator | None, params: list[torch.Tensor]) -> None:
    """Run the backward passes that feed the output-gradient factors (graph is retained).

    ``params`` are the leaves to differentiate (the layers' weights): using
    ``torch.autograd.grad`` leaves every ``.grad`` untouched.
    """
    def backprop(grad_outputs):
        torch.autograd.grad(outputs, params, grad_outputs=grad_outputs, retain_graph=True,
                            allow_unused=True)

    previous = (capture.capture_inputs, capture.capture_grads, capture.grad_multiplier,
                capture.loss_scale)
    # These vectors are not multiplied by a GradScaler's scale, so none is divided out.
    capture.capture_inputs, capture.capture_grads, capture.loss_scale = False, True, None
    try:
        if fisher_type == "empirical":
            loss = loss_fn(outputs, targets)
            c = loss_coefficient(loss_fn, outputs, targets)
            capture.grad_multiplier = 1.0 / c if c > 0 else 0.0
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
        (capture.capture_inputs, capture.capture_grads, capture.grad_multiplier,
         capture.loss_scale) = previous


def check_common(who: str, kfac_approx, fisher_type, loss_average, mc_samples, backend,
                 generator) -> None:
    """Argument checks shared by :func:`kronecker_factors` and the optimizers."""
    if kfac_approx not in KFAC_APPROXES:
        raise ValueError(f"{who}: kfac_approx must be 'expand' or 'reduce', got {kfac_approx!r}")
    if fisher_type not in FISHER_TYPES:
        raise ValueError(f"{who}: fisher_type must be one of {FISHER_TYPES}, got {fisher_type!r}")
    if loss_average not in LOSS_AVERAGES:
        raise ValueError(f"{who}: loss_average must be None, 'batch' or 'batch+sequence', got "
                         f"{loss_average!r}")
    if isinstance(mc_samples, bool) or not isinstance(mc_samples, int) or mc_samples < 1:
        raise ValueError(f"{who}: mc_samples must be an int >= 1, got {mc_samples!r}")
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"{who}: backend must be one of {BACKENDS}, got {backend!r}")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"{who}: generator must be a torch.Generator or None, got "
                        f"{type(generator).__name__}")


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
        kfac_approx: ``"expand"`` (seed 001, Eq. 7) or ``"reduce"`` (Eq. 10).
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
        raise ValueError(f"{who}: the model has no supported layers (nn.Linear, nn.Conv1d, "
                         "nn.Conv2d, nn.Embedding, nn.MultiheadAttention) with trainable "
                         "weights")
    capture = CurvatureCapture(adapters, kfac_approx=kfac_approx, loss_average=loss_average,
                               backend=backend)
    params = [p for a in adapters.values() for p in a.params()]
    with capture, torch.enable_grad():
        capture.capture_grads = False
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
    for name, adapter in adapters.items():
        pair = capture.factors(name)
        if pair is None:  # the module did not take part in this forward/backward
            continue
        for side, factor in zip("AG", pair):
            if not torch.isfinite(factor).all():
                raise ValueError(
                    f"{who}: the {side} factor of module {name!r} is not finite: the layer's "
                    f"{'inputs' if side == 'A' else 'output gradients'} contain NaN or inf")
        if adapter.groups == 1:
            pair = (pair[0][0], pair[1][0])
        result[name] = pair
    return result
