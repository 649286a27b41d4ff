"""Tests of ``kfac_kernels.ops.block_eigh`` and ``block_damped_inverse``.

The oracles come from outside the solvers: the eigen residual ``||A Q - Q Lambda||_2 / ||A||_2``
and the orthogonality ``||Q^T Q - I||_2`` (both computed in fp64 from the block that was
actually passed; spectral norms, as LAPACK's own tests bound them: in the Frobenius norm even
``torch.linalg.eigh`` exceeds 1e-5 orthogonality in fp32 at n = 256, 1.8e-5 measured), the
ascending order, eigenvalues against ``torch.linalg.eigh`` in fp64 (Weyl: an eigenvalue error is
bounded by the backward error, so ``|lambda - lambda_ref| <= tol ||A||``),
and the damped inverse against ``torch.linalg.inv(A + gamma I)``. The corpus holds random SPD,
low-rank, repeated and clustered spectra, 1e10-conditioned, indefinite, zero, diagonal and
``1 x 1`` blocks, odd sizes included.

Every backend present runs it (``testing.backends_for``); Triton runs on CPU tensors only under
the interpreter (slow, so on blocks of size <= 16):

    TRITON_INTERPRET=1 python -m pytest tests/test_block_eigh.py
"""
from __future__ import annotations

import importlib
import math
import warnings

import pytest
import torch

import kfac_kernels._backend as _backend
from kfac_kernels import testing
from kfac_kernels.ops import block_damped_inverse, block_eigh

from _hypothesis import given, settings, st  # noqa: E402

pytestmark = pytest.mark.usefixtures("single_thread", "kernels_at_every_size")
# the module (the package attribute of the same name is the op)
block_eigh_module = importlib.import_module("kfac_kernels.ops.block_eigh")


@pytest.fixture
def kernels_at_every_size(monkeypatch):
    """The C++ kernel solves any size; its default hand-off to LAPACK above n = 8 is a speed
    choice, so the tests raise it to reach the kernel (test_default_cpu_hand_off checks it)."""
    monkeypatch.setitem(block_eigh_module.MAX_N, "cpu", 256)

OP = "block_eigh"
HAS_CPU_KERNEL = _backend.has_native_cpu() and _backend.native_has_op(OP)
needs_cpu_kernel = pytest.mark.skipif(
    not HAS_CPU_KERNEL, reason="kfac_kernels._C with torch.ops.kfac_kernels.block_eigh is not "
                               "built (python setup.py build_ext --inplace)")
# an extension built from older sources lacks the op: its "cpu" backend is then not present
BACKENDS = [b for b in testing.backends_for("cpu") if b != "cpu" or HAS_CPU_KERNEL]
KINDS = ("spd", "lowrank", "repeated", "clustered", "cond1e10", "indefinite", "zero", "diagonal")
TOL = {torch.float32: 1e-5, torch.float64: 1e-10}


def sizes_for(backend: str) -> tuple[int, ...]:
    if backend == "triton":  # the interpreter is slow
        return (1, 2, 5, 16)
    return (1, 2, 3, 7, 16, 33, 64)


