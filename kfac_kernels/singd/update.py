"""The readable reference of SINGD's update (Lin et al. (2024), Fig. 4; IKFAC: Eq. 10) through
structured products: the factor update of one layer and the preconditioned gradient."""
from __future__ import annotations

import torch

from ..ops._symmetric_matmul import symmetric_matmul
from .structures import Dense, StructuredMatrix


class GramOfRows:
    """A dense statistic ``weight * x^T x`` kept as its rows ``x`` ``(m, d)``, ``m <= d``
    (:data:`kfac_kernels.layers.ROWS`): ``S^T U S`` is then ``(x S)^T (x S)``, ``O(m d^2)``
    flops instead of ``O(d^3)``."""

    def __init__(self, x: torch.Tensor, weight: float = 1.0):
        self.x, self.weight = x, weight

    def scale(self, alpha: float) -> "GramOfRows":
        return GramOfRows(self.x, self.weight * alpha)

    def to(self, dtype: torch.dtype) -> "GramOfRows":
        return GramOfRows(self.x.to(dtype), self.weight)

    def trace(self) -> torch.Tensor:
        return (self.x * self.x).sum() * self.weight

    def to_dense(self) -> torch.Tensor:
        return symmetric_matmul(self.x.mT, self.x) * self.weight


def factor_update(K: StructuredMatrix, C: StructuredMatrix, U, G,
                  *, damping: float, alpha1: float, lr_cov: float, kfac_like: bool,
                  m_K: StructuredMatrix | None = None, m_C: StructuredMatrix | None = None,
                  normalize_lr_cov: bool = False) -> dict[str, StructuredMatrix]:
    """One update of Fig. 4 (``kfac_like``: Eq. 10) from the old ``K, C, m_K, m_C``; returns the
    new ``K``, ``C`` (and ``m_K``, ``m_C`` when given). ``U``, ``G``: dense symmetric matrices,
    or their projections ``Pi(U)``, ``Pi(G)`` in ``K``'s / ``C``'s structure where that
    suffices. ``normalize_lr_cov``: see :class:`SINGD`."""
    if type(K) is Dense and type(C) is Dense and not normalize_lr_cov:
        return _dense_factor_update(K, C, U, G, damping=damping, alpha1=alpha1, lr_cov=lr_cov,
                                    kfac_like=kfac_like, m_K=m_K, m_C=m_C)
    d_i, d_o = K.dim, C.dim
    h_k, h_c = _congruence(K, U), _congruence(C, G)
    ktk, ctc = K.gram(), C.gram()
    if kfac_like:   # Tr(H_C), Tr(C^T C) -> Tr(I_{d_o}) = d_o, and the same for K
        a_k, b_k, a_c, b_c = 1.0, damping, 1.0, damping
    else:           # the 1/(2 d_o) of Fig. 4 is taken into the trace terms and the 1/2
        a_k, b_k = h_c.trace() / d_o, damping * ctc.trace() / d_o
        a_c, b_c = h_k.trace() / d_i, damping * ktk.trace() / d_i
    half = 0.5 * (1.0 - alpha1) if normalize_lr_cov and not kfac_like else 0.5
    step_k = h_k.scale(a_k).add(ktk, b_k).add_identity(-1.0).scale(half)
    step_c = h_c.scale(a_c).add(ctc, b_c).add_identity(-1.0).scale(half)
    out = {}
    if m_K is not None and not kfac_like:
        step_k = m_K.scale(alpha1).add(step_k)
        step_c = m_C.scale(alpha1).add(step_c)
        out["m_K"], out["m_C"] = step_k, step_c
    beta_k = beta_c = lr_cov
    if normalize_lr_cov:
        beta_k = lr_cov / torch.clamp(step_k.max_abs(), min=1.0)
        beta_c = lr_cov / torch.clamp(step_c.max_abs(), min=1.0)
    out["K"] = K.compose(step_k.scale(-beta_k).add_identity(1.0))
    out["C"] = C.compose(step_c.scale(-beta_c).add_identity(1.0))
    return out


def _dense_factor_update(K: Dense, C: Dense, U, G, *, damping: float, alpha1: float,
                         lr_cov: float, kfac_like: bool, m_K: Dense | None,
                         m_C: Dense | None) -> dict[str, Dense]:
    """:func:`factor_update` of dense ``K``, ``C`` (INGD, IKFAC): the same formula, with each
    ``d x d`` step built in place on its fresh products (2 passes instead of 5; the 1/2 is
    exact, so the step is the readable one's to the bit) and ``K (I - beta m)`` as
    ``K - beta K m`` (one ``addmm``, no scaled copy of ``m`` plus identity)."""
    d_i, d_o = K.dim, C.dim
    h_k, h_c = _congruence(K, U).data[0], _congruence(C, G).data[0]
    ktk, ctc = K.gram().data[0], C.gram().data[0]
    if kfac_like:
        a_k, b_k, a_c, b_c = 1.0, damping, 1.0, damping
    else:  # every trace before the products are overwritten
        a_k, b_k = h_c.trace() / d_o, damping * ctc.trace() / d_o
        a_c, b_c = h_k.trace() / d_i, damping * ktk.trace() / d_i
    out = {}
    for key, S, h, a, gram, b, m in (("K", K, h_k, a_k, ktk, b_k, m_K),
                                     ("C", C, h_c, a_c, ctc, b_c, m_C)):
        step = h.mul_(0.5 * a)          # (a H + b S^T S - I) / 2
        if isinstance(b, torch.Tensor):
            step.addcmul_(gram, 0.5 * b)
        else:
            step.add_(gram, alpha=0.5 * b)
        step.diagonal().sub_(0.5)
        if m is not None and not kfac_like:
            step.add_(m.data[0], alpha=alpha1)
            out["m_" + key] = Dense(S.dim, (step,), None)
        factor = S.data[0]
        out[key] = Dense(S.dim, (torch.addmm(factor, factor, step, alpha=-lr_cov),), None)
    return out


def _congruence(S: StructuredMatrix, U) -> StructuredMatrix:
    """``Pi(S^T U S)`` from a dense ``U``, its rows, or its projection ``Pi(U)``."""
    if isinstance(U, GramOfRows):
        return S.gram_of_rows(U.x).scale(U.weight)
    if isinstance(U, StructuredMatrix):
        return S.congruence_of_projection(U)
    return S.congruence(U)


def precondition(K: StructuredMatrix, C: StructuredMatrix, M: torch.Tensor, *,
                 kkt: torch.Tensor | None = None,
                 cct: torch.Tensor | None = None) -> torch.Tensor:
    """``C C^T M K K^T`` through structured products only, or through the dense squares
    ``kkt = K K^T`` / ``cct = C C^T`` where given (one product instead of two)."""
    x = M @ kkt if kkt is not None else K.rmatmul_t(K.rmatmul(M))
    return cct @ x if cct is not None else C.matmul(C.t_matmul(x))
