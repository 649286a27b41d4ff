"""``kfac-train``: train a small workload with any optimizer of the package, or compare several.

Examples::

    kfac-train --optimizer kfac --steps 300
    kfac-train --optimizer adamw --steps 300 --seed 1 --json adamw.json
    kfac-train --optimizer sgd --dtype float64 --no-progress
    kfac-train --task char-lm --optimizer kfac --steps 300
    kfac-train --compare adamw,kfac,singd-diagonal --seeds 0,1,2 --plot out.png

Workloads (``--task``, :mod:`kfac_kernels.apps.workloads`): ``digits`` (default), ``char-lm``,
``deep-linear``, ``graphs``; none needs a download. ``--compare`` (:mod:`kfac_kernels.apps.compare`)
runs several optimizers with the same seeds and data order, each run in a fresh process, and
prints steps and wall time to the target metric, final metrics and peak memory.

For a given ``--seed`` every optimizer starts from the same initial weights and sees the same
mini-batches in the same order (they are drawn by a dedicated seeded ``torch.Generator``), so runs
with different optimizers compare like with like. ``--optimizer kfac`` is SGD with momentum
whose gradients are preconditioned by :class:`kfac_kernels.KFAC`, combined through
:class:`kfac_kernels.PreconditionedOptimizer`.

The command prints the final training and test loss and accuracy (evaluated on the full sets)
and the wall time of the training loop; ``--json PATH`` also writes them, with the settings and a
history of the training loss, to ``PATH``.
"""
from __future__ import annotations

import argparse
import inspect
import json
import math
import os
import sys
import time
from typing import Sequence

import torch
from torch import nn

from .defaults import (ADAPTIVE_DEFAULTS, ADAPTIVE_OPTIMIZERS, DEFAULT_LR, DEFAULT_MOMENTUM,
                       DEFAULT_RELATIVE_DAMPING, DEFAULT_WEIGHT_DECAY, INV_WARMUP_STEPS,
                       KFAC_KL_CLIP, OPTIMIZERS, OPTION_USERS, SECOND_ORDER, SINGD_DEFAULTS,
                       SINGD_OPTIMIZERS, SINGD_T, UPDATE_STEPS,
                       default_damping, default_lr)
from .models import num_parameters
from .workloads import WORKLOADS

DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16}


def _target(text: str) -> tuple[str, float]:
    metric, sep, value = text.partition("=")
    if not sep or metric not in ("test_accuracy", "test_loss", "train_loss"):
        raise argparse.ArgumentTypeError(
            f"expected METRIC=VALUE with METRIC test_accuracy, test_loss or train_loss, got "
            f"{text!r}")
    try:
        return metric, float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number after '=', got {value!r}") from None


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {value}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"expected a positive finite number, got {text!r}")
    return value


def _non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}") from None
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {text!r}")
    return value


def _momentum(text: str) -> float:
    value = _non_negative_float(text)
    if value >= 1:
        raise argparse.ArgumentTypeError(f"expected a momentum in [0, 1), got {text!r}")
    return value


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends ``(default: X)`` only where the help text does not give the default itself
    (per optimizer, per task) and there is a value to show."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text or action.default in (None, False, argparse.SUPPRESS):
            return text
        return super()._get_help_string(action)


def _per_optimizer(values: dict) -> str:
    """``{optimizer: value}`` as ``value for a, b; ...`` (the SINGD family named once)."""
    groups: dict = {}
    for name, value in values.items():
        if value is not None:
            groups.setdefault(value, []).append(name)
    parts = []
    for value, names in groups.items():
        if set(SINGD_OPTIMIZERS) <= set(names):
            names = [n for n in names if n not in SINGD_OPTIMIZERS] + ["the SINGD family"]
        parts.append(f"{value:g} for {', '.join(names)}")
    return "; ".join(parts)


