"""``compute_method="cholesky"``: the damped factors' Cholesky factors and two triangular solves
per side give the preconditioned gradient of the precomputed damped inverses (fp64, to
round-off) for every structure (dense, block-diagonal with norm layers, diagonal), with
absolute and relative damping; the factor of a failed factorisation keeps the previous one; the
op ``block_damped_cholesky`` against its definition on every backend, and its native kernel's
confinement of non-finite blocks."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from kfac_kernels import BDKFAC, KFAC, BackendUnavailableError, testing
from kfac_kernels._backend import native_has_op
from kfac_kernels.ops import block_damped_cholesky, block_damped_inverse

from test_bdkfac import cnn, data

pytestmark = pytest.mark.usefixtures("single_thread")


def _preconditioned(make, method, steps=2):
    model = cnn(norm=True)
    opt = make(model, method)
    x, y = data()
    for _ in range(steps):
        model.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return [p.grad.clone() for p in model.parameters()], opt


MAKERS = {
    "dense": lambda m, c: KFAC(m, damping=1e-2, damping_form="factored", compute_method=c,
                               factor_update_steps=1, inv_update_steps=1),
    "dense-relative": lambda m, c: KFAC(m, relative_damping=1e-2, lr=0.1, damping_form="factored",
                                        compute_method=c, factor_update_steps=1,
                                        inv_update_steps=1),
    "block-diagonal": lambda m, c: BDKFAC(m, num_blocks=2, damping=1e-2, damping_form="factored",
                                          compute_method=c, damping_split="equal",
                                          factor_update_steps=1, inv_update_steps=1),
    "diagonal": lambda m, c: KFAC(m, structure="diagonal", damping=1e-2,
                                  damping_form="factored", compute_method=c,
                                  factor_update_steps=1, inv_update_steps=1),
}


@pytest.mark.parametrize("structure", MAKERS)
def test_cholesky_form_equals_the_inverse_form(structure):
    want, _ = _preconditioned(MAKERS[structure], "inverse")
    got, opt = _preconditioned(MAKERS[structure], "cholesky")
    assert any("chol_A" in d for d in opt.preconditioners.values())
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12 * float(w.abs().max()))


def test_failed_factorisation_keeps_the_previous_factor(stored_health_path):
    model = cnn()
    opt = KFAC(model, damping=1e-2, damping_form="factored", compute_method="cholesky",
               factor_update_steps=1, inv_update_steps=1)
    x, y = data()
    F.cross_entropy(model(x), y).backward()
    opt.step()
    before = [t.clone() for t in opt.blocks["0"].decomposition["chol_A"]]
    opt.blocks["0"].A[0][0, 0, 0] = float("nan")
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()
    with pytest.warns(RuntimeWarning, match="not finite"):
        opt.decompose(["0"])
    for old, new in zip(before, opt.blocks["0"].decomposition["chol_A"]):
        assert torch.equal(old, new)


CHOLESKY_BACKENDS = ["eager"] + (["cpu"] if native_has_op("block_damped_cholesky") else [])


@pytest.mark.parametrize("backend", CHOLESKY_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_block_damped_cholesky_against_its_definition(dtype, backend):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 6, 9, generator=gen, dtype=torch.float64)
    a = x @ x.mT / 9
    gamma = torch.tensor([0.1, 0.2, 0.3], dtype=torch.float64)
    a[:, 0, 1] = 1e3  # the upper triangle is not read
    chol = block_damped_cholesky(a.to(dtype), gamma.to(dtype), backend=backend)
    assert chol.dtype == dtype and torch.equal(chol, chol.tril())
    lower = a.tril() + a.tril(-1).mT + torch.diag_embed(gamma[:, None].expand(3, 6))
    tol = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 2e-2}[dtype]
    err = (chol.double() @ chol.double().mT - lower).norm() / lower.norm()
    assert err <= tol
    bad = a.clone()
    bad[1] = -bad[1]
    out = block_damped_cholesky(bad.to(dtype), 0.1, backend=backend)
    assert out[1].isnan().all() and out[[0, 2]].isfinite().all()
    with pytest.raises(ValueError, match="block_damped_cholesky: damping must have one value"):
        block_damped_cholesky(a, [0.1, 0.2])


@pytest.mark.skipif("cpu" not in CHOLESKY_BACKENDS, reason="needs the native extension")
def test_native_cholesky_confines_non_finite_blocks_and_matches_lapack():
    """The native kernel calls the LAPACK torch links on the row-major copy as it lies: the same
    factor as ``torch.linalg.cholesky_ex`` up to the order of the rounding (uplo "U" on the
    transposed storage), exactly lower triangular, with zeros (not the input) above the
    diagonal; a non-finite entry spreads as in the eager factorisation and stays in its block;
    a NaN damping fails its block (all NaN)."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(5, 40, 60, generator=gen, dtype=torch.float64)
    a = x @ x.mT / 60 + torch.full((40, 40), 7.0, dtype=torch.float64).triu(1)  # never read
    gamma = torch.tensor([0.1, 0.2, 0.3, 0.4, 0.5], dtype=torch.float64)
    native = block_damped_cholesky(a, gamma, backend="cpu")
    eager = block_damped_cholesky(a, gamma, backend="eager")
    assert torch.equal(native, native.tril())
    assert (native - eager).abs().max() <= 1e-12 * eager.abs().max()
    bad = a.clone()
    bad[1, 7, 3] = float("inf")  # lower triangle: read
    bad[2, 3, 7] = float("nan")  # upper triangle: not read
    out = block_damped_cholesky(bad, gamma, backend="cpu")
    want = block_damped_cholesky(bad, gamma, backend="eager")
    assert not out[1].isfinite().all()
    assert torch.equal(out.isfinite(), want.isfinite())
    assert torch.equal(out[[0, 2, 3, 4]], native[[0, 2, 3, 4]])
    # a damping tensor is not read on the host, so a NaN in it reaches the kernel
    nan_damping = block_damped_cholesky(a, torch.tensor([0.1, math.nan, 0.3, 0.4, 0.5],
                                                        dtype=torch.float64), backend="cpu")
    assert nan_damping[1].isnan().all() and nan_damping[[0, 2]].isfinite().all()
    with pytest.raises(BackendUnavailableError, match="block_damped_cholesky: backend='triton' "
                       "is unavailable: the op has no triton kernel"):
        block_damped_cholesky(a, gamma, backend="triton")
    with pytest.raises(ValueError, match="block_damped_cholesky: backend must be one of"):
        block_damped_cholesky(a, gamma, backend="lapack")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_indefinite_block_above_the_jacobi_size_falls_back_to_the_clamped_inverse(dtype):
    """Above the Jacobi kernels' size a damped inverse comes from a Cholesky factorisation
    (on the CPU the native one); a block it cannot factor (indefinite beyond the damping) is the
    clamped eigen-inverse with ``fallback=True`` and NaN without, its neighbours untouched."""
    gen = torch.Generator().manual_seed(7)
    n = 33
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    lam = torch.linspace(0.1, 2.0, n, dtype=torch.float64)
    good = (q * lam) @ q.T
    lam_bad = lam.clone()
    lam_bad[:3] = -0.5
    bad = (q * lam_bad) @ q.T
    stack = torch.stack([good, bad, good]).to(dtype)
    gamma = 0.1
    clamped = (q * (1 / (lam_bad.clamp_min(0) + gamma))) @ q.T
    plain = torch.linalg.inv(good + gamma * torch.eye(n, dtype=torch.float64))
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    inv = block_damped_inverse(stack, gamma)
    testing.assert_close_rel(inv[1], clamped, tol)
    for i in (0, 2):
        testing.assert_close_rel(inv[i], plain, tol)
    inv = block_damped_inverse(stack, gamma, fallback=False)
    assert inv[1].isnan().all()
    for i in (0, 2):
        testing.assert_close_rel(inv[i], plain, tol)
