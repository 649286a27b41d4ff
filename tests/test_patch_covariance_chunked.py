"""The cpu backend's chunked algorithm of ``patch_covariance`` (chunked unfolding + BLAS) and
the symmetric products it shares with the SINGD structures.

Oracles: the eager definition (``F.unfold`` + matmul) in fp64, a brute-force sum of patch outer
products on a tiny case, the ``implicit`` kernel, exact symmetry, and the peak memory of a call
measured in a fresh process."""
from __future__ import annotations

import importlib

import pytest
import torch
import torch.nn.functional as F

from kfac_kernels import testing
from kfac_kernels._backend import native_has_op
from kfac_kernels.ops import patch_covariance
from kfac_kernels.ops._symmetric_matmul import (LARGE, MIN_BLOCK, add_symmetric_matmul_,
                                                block_edges, symmetric_matmul)

pc = importlib.import_module("kfac_kernels.ops.patch_covariance")  # the module, not the op

needs_cpu_kernel = pytest.mark.skipif(
    not native_has_op("patch_covariance"),
    reason="the C++ extension kfac_kernels._C is not built (pip install --no-build-isolation -e .)")

# (shape, kwargs): odd sizes, stride, dilation, asymmetric kernels, groups, bias, blocks, 1-d
CASES = [
    ((3, 5, 7, 6), dict(kernel_size=3, padding=1)),
    ((2, 7, 9, 8), dict(kernel_size=(3, 2), stride=(2, 1), padding=(1, 0), dilation=(1, 2))),
    ((4, 6, 9, 8), dict(kernel_size=3, stride=2, padding=1, groups=2, bias=True)),
    ((5, 9, 6, 7), dict(kernel_size=3, padding="same", num_blocks=[2, 3, 4], bias=True)),
    ((3, 8, 5, 5), dict(kernel_size=1, groups=4, num_blocks=2)),
    ((2, 4, 11), dict(kernel_size=3, padding=2, dilation=2, bias=True)),
    ((2, 3, 6, 6), dict(kernel_size=3, padding=1, padding_mode="reflect")),
]


def _ids(case):
    shape, kwargs = case
    return "x".join(map(str, shape)) + "-" + "-".join(f"{k}={v}" for k, v in kwargs.items())


def _close(actual, expected, rtol):
    if isinstance(expected, list):
        assert len(actual) == len(expected)
        for a, e in zip(actual, expected):
            testing.assert_close_rel(a, e, rtol=rtol)
    else:
        testing.assert_close_rel(actual, expected, rtol=rtol)


def _all_symmetric(out):
    return all(bool((t == t.mT).all()) for t in (out if isinstance(out, list) else [out]))


@needs_cpu_kernel
@pytest.mark.parametrize("mode", ["expand", "reduce"])
@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_chunked_matches_eager_fp64(case, mode):
    shape, kwargs = case
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    eager = patch_covariance(x, mode=mode, backend="eager", **kwargs)
    chunked = patch_covariance(x, mode=mode, backend="cpu", algorithm="chunked", **kwargs)
    _close(chunked, eager, testing.RTOL[torch.float64])
    assert _all_symmetric(chunked)


