"""Tests of the Triton patch-covariance kernels (``kfac_kernels._triton.patch_covariance``) and, on a GPU,
of the CUDA op ``torch.ops.kfac_kernels.patch_covariance``, against an ``F.unfold`` reference.

The reference is written here from the definition (csrc/include/patch_covariance.h): unfold the
zero-padded input, take each segment's channels, append a ones column for the bias, then
``alpha * rows^T rows + decay * factor`` over all patches (expand) or over the examples' mean
patches (reduce), in fp64. The Triton kernels run on CPU tensors only under the interpreter:

    TRITON_INTERPRET=1 python -m pytest tests/test_patch_covariance_triton.py

Tests on CUDA tensors carry the ``gpu`` marker and are skipped without a CUDA device.
"""
from __future__ import annotations

import itertools
import os
import random

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton", reason="the Triton kernels need the triton package")

INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"
HAS_CUDA = torch.cuda.is_available()
if not (INTERPRETED or HAS_CUDA):
    pytest.skip("the Triton kernels run on CUDA tensors, or on CPU tensors with TRITON_INTERPRET=1 "
                "set before triton is imported; neither is available",
                allow_module_level=True)

from kfac_kernels._triton.patch_covariance import patch_covariance_triton  # noqa: E402

interpreter_only = pytest.mark.skipif(
    not INTERPRETED, reason="CPU tensors need TRITON_INTERPRET=1 (set before triton is imported)")

pytestmark = pytest.mark.usefixtures("single_thread")


# ---------------------------------------------------------------------------------------------
# the reference and problem set-up


def out_len(size: int, k: int, s: int, d: int, before: int, after: int) -> int:
    return (size + before + after - (d * (k - 1) + 1)) // s + 1


def reference(x, kernel, stride, dilation, padding, out_size, num_segments, start, step,
              channels, reduce, bias, factor, decay, alpha, dtype=torch.float64):
    """The definition with ``F.unfold``, computed in ``dtype`` (fp64: the reference; x's own
    dtype: the eager computation whose error the kernels' error is judged against)."""
    n, _, h, w = x.shape
    (kh, kw), (sh, sw), (dh, dw), (pt, pl), (oh, ow) = kernel, stride, dilation, padding, out_size
    pb = max(0, (oh - 1) * sh + dh * (kh - 1) + 1 - h - pt)
    pr = max(0, (ow - 1) * sw + dw * (kw - 1) + 1 - w - pl)
    xp = F.pad(x.to(dtype), (pl, pr, pt, pb))
    patches = F.unfold(xp, (kh, kw), dilation=(dh, dw), stride=(sh, sw))
    lh = out_len(xp.shape[2], kh, sh, dh, 0, 0)
    lw = out_len(xp.shape[3], kw, sw, dw, 0, 0)
    patches = patches.reshape(n, x.shape[1], kh * kw, lh, lw)[..., :oh, :ow]
    patches = patches.reshape(n, x.shape[1], kh * kw, oh * ow)
    outs = []
    for s in range(num_segments):
        c0 = start + s * step
        p = patches[:, c0:c0 + channels].reshape(n, channels * kh * kw, oh * ow)
        rows = p.mean(dim=2) if reduce else p.permute(0, 2, 1).reshape(n * oh * ow, -1)
        if bias:
            rows = torch.cat([rows, rows.new_ones(rows.shape[0], 1)], dim=1)
        g = alpha * (rows.mT @ rows)
        if factor is not None:
            g = g.to(factor.dtype) + decay * factor[s]
        outs.append(g.to(torch.float64))
    return torch.stack(outs)


SEGMENTS = {  # C = 4: (num_segments, start, step, channels)
    "groups1": (1, 0, 4, 4),
    "groups2": (2, 0, 2, 2),
    "depthwise": (4, 0, 1, 1),
    "block": (1, 1, 0, 2),
}