def make_block(kind: str, n: int, gen: torch.Generator) -> torch.Tensor:
    """One fp64 symmetric block of the given spectral kind."""
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    if kind == "spd":
        lam = torch.rand(n, generator=gen, dtype=torch.float64) + 0.1
    elif kind == "lowrank":
        lam = torch.zeros(n, dtype=torch.float64)
        lam[: max(1, n // 3)] = torch.rand(max(1, n // 3), generator=gen, dtype=torch.float64) + 1
    elif kind == "repeated":
        lam = torch.tensor([1.0, 3.0], dtype=torch.float64).repeat(n)[:n]
    elif kind == "clustered":
        lam = 1.0 + 1e-7 * torch.rand(n, generator=gen, dtype=torch.float64)
        lam[: n // 2] += 2.0
    elif kind == "cond1e10":
        lam = torch.logspace(0, -10, n, dtype=torch.float64) if n > 1 else torch.ones(1).double()
    elif kind == "indefinite":
        lam = torch.randn(n, generator=gen, dtype=torch.float64) * 3
    elif kind == "zero":
        return torch.zeros(n, n, dtype=torch.float64)
    elif kind == "diagonal":
        return torch.diag(torch.randn(n, generator=gen, dtype=torch.float64))
    else:
        raise ValueError(kind)
    a = (q * lam) @ q.T
    return (a + a.T) / 2


def symmetric_from_lower(a: torch.Tensor) -> torch.Tensor:
    low = a.to(torch.float64).tril()
    return low + low.tril(-1).mT


def eigh_errors(a: torch.Tensor, vals: torch.Tensor, vecs: torch.Tensor) -> dict[str, float]:
    """Residual and orthogonality (2-norms, the residual relative to ||A||_2) and the largest
    eigenvalue error against fp64 LAPACK (relative to ||A||_2)."""
    a64 = symmetric_from_lower(a)
    v, q = vals.to(torch.float64), vecs.to(torch.float64)
    n = a.shape[-1]
    norm = max(float(torch.linalg.matrix_norm(a64, ord=2)), 1e-300) if n else 1.0
    ref = torch.linalg.eigvalsh(a64)
    return {"residual": float(torch.linalg.matrix_norm(a64 @ q - q * v, ord=2)) / norm,
            "orthogonality": float(torch.linalg.matrix_norm(
                q.mT @ q - torch.eye(n, dtype=torch.float64), ord=2)),
            "eigenvalue error": float((v - ref).abs().max()) / norm if n else 0.0}


def check_eigh(a: torch.Tensor, vals: torch.Tensor, vecs: torch.Tensor, tol, msg: str):
    """The outside oracle: residual, orthogonality, order, eigenvalues vs fp64 LAPACK. ``tol``:
    one bound for all three, or a dict of bounds by name (as ``eigh_errors`` names them)."""
    for name, err in eigh_errors(a, vals, vecs).items():
        bound = tol[name] if isinstance(tol, dict) else tol
        assert err <= bound, f"{msg}: {name} {err:.2e} > {bound:.1e}"
    v = vals.to(torch.float64)
    assert bool((v[1:] >= v[:-1]).all()), f"{msg}: eigenvalues not ascending"


def corpus(sizes, dtype, seed=0) -> list[tuple[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [(f"{kind} n={n}", make_block(kind, n, gen).to(dtype)) for n in sizes for kind in KINDS]


def dtypes_for(backend):
    return (torch.float32,) if backend == "triton" else (torch.float32, torch.float64)


CASES = [pytest.param(b, d, id=f"{b}-{str(d)[6:]}") for b in BACKENDS for d in dtypes_for(b)]


@pytest.mark.parametrize("backend,dtype", CASES)
def test_corpus_list(backend, dtype):
    """Every kind and size in one mixed-size list (bucketing), checked block by block."""
    named = corpus(sizes_for(backend), dtype)
    vals, vecs, sweeps = block_eigh([a for _, a in named], backend=backend, return_sweeps=True)
    assert len(vals) == len(vecs) == len(sweeps) == len(named)
    for (name, a), v, q, s in zip(named, vals, vecs, sweeps):
        assert v.shape == a.shape[:1] and q.shape == a.shape and v.dtype == q.dtype == dtype
        check_eigh(a, v, q, TOL[dtype], f"{backend} {dtype} {name}")
        if backend == "eager":
            assert int(s) == -1
        else:
            assert 0 <= int(s) <= block_eigh_module.DEFAULT_MAX_SWEEPS


@pytest.mark.parametrize("backend,dtype", CASES)
def test_corpus_stacked(backend, dtype):
    """A stacked batch of one size with non-contiguous storage, against the list results."""
    n = 7
    blocks = torch.stack([a for _, a in corpus((n,), dtype, seed=1)])
    strided = testing.non_contiguous(blocks)
    vals, vecs = block_eigh(strided, backend=backend)
    assert vals.shape == (len(KINDS), n) and vecs.shape == (len(KINDS), n, n)
    for i in range(len(KINDS)):
        check_eigh(blocks[i], vals[i], vecs[i], TOL[dtype], f"{backend} {KINDS[i]}")
    lv, lq = block_eigh(list(blocks.unbind(0)), backend=backend)
    assert torch.equal(torch.stack(lv), vals) and torch.equal(torch.stack(lq), vecs)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "triton"])
@pytest.mark.parametrize("n", [100, 256])
def test_large_blocks(backend, n):
    """Sizes up to the CPU limit in fp64 and fp32 (spd and 1e10-conditioned)."""
    gen = torch.Generator().manual_seed(n)
    for dtype in (torch.float32, torch.float64):
        blocks = [make_block("spd", n, gen).to(dtype), make_block("cond1e10", n, gen).to(dtype)]
        vals, vecs = block_eigh(blocks, backend=backend)
        for a, v, q in zip(blocks, vals, vecs):
            check_eigh(a, v, q, TOL[dtype], f"{backend} {dtype} n={n}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_lower_triangle_only(backend):
    gen = torch.Generator().manual_seed(3)
    a = make_block("spd", 6, gen).float()
    garbage = a.clone()
    garbage.triu_(1).add_(100.0)
    messy = a.tril() + garbage.triu(1)
    v1, q1 = block_eigh(a[None], backend=backend)
    v2, q2 = block_eigh(messy[None], backend=backend)
    assert torch.equal(v1, v2) and torch.equal(q1, q2)


@pytest.mark.parametrize("backend", BACKENDS)
def test_nonfinite_block_is_confined(backend):
    gen = torch.Generator().manual_seed(4)
    n = 8 if backend != "triton" else 4
    blocks = torch.stack([make_block("spd", n, gen) for _ in range(4)]).float()
    bad = blocks.clone()
    bad[1, 3, 2] = math.nan
    bad[2, n - 1, 0] = math.inf
    vals, vecs, sweeps = block_eigh(bad, backend=backend, return_sweeps=True)
    alone_v, alone_q = block_eigh(blocks[[0, 3]], backend=backend)
    for i in (1, 2):
        assert vals[i].isnan().all() and vecs[i].isnan().all()
        assert int(sweeps[i]) == -1
    assert torch.equal(vals[[0, 3]], alone_v) and torch.equal(vecs[[0, 3]], alone_q)
    inv = block_damped_inverse(bad, 0.1, backend=backend)
    assert inv[1].isnan().all() and inv[2].isnan().all()
    assert torch.isfinite(inv[[0, 3]]).all()


@pytest.mark.parametrize("backend,dtype", CASES)
def test_damped_inverse_matches_inverse(backend, dtype):
    gen = torch.Generator().manual_seed(5)
    sizes = (1, 3, 8, 16) if backend == "triton" else (1, 3, 8, 33)
    blocks = [make_block("spd", n, gen).to(dtype) for n in sizes]
    damping = [0.5, 1e-3, 0.1, 2.0]
    inv = block_damped_inverse(blocks, damping, backend=backend)
    for a, g, x in zip(blocks, damping, inv):
        assert x.dtype == dtype and torch.equal(x, x.mT), "not exactly symmetric"
        a64 = a.to(torch.float64)
        ref = torch.linalg.inv(a64 + g * torch.eye(a.shape[0], dtype=torch.float64))
        testing.assert_close_rel(x, ref, TOL[dtype], f"{backend} n={a.shape[0]}")
    stacked = torch.stack([make_block("spd", 5, gen).to(dtype) for _ in range(3)])
    gammas = torch.tensor([0.1, 0.2, 0.3])
    inv = block_damped_inverse(stacked, gammas, backend=backend)
    for i in range(3):
        ref = torch.linalg.inv(stacked[i].double() + float(gammas[i]) * torch.eye(5).double())
        testing.assert_close_rel(inv[i], ref, TOL[dtype])


@pytest.mark.parametrize("backend", BACKENDS)
def test_negative_round_off_is_clamped(backend):
    """A PSD block with eigenvalues -5e-6 (round-off) behaves as if they were 0."""
    gen = torch.Generator().manual_seed(6)
    q, _ = torch.linalg.qr(torch.randn(5, 5, generator=gen, dtype=torch.float64))
    lam = torch.tensor([-5e-6, -5e-6, 0.5, 1.0, 2.0], dtype=torch.float64)
    a = ((q * lam) @ q.T).float()
    gamma = 1e-5
    inv = block_damped_inverse(a[None], gamma, backend=backend)[0].double()
    clamped = (q * (1 / (lam.clamp_min(0) + gamma))) @ q.T
    testing.assert_close_rel(inv, clamped, 1e-4)  # fp32 with a 1e5 condition number
    unclamped = torch.linalg.inv(q @ torch.diag(lam + gamma) @ q.T)
    assert testing.rel_error(inv, unclamped) > 0.4  # the unclamped inverse is 2x larger


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_damping_singular_gives_inf(backend):
    a = torch.zeros(1, 3, 3)
    inv = block_damped_inverse(a, 0.0, backend=backend)
    assert not torch.isfinite(inv).any()
    spd = torch.diag(torch.tensor([1.0, 2.0, 4.0]))[None]
    inv = block_damped_inverse(spd, 0, backend=backend)
    testing.assert_close_rel(inv[0], torch.diag(torch.tensor([1.0, 0.5, 0.25])), 1e-6)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "eager"])
def test_sweeps(backend):
    gen = torch.Generator().manual_seed(7)
    blocks = torch.stack([make_block("spd", 8, gen), torch.diag(torch.arange(8.0)).double()])
    blocks = blocks.float()
    _, _, sweeps = block_eigh(blocks, backend=backend, return_sweeps=True)
    assert sweeps.dtype == torch.int32 and int(sweeps[1]) == 0 and int(sweeps[0]) >= 2
    vals, vecs, sweeps = block_eigh(blocks, backend=backend, max_sweeps=1, return_sweeps=True)
    assert int(sweeps[0]) == 1
    a64 = blocks[0].double()
    residual = float(torch.linalg.norm(a64 @ vecs[0].double() - vecs[0].double() * vals[0]))
    assert residual > 1e-5 * float(torch.linalg.norm(a64)), "one sweep cannot converge"


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "eager"])
def test_above_limit_goes_to_lapack_with_one_warning(backend, monkeypatch):
    monkeypatch.setitem(block_eigh_module.MAX_N, backend, 4)
    monkeypatch.setattr(block_eigh_module, "_warned", set())
    gen = torch.Generator().manual_seed(8)
    blocks = [make_block("spd", 6, gen).float(), make_block("spd", 3, gen).float()]
    with pytest.warns(UserWarning, match="are solved with torch.linalg.eigh"):
        _, _, sweeps = block_eigh(blocks, backend=backend, return_sweeps=True)
    assert int(sweeps[0]) == -1 and int(sweeps[1]) >= 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        block_eigh(blocks, backend=backend)


