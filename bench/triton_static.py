"""Compile every Triton kernel ahead of time for sm_80 and sm_90 (no GPU needed) and record what
ptxas reports per configuration: registers, spills, stack frame and shared memory.

    python bench/triton_static.py --write          # all configurations, both archs, results
                                                   # into bench/results/static_sm{80,90}.json
    python bench/triton_static.py --check --fast   # the representative subset, exit 1 on a
                                                   # compile error or a spill over the budget

The configurations are those the launchers can pick (``kfac_kernels._triton._aot``: each kernel
module's ``launch_configs()``). Run it without ``TRITON_INTERPRET`` (it unsets it): the
interpreter and the compiler do not mix in one process. Every compilation runs ptxas afresh
(``TRITON_ALWAYS_COMPILE``), in ``--jobs`` processes.

Spill budget: ``SPILL_BUDGET_BYTES`` (64) bytes of spill stores per thread. A configuration over
it was dropped from what the launchers pick or fixed (smaller row steps, eight warps at 64 x 64
tiles, a 32-wide limit on the SINGD block kernels: see the kernels' modules): a tile kernel that
spills kilobytes runs at a fraction of its speed and takes minutes to compile. Below it are a
few words that ptxas's heuristics leave in some small kernels (12-16 bytes in the first-step
variant of ``singd_diagonal_step`` at 64 registers), which cost nothing measurable.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import re
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
ARCHS = (80, 90)
SPILL_BUDGET_BYTES = 64

_PTXAS = {
    "registers": re.compile(r"Used (\d+) registers"),
    "stack_frame_bytes": re.compile(r"(\d+) bytes stack frame"),
    "spill_store_bytes": re.compile(r"(\d+) bytes spill stores"),
    "spill_load_bytes": re.compile(r"(\d+) bytes spill loads"),
}


def _configs():
    from kfac_kernels._triton import _aot

    return _aot.all_configs()


def fast_subset(configs) -> list[int]:
    """A representative subset: per kernel the configuration with the largest tiles (the most
    register pressure; the first listed, fp32, among equals)."""
    best = {}
    for i, cfg in enumerate(configs):
        tiles = sum(v for v in cfg.constexprs.values()
                    if isinstance(v, int) and not isinstance(v, bool))
        if cfg.name not in best or tiles > best[cfg.name][0]:
            best[cfg.name] = (tiles, i)
    return sorted(i for _, i in best.values())


def _compile(job: tuple[int, int]) -> dict:
    """Compile configuration ``index`` for ``arch``; ptxas's report, or the error."""
    index, arch = job
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    cfg = _configs()[index]
    knobs.nvidia.dump_ptxas_log = True
    log = io.StringIO()
    start = time.perf_counter()
    row = {"kernel": cfg.name, "config": cfg.key(), "num_warps": cfg.num_warps,
           "arch": f"sm_{arch}"}
    try:
        with contextlib.redirect_stdout(log):
            compiled = triton.compile(
                ASTSource(fn=cfg.kernel, signature=cfg.signature(),
                          constexprs=cfg.all_constexprs(), attrs=cfg.attrs()),
                target=GPUTarget("cuda", arch, 32), options=cfg.options())
    except Exception as exc:  # reported, not raised: the run goes on to the other configs
        row["error"] = f"{type(exc).__name__}: {exc}"[-2000:]
        return row
    text = log.getvalue()
    for key, pattern in _PTXAS.items():
        found = pattern.search(text)
        row[key] = int(found.group(1)) if found else None
    row["shared_bytes"] = int(compiled.metadata.shared)
    row["has_cubin"] = bool(compiled.asm.get("cubin"))
    row["compile_s"] = round(time.perf_counter() - start, 2)
    return row


def run(indices, archs, jobs: int) -> list[dict]:
    work = [(i, a) for a in archs for i in indices]
    if jobs <= 1:
        return [_compile(w) for w in work]
    with ProcessPoolExecutor(max_workers=jobs) as pool:
        return list(pool.map(_compile, work))


