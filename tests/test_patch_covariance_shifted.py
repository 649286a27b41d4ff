"""The cpu backend's shifted algorithm of ``patch_covariance``: a stride-1 expand factor from
one correlation of the padded input per relative kernel offset, minus the padded images'
margins (:mod:`kfac_kernels.ops._shifted_gram`).

Oracles: the eager definition (``F.unfold`` + matmul) in fp64 over geometries that exercise
every margin case (asymmetric and zero padding, dilation, non-square and 1-d kernels, a padding
wider than the kernel), a brute-force sum of patch outer products, exact symmetry, the implicit
kernel inside a K-FAC step, and the peak memory of a call in a fresh process. The low-precision
rule and channels-last inputs are tested with the chunked algorithm's
(``test_patch_covariance_chunked.py``)."""
from __future__ import annotations

import importlib

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from kfac_kernels import testing
from kfac_kernels._backend import native_has_op
from kfac_kernels.ops import patch_covariance
from kfac_kernels.ops._shifted_gram import shift_plan, shifted_gram_flop_ratio

pc = importlib.import_module("kfac_kernels.ops.patch_covariance")  # the module, not the op

needs_cpu_kernel = pytest.mark.skipif(
    not native_has_op("patch_covariance"),
    reason="the C++ extension kfac_kernels._C is not built (pip install --no-build-isolation -e .)")

CASES = [
    ((3, 5, 7, 6), dict(kernel_size=3, padding=1)),
    ((2, 4, 7, 9), dict(kernel_size=(3, 2), padding=(2, 0), dilation=(2, 1))),
    ((2, 3, 6, 6), dict(kernel_size=3)),  # no padding: every non-output position is a margin
    ((2, 3, 3, 4), dict(kernel_size=3, padding=3)),  # padding wider than the kernel reaches
    ((3, 4, 5, 5), dict(kernel_size=5, padding=2, bias=True)),
    ((4, 6, 6, 7), dict(kernel_size=3, padding=1, groups=2, bias=True)),
    ((3, 9, 6, 5), dict(kernel_size=3, padding="same", num_blocks=[2, 3, 4], bias=True)),
    ((2, 4, 11), dict(kernel_size=3, padding=2, dilation=2, bias=True)),  # 1-d
    ((2, 3, 4, 4), dict(kernel_size=(1, 3), padding="same")),  # padding split 0 / 1
    ((1, 2, 5, 5), dict(kernel_size=1, padding=1)),
    ((2, 3, 6, 6), dict(kernel_size=3, padding=1, padding_mode="reflect")),
]


def _ids(case):
    shape, kwargs = case
    return "x".join(map(str, shape)) + "-" + "-".join(f"{k}={v}" for k, v in kwargs.items())


def _parts(out):
    return out if isinstance(out, list) else [out]


@needs_cpu_kernel
@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_shifted_matches_eager_fp64(case):
    shape, kwargs = case
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    eager = patch_covariance(x, backend="eager", **kwargs)
    got = patch_covariance(x, backend="cpu", algorithm="shifted", **kwargs)
    for a, e in zip(_parts(got), _parts(eager), strict=True):
        testing.assert_close_rel(a, e, rtol=testing.RTOL[torch.float64])
        assert bool((a == a.mT).all())