def _library_default(name: str):
    from kfac_kernels import KFAC
    return inspect.signature(KFAC).parameters[name].default


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kfac-train",
        description="Train a small workload (no download) with SGD, AdamW, K-FAC, BD-KFAC or the "
                    "SINGD family and report train/test loss, accuracy, wall time and steps to a "
                    "target; or compare several optimizers (--compare).",
        formatter_class=_HelpFormatter)
    parser.add_argument("--task", choices=tuple(WORKLOADS), default="digits",
                        help="workload: " + "; ".join(f"{k}: {w.description}"
                                                      for k, w in WORKLOADS.items()))
    parser.add_argument("--optimizer", choices=OPTIMIZERS, default="kfac",
                        help="optimizer to train with")
    parser.add_argument("--target", type=_target, default=None,
                        help="METRIC=VALUE to record steps and time to (default per task: " +
                             ", ".join(f"{k} {w.target[0]}={w.target[1]:g}"
                                       for k, w in WORKLOADS.items()) + ")")
    parser.add_argument("--eval-every", type=_positive_int, default=25,
                        help="evaluate on the test set every this many steps (not timed)")
    parser.add_argument("--steps", type=_positive_int, default=300, help="optimizer steps")
    parser.add_argument("--batch-size", type=_positive_int, default=64, help="mini-batch size")
    parser.add_argument("--lr", type=_positive_float, default=None,
                        help="learning rate (default, the same on every task: " +
                             _per_optimizer(DEFAULT_LR) + "; the adaptive optimizers have none)")
    parser.add_argument("--schedule", choices=("constant", "cosine"), default="constant",
                        help="learning-rate schedule after the warmup: constant, or a cosine "
                             "decay to 0 at the last step (not used by the adaptive "
                             "optimizers, whose step length comes from their quadratic model)")
    parser.add_argument("--warmup", type=_non_negative_int, default=0,
                        help="steps of linear learning-rate warmup from lr / (warmup + 1)")
    parser.add_argument("--momentum", type=_momentum, default=DEFAULT_MOMENTUM,
                        help="momentum of SGD (sgd and kfac)")
    parser.add_argument("--weight-decay", type=_non_negative_float, default=None,
                        help="weight decay (default: " + _per_optimizer(DEFAULT_WEIGHT_DECAY)
                             + ")")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the initial weights and of the mini-batch order")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="device to train on")
    parser.add_argument("--threads", type=_non_negative_int, default=1,
                        help="CPU threads for torch's intra-op parallelism while training, 0 for "
                             "torch's default; the model is small, so more threads mostly add "
                             "synchronisation (and are much slower on a busy machine)")
    parser.add_argument("--denormals", choices=("flush", "keep"), default="flush",
                        help="CPU arithmetic on denormal numbers while training: flush them to "
                             "zero (torch.set_flush_denormal(True), the default, for every "
                             "optimizer alike) or keep them (IEEE gradual underflow). Once a "
                             "network fits its batches, some of its gradients underflow, and on "
                             "x86 each operation on a denormal costs ~100x: a digits CNN's "
                             "convolution backward under K-FAC took 3.8x longer with them")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="float32",
                        help="dtype of the model and data (K-FAC keeps bf16 layers' factors "
                             "in float32)")
    kfac = parser.add_argument_group("K-FAC (--optimizer kfac, bdkfac)")
    kfac.add_argument("--damping", type=_positive_float, default=None,
                      help=f"damping of K-FAC / BD-KFAC relative to each layer's curvature "
                           f"scale (the largest eigenvalue of its Kronecker block; default: "
                           f"{DEFAULT_RELATIVE_DAMPING:g}); the initial damping of the adaptive "
                           f"optimizers (default: {ADAPTIVE_DEFAULTS['damping']:g})")
    kfac.add_argument("--absolute-damping", action="store_true",
                      help="--damping is an absolute Tikhonov damping instead")
    kfac.add_argument("--kfac-approx", choices=("expand", "reduce"), default="expand",
                      help="K-FAC approximation for layers with weight sharing (convolutions)")
    kfac.add_argument("--damping-form", choices=("exact", "factored"), default="exact",
                      help="exact eigen damping or factored Tikhonov damping")
    kfac.add_argument("--factor-decay", type=_non_negative_float, default=0.95,
                      help="decay of the factors' moving average, in [0, 1)")
    kfac.add_argument("--factor-update-steps", type=_positive_int, default=None,
                      help="update the Kronecker factors every this many steps (default: "
                           + ", ".join(f"{v[0]} for {k}" for k, v in UPDATE_STEPS.items())
                           + f", else {_library_default('factor_update_steps')}, the "
                             "library's)")
    kfac.add_argument("--inv-update-steps", type=_positive_int, default=None,
                      help="recompute the decompositions every this many steps (default: "
                           + ", ".join(f"{v[1]} for {k}" for k, v in UPDATE_STEPS.items())
                           + f", else {_library_default('inv_update_steps')}, the library's)")
    kfac.add_argument("--inv-warmup-steps", type=_non_negative_int, default=None,
                      help="during the first this many steps recompute the decompositions at "
                           "every factor update (default: "
                           + ", ".join(f"{v} for {k}" for k, v in INV_WARMUP_STEPS.items())
                           + f", else {_library_default('inv_warmup_steps')}, the library's)")
    kfac.add_argument("--fisher", choices=("empirical", "mc", "type-2"), default=None,
                      help="curvature of the factors (default: empirical for kfac/bdkfac, mc "
                           "for the adaptive optimizers)")
    kfac.add_argument("--kl-clip", type=_positive_float, default=None,
                      help=f"KL-clipping constant (default: {KFAC_KL_CLIP:g} for kfac, off for "
                           "bdkfac)")
    kfac.add_argument("--num-blocks", type=_positive_int, default=4,
                      help="diagonal blocks per Kronecker factor (--optimizer bdkfac)")
    kfac.add_argument("--backend", choices=("auto", "eager", "triton", "cuda", "cpu"),
                      default="auto", help="kernel backend of the curvature (K-FAC's and "
                                           "SINGD's factor updates)")
    singd = parser.add_argument_group("SINGD (--optimizer singd-<structure>, ingd, ikfac)")
    singd.add_argument("--lr-cov", type=_non_negative_float, default=SINGD_DEFAULTS["lr_cov"],
                       help="beta1: learning rate of the Kronecker factors K and C")
    singd.add_argument("--singd-damping", type=_non_negative_float,
                       default=SINGD_DEFAULTS["damping"], help="lambda: damping of SINGD")
    singd.add_argument("--alpha1", type=_momentum, default=SINGD_DEFAULTS["alpha1"],
                       help="Riemannian momentum of the factors (not used by ikfac)")
    singd.add_argument("--singd-T", type=_positive_int, default=None,
                       help="update K and C every this many steps (default: "
                            + ", ".join(f"{t} for {o}" for o, t in SINGD_T.items())
                            + f", {SINGD_DEFAULTS['T']} for the others)")
    singd.add_argument("--block-size", type=_positive_int, default=SINGD_DEFAULTS["block_size"],
                       help="k of the block-diagonal, hierarchical and rank-k structures")
    singd.add_argument("--normalize-lr-cov", action="store_true",
                       help="normalised updates of K and C (lr_cov / max(1, max|m|))")
    singd.add_argument("--singd-fused", action="store_true",
                       help="fused kernels for diagonal factors (singd-diagonal)")
    singd.add_argument("--singd-per-layer", action="store_true",
                       help="dense factors one layer at a time (the readable path) instead of "
                            "the same-shape layers as one stack")
    singd.add_argument("--no-warm-start", action="store_true",
                       help="start K and C at the identity (the reference implementation) "
                            "instead of at the damped inverse roots of the first statistics")
    out = parser.add_argument_group("output")
    out.add_argument("--json", metavar="PATH", default=None,
                     help="write the settings, final metrics and history to this JSON file")
    out.add_argument("--log-every", type=_positive_int, default=10,
                     help="record the training loss every this many steps (history, progress "
                          "bar)")
    out.add_argument("--no-progress", action="store_true", help="do not show a progress bar")
    out.add_argument("--stop-at-target", action="store_true",
                     help="stop at the first evaluation that reaches the target (the final "
                          "metrics are then those at that step)")
    cmp = parser.add_argument_group("comparison")
    cmp.add_argument("--compare", metavar="A,B,...", default=None,
                     help="compare these optimizers (each with its defaults unless --lr etc. "
                          "are given) on the same seeds and data order")
    cmp.add_argument("--seeds", metavar="S,...", default=None,
                     help="seeds of a comparison (default: --seed)")
    cmp.add_argument("--lr-grid", action="store_true",
                     help="run every optimizer with a learning rate at its default times "
                          "1/3, 1 and 3 and keep, per optimizer, the best (fewest median steps "
                          "to the target, then least CPU time)")
    cmp.add_argument("--progress-log", action="store_true",
                     help="with --compare: print one line per finished run to stderr")
    cmp.add_argument("--plot", metavar="PATH", default=None,
                     help="with --compare: write a PNG of loss/metric against steps and time")
    return parser