def problems(rows) -> list[str]:
    """Compile errors, missing reports, and spills over the budget."""
    out = []
    for r in rows:
        where = f"{r['config']} on {r['arch']}"
        if "error" in r:
            out.append(f"{where}: {r['error']}")
        elif r["spill_store_bytes"] is None or not r["has_cubin"]:
            out.append(f"{where}: no ptxas report")
        elif r["spill_store_bytes"] > SPILL_BUDGET_BYTES:
            out.append(f"{where}: {r['spill_store_bytes']} bytes of spill stores > "
                       f"{SPILL_BUDGET_BYTES} (stack frame {r['stack_frame_bytes']} bytes)")
    return out


def _environment() -> dict:
    import triton

    from triton.backends.nvidia.compiler import get_ptxas_version

    return {"triton": triton.__version__, "ptxas": str(get_ptxas_version()).strip()
            .splitlines()[-1], "python": platform.python_version(),
            "machine": f"{platform.machine()}, {os.cpu_count()} cores (shared with other work: "
                       f"compile times are indicative)",
            "date": time.strftime("%Y-%m-%d")}


def write(rows, archs) -> None:
    """Write the rows per arch. Rows of configurations not compiled in this run (``--only``) are
    kept while the launchers can still pick them, and so are the file's other sections
    (``bench/static_model.py``'s)."""
    env = _environment()
    current = {cfg.key() for cfg in _configs()}
    for arch in archs:
        fresh = {r["config"]: {k: v for k, v in r.items() if k != "arch"} for r in rows
                 if r["arch"] == f"sm_{arch}"}
        path = RESULTS / f"static_sm{arch}.json"
        old = json.loads(path.read_text()) if path.exists() else {}
        merged = [fresh.pop(r["config"], r) for r in old.get("configs", [])
                  if r["config"] in current]
        merged += list(fresh.values())
        data = {**old, "arch": f"sm_{arch}", "spill_budget_bytes": SPILL_BUDGET_BYTES,
                "environment": env, "configs": merged}
        path.write_text(json.dumps(data, indent=1) + "\n")
        print(f"wrote {path.relative_to(ROOT)} ({len(merged)} configurations)")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, action="append", choices=ARCHS,
                        help="compute capability (default: 80 and 90)")
    parser.add_argument("--fast", action="store_true", help="the representative subset only")
    parser.add_argument("--only", default="", help="configurations whose key contains this")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--write", action="store_true", help="write bench/results/static_*.json")
    parser.add_argument("--check", action="store_true",
                        help="exit 1 on a compile error or a spill over the budget")
    args = parser.parse_args(argv)
    archs = tuple(args.arch or ARCHS)
    configs = _configs()
    indices = fast_subset(configs) if args.fast else range(len(configs))
    indices = [i for i in indices if args.only in configs[i].key()]
    start = time.perf_counter()
    rows = run(indices, archs, args.jobs)
    took = time.perf_counter() - start
    for r in sorted(rows, key=lambda r: (r["kernel"], r["arch"], r["config"])):
        if "error" in r:
            print(f"{r['arch']} {r['config']}: ERROR")
            continue
        print(f"{r['arch']} {r['config']}: {r['registers']} regs, spills "
              f"{r['spill_store_bytes']}/{r['spill_load_bytes']} B, stack "
              f"{r['stack_frame_bytes']} B, shared {r['shared_bytes']} B, {r['compile_s']} s")
    print(f"{len(rows)} compilations in {took:.0f} s")
    if args.write:
        write(rows, archs)
    found = problems(rows)
    for line in found:
        print("PROBLEM", line)
    return 1 if (args.check and found) else 0


if __name__ == "__main__":
    os.environ.pop("TRITON_INTERPRET", None)
    os.environ["TRITON_ALWAYS_COMPILE"] = "1"
    sys.path.insert(0, str(ROOT))
    sys.exit(main())
