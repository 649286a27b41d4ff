"""What a GPU does and the interpreter does not: the Triton kernels at the edges of their
numbers.

* bfloat16 rounding of the NaNs NVIDIA GPUs produce (``0x7FFFFFFF``, ``0xFFFFFFFF``): the carry of
  round-to-nearest-even on the bits must not wrap them to -0.0 / +0.0 (a NaN step silently
  becoming a zero step). The interpreter's own NaNs are ``0x7FC00000``, which survived, so the
  patterns are fed in explicitly.
* Offsets past 2^31: ``row * row_stride`` of a parameter view must be computed in int64.
* Grid limits: axis 0 holds up to 2^31 - 1 programs, axes 1 and 2 up to 65535; every launcher is
  run on shapes past 65535 tiles with the kernel replaced by a recorder of its grid.

    TRITON_INTERPRET=1 python -m pytest tests/test_triton_limits.py
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch

from _backend_cases import all_cases
from kfac_kernels.testing import backends_for

BACKENDS = backends_for("cpu")
needs_triton = pytest.mark.skipif("triton" not in BACKENDS,
                                  reason="Triton on CPU tensors needs TRITON_INTERPRET=1 "
                                         "(and triton)")
GPU_NAN, GPU_NAN_NEG = 0x7FFFFFFF, 0xFFFFFFFF  # as bit patterns of fp32 (int64 here)


def _fp32_from_bits(bits: list[int]) -> torch.Tensor:
    return torch.tensor(bits, dtype=torch.int64).to(torch.int32).view(torch.float32)


# ------------------------------------------------------------------------- bf16 rounding

if "triton" in BACKENDS:
    import triton
    import triton.language as tl

    from kfac_kernels._triton._rounding import round_to_bfloat16

    @triton.jit
    def _round_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
        i = tl.arange(0, BLOCK)
        x = tl.load(x_ptr + i, mask=i < n, other=0.0)
        tl.store(y_ptr + i, round_to_bfloat16(x), mask=i < n)


@needs_triton
def test_bf16_rounding_of_bit_patterns():
    """The shared rounding helper on NaN payloads of both signs, infinities, the largest finite
    value (rounds to inf), ties to even, subnormals and random values: NaN stays NaN, everything
    else bit for bit as torch rounds (to nearest even)."""
    nans = [GPU_NAN, GPU_NAN_NEG, 0x7FC00000, 0xFFC00000, 0x7F800001, 0x7FBFFFFF, 0x7F80FFFF]
    others = [0x7F800000, 0xFF800000, 0x7F7FFFFF, 0xFF7FFFFF, 0x3F808000, 0x3F818000,
              0x3F808001, 0x00000001, 0x80000001, 0x00008000, 0x00018000, 0x0, 0x80000000]
    gen = torch.Generator().manual_seed(0)
    rand = torch.randn(100, generator=gen) * torch.logspace(-30, 30, 100)
    x = torch.cat([_fp32_from_bits(nans + others), rand])
    y = torch.empty(x.shape, dtype=torch.bfloat16)
    _round_kernel[(1,)](x, y, x.numel(), BLOCK=triton.next_power_of_2(x.numel()))
    k = len(nans)
    assert y[:k].isnan().all(), [hex(int(v)) for v in y[:k].view(torch.int16) & 0xFFFF]
    want = x[k:].to(torch.bfloat16)
    assert torch.equal(y[k:].view(torch.int16), want.view(torch.int16))


@pytest.mark.parametrize("backend,device", all_cases())
def test_singd_block_step_keeps_gpu_nans(backend, device):
    """A NaN (GPU bit patterns) in the momentum buffer makes the bfloat16 parameters NaN, as the
    definition says, on every backend: never a zero (on a GPU the arithmetic itself produces
    0x7FFFFFFF)."""
    from test_singd_block_step import _problem, _run

    args = _problem(torch.bfloat16)
    wb = args[8]
    wb.view(torch.int32)[0, 0] = torch.tensor(GPU_NAN, dtype=torch.int64).to(torch.int32)
    wb.view(torch.int32)[1, 2] = torch.tensor(GPU_NAN_NEG, dtype=torch.int64).to(torch.int32)
    weight, bias, buf, _ = _run(backend, args, device=device)
    assert weight[0, 0].isnan() and weight[1, 2].isnan(), (float(weight[0, 0]),
                                                           float(weight[1, 2]))
    assert buf[0, 0].isnan() and buf[1, 2].isnan()
    assert torch.isfinite(weight[2:]).all() and torch.isfinite(bias).all()


# ----------------------------------------------------------------------- int64 offsets

_BIG_STRIDE = textwrap.dedent("""
    import sys, torch
    from kfac_kernels.ops.singd_diagonal_step import singd_diagonal_step
    rows, cols, stride = 3, 8, 2**30 + 64   # the stride is an int32; 2 * stride is not
    try:  # 4 GiB of address space; only the three rows' pages are ever touched
        store = torch.empty((rows - 1) * stride + cols, dtype=torch.bfloat16)
    except RuntimeError:
        print("NO-ADDRESS-SPACE"); sys.exit(0)
    param = store.as_strided((rows, cols), (stride, 1))
    start = torch.arange(rows * cols, dtype=torch.float32).reshape(rows, cols) / 8
    for backend in sys.argv[1:]:
        param.copy_(start)
        buf = torch.zeros(rows, cols)
        print("RUN", backend, flush=True)
        singd_diagonal_step(param, torch.ones(rows, cols, dtype=torch.bfloat16),
                            torch.ones(rows), torch.ones(cols), buf, 0.5, 0.0, 0.0, True,
                            backend=backend)
        assert torch.equal(param.float(), start - 0.5), (backend, param)
        assert torch.equal(buf, torch.ones(rows, cols)), (backend, buf)
        print("OK", backend, flush=True)
