"""Parity and behaviour tests for ``kfac_kernels.ops.patch_covariance``.

The reference below is written independently of the op: the input is padded explicitly, the
patches are cut out by slicing one kernel offset at a time (no ``F.unfold``), and the factors are
formed in float64 from the definition in the op's docstring. The reference's patch layout is in
turn checked against ``nn.Conv1d``/``nn.Conv2d`` (``weight.reshape(C_out, -1) @ patch + bias`` is
the convolution's output), and two closed forms (1x1 kernels, non-overlapping patches) check the
factors from outside.

The parity grid is a pairwise covering design over the convolution arguments (every pair of
values of two parameters appears in some case where the constraints allow it), not the Cartesian
product. Every backend present on every device (``testing.backends_for``) runs it; Triton runs on
CPU tensors only under the interpreter, so

    TRITON_INTERPRET=1 python -m pytest tests/test_patch_covariance.py

covers the eager, C++ (``cpu``) and Triton backends on a machine without a GPU. Tests for CUDA
tensors carry the ``gpu`` marker and are skipped without a CUDA device.
"""
from __future__ import annotations

import itertools
import math
import random
import zlib

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import kfac_kernels
import kfac_kernels._backend as _backend
from kfac_kernels import testing
from kfac_kernels._backend import BackendUnavailableError, resolve_backend
from kfac_kernels.ops import patch_covariance

from _hypothesis import given, settings, st  # noqa: E402

OP = "patch_covariance"
DTYPES = (torch.float32, torch.float64)
LOW_DTYPES = (torch.float16, torch.bfloat16)
MODES = ("expand", "reduce")

# the tensors are tiny: intra-op threads only add synchronisation cost
pytestmark = pytest.mark.usefixtures("single_thread")

HAS_CPU_KERNEL = _backend.has_native_cpu() and _backend.native_has_op(OP)
needs_cpu_kernel = pytest.mark.skipif(
    not HAS_CPU_KERNEL,
    reason="the C++ extension kfac_kernels._C with torch.ops.kfac_kernels.patch_covariance is "
           "not built (pip install --no-build-isolation -e .)")
needs_triton_cpu = pytest.mark.skipif(
    "triton" not in testing.backends_for("cpu"),
    reason="Triton on CPU tensors needs TRITON_INTERPRET=1 (and triton)")
requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _device_backends(kernels_only: bool = False):
    params = []
    for device in testing.devices():
        marks = [pytest.mark.gpu] if device.type == "cuda" else []
        for backend in testing.backends_for(device):
            if kernels_only and backend == "eager":
                continue
            params.append(pytest.param(device, backend, id=f"{device.type}-{backend}",
                                       marks=marks))
    return params


DEVICE_BACKENDS = _device_backends()
KERNEL_BACKENDS = _device_backends(kernels_only=True)


