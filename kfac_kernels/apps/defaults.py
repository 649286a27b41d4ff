"""The optimizers ``kfac-train`` offers and their default hyperparameters (read by :mod:`.train`,
:mod:`.compare` and ``bench/sweep_train.py``).

Every optimizer has one learning rate per task-independent default, the centre of the
three-point grid ``lr x {1/3, 1, 3}`` (:data:`LR_GRID`) that ``kfac-train --compare ... --lr-grid``
runs for every optimizer alike (the same tuning budget). Damping, factor and inverse periods
are the library's defaults (:class:`kfac_kernels.KFAC`, :class:`kfac_kernels.AdaptiveKFAC`,
:class:`kfac_kernels.SINGD`); the adaptive optimizers take no learning rate at all.
"""
from __future__ import annotations

from kfac_kernels.adaptive import DEFAULT_INITIAL_DAMPING
from kfac_kernels.kfac import DEFAULT_RELATIVE_DAMPING

SINGD_OPTIMIZERS = ("ingd", "ikfac", "singd-dense", "singd-diagonal", "singd-block-diagonal",
                    "singd-hierarchical", "singd-lower-triangular",
                    "singd-rank-k-lower-triangular", "singd-upper-triangular-toeplitz")
ADAPTIVE_OPTIMIZERS = ("kfac-adaptive", "bdkfac-adaptive")   # no learning rate
FIRST_ORDER = ("sgd", "adamw", "muon", "soap")
OPTIMIZERS = FIRST_ORDER + ("kfac", "bdkfac") + ADAPTIVE_OPTIMIZERS + SINGD_OPTIMIZERS
SECOND_ORDER = ("kfac", "bdkfac") + ADAPTIVE_OPTIMIZERS  # take the K-FAC options

# The multipliers of an optimizer's default learning rate that a tuned comparison tries.
LR_GRID = (1 / 3, 1.0, 3.0)

# Learning rates: the centres of the grids (bench/results/evidence_<task>.json record which
# point won on each task). K-FAC preconditions SGD with momentum, BD-KFAC AdamW (the BD-KFAC
# paper's setting); SINGD is its own optimizer (lr = beta2 of the SINGD paper).
# A grid whose top point wins has not found its optimum. With the earlier centres (SGD 0.05,
# AdamW, Muon and BD-KFAC 3e-3, K-FAC 0.1, SINGD 5e-3) the top point won, or tied for, the
# fewest steps on most of the six tasks measured then: AdamW 4 (digits, digits-bn,
# autoencoder, graphs), Muon 6, BD-KFAC 4, K-FAC 4, SINGD (ingd) 3 of the 4 it reached, SGD 2
# of 5. The bottom point won only on deep-linear, for SINGD (100 steps; 110 at the centre) and
# SGD (1 seed of 3 reached). So every centre moved up 3x, each old top point becoming the new
# centre: the same factor for all keeps the tuning budget equal, and every best rate found
# before but those two stays inside its grid. SOAP (an optional extra) is Adam in its
# preconditioner's eigenbasis, so it takes AdamW's centre too: with AdamW's former 3e-3 its top
# point won on digits, digits-bn and the autoencoder (20, 14 and 85 steps; seeds 0-2).
DEFAULT_LR = {"sgd": 0.15, "adamw": 9e-3, "muon": 9e-3, "soap": 9e-3, "kfac": 0.3,
              "bdkfac": 9e-3, "kfac-adaptive": None, "bdkfac-adaptive": None}
DEFAULT_WEIGHT_DECAY = {"sgd": 0.0, "adamw": 1e-2, "muon": 1e-2, "soap": 1e-2, "kfac": 0.0,
                        "bdkfac": 1e-2, "kfac-adaptive": 0.0, "bdkfac-adaptive": 0.0}