""")


def test_singd_diagonal_step_rows_past_2_31():
    """A parameter view whose last row starts past element 2^31 of its storage (the kernels
    compute ``row * row_stride``), on every backend: in a fresh process, since an int32 offset
    crashes it (the output says which backend ran last)."""
    backends = [b for b in BACKENDS if b != "eager"]
    root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        p for p in (root, os.environ.get("PYTHONPATH")) if p)}
    done = subprocess.run([sys.executable, "-c", _BIG_STRIDE, *backends], capture_output=True,
                          text=True, timeout=300, cwd=root, env=env)
    if "NO-ADDRESS-SPACE" in done.stdout:
        pytest.skip("this machine cannot reserve 4 GiB of address space")
    ok = [b for b in backends if f"OK {b}" in done.stdout.split("\n")]
    assert done.returncode == 0 and ok == backends, (
        f"exit status {done.returncode}\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")


# ------------------------------------------------------------------------------ grids

class _GridRecorder:
    """Stands in for a ``@triton.jit`` kernel: ``kernel[grid](...)`` records the grid only."""

    def __init__(self):
        self.grids = []

    def __getitem__(self, grid):
        self.grids.append(tuple(grid))
        return lambda *args, **kwargs: None


def _within_cuda_limits(grid) -> bool:
    limits = (2**31 - 1, 65535, 65535)
    return all(0 < g <= lim for g, lim in zip(grid, limits))


@needs_triton
def test_launch_grids_within_cuda_limits(monkeypatch):
    """Every launcher at sizes past 65535 column blocks / row ranges: the grids it asks for fit
    CUDA's limits (the interpreter has none)."""
    from kfac_kernels._triton import (_tiles, patch_covariance, patch_covariance_channels,
                                      patch_covariance_reduce, singd_diagonal_step,
                                      symmetric_factor_update)

    recorders = {}
    for module, name in ((singd_diagonal_step, "_step_kernel"),
                         (symmetric_factor_update, "_sfu_kernel"),
                         (patch_covariance, "_pc_expand_kernel"),
                         (patch_covariance_reduce, "_pc_mean_kernel"),
                         (patch_covariance_channels, "_pc_expand_channels_kernel"),
                         (_tiles, "split_reduce_kernel")):
        recorders[name] = _GridRecorder()
        monkeypatch.setattr(module, name, recorders[name])
    cols = 65536 * 64 + 1   # 65537 column blocks of 64
    param = torch.zeros(1, cols, dtype=torch.bfloat16)
    singd_diagonal_step.singd_diagonal_step_triton(
        param, torch.zeros_like(param), torch.ones(1), torch.ones(cols),
        torch.zeros(1, cols), 0.1, 0.9, 0.0, False)
    rows = 65536 * 32 + 1   # more row ranges asked for than axis 1 holds
    symmetric_factor_update.symmetric_factor_update_triton(None, torch.zeros(rows, 1), 0.0, 1.0,
                                                           split_m=10**6)
    x = torch.zeros(1, 1, 1, rows)
    args = ((1, 1), (1, 1), (1, 1), (0, 0), (1, rows), 1, 0, 1, 1)
    patch_covariance.patch_covariance_triton(x, *args, False, True, None, 0.0, 1.0,
                                             splits=10**6)
    patch_covariance.patch_covariance_triton(x, *args, True, True, None, 0.0, 1.0)
    patch_covariance.patch_covariance_triton(x.to(torch.bfloat16), *args, False, True, None,
                                             0.0, 1.0, splits=10**6, kernel="channels")
    for name, rec in recorders.items():
        assert rec.grids, f"{name} was not launched"
        for grid in rec.grids:
            assert _within_cuda_limits(grid), f"{name}: grid {grid}"


