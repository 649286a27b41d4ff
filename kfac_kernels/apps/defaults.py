"""The optimizers ``kfac-train`` offers and their default hyperparameters, overall and per task
(from the recorded sweeps). Read by :mod:`.train` and :mod:`.compare`."""
from __future__ import annotations

SINGD_OPTIMIZERS = ("ingd", "ikfac", "singd-dense", "singd-diagonal", "singd-block-diagonal",
                    "singd-hierarchical", "singd-lower-triangular",
                    "singd-rank-k-lower-triangular", "singd-upper-triangular-toeplitz")
OPTIMIZERS = ("sgd", "adamw", "kfac", "bdkfac") + SINGD_OPTIMIZERS
SECOND_ORDER = ("kfac", "bdkfac")  # take the K-FAC options

# Defaults per optimizer. K-FAC's lr and damping come from a sweep over lr x damping (with and
# without KL-clipping) at 300 steps and batch size 64: lr 0.02 with damping 0.3 trained stably for
# every seed tried (0-9), each reaching >= 0.98 test accuracy; larger steps (lr >= 0.05, or damping
# <= 0.1 at lr 0.03) let some seeds spike or diverge. BD-KFAC preconditions AdamW (the BD-KFAC
# paper's setting) and keeps AdamW's weight decay; its lr comes from a sweep recorded in
# bench/results/bdkfac_digits_sweep.json.
DEFAULT_LR = {"sgd": 0.05, "adamw": 3e-3, "kfac": 0.02, "bdkfac": 1e-2}
DEFAULT_WEIGHT_DECAY = {"sgd": 0.0, "adamw": 1e-2, "kfac": 0.0, "bdkfac": 1e-2}
DEFAULT_MOMENTUM = 0.9
DEFAULT_DAMPING = 0.3
# SINGD family: lr (beta2) and lr_cov (beta1) from a sweep over lr in {0.02, 0.05, 0.1} x lr_cov
# in {3e-4, 1e-3, 3e-3, 1e-2} (bench/sweep_singd_digits.py, results in
# bench/results/singd_digits_sweep.json): lr_cov >= 3e-3 diverges for most settings, lr_cov 3e-4
# reached >= 0.977 test accuracy at every lr for seeds 0 and 1 (0.992-0.994 at lr 0.05). The same
# sweep for ingd and ikfac (bench/results/singd_digits_sweep_dense.json): lr_cov 3e-4 gave
# 0.989-0.997 at every lr; ikfac also tolerates lr_cov up to 1e-2 at lr <= 0.05, ingd does not.
DEFAULT_LR.update({name: 0.05 for name in SINGD_OPTIMIZERS})
DEFAULT_WEIGHT_DECAY.update({name: 0.0 for name in SINGD_OPTIMIZERS})
SINGD_DEFAULTS = {"lr_cov": 3e-4, "damping": 1e-3, "alpha1": 0.5, "T": 1, "block_size": 16}

# Per-task learning rates and dampings from bench/sweep_train.py: the same budget for every
# optimizer (300 steps, seeds 0 and 1; lr = its previous default x 1/3, 1, 3; damping 0.1 or 0.3
# for K-FAC and BD-KFAC), the best median final test metric winning, ties going to fewer steps
# to the task's target (results: bench/results/sweep_<task>.json). These are the defaults
# `--compare` runs; entries not listed fall back to DEFAULT_LR / DEFAULT_DAMPING.
TASK_DEFAULTS: dict[str, dict[str, dict[str, float]]] = {
    "digits": {"kfac": {"lr": 0.02 / 3, "damping": 0.1}, "bdkfac": {"lr": 0.01 / 3,
                                                                    "damping": 0.3}},
    # batch size 32. Winners at the top of their grid got one more lr (x3, the sweep file's
    # "extension"): AdamW 0.027 (worse than 0.009), K-FAC 0.18 (diverged at damping 0.1, worse
    # at 0.3), SGD 0.45 (worse), SINGD-diagonal 0.45 (2.8012 vs 2.8044: adopted, though within
    # the spread of the two seeds).
    "char-lm": {"sgd": {"lr": 0.15}, "adamw": {"lr": 0.009}, "kfac": {"lr": 0.06, "damping": 0.3},
                "bdkfac": {"lr": 0.01, "damping": 0.1}, "singd-diagonal": {"lr": 0.45}},
}


def default_lr(task: str, optimizer: str) -> float:
    return TASK_DEFAULTS.get(task, {}).get(optimizer, {}).get("lr", DEFAULT_LR[optimizer])


def default_damping(task: str, optimizer: str) -> float:
    return TASK_DEFAULTS.get(task, {}).get(optimizer, {}).get("damping", DEFAULT_DAMPING)
