"""Learning-rate sweep of the SINGD family on digits through ``kfac-train`` (fp32, 300 steps).

Run from the repository root: ``python bench/sweep_singd_digits.py OUT.json [OPTIMIZER ...]``.
Each setting is trained for seeds 0 and 1 (damping 1e-3, alpha1 0.5 (0 for ikfac), T 1, block
size 16, no weight decay) and its test accuracies are recorded; a diverged run counts as 0.
"""
import itertools
import json
import sys

import torch

from kfac_kernels.apps.train import build_parser, run

OPTIMIZERS = ("singd-diagonal", "singd-block-diagonal", "ingd", "ikfac")
LRS = (0.02, 0.05, 0.1)
LR_COVS = (3e-4, 1e-3, 3e-3, 1e-2)
SEEDS = (0, 1)


def main(out_path, optimizers=OPTIMIZERS, lrs=LRS, lr_covs=LR_COVS):
    rows = []
    for opt, lr, lr_cov in itertools.product(optimizers, lrs, lr_covs):
        accs = []
        for seed in SEEDS:
            args = build_parser().parse_args(
                ["--optimizer", opt, "--lr", str(lr), "--lr-cov", str(lr_cov), "--seed",
                 str(seed), "--no-progress", "--weight-decay", "0"])
            if opt == "ikfac":
                args.alpha1 = 0.0
            res = run(args)
            accs.append(res["test_accuracy"] if res["train_loss"] == res["train_loss"] else 0.0)
        rows.append({"optimizer": opt, "lr": lr, "lr_cov": lr_cov, "test_accuracy": accs})
        print(opt, lr, lr_cov, accs, flush=True)
    with open(out_path, "w") as f:
        json.dump({"steps": 300, "batch_size": 64, "damping": 1e-3, "seeds": SEEDS,
                   "torch": torch.__version__, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "bench/results/singd_digits_sweep.json",
         tuple(sys.argv[2:]) or OPTIMIZERS)