# ------------------------------------------------------------------- SINGD block limits

def _block_problem(op_name: str, b: int):
    """Arguments of ``op_name`` with slots of size ``b`` (one layer), and the function."""
    gen = torch.Generator().manual_seed(2)
    if op_name == "singd_block_step":
        from kfac_kernels.ops.singd_block_step import singd_block_step as fn
        rows, cols = b + 3, b + 5
        c = torch.randn(2, b, b, generator=gen) * 0.1 + torch.eye(b)
        k = torch.randn(2, b, b, generator=gen) * 0.1 + torch.eye(b)
        args = [torch.randn(rows, cols, generator=gen), torch.randn(rows, cols, generator=gen),
                None, None, c, [b, 3], k, [b, 5], torch.zeros(rows, cols), None,
                0.1, 0.9, 0.0, True]
        return fn, args
    from kfac_kernels.ops.singd_block_factor_update import singd_block_factor_update as fn
    k = torch.randn(1, b, b, generator=gen) * 0.1 + torch.eye(b)
    u = torch.randn(1, b, b, generator=gen)
    u = u @ u.mT / b
    args = [k, k.clone(), None, None, u, u.clone(), [b], [b], [0, 1], [0, 1], 0.1, 0.5, 0.05,
            False]
    return fn, args


@needs_triton
@pytest.mark.parametrize("op_name", ["singd_block_step", "singd_block_factor_update"])
def test_singd_blocks_above_the_triton_limit(op_name, monkeypatch):
    """Blocks of 64 spill the Triton kernels' registers (bench/results/static_sm80.json keeps
    only those that fit): an explicit backend="triton" refuses them with the limit in the
    message; "auto" (as on a CUDA tensor without the CUDA extension) computes them with the
    eager path and says so once."""
    import importlib

    op = importlib.import_module(f"kfac_kernels.ops.{op_name}")
    kernel = importlib.import_module(f"kfac_kernels._triton.{op_name}")
    assert op.MAX_BLOCK["triton"] == kernel.MAX_BLOCK
    fn, args = _block_problem(op_name, 64)
    with pytest.raises(ValueError, match=rf"{op_name}: backend='triton' takes blocks of at most "
                                         rf"32, got blocks of 64"):
        fn(*[a.clone() if isinstance(a, torch.Tensor) else a for a in args], backend="triton")
    want = [a.clone() if isinstance(a, torch.Tensor) else a for a in args]
    fn(*want, backend="eager")
    monkeypatch.setattr(op, "resolve_backend",
                        lambda backend, device, name, prefer=None: "triton")
    monkeypatch.setattr(op, "_warned", set())
    got = [a.clone() if isinstance(a, torch.Tensor) else a for a in args]
    with pytest.warns(UserWarning, match=rf"{op_name}: blocks of 64 exceed the 'triton' kernel's "
                                         rf"limit \(32\) and are computed by the eager path"):
        fn(*got)
    for g, w in zip(got, want):
        if isinstance(g, torch.Tensor):
            assert torch.equal(g, w)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fn(*[a.clone() if isinstance(a, torch.Tensor) else a for a in args])
