"""``patch_covariance`` keeps one extreme pixel to the entries it belongs to.

An entry ``A[d, e]`` of the factor involves a pixel when coordinate ``d`` or ``e`` of some patch
(expand) or mean patch (reduce, Eschenhagen et al. (2023), Eq. 10) of the pixel's example reads
it. The definition (``F.unfold`` then a matmul) adds only those patch values into an entry, so a
huge pixel (1e4 .. 1e8) leaves every other entry as accurate as without it, and a NaN or inf pixel
leaves every other entry finite. Every backend present on CPU tensors (``cpu``, ``triton`` under
the interpreter, ``eager``) is held to that: the entries not involving the pixel err against the
float64 definition at most twice as much as eager in the same dtype, and the non-finite entries
are exactly eager's. A window sum formed by subtraction (prefix or box sums: the sum over a union
of windows minus the pixels outside one) would lose the small entries' digits to the outlier and
spread a NaN to every window.

    TRITON_INTERPRET=1 python -m pytest tests/test_patch_covariance_outliers.py
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import kfac_kernels
from kfac_kernels import testing
from kfac_kernels.ops import patch_covariance

from test_patch_covariance import reference

pytestmark = [pytest.mark.usefixtures("single_thread"),
              # the Triton interpreter's numpy warns of the NaNs it computes (as it should)
              pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")]

BACKENDS = testing.backends_for("cpu")
DTYPES = (torch.float32, torch.float64)

# (N, C, H, W), convolution kwargs, the pixel (n, c, h, w): the geometry of the first report
# (a 3x3 kernel over 6x6), padding, stride, dilation, channels_last, a bias coordinate, groups
CASES = [
    ((1, 1, 6, 6), dict(kernel_size=3), (0, 0, 0, 0)),
    ((2, 3, 9, 8), dict(kernel_size=3, padding=1), (1, 1, 4, 3)),
    ((2, 2, 11, 10), dict(kernel_size=(3, 2), stride=2, padding=1, bias=True), (0, 1, 0, 9)),
    ((3, 2, 12, 12), dict(kernel_size=3, dilation=2), (2, 0, 5, 6)),
    ((2, 4, 7, 9), dict(kernel_size=(2, 3), groups=2, padding=(1, 0)), (1, 3, 6, 0)),
    ((2, 3, 16, 16), dict(kernel_size=3, padding=1, channels_last=True), (0, 2, 8, 8)),
    ((2, 3, 16, 16), dict(kernel_size=5, padding=2), (1, 0, 15, 15)),
]


def _case_id(case) -> str:
    shape, kw, _ = case
    return "x".join(map(str, shape)) + "-" + "-".join(f"{k}{v}" for k, v in kw.items())


def _kwargs(kw: dict) -> dict:
    return {k: v for k, v in kw.items() if k != "channels_last"}


def _input(shape, kw, pixel, value, dtype) -> torch.Tensor:
    gen = torch.Generator().manual_seed(sum(shape))
    x = torch.randn(shape, generator=gen, dtype=torch.float64)
    x[pixel] = value
    x = x.to(dtype)
    return x.to(memory_format=torch.channels_last) if kw.get("channels_last") else x


def involved(shape, kw: dict, pixel, mode: str) -> torch.Tensor:
    """Boolean mask of the factor entries (stacked over groups) that read ``pixel``: the
    coordinates whose patch values at the pixel's example are not all zero for an input that is
    1 at the pixel and 0 elsewhere."""
    one = torch.zeros(shape, dtype=torch.float64)
    one[pixel] = 1.0
    kw = _kwargs(kw)
    groups, bias = kw.get("groups", 1), kw.get("bias", False)
    k = kw["kernel_size"]
    k = (k, k) if isinstance(k, int) else k
    p = kw.get("padding", 0)
    p = (p, p) if isinstance(p, int) else p
    patches = F.unfold(one, k, dilation=kw.get("dilation", 1), padding=p,
                       stride=kw.get("stride", 1))[pixel[0]]  # (C kh kw, R)
    reads = patches.abs().sum(1) > 0 if mode == "reduce" else (patches != 0).any(1)
    reads = reads.reshape(groups, -1)
    if bias:
        reads = torch.cat([reads, reads.new_zeros(groups, 1)], dim=1)
    mask = reads[:, :, None] | reads[:, None, :]
    return mask[0] if groups == 1 else mask


def scaled_error(out: torch.Tensor, ref: torch.Tensor, scale: torch.Tensor,
                 keep: torch.Tensor) -> float:
    """Largest ``|out - ref| / scale`` over the entries ``keep``, with ``scale`` the factor of
    ``|x|``: the sum of the magnitudes of each entry's terms, the scale of its rounding errors
    (a small entry next to huge ones counts as much as they do)."""
    err = (out.to(torch.float64) - ref).abs() / scale.clamp_min(torch.finfo(torch.float64).tiny)
    return float(err[keep].max()) if keep.any() else 0.0


def _compute(x, kw, mode, backend):
    return patch_covariance(x, mode=mode, backend=backend, **_kwargs(kw))


def _floor(dtype) -> float:
    # eager may be exact by chance (fused multiply-adds, a lucky order): an error of a few
    # roundings of the terms' magnitude (here up to ~200 terms per entry, summed in another
    # order) is no evidence of a worse kernel; the cancellation this file is about errs by
    # 1e5 roundings and more
    return 8 * torch.finfo(dtype).eps


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mode", ["reduce", "expand"])
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_outlier_leaves_other_entries_accurate(case, mode, dtype, backend):
    shape, kw, pixel = case
    keep = ~involved(shape, kw, pixel, mode)
    assert keep.any()
    for value in (1e4, 1e6, 1e8):
        x = _input(shape, kw, pixel, value, dtype)
        ref = reference(x.to(torch.float64), mode=mode, **_kwargs(kw))
        scale = reference(x.to(torch.float64).abs(), mode=mode, **_kwargs(kw))
        eager = scaled_error(_compute(x, kw, mode, "eager"), ref, scale, keep)
        err = scaled_error(_compute(x, kw, mode, backend), ref, scale, keep)
        assert err <= 2 * max(eager, _floor(dtype)), (
            f"{backend} {mode} {dtype} with a {value:g} pixel: error {err:.3g} in the entries "
            f"not involving it, eager {eager:.3g}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mode", ["reduce", "expand"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=str)
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_non_finite_pixel_stays_in_its_entries(case, bad, mode, dtype, backend):
    shape, kw, pixel = case
    keep = ~involved(shape, kw, pixel, mode)
    x = _input(shape, kw, pixel, bad, dtype)
    out = _compute(x, kw, mode, backend)
    eager = _compute(x, kw, mode, "eager")
    assert torch.isfinite(out[keep]).all(), (
        f"{backend} {mode}: a {bad} pixel made {int((~torch.isfinite(out[keep])).sum())} entries "
        "that do not involve it non-finite")
    assert torch.equal(torch.isfinite(out), torch.isfinite(eager)), (
        f"{backend} {mode}: the non-finite entries differ from eager's")
    # the entries that do not involve the pixel are those of the input without it
    clean = x.clone()
    clean[pixel] = 0.0
    ref = reference(clean.to(torch.float64), mode=mode, **_kwargs(kw))
    scale = reference(clean.to(torch.float64).abs(), mode=mode, **_kwargs(kw))
    err, err_eager = scaled_error(out, ref, scale, keep), scaled_error(eager, ref, scale, keep)
    assert err <= 2 * max(err_eager, _floor(dtype)), (err, err_eager)


def _conv_net() -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.Flatten(),
                             nn.Linear(4 * 8 * 8, 3))


@pytest.mark.parametrize("backend", BACKENDS)
def test_kfac_reduce_factor_with_an_outlier(backend):
    """Through the K-FAC reduce factors of a small convolutional net (fp32): one 1e5 pixel
    leaves the conv's A entries that do not involve it as accurate as eager's."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(4, 2, 8, 8, generator=gen, dtype=torch.float64)
    pixel = (1, 0, 0, 7)  # a corner: in 4 of the 9 windows of its channel
    x[pixel] = 1e5
    y = torch.randint(0, 3, (4,), generator=gen)
    keep = ~involved((4, 2, 8, 8), dict(kernel_size=3, padding=1, bias=True), pixel, "reduce")

    def factor_a(dtype, backend):
        model = _conv_net().to(dtype)
        factors = kfac_kernels.kronecker_factors(model, nn.CrossEntropyLoss(), x.to(dtype), y,
                                                 kfac_approx="reduce", backend=backend)
        return factors["0"][0]

    ref = factor_a(torch.float64, "eager")
    # the net's A is the reduce factor of its input with a bias coordinate (Eq. 10)
    testing.assert_close_rel(ref, reference(x, 3, padding=1, mode="reduce", bias=True))
    scale = reference(x.abs(), 3, padding=1, mode="reduce", bias=True)
    eager = scaled_error(factor_a(torch.float32, "eager"), ref, scale, keep)
    err = scaled_error(factor_a(torch.float32, backend), ref, scale, keep)
    assert err <= 2 * max(eager, _floor(torch.float32)), (
        f"{backend}: the A entries not involving the pixel err {err:.3g}, eager {eager:.3g}")
