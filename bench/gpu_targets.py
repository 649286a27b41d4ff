"""The kernel issues' performance targets, measured on a GPU beside the static model's predictions.

    python bench/gpu_targets.py --out bench/results/<gpu>_targets.json   # on a CUDA machine
    python bench/gpu_targets.py --device cpu --small                     # the same code, tiny

Each target of ``bench/results/static_sm90.json`` (``roofline``) and of the GPU pass is timed
here at the model's shapes, every backend against what a user would run instead:

* ``patch_covariance``, ResNet-50 stage 3 (N=64, C=256, 14x14, k=3, padding 1): expand in bf16
  and fp32 (TF32 off and on), reduce, and 4 diagonal blocks; against ``F.unfold`` + one matrix
  product in the same dtype (the fastest eager way) and the op's own eager reference.
* ``block_eigh`` fp32, B in {64, 1024}, n in {16, 33, 64, 96, 128}: against
  ``torch.linalg.eigh`` (cuSOLVER).
* The fused SINGD parameter steps (diagonal; block-diagonal with blocks of 32) over the
  parameters of ResNet-18 (ImageNet shapes, 21 layers, one call per layer as the optimizer makes
  them): against the eager step.
* Whole training steps of ResNet-18 (CIFAR form, batch 128, bf16 parameters): AdamW against
  SINGD-diagonal with T=10 (fused and not): step time and peak memory.

Every result is checked before it is timed (fp64 reference; eigen residual and orthogonality).
Times are medians of CUDA-event timings after a warm-up (host clock after a synchronize on the
CPU). Nothing is asserted here: the ratios are written out, to be compared with the targets.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from kfac_kernels import SINGD, ops  # noqa: E402
from kfac_kernels._backend import available_backends  # noqa: E402
from kfac_kernels.testing import rel_error as rel  # noqa: E402

from kfac_kernels.apps.bench import RESNET18_WEIGHTS as RESNET18  # noqa: E402


def timed(fn, device: str, min_runs: int = 5, max_runs: int = 50, budget_s: float = 1.0) -> float:
    """Median seconds of ``fn()`` after two warm-up calls; runs until ``budget_s`` is spent
    (at least ``min_runs``)."""
    for _ in range(2):
        fn()
    times = []
    spent = 0.0
    while len(times) < min_runs or (spent < budget_s and len(times) < max_runs):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            t = start.elapsed_time(end) / 1e3
        else:
            t0 = time.perf_counter()
            fn()
            t = time.perf_counter() - t0
        times.append(t)
        spent += t
    return statistics.median(times)


def measure(row: dict, backend: str, fn) -> None:
    """``row[backend] = fn()``, or the failure, recorded: one backend failing does not stop the
    other targets."""
    try:
        row[backend] = fn()
    except Exception as exc:
        row[backend] = {"failed": f"{type(exc).__name__}: {exc}"[:300]}


def _backends(device: str) -> list[str]:
    return [b for b in available_backends(torch.device(device)) if b != "eager"]


def unfold_gram(x: torch.Tensor, k: int, padding: int, reduce: bool) -> torch.Tensor:
    """What a user writes instead: unfold, then one matrix product in the input's dtype."""
    cols = F.unfold(x, k, padding=padding)                     # (N, C k^2, R)
    if reduce:
        s = cols.sum(-1)                                       # (N, C k^2)
        return (s.mT @ s) / (x.shape[0] * cols.shape[-1] ** 2)
    rows = cols.transpose(1, 2).reshape(-1, cols.shape[1])
    return (rows.mT @ rows) / rows.shape[0]


