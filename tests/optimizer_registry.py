"""Every optimizer and curvature structure of the package with sample configurations, in the
manner of torch.optim's ``OptimizerInfo``: the generic tests (tests/test_optimizers.py) and the
multi-process parity test (tests/test_distributed.py) run once over each entry.

An entry builds the object a training loop calls ``zero_grad()`` / ``step()`` on for a given
model; ``backward(opt, outputs, targets)`` runs the loss's backward the way that entry needs
(``precond.backward`` for the MC and type-2 Fisher).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from kfac_kernels import BDKFAC, KFAC, SINGD, AdaptiveKFAC, PreconditionedOptimizer, TwoLevel


@dataclass
class OptimizerInfo:
    name: str
    build: Callable[[nn.Module], object]   # model -> optimizer (zero_grad / step / state_dict)
    fisher: str = "empirical"
    grad_scaler: bool = True               # supports a torch.amp.GradScaler
    distributed: bool = False              # in the two-process parity test
    tags: set = field(default_factory=set)
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


COMMON = dict(factor_update_steps=1, inv_update_steps=2)

# The BD-KFAC paper's form of the preconditioner (precomputed damped block inverses).
PAPER_FORM = dict(damping_form="factored", compute_method="inverse", damping_split="equal")

OPTIMIZERS: list[OptimizerInfo] = [
    OptimizerInfo("kfac", lambda m: _sgd(m, KFAC(m, damping=0.1, **COMMON)), distributed=True),
    OptimizerInfo("kfac-factored", lambda m: _sgd(m, KFAC(
        m, damping=0.1, damping_form="factored", **COMMON))),
    OptimizerInfo("kfac-inverse", lambda m: _sgd(m, KFAC(
        m, damping=0.1, damping_form="factored", compute_method="inverse", **COMMON))),
    OptimizerInfo("kfac-reduce-klclip", lambda m: _sgd(m, KFAC(
        m, damping=0.1, kfac_approx="reduce", kl_clip=1e-2, **COMMON))),
    OptimizerInfo("kfac-diagonal", lambda m: _sgd(m, KFAC(
        m, damping=0.1, structure="diagonal", **COMMON))),
    OptimizerInfo("kfac-mc", lambda m: _sgd(m, KFAC(
        m, damping=0.1, fisher_type="mc", loss_fn=nn.CrossEntropyLoss(),
        generator=torch.Generator().manual_seed(3), **COMMON)), fisher="mc"),
    OptimizerInfo("kfac-type-2", lambda m: _sgd(m, KFAC(
        m, damping=0.1, fisher_type="type-2", loss_fn=nn.CrossEntropyLoss(), **COMMON)),
        fisher="type-2"),
    OptimizerInfo("kfac-memopt", lambda m: _sgd(m, KFAC(
        m, damping=0.1, distributed_strategy="mem-opt", **COMMON)), distributed=True),
    OptimizerInfo("bdkfac", lambda m: _sgd(m, BDKFAC(m, num_blocks=2, damping=0.1, **COMMON)),
                  distributed=True),
    OptimizerInfo("bdkfac-paper", lambda m: PreconditionedOptimizer(
        torch.optim.AdamW(m.parameters(), lr=1e-3), BDKFAC(
            m, num_blocks=2, damping=0.1, kl_clip=2e-3, kfac_approx="reduce", **PAPER_FORM,
            **COMMON))),
    OptimizerInfo("bdkfac-memopt", lambda m: _sgd(m, BDKFAC(
        m, num_blocks=2, damping=0.1, distributed_strategy="mem-opt", **PAPER_FORM,
        **COMMON)), distributed=True),
    OptimizerInfo("twolevel", lambda m: _sgd(m, TwoLevel(KFAC(m, damping=0.1, **COMMON),
                                                         coarse_damping=0.05)),
                  distributed=True, tags={"no-tied"}),
    OptimizerInfo("twolevel-bdkfac-mc", lambda m: _sgd(m, TwoLevel(BDKFAC(
        m, num_blocks=2, damping=0.1, fisher_type="mc", loss_fn=nn.CrossEntropyLoss(),
        generator=torch.Generator().manual_seed(4), **COMMON))), fisher="mc",
        tags={"no-tied"}),
    # SINGD: T=1 and a large lr_cov so that K and C really move in a few steps.
    OptimizerInfo("singd", lambda m: SINGD(m, lr=0.05, lr_cov=0.3, T=1, damping=0.01,
                                           structures=("dense", "diagonal")),
                  distributed=True),
    OptimizerInfo("ingd", lambda m: SINGD(m, lr=0.05, lr_cov=0.1, T=2, damping=0.01,
                                          structures="dense")),
    OptimizerInfo("ikfac", lambda m: SINGD(m, lr=0.05, lr_cov=0.1, T=1, damping=0.01,
                                           structures="dense", kfac_like=True, alpha1=0.0)),
    OptimizerInfo("singd-diagonal", lambda m: SINGD(
        m, lr=0.05, lr_cov=0.3, T=1, damping=0.01, structures="diagonal", fused=True),
        distributed=True),
    OptimizerInfo("singd-blocks", lambda m: SINGD(
        m, lr=0.05, lr_cov=0.3, T=1, damping=0.01, structures="block-diagonal", block_size=3,
        fused=True), distributed=True),
    OptimizerInfo("singd-hierarchical-bf16", lambda m: SINGD(
        m, lr=0.05, lr_cov=0.1, T=2, damping=0.01, structures="hierarchical", block_size=3,
        preconditioner_dtype=torch.bfloat16)),
    OptimizerInfo("singd-triangular", lambda m: SINGD(
        m, lr=0.05, lr_cov=0.1, T=1, damping=0.01,
        structures=("lower-triangular", "upper-triangular-toeplitz"))),
    OptimizerInfo("singd-rank-k", lambda m: SINGD(
        m, lr=0.05, lr_cov=0.1, T=1, damping=0.01, structures="rank-k-lower-triangular",
        block_size=2, normalize_lr_cov=True)),
    OptimizerInfo("singd-warm", lambda m: SINGD(
        m, lr=0.02, lr_cov=0.05, T=1, damping=0.01, structures=("dense", "block-diagonal"),
        block_size=3, warm_start=True)),
    OptimizerInfo("singd-warm-diagonal-fused", lambda m: SINGD(
        m, lr=0.02, lr_cov=0.05, T=2, damping=0.01, structures="diagonal", fused=True,
        warm_start=True)),
    OptimizerInfo("kfac-relative", lambda m: _sgd(m, KFAC(m, relative_damping=1.0, **COMMON),
                                                  lr=0.01)),
    OptimizerInfo("bdkfac-relative-inverse", lambda m: _sgd(m, BDKFAC(
        m, num_blocks=2, relative_damping=1.0, **PAPER_FORM, **COMMON), lr=0.01)),
    # The adaptive optimizers run the forward pass in their own step (closure).
    OptimizerInfo("kfac-adaptive", lambda m: AdaptiveKFAC(
        m, nn.CrossEntropyLoss(), damping=1.0, damping_adaptation_interval=2,
        generator=torch.Generator().manual_seed(5), **COMMON), grad_scaler=False,
        closure=True),
    OptimizerInfo("bdkfac-adaptive-type-2", lambda m: AdaptiveKFAC(
        m, nn.CrossEntropyLoss(), structure="block-diagonal", num_blocks=2, damping=1.0,
        fisher_type="type-2", weight_decay=1e-3, damping_adaptation_interval=2, **COMMON),
        grad_scaler=False, closure=True),
]

BY_NAME = {info.name: info for info in OPTIMIZERS}