def _flag_of(dest: str) -> str:
    return "--" + dest.replace("_", "-")


def _check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """User errors end in ``parser.error`` (one line, exit status 2), before anything runs."""
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available to this torch "
                     f"({torch.__version__}); use --device cpu")
    if args.factor_decay >= 1:
        parser.error(f"--factor-decay must be in [0, 1), got {args.factor_decay}")
    compared = None if args.compare is None else [
        o.strip() for o in args.compare.split(",") if o.strip() in OPTIMIZERS]
    optimizers = compared if compared else [args.optimizer]
    for dest, (users, described) in OPTION_USERS.items():
        if getattr(args, dest) == parser.get_default(dest):
            continue
        if not any(o in users for o in optimizers):
            used_by = (f"--optimizer {args.optimizer}" if compared is None
                       else "any of the compared optimizers")
            parser.error(f"{_flag_of(dest)} only applies to {described}, not to {used_by}")
    if args.optimizer in ADAPTIVE_OPTIMIZERS and args.lr is not None:
        parser.error(f"--lr does not apply to --optimizer {args.optimizer}: its step length is "
                     "chosen from the quadratic model on every step")
    if args.backend != "auto":
        from kfac_kernels import available_backends
        available = available_backends(args.device)
        if args.backend not in available:
            parser.error(f"--backend {args.backend} is not available on {args.device} on this "
                         f"machine (available: {', '.join(['auto'] + available)})")
    if args.json is not None:
        folder = os.path.dirname(os.path.abspath(args.json))
        if not os.path.isdir(folder):
            parser.error(f"--json {args.json}: the folder {folder} does not exist")