@needs_cpu_kernel
def test_shifted_is_the_sum_of_patch_outer_products():
    """Brute force on a tiny case: every patch built by hand, no unfold."""
    x = torch.randn(2, 2, 4, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    xp = F.pad(x, (1, 1, 1, 1))
    rows = torch.stack([xp[n, :, i:i + 3, j:j + 3].reshape(-1)
                        for n in range(2) for i in range(4) for j in range(3)])
    expected = sum(torch.outer(r, r) for r in rows) / rows.shape[0]
    got = patch_covariance(x, 3, padding=1, backend="cpu", algorithm="shifted")
    testing.assert_close_rel(got, expected, rtol=testing.RTOL[torch.float64])


@needs_cpu_kernel
@pytest.mark.parametrize("bias", [False, True])
def test_shifted_update_of_a_stored_factor(bias):
    """``decay * factor + alpha * sum`` on top of a stored factor, for two groups."""
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(3, 6, 5, 4, generator=gen, dtype=torch.float64)
    d = 3 * 9 + int(bias)
    prev = torch.randn(2, d, d, generator=gen, dtype=torch.float64)
    prev = prev + prev.mT
    kwargs = dict(padding=1, groups=2, bias=bias, factor=prev, decay=0.5, alpha=0.25)
    got = patch_covariance(x, 3, backend="cpu", algorithm="shifted", **kwargs)
    expected = patch_covariance(x, 3, backend="eager", **kwargs)
    testing.assert_close_rel(got, expected, rtol=testing.RTOL[torch.float64])
    assert bool((got == got.mT).all())


@needs_cpu_kernel
def test_a_non_finite_pixel_gives_a_non_finite_factor():
    """The correlations subtract the margins, so a non-finite pixel reaches every entry of its
    channel's rows (the definition leaves finite the kernel offsets that never see it); the
    factor is non-finite either way, which the blocks' health checks catch."""
    x = torch.randn(2, 3, 5, 5, generator=torch.Generator().manual_seed(5))
    x[1, 2, 0, 0] = float("nan")
    got = patch_covariance(x, 3, padding=1, backend="cpu", algorithm="shifted")
    eager = patch_covariance(x, 3, padding=1, backend="eager")
    assert not bool(torch.isfinite(eager).all())
    assert not bool(torch.isfinite(got[18:27]).any())  # channel 2's rows
    assert bool(torch.isfinite(got[:18, :18]).all())  # the other channels' block is untouched


def test_the_flop_ratio_is_the_arithmetic_saved():
    """Below one for the common 3x3 'same' convolution, towards 25/81 of the unfolded Gram at
    large images (the margins' share shrinks like 1 / H); above one where the margins dominate
    (no padding, tiny images)."""
    ratios = [shifted_gram_flop_ratio(32, (hw, hw), (3, 3), (1, 1), (1, 1, 1, 1), (hw, hw))
              for hw in (4, 8, 16, 56)]
    assert ratios == sorted(ratios, reverse=True)
    assert 25 / 81 < ratios[-1] < 0.36 and ratios[1] < pc.SHIFTED_MAX_FLOP_RATIO < ratios[0] < 1
    assert shifted_gram_flop_ratio(2, (5, 5), (3, 3), (1, 1), (0, 0, 0, 0), (3, 3)) > 1
    plan = shift_plan(32, (16, 16), (3, 3), (1, 1), (1, 1, 1, 1), (16, 16))
    assert len(plan.shifts) == 13  # ((2k - 1)^2 + 1) / 2 correlations for k = 3
    assert [taps for taps, _ in plan.groups] == [(6, 7, 8), (2, 5, 8), (0, 3, 6), (0, 1, 2)]


@needs_cpu_kernel
def test_auto_follows_the_rule(monkeypatch):
    """``algorithm='auto'`` runs the shifted path exactly where ``shifted_is_faster`` says so."""
    calls = []
    real = pc.patch_gram_shifted
    monkeypatch.setattr(pc, "patch_gram_shifted",
                        lambda *a, **k: calls.append(1) or real(*a, **k))
    cases = (((2, 64, 16, 16), "expand", 1, 1), ((2, 64, 16, 16), "expand", 2, 1),
             ((2, 64, 16, 16), "reduce", 1, 1), ((2, 16, 16, 16), "expand", 1, 1),
             ((2, 64, 4, 4), "expand", 1, 1), ((2, 64, 16, 16), "expand", 1, 0),
             ((32, 32, 8, 8), "expand", 1, 1), ((32, 32, 16, 16), "expand", 1, 1))
    for shape, mode, stride, padding in cases:
        calls.clear()
        patch_covariance(torch.randn(*shape), 3, stride=stride, padding=padding, mode=mode,
                         backend="cpu")
        geom = pc.conv_geometry(shape[2:], 3, stride, padding)
        rule = pc.shifted_is_faster(shape[0], geom, pc.Segments(1, 0, shape[1], shape[1], False),
                                    mode == "reduce")
        assert bool(calls) == rule, (shape, mode, stride)
    assert pc.shifted_is_faster(2, pc.conv_geometry((16, 16), 3, 1, 1),
                                pc.Segments(1, 0, 64, 64, False), False)
    # many channels at few positions: the 13 correlations of c x c would hold more than a
    # quarter of the unfolded tensor (13 * 512 > 32 * 49 * 9 / 4), so the kernel keeps them
    for c, hw, expected in ((512, 7, False), (512, 14, True), (256, 8, True)):
        seg = pc.Segments(1, 0, c, c, False)
        assert pc.shifted_is_faster(32, pc.conv_geometry((hw, hw), 3, 1, 1), seg,
                                    False) is expected, (c, hw)


@needs_cpu_kernel
def test_shifted_is_checked():
    x = torch.randn(2, 3, 6, 6)
    with pytest.raises(ValueError, match="algorithm='shifted' computes expand factors of "
                                         "stride-1 convolutions"):
        patch_covariance(x, 3, stride=2, algorithm="shifted", backend="cpu")
    with pytest.raises(ValueError, match="algorithm='shifted' computes expand factors"):
        patch_covariance(x, 3, mode="reduce", algorithm="shifted", backend="cpu")


@needs_cpu_kernel
def test_kfac_conv_factors_through_the_shifted_path(monkeypatch):
    """A K-FAC step on a CNN with every stride-1 factor forced through the shifted algorithm
    gives the factors of the implicit kernel (the blocks call the public op with ``auto``)."""
    from kfac_kernels import KFAC

    calls = []
    real = pc.patch_gram_shifted
    monkeypatch.setattr(pc, "patch_gram_shifted",
                        lambda *a, **k: calls.append(1) or real(*a, **k))

    def factors(force):
        if force:
            monkeypatch.setattr(pc, "SHIFTED_MIN_SAVED_MACS", 0.0)
            monkeypatch.setattr(pc, "SHIFTED_MAX_FLOP_RATIO", 100.0)
        else:
            monkeypatch.setattr(pc, "SHIFTED_MAX_FLOP_RATIO", -1.0)
        torch.manual_seed(0)
        model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(),
                              nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.Flatten(),
                              nn.Linear(8 * 36, 4))
        kfac = KFAC(model, factor_update_steps=1, inv_update_steps=1, fisher_type="empirical")
        x, y = torch.randn(4, 3, 6, 6), torch.randint(0, 4, (4,))
        for _ in range(2):
            model.zero_grad()
            F.cross_entropy(model(x), y).backward()
            kfac.step()
        return {name: a.clone() for name, (a, _) in kfac.factors.items()}

    shifted = factors(True)
    assert len(calls) == 4  # two conv layers, two steps
    implicit = factors(False)
    assert len(calls) == 4
    assert sorted(shifted) == sorted(implicit) and len(shifted) == 3
    for name, a in shifted.items():
        testing.assert_close_rel(a, implicit[name], rtol=testing.RTOL[torch.float32])