def make_case(seed, *, n=2, c=4, h=7, w=6, kernel=(3, 3), stride=(1, 1), dilation=(1, 1),
              pads=(1, 1, 1, 1), segments="groups1", reduce=False, bias=False, factor="none",
              dtype=torch.float32):
    """Inputs and op arguments; ``pads`` = (top, bottom, left, right)."""
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(n, c, h, w, generator=gen) + 0.3).to(dtype)
    pt, pb, pl, pr = pads
    out_size = (out_len(h, kernel[0], stride[0], dilation[0], pt, pb),
                out_len(w, kernel[1], stride[1], dilation[1], pl, pr))
    s, start, step, channels = SEGMENTS[segments] if isinstance(segments, str) else segments
    d = channels * kernel[0] * kernel[1] + int(bias)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    f = None
    if factor != "none":
        f = torch.randn(s, d, d, generator=gen, dtype=torch.float64)
        if factor == "symmetric":
            f = f + f.mT
        f = f.to(acc)
    positions = out_size[0] * out_size[1]
    alpha = 1.0 / n if reduce else 1.0 / (n * positions)
    args = (kernel, stride, dilation, (pt, pl), out_size, s, start, step, channels, reduce, bias,
            f, 0.95, alpha)
    return x, args


def assert_matches(got, want, rtol):
    scale = want.abs().max().item()
    err = (got.double() - want).abs().max().item()
    assert err <= rtol * max(scale, 1e-30), f"max error {err:.3g} > {rtol:g} * scale {scale:.3g}"


def geometry_grid():
    """A fixed sample of the grid: kernels 1, 3, (3, 1), (1, 3); stride 1, 2, (2, 1); dilation 1,
    2; symmetric, asymmetric and no padding; the four segment layouts; bias; expand / reduce."""
    kernels = [(1, 1), (3, 3), (3, 1), (1, 3)]
    strides = [(1, 1), (2, 2), (2, 1)]
    dilations = [(1, 1), (2, 2)]
    pads = [(0, 0, 0, 0), (1, 1, 1, 1), (2, 0, 0, 1), (0, 2, 1, 0)]
    full = list(itertools.product(kernels, strides, dilations, pads, SEGMENTS, (False, True),
                                  (False, True)))
    picked = random.Random(0).sample(full, 96)
    # every kernel with every segment layout at least once
    for kernel, seg in itertools.product(kernels, SEGMENTS):
        picked.append((kernel, (1, 1), (1, 1), (1, 1, 1, 1), seg, True, False))
    return picked


