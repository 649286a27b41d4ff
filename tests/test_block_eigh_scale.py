"""``block_eigh`` and ``block_damped_inverse`` do not depend on the scale of a block.

Jacobi stops when ``off(A) <= tol * ||A||_F`` and every pair is small against its own diagonal:
relative tests, as long as the norms and products are computed without under- or overflow. Squared in the block's own precision they are not: in fp32
the squares of entries below ~1e-19 are 0 (a block looks converged before its first sweep) and
those above ~1e19 are inf (the same). Every backend present runs blocks scaled by 1e-30 .. 1e30
in fp32 and bfloat16 (whose range is fp32's), and by up to 1e+-300 in fp64 where a backend
computes in fp64; the oracles are those of ``test_block_eigh.py`` (eigen residual,
orthogonality, eigenvalues against fp64 LAPACK, the damped inverse against its definition in
fp64),
all relative to the block's norm.

    TRITON_INTERPRET=1 python -m pytest tests/test_block_eigh_scale.py
"""
from __future__ import annotations

import pytest
import torch

from kfac_kernels import testing
from kfac_kernels.ops import block_damped_inverse, block_eigh

from test_block_eigh import BACKENDS, TOL, check_eigh, make_block

pytestmark = pytest.mark.usefixtures("single_thread")

# (backend, device): every backend present, the GPU ones on CUDA tensors (marked gpu)
CASES = [pytest.param(b, "cpu", id=b) for b in BACKENDS] + [
    pytest.param(b, "cuda", id=f"{b}-cuda", marks=pytest.mark.gpu)
    for b in (testing.backends_for("cuda") if torch.cuda.is_available() else []) if b != "eager"]
SCALES_FP32 = [1e-30, 1e-25, 1e-19, 1e-10, 1.0, 1e10, 1e19, 1e25, 1e30]
SCALES_FP64 = [1e-300, 1e-200, 1e-30, 1e30, 1e200, 1e300]


def _blocks(dtype: torch.dtype, scale: float, device: str = "cpu") -> list[torch.Tensor]:
    """The 2 x 2 block of the report, and 5 x 5 SPD and indefinite blocks, times ``scale``
    (formed in fp64, then rounded once to ``dtype``)."""
    gen = torch.Generator().manual_seed(13)
    base = [torch.tensor([[2.0, 1.0], [1.0, 2.0]], dtype=torch.float64),
            make_block("spd", 5, gen), make_block("indefinite", 5, gen)]
    return [(a * scale).to(dtype).to(device) for a in base]


def _residual(a: torch.Tensor, vals: torch.Tensor, vecs: torch.Tensor) -> float:
    a64 = a.to(torch.float64).cpu()
    q, v = vecs.to(torch.float64).cpu(), vals.to(torch.float64).cpu()
    return float(torch.linalg.matrix_norm(a64 @ q - q * v, ord=2)
                 / torch.linalg.matrix_norm(a64, ord=2))


def _inverse_error(a: torch.Tensor, inv: torch.Tensor, gamma: float) -> float:
    """Against ``Q (max(Lambda, 0) + gamma)^-1 Q^T`` from fp64 LAPACK (the definition: negative
    eigenvalues of the indefinite block are clamped)."""
    lam, q = torch.linalg.eigh(a.to(torch.float64).cpu())
    ref = (q / (lam.clamp_min(0) + gamma)) @ q.mT
    unit = ref.abs().max()  # rel_error squares entries: keep them near 1 (1e200 would overflow)
    return testing.rel_error(inv.to(torch.float64).cpu() / unit, ref / unit)


def _solve(backend, blocks, gammas):
    vals, vecs, sweeps = block_eigh(blocks, backend=backend, return_sweeps=True)
    inv = block_damped_inverse(blocks, gammas, backend=backend)
    return vals, vecs, sweeps, inv


def _check_at_scale(backend, device, dtype, scale, inverse_tol):
    """Eigen oracles at the tolerance of ``dtype`` and at least one sweep (no block here is
    diagonal; eager is LAPACK and reports -1), the damped inverse within ``inverse_tol``."""
    blocks = _blocks(dtype, scale, device)
    # damping at the block's scale: the inverse then depends on every entry, not on the
    # diagonal alone
    gammas = [0.25 * scale] * len(blocks)
    vals, vecs, sweeps, inv = _solve(backend, blocks, gammas)
    for a, v, q, s, x, g in zip(blocks, vals, vecs, sweeps, inv, gammas):
        name = f"{backend} n={a.shape[0]} scale={scale:.0e}"
        check_eigh(a.cpu(), v.cpu(), q.cpu(), TOL[dtype], name)
        if backend != "eager":
            assert int(s) >= 1, f"{name}: {int(s)} sweeps"
        err = _inverse_error(a, x, g)
        assert err <= inverse_tol, f"{name}: damped inverse error {err:.2e}"


