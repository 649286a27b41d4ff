"""A small, equal-budget sweep of learning rate (and damping for K-FAC / BD-KFAC) per optimizer
and task, to pick the defaults that ``kfac-train --compare`` runs.

Every optimizer gets the same steps, batch size, seeds and evaluation schedule, and three
learning rates (its current default times 1/3, 1 and 3); K-FAC and BD-KFAC also two dampings.
The best setting is the one with the best median final test metric over the seeds (test accuracy
for classification, test loss for the language model), ties broken by the median steps to the
task's target. Writes ``bench/results/sweep_<task>.json``.

    python bench/sweep_train.py --task digits --seeds 0 1
    python bench/sweep_train.py --task char-lm --steps 300
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import statistics
import sys
import tempfile
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kfac_kernels.apps.defaults import DEFAULT_LR  # noqa: E402
from kfac_kernels.apps.train import main as train_main  # noqa: E402
from kfac_kernels.apps.workloads import WORKLOADS  # noqa: E402

OPTIMIZERS = ("sgd", "adamw", "kfac", "bdkfac", "singd-diagonal")
DAMPINGS = {"kfac": (0.1, 0.3), "bdkfac": (0.1, 0.3)}


def run_one(task, optimizer, lr, damping, seed, steps, batch, eval_every, tmp) -> dict:
    out = Path(tmp) / "run.json"
    argv = ["--task", task, "--optimizer", optimizer, "--lr", f"{lr:.6g}", "--seed", str(seed),
            "--steps", str(steps), "--batch-size", str(batch), "--eval-every", str(eval_every),
            "--no-progress", "--json", str(out)]
    if damping is not None:
        argv += ["--damping", str(damping)]
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        train_main(argv)
    return json.loads(out.read_text())


def summarise(runs: list[dict], metric: str) -> dict:
    """The seeds' final metric (a diverged run, NaN, ranks last), its median and the steps to
    the task's target."""
    values = [r[metric] for r in runs]
    values = [v if v == v else (0.0 if metric == "test_accuracy" else 1e9) for v in values]
    return {metric: values, "median_" + metric: statistics.median(values),
            "steps_to_target": [r["target"]["reached_at_step"] for r in runs]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--task", choices=tuple(WORKLOADS), default="digits")
    p.add_argument("--optimizers", nargs="+", default=list(OPTIMIZERS))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--eval-every", type=int, default=10)
    p.add_argument("--out", default=None)
    p.add_argument("--extend", nargs="+", default=None, metavar="OPTIMIZER:LR[:DAMPING]",
                   help="run only these points and add them to the existing results file's "
                        "'extension' list (for winners at the edge of their grid)")
    p.add_argument("--why", default="", help="the reason recorded with --extend")
    args = p.parse_args(argv)
    if args.extend:
        return extend(args)
    workload = WORKLOADS[args.task]
    metric = "test_accuracy" if workload.target[0] == "test_accuracy" else "test_loss"
    better = (lambda a, b: a > b) if metric == "test_accuracy" else (lambda a, b: a < b)
    records, best = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for optimizer in args.optimizers:
            base = DEFAULT_LR[optimizer]
            for lr in (base / 3, base, base * 3):
                for damping in DAMPINGS.get(optimizer, (None,)):
                    runs = [run_one(args.task, optimizer, lr, damping, s, args.steps,
                                    args.batch_size, args.eval_every, tmp) for s in args.seeds]
                    rec = {"optimizer": optimizer, "lr": lr, "damping": damping,
                           **summarise(runs, metric),
                           "median_steps_to_target": statistics.median(
                               [s if s is not None else args.steps + 1
                                for s in (r["target"]["reached_at_step"] for r in runs)]),
                           "wall_time_s": [r["wall_time_s"] for r in runs]}
                    records.append(rec)
                    print(json.dumps(rec), flush=True)
                    cur = best.get(optimizer)
                    key = (rec["median_" + metric], -rec["median_steps_to_target"])
                    if cur is None or better(key[0], cur[0][0]) or (
                            key[0] == cur[0][0] and key[1] > cur[0][1]):
                        best[optimizer] = (key, rec)
    out = {"task": args.task, "metric": metric, "target": list(workload.target),
           "steps": args.steps, "batch_size": args.batch_size, "seeds": args.seeds,
           "eval_every": args.eval_every,
           "best": {o: {"lr": r["lr"], "damping": r["damping"]} for o, (_, r) in best.items()},
           "runs": records}
    path = Path(args.out or Path(__file__).resolve().parent / "results" / f"sweep_{args.task}.json")
    path.write_text(json.dumps(out, indent=1) + "\n")
    print(f"best: {out['best']}\nwrote {path}")
    return 0


def extend(args) -> int:
    """Run extra grid points with the settings of the existing sweep file and record them."""
    path = Path(args.out or Path(__file__).resolve().parent / "results" / f"sweep_{args.task}.json")
    data = json.loads(path.read_text())
    metric = data["metric"]
    ext = data.get("extension", [])
    ext = ext if isinstance(ext, list) else [ext]
    with tempfile.TemporaryDirectory() as tmp:
        for point in args.extend:
            optimizer, lr, *rest = point.split(":")
            damping = float(rest[0]) if rest else None
            runs = [run_one(data["task"], optimizer, float(lr), damping, s, data["steps"],
                            data["batch_size"], data["eval_every"], tmp) for s in data["seeds"]]
            rec = {"why": args.why, "optimizer": optimizer, "lr": float(lr), "damping": damping,
                   **summarise(runs, metric)}
            ext.append(rec)
            print(json.dumps(rec), flush=True)
    data["extension"] = ext
    path.write_text(json.dumps(data, indent=1) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