def _make_singd(args: argparse.Namespace, model: nn.Module, loss_average: str = "batch"):
    """:class:`kfac_kernels.SINGD` for ``ingd`` (dense), ``ikfac`` (dense, kfac_like) and
    ``singd-<structure>``; factors are stored in the model's dtype and updated in fp32."""
    from kfac_kernels import SINGD

    structure = "dense" if args.optimizer in ("ingd", "ikfac") else args.optimizer[6:]
    kfac_like = args.optimizer == "ikfac"
    return SINGD(model, **_own_parameters_skipped(model), lr=args.lr, momentum=args.momentum, damping=args.singd_damping,
                 alpha1=0.0 if kfac_like else args.alpha1, weight_decay=args.weight_decay,
                 T=_singd_T(args), lr_cov=args.lr_cov, structures=structure,
                 block_size=args.block_size, kfac_approx=args.kfac_approx,
                 loss_average=loss_average, kfac_like=kfac_like, backend=args.backend,
                 fused=args.singd_fused, normalize_lr_cov=args.normalize_lr_cov,
                 warm_start=not args.no_warm_start, stack_layers=not args.singd_per_layer)


class MultiOptimizer:
    """Several optimizers over disjoint parameters, stepped together (Muon and AdamW)."""

    def __init__(self, parts: list):
        self.parts = parts

    @property
    def param_groups(self) -> list:
        return [g for o in self.parts for g in o.param_groups]

    def zero_grad(self, set_to_none: bool = True) -> None:
        for o in self.parts:
            o.zero_grad(set_to_none=set_to_none)

    def step(self) -> None:
        for o in self.parts:
            o.step()

    def state_dict(self) -> dict:
        return {"parts": [o.state_dict() for o in self.parts]}


