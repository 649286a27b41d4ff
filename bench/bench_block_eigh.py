"""Microbenchmark: ``block_eigh`` (batched Jacobi) against ``torch.linalg.eigh``.

Cases: the grid ``n in {16, 32, 48, 64, 96, 128, 256} x B in {64, 512, 4096}`` of random SPD
blocks (plus ``n in {2, 4, 8}`` at ``B = 512``, where the CPU kernel's crossover lies), and the
real block sets of ResNet-50 and ViT-B/16 factors at 4 blocks per layer (for every layer ``A``
has ``C_in kh kw`` (+1 with a bias) rows and ``G`` has ``C_out``; each is split into 4
near-equal channel blocks, the last absorbing the remainder). Contenders, all fp32:

* ``kernel``: the backend's Jacobi kernel on every bucket (the raw op; no hand-off to LAPACK),
  grid only;
* ``op``: ``kfac_kernels.ops.block_eigh(..., backend=<backend>)`` (buckets above the backend's
  size limit go to ``torch.linalg.eigh``), block sets only;
* ``batched``: ``torch.linalg.eigh`` on each same-size stack (the eager backend);
* ``loop``: ``torch.linalg.eigh`` on one block at a time, the paper's implementation;
* ``cupy``: ``cupy.linalg.eigh`` on the stack, where CuPy and a GPU are present.

Every result is checked first (``||A Q - Q Lambda||_2 / ||A||_2`` and ``||Q^T Q - I||_2`` of the
kernel on a sample of blocks). A case whose estimated kernel time exceeds ``--budget`` seconds
(extrapolated from the smallest ``B`` of the same ``n``) is recorded as skipped.

The pytest-benchmark file also times ``block_damped_cholesky``'s native CPU backend on one block
of order 129 to 2304 against the eager ``cholesky_ex`` (``test_block_damped_cholesky``).

Run as a pytest-benchmark file (the ``B = 64`` row only)::

    python -m pytest bench/bench_block_eigh.py --benchmark-only

or as a script that writes one JSON file (environment, then one record per case)::

    OMP_NUM_THREADS=1 python bench/bench_block_eigh.py --threads 1 \
        --json bench/results/block_eigh_cpu.json
    python bench/bench_block_eigh.py --quick --json /tmp/be.json
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
from pathlib import Path

if __name__ == "__main__":  # script mode: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pytest
import torch

from kfac_kernels import testing
from kfac_kernels._backend import native_has_op
from kfac_kernels.ops import block_damped_cholesky, block_eigh
from kfac_kernels.ops.block_eigh import MAX_N

GRID_N = (16, 32, 48, 64, 96, 128, 256)
GRID_B = (64, 512, 4096)
SMALL_N = (2, 4, 8)  # below the grid: where the CPU kernel's crossover with LAPACK lies
CHOLESKY_N = (129, 513, 1152, 2304)  # a ViT's factor orders (d = 128, 512 with a bias), ResNet's


# ------------------------------------------------------------------------------ block sets

def split4(d: int) -> list[int]:
    base = d // 4
    return [base, base, base, d - 3 * base]


def resnet50_layers() -> list[tuple[int, int]]:
    """(A dim, G dim) of every ResNet-50 layer (convolutions have no bias; the classifier has)."""
    layers = [(3 * 7 * 7, 64)]
    in_ch = 64
    for mid, out, blocks in ((64, 256, 3), (128, 512, 4), (256, 1024, 6), (512, 2048, 3)):
        for b in range(blocks):
            layers += [(in_ch, mid), (mid * 9, mid), (mid, out)]
            if b == 0:
                layers.append((in_ch, out))  # projection shortcut
            in_ch = out
    layers.append((2048 + 1, 1000))
    return layers


def vit_b16_layers() -> list[tuple[int, int]]:
    """(A dim, G dim) of every ViT-B/16 layer (all with bias)."""
    d, mlp = 768, 3072
    layers = [(3 * 16 * 16 + 1, d)]  # patch embedding
    for _ in range(12):
        layers += [(d + 1, 3 * d), (d + 1, d), (d + 1, mlp), (mlp + 1, d)]
    layers.append((d + 1, 1000))
    return layers


def block_sizes(layers) -> list[int]:
    return [s for a, g in layers for s in split4(a) + split4(g)]


BLOCK_SETS = {"resnet50": resnet50_layers, "vit_b16": vit_b16_layers}


# ------------------------------------------------------------------------------ helpers

def random_spd(b: int, n: int, device, dtype=torch.float32, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(b, n, n + 8, generator=gen, dtype=torch.float64)
    a = x @ x.mT / (n + 8)
    return a.to(device=device, dtype=dtype)


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def best_time(fn, device, min_run_time: float = 0.3, max_reps: int = 20) -> float:
    """Best of several runs after one warm-up (one run when a run is slower than the budget)."""
    fn()
    _sync(device)
    best, spent, reps = float("inf"), 0.0, 0
    while reps < max_reps and (reps < 2 or spent < min_run_time):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        dt = time.perf_counter() - t0
        best, spent, reps = min(best, dt), spent + dt, reps + 1
        if dt > min_run_time and reps >= 1:
            break
    return best


def check(blocks: torch.Tensor, vals: torch.Tensor, vecs: torch.Tensor, sample: int = 8):
    """Worst residual and orthogonality over a sample of blocks (fp64, spectral norms)."""
    worst_res = worst_orth = 0.0
    idx = torch.linspace(0, blocks.shape[0] - 1, min(sample, blocks.shape[0])).long()
    for i in idx.tolist():
        a = blocks[i].double().cpu()
        q, v = vecs[i].double().cpu(), vals[i].double().cpu()
        norm = max(float(torch.linalg.matrix_norm(a, ord=2)), 1e-300)
        worst_res = max(worst_res, float(torch.linalg.matrix_norm(a @ q - q * v, ord=2)) / norm)
        eye = torch.eye(a.shape[0], dtype=torch.float64)
        worst_orth = max(worst_orth, float(torch.linalg.matrix_norm(q.mT @ q - eye, ord=2)))
    assert worst_res <= 1e-5 and worst_orth <= 1e-5, (worst_res, worst_orth)
    return worst_res, worst_orth


def raw_kernel(backend: str):
    """The backend's Jacobi on one stack, without the op's size hand-off."""
    if backend == "triton":
        from kfac_kernels._triton.block_eigh import block_eigh_triton
        return lambda s: block_eigh_triton(s, 30, float(torch.finfo(s.dtype).eps))
    return lambda s: torch.ops.kfac_kernels.block_eigh(s, 30, float(torch.finfo(s.dtype).eps))


def cupy_eigh():
    try:
        import cupy
    except ImportError:
        return None
    return lambda s: cupy.linalg.eigh(cupy.asarray(s))


# ------------------------------------------------------------------------------ cases

def grid_record(n: int, b: int, backend: str, device, estimate: float | None,
                budget: float, loop_max_blocks: int) -> dict:
    rec = {"case": f"grid-n{n}-B{b}", "n": n, "B": b, "backend": backend, "device": str(device),
           "dtype": "float32", "threads": torch.get_num_threads()}
    if estimate is not None and estimate > budget:
        rec["skipped"] = f"estimated kernel time {estimate:.0f} s > budget {budget:.0f} s"
        return rec
    blocks = random_spd(b, n, device, seed=n * 7 + b)
    kernel = raw_kernel(backend)
    vals, vecs, sweeps = kernel(blocks)
    rec["residual"], rec["orthogonality"] = check(blocks, vals, vecs)
    rec["sweeps_max"] = int(sweeps.max())
    rec["kernel_s"] = best_time(lambda: kernel(blocks), device)
    rec["batched_eigh_s"] = best_time(lambda: torch.linalg.eigh(blocks), device)
    # the loop is timed on at most loop_max_blocks blocks and scaled (it is linear in B)
    m = min(b, loop_max_blocks)
    sub = list(blocks[:m].unbind(0))
    rec["loop_eigh_s"] = best_time(lambda: [torch.linalg.eigh(x) for x in sub], device) * b / m
    rec["loop_blocks_timed"] = m
    cp = cupy_eigh() if torch.device(device).type == "cuda" else None
    if cp is not None:
        rec["cupy_eigh_s"] = best_time(lambda: cp(blocks), device)
    rec["speedup_vs_batched"] = rec["batched_eigh_s"] / rec["kernel_s"]
    rec["speedup_vs_loop"] = rec["loop_eigh_s"] / rec["kernel_s"]
    return rec


def blockset_record(name: str, backend: str, device) -> dict:
    sizes = block_sizes(BLOCK_SETS[name]())
    blocks = [random_spd(1, s, device, seed=i)[0] for i, s in enumerate(sizes)]
    buckets: dict[int, list[torch.Tensor]] = {}
    for blk in blocks:
        buckets.setdefault(blk.shape[0], []).append(blk)
    stacks = [torch.stack(v) for v in buckets.values()]
    rec = {"case": f"blockset-{name}", "backend": backend, "device": str(device),
           "dtype": "float32", "threads": torch.get_num_threads(), "num_blocks": len(sizes),
           "num_sizes": len(buckets), "max_n": max(sizes),
           "limit": MAX_N[backend],
           "blocks_within_limit": sum(s <= MAX_N[backend] for s in sizes)}
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the hand-off notice for the large buckets
        vals, vecs = block_eigh(blocks, backend=backend)
    small = [i for i, s in enumerate(sizes) if s <= 64][:4]
    worst = [check(blocks[i][None], vals[i][None], vecs[i][None]) for i in small]
    rec["residual"] = max((w[0] for w in worst), default=None)
    rec["orthogonality"] = max((w[1] for w in worst), default=None)

    def run_op():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            block_eigh(blocks, backend=backend)

    rec["op_s"] = best_time(run_op, device, min_run_time=0.0, max_reps=2)
    rec["batched_eigh_s"] = best_time(lambda: [torch.linalg.eigh(s) for s in stacks], device,
                                      min_run_time=0.0, max_reps=2)
    rec["loop_eigh_s"] = best_time(lambda: [torch.linalg.eigh(x) for x in blocks], device,
                                   min_run_time=0.0, max_reps=2)
    rec["speedup_vs_batched"] = rec["batched_eigh_s"] / rec["op_s"]
    rec["speedup_vs_loop"] = rec["loop_eigh_s"] / rec["op_s"]
    return rec


# ------------------------------------------------------------------------------ pytest mode

def _backends(device) -> list[str]:
    return [b for b in testing.backends_for(device) if b != "eager"
            and not (b == "triton" and torch.device(device).type == "cpu")]


@pytest.mark.parametrize("device", testing.devices(), ids=str)
@pytest.mark.parametrize("n", GRID_N[:4])
def test_block_eigh(benchmark, device, n):
    backends = _backends(device)
    if not backends:
        pytest.skip("no kernel backend for this device")
    blocks = random_spd(64, n, device)
    kernel = raw_kernel(backends[0])
    check(blocks, *kernel(blocks)[:2])
    benchmark.extra_info["batched_eigh_s"] = best_time(lambda: torch.linalg.eigh(blocks), device)
    benchmark(lambda: (kernel(blocks), _sync(device)))


@pytest.mark.parametrize("device", testing.devices(), ids=str)
@pytest.mark.parametrize("n", CHOLESKY_N)
def test_block_damped_cholesky(benchmark, device, n):
    """The damped Cholesky factor of one SPD block (a ViT's and a ResNet's factor orders) by the
    op's native backend, against the eager ``cholesky_ex`` (``extra_info``: its time and the
    ratio); checked first: ``||L L^T - (A + gamma I)|| / ||A + gamma I||`` at most 1e-5."""
    if "cpu" not in _cholesky_backends(device):
        pytest.skip("no native block_damped_cholesky for this device")
    blocks = random_spd(1, n, device)
    gamma = 1e-3
    chol = block_damped_cholesky(blocks, gamma, backend="cpu")
    damped = blocks.double() + gamma * torch.eye(n, dtype=torch.float64, device=device)
    err = float((chol.double() @ chol.double().mT - damped).norm() / damped.norm())
    assert err <= 1e-5, err
    eager_s = best_time(lambda: block_damped_cholesky(blocks, gamma, backend="eager"), device)
    benchmark.extra_info["eager_s"] = eager_s
    benchmark.extra_info["relative_error"] = err
    benchmark(lambda: (block_damped_cholesky(blocks, gamma, backend="cpu"), _sync(device)))
    if benchmark.stats is not None:  # None under --benchmark-disable
        benchmark.extra_info["speedup_vs_eager"] = eager_s / benchmark.stats.stats.min


def _cholesky_backends(device) -> list[str]:
    cpu = torch.device(device).type == "cpu" and native_has_op("block_damped_cholesky")
    return ["cpu"] if cpu else []


# ------------------------------------------------------------------------------ script mode

def print_record(r: dict) -> None:
    if "skipped" in r:
        print(f"{r['case']:22s} {r['backend']:6s} skipped: {r['skipped']}")
        return
    t = r.get("kernel_s", r.get("op_s"))
    res, orth = r.get("residual"), r.get("orthogonality")
    quality = "" if res is None else f"res={res:.1e} orth={orth:.1e}"
    print(f"{r['case']:22s} {r['backend']:6s} thr={r['threads']} t={t * 1e3:10.2f} ms "
          f"batched={r['batched_eigh_s'] * 1e3:10.2f} ms loop={r['loop_eigh_s'] * 1e3:10.2f} ms "
          f"x_batched={r['speedup_vs_batched']:7.2f} x_loop={r['speedup_vs_loop']:7.2f} "
          f"{quality}", flush=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="n <= 32, B = 64 and no block sets")
    parser.add_argument("--json", type=Path, help="write the records here")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--budget", type=float, default=30.0,
                        help="skip a grid case whose estimated kernel time exceeds this (s)")
    parser.add_argument("--loop-max-blocks", type=int, default=512)
    parser.add_argument("--no-blocksets", action="store_true")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    from bench.bench_patch_covariance import environment
    env = environment(device)
    env["omp_num_threads"] = os.environ.get("OMP_NUM_THREADS")
    print(json.dumps(env, indent=1))
    records = []
    grid_n = GRID_N[:2] if args.quick else GRID_N
    grid_b = GRID_B[:1] if args.quick else GRID_B
    for backend in _backends(device):
        if not args.quick:
            for n in SMALL_N:
                rec = grid_record(n, 512, backend, device, None, args.budget,
                                  args.loop_max_blocks)
                records.append(rec)
                print_record(rec)
        for n in grid_n:
            per_block = None
            for b in grid_b:
                estimate = None if per_block is None else per_block * b * 6  # best-of + warm-up
                rec = grid_record(n, b, backend, device, estimate, args.budget,
                                  args.loop_max_blocks)
                if "kernel_s" in rec:
                    per_block = rec["kernel_s"] / b
                records.append(rec)
                print_record(rec)
        if not (args.quick or args.no_blocksets):
            for name in BLOCK_SETS:
                rec = blockset_record(name, backend, device)
                records.append(rec)
                print_record(rec)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        env["finished"] = datetime.datetime.now(datetime.timezone.utc).isoformat(
            timespec="seconds")
        env["loadavg_1m_end"] = os.getloadavg()[0]
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump({"benchmark": "block_eigh", "environment": env, "results": records}, fh,
                      indent=1)
            fh.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
