"""Parity and behaviour tests for ``kfac_kernels.ops.symmetric_factor_update``.

Every backend present on every device (``testing.backends_for``) is compared with an fp64
reference computed independently of the op (``x.double().mT @ x.double()``), over odd sizes,
batched inputs, non-contiguous, strided and broadcast layouts, ``factor=None`` and a variety of
``decay``/``alpha``. The Triton kernels run on CPU tensors only under the interpreter, so

    TRITON_INTERPRET=1 python -m pytest tests/test_symmetric_factor_update.py

covers the eager, C++ (``cpu``) and Triton backends on a machine without a GPU. Tests for CUDA
tensors carry the ``gpu`` marker and are skipped without a CUDA device.
"""
from __future__ import annotations

import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import kfac_kernels._backend as _backend
from kfac_kernels import testing
from kfac_kernels._backend import BackendUnavailableError, resolve_backend
from kfac_kernels.ops import symmetric_factor_update

from _hypothesis import assume, given, settings, st  # noqa: E402

OP = "symmetric_factor_update"
DTYPES = (torch.float32, torch.float64)
requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _device_backends():
    params = []
    for device in testing.devices():
        marks = [pytest.mark.gpu] if device.type == "cuda" else []
        for backend in testing.backends_for(device):
            params.append(pytest.param(device, backend, id=f"{device.type}-{backend}",
                                       marks=marks))
    return params


DEVICE_BACKENDS = _device_backends()