@needs_cpu_kernel
def test_default_cpu_hand_off(monkeypatch):
    monkeypatch.setitem(block_eigh_module.MAX_N, "cpu", 8)
    monkeypatch.setattr(block_eigh_module, "_warned", set())
    gen = torch.Generator().manual_seed(11)
    blocks = [make_block("spd", 9, gen), make_block("spd", 8, gen)]
    with pytest.warns(UserWarning, match=r"limit \(8\) are solved with torch.linalg.eigh"):
        vals, vecs, sweeps = block_eigh(blocks, backend="cpu", return_sweeps=True)
    assert int(sweeps[0]) == -1 and int(sweeps[1]) >= 0
    for a, v, q in zip(blocks, vals, vecs):
        check_eigh(a, v, q, 1e-10, "hand-off")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_computes_in_fp32(backend, dtype):
    gen = torch.Generator().manual_seed(9)
    a = make_block("spd", 6, gen).to(dtype)
    vals, vecs = block_eigh(a[None], backend=backend)
    assert vals.dtype == vecs.dtype == dtype
    ref_v, ref_q = block_eigh(a[None].float(), backend=backend)
    assert torch.equal(vals, ref_v.to(dtype)) and torch.equal(vecs, ref_q.to(dtype))
    inv = block_damped_inverse([a], 0.1, backend=backend)[0]
    assert inv.dtype == dtype and torch.equal(inv, inv.mT)