def _muon(model: nn.Module, lr: float, weight_decay: float):
    """``torch.optim.Muon`` on the hidden 2-D weights, AdamW on everything else (embeddings,
    the first and the output layer, biases, gains, convolution kernels), as Muon's
    documentation prescribes; Muon's updates scaled to AdamW's RMS (``match_rms_adamw``) so
    that both take the same learning rate."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    first = next((m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d,
                                                                 nn.Embedding))), None)
    last = linears[-1] if linears else None
    hidden = [m.weight for m in linears if m is not first and m is not last
              and m.weight.requires_grad]
    ids = {id(p) for p in hidden}
    rest = [p for p in model.parameters() if p.requires_grad and id(p) not in ids]
    parts = [torch.optim.AdamW(rest, lr=lr, weight_decay=weight_decay)]
    if hidden:
        parts.append(torch.optim.Muon(hidden, lr=lr, weight_decay=weight_decay,
                                      adjust_lr_fn="match_rms_adamw"))
    return MultiOptimizer(parts)


def _soap(model: nn.Module, lr: float, weight_decay: float):
    try:
        from pytorch_optimizer import SOAP
    except ImportError:
        raise SystemExit("kfac-train: --optimizer soap needs the pytorch-optimizer package "
                         "(pip install 'kfac-kernels[soap]')") from None
    return SOAP(model.parameters(), lr=lr, weight_decay=weight_decay)


def _own_parameters_skipped(model: nn.Module) -> dict:
    """``skip_modules`` naming the task model itself when it holds parameters of its own (a
    class token, position embeddings): they take the base update on purpose, so the curvature
    optimizers are told, and the run does not warn about its own model."""
    return ({"skip_modules": [type(model)]} if any(True for _ in model.parameters(recurse=False))
            else {})


def _kfac_options(args: argparse.Namespace, model: nn.Module) -> dict:
    """The K-FAC options given on the command line (the library's defaults otherwise). A task
    model's own parameters (a class token, position embeddings) take the base optimizer's
    update on purpose: said as ``skip_modules``, so the run does not warn about its own model."""
    out = {"factor_decay": args.factor_decay, "kfac_approx": args.kfac_approx,
           "backend": args.backend, **_own_parameters_skipped(model)}
    for key, value in zip(("factor_update_steps", "inv_update_steps"), _update_steps(args)):
        if value is not None:
            out[key] = value
    warmup = _inv_warmup_steps(args)
    if warmup is not None:
        out["inv_warmup_steps"] = warmup
    return out


def _update_steps(args: argparse.Namespace) -> tuple[int | None, int | None]:
    """The factor and inverse periods: the command line's, else kfac-train's default for the
    optimizer (``None``: the library's)."""
    defaults = UPDATE_STEPS.get(args.optimizer, (None, None))
    return tuple(d if v is None else v for v, d in zip(
        (args.factor_update_steps, args.inv_update_steps), defaults))


def _singd_T(args: argparse.Namespace) -> int:
    """The command line's --singd-T, else kfac-train's default for the SINGD optimizer."""
    if args.singd_T is not None:
        return args.singd_T
    return SINGD_T.get(args.optimizer, SINGD_DEFAULTS["T"])


def _inv_warmup_steps(args: argparse.Namespace) -> int | None:
    """The command line's --inv-warmup-steps, else kfac-train's default for the optimizer
    (``None``: the library's)."""
    if args.inv_warmup_steps is not None:
        return args.inv_warmup_steps
    return INV_WARMUP_STEPS.get(args.optimizer)


def _make_optimizer(args: argparse.Namespace, model: nn.Module, workload=None):
    """The optimizer object to call ``zero_grad()`` / ``step()`` on."""
    loss_average = workload.loss_average if workload is not None else "batch"
    if args.optimizer in SINGD_OPTIMIZERS:
        return _make_singd(args, model, loss_average)
    params = model.parameters()
    if args.optimizer == "sgd":
        return torch.optim.SGD(params, lr=args.lr, momentum=args.momentum,
                               weight_decay=args.weight_decay)
    if args.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)
    if args.optimizer == "muon":
        return _muon(model, args.lr, args.weight_decay)
    if args.optimizer == "soap":
        return _soap(model, args.lr, args.weight_decay)
    from kfac_kernels import BDKFAC, KFAC, AdaptiveKFAC, PreconditionedOptimizer

    damping = ({"damping": args.damping} if args.absolute_damping
               else {"relative_damping": args.damping})
    if args.optimizer in ADAPTIVE_OPTIMIZERS:
        structure = "block-diagonal" if args.optimizer == "bdkfac-adaptive" else "dense"
        extra = {"num_blocks": args.num_blocks} if structure == "block-diagonal" else {}
        loss_fn = workload.loss_module() if workload is not None else nn.CrossEntropyLoss()
        return AdaptiveKFAC(model, loss_fn, damping=args.damping, structure=structure,
                            fisher_type=args.fisher or "mc", weight_decay=args.weight_decay,
                            loss_average=loss_average, **extra, **_kfac_options(args, model))
    fisher = {} if args.fisher in (None, "empirical") else {
        "fisher_type": args.fisher, "loss_fn": workload.loss_module()}
    if args.optimizer == "bdkfac":
        base = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)
        # The BD-KFAC paper's precomputed damped block inverses.
        precond = BDKFAC(model, num_blocks=args.num_blocks, **damping,
                         damping_form="factored", compute_method="inverse",
                         damping_split="equal", kl_clip=args.kl_clip, loss_average=loss_average,
                         **fisher, **_kfac_options(args, model))
        return PreconditionedOptimizer(base, precond)
    base = torch.optim.SGD(params, lr=args.lr, momentum=args.momentum,
                           weight_decay=args.weight_decay)
    # KL-clipping (Tselepidis et al. (2020), Eq. 10) bounds the step of SGD over K-FAC: with
    # it the step length no longer depends on the learning rate once clipped, and a relative
    # damping can leave the weak directions nearly undamped without diverging.
    kl_clip = args.kl_clip if args.kl_clip is not None else KFAC_KL_CLIP
    precond = KFAC(model, **damping, damping_form=args.damping_form, kl_clip=kl_clip,
                   loss_average=loss_average, **fisher, **_kfac_options(args, model))
    return PreconditionedOptimizer(base, precond)