def _grid_params(count=None):
    params = []
    for i, (kernel, stride, dilation, pads, seg, reduce, bias) in enumerate(geometry_grid()):
        hw = (7, 6) if i % 3 else (5, 7)
        pid = (f"k{kernel[0]}x{kernel[1]}-s{stride[0]}x{stride[1]}-d{dilation[0]}-"
               f"p{''.join(map(str, pads))}-{seg}-{'reduce' if reduce else 'expand'}"
               f"{'-bias' if bias else ''}-{hw[0]}x{hw[1]}")
        params.append(pytest.param(i, kernel, stride, dilation, pads, seg, reduce, bias, hw,
                                   id=pid))
    return params if count is None else params[::max(1, len(params) // count)]


# ---------------------------------------------------------------------------------------------
# the interpreter (CPU tensors)


@interpreter_only
@pytest.mark.parametrize("i, kernel, stride, dilation, pads, seg, reduce, bias, hw",
                         _grid_params())
def test_grid_float32(i, kernel, stride, dilation, pads, seg, reduce, bias, hw):
    factor = ("none", "symmetric", "asymmetric")[i % 3]
    x, args = make_case(i, n=1 + i % 2, h=hw[0], w=hw[1], kernel=kernel, stride=stride,
                        dilation=dilation, pads=pads, segments=seg, reduce=reduce, bias=bias,
                        factor=factor)
    got = patch_covariance_triton(x, *args)
    assert got.dtype == torch.float32 and got.is_contiguous()
    d = args[8] * kernel[0] * kernel[1] + bias
    assert got.shape == (args[5], d, d)
    assert_matches(got, reference(x, *args), 1e-5)
    if factor != "asymmetric":
        assert torch.equal(got, got.mT)


@interpreter_only
@pytest.mark.parametrize("i, kernel, stride, dilation, pads, seg, reduce, bias, hw",
                         _grid_params(24))
def test_grid_float64(i, kernel, stride, dilation, pads, seg, reduce, bias, hw):
    x, args = make_case(100 + i, n=2, h=hw[0], w=hw[1], kernel=kernel, stride=stride,
                        dilation=dilation, pads=pads, segments=seg, reduce=reduce, bias=bias,
                        factor=("none", "symmetric")[i % 2], dtype=torch.float64)
    got = patch_covariance_triton(x, *args)
    assert got.dtype == torch.float64
    assert_matches(got, reference(x, *args), 1e-10)
    assert torch.equal(got, got.mT)


@interpreter_only
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("i, kernel, stride, dilation, pads, seg, reduce, bias, hw",
                         _grid_params(12))
def test_grid_half(dtype, i, kernel, stride, dilation, pads, seg, reduce, bias, hw):
    """Kernel error against fp64 (on the same 16-bit inputs) at most twice the error of the eager
    computation carried out in the input's dtype."""
    x, args = make_case(200 + i, n=2, h=hw[0], w=hw[1], kernel=kernel, stride=stride,
                        dilation=dilation, pads=pads, segments=seg, reduce=reduce, bias=bias,
                        factor=("none", "symmetric")[i % 2], dtype=dtype)
    got = patch_covariance_triton(x, *args)
    assert got.dtype == torch.float32
    want = reference(x, *args)
    eager = reference(x, *args, dtype=dtype)
    err = (got.double() - want).abs().max().item()
    eager_err = (eager - want).abs().max().item()
    assert err <= 2 * eager_err + 1e-6 * want.abs().max().item(), (err, eager_err)
    assert torch.equal(got, got.mT)


@interpreter_only
@pytest.mark.parametrize("layout", ["channels_last", "permuted", "sliced"])
@pytest.mark.parametrize("reduce", [False, True], ids=["expand", "reduce"])
def test_layouts(layout, reduce):
    """Any strides of x are read in place, with the same result as the contiguous input."""
    x, args = make_case(7, n=2, c=4, h=7, w=7, kernel=(3, 3), stride=(2, 1), pads=(1, 2, 0, 1),
                        segments="groups2", reduce=reduce, bias=True, factor="symmetric")
    if layout == "channels_last":
        xs = x.contiguous(memory_format=torch.channels_last)
    elif layout == "permuted":  # (N, C, H, W) view of a (W, H, C, N) buffer
        xs = x.permute(3, 2, 1, 0).contiguous().permute(3, 2, 1, 0)
    else:  # every 2nd row / column of a NaN buffer: a read outside the view poisons the result
        big = torch.full((2, 4, 14, 21), float("nan"))
        big[:, :, ::2, ::3] = x
        xs = big[:, :, ::2, ::3]
    assert not xs.is_contiguous()
    got = patch_covariance_triton(xs, *args)
    assert_matches(got, reference(x, *args), 1e-5)
    assert torch.equal(got, patch_covariance_triton(x.contiguous(), *args))
    assert torch.equal(got, got.mT)


@interpreter_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_split_rows_and_several_tiles(dtype):
    """The split over rows (partials in a workspace, summed by a second kernel) and several tiles
    per side (D = 37 with 16-wide tiles) give the reference result."""
    x, args = make_case(11, n=2, c=4, h=7, w=6, kernel=(3, 3), segments="groups1", bias=True,
                        factor="asymmetric", dtype=dtype)
    want = reference(x, *args)
    tol = 1e-10 if dtype == torch.float64 else 1e-5
    from kfac_kernels._triton.patch_covariance import tile_steps

    # every row step a launch can use at block 16 (40 rows: two ranges of 32, or three of 16
    # at step 8)
    for block_k in tile_steps(dtype, 16, on_gpu=False):
        for splits in (1, 3):
            got = patch_covariance_triton(x, *args, block=16, block_k=block_k, splits=splits)
            assert_matches(got, want, tol)


@interpreter_only
def test_empty_batch_gives_decayed_factor():
    x, args = make_case(3, n=1, factor="symmetric")
    args = list(args)
    got = patch_covariance_triton(x[:0], *args)
    assert torch.allclose(got, 0.95 * args[11])
    args[9] = True  # reduce
    got = patch_covariance_triton(x[:0], *args)
    assert torch.allclose(got, 0.95 * args[11])


# the reduce mode's mean kernel (patch_covariance_reduce): several channel blocks (BLOCK_C 32 in
# fp32, 16 in fp64), several offset blocks (5x5 and 3x7 kernels: 25 and 21 > 16 offsets) and
# rows longer than a BLOCK_X chunk (19 > 16 columns), with strides, dilations and
# asymmetric padding that leave some offsets outside the plane at some output positions
REDUCE_BLOCKS = {
    "k5-s2x1-d1x2": ((5, 5), (2, 1), (1, 2), (2, 1, 0, 3)),
    "k3x7-s1-d2x1": ((3, 7), (1, 1), (2, 1), (0, 0, 3, 3)),
    "k5-s3-d1": ((5, 5), (3, 3), (1, 1), (1, 2, 2, 1)),
}


@interpreter_only
@pytest.mark.parametrize("geometry", list(REDUCE_BLOCKS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16],
                         ids=["fp32", "fp64", "bf16"])
def test_reduce_mean_patches_over_several_blocks(geometry, dtype):
    """The mean patches (window sums as a product with 0/1 indicators, each input read once per
    offset block) equal the unfolded patches' means, and the reduce result the reference."""
    from kfac_kernels._triton.patch_covariance_reduce import mean_patches

    kernel, stride, dilation, pads = REDUCE_BLOCKS[geometry]
    # two segments of 37 channels with a gap (start 2, step 40): three 16-channel blocks in fp64
    x, args = make_case(21, n=2, c=80, h=7, w=19, kernel=kernel, stride=stride,
                        dilation=dilation, pads=pads, segments=(2, 2, 40, 37), reduce=True,
                        bias=True, factor="symmetric", dtype=dtype)
    (kh, kw), _, _, (pt, pl), (oh, ow), s, start, step, channels = args[:9]
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    d = channels * kh * kw + 1
    abar = mean_patches(x, (kh, kw, *stride, *dilation, pt, pl), oh, ow, s, start, step,
                        channels, d, acc, "test")
    # the means from the reference's unfold, in fp64
    # the means of the unfolded patches, in fp64
    xp = F.pad(x.double(), (pl, pads[3], pt, pads[1]))
    cols = F.unfold(xp, (kh, kw), dilation=dilation, stride=stride)
    assert cols.shape[2] == oh * ow
    cols = cols.reshape(x.shape[0], x.shape[1], kh * kw * oh * ow)
    for seg in range(s):
        c0 = start + seg * step
        want = cols[:, c0:c0 + channels].reshape(x.shape[0], -1, oh * ow).mean(2)
        want = torch.cat([want, torch.ones(x.shape[0], 1, dtype=torch.float64)], dim=1)
        tol = 1e-12 if dtype == torch.float64 else 1e-6
        assert_matches(abar[:, seg], want, tol)
    # the whole op (the Gram of the mean patches) at a few channels, which keeps its D small
    x, args = make_case(22, n=2, c=4, h=7, w=19, kernel=kernel, stride=stride,
                        dilation=dilation, pads=pads, segments="groups2", reduce=True,
                        bias=True, factor="symmetric", dtype=dtype)
    assert_matches(patch_covariance_triton(x, *args), reference(x, *args),
                   1e-10 if dtype == torch.float64 else 1e-5)


@interpreter_only
@pytest.mark.parametrize("value", [float("inf"), float("-inf"), float("nan")],
                         ids=["inf", "-inf", "nan"])
def test_reduce_non_finite_pixel_reaches_only_the_offsets_that_see_it(value):
    """With stride 2, pixel (2, 5) is seen by offsets (1, 0) and (1, 2) only: the mean patches'
    other entries stay finite (a product with 0/1 indicators would make them 0 * inf = NaN), so
    the factor is non-finite exactly where the unfold reference is."""
    x, args = make_case(23, n=2, c=3, h=7, w=19, kernel=(3, 3), stride=(2, 2),
                        pads=(1, 1, 1, 1), segments=(1, 0, 3, 3), reduce=True, bias=True)
    x[0, 1, 2, 5] = value
    got = patch_covariance_triton(x, *args).double()
    want = reference(x, *args)
    finite = torch.isfinite(want)
    assert finite.any() and not finite.all()
    assert torch.equal(torch.isfinite(got), finite)
    assert torch.equal(torch.isnan(got), torch.isnan(want))
    assert_matches(got[finite], want[finite], 1e-5)


# ---------------------------------------------------------------------------------------------
# the channels kernel (patch_covariance_channels: tiles of contiguous channels); under the
# interpreter its tiles are 16 channels wide


def _check_low_precision(got, x, args):
    want = reference(x, *args)
    if x.dtype == torch.float32:
        assert_matches(got, want, 1e-5)
        return
    eager = reference(x, *args, dtype=x.dtype)
    err = (got.double() - want).abs().max().item()
    eager_err = (eager - want).abs().max().item()
    assert err <= 2 * eager_err + 1e-6 * want.abs().max().item(), (err, eager_err)


@interpreter_only
@pytest.mark.parametrize("i, kernel, stride, dilation, pads, seg, reduce, bias, hw",
                         [p for p in _grid_params(48) if "expand" in p.id])
def test_channels_kernel_grid(i, kernel, stride, dilation, pads, seg, reduce, bias, hw):
    """Every geometry of the grid (4 channels: each segment copied channels-last and padded with
    zeros to 16) gives the reference, in fp32 or bf16 (every other case), exactly symmetric
    with a symmetric factor."""
    factor = ("none", "symmetric", "asymmetric")[i % 3]
    for dtype in ((torch.float32, torch.bfloat16)[i % 2],):
        x, args = make_case(300 + i, n=1 + i % 2, h=hw[0], w=hw[1], kernel=kernel, stride=stride,
                            dilation=dilation, pads=pads, segments=seg, bias=bias, factor=factor,
                            dtype=dtype)
        got = patch_covariance_triton(x, *args, kernel="channels")
        d = args[8] * kernel[0] * kernel[1] + bias
        assert got.dtype == torch.float32 and got.shape == (args[5], d, d)
        _check_low_precision(got, x, args)
        if factor != "asymmetric":
            assert torch.equal(got, got.mT)


WIDE_SEGMENTS = {  # C = 40: (num_segments, start, step, channels)
    "one segment, 3 channel tiles": (1, 0, 40, 40),
    "two segments of 17, unaligned": (2, 3, 19, 17),
    "two aligned segments of 16": (2, 0, 16, 16),
}


@interpreter_only
@pytest.mark.parametrize("seg", list(WIDE_SEGMENTS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16],
                         ids=["fp32", "bf16", "fp16"])
def test_channels_kernel_several_channel_tiles(seg, dtype):
    """Several channel tiles per kernel offset, segments at any offset, with and without a
    bias, a factor, row ranges (partial tiles in the output's order, summed by the generic
    reduction) and a channels-last input: the reference."""
    for bias, factor, splits, channels_last in ((False, "none", None, False),
                                               (True, "asymmetric", None, True),
                                               (True, "symmetric", 3, False),
                                               (False, "symmetric", 2, True)):
        # a 1 x 3 kernel: three taps of two or three channel tiles (the interpreter runs each
        # tile pair's program in turn: a 3 x 3 kernel would take minutes here)
        x, args = make_case(17, n=2, c=40, h=4, w=5, kernel=(1, 3), pads=(0, 0, 1, 1),
                            segments=WIDE_SEGMENTS[seg], bias=bias, factor=factor, dtype=dtype)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        got = patch_covariance_triton(x, *args, splits=splits, kernel="channels")
        _check_low_precision(got, x, args)
        if factor != "asymmetric":
            assert torch.equal(got, got.mT)


@interpreter_only
def test_channels_kernel_reads_aligned_channels_last_inputs_in_place():
    """A channels-last input whose segments are multiples of 16 channels is read where it is
    (no copy); any other layout is copied once, each segment padded to 16 channels."""
    from kfac_kernels._triton.patch_covariance_channels import aligned_channels

    x = torch.randn(2, 32, 5, 6).contiguous(memory_format=torch.channels_last)
    same, start, step, loaded = aligned_channels(x, 2, 0, 16, 16)
    assert same is x and (start, step, loaded) == (0, 16, 16)
    copy, start, step, loaded = aligned_channels(x.contiguous(), 2, 3, 13, 13)
    assert copy.stride(1) == 1 and (start, step, loaded) == (0, 16, 16)
    for s in range(2):  # the segments' channels, then zeros
        assert torch.equal(copy[:, 16 * s:16 * s + 13], x[:, 3 + 13 * s:16 + 13 * s])
        assert not copy[:, 16 * s + 13:16 * (s + 1)].any()


def test_channels_kernel_tile_width_follows_the_segment():
    """On a GPU, segments of 128 channels or more take 128-wide tiles (8 warps), 64 to 127
    channels 64-wide ones (4 warps), fewer the generic kernel; every width a launch picks is
    among the configurations compiled ahead of time."""
    from kfac_kernels._triton import patch_covariance_channels as pcc

    for dtype, step in ((torch.bfloat16, 64), (torch.float16, 64), (torch.float32, 32)):
        assert pcc.tiles(dtype, False, 64) == (64, step)
        assert pcc.tiles(dtype, False, 127) == (64, step)
        assert pcc.tiles(dtype, False, 128) == (128, step)
        assert pcc.tiles(dtype, False, 1000) == (128, step)
        assert pcc.tiles(dtype, True, 64) == (pcc.BLOCK_INTERPRETED, pcc.STEP_INTERPRETED)
    assert pcc.min_channels(False) == 64 and pcc.min_channels(True) == pcc.BLOCK_INTERPRETED
    compiled = {(c.constexprs["BLOCK"], c.constexprs["BLOCK_K"], c.pointers["x_ptr"], c.num_warps)
                for c in pcc.launch_configs()}
    for block, warps in ((128, 8), (64, 4)):
        for t, step in (("bf16", 64), ("fp16", 64), ("fp32", 32)):
            assert (block, step, t, warps) in compiled


@interpreter_only
def test_channels_kernel_is_the_default_for_wide_tensor_core_inputs():
    """bf16 / fp16 inputs with segments of at least a channel tile run the channels kernel (the
    same bits as asking for it), fp32 with full-precision products the generic one."""
    x, args = make_case(5, n=2, c=40, h=5, w=5, kernel=(1, 1), pads=(0, 0, 0, 0),
                        segments=WIDE_SEGMENTS["one segment, 3 channel tiles"],
                        factor="symmetric", dtype=torch.bfloat16)
    assert torch.equal(patch_covariance_triton(x, *args),
                       patch_covariance_triton(x, *args, kernel="channels"))
    x32 = x.float()
    assert torch.equal(patch_covariance_triton(x32, *args),
                       patch_covariance_triton(x32, *args, kernel="generic"))
    with pytest.raises(ValueError, match="kernel must be"):
        patch_covariance_triton(x, *args, kernel="im2col")
    reduce_args = list(args)
    reduce_args[9] = True  # checked whatever the mode
    with pytest.raises(ValueError, match="kernel must be"):
        patch_covariance_triton(x, *reduce_args, kernel="im2col")
    with pytest.raises(ValueError, match="channels kernel takes"):
        patch_covariance_triton(x.double(), *args[:11], None, *args[12:], kernel="channels")


@pytest.fixture
def tf32_switch():
    """Sets ``torch.backends.cuda.matmul.allow_tf32`` (it is a process-wide switch), restored."""
    matmul = torch.backends.cuda.matmul
    before = matmul.allow_tf32

    def set_to(value: bool):
        matmul.allow_tf32 = value
    yield set_to
    matmul.allow_tf32 = before


def test_float32_products_follow_torch_matmul_tf32_switch(tf32_switch):
    from kfac_kernels._triton import patch_covariance as pc

    assert pc._dot_mode(torch.float32, False, tf32=False) == (True, False)   # ieee
    assert pc._dot_mode(torch.float32, False, tf32=True) == (False, False)   # tf32
    for dtype in (torch.float16, torch.bfloat16):  # tensor cores whatever the switch
        assert pc._dot_mode(dtype, False, tf32=False) == pc._dot_mode(dtype, False, True)
    tf32_switch(True)
    assert pc.tf32_allowed()
    tf32_switch(False)
    assert not pc.tf32_allowed()
    fp32 = [c.constexprs for c in pc.launch_configs()
            if "_pc_expand_kernel" in c.key() and "x_ptr=fp32" in c.key()]
    assert {c["IEEE_DOT"] for c in fp32} == {True, False}  # both compiled ahead of time


@interpreter_only
def test_cpu_tensors_keep_full_precision_products_when_tf32_is_allowed(tf32_switch,
                                                                       monkeypatch):
    """TF32 is CUDA's: on CPU tensors (the interpreter) the products stay "ieee" even with the
    switch on, as for torch.matmul."""
    from kfac_kernels._triton import patch_covariance as pc

    seen = []
    kernel = pc._pc_expand_kernel

    class Recorder:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                seen.append(kwargs["IEEE_DOT"])
                return kernel[grid](*args, **kwargs)
            return launch
    monkeypatch.setattr(pc, "_pc_expand_kernel", Recorder())
    tf32_switch(True)
    x, args = make_case(3, n=1, factor="symmetric")
    want = patch_covariance_triton(x, *args)
    assert seen == [True]
    tf32_switch(False)
    assert torch.equal(patch_covariance_triton(x, *args), want) and seen == [True, True]


@interpreter_only
def test_argument_errors():
    x, args = make_case(0)
    with pytest.raises(ValueError, match="4-D"):
        patch_covariance_triton(x[0], *args)
    with pytest.raises(TypeError, match="float32, float64, float16 or bfloat16"):
        patch_covariance_triton(x.to(torch.int32), *args)
    bad = list(args)
    bad[5] = 2  # two segments of 4 channels from a 4-channel input with step 4
    with pytest.raises(ValueError, match="do not fit"):
        patch_covariance_triton(x, *bad)
    bad = list(args)
    bad[11] = torch.zeros(1, 3, 3)
    with pytest.raises(ValueError, match="factor must be"):
        patch_covariance_triton(x, *bad)
    bad = list(args)
    bad[0] = (3,)
    with pytest.raises(ValueError, match="kernel_size"):
        patch_covariance_triton(x, *bad)


# ---------------------------------------------------------------------------------------------
# CUDA tensors


GPU_SHAPES = [  # n, c, h, w, kernel, stride, pads, segments
    pytest.param(8, 16, 14, 14, (3, 3), (1, 1), (1, 1, 1, 1), (1, 0, 16, 16), id="dense3x3"),
    pytest.param(4, 32, 15, 13, (3, 3), (2, 2), (1, 0, 1, 1), (32, 0, 1, 1), id="depthwise"),
    pytest.param(2, 12, 17, 9, (1, 3), (1, 1), (0, 0, 1, 1), (2, 0, 6, 6), id="groups2-1x3"),
    pytest.param(16, 3, 32, 32, (5, 5), (1, 1), (2, 2, 2, 2), (1, 0, 3, 3), id="many-rows"),
    pytest.param(2, 80, 6, 6, (3, 3), (1, 1), (1, 1, 1, 1), (1, 0, 80, 80), id="d720"),
    # segments of >= 128 channels: the channels kernel for 16-bit inputs (two channel tiles,
    # the second partly padding; two segments with row ranges)
    pytest.param(4, 160, 10, 10, (3, 3), (1, 1), (1, 1, 1, 1), (1, 0, 160, 160),
                 id="channels-160"),
    pytest.param(2, 288, 7, 7, (3, 3), (2, 2), (1, 0, 1, 1), (2, 0, 144, 144),
                 id="channels-2x144"),
    # segments of 64 to 127 channels: its 64-wide tiles (4 diagonal blocks of 64; 96 channels,
    # the second tile of each tap half padding)
    pytest.param(4, 256, 7, 7, (3, 3), (1, 1), (1, 1, 1, 1), (4, 0, 64, 64),
                 id="channels-4x64-blocks"),
    pytest.param(3, 96, 9, 8, (3, 3), (1, 1), (1, 1, 1, 1), (1, 0, 96, 96), id="channels-96"),
]


def _gpu_case(n, c, h, w, kernel, stride, pads, segs, dtype, reduce, bias, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(n, c, h, w, generator=gen) + 0.3).to(dtype)
    pt, pb, pl, pr = pads
    out_size = (out_len(h, kernel[0], stride[0], 1, pt, pb), out_len(w, kernel[1], stride[1], 1,
                                                                      pl, pr))
    s, start, step, channels = segs
    d = channels * kernel[0] * kernel[1] + int(bias)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    f = torch.randn(s, d, d, generator=gen, dtype=torch.float64)
    f = (f + f.mT).to(acc)
    alpha = 1.0 / n if reduce else 1.0 / (n * out_size[0] * out_size[1])
    return x, ((kernel, stride, (1, 1), (pt, pl), out_size, s, start, step, channels, reduce, bias,
                f, 0.9, alpha))


def _check_gpu(fn, x, args, dtype):
    dev = torch.device("cuda")
    xd = x.to(dev)
    argsd = list(args)
    argsd[11] = args[11].to(dev)
    got = fn(xd, *argsd).cpu()
    want = reference(x, *args)
    if dtype in (torch.float32, torch.float64):
        assert_matches(got, want, 1e-5 if dtype == torch.float32 else 1e-10)
    else:
        eager_err = (reference(x, *args, dtype=dtype) - want).abs().max().item()
        err = (got.double() - want).abs().max().item()
        assert err <= 2 * eager_err + 1e-6 * want.abs().max().item(), (err, eager_err)
    assert torch.equal(got, got.mT)
    # a channels_last input is read in place (a kernel may pick another loop order for it)
    got_cl = fn(xd.contiguous(memory_format=torch.channels_last), *argsd).cpu()
    assert_matches(got_cl, got.double(), 1e-10 if dtype == torch.float64 else 1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("reduce", [False, True], ids=["expand", "reduce"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16],
                         ids=["fp32", "fp64", "bf16", "fp16"])
@pytest.mark.parametrize("n, c, h, w, kernel, stride, pads, segs", GPU_SHAPES)
def test_triton_cuda(n, c, h, w, kernel, stride, pads, segs, dtype, reduce):
    x, args = _gpu_case(n, c, h, w, kernel, stride, pads, segs, dtype, reduce, True)
    _check_gpu(patch_covariance_triton, x, args, dtype)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
def test_triton_cuda_channels_kernel_on_tf32(tf32_switch):
    """fp32 with TF32 allowed runs the channels kernel on the tensor cores: the same result as
    the generic kernel up to TF32's rounding of the inputs (10-bit mantissas: relative 2^-11 per
    input, so 1e-3 of the largest entry bounds the difference of these sums of products of
    positive-mean inputs)."""
    tf32_switch(True)
    x, args = _gpu_case(4, 160, 10, 10, (3, 3), (1, 1), (1, 1, 1, 1), (1, 0, 160, 160),
                        torch.float32, False, True)
    xd = x.cuda()
    argsd = list(args)
    argsd[11] = args[11].cuda()
    got = patch_covariance_triton(xd, *argsd, kernel="channels").cpu()
    assert_matches(got, reference(x, *args), 1e-3)
    assert torch.equal(got, got.mT)
    assert torch.equal(got, patch_covariance_triton(xd, *argsd).cpu())  # the default there
    tf32_switch(False)  # full fp32 products: the generic kernel's (the channels one refuses)
    with pytest.raises(ValueError, match="need TF32 allowed"):
        patch_covariance_triton(xd, *argsd, kernel="channels")


def _native_cuda_reason() -> str:
    if not HAS_CUDA:
        return "needs a CUDA device"
    try:
        from kfac_kernels import _backend
    except ImportError as err:  # pragma: no cover
        return f"kfac_kernels is not importable: {err}"
    if not _backend.has_native_cuda():
        return "kfac_kernels._C was not built with CUDA"
    if not _backend.native_has_op("patch_covariance"):
        return "kfac_kernels._C has no patch_covariance op (built from older sources)"
    return ""


@pytest.mark.gpu
@pytest.mark.skipif(bool(_native_cuda_reason()), reason=_native_cuda_reason() or "available")
@pytest.mark.parametrize("reduce", [False, True], ids=["expand", "reduce"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16],
                         ids=["fp32", "fp64", "bf16", "fp16"])
@pytest.mark.parametrize("n, c, h, w, kernel, stride, pads, segs", GPU_SHAPES)
def test_native_cuda_op(n, c, h, w, kernel, stride, pads, segs, dtype, reduce):
    x, args = _gpu_case(n, c, h, w, kernel, stride, pads, segs, dtype, reduce, True, seed=1)
    _check_gpu(torch.ops.kfac_kernels.patch_covariance, x, args, dtype)
