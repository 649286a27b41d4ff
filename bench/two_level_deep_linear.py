"""Seed 004 App. B.1 at the paper's size: one-level against two-level K-FAC on the 64-layer
batch-normalised deep linear MLP with planted targets (python/deep_linear_two_level.py), for
the paper's coarse damping (1e-2, the fine damping) and larger ones, with mean-squared error,
with binary cross-entropy on the logits and with cross-entropy on the teacher's argmax class.
8192 training samples, batch 512, 300 steps, seeds 0-2; the training loss is the objective on
the whole training set in training mode, logged every 25 steps. One-level K-FAC does not
depend on the coarse damping, so it runs once per seed and loss.

Run from the repository root (about 10 minutes on one CPU thread)::

    python -m bench.two_level_deep_linear [--out bench/results/two_level_deep_linear.json]
"""
from __future__ import annotations

import argparse
import json
import sys
import warnings
from datetime import datetime, timezone
from pathlib import Path

import torch

from bench.conftest import environment_info

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "python"))
from deep_linear_two_level import train  # noqa: E402

SETTINGS = dict(depth=64, width=10, steps=300, n_train=8192, batch=512, lr=1e-3, log_every=25)
CONFIGS = [("mse", [None, 0.1, 0.3, 1.0]), ("bce", [None]), ("ce", [None])]  # None: the fine damping, 1e-2


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="bench/results/two_level_deep_linear.json")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = parser.parse_args()
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    env = environment_info("cpu")
    env["cpu_threads"] = 1
    env["date"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    results = []
    for loss, dampings in CONFIGS:
        one = {s: train(False, seed=s, loss=loss, **SETTINGS) for s in args.seeds}
        for damping in dampings:
            for s in args.seeds:
                two = train(True, seed=s, loss=loss, coarse_damping=damping, **SETTINGS)
                row = {"loss": loss, "coarse_damping": 1e-2 if damping is None else damping,
                       "seed": s, "one_level": one[s], "two_level": two,
                       "two_level_ahead_at_end": two[-1] < one[s][-1]}
                results.append(row)
                print(f"{loss} coarse damping {row['coarse_damping']:g} seed {s}: one-level "
                      f"{one[s][-1]:.4f}, two-level {two[-1]:.4f}", flush=True)
    Path(args.out).write_text(json.dumps({
        "experiment": __doc__.split("\n\n")[0].replace("\n", " "),
        "command": "python -m bench.two_level_deep_linear",
        "settings": {**SETTINGS, "seeds": args.seeds, "fine_damping": 1e-2, "kl_clip": 1e-3,
                     "factor_update_steps": 10, "inv_update_steps": 100,
                     "base": "SGD(momentum 0.9, weight decay 1e-3)"},
        "environment": env, "results": results}, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
