"""Which algorithm the cpu backend of ``patch_covariance`` should run where: the im2col-free
kernel, chunked unfolding + BLAS, and (stride-1 expand factors) the shifted correlations, timed
on a grid of convolution shapes.

For every shape (batch ``N``, channels ``C``, square input ``H x H``, kernel ``k``, padding
``k // 2``; stride 1, and stride 2 for 3x3 expand factors) and mode, ``algorithm="implicit"``, ``"chunked"`` and, where it applies,
``"shifted"`` are checked against each other and timed alternately in one process, one thread,
CPU time (``time.process_time``), ``--rounds`` times; the record keeps the medians, the spread
(max / min over the rounds) and whether the rule of
:func:`kfac_kernels.ops.patch_covariance.cpu_algorithm` picks the fastest. The summary lists the
shapes where the rule's choice is slower than the fastest algorithm by more than 5 %.

    python bench/patch_covariance_crossover.py [--rounds 3] [--quick]
        [--json bench/results/patch_covariance_crossover_cpu.json]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

if __name__ == "__main__":  # script mode: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from bench.conftest import environment_info
from kfac_kernels import ops
from kfac_kernels.ops.patch_covariance import Segments, conv_geometry, cpu_algorithm

GRID_C = (16, 32, 64, 128, 256, 512, 1024)
GRID_HW = (4, 7, 8, 14, 16, 28, 32, 56)
QUICK_C = (16, 32, 64, 128, 256, 512)
QUICK_HW = (4, 7, 8, 14, 16, 32)
MAX_UNFOLD_BYTES = 320 << 20


def _time(fn, x, kwargs) -> float:
    t0 = time.process_time()
    fn(x, **kwargs)
    return time.process_time() - t0


def measure(n: int, c: int, hw: int, k: int, mode: str, rounds: int, gen,
            stride: int = 1) -> dict:
    x = torch.randn(n, c, hw, hw, generator=gen)
    kwargs = dict(kernel_size=k, stride=stride, padding=k // 2, mode=mode, backend="cpu")
    algorithms = ["implicit", "chunked"] + (
        ["shifted"] if mode == "expand" and k > 1 and stride == 1 else [])
    implicit = ops.patch_covariance(x, algorithm="implicit", **kwargs)
    rel = max(float((ops.patch_covariance(x, algorithm=a, **kwargs) - implicit).abs().max()
                    / implicit.abs().max()) for a in algorithms[1:])
    times = {a: [] for a in algorithms}
    for _ in range(rounds):
        for algo in times:
            times[algo].append(_time(ops.patch_covariance, x, dict(kwargs, algorithm=algo)))
    geom = conv_geometry((hw, hw), k, stride, k // 2)
    seg = Segments(1, 0, c, c, False)
    med = {a: statistics.median(t) for a, t in times.items()}
    d = c * k * k
    rows = n if mode == "reduce" else n * geom.positions
    fastest = min(med, key=med.get)
    chosen = cpu_algorithm(n, geom, seg, mode == "reduce")
    return {"case": f"N{n}-C{c}-{hw}x{hw}-k{k}" + (f"-s{stride}" if stride > 1 else "")
            + f"-{mode}", "n": n, "c": c, "hw": hw, "kernel": k, "stride": stride,
            "mode": mode, "d": d, "rows": rows, "rows_per_d": rows / d,
            "rel_diff": rel,
            **{f"{a}_median_s": m for a, m in med.items()},
            **{f"{a}_spread": max(t) / max(min(t), 1e-9) for a, t in times.items()},
            **{f"{a}_speedup": med["implicit"] / med[a] for a in algorithms[1:]},
            "fastest": fastest, "rule_chooses": chosen,
            "rule_loss": med[chosen] / med[fastest] - 1.0}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--quick", action="store_true", help="a smaller grid")
    p.add_argument("--json", default="bench/results/patch_covariance_crossover_cpu.json")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    env = environment_info("cpu")
    env["loadavg_1m_start"] = os.getloadavg()[0]
    env["shared_machine"] = True
    gen = torch.Generator().manual_seed(0)
    grid_c, grid_hw = (QUICK_C, QUICK_HW) if args.quick else (GRID_C, GRID_HW)
    results = []
    for k, stride, modes in ((3, 1, ("expand", "reduce")), (1, 1, ("expand", "reduce")),
                             (3, 2, ("expand",))):
        for c in grid_c:
            for hw in grid_hw:
                if args.batch * c * k * k * hw * hw * 4 > MAX_UNFOLD_BYTES * stride * stride:
                    continue
                for mode in modes:
                    r = measure(args.batch, c, hw, k, mode, args.rounds, gen, stride)
                    results.append(r)
                    times = " ".join(f"{a} {r[a + '_median_s']:.4f}s" for a in
                                     ("implicit", "chunked", "shifted") if a + "_median_s" in r)
                    print(f"{r['case']:>28} rows/D {r['rows_per_d']:8.2f} {times} fastest "
                          f"{r['fastest']} rule {r['rule_chooses']}", flush=True)
    env["loadavg_1m_end"] = os.getloadavg()[0]
    misses = [r["case"] for r in results if r["rule_loss"] > 0.05]
    out = {"benchmark": "patch_covariance_crossover", "environment": env,
           "method": "one thread, time.process_time, algorithms alternated in one process, "
                     f"median of {args.rounds} rounds; batch {args.batch}, padding k // 2; "
                     "stride 1 (3x3 and 1x1, expand and reduce) and 2 (3x3 expand: the "
                     "downsampling convolutions)",
           "rule": "shifted for stride-1 expand factors with a flop ratio <= "
                   "SHIFTED_MAX_FLOP_RATIO that save >= SHIFTED_MIN_SAVED_MACS multiply-adds; "
                   "else implicit (cpu_algorithm)",
           "rule_misses_over_5_percent": misses, "results": results}
    Path(args.json).write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {args.json}; rule slower than the best by > 5 % at {len(misses)} of "
          f"{len(results)} shapes: {misses}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
