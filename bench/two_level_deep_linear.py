"""Tselepidis et al. (2020) App. B.1 at the paper's size: one-level against two-level K-FAC on the batch-normalised
deep linear MLP with planted targets (python/deep_linear_two_level.py: 64 hidden layers of
width 10, 25 000 samples, batch 512, 20 epochs), over 10 seeds: the paper's setting (one binary
target, bias-free layers, binary cross-entropy, true Fisher by label sampling, coarse damping =
fine damping 1e-2), the same with the empirical Fisher, with a coarse damping of 0.1, with
PyTorch's default initialisation, and, over 3 seeds, the wider variants with 10 outputs and
biases (10 binary targets with MSE or BCE, or 10 classes with cross-entropy). The training loss
is the objective on the whole training set in training mode after every epoch. Runs that share
their one-level settings share its run.

Run from the repository root (about 15 minutes with 2 processes)::

    python -m bench.two_level_deep_linear [--jobs 2] [--out bench/results/two_level_deep_linear.json]
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import sys
import warnings
from datetime import datetime, timezone
from pathlib import Path

import torch

from bench.conftest import environment_info

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "python"))
from deep_linear_two_level import train  # noqa: E402

PAPER = dict(depth=64, width=10, outputs=1, bias=False, loss="bce", fisher="mc", n_train=25000,
             batch=512, epochs=20, lr=1e-3, init="kaiming-relu", coarse_damping=None)
SEEDS10, SEEDS3 = list(range(10)), [0, 1, 2]
CONFIGS = [  # (name, changes to PAPER, seeds)
    ("paper", {}, SEEDS10),
    ("empirical Fisher", {"fisher": "empirical"}, SEEDS10),
    ("coarse damping 0.1", {"coarse_damping": 0.1}, SEEDS10),
    ("PyTorch default init", {"init": "default"}, SEEDS10),
    ("10 binary targets, biases, MSE", {"outputs": 10, "bias": True, "loss": "mse"}, SEEDS3),
    ("10 binary targets, biases, BCE", {"outputs": 10, "bias": True, "loss": "bce"}, SEEDS3),
    ("10 classes, biases, cross-entropy", {"outputs": 10, "bias": True, "loss": "ce"}, SEEDS3),
]
# With binary cross-entropy, a training loss this close to log 2 (the loss of a constant logit 0)
# means a collapsed network.
COLLAPSED = 0.65


def _run(job):
    two_level, settings, seed = job
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    return train(two_level, seed=seed, **settings)


def _key(two_level: bool, settings: dict, seed: int):
    s = dict(settings)
    if not two_level:
        s.pop("coarse_damping")  # one-level K-FAC does not have one
    return (two_level, tuple(sorted(s.items())), seed)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="bench/results/two_level_deep_linear.json")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--configs", nargs="+", default=None, help="names of CONFIGS to run")
    args = parser.parse_args()
    configs = [c for c in CONFIGS if args.configs is None or c[0] in args.configs]
    jobs = {}
    for _, change, seeds in configs:
        settings = {**PAPER, **change}
        for seed in seeds:
            for two in (False, True):
                jobs.setdefault(_key(two, settings, seed), (two, settings, seed))
    keys = list(jobs)
    with multiprocessing.get_context("spawn").Pool(args.jobs) as pool:
        curves = dict(zip(keys, pool.map(_run, [jobs[k] for k in keys], chunksize=1)))
    env = environment_info("cpu")
    env["cpu_threads"] = 1
    env["date"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    results = []
    for name, change, seeds in configs:
        settings = {**PAPER, **change}
        for seed in seeds:
            one = curves[_key(False, settings, seed)]
            two = curves[_key(True, settings, seed)]
            results.append({"config": name, "seed": seed, "one_level": one, "two_level": two,
                            "two_level_ahead_at_end": two[-1] < one[-1],
                            "two_level_collapsed": (two[-1] > COLLAPSED
                                                    if settings["loss"] == "bce" else None)})
            print(f"{name} seed {seed}: final training loss one-level {one[-1]:.4f}, "
                  f"two-level {two[-1]:.4f}", flush=True)
    Path(args.out).write_text(json.dumps({
        "experiment": __doc__.split("\n\n")[0].replace("\n", " "),
        "command": "python -m bench.two_level_deep_linear",
        "settings": {**PAPER, "coarse_damping": 1e-2, "fine_damping": 1e-2, "kl_clip": 1e-3,
                     "factor_update_steps": 10, "inv_update_steps": 100,
                     "base": "SGD(momentum 0.9, weight decay 1e-3)",
                     "collapsed_if_final_loss_above": COLLAPSED},
        "configs": [{"name": n, "changes": c, "seeds": s} for n, c, s in configs],
        "environment": env, "results": results}, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
