"""SINGD's warm start: K K^T and C C^T start at the damped inverses of the first statistics
(matrix products only) and, with it, the factors track K-FAC's damped inverse moving average
from the start (Lin et al. (2024), SINGD, Theorem 1) instead of staying near the identity."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kfac_kernels import SINGD
from kfac_kernels.singd.structures import BlockDiagonal, Dense, Diagonal, LowerTriangular
from kfac_kernels.singd.warm import inverse_sqrt_newton_schulz, warm_factor

DT = torch.float64
pytestmark = pytest.mark.usefixtures("single_thread")


def _spd(n, seed, cond=1e3, dtype=DT):
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=DT))
    vals = torch.logspace(0, -torch.log10(torch.tensor(cond)).item(), n, dtype=DT)
    return ((q * vals) @ q.T).to(dtype)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 2e-4)])
def test_newton_schulz_inverse_root(dtype, tol):
    s = _spd(12, 0, dtype=dtype)
    damping = 1e-3
    root = inverse_sqrt_newton_schulz(s + damping * torch.eye(12, dtype=dtype), damping)
    expected = torch.linalg.inv(s.double() + damping * torch.eye(12, dtype=DT))
    err = (root.double() @ root.double().T - expected).norm() / expected.norm()
    assert err < tol


@pytest.mark.parametrize("cls,k", [(Dense, None), (BlockDiagonal, 4)])
def test_warm_start_from_statistics_whose_norm_overflows_fp32(cls, k):
    """A diverging run's statistics can be finite while their Frobenius norm overflows fp32
    (entries ~1e34: a restarted layer warm-starts from them); the inverse root is then taken in
    float64 and returned in fp32, not a crash (it raised an OverflowError)."""
    s = 1e34 * _spd(8, 2, cond=10, dtype=torch.float32)
    assert bool(s.isfinite().all()) and not bool(torch.linalg.matrix_norm(s).isfinite())
    damping = 0.1
    f = warm_factor(cls, k, s, damping, torch.float32).to_dense()
    assert f.dtype == torch.float32 and bool(f.isfinite().all())
    target = s.double() + damping * torch.eye(8, dtype=DT)
    if cls is BlockDiagonal:
        target = BlockDiagonal.project(target, k).to_dense()
    err = (f.double() @ f.double().T @ target - torch.eye(8, dtype=DT)).norm()
    assert err < 1e-4


@pytest.mark.parametrize("cls,k", [(Dense, None), (Diagonal, None), (BlockDiagonal, 4),
                                   (LowerTriangular, None)])
def test_warm_factor_per_structure(cls, k):
    s, damping = _spd(10, 1, cond=50), 0.05
    f = warm_factor(cls, k, s, damping, DT).to_dense()
    target = s + damping * torch.eye(10, dtype=DT)
    if cls is Dense:
        expected = torch.linalg.inv(target)
    elif cls is Diagonal:
        expected = torch.diag(1 / torch.diagonal(target))
    elif cls is BlockDiagonal:
        expected = torch.block_diag(*(torch.linalg.inv(target[i:i + 4, i:i + 4])
                                      for i in (0, 4)), torch.linalg.inv(target[8:, 8:]))
    else:   # the scalar start: the right scale
        expected = torch.eye(10, dtype=DT) / (torch.diagonal(target).mean())
    torch.testing.assert_close(f @ f.T, expected, rtol=1e-8, atol=1e-10)


def _track(warm: bool, lr_cov: float, steps: int = 100, damping: float = 0.1):
    """IKFAC (dense) on a small MLP; alongside, K-FAC's moving average of the first layer's
    input statistic, started (as K-FAC starts) at the first batch's ``U``. Returns the relative
    error of ``K K^T`` against ``(S + damping I)^{-1}`` after every step."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3)).to(DT)
    opt = SINGD(model, lr=0.01, lr_cov=lr_cov, T=1, damping=damping, structures="dense",
                kfac_like=True, alpha1=0.0, warm_start=warm)
    gen = torch.Generator().manual_seed(0)
    mix = torch.randn(6, 6, generator=gen, dtype=DT)   # correlated, unequal-scale inputs
    s, errors = None, []
    for _ in range(steps):
        x = torch.randn(32, 6, generator=gen, dtype=DT) @ mix
        y = torch.randint(0, 3, (32,), generator=gen)
        rows = torch.cat([x, torch.ones(32, 1, dtype=DT)], 1)
        u = rows.T @ rows / 32
        s = u if s is None else (1 - lr_cov) * s + lr_cov * u
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        k = opt.factors["0"]["K"][0].to_dense()
        target = torch.linalg.inv(s + damping * torch.eye(7, dtype=DT))
        errors.append(float((k @ k.T - target).norm() / target.norm()))
    return errors


def test_warm_started_factors_track_the_kfac_inverse():
    """After 10% of the run the warm-started K K^T is within a few percent of K-FAC's damped
    inverse of the moving average; the identity start with the settings that keep it stable
    (lr_cov 3e-4) is still far from it, its factors near the identity."""
    warm = _track(True, lr_cov=0.05)
    cold = _track(False, lr_cov=3e-4)
    assert max(warm[9:]) < 0.1
    assert min(cold[9:]) > 0.5
    # the identity start with the warm run's lr_cov is no better at 10% of the run
    assert _track(False, lr_cov=0.05, steps=10)[-1] > 3 * warm[9]
