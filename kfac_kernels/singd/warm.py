r"""The warm start of SINGD's factors: ``K K^T ~ (U + lambda I)^{-1}`` and ``C C^T ~ (G +
lambda I)^{-1}`` of the first captured statistics, with matrix products only.

Starting at ``K = C = I`` (the reference implementation) is starting K-FAC from ``S_K = S_C =
(1 - lambda) I``: with a small ``lr_cov`` the factors then need ``~1 / lr_cov`` factor updates
before they reflect the curvature at all, and a large ``lr_cov`` diverges because ``I -
lr_cov m_K`` is far from the identity while ``m_K = K^T U K + lambda K^T K - I`` is large. Starting
at the damped inverse roots of the first statistics is K-FAC's own start (its first moving
average is the first batch's factor), after which ``m_K`` stays small and the SINGD update
tracks the moving average from the first step on (Lin et al. (2024), SINGD, Theorem 1).

Per structure of ``K`` (and of ``C``):

* diagonal: ``K = diag(U_ii + lambda)^{-1/2}`` (exact);
* dense and block-diagonal: ``K = (U + lambda I)^{-1/2}`` of the matrix (of each diagonal
  block) by the coupled Newton-Schulz iteration (matrix products only, evaluated in fp32 or
  wider and stored in the factors' dtype: safe for bf16 storage);
* the other structures (triangular, hierarchical, Toeplitz, rank-k): the scalar start
  ``K = (tr U / d + lambda)^{-1/2} I`` (the right scale, no directions).
"""
from __future__ import annotations

import math

import torch

from .structures import BlockDiagonal, Dense, Diagonal, StructuredMatrix


def inverse_sqrt_newton_schulz(mat: torch.Tensor, floor: float) -> torch.Tensor:
    """``mat^{-1/2}`` of symmetric positive definite ``(..., n, n)`` matrices whose eigenvalues
    are at least ``floor > 0``, by the coupled Newton-Schulz iteration ``T = (3 I - Z Y) / 2,
    Y <- Y T, Z <- T Z`` from ``Y = mat / s``, ``Z = I`` (``s`` the Frobenius norm, so that the
    eigenvalues of ``Y`` lie in ``(0, 1]``). Small eigenvalues grow by ~1.5 per iteration, so
    ``log_1.5(s / floor)`` iterations bring them to 1 and a few more converge. Statistics so
    large that their norm overflows ``mat``'s dtype (finite entries above ~1e19 in fp32: a run
    that is diverging) are taken in float64, and the root is returned in ``mat``'s dtype."""
    dtype = mat.dtype
    s = torch.linalg.matrix_norm(mat).clamp_min(floor)[..., None, None]
    top = float(s.max())
    if not math.isfinite(top):
        mat = mat.double()
        s = torch.linalg.matrix_norm(mat).clamp_min(floor)[..., None, None]
        top = float(s.max())
    n = mat.shape[-1]
    eye = torch.eye(n, dtype=mat.dtype, device=mat.device).expand_as(mat)
    iters = int(math.ceil(math.log(max(top / floor, 1.0)) / math.log(1.5))) + 8
    y, z = mat / s, eye.clone()
    for _ in range(min(iters, 80)):
        t = 1.5 * eye - 0.5 * (z @ y)
        y, z = y @ t, t @ z
    return (z / s.sqrt()).to(dtype)


def _dense(stat) -> torch.Tensor:
    return stat if isinstance(stat, torch.Tensor) else stat.to_dense()


def warm_factor(cls: type[StructuredMatrix], k: int | None, stat, damping: float,
                dtype: torch.dtype) -> StructuredMatrix:
    """``K`` of structure ``cls`` (block size ``k``) with ``K K^T ~ (stat + damping I)^{-1}``,
    in ``dtype`` (the compute dtype); ``stat`` is a dense symmetric matrix or its projection."""
    floor = max(float(damping), torch.finfo(dtype).tiny)
    if cls is Diagonal:
        diag = (stat.data[0] if isinstance(stat, Diagonal)
                else torch.diagonal(_dense(stat))).to(dtype)
        return Diagonal(diag.shape[0], ((diag.clamp_min(0) + floor).rsqrt(),))
    if cls is BlockDiagonal:
        proj = stat if isinstance(stat, BlockDiagonal) else BlockDiagonal.project(
            _dense(stat), k)
        blocks, last = (t.to(dtype) for t in proj.data)
        eye_b = torch.eye(blocks.shape[-1], dtype=dtype, device=blocks.device)
        blocks = inverse_sqrt_newton_schulz(blocks + floor * eye_b, floor) if blocks.numel() \
            else blocks
        if last.numel():
            eye_l = torch.eye(last.shape[-1], dtype=dtype, device=last.device)
            last = inverse_sqrt_newton_schulz(last + floor * eye_l, floor)
        return BlockDiagonal(proj.dim, (blocks, last), k)
    dense = _dense(stat).to(dtype)
    n = dense.shape[-1]
    eye = torch.eye(n, dtype=dtype, device=dense.device)
    if cls is Dense:
        root = inverse_sqrt_newton_schulz(dense + floor * eye, floor)
        return Dense.from_dense(0.5 * (root + root.mT))
    scale = float(torch.diagonal(dense).clamp_min(0).sum()) / n + floor
    return cls.eye(n, k, dtype=dtype, device=dense.device).scale(scale ** -0.5)