@pytest.mark.parametrize("backend,device", CASES)
@pytest.mark.parametrize("scale", SCALES_FP32, ids=lambda s: f"{s:.0e}")
def test_fp32_at_every_scale(backend, device, scale):
    _check_at_scale(backend, device, torch.float32, scale, 1e-5)


@pytest.mark.parametrize("backend,device", CASES)
@pytest.mark.parametrize("scale", SCALES_FP32, ids=lambda s: f"{s:.0e}")
def test_bf16_at_every_scale(backend, device, scale):
    """bfloat16 results are fp32 results rounded once, so they may err at most twice as much as
    eager's (also rounded once) in the same dtype; eager's error is floored at one bfloat16 unit
    round-off (2^-8), below which a single rounding of a lucky block can fall."""
    blocks = _blocks(torch.bfloat16, scale, device)
    gammas = [0.25 * scale] * len(blocks)
    vals, vecs, _, inv = _solve(backend, blocks, gammas)
    e_vals, e_vecs, _, e_inv = _solve("eager", blocks, gammas)
    unit = 2.0 ** -8
    for i, a in enumerate(blocks):
        name = f"{backend} n={a.shape[0]} scale={scale:.0e}"
        assert vals[i].dtype == vecs[i].dtype == inv[i].dtype == torch.bfloat16
        res = _residual(a, vals[i], vecs[i])
        bound = testing.LOW_PRECISION_FACTOR * max(_residual(a, e_vals[i], e_vecs[i]), unit)
        assert res <= bound, f"{name}: residual {res:.2e} > {bound:.2e}"
        err = _inverse_error(a, inv[i], gammas[i])
        bound = testing.LOW_PRECISION_FACTOR * max(_inverse_error(a, e_inv[i], gammas[i]), unit)
        assert err <= bound, f"{name}: damped inverse error {err:.2e} > {bound:.2e}"


@pytest.mark.parametrize("backend,device", [c for c in CASES if c.values[0] != "triton"])
@pytest.mark.parametrize("scale", SCALES_FP64, ids=lambda s: f"{s:.0e}")
def test_fp64_at_extreme_scales(backend, device, scale):
    """Triton computes in fp32 only."""
    _check_at_scale(backend, device, torch.float64, scale, 1e-10)


def test_reported_case():
    """The report: ``[[2, 1], [1, 2]] * 1e-25`` has eigenvalues 1e-25 and 3e-25 on every
    backend (it used to stop after 0 sweeps with [2e-25, 2e-25] on Triton)."""
    a = torch.tensor([[[2.0, 1.0], [1.0, 2.0]]]) * 1e-25
    for backend in BACKENDS:
        vals, _ = block_eigh(a, backend=backend)
        testing.assert_close_rel(vals[0].double(),
                                 torch.tensor([1e-25, 3e-25], dtype=torch.float64), 1e-6,
                                 backend)


@pytest.mark.parametrize("backend,device", [c for c in CASES if c.values[0] != "eager"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("outlier", [1e4, 1e6, 1e8], ids=lambda s: f"{s:.0e}")
def test_graded_block_keeps_its_small_eigenpairs(backend, device, dtype, outlier):
    """A Wishart block whose first diagonal entry is ``outlier`` times the others. The normwise
    stop alone (``off(A) <= eps ||A||_F``) ended after 0..4 sweeps, leaving the damped inverse,
    which the small eigenpairs dominate, with fp32 errors of 2e-4 (cpu) and 0.79 (triton); the
    pairwise test (each ``a_ij`` against ``sqrt(a_ii a_jj)``) solves every pair to its own scale.
    (LAPACK's ``ssyevd`` errs up to 0.3 here at n = 32, so the bound is absolute, not eager's.)"""
    if dtype == torch.float64 and backend == "triton":
        pytest.skip("triton computes in fp32 only")
    gen = torch.Generator().manual_seed(int(outlier) % 1000 + 3)
    x = torch.randn(2, 8, 16, generator=gen, dtype=torch.float64)
    a = x @ x.mT / 16
    a[:, 0, 0] = outlier
    blocks = a.to(dtype).to(device)
    inv = block_damped_inverse(blocks, [1e-3, 1e-3], backend=backend)
    _, _, sweeps = block_eigh(blocks, backend=backend, return_sweeps=True)
    for b in range(2):
        err = _inverse_error(blocks[b], inv[b], 1e-3)
        assert err <= TOL[dtype], f"{backend} {dtype} outlier {outlier:.0e}: damped inverse " \
                                  f"error {err:.2e} after {int(sweeps[b])} sweeps"