def test_triton_rejects_fp64():
    if "triton" not in BACKENDS:
        pytest.skip("Triton on CPU tensors needs TRITON_INTERPRET=1 (and triton)")
    with pytest.raises(TypeError, match="'triton' backend computes in float32 only"):
        block_eigh(torch.eye(3, dtype=torch.float64)[None], backend="triton")


def test_auto_never_picks_triton_for_fp64(monkeypatch):
    """On CUDA tensors without the CUDA extension "auto" resolves to Triton, which is fp32-only:
    fp64 blocks then go to the eager path instead of raising."""
    monkeypatch.setattr(block_eigh_module, "resolve_backend",
                        lambda backend, device, op, prefer=None: "triton")
    a = make_block("spd", 4, torch.Generator().manual_seed(12))[None]
    vals, vecs, sweeps = block_eigh(a, return_sweeps=True)
    assert int(sweeps[0]) == -1
    check_eigh(a[0], vals[0], vecs[0], 1e-10, "auto fp64")


@pytest.mark.parametrize("call,exc,match", [
    (lambda: block_eigh(torch.zeros(2, 3, 4)), ValueError, r"blocks must be a \(B, n, n\) tensor"),
    (lambda: block_eigh(torch.zeros(3, 3)), ValueError, r"blocks must be a \(B, n, n\) tensor"),
    (lambda: block_eigh([torch.zeros(2, 3)]), ValueError, r"blocks\[0\] must be a square"),
    (lambda: block_eigh(torch.zeros(1, 2, 2, dtype=torch.int64)), TypeError,
     "blocks must be floating point"),
    (lambda: block_eigh([torch.eye(2), torch.eye(2, dtype=torch.int32)]), TypeError,
     r"blocks\[1\] must be floating point"),
    (lambda: block_eigh([]), ValueError, "blocks must not be an empty list"),
    (lambda: block_eigh([torch.eye(2), torch.eye(2).double()]), ValueError,
     "all blocks must share one dtype and device"),
    (lambda: block_eigh("x"), TypeError, "blocks must be a torch.Tensor or a list"),
    (lambda: block_eigh(torch.eye(2)[None], backend="gpu"), ValueError, "backend must be one of"),
    (lambda: block_eigh(torch.eye(2)[None], max_sweeps=0), ValueError, "max_sweeps must be"),
    (lambda: block_eigh(torch.eye(2)[None], tol=-1.0), ValueError, "tol must be"),
    (lambda: block_damped_inverse(torch.eye(2)[None].repeat(3, 1, 1), [1.0, 2.0]), ValueError,
     r"damping must have one value per block \(3\), got 2"),
    (lambda: block_damped_inverse([torch.eye(2)], torch.ones(2)), ValueError,
     r"damping must have one value per block \(1\), got 2"),
    (lambda: block_damped_inverse(torch.eye(2)[None], -0.1), ValueError,
     "damping must be non-negative and finite"),
    (lambda: block_damped_inverse(torch.eye(2)[None], [math.nan]), ValueError,
     "damping must be non-negative and finite"),
    (lambda: block_damped_inverse(torch.eye(2)[None], "1"), TypeError,
     "damping must be a float or one value per block"),
])
def test_argument_errors(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_cpu_backend_on_cuda_request_is_an_error():
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(_backend.BackendUnavailableError, match="backend='cuda'"):
        block_eigh(torch.eye(2)[None], backend="cuda")


@needs_cpu_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_opcheck(dtype):
    gen = torch.Generator().manual_seed(10)
    blocks = torch.stack([make_block("spd", 5, gen) for _ in range(3)]).to(dtype)
    torch.library.opcheck(torch.ops.kfac_kernels.block_eigh.default, (blocks, 30, 1e-7))
    damping = torch.tensor([0.1, 0.2, 0.3], dtype=dtype)
    torch.library.opcheck(torch.ops.kfac_kernels.block_damped_inverse.default,
                          (blocks, damping, 30, 1e-7))


@needs_cpu_kernel
@settings(max_examples=30, deadline=None)
@given(sizes=st.lists(st.integers(1, 24), min_size=1, max_size=5),
       kinds=st.lists(st.sampled_from(KINDS), min_size=5, max_size=5),
       seed=st.integers(0, 2**31 - 1), fp64=st.booleans())
def test_property_cpu(sizes, kinds, seed, fp64):
    """Any mix of sizes and spectral kinds meets the oracle on the C++ backend."""
    gen = torch.Generator().manual_seed(seed)
    dtype = torch.float64 if fp64 else torch.float32
    blocks = [make_block(k, n, gen).to(dtype) for n, k in zip(sizes, kinds)]
    vals, vecs = block_eigh(blocks, backend="cpu")
    for a, v, q in zip(blocks, vals, vecs):
        check_eigh(a, v, q, TOL[dtype], f"n={a.shape[0]}")


GPU_CASES = [pytest.param(b, d, marks=pytest.mark.gpu, id=f"{b}-{str(d)[6:]}")
             for b in (testing.backends_for("cuda") if torch.cuda.is_available() else [])
             for d in dtypes_for(b)]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("backend,dtype", GPU_CASES)
def test_corpus_cuda(backend, dtype):
    """The corpus on CUDA tensors, sizes up to each backend's limit, a NaN block included."""
    sizes = (1, 2, 7, 16, 33, 64) + ((96, 128) if backend != "triton" else ())
    named = corpus(sizes, dtype)
    blocks = [a.cuda() for _, a in named]
    blocks[3] = blocks[3].clone()
    blocks[3][-1, 0] = math.nan
    vals, vecs, sweeps = block_eigh(blocks, backend=backend, return_sweeps=True)
    for i, ((name, a), v, q) in enumerate(zip(named, vals, vecs)):
        if i == 3:
            assert v.isnan().all() and q.isnan().all()
            continue
        # The bound is the device's own eigensolver in the same dtype: a kernel may err at most
        # twice as much as cuSOLVER (torch.linalg.eigh on the same block). cuSOLVER's fp32
        # vectors themselves miss the CPU bound of 1e-5 on ill-conditioned blocks (cond 1e10,
        # on an H200: orthogonality 1.12e-5 = 2.8 n eps at n = 33, 6.63e-5 = 4.4 n eps at
        # n = 128), so for the eager backend the bound is 8 n eps: a backward-stable solver's
        # error grows with n, with a constant no solver documents.
        if backend == "eager":
            tol = max(TOL[dtype], 8 * a.shape[-1] * torch.finfo(dtype).eps)
        else:
            ref_vals, ref_vecs = torch.linalg.eigh(symmetric_from_lower(a).to(dtype).cuda())
            tol = {k: max(TOL[dtype], 2 * e)
                   for k, e in eigh_errors(a, ref_vals.cpu(), ref_vecs.cpu()).items()}
        check_eigh(a, v.cpu(), q.cpu(), tol, f"cuda {backend} {dtype} {name}")
    spd = torch.stack([make_block("spd", 24, torch.Generator().manual_seed(i))
                       for i in range(3)]).to(dtype)
    inv = block_damped_inverse(spd.cuda(), [0.1, 0.2, 0.3], backend=backend).cpu()
    assert torch.equal(inv, inv.mT)
    for i, g in enumerate((0.1, 0.2, 0.3)):
        ref = torch.linalg.inv(spd[i].double() + g * torch.eye(24, dtype=torch.float64))
        testing.assert_close_rel(inv[i], ref, TOL[dtype])