DEFAULT_MOMENTUM = 0.9
KFAC_KL_CLIP = 1e-3     # the KL-clipping of --optimizer kfac (kfac-pytorch's default)
# KFAC(inv_warmup_steps=...): BD-KFAC's inverses at every step for its first 20 (1 / (1 -
# factor_decay): the factors' moving average is young and moves fastest then). Seeds 0-2,
# lr 0.009, steps to target without -> with: digits 50,60,50 -> 30,30,30; digits-autoencoder
# 120,120,110 -> 60,80,110; graphs 140,160,210 -> 160,110,130; digits-bn 20,10,20 (unchanged,
# at +45% CPU time). In the tuned comparisons (bench/results/evidence_*.json) the median
# steps went 50 -> 30 (digits), 120 -> 80 (autoencoder), 160 -> 130 (graphs), 20 -> 20
# (digits-bn), 100 -> 110 (deep-linear, where 20 decompositions of 33 layers cost most: CPU
# time to target 3.49x -> 4.33x AdamW's) and 220 -> 240 (digits-vit, 1.95x -> 2.25x): kept for
# the large gains, at one evaluation interval lost on two tasks. For K-FAC over SGD and the
# adaptive K-FAC the same warm-up did not help
# (graphs 60,80,110 -> 210,90,60; adaptive on digits-autoencoder 110,150,100 -> 230,140,-), so
# they keep the library's 0.
INV_WARMUP_STEPS = {"bdkfac": 20}
# (factor_update_steps, inv_update_steps) of kfac-train's bdkfac: factors every 5 steps,
# inverses every 50 (with the warm-up above: inverses at every factor update of the first 20
# steps). Median steps / CPU s to target over seeds 0-2, each at the best of its 3 learning
# rates, at 1/10 (the library's), 2/20 and 5/50 (CPU, one thread, denormals flushed):
# digits 30/0.24, 30/0.18, 40/0.18; digits-bn 20/0.22, 20/0.16, 20/0.12; digits-autoencoder
# 80/0.43, 80/0.33, 100/0.31; digits-vit 240/4.98, 230/4.04 (2 of 3 seeds), 230/3.87;
# deep-linear 110/1.07, 110/0.91, 120/0.63; graphs 130/0.81, 90/0.46, 50/0.23: 5/50 is the
# least CPU time on every task (17-72 % less than 1/10), at one evaluation interval more on
# three. For K-FAC over SGD the same sweep was mixed (graphs 80/0.40, 70/0.31, 100/0.44;
# digits 60/0.44, 70/0.42, 90/0.39; digits-autoencoder unreached at all three), so it keeps
# the library's periods.
UPDATE_STEPS = {"bdkfac": (5, 50)}
# SINGD with warm-started factors (kfac_kernels.SINGD(warm_start=True)): the factors follow the
# curvature from the first step, so lr_cov can be K-FAC's 1 - factor_decay (0.05); the
# preconditioner is then K-FAC-sized, which wants K-FAC-like damping (0.1 on each factor) and a
# learning rate ~10x below SGD's (a sweep on digits: damping 0.01 diverged at lr 0.02, damping
# 0.1 at lr 0.005 reached the target as fast as SGD).
DEFAULT_LR.update({name: 0.015 for name in SINGD_OPTIMIZERS})   # 0.005 before: see above
DEFAULT_WEIGHT_DECAY.update({name: 0.0 for name in SINGD_OPTIMIZERS})
# INGD's T (K and C updated every T steps): 5. Its tuned comparison (seeds 0-2, the best of the
# three learning rates, an evaluation after every step; median steps / CPU s to target) at
# T = 1, 2, 5: digits 43/0.55, 31/0.33, 27/0.25; digits-bn 14/0.33, 13/0.27, 11/0.23;
# digits-autoencoder 253/2.15, 229/1.30, 217/0.82; deep-linear 69/0.41, 72/0.31, 65/0.22;
# graphs 42/0.25, 42 (2 seeds of 3)/0.21, 66/0.28; digits-vit and char-lm reached at none.
# T = 5 takes the least CPU time on four of the five tasks reached and fewer steps on four
# (graphs: more steps, still fewer than SGD's 96): the factors move by lr_cov per update, and
# the step between updates applies the same preconditioner without new statistics. The other
# SINGD optimizers keep T = 1: they were not swept, and IKFAC at T = 5 (lr 0.015) diverged on
# digits within 40 steps.
SINGD_DEFAULTS = {"lr_cov": 0.05, "damping": 0.1, "alpha1": 0.5, "T": 1, "block_size": 16}
SINGD_T = {"ingd": 5}
ADAPTIVE_DEFAULTS = {"damping": DEFAULT_INITIAL_DAMPING}


