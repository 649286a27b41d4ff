"""Step time of K-FAC, BD-KFAC and SINGD against AdamW's per factor / inverse period, on every
``kfac-train`` task (CPU, one thread): the sweep behind the library's amortised defaults.

Each (task, optimizer, period) is a model and optimizer built as ``kfac-train`` builds them; all
of a task's configurations run interleaved in this one process, round after round (so that a
change of load on a shared machine falls on all of them alike): per round every configuration
takes ``--steps`` timed training steps (forward, backward, optimizer step; CPU time of the
process, ``time.process_time``) after its warm-up, with denormal numbers flushed to zero as
``kfac-train`` trains. The result is the median over rounds of
each configuration's time per step divided by AdamW's in the same round. Besides the periods,
INGD (``--optimizer ingd``) at ``T = 1`` with its same-shape layers stacked (the default) and
one layer at a time (``--singd-per-layer``).

    python bench/sweep_amortisation.py                       # every task
    python bench/sweep_amortisation.py --tasks digits --rounds 3

Writes ``bench/results/amortisation_cpu.json``.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kfac_kernels.apps.bench import environment  # noqa: E402
from kfac_kernels.apps.defaults import default_lr  # noqa: E402
from kfac_kernels.apps.train import BatchSampler, _make_optimizer, build_parser  # noqa: E402
from kfac_kernels.apps.workloads import WORKLOADS  # noqa: E402

# (factor_update_steps, inv_update_steps) for K-FAC / BD-KFAC, T for SINGD.
KFAC_PERIODS = ((1, 10), (2, 20), (5, 50), (10, 100))
SINGD_PERIODS = (1, 2, 5, 10)


def configs() -> list[tuple[str, list[str]]]:
    out = [("adamw", ["--optimizer", "adamw"])]
    for f, i in KFAC_PERIODS:
        for opt in ("kfac", "bdkfac"):
            out.append((f"{opt} {f}/{i}", ["--optimizer", opt, "--factor-update-steps", str(f),
                                           "--inv-update-steps", str(i)]))
    for t in SINGD_PERIODS:
        out.append((f"singd-diagonal T={t}", ["--optimizer", "singd-diagonal", "--singd-T",
                                              str(t)]))
    # INGD at T=1: the same-shape layers stacked, and one at a time
    out.append(("ingd T=1", ["--optimizer", "ingd", "--singd-T", "1"]))
    out.append(("ingd T=1 per-layer", ["--optimizer", "ingd", "--singd-T", "1",
                                       "--singd-per-layer"]))
    return out


class Runner:
    """One configuration: its model, optimizer, data and batch order."""

    def __init__(self, task: str, argv: list[str], seed: int = 0):
        args = build_parser().parse_args(["--task", task, *argv])
        if args.lr is None:
            args.lr = default_lr(task, args.optimizer)
        if args.damping is None and args.optimizer in ("kfac", "bdkfac"):
            from kfac_kernels.apps.defaults import default_damping
            args.damping = default_damping(task, args.optimizer)
        from kfac_kernels.apps.defaults import DEFAULT_WEIGHT_DECAY
        if args.weight_decay is None:
            args.weight_decay = DEFAULT_WEIGHT_DECAY[args.optimizer]
        self.workload = WORKLOADS[task]
        self.data = self.workload.load(torch.float32, torch.device("cpu"))
        self.model = self.workload.build_model(seed, torch.float32, torch.device("cpu"),
                                               self.data)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.opt = _make_optimizer(args, self.model, self.workload)
        self.sampler = BatchSampler(self.data.train_size, args.batch_size, seed,
                                    torch.device("cpu"))

    def steps(self, n: int) -> float:
        """CPU seconds per step over ``n`` steps."""
        t0 = time.process_time()
        for _ in range(n):
            idx = self.sampler.next()
            x, y = self.workload.inputs(self.data.x_train, idx), self.data.y_train[idx]
            self.opt.zero_grad(set_to_none=True)
            self.workload.loss(self.model(x), y).backward()
            self.opt.step()
        return (time.process_time() - t0) / n


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tasks", nargs="+", default=list(WORKLOADS))
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=100,
                   help="timed steps per round (a multiple of every period)")
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" /
                                         "amortisation_cpu.json"))
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    torch.set_flush_denormal(True)   # as kfac-train trains (--denormals flush)
    results = []
    for task in args.tasks:
        runners = {name: Runner(task, cfg) for name, cfg in configs()}
        for r in runners.values():
            r.steps(30)   # untimed: first factors, caches, and bdkfac's inverse warm-up (20 steps)
        ratios: dict[str, list[float]] = {name: [] for name in runners}
        per_step: dict[str, list[float]] = {name: [] for name in runners}
        for _ in range(args.rounds):
            times = {name: r.steps(args.steps) for name, r in runners.items()}
            for name, t in times.items():
                ratios[name].append(t / times["adamw"])
                per_step[name].append(t)
        for name in runners:
            row = {"task": task, "config": name,
                   "cpu_ms_per_step": 1e3 * statistics.median(per_step[name]),
                   "vs_adamw": statistics.median(ratios[name]),
                   "vs_adamw_rounds": ratios[name]}
            results.append(row)
            print(json.dumps(row), flush=True)
    env = environment(torch.device("cpu"))
    env["shared_machine"] = True
    Path(args.out).write_text(json.dumps({
        "command": "python bench/sweep_amortisation.py " + " ".join(argv or sys.argv[1:]),
        "environment": env, "threads": 1, "denormals": "flush", "steps_per_round": args.steps,
        "rounds": args.rounds, "results": results}, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