def _dtype_id(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


# ---------------------------------------------------------------------------------------------
# inputs and the reference


def reference(factor, x, decay, alpha):
    """``decay * factor + alpha * x^T x`` in fp64, written without the op's code."""
    x64 = x.detach().to(torch.float64)
    out = alpha * (x64.mT @ x64)
    if factor is not None:
        out = out + decay * factor.detach().to(torch.float64)
    return out


def _layout(t: torch.Tensor, layout: str) -> torch.Tensor:
    """``t`` (or, for ``"expanded"``, its first row broadcast) in the given memory layout."""
    if layout == "contiguous":
        return t.contiguous()
    if layout == "transposed":
        return testing.non_contiguous(t)
    if layout == "strided":
        # every 2nd row and 3rd column of a NaN-filled buffer: a read outside the view poisons
        # the result
        big = torch.full((*t.shape[:-2], 2 * t.shape[-2], 3 * t.shape[-1]), math.nan,
                         dtype=t.dtype, device=t.device)
        big[..., ::2, ::3] = t
        return big[..., ::2, ::3]
    if layout == "expanded":  # row stride 0
        return t[..., :1, :].expand(t.shape) if t.shape[-2] > 0 else t
    if layout == "batch_inner":  # batch stride 1
        assert t.dim() == 3
        return t.movedim(0, -1).contiguous().movedim(-1, 0)
    raise AssertionError(layout)


def make_inputs(shape, dtype, device, *, with_factor=True, x_layout="contiguous",
                factor_layout="contiguous", seed=0):
    """Random ``x`` of ``shape`` ((m, d) or (B, m, d)) and an exactly symmetric factor."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype=dtype, device=device)
    x = _layout(x, x_layout)
    factor = None
    if with_factor:
        d = shape[-1]
        r = torch.randn((*shape[:-2], d, d), generator=gen, dtype=torch.float64)
        sym = (r + r.mT).to(dtype=dtype, device=device)  # r_ij + r_ji: exactly symmetric
        factor = _layout(sym, factor_layout)
    return factor, x


def check(out, factor, x, decay, alpha, backend, factor_before=None):
    """Parity with the fp64 reference, output metadata, exact symmetry, no input mutation."""
    d = x.shape[-1]
    assert out.shape == (*x.shape[:-2], d, d)
    assert out.dtype == x.dtype
    assert out.device == x.device
    testing.assert_close_rel(out, reference(factor, x, decay, alpha), rtol=testing.RTOL[x.dtype],
                             msg=f"backend={backend} shape={tuple(x.shape)} dtype={x.dtype}")
    if backend != "eager":
        # the kernels compute one triangle and mirror it
        assert torch.equal(out, out.mT), f"backend={backend}: output is not exactly symmetric"
    if factor is not None:
        assert out.data_ptr() != factor.data_ptr() or out.numel() == 0
        if factor_before is not None:
            assert torch.equal(factor, factor_before), "the input factor was modified"


# ---------------------------------------------------------------------------------------------
# parity


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=_dtype_id)
@pytest.mark.parametrize("d", [1, 5, 33, 70])
@pytest.mark.parametrize("m", [0, 1, 7, 130])
def test_parity_shapes(device, backend, dtype, d, m):
    factor, x = make_inputs((m, d), dtype, device, seed=m * 100 + d)
    before = factor.clone()
    decay, alpha = 0.95, 0.05 / max(m, 1)
    out = symmetric_factor_update(factor, x, decay, alpha, backend=backend)
    check(out, factor, x, decay, alpha, backend, before)


@pytest.mark.parametrize("dtype", DTYPES, ids=_dtype_id)
@pytest.mark.parametrize("m,d", [(300, 700), (300, 768), (2100, 100), (5, 300)],
                         ids=["direct", "direct-whole-tiles", "row-slices", "one-chunk"])
def test_cpu_kernel_same_bits_for_any_thread_count(dtype, m, d):
    """The C++ kernel splits work by problem size only: more tile pairs than one band holds
    (700 columns: a partial last tile column in scratch tiles; 768: whole tiles only), summed
    straight into the output chunk by chunk, row slices summed in a fixed order (100 columns,
    2100 rows), a single chunk. One thread and two give the same bits, and the result matches
    the fp64 reference."""
    if "cpu" not in testing.backends_for(torch.device("cpu")):
        pytest.skip("the C++ extension is not built")
    factor, x = make_inputs((m, d), dtype, "cpu", seed=d)
    before = factor.clone()
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = symmetric_factor_update(factor, x, 0.9, 1.0 / m, backend="cpu")
        torch.set_num_threads(2)
        two = symmetric_factor_update(factor, x, 0.9, 1.0 / m, backend="cpu")
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)
    check(one, factor, x, 0.9, 1.0 / m, "cpu", before)


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=_dtype_id)
@pytest.mark.parametrize("with_factor", [True, False], ids=["factor", "no_factor"])
@pytest.mark.parametrize("shape", [(1, 5), (130, 33), (2, 70)], ids=str)
def test_parity_batched(device, backend, dtype, with_factor, shape):
    m, d = shape
    factor, x = make_inputs((3, m, d), dtype, device, with_factor=with_factor, seed=7)
    out = symmetric_factor_update(factor, x, 0.9, 0.1, backend=backend)
    check(out, factor, x, 0.9, 0.1, backend)
    # the batch is B independent updates
    for b in range(3):
        fb = None if factor is None else factor[b]
        testing.assert_close_rel(out[b], reference(fb, x[b], 0.9, 0.1), rtol=testing.RTOL[dtype])


def _layout_cases():
    """Every x layout, 2-D and 3-D, each with no factor and with one of the factor layouts."""
    x_cases = [*[(False, lay) for lay in ("contiguous", "transposed", "strided", "expanded")],
               *[(True, lay) for lay in ("contiguous", "transposed", "strided", "expanded",
                                         "batch_inner")]]
    factor_layouts = ("contiguous", "transposed", "strided")
    cases = []
    for k, (batched, x_layout) in enumerate(x_cases):
        for factor_layout in (None, factor_layouts[k % 3]):
            cases.append(pytest.param(batched, x_layout, factor_layout,
                                      id=f"{'3d' if batched else '2d'}-x_{x_layout}"
                                         f"-factor_{factor_layout}"))
    return cases


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=_dtype_id)
@pytest.mark.parametrize("batched,x_layout,factor_layout", _layout_cases())
def test_parity_layouts(device, backend, dtype, factor_layout, x_layout, batched):
    shape = (2, 45, 37) if batched else (45, 37)
    factor, x = make_inputs(shape, dtype, device, with_factor=factor_layout is not None,
                            x_layout=x_layout, factor_layout=factor_layout or "contiguous",
                            seed=11)
    if x_layout != "contiguous":
        assert not x.is_contiguous()
    before = None if factor is None else factor.clone()
    out = symmetric_factor_update(factor, x, 0.8, 0.3, backend=backend)
    check(out, factor, x, 0.8, 0.3, backend, before)


DECAY_ALPHA = [
    (0.95, 0.05 / 130),  # K-FAC moving average
    (1.0, 1.0),  # plain sum
    (0.0, 2.5),  # overwrite
    (0.5, 0.0),  # decay only
    (-0.5, 3e-3),
    (1.5, -0.25),
    (2, 3),  # Python ints are accepted
]


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=_dtype_id)
@pytest.mark.parametrize("decay,alpha", DECAY_ALPHA, ids=str)
def test_parity_decay_alpha(device, backend, dtype, decay, alpha):
    factor, x = make_inputs((130, 33), dtype, device, seed=3)
    out = symmetric_factor_update(factor, x, decay, alpha, backend=backend)
    check(out, factor, x, decay, alpha, backend)


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=_dtype_id)
def test_factor_none_ignores_decay(device, backend, dtype):
    _, x = make_inputs((20, 9), dtype, device, with_factor=False)
    a = symmetric_factor_update(None, x, 123.0, 0.5, backend=backend)
    b = symmetric_factor_update(None, x, 0.0, 0.5, backend=backend)
    assert torch.equal(a, b)
    check(a, None, x, 0.0, 0.5, backend)
    # and it equals a zero factor
    z = torch.zeros(9, 9, dtype=dtype, device=device)
    testing.assert_close_rel(symmetric_factor_update(z, x, 0.7, 0.5, backend=backend), a,
                             rtol=testing.RTOL[dtype])


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_empty_batch(device, backend):
    x = torch.randn(0, 4, 3, device=device)
    out = symmetric_factor_update(None, x, 0.9, 0.1, backend=backend)
    assert out.shape == (0, 3, 3)


@pytest.mark.parametrize("device", [pytest.param(d, id=d.type, marks=[pytest.mark.gpu]
                                                 if d.type == "cuda" else [])
                                    for d in testing.devices()])
def test_auto_matches_resolved_backend(device):
    factor, x = make_inputs((30, 12), torch.float64, device)
    chosen = resolve_backend("auto", device, OP)
    assert chosen in testing.backends_for(device)
    out = symmetric_factor_update(factor, x, 0.9, 0.1)
    assert torch.equal(out, symmetric_factor_update(factor, x, 0.9, 0.1, backend=chosen))


# ---------------------------------------------------------------------------------------------
# Triton launcher options (tile sizes, the row split), on every device where Triton runs


TRITON_DEVICES = [pytest.param(dev, id=dev.type,
                               marks=[pytest.mark.gpu] if dev.type == "cuda" else [])
                  for dev in testing.devices() if "triton" in testing.backends_for(dev)]


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=_dtype_id)
@pytest.mark.parametrize("block,split_m,batched", [
    (16, 1, False), (16, 3, True), (32, 4, False), (64, 2, True),
], ids=str)
def test_triton_tiling(device, dtype, block, split_m, batched):
    """Several tiles and row ranges at every row step a launch can use (the largest fp64 tile
    is 32)."""
    from kfac_kernels._triton import _tiles
    from kfac_kernels._triton.symmetric_factor_update import (symmetric_factor_update_triton,
                                                               tile_steps)

    block = min(block, max(_tiles.GRAM_BLOCKS[dtype]))
    shape = (2, 70, 37) if batched else (70, 37)  # 3 tiles per side at block 16
    factor, x = make_inputs(shape, dtype, device, x_layout="strided", seed=5)
    for block_m in tile_steps(dtype, block, on_gpu=False):
        for f in (factor, None):
            out = symmetric_factor_update_triton(f, x, 0.9, 0.2, block=block, block_m=block_m,
                                                 split_m=split_m)
            check(out, f, x, 0.9, 0.2, "triton")


def test_triton_tile_overrides_are_checked():
    """Only tile sizes a launch picks anyway (compiled ahead of time and checked for spills) are
    accepted as overrides."""
    if "triton" not in testing.backends_for("cpu"):
        pytest.skip("Triton on CPU tensors needs TRITON_INTERPRET=1 (and triton)")
    from kfac_kernels._triton.symmetric_factor_update import symmetric_factor_update_triton

    x = torch.randn(8, 5)
    with pytest.raises(ValueError, match=r"symmetric_factor_update_triton: torch.float32 tiles "
                                         r"are block in \(16, 32, 64\) and, at block 128, row "
                                         r"step in \(32,\), got 128 and 32"):
        symmetric_factor_update_triton(None, x, 0.0, 1.0, block=128)


def test_triton_package_is_lazy():
    """Without Triton installed, ``kfac_kernels`` and ``kfac_kernels._triton`` import (torch
    itself imports triton when it is present, so its absence is simulated)."""
    code = ("import sys; sys.modules['triton'] = None; import kfac_kernels, kfac_kernels._triton; "
            "print(kfac_kernels.available_backends('cpu'))")
    root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        p for p in (root, os.environ.get("PYTHONPATH")) if p)}
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60, cwd=root, env=env)


# ---------------------------------------------------------------------------------------------
# property-based tests (small random shapes, layouts and coefficients)

_COEF = st.one_of(st.just(0.0), st.just(1.0), st.floats(1e-3, 4.0), st.floats(-4.0, -1e-3))

@st.composite
def _cases(draw, max_m=40, max_d=40):
    batch = draw(st.one_of(st.none(), st.integers(1, 3)))
    m = draw(st.integers(0, max_m))
    d = draw(st.integers(1, max_d))
    shape = (m, d) if batch is None else (batch, m, d)
    layouts = ["contiguous", "transposed", "strided", "expanded"]
    if batch is not None:
        layouts.append("batch_inner")
    return dict(shape=shape, dtype=draw(st.sampled_from(DTYPES)),
                with_factor=draw(st.booleans()), x_layout=draw(st.sampled_from(layouts)),
                factor_layout=draw(st.sampled_from(["contiguous", "transposed", "strided"])),
                seed=draw(st.integers(0, 2**31 - 1)), decay=draw(_COEF),
                alpha=draw(_COEF))

def _check_case(case, backend):
    factor, x = make_inputs(case["shape"], case["dtype"], torch.device("cpu"),
                            with_factor=case["with_factor"], x_layout=case["x_layout"],
                            factor_layout=case["factor_layout"], seed=case["seed"])
    decay, alpha = case["decay"], case["alpha"]
    ref = reference(factor, x, decay, alpha)
    # relative parity is meaningless where decay*F and alpha*X^T X nearly cancel
    x64 = x.to(torch.float64)
    scale = abs(alpha) * float(torch.linalg.norm(x64.mT @ x64))
    if factor is not None:
        scale += abs(decay) * float(torch.linalg.norm(factor.to(torch.float64)))
    assume(float(torch.linalg.norm(ref)) >= 0.1 * scale)
    out = symmetric_factor_update(factor, x, decay, alpha, backend=backend)
    check(out, factor, x, decay, alpha, backend)

@pytest.mark.skipif("cpu" not in testing.backends_for("cpu"),
                    reason="the C++ extension kfac_kernels._C is not built "
                           "(pip install --no-build-isolation -e .)")
@settings(max_examples=40, deadline=None)
@given(case=_cases())
def test_hypothesis_cpu_backend(case):
    _check_case(case, "cpu")

@pytest.mark.skipif("triton" not in testing.backends_for("cpu"),
                    reason="Triton on CPU tensors needs TRITON_INTERPRET=1 (and triton)")
@settings(max_examples=15, deadline=None)
@given(case=_cases(max_m=24, max_d=24))
def test_hypothesis_triton_interpreter(case):
    _check_case(case, "triton")


# ---------------------------------------------------------------------------------------------
# the registered custom op: opcheck and torch.compile

needs_native = pytest.mark.skipif(
    not _backend.has_native_cpu(),
    reason="the C++ extension kfac_kernels._C is not built, so "
           "torch.ops.kfac_kernels.symmetric_factor_update is not registered "
           "(pip install --no-build-isolation -e .)")

OPCHECK_CASES = [
    ((6, 5), True, "contiguous"),
    ((6, 5), False, "contiguous"),
    ((0, 3), True, "contiguous"),
    ((9, 4), True, "transposed"),
    ((2, 7, 3), True, "contiguous"),
    ((2, 7, 3), False, "batch_inner"),
]


@needs_native
@pytest.mark.parametrize("dtype", DTYPES, ids=_dtype_id)
@pytest.mark.parametrize("shape,with_factor,x_layout", OPCHECK_CASES, ids=str)
def test_opcheck(shape, with_factor, x_layout, dtype):
    factor, x = make_inputs(shape, dtype, "cpu", with_factor=with_factor, x_layout=x_layout)
    torch.library.opcheck(torch.ops.kfac_kernels.symmetric_factor_update.default,
                          (factor, x, 0.9, 0.1))


@pytest.mark.gpu
@pytest.mark.skipif(not (torch.cuda.is_available() and _backend.has_native_cuda()),
                    reason="needs a CUDA device and kfac_kernels._C built with CUDA")
@pytest.mark.parametrize("shape,with_factor,x_layout", OPCHECK_CASES, ids=str)
def test_opcheck_cuda(shape, with_factor, x_layout):
    factor, x = make_inputs(shape, torch.float32, "cuda", with_factor=with_factor,
                            x_layout=x_layout)
    torch.library.opcheck(torch.ops.kfac_kernels.symmetric_factor_update.default,
                          (factor, x, 0.9, 0.1))


def _compile_supported() -> tuple[bool, str]:
    try:
        import torch._dynamo
    except ImportError as err:  # pragma: no cover
        return False, f"torch._dynamo is unavailable: {err}"
    if not torch._dynamo.is_dynamo_supported():
        return False, f"torch.compile is not supported on Python {sys.version.split()[0]}"
    return True, ""


def _compile_backends():
    reason = "" if shutil.which("c++") or shutil.which("g++") else "inductor needs a C++ compiler"
    return ["aot_eager", pytest.param("inductor", marks=[pytest.mark.skipif(bool(reason),
                                                                            reason=reason)])]


def _run_compiled(fn, compile_backend, dynamic=None):
    import torch._dynamo

    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True, backend=compile_backend, dynamic=dynamic)
    for shape in ((17, 6), (3, 11, 4)):  # a second shape recompiles (or reuses a dynamic graph)
        for with_factor in (True, False):
            factor, x = make_inputs(shape, torch.float32, "cpu", with_factor=with_factor)
            expected = reference(factor, x * 2.0, 0.9, 0.1) + 1.0
            testing.assert_close_rel(compiled(factor, x), expected,
                                     rtol=testing.RTOL[torch.float32])


@needs_native
@pytest.mark.skipif(not _compile_supported()[0], reason=_compile_supported()[1])
@pytest.mark.parametrize("compile_backend", _compile_backends())
def test_torch_compile_fullgraph(compile_backend):
    """The public op, with backend="cpu", traces into one graph (no graph break)."""

    def step(factor, x):
        # the op in the middle of other work, so the graph is not just the op
        new = symmetric_factor_update(factor, x * 2.0, 0.9, 0.1, backend="cpu")
        return new + 1.0

    _run_compiled(step, compile_backend)


@needs_native
@pytest.mark.skipif(not _compile_supported()[0], reason=_compile_supported()[1])
@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
def test_torch_compile_registered_op(dynamic):
    """The registered op itself (fake kernel included) under fullgraph, static and dynamic."""

    def step(factor, x):
        return torch.ops.kfac_kernels.symmetric_factor_update(factor, x * 2.0, 0.9, 0.1) + 1.0

    _run_compiled(step, "aot_eager", dynamic=dynamic)


# ---------------------------------------------------------------------------------------------
# bad input: every check raises with a message that says what is wrong


def _x(*shape, dtype=torch.float32):
    return torch.zeros(shape, dtype=dtype)


BAD_INPUTS = [
    # (factor, x, decay, alpha, exception, match)
    pytest.param(None, _x(5), 0.9, 0.1, ValueError, r"x must be 2-D \(m, d\) or 3-D", id="x-1d"),
    pytest.param(None, _x(2, 3, 4, 5), 0.9, 0.1, ValueError, r"got shape \(2, 3, 4, 5\)",
                 id="x-4d"),
    pytest.param(None, [[1.0, 2.0]], 0.9, 0.1, TypeError, r"x must be a torch.Tensor",
                 id="x-list"),
    pytest.param(None, torch.zeros(4, 3, dtype=torch.int64), 0.9, 0.1, TypeError,
                 r"x must be float32 or float64, got torch.int64", id="x-int"),
    pytest.param(None, _x(4, 3, dtype=torch.float16), 0.9, 0.1, TypeError,
                 r"x must be float32 or float64, got torch.float16", id="x-fp16"),
    pytest.param(_x(4, 4), _x(6, 3), 0.9, 0.1, ValueError,
                 r"factor must have shape \(3, 3\) to match x of shape \(6, 3\), got \(4, 4\)",
                 id="factor-shape"),
    pytest.param(_x(3, 3), _x(2, 6, 3), 0.9, 0.1, ValueError,
                 r"factor must have shape \(2, 3, 3\)", id="factor-unbatched"),
    pytest.param(_x(3, 3, dtype=torch.float64), _x(6, 3), 0.9, 0.1, TypeError,
                 r"factor and x must have the same dtype", id="dtype-mismatch"),
    pytest.param("F", _x(6, 3), 0.9, 0.1, TypeError, r"factor must be a torch.Tensor or None",
                 id="factor-str"),
    pytest.param(None, _x(6, 3), math.nan, 0.1, ValueError, r"decay must be finite, got nan",
                 id="decay-nan"),
    pytest.param(None, _x(6, 3), 0.9, math.inf, ValueError, r"alpha must be finite, got inf",
                 id="alpha-inf"),
    pytest.param(None, _x(6, 3), -math.inf, 0.1, ValueError, r"decay must be finite",
                 id="decay-neginf"),
    pytest.param(None, _x(6, 3), True, 0.1, TypeError, r"decay must be a float, got bool",
                 id="decay-bool"),
    pytest.param(None, _x(6, 3), 0.9, torch.tensor(0.1), TypeError, r"alpha must be a float",
                 id="alpha-tensor"),
]


@pytest.mark.parametrize("backend", ["auto", "eager", "cpu", "triton"])
@pytest.mark.parametrize("factor,x,decay,alpha,exc,match", BAD_INPUTS)
def test_bad_input(factor, x, decay, alpha, exc, match, backend):
    # inputs are validated before the backend is resolved, whatever the backend
    with pytest.raises(exc, match=match):
        symmetric_factor_update(factor, x, decay, alpha, backend=backend)


@pytest.mark.parametrize("backend", ["tpu", "CPU", "", None, 3])
def test_unknown_backend(backend):
    with pytest.raises(ValueError, match=r"symmetric_factor_update: backend must be one of"):
        symmetric_factor_update(None, _x(4, 3), 0.9, 0.1, backend=backend)


def test_cuda_backend_on_cpu_tensors():
    with pytest.raises(BackendUnavailableError,
                       match=r"backend='cuda' needs CUDA tensors, got tensors on cpu"):
        symmetric_factor_update(None, _x(4, 3), 0.9, 0.1, backend="cuda")


@requires_cuda
@pytest.mark.gpu
def test_cpu_backend_on_cuda_tensors():
    x = torch.zeros(4, 3, device="cuda")
    with pytest.raises(BackendUnavailableError, match=r"backend='cpu' needs CPU tensors"):
        symmetric_factor_update(None, x, 0.9, 0.1, backend="cpu")


def test_triton_on_cpu_needs_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    if _backend.has_triton():
        match = (r"backend='triton' on CPU tensors needs the Triton interpreter: "
                 r"set TRITON_INTERPRET=1")
    else:
        match = r"backend='triton' is unavailable: the triton package is not installed"
    with pytest.raises(BackendUnavailableError, match=match):
        resolve_backend("triton", torch.device("cpu"), OP)
    with pytest.raises(BackendUnavailableError, match=match):
        symmetric_factor_update(None, _x(4, 3), 0.9, 0.1, backend="triton")
    assert "triton" not in _backend.available_backends("cpu")


def test_cpu_backend_unavailable_says_how_to_build(monkeypatch):
    monkeypatch.setattr(_backend, "has_native_cpu", lambda: False)
    with pytest.raises(BackendUnavailableError,
                       match=r"backend='cpu' is unavailable: .*pip install --no-build-isolation"):
        symmetric_factor_update(None, _x(4, 3), 0.9, 0.1, backend="cpu")
    # and auto never falls back to a missing backend
    assert resolve_backend("auto", torch.device("cpu"), OP) == "eager"


@needs_native
def test_native_op_rejects_bad_input():
    """The registered op checks its own arguments (it is reachable without the Python wrapper)."""
    op = torch.ops.kfac_kernels.symmetric_factor_update
    with pytest.raises(RuntimeError, match=r"x must be 2-D \(m, d\) or 3-D"):
        op(None, _x(5), 0.9, 0.1)
    with pytest.raises(RuntimeError, match=r"x must be float32 or float64"):
        op(None, torch.zeros(4, 3, dtype=torch.int32), 0.9, 0.1)
    with pytest.raises(RuntimeError, match=r"factor must have shape"):
        op(_x(4, 4), _x(6, 3), 0.9, 0.1)
    with pytest.raises(RuntimeError, match=r"factor and x must have the same dtype"):
        op(_x(3, 3, dtype=torch.float64), _x(6, 3), 0.9, 0.1)
    with pytest.raises(RuntimeError, match=r"decay must be finite"):
        op(None, _x(6, 3), math.nan, 0.1)


# ---------------------------------------------------------------------------------------------
# GPU: sizes where TF32 or a split reduction would show


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=_dtype_id)
@pytest.mark.parametrize("shape", [(4096, 256), (8, 1000, 70), (20000, 40)], ids=str)
def test_gpu_large(shape, dtype):
    device = torch.device("cuda")
    backends = [b for b in testing.backends_for(device) if b != "eager"]
    if not backends:
        pytest.skip("no kernel backend for CUDA tensors (neither _C with CUDA nor triton)")
    factor, x = make_inputs(shape, dtype, device, x_layout="transposed", seed=1)
    alpha = 1.0 / shape[-2]
    for backend in backends:
        out = symmetric_factor_update(factor, x, 0.95, alpha, backend=backend)
        check(out, factor, x, 0.95, alpha, backend)
