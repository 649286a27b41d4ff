"""Every SINGD variant through ``kfac-train`` on digits with its defaults: test accuracy after
300 steps in float32 and bfloat16, and a 2000-step bfloat16 run checked for NaN/inf.

Run from the repository root: ``python -m bench.singd_digits_runs [OUT.json]``.
"""
import json
import math
import sys

import torch

from kfac_kernels.apps.defaults import DEFAULT_LR, SINGD_DEFAULTS, SINGD_OPTIMIZERS
from kfac_kernels.apps.train import build_parser, run


def one(opt, dtype, steps):
    args = build_parser().parse_args(["--optimizer", opt, "--dtype", dtype, "--steps",
                                      str(steps), "--no-progress"])
    args.lr = DEFAULT_LR[opt]
    args.weight_decay = 0.0
    r = run(args)
    finite = all(math.isfinite(h["train_batch_loss"]) for h in r["history"]) and math.isfinite(
        r["train_loss"])
    return {"optimizer": opt, "dtype": dtype, "steps": steps, "test_accuracy": r["test_accuracy"],
            "train_loss": r["train_loss"], "all_losses_finite": finite,
            "wall_time_s": r["wall_time_s"]}


def main(out_path):
    rows = []
    for opt in SINGD_OPTIMIZERS:
        for dtype, steps in (("float32", 300), ("bfloat16", 300), ("bfloat16", 2000)):
            row = one(opt, dtype, steps)
            rows.append(row)
            print(row, flush=True)
            with open(out_path, "w", encoding="utf-8") as f:
                json.dump({"defaults": {"lr": {o: DEFAULT_LR[o] for o in SINGD_OPTIMIZERS},
                                        **SINGD_DEFAULTS}, "seed": 0, "batch_size": 64,
                           "torch": torch.__version__, "rows": rows}, f, indent=1)
                f.write("\n")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "bench/results/singd_digits_runs.json")