@needs_cpu_kernel
@pytest.mark.parametrize("mode", ["expand", "reduce"])
def test_chunked_is_the_sum_of_patch_outer_products(mode):
    """Brute force on a tiny case: every patch built by hand, no unfold."""
    x = torch.randn(2, 2, 4, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    xp = F.pad(x, (1, 1, 1, 1))
    patches = torch.stack([torch.stack([xp[n, :, i:i + 3, j:j + 3].reshape(-1)
                                        for i in range(4) for j in range(3)])
                           for n in range(2)])  # (N, R, D)
    if mode == "expand":
        rows = patches.reshape(-1, patches.shape[-1])
        expected = sum(torch.outer(r, r) for r in rows) / rows.shape[0]
    else:
        means = patches.mean(1)
        expected = sum(torch.outer(m, m) for m in means) / 2
    got = patch_covariance(x, 3, padding=1, mode=mode, backend="cpu", algorithm="chunked")
    testing.assert_close_rel(got, expected, rtol=testing.RTOL[torch.float64])


@needs_cpu_kernel
@pytest.mark.parametrize("mode", ["expand", "reduce"])
def test_chunks_add_up(monkeypatch, mode):
    """With a chunk of one example, the chunks' products add up to the whole factor, also on top
    of a previous factor (``decay * factor + alpha * sum``), and for a multi-block result."""
    monkeypatch.setattr(pc, "CHUNK_BYTES", 1)
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(5, 48, 3, 3, generator=gen, dtype=torch.float64)  # D = 432 + 1: 2 blocks
    assert len(block_edges(48 * 9)) > 2
    geom = pc.conv_geometry((3, 3), 3, 1, 1)
    seg = pc.Segments(1, 0, 48, 48, True)
    prev = torch.randn(1, 433, 433, generator=gen, dtype=torch.float64)
    prev = prev + prev.mT
    reduce = mode == "reduce"
    got = pc.patch_gram(x, geom, seg, reduce, prev, 0.5, 0.25, "cpu", "chunked")
    expected = pc.patch_gram_eager(x, geom, seg, reduce, prev, 0.5, 0.25)
    testing.assert_close_rel(got, expected, rtol=testing.RTOL[torch.float64])
    assert bool((got == got.mT).all())


@needs_cpu_kernel
@pytest.mark.parametrize("algorithm", ["chunked", "shifted"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_blas_algorithms_low_precision_errs_no_more_than_eager(dtype, algorithm):
    """The chunked and the shifted algorithm (:mod:`test_patch_covariance_shifted`) in fp16 and
    bf16: at most twice eager's error in the same dtype."""
    x64 = torch.randn(4, 6, 7, 7, generator=torch.Generator().manual_seed(3),
                      dtype=torch.float64)
    x = x64.to(dtype)
    truth = patch_covariance(x.double(), 3, padding=1, backend="eager")
    eager_err = (patch_covariance(x, 3, padding=1, backend="eager").double() - truth).norm()
    got = patch_covariance(x, 3, padding=1, backend="cpu", algorithm=algorithm)
    assert got.dtype == dtype
    assert (got.double() - truth).norm() <= testing.LOW_PRECISION_FACTOR * eager_err


@needs_cpu_kernel
@pytest.mark.parametrize("algorithm", ["chunked", "shifted"])
def test_blas_algorithms_and_implicit_agree_on_a_channels_last_input(algorithm):
    x = torch.randn(3, 16, 6, 5, generator=torch.Generator().manual_seed(4))
    x = x.contiguous(memory_format=torch.channels_last)
    a = patch_covariance(x, 3, padding=1, bias=True, backend="cpu", algorithm=algorithm)
    b = patch_covariance(x, 3, padding=1, bias=True, backend="cpu", algorithm="implicit")
    testing.assert_close_rel(a, b, rtol=testing.RTOL[torch.float32])


@needs_cpu_kernel
def test_auto_never_takes_the_chunked_path(monkeypatch):
    """The last crossover sweep found the chunked path slower than the im2col-free kernel at
    every shape: ``algorithm='auto'`` runs it nowhere, also at the large strided and stride-1
    expand factors it used to be chosen for."""
    calls = []
    real = pc.patch_gram_chunked
    monkeypatch.setattr(pc, "patch_gram_chunked",
                        lambda *a, **k: calls.append(1) or real(*a, **k))
    for shape, mode, stride in (((2, 128, 20, 20), "expand", 1), ((2, 128, 4, 4), "expand", 1),
                                ((2, 128, 20, 20), "reduce", 1), ((8, 128, 20, 20), "expand", 2)):
        patch_covariance(torch.randn(*shape), 3, stride=stride, padding=1, mode=mode,
                         backend="cpu")
    assert not calls
    patch_covariance(torch.randn(2, 4, 5, 5), 3, backend="cpu", algorithm="chunked")
    assert calls == [1]


def test_algorithm_is_checked():
    x = torch.randn(2, 3, 5, 5)
    with pytest.raises(ValueError, match="algorithm must be one of"):
        patch_covariance(x, 3, algorithm="unfold")
    with pytest.raises(ValueError, match="algorithm='chunked'.*backend is 'eager'"):
        patch_covariance(x, 3, algorithm="chunked", backend="eager")


@needs_cpu_kernel
def test_chunked_memory_is_the_output_plus_one_chunk():
    """Peak extra memory of a chunked call (fresh process, bench/memory.py): the output plus
    one chunk of patches (8 MiB) and its input copies, far below the 38 MB unfolded tensor."""
    from bench.memory import peak_extra_memory

    n, c, hw, k = 32, 128, 16, 3
    unfold_bytes = n * c * k * k * hw * hw * 4
    mem = peak_extra_memory({"shape": [n, c, hw, hw], "dtype": "float32", "threads": 1,
                             "call": "kfac_kernels.ops:patch_covariance", "args": [k],
                             "kwargs": {"padding": 1, "backend": "cpu",
                                        "algorithm": "chunked"}})
    d = c * k * k
    assert mem["output_bytes"] == d * d * 4
    temporaries = mem["peak_extra_bytes"] - mem["output_bytes"]
    chunk = max(pc.CHUNK_BYTES, d * d * 4 // 4)
    # the chunk, its padded channel-major input (~1/9 of it for a 3x3 kernel), and an allowance
    # of 4 MiB for BLAS's packing buffers and the mirror's block temporaries
    assert temporaries <= chunk * (1 + 1.3 / (k * k)) + (4 << 20), (temporaries, chunk)
    assert temporaries < unfold_bytes / 2


# ---------------------------------------------------------------------------------------------
# symmetric products


@pytest.mark.parametrize("d,m", [(5, 3), (MIN_BLOCK * 2 - 1, 50), (MIN_BLOCK * 2, 7),
                                 (MIN_BLOCK * 7 + 5, 64), (LARGE + 5, 8)])
def test_symmetric_matmul_is_the_product_and_exactly_symmetric(d, m):
    gen = torch.Generator().manual_seed(d)
    x = torch.randn(m, d, generator=gen, dtype=torch.float64)
    u = torch.randn(d, d, generator=gen, dtype=torch.float64)
    u = u + u.mT
    got = symmetric_matmul(x.mT, x)
    testing.assert_close_rel(got, x.mT @ x, rtol=testing.RTOL[torch.float64])
    assert bool((got == got.mT).all())
    k = torch.randn(d, d, generator=gen, dtype=torch.float64)
    got = symmetric_matmul(k.mT, u @ k)
    testing.assert_close_rel(got, k.mT @ u @ k, rtol=testing.RTOL[torch.float64])
    assert bool((got == got.mT).all())


def test_symmetric_matmul_batched_is_each_product():
    """One panel (SINGD's stacked layers): a batch gives each matrix's own product, bit for bit;
    wider products take 2-d operands only, and say so."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(4, 9, 11, generator=gen, dtype=torch.float64)
    got = symmetric_matmul(x.mT, x)
    for i in range(4):
        assert torch.equal(got[i], symmetric_matmul(x[i].mT, x[i]))
    wide = torch.randn(2, 3, MIN_BLOCK * 2, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"symmetric_matmul: a product of 256 columns takes 2-d"):
        symmetric_matmul(wide.mT, wide)


def test_add_symmetric_matmul_beta_zero_ignores_what_out_held():
    d = MIN_BLOCK * 3
    x = torch.randn(20, d, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    out = torch.full((d, d), float("nan"), dtype=torch.float64)
    add_symmetric_matmul_(out, x.mT, x, alpha=0.5, beta=0.0)
    testing.assert_close_rel(out, 0.5 * x.mT @ x, rtol=testing.RTOL[torch.float64])
    add_symmetric_matmul_(out, x.mT, x, alpha=0.5)
    testing.assert_close_rel(out, x.mT @ x, rtol=testing.RTOL[torch.float64])
