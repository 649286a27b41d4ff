"""``kfac-bench``: the kernel microbenchmarks on whatever device this machine has.

For every op and every backend present on the device (CPU: ``cpu`` vs ``eager``; GPU: ``cuda``
and ``triton`` vs ``eager``) and every case: the backend's result is first checked against the
eager reference (a case that fails the check is recorded as failed and not timed), then both are
timed (median of ``--repeats`` runs after a warm-up, synchronised on GPUs) and the ratio
``eager / backend`` is recorded. Writes, under ``--out`` (default: a fresh folder
``kfac-bench-<device>-<date>-<time>`` in the current directory)::

    <device>.json   environment (device name, versions, threads, date) and one record per case
    <device>.md     the same as a markdown table
    <device>.png    speed-up per case (with matplotlib)

Usage::

    kfac-bench                 # the quick set on the default device
    kfac-bench --full --device cuda --out bench/results
    kfac-bench --ops patch_covariance block_eigh --threads 1
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import re
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch

from kfac_kernels import ops
from kfac_kernels._backend import available_backends
from kfac_kernels.testing import rel_error

# An op's cases: (label, make_inputs(device, gen) -> args, run(args, backend) -> tensor or tuple,
# check(result, reference, args) -> error). Shapes: quick set first; the full set adds more.


def _gen_x(shape, device, gen, dtype=torch.float32):
    return torch.randn(*shape, generator=gen, dtype=dtype).to(device)


def _spd(b, n, device, gen):
    x = torch.randn(b, n, n + 4, generator=gen)
    return (x @ x.mT / (n + 4)).to(device)


def _cases(full: bool) -> dict[str, list[tuple]]:
    sfu = [(4096, 256), (8192, 512)] + ([(16384, 1024)] if full else [])
    convs = [("resnet18-cifar-l1", 32, 64, 32, 3, 1, 1), ("resnet18-cifar-l3", 32, 256, 8, 3, 1, 1),
             ("resnet50-1x1", 16, 512, 14, 1, 1, 0)]
    if full:
        convs += [("resnet18-imagenet-l1", 8, 64, 56, 3, 1, 1),
                  ("resnet18-imagenet-stem", 8, 3, 224, 7, 2, 3)]
    eighs = [(512, 16), (512, 32), (256, 64)] + ([(4096, 32), (512, 128)] if full else [])
    out: dict[str, list[tuple]] = {"symmetric_factor_update": [], "patch_covariance": [],
                                   "gradient_covariance": [], "block_eigh": [],
                                   "block_damped_inverse": []}
    out.update(_singd_cases(full))
    for m, d in sfu:
        out["symmetric_factor_update"].append((
            f"X {m}x{d}", lambda dev, g, m=m, d=d: (_gen_x((m, d), dev, g),),
            lambda a, be: ops.symmetric_factor_update(None, a[0], 0.0, 1.0 / a[0].shape[0],
                                                      backend=be)))
    for name, n, c, hw, k, s, p in convs:
        for mode in ("expand", "reduce"):
            out["patch_covariance"].append((
                f"{name} N{n} C{c} {hw}x{hw} k{k} {mode}",
                lambda dev, g, n=n, c=c, hw=hw: (_gen_x((n, c, hw, hw), dev, g),),
                lambda a, be, k=k, s=s, p=p, mode=mode: ops.patch_covariance(
                    a[0], k, s, p, mode=mode, backend=be)))
        out["gradient_covariance"].append((
            f"{name} grad N{n} C{c} {hw}x{hw}",
            lambda dev, g, n=n, c=c, hw=hw: (_gen_x((n, c, hw, hw), dev, g),),
            lambda a, be: ops.gradient_covariance(a[0], channel_dim=1, backend=be)))
    for b, n in eighs:
        out["block_eigh"].append((
            f"B{b} n{n}", lambda dev, g, b=b, n=n: (_spd(b, n, dev, g),),
            lambda a, be: ops.block_eigh(a[0], backend=be)))
        out["block_damped_inverse"].append((
            f"B{b} n{n}", lambda dev, g, b=b, n=n: (_spd(b, n, dev, g),),
            lambda a, be: ops.block_damped_inverse(a[0], 1e-3, backend=be)))
    return out


# ResNet-18 (ImageNet): (rows, cols) of every conv / linear weight, cols = C_in k^2 (+1 bias)
RESNET18_WEIGHTS = ([(64, 147)] + [(64, 576)] * 4
                    + [(128, 576), (128, 1152), (128, 1152), (128, 1152), (128, 64)]
                    + [(256, 1152), (256, 2304), (256, 2304), (256, 2304), (256, 128)]
                    + [(512, 2304), (512, 4608), (512, 4608), (512, 4608), (512, 256)]
                    + [(1000, 513)])


def _singd_cases(full: bool) -> dict[str, list[tuple]]:
    """SINGD's in-place ops at ResNet-18 layer shapes (rows x cols, block size 32); each case
    returns the tensors it updated."""
    shapes = [(512, 4608), (256, 2305)] + ([(1024, 9216)] if full else [])
    out: dict[str, list[tuple]] = {"singd_diagonal_step": [], "singd_diagonal_step_foreach": [],
                                   "singd_diagonal_factor_update": [],
                                   "singd_block_step": [], "singd_block_factor_update": []}

    def blocks(n, b, dev, g, eye=1.0):
        dims = [b] * (n // b) + ([n % b] if n % b else [])
        x = eye * torch.eye(b) + 0.1 * torch.randn(len(dims), b, b, generator=g)
        return x.to(dev), dims

    for rows, cols in shapes:
        for dt in (torch.float32, torch.bfloat16):
            def make_step(dev, g, rows=rows, cols=cols, dt=dt):
                return (_gen_x((rows, cols), dev, g, dt), _gen_x((rows, cols), dev, g, dt),
                        1 + 0.1 * _gen_x((rows,), dev, g), 1 + 0.1 * _gen_x((cols,), dev, g),
                        _gen_x((rows, cols), dev, g))
            out["singd_diagonal_step"].append((
                f"P {rows}x{cols} {str(dt)[6:]}", make_step,
                lambda a, be: (ops.singd_diagonal_step(*a, 0.1, 0.9, 1e-4, False, backend=be),
                               (a[0], a[4]))[1]))

            def make_block_step(dev, g, rows=rows, cols=cols, dt=dt):
                c, c_dims = blocks(rows, 32, dev, g)
                k, k_dims = blocks(cols + 1, 32, dev, g)
                return (_gen_x((rows, cols), dev, g, dt), _gen_x((rows, cols), dev, g, dt),
                        _gen_x((rows,), dev, g, dt), _gen_x((rows,), dev, g, dt), c, c_dims, k,
                        k_dims, _gen_x((rows, cols), dev, g), _gen_x((rows,), dev, g))
            out["singd_block_step"].append((
                f"[W|b] {rows}x{cols + 1} blocks 32 {str(dt)[6:]}", make_block_step,
                lambda a, be: (ops.singd_block_step(*a, 0.1, 0.9, 1e-4, False, backend=be),
                               (a[0], a[2], a[8], a[9]))[1]))
    # many parameters in one call: a network's weights and biases (host-bound when small)
    for label, shapes_ in (("42 parameters of 64x64 and 64x1", [(64, 64), (64, 1)] * 21),
                           ("ResNet-18's 21 layers (11.7M parameters)", RESNET18_WEIGHTS)):
        n = len(shapes_)

        def make_many(dev, g, shapes_=shapes_):
            return (*(_gen_x(s, dev, g) for s in shapes_), *(_gen_x(s, dev, g) for s in shapes_),
                    *(1 + 0.1 * _gen_x(s[:1], dev, g) for s in shapes_),
                    *(1 + 0.1 * _gen_x(s[1:], dev, g) for s in shapes_),
                    *(_gen_x(s, dev, g) for s in shapes_))

        def run_many(a, be, n=n):   # flat arguments: the harness clones tensors, not lists
            lists = [list(a[i * n:(i + 1) * n]) for i in range(5)]
            ops.singd_diagonal_step_foreach(*lists, 0.1, 0.9, 1e-4, [False] * n, backend=be)
            return tuple(lists[0] + lists[4])
        out["singd_diagonal_step_foreach"].append((label, make_many, run_many))
    for layers in ([(4608, 512)] * 8, [(576, 64)] * 16 + [(2305, 256)] * 4):
        d_in = [i for i, _ in layers]
        d_out = [o for _, o in layers]
        k_off = [sum(d_in[:i]) for i in range(len(d_in) + 1)]
        c_off = [sum(d_out[:i]) for i in range(len(d_out) + 1)]

        def make_diag(dev, g, nk=k_off[-1], nc=c_off[-1]):
            return (1 + 0.1 * _gen_x((nk,), dev, g), 1 + 0.1 * _gen_x((nc,), dev, g),
                    0.1 * _gen_x((nk,), dev, g), 0.1 * _gen_x((nc,), dev, g),
                    _gen_x((nk,), dev, g).abs(), _gen_x((nc,), dev, g).abs())
        out["singd_diagonal_factor_update"].append((
            f"{len(layers)} layers, K {k_off[-1]}, C {c_off[-1]}", make_diag,
            lambda a, be, k_off=k_off, c_off=c_off: (ops.singd_diagonal_factor_update(
                *a, k_off, c_off, 1e-3, 0.5, 0.1, False, backend=be), a[:4])[1]))

        def make_block(dev, g, d_in=d_in, d_out=d_out):
            k, k_dims, c, c_dims, kl, cl = [], [], [], [], [0], [0]
            for i, o in zip(d_in, d_out):
                bk, dk = blocks(i, 32, dev, g)
                bc, dc = blocks(o, 32, dev, g)
                k.append(bk)
                c.append(bc)
                k_dims += dk
                c_dims += dc
                kl.append(kl[-1] + len(dk))
                cl.append(cl[-1] + len(dc))
            k, c = torch.cat(k), torch.cat(c)
            return (k, c, 0.01 * torch.randn_like(k), 0.01 * torch.randn_like(c),
                    k @ k.mT / 32, c @ c.mT / 32, k_dims, c_dims, kl, cl)
        out["singd_block_factor_update"].append((
            f"{len(layers)} layers, blocks 32", make_block,
            lambda a, be: (ops.singd_block_factor_update(*a, 1e-3, 0.5, 0.1, False, backend=be),
                           a[:4])[1]))
    return out


def _error(op: str, result, reference, args) -> float:
    if op == "block_eigh":
        vals, vecs = result
        a = args[0].double()
        v = vecs.double()
        resid = torch.linalg.norm(a @ v - v * vals.double()[..., None, :]) / torch.linalg.norm(a)
        eye = torch.eye(v.shape[-1], dtype=torch.float64, device=v.device)
        orth = torch.linalg.norm(v.mT @ v - eye) / (v.shape[0] ** 0.5)
        return max(float(resid), float(orth))
    if isinstance(result, tuple):  # the updated tensors of an in-place op
        return max(rel_error(r, e) for r, e in zip(result, reference))
    return rel_error(result, reference)


# bfloat16 parameters: a last-bit difference of the fp32 value moves a bf16 result by one unit
TOLERANCE = {"block_eigh": 1e-4, "block_damped_inverse": 1e-3, "singd_diagonal_step": 1e-3,
             "singd_diagonal_step_foreach": 1e-3,
             "singd_block_step": 1e-3}


def _clone(args: tuple) -> tuple:
    return tuple(a.clone() if isinstance(a, torch.Tensor) else a for a in args)


def _time(fn: Callable[[], object], device: torch.device, repeats: int) -> float:
    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    fn()
    sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def environment(device: torch.device) -> dict:
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    env = {"device": str(device), "device_name": device_name(device),
           "torch": torch.__version__, "triton": triton_version,
           "python": sys.version.split()[0], "threads": torch.get_num_threads(),
           "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    if device.type == "cuda":
        env["cuda"] = torch.version.cuda
        try:
            env["driver"] = torch._C._cuda_getDriverVersion()
        except (AttributeError, RuntimeError):
            env["driver"] = None
    return env


def run(device: torch.device, ops_wanted: list[str] | None, full: bool, repeats: int,
        progress: bool = True) -> list[dict]:
    records = []
    backends = [b for b in available_backends(device) if b != "eager"]
    if device.type == "cpu":
        backends = [b for b in backends if b != "triton"]  # the interpreter checks, not times
    gen = torch.Generator().manual_seed(0)
    selected = {op: cases for op, cases in _cases(full).items()
                if not ops_wanted or op in ops_wanted}
    total = sum(len(cases) for cases in selected.values()) * len(backends)
    for op, cases in selected.items():
        for label, make, fn in cases:
            args = make(device, gen)
            pristine = _clone(args)  # in-place ops: every check starts from the same inputs
            reference = fn(_clone(pristine), "eager")
            eager_s = _time(lambda: fn(args, "eager"), device, repeats)
            for backend in backends:
                rec = {"op": op, "case": label, "backend": backend, "eager_s": eager_s}
                try:
                    result = fn(_clone(pristine), backend)
                except Exception as err:  # a backend that cannot run this case
                    rec.update(status="error", error=f"{type(err).__name__}: {err}"[:300])
                    records.append(rec)
                    continue
                err = _error(op, result, reference, args)
                tol = TOLERANCE.get(op, 1e-4)
                rec["error_vs_eager"] = err
                if not err <= tol:
                    rec.update(status="failed check", tolerance=tol)
                else:
                    rec["backend_s"] = _time(lambda: fn(args, backend), device, repeats)
                    rec["speedup"] = eager_s / rec["backend_s"]
                    rec["status"] = "ok"
                records.append(rec)
                if progress:
                    speed = f"{rec['speedup']:.2f}x" if "speedup" in rec else rec["status"]
                    print(f"[{len(records)}/{total}] {op:24s} {label:38s} {backend:6s} {speed}",
                          flush=True)
    return records


def markdown(env: dict, records: list[dict]) -> str:
    lines = [f"# kfac-bench on {env['device_name']}", "",
             f"torch {env['torch']}, triton {env['triton']}, python {env['python']}, "
             f"{env['threads']} threads, {env['date']}", "",
             "| op | case | backend | eager (ms) | backend (ms) | speed-up | error vs eager |",
             "| --- | --- | --- | ---: | ---: | ---: | ---: |"]
    for r in records:
        backend_ms = f"{r['backend_s'] * 1e3:.3f}" if "backend_s" in r else r["status"]
        speed = f"{r['speedup']:.2f}x" if "speedup" in r else "-"
        err = f"{r['error_vs_eager']:.1e}" if "error_vs_eager" in r else "-"
        lines.append(f"| {r['op']} | {r['case']} | {r['backend']} | {r['eager_s'] * 1e3:.3f} | "
                     f"{backend_ms} | {speed} | {err} |")
    return "\n".join(lines) + "\n"


def plot(records: list[dict], path: Path, title: str) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    ok = [r for r in records if "speedup" in r]
    if not ok:
        return False
    fig, ax = plt.subplots(figsize=(10, 0.3 * len(ok) + 1.5))
    labels = [f"{r['op']}: {r['case']} [{r['backend']}]" for r in ok]
    ax.barh(range(len(ok)), [r["speedup"] for r in ok])
    ax.axvline(1.0, color="k", lw=0.8)
    ax.set_yticks(range(len(ok)), labels, fontsize=7)
    ax.set_xscale("log")
    ax.set_xlabel("speed-up over eager (log scale)")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "device"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="kfac-bench",
        description="The kernel microbenchmarks on this machine: every op on every backend of "
                    "the device, checked against the eager reference, then timed against it.")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        choices=("cpu", "cuda"),
                        help="device to benchmark on (default: cuda if there is one, else cpu)")
    parser.add_argument("--full", action="store_true",
                        help="the full set of cases (larger shapes; default: the quick set)")
    parser.add_argument("--ops", nargs="+", default=None, metavar="OP",
                        help=f"only these ops, of: {', '.join(sorted(_cases(False)))} (default: "
                             "all)")
    parser.add_argument("--repeats", type=int, default=5,
                        help="timed runs per case after a warm-up, the median kept (default: 5)")
    parser.add_argument("--threads", type=int, default=0,
                        help="CPU threads for torch (default: 0, torch's default)")
    parser.add_argument("--out", default=None, metavar="DIR",
                        help="folder for <device>.json/.md/.png (default: a fresh folder "
                             "kfac-bench-<device>-<date>-<time> in the current directory)")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    known = set(_cases(False))
    if args.ops and set(args.ops) - known:
        parser.error(f"--ops: unknown {sorted(set(args.ops) - known)}; choose from "
                     f"{sorted(known)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    env = environment(device)
    records = run(device, args.ops, args.full, args.repeats)
    out = Path(args.out) if args.out is not None else Path(
        f"kfac-bench-{slug(env['device_name'])}-"
        f"{datetime.datetime.now().strftime('%Y%m%d-%H%M%S')}")
    out.mkdir(parents=True, exist_ok=True)
    stem = out / slug(env["device_name"])
    stem.with_suffix(".json").write_text(json.dumps({"environment": env, "results": records},
                                                    indent=1) + "\n")
    stem.with_suffix(".md").write_text(markdown(env, records))
    wrote = [stem.with_suffix(".json"), stem.with_suffix(".md")]
    if plot(records, stem.with_suffix(".png"), f"kfac-bench on {env['device_name']}"):
        wrote.append(stem.with_suffix(".png"))
    failed = [r for r in records if r["status"] != "ok"]
    print(f"wrote {', '.join(map(str, wrote))}; {len(records) - len(failed)} cases ok, "
          f"{len(failed)} not")
    return 1 if any(r["status"] == "failed check" for r in records) else 0


if __name__ == "__main__":
    raise SystemExit(main())
