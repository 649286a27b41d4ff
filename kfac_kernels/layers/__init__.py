"""Layer adapters and their discovery in a model.

Every curvature method reads the same adapters: ``nn.Linear`` (:mod:`.linear`), ``nn.Conv1d`` /
``nn.Conv2d`` (:mod:`.conv`), affine ``nn.LayerNorm`` / ``nn.BatchNorm1d`` / ``nn.BatchNorm2d``
(:mod:`.norm`), ``nn.Embedding``, ``nn.MultiheadAttention`` and an embedding weight tied to an
output projection (:mod:`.transformer`).
"""
from __future__ import annotations

import fnmatch
import warnings
from collections import defaultdict
from typing import Iterable

from torch import nn

from .base import (DENSE, DIAGONAL, ROWS, GramRows, LayerAdapter, Layout, StepSums, blocks,
                   gram_of_rows)
from .conv import ConvAdapter
from .linear import LinearAdapter
from .norm import NORM_TYPES, NormAdapter
from .transformer import (AttentionHooks, AttentionInProjAdapter, AttentionOutProjAdapter,
                          EmbeddingAdapter, TiedEmbeddingAdapter, unsupported_attention_reason)

__all__ = ["ConvAdapter", "DENSE", "DIAGONAL", "EmbeddingAdapter", "GramRows", "LayerAdapter",
           "Layout", "LinearAdapter", "NormAdapter", "ROWS", "StepSums", "TiedEmbeddingAdapter",
           "blocks",
           "find_adapters", "gram_of_rows", "validate_skip_modules"]

SUPPORTED_NAMES = ("nn.Linear, nn.Conv1d, nn.Conv2d, nn.LayerNorm, nn.BatchNorm1d, "
                   "nn.BatchNorm2d, nn.Embedding, nn.MultiheadAttention")


def skipped(name: str, module: nn.Module, skip_modules) -> bool:
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


def _adapters_of(name: str, module: nn.Module, skip_modules, who: str) -> list | None:
    """``(name, adapter)`` pairs for a supported module, ``None`` for an unsupported one."""
    if isinstance(module, nn.Linear) and not isinstance(
            module, nn.modules.linear.NonDynamicallyQuantizableLinear):
        return [(name, LinearAdapter(name, module))]
    if isinstance(module, (nn.Conv1d, nn.Conv2d)):
        return [(name, ConvAdapter(name, module))]
    if isinstance(module, NORM_TYPES):
        # Without affine parameters there is nothing to precondition.
        return [] if getattr(module, "weight", None) is None else [(name, NormAdapter(name,
                                                                                     module))]
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
        hooks = AttentionHooks(module)
        out = [(name, AttentionInProjAdapter(name, hooks))]
        out_name = f"{name}.out_proj" if name else "out_proj"
        if not skipped(out_name, module.out_proj, skip_modules):
            out.append((out_name, AttentionOutProjAdapter(out_name, module.out_proj, hooks)))
        return out
    return None


def _tie(adapters: dict, kfac_approx: str | None, who: str) -> dict:
    """Replace an ``nn.Embedding`` and an ``nn.Linear`` that share their weight Parameter by one
    :class:`TiedEmbeddingAdapter` (named after the Linear); any other sharing of a weight
    between adapted layers is refused."""
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
                             "needs kfac_approx='expand' (Zhang et al. (2019), App. A.1, "
                             "defines it for sequence outputs)")
        emb, head = adapters.pop(emb_name), adapters.pop(head_name)
        adapters[head_name] = TiedEmbeddingAdapter(head_name, emb.module, head.module)
    return adapters


def unsupported_message(who: str, unsupported: list[tuple[str, nn.Module]], what: str) -> str:
    """One line naming the unsupported modules with parameters of their own, grouped by type."""
    by_type: dict[str, list[str]] = defaultdict(list)
    for name, module in unsupported:
        by_type[type(module).__name__].append(name or "the model itself")
    parts = [f"{len(names)} {kind} ({', '.join(names)})" for kind, names in by_type.items()]
    types = ", ".join(f"nn.{t}" if hasattr(nn, t) else t for t in by_type)
    return (f"{who}: no Kronecker-factored curvature for {', '.join(parts)}: {what}. Pass "
            f"skip_modules=[{types}] (or their names) to silence this warning.")


def find_adapters(model: nn.Module, skip_modules: Iterable = (), who: str = "kfac_kernels",
                  warn: bool = True, kfac_approx: str | None = None,
                  unsupported_effect: str = "their gradients are used unchanged"
                  ) -> dict[str, LayerAdapter]:
    """Adapters for every supported module with a trainable weight, by qualified name.

    Modules that own trainable parameters but have no adapter are named in one warning, grouped
    by type; ``skip_modules`` silences it for the modules it names. An ``nn.MultiheadAttention``
    named ``name`` gives the adapters ``name`` (its packed ``in_proj``) and ``name.out_proj``;
    an ``nn.Embedding`` whose weight is the weight of an ``nn.Linear`` gives one tied adapter
    named after the Linear.
    """
    adapters: dict[str, LayerAdapter] = {}
    unsupported = []
    handled: set[int] = set()
    for name, module in model.named_modules():
        if skipped(name, module, skip_modules) or id(module) in handled:
            continue
        found = _adapters_of(name, module, skip_modules, who)
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
                    unsupported.append((f"{name}.{'/'.join(extra)}", module))
            continue
        if any(p.requires_grad for p in module.parameters(recurse=False)):
            unsupported.append((name, module))
    if unsupported and warn:
        warnings.warn(unsupported_message(who, unsupported, unsupported_effect), stacklevel=3)
    return _tie(adapters, kfac_approx, who)