def lr_multiplier(step: int, steps: int, schedule: str, warmup: int) -> float:
    """The learning-rate factor of step ``step`` (0-based) of ``steps``: linear warmup over
    ``warmup`` steps from ``1 / (warmup + 1)``, then constant or a cosine decay to 0."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    if schedule == "constant":
        return 1.0
    span = max(1, steps - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(step - warmup, span) / span))


@torch.no_grad()
def evaluate(workload, model: nn.Module, x, y: torch.Tensor,
             batch_size: int = 256) -> tuple[float, float]:
    """(mean loss, accuracy) of ``model`` on ``(x, y)`` in eval mode; for sequences, per token."""
    was_training = model.training
    model.eval()
    loss, weight, correct, total = 0.0, 0, 0, 0
    n = int(y.shape[0])
    for start in range(0, n, batch_size):
        idx = torch.arange(start, min(start + batch_size, n), device=y.device)
        out = model(workload.inputs(x, idx)).float()
        target = y[idx]
        count = int(target.numel()) if out.dim() > 2 or target.dim() > 1 else int(idx.numel())
        loss += float(workload.loss(out, target)) * count
        weight += count
        c, t = workload.correct(out, target)
        correct += c
        total += t
    model.train(was_training)
    return loss / max(weight, 1), correct / max(total, 1)


def peak_rss_bytes() -> int:
    """The process's peak resident set size so far."""
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def current_rss_bytes() -> int:
    try:
        with open("/proc/self/statm", encoding="utf-8") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return 0


def state_bytes(optimizer) -> int:
    """Bytes of every tensor the optimizer (and its preconditioner) keeps between steps."""
    seen, total = set(), 0

    def walk(obj):
        nonlocal total
        if isinstance(obj, torch.Tensor):
            key = (obj.data_ptr(), obj.numel(), obj.dtype)
            if key not in seen and obj.numel():
                seen.add(key)
                total += obj.numel() * obj.element_size()
        elif isinstance(obj, dict):
            for v in obj.values():
                walk(v)
        elif isinstance(obj, (list, tuple)):
            for v in obj:
                walk(v)

    walk(optimizer.state_dict())
    return total


class ArgumentMismatch(ValueError):
    """An argument that the chosen task's data cannot satisfy (found once the data is loaded);
    ``main`` turns it into a one-line error and exit status 2."""


class BatchSampler:
    """Indices of mini-batches: epochs of a seeded permutation, the last incomplete batch of an
    epoch dropped. Depends only on ``(n, batch_size, seed)``, not on the optimizer."""

    def __init__(self, n: int, batch_size: int, seed: int, device: torch.device):
        if batch_size > n:
            raise ArgumentMismatch(f"--batch-size {batch_size} exceeds the {n} training examples "
                                   f"of the task; use at most {n}")
        self.n, self.batch_size, self.device = n, batch_size, device
        self.generator = torch.Generator().manual_seed(seed)
        self._perm = torch.empty(0, dtype=torch.int64)
        self._pos = 0

    def next(self) -> torch.Tensor:
        if self._pos + self.batch_size > self._perm.numel():
            self._perm = torch.randperm(self.n, generator=self.generator).to(self.device)
            self._pos = 0
        idx = self._perm[self._pos:self._pos + self.batch_size]
        self._pos += self.batch_size
        return idx