def default_lr(task: str, optimizer: str) -> float | None:
    return DEFAULT_LR[optimizer]


def default_damping(task: str, optimizer: str) -> float:
    """The relative damping of K-FAC / BD-KFAC, the initial one of the adaptive optimizers."""
    if optimizer in ADAPTIVE_OPTIMIZERS:
        return ADAPTIVE_DEFAULTS["damping"]
    return DEFAULT_RELATIVE_DAMPING


_WITH_LR = tuple(o for o in OPTIMIZERS if o not in ADAPTIVE_OPTIMIZERS)
_BLOCK_STRUCTURES = ("singd-block-diagonal", "singd-hierarchical", "singd-rank-k-lower-triangular")
_K_FAC = "--optimizer kfac, bdkfac or the adaptive ones"
_SINGD = "the SINGD family (--optimizer singd-<structure>, ingd, ikfac)"
# The options that only some optimizers use: dest -> (those optimizers, how to name them).
# kfac-train refuses such an option given for an optimizer that would ignore it (with
# --compare: for none of the compared optimizers), and --compare forwards it only to those.
OPTION_USERS: dict[str, tuple[tuple[str, ...], str]] = {
    "damping": (SECOND_ORDER, _K_FAC),
    "factor_decay": (SECOND_ORDER, _K_FAC),
    "factor_update_steps": (SECOND_ORDER, _K_FAC),
    "inv_update_steps": (SECOND_ORDER, _K_FAC),
    "inv_warmup_steps": (SECOND_ORDER, _K_FAC),
    "fisher": (SECOND_ORDER, _K_FAC),
    "kl_clip": (("kfac", "bdkfac"),
                "--optimizer kfac or bdkfac (the adaptive ones choose their step length)"),
    "absolute_damping": (("kfac", "bdkfac"),
                         "--optimizer kfac or bdkfac (the adaptive ones adapt a relative "
                         "damping)"),
    "damping_form": (("kfac",), "--optimizer kfac (bdkfac uses the factored form, the adaptive "
                                "ones the exact one)"),
    "num_blocks": (("bdkfac", "bdkfac-adaptive"), "--optimizer bdkfac or bdkfac-adaptive"),
    "kfac_approx": (SECOND_ORDER + SINGD_OPTIMIZERS, "the K-FAC and SINGD optimizers"),
    "backend": (SECOND_ORDER + SINGD_OPTIMIZERS,
                "the K-FAC and SINGD optimizers (the kernels of their curvature)"),
    "momentum": (("sgd", "kfac") + SINGD_OPTIMIZERS, "--optimizer sgd, kfac and " + _SINGD),
    "schedule": (_WITH_LR, "optimizers with a learning rate (not the adaptive ones)"),
    "warmup": (_WITH_LR, "optimizers with a learning rate (not the adaptive ones)"),
    "lr_cov": (SINGD_OPTIMIZERS, _SINGD),
    "singd_damping": (SINGD_OPTIMIZERS, _SINGD),
    "singd_T": (SINGD_OPTIMIZERS, _SINGD),
    "normalize_lr_cov": (SINGD_OPTIMIZERS, _SINGD),
    "no_warm_start": (SINGD_OPTIMIZERS, _SINGD),
    "alpha1": (tuple(o for o in SINGD_OPTIMIZERS if o != "ikfac"), _SINGD + " except ikfac"),
    "block_size": (_BLOCK_STRUCTURES, "--optimizer " + ", ".join(_BLOCK_STRUCTURES)),
    "singd_per_layer": (("ingd", "ikfac", "singd-dense"),
                        "--optimizer ingd, ikfac or singd-dense (dense factors)"),
    "singd_fused": (("singd-diagonal", "singd-block-diagonal"),
                    "--optimizer singd-diagonal or singd-block-diagonal"),
}