def patch_covariance_targets(device: str, small: bool) -> list[dict]:
    n, c, hw, k = (4, 16, 6, 3) if small else (64, 256, 14, 3)
    out = []
    cases = [("expand", torch.bfloat16, False, None), ("expand", torch.float32, False, None),
             ("expand", torch.float32, True, None), ("reduce", torch.float32, False, None),
             ("reduce", torch.bfloat16, False, None), ("expand", torch.bfloat16, False, 4),
             ("expand", torch.float32, False, 4)]
    gen = torch.Generator().manual_seed(0)
    x64 = torch.randn(n, c, hw, hw, generator=gen, dtype=torch.float64).to(device)
    for mode, dtype, tf32, blocks in cases:
        if device == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = tf32
        x = x64.to(dtype)
        ref = ops.patch_covariance(x.double(), k, 1, 1, mode=mode, num_blocks=blocks,
                                   backend="eager")
        label = (f"patch_covariance {mode} {str(dtype)[6:]}{' tf32' if tf32 else ''}"
                 f"{f' {blocks} blocks' if blocks else ''}, N={n} C={c} {hw}x{hw} k={k}")
        row = {"target": label, "mode": mode, "dtype": str(dtype)[6:], "allow_tf32": tf32,
               "num_blocks": blocks, "shape": [n, c, hw, hw, k]}
        row["eager_op_s"] = timed(lambda: ops.patch_covariance(
            x, k, 1, 1, mode=mode, num_blocks=blocks, backend="eager"), device)
        if blocks is None:
            base = unfold_gram(x, k, 1, mode == "reduce")
            row["unfold_matmul_error"] = rel(base, ref)
            row["unfold_matmul_s"] = timed(lambda: unfold_gram(x, k, 1, mode == "reduce"), device)
        for be in _backends(device):
            def run(be=be):
                return ops.patch_covariance(x, k, 1, 1, mode=mode, num_blocks=blocks, backend=be)

            def case(run=run):
                got = run()
                err = (max(rel(g, r) for g, r in zip(got, ref)) if isinstance(got, list)
                       else rel(got, ref))
                t = timed(run, device)
                res = {"s": t, "error": err, "vs_eager_op": row["eager_op_s"] / t}
                if "unfold_matmul_s" in row:
                    res["vs_unfold_matmul"] = row["unfold_matmul_s"] / t
                if mode == "expand" and blocks is None:
                    d = c * k * k
                    flops = 2 * n * hw * hw * d * d / 2  # the upper triangle (the kernels' work)
                    peak = {"bfloat16": 989.4e12, "float32": 494.7e12 if tf32 else 66.9e12}
                    res["tflops_upper"] = flops / t / 1e12
                    res["fraction_of_h100_peak"] = flops / t / peak[str(dtype)[6:]]
                return res
            measure(row, be, case)
        if mode == "expand" and "triton" in _backends(device):
            # each Triton expand kernel by name: "triton" above is whichever the launcher picks
            # (the channels kernel runs on the tensor cores only: fp32 with TF32 allowed)
            kernels = ("generic", "channels") if dtype != torch.float32 or tf32 else ("generic",)
            for kernel in kernels:
                measure(row, f"triton_{kernel}",
                        lambda kernel=kernel: _triton_expand_case(x, k, ref, row, kernel,
                                                                  device, blocks))
        out.append(row)
        print(_line(row), flush=True)
    if device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
    return out