def run(args: argparse.Namespace) -> dict:
    """Train as ``args`` says (parsed by :func:`build_parser`) and return the metrics dict.

    ``args.threads`` (if not 0) sets torch's intra-op thread count for the run; the previous
    count is restored afterwards. ``args.denormals == "flush"`` flushes denormal numbers to zero
    on the CPU during the run (``torch.set_flush_denormal``), off again afterwards."""
    previous_threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    flush = getattr(args, "denormals", "flush") == "flush"
    torch.set_flush_denormal(flush)
    try:
        return _run(args)
    finally:
        torch.set_num_threads(previous_threads)
        if flush:
            torch.set_flush_denormal(False)   # torch's default (it has no getter to restore)


def _run(args: argparse.Namespace) -> dict:
    from tqdm.auto import tqdm

    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    workload = WORKLOADS[args.task]
    target_metric, target_value = args.target or workload.target
    torch.manual_seed(args.seed)
    data = workload.load(dtype, device)
    model = workload.build_model(args.seed, dtype, device, data)
    model.train()
    optimizer = _make_optimizer(args, model, workload)
    sampler = BatchSampler(data.train_size, args.batch_size, args.seed, device)
    rss_start = current_rss_bytes()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        cuda_start = torch.cuda.memory_allocated(device)

    history, evals = [], []
    reached = None
    run_loss = torch.zeros((), dtype=torch.float64, device=device)
    run_steps = 0
    bar = tqdm(total=args.steps, desc=f"kfac-train {args.task} {args.optimizer}", unit="step",
               disable=args.no_progress, file=sys.stderr, dynamic_ncols=True)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def check_target(step, elapsed, metrics):
        nonlocal reached
        value = metrics[target_metric]
        hit = value >= target_value if target_metric.endswith("accuracy") else value <= target_value
        if reached is None and hit:
            reached = {"step": step, "elapsed_s": elapsed, "cpu_s": metrics["cpu_s"]}

    sync()
    train_time = cpu_time = 0.0
    adaptive = args.optimizer in ADAPTIVE_OPTIMIZERS
    precond = getattr(optimizer, "preconditioner", None)
    extra_backward = precond is not None and getattr(precond, "fisher_type", "empirical") != \
        "empirical"
    base_lrs = [g["lr"] for g in optimizer.param_groups] if not adaptive else []
    for step in range(1, args.steps + 1):
        t0, c0 = time.perf_counter(), time.process_time()
        idx = sampler.next()
        x, y = workload.inputs(data.x_train, idx), data.y_train[idx]
        if adaptive:
            # the closure runs the forward pass; the optimizer computes loss and backward
            loss = optimizer.step(lambda: workload.loss_pair(model(x), y))
        else:
            factor = lr_multiplier(step - 1, args.steps, args.schedule, args.warmup)
            for group, lr in zip(optimizer.param_groups, base_lrs):
                group["lr"] = lr * factor
            optimizer.zero_grad(set_to_none=True)
            if extra_backward:
                loss = precond.backward(*workload.loss_pair(model(x), y))
            else:
                loss = workload.loss(model(x), y)  # the loss in fp32 also for bf16 models
                loss.backward()
            optimizer.step()
        run_loss += loss.detach().double()
        run_steps += 1
        sync()
        train_time += time.perf_counter() - t0
        cpu_time += time.process_time() - c0
        # Read back (a sync) only every --log-every steps; evaluation is not timed.
        if step % args.log_every == 0 or step == args.steps:
            mean_loss = float(run_loss) / run_steps
            history.append({"step": step, "train_batch_loss": mean_loss, "elapsed_s": train_time,
                            "cpu_s": cpu_time})
            bar.set_postfix(loss=f"{mean_loss:.4f}", refresh=False)
            bar.update(run_steps)
            run_loss.zero_()
            run_steps = 0
        if step % args.eval_every == 0 or step == args.steps:
            test_loss, test_acc = evaluate(workload, model, data.x_test, data.y_test)
            metrics = {"step": step, "elapsed_s": train_time, "cpu_s": cpu_time,
                       "test_loss": test_loss,
                       "test_accuracy": test_acc, "train_loss": history[-1]["train_batch_loss"]
                       if history else float("nan")}
            evals.append(metrics)
            check_target(step, train_time, metrics)
            if reached is not None and args.stop_at_target:
                break
    bar.close()
    wall = train_time

    train_loss, train_acc = evaluate(workload, model, data.x_train, data.y_train)
    test_loss, test_acc = evaluate(workload, model, data.x_test, data.y_test)
    peak = {"peak_rss_bytes": peak_rss_bytes(),
            "peak_rss_growth_bytes": max(0, peak_rss_bytes() - rss_start)}
    if device.type == "cuda":
        peak["peak_cuda_extra_bytes"] = torch.cuda.max_memory_allocated(device) - cuda_start
    return {
        "task": args.task,
        "optimizer": args.optimizer,
        "steps": args.steps,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "momentum": (args.momentum if args.optimizer in ("sgd", "kfac") + SINGD_OPTIMIZERS
                     else None),
        "schedule": args.schedule,
        "warmup": args.warmup,
        "steps_run": step,
        "weight_decay": args.weight_decay,
        "damping": args.damping if args.optimizer in SECOND_ORDER else None,
        "kfac_approx": args.kfac_approx if args.optimizer in SECOND_ORDER else None,
        "num_blocks": args.num_blocks if args.optimizer == "bdkfac" else None,
        "inv_warmup_steps": ((_inv_warmup_steps(args) or _library_default("inv_warmup_steps"))
                             if args.optimizer in SECOND_ORDER else None),
        **{key: ((value or _library_default(key)) if args.optimizer in SECOND_ORDER else None)
           for key, value in zip(("factor_update_steps", "inv_update_steps"),
                                 _update_steps(args))},
        "seed": args.seed,
        "device": args.device,
        "dtype": args.dtype,
        "threads": torch.get_num_threads(),
        "denormals": getattr(args, "denormals", "flush"),
        "num_parameters": num_parameters(model),
        "num_train": data.train_size,
        "num_test": int(data.y_test.shape[0]),
        "train_loss": train_loss,
        "train_accuracy": train_acc,
        "test_loss": test_loss,
        "test_accuracy": test_acc,
        "target": {"metric": target_metric, "value": target_value,
                   "reached_at_step": None if reached is None else reached["step"],
                   "reached_after_s": None if reached is None else reached["elapsed_s"],
                   "reached_after_cpu_s": None if reached is None else reached["cpu_s"]},
        "wall_time_s": wall,
        "cpu_time_s": cpu_time,
        "steps_per_s": step / wall if wall > 0 else float("inf"),
        "cpu_s_per_step": cpu_time / step,
        "optimizer_state_bytes": state_bytes(optimizer),
        **peak,
        "torch_version": torch.__version__,
        "history": history,
        "evaluations": evals,
    }


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``kfac-train``; returns the exit status (0)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    _check_args(parser, args)
    if args.compare is not None:
        from .compare import compare_main
        return compare_main(parser, args, argv)
    if args.plot is not None or args.seeds is not None:
        parser.error("--plot and --seeds apply to --compare")
    if args.lr is None:
        args.lr = default_lr(args.task, args.optimizer)
    if args.damping is None:
        args.damping = default_damping(args.task, args.optimizer)
    if args.weight_decay is None:
        args.weight_decay = DEFAULT_WEIGHT_DECAY[args.optimizer]

    try:
        result = run(args)
    except ArgumentMismatch as err:  # one line, also inside --compare's runs
        print(f"{parser.prog}: error: {err}", file=sys.stderr)
        return 2

    lr = "adaptive" if result["lr"] is None else f"{result['lr']:g}"
    print(f"task {result['task']}  optimizer {result['optimizer']}  steps {result['steps']}  "
          f"batch size {result['batch_size']}  lr {lr}  seed {result['seed']}  "
          f"device {result['device']}  dtype {result['dtype']}")
    print(f"train loss {result['train_loss']:.4f}  train accuracy {result['train_accuracy']:.4f}")
    print(f"test  loss {result['test_loss']:.4f}  test  accuracy {result['test_accuracy']:.4f}")
    target = result["target"]
    reached = (f"reached at step {target['reached_at_step']} after "
               f"{target['reached_after_s']:.2f} s" if target["reached_at_step"] is not None
               else "not reached")
    print(f"target {target['metric']}={target['value']:g}: {reached}")
    print(f"wall time {result['wall_time_s']:.2f} s  ({result['steps_per_s']:.1f} steps/s, "
          f"training only; CPU time {result['cpu_time_s']:.2f} s)")
    if not math.isfinite(result["train_loss"]):
        fix = ("a larger --damping (the initial one)" if args.optimizer in ADAPTIVE_OPTIMIZERS
               else "a smaller --lr")
        print(f"warning: the training loss is not finite (diverged); try {fix}",
              file=sys.stderr)
    if args.json is not None:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=2)
            f.write("\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
