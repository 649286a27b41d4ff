"""Peak extra memory of one op call, measured robustly.

CPU: the call runs in a fresh Python process. That process builds the input, runs the call once
on the first example (to load code and start threads), resets the kernel's peak-RSS counter
(``/proc/self/clear_refs``), reads its resident size (the baseline: the input and the loaded
code), runs the call on the whole input and reads the peak resident size (``VmHWM``). The peak
extra memory is the difference: the output plus every temporary the call allocated. glibc's
``malloc`` is told to serve every allocation of 64 KiB or more with its own ``mmap`` and to give
freed memory back at once (``MALLOC_MMAP_THRESHOLD_``, ``MALLOC_TRIM_THRESHOLD_``), so memory freed
by the warm-up cannot be reused unseen. Where ``clear_refs`` cannot be written, ``ru_maxrss``
(the peak since the process started) is used instead, which is correct as long as the warm-up
peaked below the real call.

CUDA: in process, ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``, relative
to the memory allocated before the call.

An allocation failure is reported as ``{"oom": message}``, a child killed by a signal (the kernel's
OOM killer) as ``{"oom": "killed by signal N"}``.

    from bench.memory import peak_extra_memory
    peak_extra_memory({"shape": [8, 64, 56, 56], "dtype": "float32", "layout": "contiguous",
                       "call": "kfac_kernels.ops:patch_covariance",
                       "args": [3], "kwargs": {"padding": 1, "backend": "cpu"}})
    # -> {"peak_extra_bytes": ..., "baseline_bytes": ..., "method": "VmHWM after clear_refs"}

The child is also runnable by hand: ``python bench/memory.py '<spec as JSON>'``.
"""
from __future__ import annotations

import gc
import importlib
import json
import os
import resource
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

_MALLOC_ENV = {
    "MALLOC_MMAP_THRESHOLD_": "65536",
    "MALLOC_TRIM_THRESHOLD_": "65536",
    "MALLOC_ARENA_MAX": "2",
}


def _is_oom(err: BaseException) -> bool:
    if isinstance(err, MemoryError):
        return True
    text = str(err).lower()
    return "out of memory" in text or "can't allocate memory" in text or (
        "defaultcpuallocator" in text and "allocate" in text)


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as fh:
            fh.write("5")
    except OSError:
        return False
    return True


def _resolve(call: str):
    module, _, attr = call.partition(":")
    obj = importlib.import_module(module)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


def _make_input(spec: dict):
    import torch

    dtype = getattr(torch, spec.get("dtype", "float32"))
    device = torch.device(spec.get("device", "cpu"))
    gen = torch.Generator().manual_seed(int(spec.get("seed", 0)))
    x = torch.randn(spec["shape"], generator=gen, dtype=torch.float32).to(dtype)
    if spec.get("layout", "contiguous") == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    return x.to(device)


def _run_child(spec: dict) -> dict:
    """The measurement itself (in the fresh process)."""
    import torch

    torch.set_num_threads(int(spec.get("threads", torch.get_num_threads())))
    fn = _resolve(spec["call"])
    args, kwargs = spec.get("args", []), spec.get("kwargs", {})
    try:
        x = _make_input(spec)
        fn(x[:1], *args, **kwargs)  # warm-up: code, threads, small buffers
    except Exception as err:  # noqa: BLE001 - reported to the parent
        if _is_oom(err):
            return {"oom": str(err).splitlines()[0]}
        raise
    gc.collect()
    input_bytes = x.untyped_storage().nbytes()
    if _reset_peak():
        method = "VmHWM after clear_refs"
        baseline_kib = _status_kib("VmRSS")
    else:
        method = "ru_maxrss"
        baseline_kib = _status_kib("VmRSS") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    try:
        out = fn(x, *args, **kwargs)
    except Exception as err:  # noqa: BLE001
        if _is_oom(err):
            return {"oom": str(err).splitlines()[0], "method": method}
        raise
    if method == "ru_maxrss":
        peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    else:
        peak_kib = _status_kib("VmHWM")
    outs = out if isinstance(out, (list, tuple)) else [out]
    output_bytes = sum(o.untyped_storage().nbytes() for o in outs)
    return {"peak_extra_bytes": max(0, (peak_kib - baseline_kib) * 1024),
            "baseline_bytes": baseline_kib * 1024, "input_bytes": input_bytes,
            "output_bytes": output_bytes, "method": method}


def _cuda_peak(spec: dict) -> dict:
    import torch

    fn = _resolve(spec["call"])
    args, kwargs = spec.get("args", []), spec.get("kwargs", {})
    device = torch.device(spec["device"])
    try:
        x = _make_input(spec)
        fn(x[:1], *args, **kwargs)
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        out = fn(x, *args, **kwargs)
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
    except torch.OutOfMemoryError as err:
        torch.cuda.empty_cache()
        return {"oom": str(err).splitlines()[0], "method": "torch.cuda.max_memory_allocated"}
    outs = out if isinstance(out, (list, tuple)) else [out]
    result = {"peak_extra_bytes": peak - base, "baseline_bytes": base,
              "input_bytes": x.untyped_storage().nbytes(),
              "output_bytes": sum(o.untyped_storage().nbytes() for o in outs),
              "method": "torch.cuda.max_memory_allocated"}
    del x, out, outs
    torch.cuda.empty_cache()
    return result


def peak_extra_memory(spec: dict, *, timeout: float = 600.0) -> dict:
    """Peak extra memory of ``call(x, *args, **kwargs)`` for the input described by ``spec``
    (``shape``, ``dtype`` name, ``layout``, ``device``, ``seed``, ``threads``)."""
    if spec.get("device", "cpu").startswith("cuda"):
        return _cuda_peak(spec)
    env = {**os.environ, **_MALLOC_ENV}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), json.dumps(spec)],
                          capture_output=True, text=True, timeout=timeout, cwd=str(ROOT),
                          env=env, check=False)
    if proc.returncode < 0:
        return {"oom": f"killed by signal {-proc.returncode}"}
    if proc.returncode != 0:
        raise RuntimeError(f"memory measurement failed ({proc.returncode}): "
                           f"{proc.stderr.strip()[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    spec = json.loads(argv[0])
    print(json.dumps(_run_child(spec)))
    return 0


if __name__ == "__main__":
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    sys.exit(main(sys.argv[1:]))