def _triton_expand_case(x, k, ref, row, kernel, device, blocks=None) -> dict:
    """The expand covariance (stride 1, padding k // 2, no bias; ``blocks`` diagonal blocks of
    channels, as segments) by one named Triton kernel."""
    from kfac_kernels._triton.patch_covariance import patch_covariance_triton

    n, c, h, w = x.shape
    segments = blocks or 1
    cs = c // segments
    args = ((k, k), (1, 1), (1, 1), (k // 2, k // 2), (h, w), segments, 0, cs, cs, False, False,
            None, 0.0, 1.0 / (n * h * w))

    def run():
        return patch_covariance_triton(x, *args, kernel=kernel)
    refs = ref if isinstance(ref, list) else [ref]  # one factor per block
    err = max(rel(g, r) for g, r in zip(run(), refs))
    t = timed(run, device)
    res = {"s": t, "error": err, "vs_eager_op": row["eager_op_s"] / t}
    if "unfold_matmul_s" in row:
        res["vs_unfold_matmul"] = row["unfold_matmul_s"] / t
    return res


def block_eigh_targets(device: str, small: bool) -> list[dict]:
    sizes = [(8, 16), (8, 33)] if small else [(b, n) for n in (16, 33, 64, 96, 128)
                                               for b in (64, 1024)]
    out = []
    gen = torch.Generator().manual_seed(1)
    for b, n in sizes:
        x = torch.randn(b, n, n + 4, generator=gen, dtype=torch.float64)
        a = (x @ x.mT / (n + 4)).to(device)
        a32 = a.float()
        row = {"target": f"block_eigh fp32, n = {n}, B = {b}", "n": n, "B": b}
        row["eigh_s"] = timed(lambda: torch.linalg.eigh(a32), device)
        for be in _backends(device):
            def case(be=be):
                vals, vecs = ops.block_eigh(a32, backend=be)
                v = vecs.double()
                resid = float(torch.linalg.norm(a @ v - v * vals.double()[..., None, :])
                              / torch.linalg.norm(a))
                eye = torch.eye(n, dtype=torch.float64, device=device)
                orth = float(torch.linalg.norm(v.mT @ v - eye) / math.sqrt(b))
                t = timed(lambda: ops.block_eigh(a32, backend=be), device)
                return {"s": t, "residual": resid, "orthogonality": orth,
                        "vs_eigh": row["eigh_s"] / t}
            measure(row, be, case)
        out.append(row)
        print(_line(row), flush=True)
    return out


def singd_step_targets(device: str, small: bool) -> list[dict]:
    layers = [(8, 20), (16, 33)] if small else RESNET18
    gen = torch.Generator().manual_seed(2)

    def rand(*shape):
        return torch.randn(*shape, generator=gen).to(device)

    out = []
    # diagonal: p, g, c, k, buf per layer
    diag = [(rand(r, cc), rand(r, cc), 1 + 0.1 * rand(r), 1 + 0.1 * rand(cc), rand(r, cc))
            for r, cc in layers]

    def blocks(n, b=32):
        dims = [b] * (n // b) + ([n % b] if n % b else [])
        return (torch.eye(b, device=device) + 0.1 * rand(len(dims), b, b)), dims

    block = []
    for r, cc in layers:
        cb, cd = blocks(r)
        kb, kd = blocks(cc)
        block.append((rand(r, cc), rand(r, cc), None, None, cb, cd, kb, kd, rand(r, cc), None))
    params = sum(r * cc for r, cc in layers)
    for name, op, states in (("singd_diagonal_step", ops.singd_diagonal_step, diag),
                             ("singd_block_step", ops.singd_block_step, block)):
        row = {"target": f"{name} fp32 over ResNet-18's {len(layers)} layers ({params} "
                         f"parameters), one call per layer", "layers": len(layers),
               "parameters": params}

        def run(be, states=states, op=op):
            for st in states:
                op(*st, 0.1, 0.9, 1e-4, False, backend=be)
            return states

        # correctness on copies: every backend from the same state as eager
        def copy_state(states):
            return [tuple(t.clone() if isinstance(t, torch.Tensor) else t for t in st)
                    for st in states]
        pristine = copy_state(states)  # the timing below moves `states` on
        ref_states = run("eager", copy_state(pristine))
        row["eager_s"] = timed(lambda: run("eager"), device)
        for be in _backends(device):
            def case(be=be):
                mine = run(be, copy_state(pristine))
                err = max(rel(m[0], r[0]) for m, r in zip(mine, ref_states))
                t = timed(lambda: run(be), device)
                return {"s": t, "error": err, "vs_eager": row["eager_s"] / t}
            measure(row, be, case)
        out.append(row)
        print(_line(row), flush=True)
    # the diagonal step of every layer in one call (one launch): the host's time per call
    # bounds the per-layer calls above
    row = {"target": f"singd_diagonal_step_foreach fp32 over ResNet-18's {len(layers)} layers "
                     f"({params} parameters), one call", "layers": len(layers),
           "parameters": params}
    lists = [list(t) for t in zip(*diag)]
    first = [False] * len(diag)

    def run_all(be, lists=lists):
        ops.singd_diagonal_step_foreach(*lists, 0.1, 0.9, 1e-4, first, backend=be)
        return lists

    pristine = [[t.clone() for t in ts] for ts in lists]
    ref = run_all("eager", [[t.clone() for t in ts] for ts in pristine])
    row["eager_s"] = timed(lambda: run_all("eager"), device)
    for be in _backends(device):
        def case(be=be):
            mine = run_all(be, [[t.clone() for t in ts] for ts in pristine])
            err = max(rel(m, r) for m, r in zip(mine[0], ref[0]))
            t = timed(lambda: run_all(be), device)
            return {"s": t, "error": err, "vs_eager": row["eager_s"] / t}
        measure(row, be, case)
    out.append(row)
    print(_line(row), flush=True)
    return out


def training_step_targets(device: str, small: bool) -> list[dict]:
    from bench.bench_singd import resnet18, small_resnet, state_bytes

    build = small_resnet if small else resnet18
    batch = 8 if small else 128
    dtype = torch.bfloat16
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(batch, 3, 32, 32, generator=gen).to(device, dtype)
    y = torch.randint(0, 10, (batch,), generator=gen).to(device)
    configs = [("adamw", lambda m: torch.optim.AdamW(m.parameters(), lr=1e-3)),
               ("singd-diagonal T=10", lambda m: SINGD(m, lr=0.05, lr_cov=3e-4, T=10,
                                                       structures="diagonal")),
               ("singd-diagonal T=10 fused", lambda m: SINGD(m, lr=0.05, lr_cov=3e-4, T=10,
                                                             structures="diagonal", fused=True))]
    out = []
    base = None
    for name, make in configs:
        try:
            torch.manual_seed(0)
            model = build().to(device, dtype)
            opt = make(model)

            def step():
                opt.zero_grad(set_to_none=True)
                F.cross_entropy(model(x).float(), y).backward()
                opt.step()
            for _ in range(3):
                step()
            if device == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            # T=10: time whole periods of 10 steps, so the factor step is in every timing
            t = timed(lambda: [step() for _ in range(10)], device, min_runs=3, max_runs=10,
                      budget_s=2.0) / 10
            row = {"target": f"ResNet-18 (CIFAR) batch {batch} bf16 training step: {name}",
                   "optimizer": name, "step_s": t, "state_bytes": state_bytes(opt)}
            if device == "cuda":
                row["peak_bytes"] = torch.cuda.max_memory_allocated()
            if base is None:
                base = row
            else:
                row["time_vs_adamw"] = t / base["step_s"]
                row["state_memory_vs_adamw"] = row["state_bytes"] / base["state_bytes"]
                if "peak_bytes" in row:
                    row["peak_memory_vs_adamw"] = row["peak_bytes"] / base["peak_bytes"]
            del model, opt
        except Exception as exc:
            row = {"target": f"training step: {name}", "failed": f"{type(exc).__name__}: {exc}"}
        out.append(row)
        print(_line(row), flush=True)
        if device == "cuda":
            torch.cuda.empty_cache()
    return out


def _line(row: dict) -> str:
    parts = [row["target"]]
    for k, v in row.items():
        if isinstance(v, dict):
            if "failed" in v:
                parts.append(f"{k}: FAILED {v['failed'][:120]}")
            else:
                ratio = {kk: vv for kk, vv in v.items() if kk.startswith("vs_")}
                parts.append(f"{k}: {v['s'] * 1e3:.3f} ms "
                             + " ".join(f"{kk}={vv:.2f}x" for kk, vv in ratio.items()))
        elif k.endswith("_s"):
            parts.append(f"{k}={v * 1e3:.3f} ms")
        elif k.endswith("vs_adamw"):
            parts.append(f"{k}={v:.2f}x")
    return " | ".join(parts)


SECTIONS = {"patch_covariance": patch_covariance_targets, "block_eigh": block_eigh_targets,
            "singd_steps": singd_step_targets, "training_steps": training_step_targets}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=("cuda", "cpu"),
                        default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--small", action="store_true", help="tiny shapes (a smoke run)")
    parser.add_argument("--sections", nargs="+", choices=list(SECTIONS), default=list(SECTIONS))
    parser.add_argument("--out", default=None, help="JSON file for the results")
    args = parser.parse_args()
    env = {"device": args.device, "torch": torch.__version__, "small": args.small}
    if args.device == "cuda":
        env["gpu"] = torch.cuda.get_device_name(0)
        env["cuda"] = torch.version.cuda
    try:
        import triton
        env["triton"] = triton.__version__
    except ImportError:
        pass
    result = {"benchmark": "gpu_targets", "environment": env}
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    for name in args.sections:
        t0 = time.perf_counter()
        result[name] = SECTIONS[name](args.device, args.small)
        result[f"{name}_wall_s"] = time.perf_counter() - t0
        if args.out:  # after every section: a run cut short keeps what it measured
            Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