def _dtype_id(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


# ---------------------------------------------------------------------------------------------
# the reference (float64, explicit padding and slicing, no F.unfold)


def _ntuple(value, n: int) -> tuple[int, ...]:
    return (value,) * n if isinstance(value, int) else tuple(value)


def reference_pads(in_size, kernel_size, padding, dilation) -> list[tuple[int, int]]:
    """``(before, after)`` padding per spatial dim, as ``nn.ConvNd`` pads."""
    nd = len(in_size)
    k, d = _ntuple(kernel_size, nd), _ntuple(dilation, nd)
    if padding == "valid":
        return [(0, 0)] * nd
    if padding == "same":  # PyTorch puts the odd extra element at the end
        return [(dd * (kk - 1) // 2, dd * (kk - 1) - dd * (kk - 1) // 2) for kk, dd in zip(k, d)]
    return [(p, p) for p in _ntuple(padding, nd)]


def reference_patches(x, kernel_size, stride=1, padding=0, dilation=1, padding_mode="zeros"):
    """The patches ``(N, C * K, R)`` in float64, flattened channel-major, then kernel rows, then
    kernel columns; ``K`` kernel offsets, ``R`` output positions."""
    x64 = x.detach().cpu().to(torch.float64)
    nd = x64.dim() - 2
    k, s, d = _ntuple(kernel_size, nd), _ntuple(stride, nd), _ntuple(dilation, nd)
    pads = reference_pads(tuple(x64.shape[2:]), kernel_size, padding, dilation)
    flat = [v for before_after in reversed(pads) for v in before_after]  # F.pad: last dim first
    if any(flat):
        x64 = F.pad(x64, flat, mode="constant" if padding_mode == "zeros" else padding_mode)
    out = [(x64.shape[2 + a] - d[a] * (k[a] - 1) - 1) // s[a] + 1 for a in range(nd)]
    assert all(o >= 1 for o in out), "reference: the kernel does not fit"
    taps = []
    for offset in itertools.product(*(range(kk) for kk in k)):  # kernel rows, then columns
        window = [slice(None), slice(None)]
        for a in range(nd):
            start = offset[a] * d[a]
            window.append(slice(start, start + s[a] * (out[a] - 1) + 1, s[a]))
        taps.append(x64[tuple(window)])  # (N, C, *out)
    n, c = x64.shape[:2]
    patches = torch.stack(taps, dim=2)  # (N, C, K, *out)
    return patches.reshape(n, c * len(taps), math.prod(out))


def reference_block_sizes(channels: int, num_blocks) -> list[int]:
    if num_blocks is None:
        return [channels]
    if isinstance(num_blocks, int):
        base = channels // num_blocks
        return [base] * (num_blocks - 1) + [channels - base * (num_blocks - 1)]
    return list(num_blocks)


def reference(x, kernel_size, stride=1, padding=0, dilation=1, groups=1, *, mode="expand",
              num_blocks=None, bias=False, padding_mode="zeros"):
    """The factor(s) in float64, from the definition:

    expand: ``A = 1/(N R) sum_{n,r} a a^T``; reduce: ``A = 1/N sum_n abar abar^T``; ``bias``
    appends a constant 1 (joining the last block of each group); groups are stacked; with
    ``num_blocks`` a list of the diagonal blocks, by group then block."""
    patches = reference_patches(x, kernel_size, stride, padding, dilation, padding_mode)
    n, ck, r = patches.shape
    c = x.shape[1]
    k = ck // c
    cg = c // groups
    factors = []
    for g in range(groups):
        sizes = reference_block_sizes(cg, num_blocks)
        c0 = g * cg
        for b, size in enumerate(sizes):
            rows = patches[:, c0 * k:(c0 + size) * k, :]  # (N, size * K, R)
            c0 += size
            if mode == "expand":
                rows = rows.permute(0, 2, 1).reshape(n * r, size * k)
            else:
                rows = rows.sum(dim=2) / r
            if bias and b == len(sizes) - 1:
                rows = torch.cat([rows, torch.ones(rows.shape[0], 1, dtype=rows.dtype)], dim=1)
            factors.append(rows.T @ rows / rows.shape[0])
    if num_blocks is not None:
        return factors
    return factors[0] if groups == 1 else torch.stack(factors)


def _as_list(out) -> list[torch.Tensor]:
    if isinstance(out, (list, tuple)):
        return list(out)
    return [out]


def check_result(out, ref, *, dtype, backend, device, rtol=None, msg=""):
    """Structure, dtype, device, parity with the reference, exact symmetry (kernels)."""
    outs, refs = _as_list(out), _as_list(ref)
    assert isinstance(out, list) == isinstance(ref, list), f"{msg}: list vs tensor"
    assert len(outs) == len(refs), f"{msg}: {len(outs)} blocks, expected {len(refs)}"
    for i, (o, e) in enumerate(zip(outs, refs)):
        assert o.shape == e.shape, f"{msg} block {i}: shape {tuple(o.shape)} != {tuple(e.shape)}"
        assert o.dtype == dtype, f"{msg} block {i}: dtype {o.dtype} != {dtype}"
        assert o.device.type == device.type
        if rtol is not None:
            testing.assert_close_rel(o.cpu(), e, rtol=rtol, msg=f"{msg} block {i}")
        if backend != "eager":
            # the kernels compute one triangle and mirror it
            assert torch.equal(o, o.mT), f"{msg} block {i}: not exactly symmetric"


def total_rel_error(out, ref) -> float:
    """Relative Frobenius error over all blocks together."""
    a = torch.cat([o.detach().cpu().to(torch.float64).reshape(-1) for o in _as_list(out)])
    e = torch.cat([r.reshape(-1) for r in _as_list(ref)])
    return testing.rel_error(a, e)


# ---------------------------------------------------------------------------------------------
# inputs


def make_input(n, c, size, dtype, device, layout="contiguous", seed=0):
    """Random ``(n, c, *size)`` in the given memory layout."""
    gen = torch.Generator().manual_seed(seed)
    # the layout is made on the device: a copy to another device would be contiguous again
    x = torch.randn((n, c, *size), generator=gen, dtype=torch.float64).to(dtype=dtype,
                                                                          device=device)
    if layout == "contiguous":
        pass
    elif layout == "channels_last":
        assert x.dim() == 4
        x = x.contiguous(memory_format=torch.channels_last)
    elif layout == "transposed":
        x = testing.non_contiguous(x)
    elif layout == "strided":
        # every 2nd channel and column of a NaN-filled buffer (rows offset by one): a read
        # outside the view poisons the result
        big = torch.full((n, 2 * c, *[s + 2 for s in size[:-1]], 2 * size[-1]), math.nan,
                         dtype=dtype, device=device)
        inner = (slice(None), slice(None, None, 2),
                 *[slice(1, s + 1) for s in size[:-1]], slice(None, None, 2))
        big[inner] = x
        x = big[inner]
    else:
        raise AssertionError(layout)
    return x


# ---------------------------------------------------------------------------------------------
# the covering grid


def pairwise_cases(params: dict, valid, seed: int = 0, tries: int = 300) -> list[dict]:
    """A deterministic greedy covering array: rows of ``params`` (name -> values) such that every
    pair of values of two parameters that some valid row can hold appears in a row."""
    names = list(params)
    sizes = [len(params[n]) for n in names]
    rng = random.Random(seed)

    def pairs(idx):
        return {(a, idx[a], b, idx[b]) for a in range(len(names)) for b in range(a + 1,
                                                                                 len(names))}

    uncovered = {(a, i, b, j) for a in range(len(names)) for b in range(a + 1, len(names))
                 for i in range(sizes[a]) for j in range(sizes[b])}
    rows = []
    while uncovered:
        target = min(uncovered)
        best, best_gain = None, 0
        for _ in range(tries):
            idx = [rng.randrange(s) for s in sizes]
            idx[target[0]], idx[target[2]] = target[1], target[3]
            row = {n: params[n][i] for n, i in zip(names, idx)}
            if not valid(row):
                continue
            gain = len(pairs(idx) & uncovered)
            if gain > best_gain:
                best, best_gain = idx, gain
        if best is None:  # no valid row holds this pair
            uncovered.discard(target)
            continue
        rows.append({n: params[n][i] for n, i in zip(names, best)})
        uncovered -= pairs(best)
    return rows


GRID_PARAMS = {
    "dims": [2, 1],
    "kernel": [1, 3, 5, (3, 1), (1, 7)],
    "stride": [1, 2, 3],
    "padding": [0, 1, "tuple", "same", "valid"],
    "dilation": [1, 2],
    "groups": [1, 2, "depthwise"],
    "channels": [4, 6],
    "size": [(9, 11), (7, 13), (11, 15)],  # odd; a 1-d input has length size[1]
    "n": [1, 2, 3],
    "layout": ["contiguous", "channels_last", "transposed", "strided"],
    "bias": [False, True],
    "blocks": [None, 2, "list"],
    "padding_mode": ["zeros", "reflect", "replicate", "circular"],
    "dtype": list(DTYPES),
}


def conv_kwargs(case: dict) -> dict:
    """The op's arguments for a grid case (``kernel_size`` ... ``padding_mode``)."""
    dims = case["dims"]
    c = case["channels"]
    groups = c if case["groups"] == "depthwise" else case["groups"]
    padding = case["padding"]
    if padding == "tuple":
        padding = (1, 2) if dims == 2 else (2,)
    cg = c // groups
    blocks = case["blocks"]
    if blocks == "list":
        blocks = [1, cg - 1] if cg > 2 else [1, 1]
    return dict(kernel_size=case["kernel"], stride=case["stride"], padding=padding,
                dilation=case["dilation"], groups=groups, num_blocks=blocks, bias=case["bias"],
                padding_mode=case["padding_mode"])


def case_size(case: dict) -> tuple[int, ...]:
    return tuple(case["size"]) if case["dims"] == 2 else (case["size"][1],)


def _grid_valid(case: dict) -> bool:
    dims = case["dims"]
    if dims == 1 and (not isinstance(case["kernel"], int) or case["layout"] == "channels_last"):
        return False
    if case["padding"] == "same" and case["stride"] != 1:
        return False
    kw = conv_kwargs(case)
    cg = case["channels"] // kw["groups"]
    if case["blocks"] is not None and cg < 2:
        return False
    size = case_size(case)
    k = _ntuple(kw["kernel_size"], dims)
    pads = reference_pads(size, kw["kernel_size"], kw["padding"], kw["dilation"])
    for s, kk, dd, (p0, p1) in zip(size, k, _ntuple(kw["dilation"], dims), pads):
        if s + p0 + p1 < dd * (kk - 1) + 1:
            return False
        if case["padding_mode"] == "reflect" and max(p0, p1) >= s:
            return False
        if case["padding_mode"] == "circular" and max(p0, p1) > s:
            return False
    return True


# even kernels, where 'same' pads one more element at the end than at the start (and a 1x1
# kernel with 'same', no padding at all): the covering design above only has odd kernels
_EXTRA_CASES = [
    dict(dims=2, kernel=(2, 4), stride=1, padding="same", dilation=1, groups=2, channels=4,
         size=(7, 13), n=2, layout="channels_last", bias=True, blocks=None,
         padding_mode="zeros", dtype=torch.float64),
    dict(dims=2, kernel=(4, 2), stride=1, padding="same", dilation=(1, 3), groups=1,
         channels=4, size=(9, 11), n=1, layout="strided", bias=False, blocks="list",
         padding_mode="reflect", dtype=torch.float32),
    dict(dims=1, kernel=4, stride=1, padding="same", dilation=1, groups="depthwise",
         channels=6, size=(9, 11), n=3, layout="transposed", bias=True, blocks=None,
         padding_mode="circular", dtype=torch.float64),
    dict(dims=1, kernel=2, stride=1, padding="same", dilation=1, groups=1, channels=4,
         size=(9, 11), n=2, layout="contiguous", bias=False, blocks=2,
         padding_mode="replicate", dtype=torch.float32),
]
assert all(_grid_valid(case) for case in _EXTRA_CASES)
GRID = pairwise_cases(GRID_PARAMS, _grid_valid) + _EXTRA_CASES


def _case_id(i: int, case: dict) -> str:
    def fmt(v):
        return v if isinstance(v, int) else "x".join(map(str, v))

    kernel = fmt(case["kernel"])
    pad = case["padding"]
    blocks = {None: "", 2: "-blk2", "list": "-blklist"}[case["blocks"]]
    return (f"{i:02d}-{case['dims']}d-k{kernel}-s{case['stride']}-p{pad}-d{fmt(case['dilation'])}"
            f"-g{case['groups']}-c{case['channels']}-n{case['n']}-{case['layout']}"
            f"{'-bias' if case['bias'] else ''}{blocks}-{case['padding_mode']}"
            f"-{_dtype_id(case['dtype'])}")


GRID_PARAMS_LIST = [pytest.param(case, id=_case_id(i, case)) for i, case in enumerate(GRID)]


def _grid_input(case, device, dtype=None, seed=None):
    return make_input(case["n"], case["channels"], case_size(case), dtype or case["dtype"],
                      device, case["layout"],
                      seed=seed if seed is not None else zlib.crc32(_case_id(0, case).encode()))


def test_grid_is_a_covering_design():
    """Every value of every parameter appears at least twice (three times for two-valued ones
    where possible) and every feasible pair of values appears together."""
    assert 25 <= len(GRID) <= 60, len(GRID)
    for name, values in GRID_PARAMS.items():
        for v in values:
            count = sum(1 for case in GRID if case[name] == v)
            assert count >= 2, f"{name}={v!r} appears {count} times"
    # a few pairs the issue cares about
    for a, va, b, vb in [("groups", "depthwise", "dims", 1), ("padding", "same", "dilation", 2),
                         ("layout", "channels_last", "groups", 2), ("n", 1, "bias", True),
                         ("blocks", "list", "bias", True), ("padding_mode", "reflect", "dims", 1),
                         ("kernel", (1, 7), "dilation", 2), ("stride", 3, "padding", "tuple")]:
        assert any(c[a] == va and c[b] == vb for c in GRID), (a, va, b, vb)


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel lengths")
@pytest.mark.parametrize("case", GRID_PARAMS_LIST)
def test_reference_matches_convolution(case):
    """The reference's patches are the ones ``nn.ConvNd`` multiplies by its weight: for every
    group, ``weight_g.reshape(C_out_g, -1) @ patch + bias`` is the convolution output."""
    kw = conv_kwargs(case)
    x = _grid_input(case, "cpu", torch.float64)
    groups = kw["groups"]
    conv_cls = nn.Conv2d if case["dims"] == 2 else nn.Conv1d
    conv = conv_cls(case["channels"], 2 * groups, kw["kernel_size"], stride=kw["stride"],
                    padding=kw["padding"], dilation=kw["dilation"], groups=groups,
                    bias=True, padding_mode=kw["padding_mode"]).double()
    y = conv(x).detach()
    n, c_out = y.shape[:2]
    y = y.reshape(n, c_out, -1)
    patches = reference_patches(x, kw["kernel_size"], kw["stride"], kw["padding"],
                                kw["dilation"], kw["padding_mode"])
    assert patches.shape[2] == y.shape[2]
    per_group = patches.shape[1] // groups
    og = c_out // groups
    for g in range(groups):
        w = conv.weight.detach()[g * og:(g + 1) * og].reshape(og, -1)
        p = patches[:, g * per_group:(g + 1) * per_group]
        expected = y[:, g * og:(g + 1) * og]
        got = w @ p + conv.bias.detach()[g * og:(g + 1) * og, None]
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", GRID_PARAMS_LIST)
def test_parity_grid(case, mode, device, backend):
    kw = conv_kwargs(case)
    dtype = case["dtype"]
    x = _grid_input(case, device)
    assert x.is_contiguous() == (case["layout"] == "contiguous")
    before = x.clone()
    out = patch_covariance(x, mode=mode, backend=backend, **kw)
    ref = reference(x, mode=mode, **kw)
    check_result(out, ref, dtype=dtype, backend=backend, device=device,
                 rtol=testing.RTOL[dtype], msg=f"backend={backend} mode={mode}")
    assert torch.equal(x.nan_to_num(), before.nan_to_num()), "the input was modified"


# a subset of the grid for the low-precision and out_dtype tests
LOW_PRECISION_CASES = GRID_PARAMS_LIST[::4]


@pytest.mark.parametrize("device,backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("out_dtype", [None, torch.float32], ids=["out_same", "out_float32"])
@pytest.mark.parametrize("dtype", LOW_DTYPES, ids=_dtype_id)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", LOW_PRECISION_CASES)
def test_low_precision(case, mode, dtype, out_dtype, device, backend):
    """fp16/bf16: the kernel's error against fp64 (on the same rounded input) is at most
    ``LOW_PRECISION_FACTOR`` times the error of the eager computation in that dtype."""
    kw = conv_kwargs(case)
    x = _grid_input(case, device, dtype)
    ref = reference(x, mode=mode, **kw)
    eager = patch_covariance(x, mode=mode, backend="eager", out_dtype=out_dtype, **kw)
    out = patch_covariance(x, mode=mode, backend=backend, out_dtype=out_dtype, **kw)
    check_result(out, ref, dtype=out_dtype or dtype, backend=backend, device=device,
                 msg=f"backend={backend}")
    err_eager = total_rel_error(eager, ref)
    err = total_rel_error(out, ref)
    bound = testing.LOW_PRECISION_FACTOR * max(err_eager, 1e-7)
    assert err <= bound, (f"backend={backend} {dtype} error {err:.3e} > "
                          f"{testing.LOW_PRECISION_FACTOR} x eager error {err_eager:.3e}")


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=_dtype_id)
def test_out_dtype(device, backend, dtype):
    x = make_input(2, 4, (7, 9), dtype, device, seed=3)
    other = torch.float64 if dtype == torch.float32 else torch.float32
    for mode in MODES:
        out = patch_covariance(x, 3, padding=1, mode=mode, out_dtype=other, backend=backend)
        ref = reference(x, 3, padding=1, mode=mode)
        check_result(out, ref, dtype=other, backend=backend, device=device,
                     rtol=testing.RTOL[torch.float32], msg=f"out_dtype={other}")


# ---------------------------------------------------------------------------------------------
# oracles from outside the patch construction


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_kernel_one_is_the_pixel_covariance(device, backend, layout):
    """With a 1x1 kernel the patches are the pixels' channel vectors."""
    x = make_input(3, 5, (7, 9), torch.float64, device, layout, seed=4)
    pixels = x.cpu().permute(0, 2, 3, 1).reshape(3, 63, 5)
    expand = patch_covariance(x, 1, mode="expand", backend=backend)
    flat = pixels.reshape(-1, 5)
    testing.assert_close_rel(expand.cpu(), flat.T @ flat / flat.shape[0])
    reduce = patch_covariance(x, 1, mode="reduce", bias=True, backend=backend)
    means = torch.cat([pixels.mean(dim=1), torch.ones(3, 1, dtype=torch.float64)], dim=1)
    testing.assert_close_rel(reduce.cpu(), means.T @ means / 3)


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_non_overlapping_patches(device, backend):
    """Kernel = stride (a ViT patch embedding): the patches are a reshape of the input."""
    n, c, p = 2, 3, 4
    x = make_input(n, c, (3 * p, 2 * p), torch.float64, device, seed=5)
    blocks = x.cpu().reshape(n, c, 3, p, 2, p).permute(0, 2, 4, 1, 3, 5).reshape(n * 6,
                                                                                c * p * p)
    out = patch_covariance(x, p, stride=p, mode="expand", backend=backend)
    testing.assert_close_rel(out.cpu(), blocks.T @ blocks / (n * 6))


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_conv1d_is_conv2d_of_height_one(device, backend):
    x = make_input(2, 4, (13,), torch.float64, device, seed=6)
    for mode in MODES:
        a1 = patch_covariance(x, 3, stride=2, padding=2, dilation=2, groups=2, mode=mode,
                              bias=True, backend=backend)
        a2 = patch_covariance(x.unsqueeze(2), (1, 3), stride=(1, 2), padding=(0, 2),
                              dilation=(1, 2), groups=2, mode=mode, bias=True, backend=backend)
        testing.assert_close_rel(a1, a2)


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_blocks_are_diagonal_blocks_of_the_dense_factor(device, backend):
    """num_blocks gives exactly the diagonal blocks of the dense factor (bias in the last)."""
    x = make_input(2, 6, (9, 7), torch.float64, device, seed=7)
    for mode in MODES:
        dense = patch_covariance(x, 3, padding=1, groups=2, mode=mode, bias=True,
                                 backend=backend)
        blocks = patch_covariance(x, 3, padding=1, groups=2, mode=mode, bias=True,
                                  num_blocks=[2, 1], backend=backend)
        assert [tuple(b.shape) for b in blocks] == [(18, 18), (10, 10)] * 2
        for g in range(2):
            testing.assert_close_rel(blocks[2 * g], dense[g, :18, :18])
            testing.assert_close_rel(blocks[2 * g + 1], dense[g, 18:, 18:])
        # an int splits near-equally, the last block absorbing the remainder
        blocks = patch_covariance(x, 3, padding=1, mode=mode, num_blocks=4, backend=backend)
        assert [b.shape[0] for b in blocks] == [9, 9, 9, 27]


@pytest.mark.parametrize("device", [pytest.param(d, id=d.type, marks=[pytest.mark.gpu]
                                                 if d.type == "cuda" else [])
                                    for d in testing.devices()])
def test_auto_matches_resolved_backend(device):
    x = make_input(2, 4, (7, 9), torch.float64, device, seed=8)
    chosen = resolve_backend("auto", device, OP)
    assert chosen in testing.backends_for(device)
    if device.type == "cpu" and HAS_CPU_KERNEL:
        assert chosen == "cpu"
    for mode in MODES:
        out = patch_covariance(x, 3, padding=1, mode=mode)
        assert torch.equal(out, patch_covariance(x, 3, padding=1, mode=mode, backend=chosen))


# ---------------------------------------------------------------------------------------------
# property-based tests (random small geometries)


@st.composite
def _geometries(draw, max_size=9, max_channels=3, max_kernel=4):
    dims = draw(st.sampled_from([1, 2]))
    groups = draw(st.integers(1, 3))
    cg = draw(st.integers(1, max_channels))
    kernel = tuple(draw(st.integers(1, max_kernel)) for _ in range(dims))
    dilation = tuple(draw(st.integers(1, 2)) for _ in range(dims))
    pad_kind = draw(st.sampled_from(["int", "tuple", "same", "valid"]))
    if pad_kind == "same":
        stride = (1,) * dims
    else:
        stride = tuple(draw(st.integers(1, 3)) for _ in range(dims))
    if pad_kind == "int":
        padding = draw(st.integers(0, 2))
    elif pad_kind == "tuple":
        padding = tuple(draw(st.integers(0, 2)) for _ in range(dims))
    else:
        padding = pad_kind
    padding_mode = draw(st.sampled_from(["zeros", "zeros", "reflect", "replicate",
                                         "circular"]))
    pads = reference_pads((1,) * dims, kernel, padding, dilation)
    size = []
    for kk, dd, (p0, p1) in zip(kernel, dilation, pads):
        low = max(1, dd * (kk - 1) + 1 - p0 - p1)
        if padding_mode == "reflect":
            low = max(low, max(p0, p1) + 1)
        elif padding_mode == "circular":
            low = max(low, max(p0, p1))
        size.append(draw(st.integers(low, max(low, max_size))))
    blocks = None
    if cg >= 2:
        blocks = draw(st.sampled_from([None, None, "int", "list"]))
        if blocks == "int":
            blocks = draw(st.integers(1, cg))
        elif blocks == "list":
            first = draw(st.integers(1, cg - 1))
            blocks = [first, cg - first]
    layouts = ["contiguous", "transposed", "strided"] + (["channels_last"] if dims == 2
                                                         else [])
    as_int = len(set(kernel)) == 1 and draw(st.booleans())
    return dict(
        n=draw(st.integers(1, 3)), channels=groups * cg, size=tuple(size),
        layout=draw(st.sampled_from(layouts)), dtype=draw(st.sampled_from(DTYPES)),
        mode=draw(st.sampled_from(MODES)), seed=draw(st.integers(0, 2**31 - 1)),
        kwargs=dict(kernel_size=kernel[0] if as_int else kernel, stride=stride,
                    padding=padding, dilation=dilation, groups=groups, num_blocks=blocks,
                    bias=draw(st.booleans()), padding_mode=padding_mode))

def _check_geometry(g, backend):
    device = torch.device("cpu")
    x = make_input(g["n"], g["channels"], g["size"], g["dtype"], device, g["layout"],
                   seed=g["seed"])
    out = patch_covariance(x, mode=g["mode"], backend=backend, **g["kwargs"])
    ref = reference(x, mode=g["mode"], **g["kwargs"])
    rtol = testing.RTOL[g["dtype"]]
    if backend == "eager":
        # The fp32 sums err by up to eps times the sums of the terms' magnitudes: where the
        # terms cancel (a reduce-mode mean patch near 0), relative to the result that is the
        # condition number ||A(|x|)|| / ||A(x)||, which the tolerance scales with (1 where
        # nothing cancels).
        ref_abs = reference(x.abs(), mode=g["mode"], **g["kwargs"])
        pairs = (zip(ref_abs, ref) if isinstance(ref, list) else [(ref_abs, ref)])
        cond = max(float(a.norm() / r.norm()) if r.norm() > 0 else 1.0 for a, r in pairs)
        rtol *= max(1.0, cond)
    else:
        # Random shapes include ill-conditioned ones (a reduce-mode mean patch that nearly
        # cancels amplifies fp32 rounding ~60x; eager errs exactly as much there). A kernel
        # is held to the fixed tolerance or to the low-precision rule: at most twice the
        # eager same-dtype error against the fp64 reference, whichever is larger.
        eager = patch_covariance(x, mode=g["mode"], backend="eager", **g["kwargs"])
        pairs = zip(eager, ref) if isinstance(eager, list) else [(eager, ref)]
        eager_err = max(testing.rel_error(e, r) for e, r in pairs)
        rtol = max(rtol, testing.LOW_PRECISION_FACTOR * eager_err)
    check_result(out, ref, dtype=g["dtype"], backend=backend, device=device,
                 rtol=rtol, msg=f"backend={backend} {g}")

@settings(max_examples=150, deadline=None)
@given(g=_geometries())
def test_hypothesis_eager(g):
    _check_geometry(g, "eager")

@needs_cpu_kernel
@settings(max_examples=300, deadline=None)
@given(g=_geometries())
def test_hypothesis_cpu_backend(g):
    _check_geometry(g, "cpu")

@needs_triton_cpu
@settings(max_examples=30, deadline=None)
@given(g=_geometries(max_size=6, max_channels=2, max_kernel=3))
def test_hypothesis_triton_interpreter(g):
    _check_geometry(g, "triton")


# ---------------------------------------------------------------------------------------------
# the registered custom op


def _op_args(*, n=2, c=4, size=(7, 9), kernel=(3, 3), stride=(1, 1), dilation=(1, 1),
             padding=(1, 1), segments=1, seg_channels=None, reduce=False, bias=False,
             with_factor=False, dtype=torch.float32, layout="contiguous", seed=0):
    """Arguments of ``torch.ops.kfac_kernels.patch_covariance`` (zero padding given as
    ``(top, left)``; the output size is the convolution's with symmetric padding)."""
    x = make_input(n, c, size, dtype, "cpu", layout, seed=seed)
    out_size = [(size[a] + 2 * padding[a] - dilation[a] * (kernel[a] - 1) - 1) // stride[a] + 1
                for a in range(2)]
    seg_channels = seg_channels or c // segments
    d = seg_channels * kernel[0] * kernel[1] + int(bias)
    factor = None
    if with_factor:
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        r = torch.randn(segments, d, d, generator=torch.Generator().manual_seed(seed + 1),
                        dtype=acc)
        factor = r + r.mT
    return (x, list(kernel), list(stride), list(dilation), list(padding), out_size, segments,
            0, seg_channels, seg_channels, reduce, bias, factor, 0.9, 0.1)


OPCHECK_CASES = [
    pytest.param(dict(), id="expand"),
    pytest.param(dict(reduce=True), id="reduce"),
    pytest.param(dict(with_factor=True, bias=True), id="expand-factor-bias"),
    pytest.param(dict(reduce=True, with_factor=True, dtype=torch.float64), id="reduce-factor-f64"),
    pytest.param(dict(layout="channels_last", segments=2, bias=True), id="channels_last-groups"),
    pytest.param(dict(layout="channels_last", reduce=True, with_factor=True, stride=(2, 2),
                      dilation=(2, 1), segments=4), id="channels_last-reduce-depthwise"),
    pytest.param(dict(dtype=torch.bfloat16, with_factor=True), id="bf16-factor"),
    pytest.param(dict(size=(1, 11), kernel=(1, 5), padding=(0, 2), layout="transposed"),
                 id="conv1d-transposed"),
]


@needs_cpu_kernel
@pytest.mark.parametrize("kwargs", OPCHECK_CASES)
def test_opcheck(kwargs):
    torch.library.opcheck(torch.ops.kfac_kernels.patch_covariance.default, _op_args(**kwargs))


@needs_cpu_kernel
@pytest.mark.parametrize("kwargs", OPCHECK_CASES[:4])
def test_op_factor_decay(kwargs):
    """``decay * factor + alpha * sum`` of the raw op, against the reference (scaled back)."""
    args = _op_args(**kwargs)
    x, factor = args[0], args[12]
    out = torch.ops.kfac_kernels.patch_covariance(*args)
    ref = reference(x, 3, padding=1, groups=args[6], mode="reduce" if args[10] else "expand",
                    bias=args[11])
    ref = ref.reshape(args[6], *ref.shape[-2:])
    n = x.shape[0]
    count = n if args[10] else n * args[5][0] * args[5][1]
    expected = 0.1 * count * ref
    if factor is not None:
        expected = expected + 0.9 * factor.double()
    testing.assert_close_rel(out, expected.to(out.dtype))
    assert torch.equal(out, out.mT)


@needs_cpu_kernel
def test_native_op_rejects_bad_input():
    """The registered op checks its own arguments (it is reachable without the Python wrapper)."""
    op = torch.ops.kfac_kernels.patch_covariance
    args = list(_op_args())
    with pytest.raises(RuntimeError, match=r"x must be 4-D \(N, C, H, W\)"):
        op(args[0][0], *args[1:])
    with pytest.raises(RuntimeError, match=r"x must be float32, float64, float16 or bfloat16"):
        op(args[0].to(torch.int32), *args[1:])
    bad = list(args)
    bad[9] = 5  # segment_channels larger than the 4 channels
    with pytest.raises(RuntimeError, match=r"the segments do not fit in the 4 channels of x"):
        op(*bad)
    bad = list(args)
    bad[5] = [40, 9]
    with pytest.raises(RuntimeError, match=r"out_size\[0\] = 40 is inconsistent with the input"):
        op(*bad)
    bad = list(args)
    bad[1] = [3]
    with pytest.raises(RuntimeError, match=r"kernel_size must have 2 entries"):
        op(*bad)


# ---------------------------------------------------------------------------------------------
# bad input: every check raises with a message that says what is wrong


def _x(*shape, dtype=torch.float32):
    return torch.zeros(shape, dtype=dtype)


BAD_INPUTS = [
    # (x, args, kwargs, exception, match)
    pytest.param(_x(0, 3, 5, 5), (3,), {}, ValueError,
                 r"patch_covariance: x has a zero-size batch \(shape \(0, 3, 5, 5\)\)",
                 id="zero-batch"),
    pytest.param(_x(2, 6, 5, 5), (3,), dict(groups=4), ValueError,
                 r"the 6 input channels are not divisible by groups=4", id="channels-groups"),
    pytest.param(_x(2, 6, 5, 5), (3,), dict(groups=0), ValueError,
                 r"groups must be a positive int, got 0", id="groups-zero"),
    pytest.param(_x(2, 3, 3, 8), (5,), {}, ValueError,
                 r"the kernel \(extent 5 with dilation 1\) is larger than the padded input "
                 r"\(size 3 \+ padding 0\)", id="kernel-too-large"),
    pytest.param(_x(2, 3, 6, 6), (3,), dict(dilation=3), ValueError,
                 r"the kernel \(extent 7 with dilation 3\) is larger than the padded input "
                 r"\(size 6 \+ padding 0\)", id="dilated-kernel-too-large"),
    pytest.param(_x(2, 3, 9), (5,), dict(padding="valid", dilation=3), ValueError,
                 r"the kernel \(extent 13 with dilation 3\) is larger than the padded input "
                 r"\(size 9 \+ padding 0\)", id="conv1d-kernel-too-large"),
    pytest.param(_x(2, 3, 5, 5), (3,), dict(mode="sum"), ValueError,
                 r"mode must be 'expand' or 'reduce', got 'sum'", id="bad-mode"),
    pytest.param(_x(2, 3, 5, 5), (3,), dict(padding="full"), ValueError,
                 r"padding must be an int, a tuple, 'same' or 'valid', got 'full'",
                 id="bad-padding-string"),
    pytest.param(_x(2, 3, 5, 5), (3,), dict(padding=-1), ValueError,
                 r"padding must be non-negative, got \(-1, -1\)", id="negative-padding"),
    pytest.param(_x(2, 3, 5, 5), (3,), dict(padding="same", stride=2), ValueError,
                 r"padding='same' needs stride 1, got stride \(2, 2\)", id="same-stride-2"),
    pytest.param(_x(2, 3, 5, 5), (3,), dict(padding_mode="mirror"), ValueError,
                 r"padding_mode must be one of \('zeros', 'reflect', 'replicate', 'circular'\)",
                 id="bad-padding-mode"),
    pytest.param(_x(2, 3, 5, 5), ((3, 3, 3),), {}, TypeError,
                 r"kernel_size must be an int or a tuple of 2 ints, got \(3, 3, 3\)",
                 id="kernel-3-tuple"),
    pytest.param(_x(2, 3, 5, 5), (0,), {}, ValueError, r"kernel_size must be positive",
                 id="kernel-zero"),
    pytest.param(_x(2, 3, 5, 5), (3,), dict(stride=0), ValueError, r"stride must be positive",
                 id="stride-zero"),
    pytest.param(_x(2, 4, 5, 5), (3,), dict(num_blocks=0), ValueError,
                 r"num_blocks must be between 1 and the channels per group \(4\), got 0",
                 id="blocks-zero"),
    pytest.param(_x(2, 4, 5, 5), (3,), dict(num_blocks=5), ValueError,
                 r"num_blocks must be between 1 and the channels per group \(4\), got 5",
                 id="blocks-more-than-channels"),
    pytest.param(_x(2, 4, 5, 5), (3,), dict(num_blocks=3, groups=2), ValueError,
                 r"num_blocks must be between 1 and the channels per group \(2\), got 3",
                 id="blocks-more-than-group-channels"),
    pytest.param(_x(2, 4, 5, 5), (3,), dict(num_blocks=[1, 2]), ValueError,
                 r"the block channel counts \[1, 2\] must sum to the channels per group \(4\)",
                 id="blocks-list-sum"),
    pytest.param(_x(2, 4, 5, 5), (3,), dict(num_blocks=[4, 0]), TypeError,
                 r"num_blocks must be an int or a list of positive channel counts",
                 id="blocks-list-zero"),
    pytest.param(_x(4, 5), (3,), {}, ValueError,
                 r"x must be \(N, C, L\) or \(N, C, H, W\), got shape \(4, 5\)", id="x-2d"),
    pytest.param(_x(1, 2, 3, 4, 5), (1,), {}, ValueError,
                 r"x must be \(N, C, L\) or \(N, C, H, W\), got shape \(1, 2, 3, 4, 5\)",
                 id="x-5d"),
    pytest.param(torch.zeros(2, 3, 5, 5, dtype=torch.int64), (3,), {}, TypeError,
                 r"x must be float32, float64, float16 or bfloat16, got torch.int64",
                 id="x-int"),
    pytest.param([[1.0]], (1,), {}, TypeError, r"x must be a torch.Tensor, got list",
                 id="x-list"),
    pytest.param(_x(2, 3, 5, 5), (3,), dict(out_dtype=torch.int32), TypeError,
                 r"out_dtype must be a floating dtype or None", id="out-dtype-int"),
]


@pytest.mark.parametrize("backend", ["auto", *testing.backends_for("cpu")])
@pytest.mark.parametrize("x,args,kwargs,exc,match", BAD_INPUTS)
def test_bad_input(x, args, kwargs, exc, match, backend):
    with pytest.raises(exc, match=match):
        patch_covariance(x, *args, backend=backend, **kwargs)


@pytest.mark.parametrize("backend", ["tpu", "CPU", "", None, 3])
def test_unknown_backend(backend):
    with pytest.raises(ValueError, match=r"patch_covariance: backend must be one of \('auto', "
                                         r"'eager', 'triton', 'cuda', 'cpu'\)"):
        patch_covariance(_x(2, 3, 5, 5), 3, backend=backend)


def test_cuda_backend_on_cpu_tensors():
    with pytest.raises(BackendUnavailableError,
                       match=r"patch_covariance: backend='cuda' needs CUDA tensors, got tensors "
                             r"on cpu"):
        patch_covariance(_x(2, 3, 5, 5), 3, backend="cuda")


@requires_cuda
@pytest.mark.gpu
def test_cpu_backend_on_cuda_tensors():
    with pytest.raises(BackendUnavailableError, match=r"backend='cpu' needs CPU tensors"):
        patch_covariance(_x(2, 3, 5, 5).cuda(), 3, backend="cpu")


def test_triton_on_cpu_needs_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    if _backend.has_triton():
        match = r"backend='triton' on CPU tensors needs the Triton interpreter"
    else:
        match = r"backend='triton' is unavailable: the triton package is not installed"
    with pytest.raises(BackendUnavailableError, match=match):
        patch_covariance(_x(2, 3, 5, 5), 3, backend="triton")


def test_cpu_backend_unavailable_says_how_to_build(monkeypatch):
    monkeypatch.setattr(_backend, "has_native_cpu", lambda: False)
    with pytest.raises(BackendUnavailableError,
                       match=r"backend='cpu' is unavailable: .*pip install --no-build-isolation"):
        patch_covariance(_x(2, 3, 5, 5), 3, backend="cpu")
    assert resolve_backend("auto", torch.device("cpu"), OP) == "eager"


# ---------------------------------------------------------------------------------------------
# K-FAC: the curvature capture uses the op, and the kernels never unfold


class _UnfoldCalled(Exception):
    pass


def _forbid_unfold(monkeypatch):
    """Make every im2col entry point raise (F.unfold and the aten op behind it)."""

    def boom(*args, **kwargs):
        raise _UnfoldCalled("F.unfold / im2col was called")

    monkeypatch.setattr(F, "unfold", boom)
    monkeypatch.setattr(torch._C._nn, "im2col", boom)


def _conv_zoo(dtype=torch.float64) -> nn.Module:
    """Convolutions with most of the geometry features, for (N, 3, 11, 9) inputs."""

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1 = nn.Conv2d(3, 6, 3, stride=2, padding=1, padding_mode="reflect")
            self.c2 = nn.Conv2d(6, 6, (3, 1), padding="same", dilation=2, groups=3, bias=False)
            self.c3 = nn.Conv2d(6, 6, 3, padding=1, groups=6, padding_mode="circular")
            self.c4 = nn.Conv1d(6, 4, 5, stride=3, padding=2, dilation=2)
            self.head = nn.Linear(4, 5)

        def forward(self, x):
            x = torch.relu(self.c1(x))
            x = torch.relu(self.c2(x))
            x = torch.relu(self.c3(x))
            x = torch.relu(self.c4(x.flatten(2)))
            return self.head(x.mean(dim=2))

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return Net().to(dtype)


def _factors(model, x, y, kfac_approx, backend):
    return kfac_kernels.kronecker_factors(model, nn.CrossEntropyLoss(), x, y,
                                          kfac_approx=kfac_approx, backend=backend)


@pytest.mark.parametrize("kfac_approx", MODES)
@pytest.mark.parametrize("model_name", ["cnn", "conv_zoo"])
def test_kronecker_factors_auto_matches_eager(make_cnn, model_name, kfac_approx):
    gen = torch.Generator().manual_seed(1)
    if model_name == "cnn":
        model = make_cnn(dtype=torch.float64)
        x = torch.randn(6, 1, 8, 8, generator=gen, dtype=torch.float64)
        y = torch.randint(0, 10, (6,), generator=gen)
    else:
        model = _conv_zoo()
        x = torch.randn(5, 3, 11, 9, generator=gen, dtype=torch.float64)
        y = torch.randint(0, 5, (5,), generator=gen)
    auto = _factors(model, x, y, kfac_approx, "auto")
    eager = _factors(model, x, y, kfac_approx, "eager")
    assert auto.keys() == eager.keys()
    convs = [name for name, m in model.named_modules() if isinstance(m, (nn.Conv1d, nn.Conv2d))]
    assert convs and set(convs) <= set(auto)
    for name in auto:
        for side, a, e in zip("AG", auto[name], eager[name]):
            testing.assert_close_rel(a, e, rtol=testing.RTOL[torch.float64],
                                     msg=f"{side} of {name}")


@needs_cpu_kernel
@pytest.mark.parametrize("kfac_approx", MODES)
def test_kfac_with_cpu_kernels_never_unfolds(make_cnn, monkeypatch, kfac_approx):
    """With backend='cpu', K-FAC on CNNs never calls F.unfold (nor the im2col op behind it)."""
    gen = torch.Generator().manual_seed(2)
    cnn = make_cnn(dtype=torch.float64)
    x_cnn = torch.randn(6, 1, 8, 8, generator=gen, dtype=torch.float64)
    y_cnn = torch.randint(0, 10, (6,), generator=gen)
    zoo = _conv_zoo()
    x_zoo = torch.randn(5, 3, 11, 9, generator=gen, dtype=torch.float64)
    y_zoo = torch.randint(0, 5, (5,), generator=gen)
    expected = {id(m): _factors(m, x, y, kfac_approx, "eager")
                for m, x, y in ((cnn, x_cnn, y_cnn), (zoo, x_zoo, y_zoo))}

    _forbid_unfold(monkeypatch)
    # the patch is live: the eager definition does unfold
    with pytest.raises(_UnfoldCalled):
        _factors(cnn, x_cnn, y_cnn, kfac_approx, "eager")
    for model, x, y in ((cnn, x_cnn, y_cnn), (zoo, x_zoo, y_zoo)):
        got = _factors(model, x, y, kfac_approx, "cpu")
        for name, (a, g) in got.items():
            testing.assert_close_rel(a, expected[id(model)][name][0],
                                     rtol=testing.RTOL[torch.float64], msg=f"A of {name}")
        # and a few optimizer steps of K-FAC itself
        precond = kfac_kernels.KFAC(model, damping=0.1, kfac_approx=kfac_approx, backend="cpu",
                                    inv_update_steps=1)
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        for _ in range(2):
            opt.zero_grad()
            nn.CrossEntropyLoss()(model(x), y).backward()
            precond.step()
            opt.step()
        precond.remove_hooks()
        assert all(torch.isfinite(p).all() for p in model.parameters())
        conv_names = [n for n, m in model.named_modules() if isinstance(m, (nn.Conv1d,
                                                                             nn.Conv2d))]
        assert conv_names and all(n in precond.factors for n in conv_names)


@needs_cpu_kernel
@pytest.mark.parametrize("kwargs", [dict(mode="expand"), dict(mode="reduce"),
                                    dict(mode="expand", num_blocks=2)], ids=str)
def test_cpu_temporaries_far_below_the_unfold(kwargs):
    """Extra memory beyond the returned factor, measured in a fresh process (peak resident size,
    bench/memory.py): far below the unfolded input even where the factor has many tiles (D = 2304:
    666 tile pairs, whose private accumulators alone would take 10.9 MB against a 4.7 MB unfold)."""
    from bench.memory import peak_extra_memory

    n, c, hw, k = 32, 256, 4, 3
    unfold_bytes = n * c * k * k * hw * hw * 4
    mem = peak_extra_memory({"shape": [n, c, hw, hw], "dtype": "float32", "threads": 2,
                             "call": "kfac_kernels.ops:patch_covariance", "args": [k],
                             "kwargs": {"padding": 1, "backend": "cpu", **kwargs}})
    d = (c // kwargs.get("num_blocks", 1)) * k * k
    assert mem["output_bytes"] == kwargs.get("num_blocks", 1) * d * d * 4
    temporaries = mem["peak_extra_bytes"] - mem["output_bytes"]
    assert temporaries <= unfold_bytes / 4, (temporaries, unfold_bytes)


# ---------------------------------------------------------------------------------------------
# GPU: sizes where tiling, TF32 or a split reduction would show


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=_dtype_id)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("shape,kwargs", [
    ((16, 64, 28, 28), dict(kernel_size=3, padding=1)),
    ((8, 32, 30, 30), dict(kernel_size=3, stride=2, padding=1, groups=2, bias=True)),
    ((4, 3, 224, 224), dict(kernel_size=16, stride=16)),
    ((8, 96, 14, 14), dict(kernel_size=3, padding=1, groups=96)),
    ((8, 64, 14, 14), dict(kernel_size=3, padding=1, num_blocks=4, bias=True)),
], ids=["3x3-c64", "s2-groups", "vit-patch", "depthwise", "blocks"])
def test_gpu_large(shape, kwargs, mode, dtype):
    device = torch.device("cuda")
    backends = [b for b in testing.backends_for(device) if b != "eager"]
    if not backends:
        pytest.skip("no kernel backend for CUDA tensors (neither _C with CUDA nor triton)")
    x = make_input(*shape[:2], shape[2:], dtype, device, "channels_last", seed=1)
    ref = reference(x, mode=mode, **kwargs)
    for backend in backends:
        out = patch_covariance(x, mode=mode, backend=backend, **kwargs)
        check_result(out, ref, dtype=dtype, backend=backend, device=device,
                     rtol=testing.RTOL[dtype], msg=f"backend={backend}")
