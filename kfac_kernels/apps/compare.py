"""``kfac-train --compare a,b,c``: several optimizers, the same seeds and data order.

Every (optimizer, seed) run is a fresh ``kfac-train`` process (so its peak memory is its own)
with the same task, steps, batch size and evaluation schedule; an optimizer not given ``--lr``
etc. uses its defaults. Runs are interleaved (for each seed, every optimizer in turn), so that a
change of load on a shared machine falls on all of them alike. With ``--lr-grid`` every optimizer
that has a learning rate runs at its default times each of :data:`~.defaults.LR_GRID` (the same
tuning budget for all), and the table keeps, per optimizer, the learning rate with the fewest
median steps to the target (then the least CPU time); ``--json`` has every point.

The table reports, per optimizer, medians over the seeds: steps, training CPU time (the
process's, one thread) and wall time to the target metric (runs that never reach it count as not
reached), the final train loss and test metric, CPU time per step, the peak resident-set growth
of the process during training and the optimizer's state. ``--plot`` draws loss and test metric
against steps and against training time (mean over seeds).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

from .defaults import ADAPTIVE_OPTIMIZERS, LR_GRID, OPTIMIZERS, OPTION_USERS, default_lr

# Options that are forwarded to every run unless they are at their parser default.
_FORWARD = ("task", "steps", "batch_size", "lr", "momentum", "weight_decay", "device", "threads",
            "denormals",
            "dtype", "damping", "kfac_approx", "damping_form", "factor_decay",
            "factor_update_steps", "inv_update_steps", "inv_warmup_steps", "kl_clip",
            "num_blocks", "backend",
            "fisher", "absolute_damping", "lr_cov", "singd_damping", "alpha1", "singd_T",
            "block_size", "no_warm_start", "target", "eval_every", "log_every", "schedule",
            "warmup", "stop_at_target")
_FLAGS = {"absolute_damping", "no_warm_start", "stop_at_target"}


def _flag(dest: str) -> str:
    return "--" + dest.replace("_", "-")


def _run_args(parser: argparse.ArgumentParser, args: argparse.Namespace, optimizer: str,
              seed: int, out: str, lr: float | None = None) -> list[str]:
    argv = ["--optimizer", optimizer, "--seed", str(seed), "--json", out]
    if lr is not None:
        argv += ["--lr", repr(lr)]
    for dest in _FORWARD:
        value = getattr(args, dest)
        if value == parser.get_default(dest):
            continue
        if dest in OPTION_USERS and optimizer not in OPTION_USERS[dest][0]:
            continue
        if dest == "lr" and (lr is not None or optimizer in ADAPTIVE_OPTIMIZERS):
            continue
        if dest in _FLAGS:
            argv.append(_flag(dest))
            continue
        if dest == "target":
            value = f"{value[0]}={value[1]}"
        argv += [_flag(dest), str(value)]
    if args.no_progress:
        argv.append("--no-progress")
    return argv


def _median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def _median_reached(values):
    """The median with runs that did not reach the target (``None``) counted as infinite;
    ``None`` if that median is infinite."""
    med = statistics.median([float("inf") if v is None else v for v in values])
    return None if med == float("inf") else med


def summarise(runs: dict[str, list[dict]]) -> list[dict]:
    rows = []
    for key, results in runs.items():
        reached = [r["target"]["reached_at_step"] for r in results]
        cpu = [r["target"].get("reached_after_cpu_s") for r in results]
        rows.append({
            "optimizer": results[0]["optimizer"],
            "config": key,
            "seeds": [r["seed"] for r in results],
            "lr": results[0]["lr"],
            "target": results[0]["target"]["metric"] + "=" + f"{results[0]['target']['value']:g}",
            "reached": sum(s is not None for s in reached),
            "median_steps_to_target": _median_reached(reached),
            "median_time_to_target_s": _median_reached(
                [r["target"]["reached_after_s"] for r in results]),
            "median_cpu_to_target_s": _median_reached(cpu),
            "cpu_to_target_s": cpu,
            "median_cpu_s_per_step": _median([r.get("cpu_s_per_step") for r in results]),
            "steps_to_target": reached,
            "median_train_loss": _median([r["train_loss"] for r in results]),
            "median_test_loss": _median([r["test_loss"] for r in results]),
            "median_test_accuracy": _median([r["test_accuracy"] for r in results]),
            "median_steps_per_s": _median([r["steps_per_s"] for r in results]),
            "median_peak_rss_growth_bytes": _median([r["peak_rss_growth_bytes"] for r in results]),
            "optimizer_state_bytes": results[0]["optimizer_state_bytes"],
        })
    return rows


def best_rows(rows: list[dict]) -> list[dict]:
    """Per optimizer, the row (learning rate) with the fewest median steps to the target, then
    the least median CPU time to it, then the best final test loss."""
    best: dict[str, dict] = {}
    inf = float("inf")
    for r in rows:
        key = (r["median_steps_to_target"] if r["median_steps_to_target"] is not None else inf,
               r["median_cpu_to_target_s"] if r["median_cpu_to_target_s"] is not None else inf,
               r["median_test_loss"] if r["median_test_loss"] == r["median_test_loss"] else inf)
        cur = best.get(r["optimizer"])
        if cur is None or key < cur[0]:
            best[r["optimizer"]] = (key, r)
    return [r for _, r in best.values()]


def table(rows: list[dict]) -> str:
    head = ("optimizer", "lr", "target reached", "steps to target", "CPU time to target",
            "train loss", "test loss", "test acc", "CPU ms/step", "peak RSS +", "state")
    lines = [" | ".join(head), " | ".join("---" for _ in head)]
    for r in rows:
        steps = "-" if r["median_steps_to_target"] is None else f"{r['median_steps_to_target']:g}"
        secs = ("-" if r["median_cpu_to_target_s"] is None
                else f"{r['median_cpu_to_target_s']:.2f} s")
        lines.append(" | ".join([
            r["optimizer"], "adaptive" if r["lr"] is None else f"{r['lr']:.3g}",
            f"{r['reached']}/{len(r['seeds'])}", steps, secs,
            f"{r['median_train_loss']:.4f}", f"{r['median_test_loss']:.4f}",
            f"{r['median_test_accuracy']:.4f}", f"{1e3 * r['median_cpu_s_per_step']:.1f}",
            f"{r['median_peak_rss_growth_bytes'] / 2**20:.1f} MiB",
            f"{r['optimizer_state_bytes'] / 2**20:.2f} MiB"]))
    return "\n".join(lines)


def figure(runs: dict[str, list[dict]], title: str):
    """The comparison figure: training loss (top) and the target's metric (bottom) against
    steps (left) and training time (right), each curve the mean over the seeds at every logged
    step, the target a dashed line. Returns the matplotlib figure."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5))
    first = next(iter(runs.values()))[0]["target"]
    metric, value = first["metric"], first["value"]
    seeds = max(len(results) for results in runs.values())
    over = f"mean over {seeds} seed{'s' if seeds != 1 else ''}"
    for optimizer, results in runs.items():
        hist = [r["history"] for r in results]
        steps = [h["step"] for h in hist[0]]
        loss = [statistics.fmean(h[i]["train_batch_loss"] for h in hist) for i in range(len(steps))]
        time_ = [statistics.fmean(h[i]["elapsed_s"] for h in hist) for i in range(len(steps))]
        evals = [r["evaluations"] for r in results]
        e_steps = [e["step"] for e in evals[0]]
        e_val = [statistics.fmean(e[i][metric] for e in evals) for i in range(len(e_steps))]
        e_time = [statistics.fmean(e[i]["elapsed_s"] for e in evals) for i in range(len(e_steps))]
        axes[0, 0].plot(steps, loss, label=optimizer)
        axes[0, 1].plot(time_, loss, label=optimizer)
        axes[1, 0].plot(e_steps, e_val, label=optimizer)
        axes[1, 1].plot(e_time, e_val, label=optimizer)
    for ax in axes[0]:
        ax.set_yscale("log")
        ax.set_ylabel(f"training loss (mini-batch; {over})")
    for ax in axes[1]:
        ax.set_ylabel(f"{metric.replace('_', ' ')} ({over})")
        ax.axhline(value, color="0.3", linestyle="--", linewidth=1,
                   label=f"target {metric} = {value:g}")
    for ax in axes[:, 0]:
        ax.set_xlabel("step")
    for ax in axes[:, 1]:
        ax.set_xlabel("training time (s)")
    axes[0, 0].legend()
    axes[1, 0].legend()
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def plot(runs: dict[str, list[dict]], path: str, title: str) -> None:
    """Save :func:`figure` to ``path``."""
    import matplotlib.pyplot as plt

    fig = figure(runs, title)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def compare_main(parser: argparse.ArgumentParser, args: argparse.Namespace, argv) -> int:
    optimizers = [o.strip() for o in args.compare.split(",") if o.strip()]
    unknown = [o for o in optimizers if o not in OPTIMIZERS]
    if not optimizers or unknown:
        parser.error(f"--compare: unknown optimizer(s) {unknown}; choose from "
                     f"{', '.join(OPTIMIZERS)}")
    try:
        seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else [args.seed]
    except ValueError:
        parser.error(f"--seeds: expected comma-separated integers, got {args.seeds!r}")
    if args.plot is not None:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            parser.error("--plot needs matplotlib (pip install matplotlib)")
        folder = os.path.dirname(os.path.abspath(args.plot))
        if not os.path.isdir(folder):
            parser.error(f"--plot {args.plot}: the folder {folder} does not exist")
    configs = []
    for optimizer in optimizers:
        if args.lr_grid and optimizer not in ADAPTIVE_OPTIMIZERS:
            centre = args.lr if args.lr is not None else default_lr(args.task, optimizer)
            configs += [(f"{optimizer}@{centre * m:.4g}", optimizer, centre * m) for m in LR_GRID]
        else:
            configs.append((optimizer, optimizer, None))
    runs: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for seed in seeds:                      # interleaved: every optimizer once per seed
            for key, optimizer, lr in configs:
                out = os.path.join(tmp, f"{key}-{seed}.json")
                cmd = [sys.executable, "-m", "kfac_kernels.apps.train",
                       *_run_args(parser, args, optimizer, seed, out, lr)]
                proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
                if proc.returncode != 0:
                    print(proc.stdout, file=sys.stderr)
                    print(f"kfac-train --compare: the run of {key} (seed {seed}) failed "
                          f"with exit status {proc.returncode}", file=sys.stderr)
                    return proc.returncode
                with open(out, encoding="utf-8") as fh:
                    runs.setdefault(key, []).append(json.load(fh))
                if args.progress_log:
                    r = runs[key][-1]
                    print(f"{key} seed {seed}: target at {r['target']['reached_at_step']} "
                          f"({r['target']['reached_after_cpu_s']} s CPU), final test loss "
                          f"{r['test_loss']:.4f}", file=sys.stderr, flush=True)
    all_rows = summarise(runs)
    rows = best_rows(all_rows) if args.lr_grid else all_rows
    first = next(iter(runs.values()))[0]
    print(f"task {first['task']}, {first['steps']} steps, batch size {first['batch_size']}, "
          f"seeds {seeds}, device {first['device']}, dtype {first['dtype']} (medians over seeds"
          + ("; per optimizer the best of its learning-rate grid" if args.lr_grid else "") + ")")
    print(table(rows))
    if args.plot is not None:
        plot(runs, args.plot, f"{first['task']}: {', '.join(optimizers)} (mean over seeds "
                              f"{seeds})")
        print(f"wrote {args.plot}")
    if args.json is not None:
        import torch

        from .bench import environment
        env = environment(torch.device(args.device))
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump({"command": "kfac-train " + " ".join(argv if argv is not None
                                                           else sys.argv[1:]),
                       "device_name": env["device_name"], "date": env["date"],
                       "environment": env, "lr_grid": list(LR_GRID) if args.lr_grid else None,
                       "summary": rows, "grid": all_rows, "runs": runs}, fh, indent=1)
            fh.write("\n")
        print(f"wrote {args.json}")
    return 0