@needs_cpu_kernel
def test_shifted_memory_is_the_output_plus_the_padded_input():
    """Peak extra memory of a call that auto sends to the shifted path (fresh process,
    bench/memory.py): the output, the padded input and small correlations, far below the
    unfolded tensor."""
    from bench.memory import peak_extra_memory

    n, c, hw, k = 32, 64, 32, 3
    geom = pc.conv_geometry((hw, hw), k, 1, 1)
    assert pc.shifted_is_faster(n, geom, pc.Segments(1, 0, c, c, False), False)
    mem = peak_extra_memory({"shape": [n, c, hw, hw], "dtype": "float32", "threads": 1,
                             "call": "kfac_kernels.ops:patch_covariance", "args": [k],
                             "kwargs": {"padding": 1, "backend": "cpu"}})
    d = c * k * k
    assert mem["output_bytes"] == d * d * 4
    temporaries = mem["peak_extra_bytes"] - mem["output_bytes"]
    padded = c * n * (hw + 2) ** 2 * 4
    unfold_bytes = n * c * k * k * hw * hw * 4
    # the padded input, 2 x 13 correlations, one offset's rows, the margins' Grams (4 x (3c)^2)
    # and their gathered pixels, and 4 MiB for BLAS's packing buffers
    budget = padded + 26 * c * c * 4 + d * d * 4 // 9 + 4 * (3 * c) ** 2 * 4 * 2 + (4 << 20)
    assert temporaries <= budget, (temporaries, budget)
    assert temporaries < unfold_bytes / 4


@needs_cpu_kernel
@pytest.mark.parametrize("stored", [False, True])
@pytest.mark.parametrize("examples_per_chunk", [1, 2])
def test_chunks_of_examples_add_up(monkeypatch, examples_per_chunk, stored):
    """With one or two examples per padded canvas (5 examples: chunks of 2, 2, 1), the chunks'
    correlations and margin Grams add up to the whole factor, alone or on top of a stored
    one."""
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(5, 3, 5, 4, generator=gen, dtype=torch.float64)
    assert pc.shifted_chunk_examples(x.shape, pc.conv_geometry((5, 4), 3, 1, 1), 3,
                                     torch.float64) == 5  # one chunk unless told otherwise
    monkeypatch.setattr(pc, "shifted_chunk_examples", lambda *a: examples_per_chunk)
    calls = []
    real = pc.shift_plan
    monkeypatch.setattr(pc, "shift_plan", lambda n, *a: calls.append(n) or real(n, *a))
    prev = torch.randn(1, 28, 28, generator=gen, dtype=torch.float64)
    prev = prev + prev.mT
    kwargs = dict(padding=1, bias=True, alpha=0.25)
    if stored:
        kwargs.update(factor=prev, decay=0.5)
    got = patch_covariance(x, 3, backend="cpu", algorithm="shifted", **kwargs)
    assert calls[1:] == ([1] * 5 if examples_per_chunk == 1 else [2, 2, 1])
    testing.assert_close_rel(got, patch_covariance(x, 3, backend="eager", **kwargs),
                             rtol=testing.RTOL[torch.float64])
    assert bool((got == got.mT).all())
