"""Microbenchmark: ``symmetric_factor_update`` (``decay * F + alpha * X^T X``), kernel vs eager.

For every backend present on every device (Triton on CPU tensors is skipped: the interpreter is a
correctness tool, not a fast path) and K-FAC-sized shapes, the kernel's output is first checked
against the eager backend, then timed by pytest-benchmark. For the ratio, the backend and eager are
timed once more, alternately, with ``torch.utils.benchmark`` in the same test. ``extra_info``
gets::

    median_s (pytest-benchmark), gflops (from median_s),
    eager_median_s, backend_median_s (torch.utils.benchmark, alternating, best of two),
    speedup_vs_eager = eager_median_s / backend_median_s (> 1: the backend is faster)

``gflops`` counts the full product, ``2 B m d^2`` flops, whatever a kernel skips.

    python -m pytest bench/bench_symmetric_factor_update.py --benchmark-only
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.utils.benchmark as tbench

from kfac_kernels import testing
from kfac_kernels.ops import symmetric_factor_update

# (B or None, m, d): a linear layer's A and G factors, a wide layer, stacked groups, and a
# transformer MLP's 3072-wide side over 2080 tokens (more tile pairs than one band holds)
SHAPES = [(None, 4096, 256), (None, 16384, 576), (8, 2048, 128), (None, 2080, 3072)]
DECAY = 0.95


def _device_backends():
    params = []
    for device in testing.devices():
        for backend in testing.backends_for(device):
            if device.type == "cpu" and backend == "triton":
                continue  # the Triton interpreter is for correctness only
            marks = [pytest.mark.gpu] if device.type == "cuda" else []
            params.append(pytest.param(device, backend, id=f"{device.type}-{backend}",
                                       marks=marks))
    return params


def _shape_id(shape) -> str:
    b, m, d = shape
    return f"m{m}-d{d}" if b is None else f"B{b}-m{m}-d{d}"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _cases():
    """float32 at every shape, float64 at the shapes no larger than 4096 x 256."""
    out = []
    for shape in SHAPES:
        for dtype in (torch.float32, torch.float64):
            b, m, d = shape
            if dtype == torch.float64 and (b or 1) * m * d * d > 4096 * 256 * 256:
                continue
            out.append(pytest.param(shape, dtype,
                                    id=f"{_shape_id(shape)}-{str(dtype).replace('torch.', '')}"))
    return out


@pytest.mark.parametrize("shape,dtype", _cases())
@pytest.mark.parametrize("device,backend", _device_backends())
def test_symmetric_factor_update(benchmark, device, backend, shape, dtype):
    b, m, d = shape
    lead = () if b is None else (b,)
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn((*lead, m, d), generator=gen, device=device, dtype=dtype)
    r = torch.randn((*lead, d, d), generator=gen, device=device, dtype=dtype)
    factor = r + r.mT
    alpha = (1.0 - DECAY) / m

    def run(which):
        return symmetric_factor_update(factor, x, DECAY, alpha, backend=which)

    # correctness first
    expected = run("eager")
    out = run(backend)
    testing.assert_close_rel(out, expected, rtol=testing.RTOL[dtype], msg=f"{backend} vs eager")
    if backend != "eager":
        assert torch.equal(out, out.mT)
    del out, expected

    def timed():
        result = run(backend)
        _sync(device)
        return result

    benchmark.extra_info.update(backend=backend, shape=list(shape), dtype=str(dtype))
    benchmark(timed)

    median = benchmark.stats.stats.median
    # the ratio comes from one method for both: torch.utils.benchmark, eager and backend
    # alternating, the best median of each kept (robust to load from other processes)
    timers = {which: tbench.Timer(stmt=f"run({which!r})", globals={"run": run},
                                  num_threads=torch.get_num_threads())
              for which in ("eager", backend)}
    best = {which: math.inf for which in timers}
    for _ in range(2):
        for which, timer in timers.items():
            best[which] = min(best[which], timer.blocked_autorange(min_run_time=0.25).median)
    nb = 1 if b is None else b
    benchmark.extra_info.update(
        median_s=median,
        eager_median_s=best["eager"],
        backend_median_s=best[backend],
        speedup_vs_eager=best["eager"] / best[backend],
        gflops=2.0 * nb * m * d * d / median / 1e9,
    )
