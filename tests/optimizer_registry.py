"""Every optimizer and curvature structure of the package with sample configurations, in the
manner of torch.optim's ``OptimizerInfo``: the generic tests (tests/test_optimizers.py) and the
multi-process parity test (tests/test_distributed.py) run once over each entry.

An entry builds the object a training loop calls ``zero_grad()`` / ``step()`` on for a given
model (``build(model, accumulate=1)``, ``accumulate`` micro-batches per step);
``backward(opt, outputs, targets)`` runs the loss's backward the way that entry needs
(``precond.backward`` for the MC and type-2 Fisher).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from kfac_kernels import BDKFAC, KFAC, SINGD, AdaptiveKFAC, PreconditionedOptimizer, TwoLevel


@dataclass
class OptimizerInfo:
    name: str
    build: Callable[..., object]   # (model, accumulate=1) -> optimizer (zero_grad / step / ...)
    fisher: str = "empirical"
    grad_scaler: bool = True               # supports a torch.amp.GradScaler
    distributed: bool = False              # in the two-process parity test
    tied: bool = True                      # covers an embedding tied to the output layer
    closure: bool = False                  # step(closure) runs the forward and backward itself

    def preconditioner(self, opt):
        """The curvature object (KFAC, TwoLevel or the SINGD optimizer itself)."""
        return opt.preconditioner if isinstance(opt, PreconditionedOptimizer) else opt

    def train_step(self, opt, model, x, y):
        """One training step on ``(x, y)``."""
        if self.closure:
            opt.step(lambda: (model(x), y))
            return
        opt.zero_grad()
        self.backward(opt, model(x), y)
        opt.step()

    def backward(self, opt, outputs, targets, scaler=None):
        if self.fisher == "empirical":
            loss = F.cross_entropy(outputs, targets)
            (scaler.scale(loss) if scaler is not None else loss).backward()
            return loss
        return self.preconditioner(opt).backward(outputs, targets)


def _sgd(model, precond, lr=0.1):
    return PreconditionedOptimizer(torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9),
                                   precond)


def _fresh(kwargs: dict) -> dict:
    """A fresh MC generator for every build (the runs of one entry must not share one)."""
    if "generator_seed" in kwargs:
        kwargs = dict(kwargs)
        kwargs["generator"] = torch.Generator().manual_seed(kwargs.pop("generator_seed"))
    return kwargs


def _kfac(cls=KFAC, sgd=True, lr=0.1, **kwargs):
    """An entry's build: ``cls(model, **kwargs)`` (factors and inverses every 1 and 2 steps),
    under SGD with momentum (learning rate ``lr``) or, with ``sgd=False``, AdamW."""
    def build(model, accumulate=1):
        precond = cls(model, factor_update_steps=1, inv_update_steps=2,
                      grad_accumulation_steps=accumulate, **_fresh(kwargs))
        if sgd:
            return _sgd(model, precond, lr)
        return PreconditionedOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-3), precond)
    return build


def _twolevel(cls=KFAC, **kwargs):
    def build(model, accumulate=1):
        return _sgd(model, TwoLevel(cls(model, factor_update_steps=1, inv_update_steps=2,
                                        grad_accumulation_steps=accumulate, **_fresh(kwargs)),
                                    coarse_damping=0.05))
    return build


def _singd(**kwargs):
    def build(model, accumulate=1):
        return SINGD(model, grad_accumulation_steps=accumulate, **kwargs)
    return build


def _adaptive(**kwargs):
    def build(model, accumulate=1):
        return AdaptiveKFAC(model, nn.CrossEntropyLoss(), factor_update_steps=1,
                            inv_update_steps=2, damping_adaptation_interval=2,
                            factor_damping_interval=3,
                            grad_accumulation_steps=accumulate, **_fresh(kwargs))
    return build


def _mc(kind, seed=3):
    out = dict(fisher_type=kind, loss_fn=nn.CrossEntropyLoss())
    if kind == "mc":
        out["generator_seed"] = seed
    return out


# The BD-KFAC paper's form of the preconditioner (precomputed damped block inverses).
PAPER_FORM = dict(damping_form="factored", compute_method="inverse", damping_split="equal")
# SINGD: T=1 and a large lr_cov so that K and C really move in a few steps (without the
# all-reduce of U and G the two-process parameters then differ by 3e-5, 30x the tolerance).
MOVING = dict(lr=0.05, lr_cov=0.3, T=1, damping=0.01)

OPTIMIZERS: list[OptimizerInfo] = [
    OptimizerInfo("kfac", _kfac(damping=0.1), distributed=True),
    OptimizerInfo("kfac-factored", _kfac(damping=0.1, damping_form="factored")),
    OptimizerInfo("kfac-inverse", _kfac(damping=0.1, damping_form="factored",
                                        compute_method="inverse")),
    OptimizerInfo("kfac-cholesky", _kfac(damping=0.1, damping_form="factored",
                                         compute_method="cholesky")),
    OptimizerInfo("bdkfac-cholesky-relative", _kfac(BDKFAC, num_blocks=2, relative_damping=1.0,
                                                    damping_form="factored",
                                                    compute_method="cholesky", lr=0.01)),
    OptimizerInfo("kfac-reduce-klclip", _kfac(damping=0.1, kfac_approx="reduce", kl_clip=1e-2)),
    OptimizerInfo("kfac-diagonal", _kfac(damping=0.1, structure="diagonal")),
    OptimizerInfo("kfac-mc", _kfac(damping=0.1, **_mc("mc")), fisher="mc"),
    OptimizerInfo("kfac-type-2", _kfac(damping=0.1, **_mc("type-2")), fisher="type-2"),
    OptimizerInfo("kfac-memopt", _kfac(damping=0.1, distributed_strategy="mem-opt"),
                  distributed=True),
    OptimizerInfo("bdkfac", _kfac(BDKFAC, num_blocks=2, damping=0.1), distributed=True),
    OptimizerInfo("bdkfac-paper", _kfac(BDKFAC, sgd=False, num_blocks=2, damping=0.1,
                                        kl_clip=2e-3, kfac_approx="reduce", **PAPER_FORM)),
    OptimizerInfo("bdkfac-memopt", _kfac(BDKFAC, num_blocks=2, damping=0.1,
                                         distributed_strategy="mem-opt", **PAPER_FORM),
                  distributed=True),
    OptimizerInfo("twolevel", _twolevel(damping=0.1), distributed=True, tied=False),
    OptimizerInfo("twolevel-bdkfac-mc", _twolevel(BDKFAC, num_blocks=2, damping=0.1,
                                                  **_mc("mc", 4)), fisher="mc", tied=False),
    OptimizerInfo("singd", _singd(structures=("dense", "diagonal"), **MOVING),
                  distributed=True),
    OptimizerInfo("ingd", _singd(lr=0.05, lr_cov=0.1, T=2, damping=0.01, structures="dense")),
    OptimizerInfo("ikfac", _singd(lr=0.05, lr_cov=0.1, T=1, damping=0.01, structures="dense",
                                  kfac_like=True, alpha1=0.0)),
    OptimizerInfo("singd-diagonal", _singd(structures="diagonal", fused=True, **MOVING),
                  distributed=True),
    OptimizerInfo("singd-blocks", _singd(structures="block-diagonal", block_size=3, fused=True,
                                         **MOVING), distributed=True),
    OptimizerInfo("singd-diagonal-bf16", _singd(structures="diagonal", fused=True,
                                                preconditioner_dtype=torch.bfloat16, **MOVING)),
    OptimizerInfo("singd-blocks-bf16", _singd(structures="block-diagonal", block_size=3,
                                              fused=True, preconditioner_dtype=torch.bfloat16,
                                              **MOVING)),
    OptimizerInfo("singd-hierarchical-bf16", _singd(
        lr=0.05, lr_cov=0.1, T=2, damping=0.01, structures="hierarchical", block_size=3,
        preconditioner_dtype=torch.bfloat16)),
    OptimizerInfo("singd-triangular", _singd(
        lr=0.05, lr_cov=0.1, T=1, damping=0.01,
        structures=("lower-triangular", "upper-triangular-toeplitz"))),
    OptimizerInfo("singd-rank-k", _singd(lr=0.05, lr_cov=0.1, T=1, damping=0.01,
                                         structures="rank-k-lower-triangular", block_size=2,
                                         normalize_lr_cov=True)),
    OptimizerInfo("singd-warm", _singd(lr=0.02, lr_cov=0.05, T=1, damping=0.01,
                                       structures=("dense", "block-diagonal"), block_size=3,
                                       warm_start=True)),
    OptimizerInfo("singd-warm-diagonal-fused", _singd(lr=0.02, lr_cov=0.05, T=2, damping=0.01,
                                                      structures="diagonal", fused=True,
                                                      warm_start=True)),
    OptimizerInfo("kfac-relative", _kfac(relative_damping=1.0, lr=0.01)),
    OptimizerInfo("bdkfac-relative-inverse", _kfac(BDKFAC, num_blocks=2, relative_damping=1.0,
                                                   lr=0.01, **PAPER_FORM)),
    # The adaptive optimizers run the forward pass in their own step (closure).
    OptimizerInfo("kfac-adaptive", _adaptive(damping=1.0, generator_seed=5), grad_scaler=False,
                  closure=True),
    OptimizerInfo("bdkfac-adaptive-type-2", _adaptive(
        structure="block-diagonal", num_blocks=2, damping=1.0, fisher_type="type-2",
        weight_decay=1e-3), grad_scaler=False, closure=True),
]

BY_NAME = {info.name: info for info in OPTIMIZERS}
