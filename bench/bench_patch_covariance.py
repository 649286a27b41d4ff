"""Microbenchmark: ``patch_covariance`` (the convolution input factor ``A``), kernel vs eager.

Layer shapes from ResNet-18 and ResNet-50 at CIFAR (32x32) and ImageNet resolution (the 7x7
stride-2 stem, 3x3 and 1x1 convolutions, 56x56 down to 4x4), a ViT-B/16 patch embedding (kernel
16, stride 16, 224x224x3) and a depthwise 3x3 convolution; modes ``expand``, ``reduce`` and
``blocked`` (expand with ``num_blocks=4``). Eager is the definition: unfold + matmul (expand),
unfold + mean + matmul (reduce), unfold then slice the channel blocks (blocked).

For every backend present on every device (Triton on CPU tensors is skipped: the interpreter is a
correctness tool), the kernel's output is first checked against eager, then timed. ``extra_info``
gets::

    median_s (pytest-benchmark), eager_median_s, backend_median_s (torch.utils.benchmark,
    alternating, best of two), speedup_vs_eager = eager_median_s / backend_median_s,
    gflops (expand/blocked: 2 N R sum D_i^2 over the factors, the full products, from
    backend_median_s), fraction_of_matmul_peak (gflops / a large fp32 matmul's GFLOP/s on the
    same device: a practical roofline),
    peak_extra_bytes, eager_peak_extra_bytes (bench/memory.py: a fresh process per measurement
    on the CPU, torch.cuda.max_memory_allocated on a GPU), output_bytes, input_bytes,
    unfold_bytes (the im2col tensor eager builds: N * C * kh * kw * R elements),
    temporaries_bytes = peak_extra_bytes - output_bytes, temporaries_2n_bytes (the same at twice
    the batch), no_unfold (the temporaries grow by less than a quarter of the unfold size when
    the batch doubles: an unfolded tensor would grow by all of it; the CPU kernel's per-thread
    tiles depend on the tile sizes only, its packed panel on D, and on N up to about an eighth
    of the unfold and a fixed cap),
    oom / eager_oom (an allocation failure, recorded as such)

``gflops`` counts the full products although the kernels compute one triangle, so
``fraction_of_matmul_peak`` can exceed 1.

Run as a pytest-benchmark file::

    python -m pytest bench/bench_patch_covariance.py --benchmark-only

or as a script that writes one JSON file (environment, then one record per case)::

    python bench/bench_patch_covariance.py --threads 1 2 --rounds 3 \
        --json bench/results/patch_covariance_cpu.json
    python bench/bench_patch_covariance.py --quick --json /tmp/pc.json   # a few cases

Every record carries its intra-op thread count (``--threads``: memory is measured at the first
only). On a shared machine, timings with as many threads as cores suffer whenever another process
takes a core (a parallel region then waits for a scheduler slice); one thread is the steadier
comparison. The environment records the load average at the start and end and the compiled
extension's hash at both ends.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import sys
from dataclasses import asdict, dataclass, replace
from functools import lru_cache
from pathlib import Path

if __name__ == "__main__":  # script mode: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.utils.benchmark as tbench

from bench.memory import peak_extra_memory
from kfac_kernels import testing
from kfac_kernels.ops import patch_covariance


@dataclass(frozen=True)
class ConvShape:
    name: str
    n: int
    c: int
    h: int
    w: int
    kernel: int
    stride: int = 1
    padding: int = 0
    groups: int = 1

    @property
    def out_hw(self) -> tuple[int, int]:
        k, s, p = self.kernel, self.stride, self.padding
        return (self.h + 2 * p - k) // s + 1, (self.w + 2 * p - k) // s + 1

    @property
    def positions(self) -> int:
        oh, ow = self.out_hw
        return oh * ow

    @property
    def id(self) -> str:
        return (f"{self.name}-N{self.n}-C{self.c}-{self.h}x{self.w}-k{self.kernel}"
                f"s{self.stride}" + (f"-g{self.groups}" if self.groups > 1 else ""))


# batch sizes chosen for a small CPU; a GPU run may scale them (see --batch-scale)
SHAPES = [
    # ResNet-18, CIFAR-10 (32x32 input, 3x3 stem, no max-pool)
    ConvShape("resnet18-cifar-layer1", 32, 64, 32, 32, 3, padding=1),
    ConvShape("resnet18-cifar-layer3", 32, 256, 8, 8, 3, padding=1),
    ConvShape("resnet18-cifar-layer4", 32, 512, 4, 4, 3, padding=1),
    # ResNet-18, ImageNet (224x224)
    ConvShape("resnet18-imagenet-stem", 8, 3, 224, 224, 7, stride=2, padding=3),
    ConvShape("resnet18-imagenet-layer1", 8, 64, 56, 56, 3, padding=1),
    ConvShape("resnet18-imagenet-layer3", 16, 256, 14, 14, 3, padding=1),
    ConvShape("resnet18-imagenet-layer4", 16, 512, 7, 7, 3, padding=1),
    # ResNet-50, ImageNet: bottleneck 1x1s and the strided 3x3 of layer2
    ConvShape("resnet50-imagenet-layer1-1x1", 8, 256, 56, 56, 1),
    ConvShape("resnet50-imagenet-layer2-3x3s2", 8, 128, 56, 56, 3, stride=2, padding=1),
    ConvShape("resnet50-imagenet-layer3-1x1", 16, 1024, 14, 14, 1),
    # ResNet-50, CIFAR-10
    ConvShape("resnet50-cifar-layer2-1x1", 32, 512, 16, 16, 1),
    # ViT-B/16 patch embedding
    ConvShape("vit-b16-patch-embed", 8, 3, 224, 224, 16, stride=16),
    # depthwise 3x3 (MobileNetV2-like)
    ConvShape("depthwise-3x3", 16, 128, 28, 28, 3, padding=1, groups=128),
]
MODES = ("expand", "reduce", "blocked")
NUM_BLOCKS = 4
QUICK = {("resnet18-cifar-layer1", "expand"), ("resnet18-cifar-layer1", "reduce"),
         ("resnet18-imagenet-layer3", "blocked"), ("vit-b16-patch-embed", "reduce"),
         ("depthwise-3x3", "expand")}


def case_list(quick: bool = False) -> list[tuple[ConvShape, str]]:
    out = []
    for shape in SHAPES:
        for mode in MODES:
            if mode == "blocked" and shape.c // shape.groups < NUM_BLOCKS:
                continue  # fewer channels per group than blocks
            if quick and (shape.name, mode) not in QUICK:
                continue
            out.append((shape, mode))
    return out


def op_kwargs(shape: ConvShape, mode: str) -> dict:
    kw = dict(stride=shape.stride, padding=shape.padding, groups=shape.groups,
              mode="reduce" if mode == "reduce" else "expand")
    if mode == "blocked":
        kw["num_blocks"] = NUM_BLOCKS
    return kw


def factor_dims(shape: ConvShape, mode: str) -> list[int]:
    k = shape.kernel * shape.kernel
    cg = shape.c // shape.groups
    if mode != "blocked":
        return [cg * k] * shape.groups
    base = cg // NUM_BLOCKS
    sizes = [base] * (NUM_BLOCKS - 1) + [cg - base * (NUM_BLOCKS - 1)]
    return [s * k for s in sizes] * shape.groups


def unfold_bytes(shape: ConvShape, dtype: torch.dtype) -> int:
    elem = torch.empty((), dtype=dtype).element_size()
    return shape.n * shape.c * shape.kernel ** 2 * shape.positions * elem


def flops(shape: ConvShape, mode: str) -> float:
    """Full-product flops of the Gram matrices (expand/blocked: over N R rows; reduce: N rows,
    plus the window sums, N C k^2 R adds)."""
    dims = factor_dims(shape, mode)
    if mode == "reduce":
        return 2.0 * shape.n * sum(d * d for d in dims) + shape.n * shape.c * (
            shape.kernel ** 2) * shape.positions
    return 2.0 * shape.n * shape.positions * sum(d * d for d in dims)


def device_backends(device: torch.device) -> list[str]:
    return [b for b in testing.backends_for(device)
            if not (device.type == "cpu" and b == "triton")]


def make_input(shape: ConvShape, dtype: torch.dtype, device: torch.device,
               layout: str = "contiguous") -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(shape.n, shape.c, shape.h, shape.w, generator=gen).to(dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    return x.to(device)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _as_list(out) -> list[torch.Tensor]:
    return list(out) if isinstance(out, (list, tuple)) else [out]


def check_against_eager(x, shape: ConvShape, mode: str, backend: str) -> float:
    """The backend's factors against eager's (relative Frobenius error over all blocks)."""
    kw = op_kwargs(shape, mode)
    expected = _as_list(patch_covariance(x, shape.kernel, backend="eager", **kw))
    got = _as_list(patch_covariance(x, shape.kernel, backend=backend, **kw))
    assert len(got) == len(expected)
    for g, e in zip(got, expected):
        assert g.shape == e.shape and g.dtype == e.dtype
        if backend != "eager":
            assert torch.equal(g, g.mT), f"{backend}: not exactly symmetric"
    err = testing.rel_error(torch.cat([g.reshape(-1) for g in got]),
                            torch.cat([e.reshape(-1) for e in expected]))
    rtol = testing.RTOL.get(x.dtype, 1e-2)
    assert err <= rtol, f"{backend} vs eager: relative error {err:.3e} > {rtol:.1e}"
    return err


def time_against_eager(run, backend: str, min_run_time: float = 0.25,
                       rounds: int = 2) -> tuple[dict[str, float], dict[str, float]]:
    """Medians of ``run(backend)`` and ``run('eager')`` with torch.utils.benchmark, alternating,
    the best of ``rounds`` for each (robust to load from other processes), and the fastest
    measured block of each."""
    which_list = ["eager"] if backend == "eager" else ["eager", backend]
    timers = {w: tbench.Timer(stmt=f"run({w!r})", globals={"run": run},
                              num_threads=torch.get_num_threads()) for w in which_list}
    best = {w: math.inf for w in which_list}
    fastest = {w: math.inf for w in which_list}
    for _ in range(rounds):
        for w, timer in timers.items():
            m = timer.blocked_autorange(min_run_time=min_run_time)
            best[w] = min(best[w], m.median)
            fastest[w] = min(fastest[w], min(m.times))
    return best, fastest


def memory_record(shape: ConvShape, mode: str, backend: str, dtype: torch.dtype,
                  device: torch.device, layout: str) -> dict:
    spec = {"shape": [shape.n, shape.c, shape.h, shape.w], "dtype": str(dtype).split(".")[-1],
            "layout": layout, "device": str(device), "threads": torch.get_num_threads(),
            "call": "kfac_kernels.ops:patch_covariance", "args": [shape.kernel],
            "kwargs": {**op_kwargs(shape, mode), "backend": backend}}
    return peak_extra_memory(spec)


def matmul_gflops(device_str: str, dtype_str: str) -> float:
    return _matmul_gflops(device_str, dtype_str, torch.get_num_threads())


@lru_cache(maxsize=None)
def _matmul_gflops(device_str: str, dtype_str: str, threads: int) -> float:
    """GFLOP/s of a large square matmul: the practical compute roof of the device."""
    device, dtype = torch.device(device_str), getattr(torch, dtype_str)
    size = 2048 if device.type == "cpu" else 8192
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)

    def mm():
        out = a @ b
        _sync(device)
        return out

    t = tbench.Timer(stmt="mm()", globals={"mm": mm},
                     num_threads=torch.get_num_threads()).blocked_autorange(min_run_time=0.5)
    return 2.0 * size ** 3 / t.median / 1e9


def measure(shape: ConvShape, mode: str, backend: str, device: torch.device,
            dtype: torch.dtype = torch.float32, layout: str = "contiguous",
            min_run_time: float = 0.25, with_memory: bool = True, rounds: int = 2) -> dict:
    """One case, as recorded: correctness, the two timings, memory of both."""
    rec = {"case": f"{shape.id}-{mode}", **asdict(shape), "mode": mode, "backend": backend,
           "device": str(device), "dtype": str(dtype).split(".")[-1], "layout": layout,
           "threads": torch.get_num_threads(),
           "factor_dims": sorted(set(factor_dims(shape, mode))),
           "num_factors": len(factor_dims(shape, mode)),
           "unfold_bytes": unfold_bytes(shape, dtype)}
    try:
        x = make_input(shape, dtype, device, layout)
        rec["rel_error_vs_eager"] = check_against_eager(x, shape, mode, backend)
        kw = op_kwargs(shape, mode)

        def run(which):
            out = patch_covariance(x, shape.kernel, backend=which, **kw)
            _sync(device)
            return out

        best, fastest = time_against_eager(run, backend, min_run_time, rounds)
    except Exception as err:  # noqa: BLE001 - an OOM is a result, anything else is raised
        if not _is_oom(err):
            raise
        rec["oom"] = str(err).splitlines()[0]
        return rec
    rec["eager_median_s"] = best["eager"]
    rec["backend_median_s"] = best[backend]
    rec["speedup_vs_eager"] = best["eager"] / best[backend]
    rec["eager_min_s"] = fastest["eager"]
    rec["backend_min_s"] = fastest[backend]
    rec["speedup_vs_eager_min"] = fastest["eager"] / fastest[backend]
    rec["gflops"] = flops(shape, mode) / best[backend] / 1e9
    rec["fraction_of_matmul_peak"] = rec["gflops"] / matmul_gflops(str(device),
                                                                   rec["dtype"])
    if with_memory:
        del x
        for prefix, which in (("", backend), ("eager_", "eager")):
            if prefix and backend == "eager":
                for key in ("peak_extra_bytes", "temporaries_bytes", "oom"):
                    if key in rec:
                        rec[prefix + key] = rec[key]
                continue
            mem = memory_record(shape, mode, which, dtype, device, layout)
            if "oom" in mem:
                rec[prefix + "oom"] = mem["oom"]
                continue
            rec[prefix + "peak_extra_bytes"] = mem["peak_extra_bytes"]
            rec[prefix + "temporaries_bytes"] = mem["peak_extra_bytes"] - mem["output_bytes"]
            rec["output_bytes"] = mem["output_bytes"]
            rec["input_bytes"] = mem["input_bytes"]
            rec["memory_method"] = mem["method"]
        if "temporaries_bytes" in rec and backend != "eager":
            # an unfolded tensor grows with the batch; accumulators and panels do not
            doubled = memory_record(replace(shape, n=2 * shape.n), mode, backend, dtype, device,
                                    layout)
            if "oom" not in doubled:
                rec["temporaries_2n_bytes"] = doubled["peak_extra_bytes"] - doubled[
                    "output_bytes"]
                rec["no_unfold"] = (rec["temporaries_2n_bytes"] - rec["temporaries_bytes"]
                                    < rec["unfold_bytes"] / 4)
    return rec


def _is_oom(err: BaseException) -> bool:
    if isinstance(err, (torch.OutOfMemoryError, MemoryError)):
        return True
    return isinstance(err, RuntimeError) and (
        "can't allocate memory" in str(err) or "out of memory" in str(err).lower())


# ---------------------------------------------------------------------------------------------
# pytest-benchmark

try:
    import pytest
except ImportError:  # pragma: no cover - script mode without pytest
    pytest = None

if pytest is not None and __name__ != "__main__":

    def _device_backends():
        params = []
        for device in testing.devices():
            marks = [pytest.mark.gpu] if device.type == "cuda" else []
            for backend in device_backends(device):
                params.append(pytest.param(device, backend, id=f"{device.type}-{backend}",
                                           marks=marks))
        return params

    @pytest.mark.parametrize("shape,mode", [pytest.param(s, m, id=f"{s.id}-{m}")
                                            for s, m in case_list()])
    @pytest.mark.parametrize("device,backend", _device_backends())
    def test_patch_covariance(benchmark, device, backend, shape, mode):
        dtype = torch.float32
        x = make_input(shape, dtype, device)
        check_against_eager(x, shape, mode, backend)  # correctness first
        kw = op_kwargs(shape, mode)

        def timed():
            out = patch_covariance(x, shape.kernel, backend=backend, **kw)
            _sync(device)
            return out

        benchmark.extra_info.update(backend=backend, case=f"{shape.id}-{mode}", mode=mode,
                                    dtype="float32", shape=[shape.n, shape.c, shape.h, shape.w],
                                    unfold_bytes=unfold_bytes(shape, dtype))
        benchmark.pedantic(timed, rounds=3, iterations=1, warmup_rounds=1)
        del x
        rec = measure(shape, mode, backend, device, dtype)
        rec["median_s"] = benchmark.stats.stats.median
        benchmark.extra_info.update({k: v for k, v in rec.items()
                                     if k not in ("name", "device")})
        if "oom" in rec:
            raise RuntimeError(f"out of memory: {rec['oom']}")


# ---------------------------------------------------------------------------------------------
# script mode


def environment(device: torch.device) -> dict:
    from bench.conftest import environment_info

    info = environment_info(device)
    info["native_extension"] = native_build()
    info["loadavg_1m"] = os.getloadavg()[0]
    info["cpu_count"] = os.cpu_count()
    return info


def native_build() -> dict | None:
    """The compiled extension this process loaded: path, modification time, sha256 prefix."""
    import hashlib

    from kfac_kernels._backend import native_module

    mod = native_module()
    if mod is None:
        return None
    path = Path(mod.__file__)
    stamp = datetime.datetime.fromtimestamp(path.stat().st_mtime, datetime.timezone.utc)
    return {"path": str(path.relative_to(path.parents[1])),
            "mtime": stamp.isoformat(timespec="seconds"),
            "sha256": hashlib.sha256(path.read_bytes()).hexdigest()[:16]}


def _mib(v) -> str:
    return "-" if v is None else f"{v / 2**20:.1f}"


def print_table(records: list[dict]) -> None:
    head = (f"{'case':58s} {'thr':>3s} {'backend':7s} {'t_backend ms':>12s} {'t_eager ms':>11s} "
            f"{'speedup':>8s} {'peak MiB':>9s} {'out MiB':>8s} {'tmp MiB':>8s} {'tmp 2N':>7s} "
            f"{'eager pk':>9s} "
            f"{'unfold MiB':>10s}")
    print(head)
    for r in records:
        if "oom" in r:
            print(f"{r['case']:58s} {r['threads']:3d} {r['backend']:7s} OOM: {r['oom']}")
            continue
        print(f"{r['case']:58s} {r['threads']:3d} {r['backend']:7s} "
              f"{r['backend_median_s'] * 1e3:12.2f} "
              f"{r['eager_median_s'] * 1e3:11.2f} {r['speedup_vs_eager']:8.2f} "
              f"{_mib(r.get('peak_extra_bytes')):>9s} {_mib(r.get('output_bytes')):>8s} "
              f"{_mib(r.get('temporaries_bytes')):>8s} {_mib(r.get('temporaries_2n_bytes')):>7s} "
              f"{_mib(r.get('eager_peak_extra_bytes')):>9s} {_mib(r['unfold_bytes']):>10s}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a few cases only")
    parser.add_argument("--json", type=Path, help="write the records here")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--backends", nargs="*", help="default: every kernel backend present")
    parser.add_argument("--cases", nargs="*", help="substrings of case names to keep")
    parser.add_argument("--min-run-time", type=float, default=0.25)
    parser.add_argument("--rounds", type=int, default=2,
                        help="alternating timing rounds (the best median of each side is kept)")
    parser.add_argument("--threads", type=int, nargs="*",
                        help="intra-op thread counts to run (default: torch's)")
    parser.add_argument("--no-memory", action="store_true")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    backends = args.backends or [b for b in device_backends(device) if b != "eager"] or ["eager"]
    env = environment(device)
    env["matmul_gflops_float32"] = {}
    for threads in args.threads or [torch.get_num_threads()]:
        torch.set_num_threads(threads)
        env["matmul_gflops_float32"][threads] = matmul_gflops(str(device), "float32")
    print(json.dumps(env, indent=1))
    records = []
    # memory is measured at the first thread count only (it hardly depends on it)
    for i, threads in enumerate(args.threads or [torch.get_num_threads()]):
        torch.set_num_threads(threads)
        for shape, mode in case_list(args.quick):
            name = f"{shape.id}-{mode}"
            if args.cases and not any(c in name for c in args.cases):
                continue
            for backend in backends:
                rec = measure(shape, mode, backend, device, min_run_time=args.min_run_time,
                              with_memory=not args.no_memory and i == 0,
                              rounds=args.rounds)
                records.append(rec)
                print_table([rec])
                sys.stdout.flush()
    print()
    print_table(records)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        env["finished"] = datetime.datetime.now(datetime.timezone.utc).isoformat(
            timespec="seconds")
        env["loadavg_1m_end"] = os.getloadavg()[0]
        # the memory measurements run in fresh processes: they load the extension as it is then
        env["native_extension_end"] = native_build()
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump({"benchmark": "patch_covariance", "environment": env,
                       "results": records}, fh, indent=1)
            fh.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
