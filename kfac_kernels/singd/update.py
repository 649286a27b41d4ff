"""The readable reference of SINGD's update (Lin et al. (2024), Fig. 4; IKFAC: Eq. 10) through
structured products: the factor update of one layer and the preconditioned gradient."""
from __future__ import annotations

import torch

from .structures import StructuredMatrix


def factor_update(K: StructuredMatrix, C: StructuredMatrix, U, G,
                  *, damping: float, alpha1: float, lr_cov: float, kfac_like: bool,
                  m_K: StructuredMatrix | None = None, m_C: StructuredMatrix | None = None,
                  normalize_lr_cov: bool = False) -> dict[str, StructuredMatrix]:
    """One update of Fig. 4 (``kfac_like``: Eq. 10) from the old ``K, C, m_K, m_C``; returns the
    new ``K``, ``C`` (and ``m_K``, ``m_C`` when given). ``U``, ``G``: dense symmetric matrices,
    or their projections ``Pi(U)``, ``Pi(G)`` in ``K``'s / ``C``'s structure where that
    suffices. ``normalize_lr_cov``: see :class:`SINGD`."""
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


def _congruence(S: StructuredMatrix, U) -> StructuredMatrix:
    """``Pi(S^T U S)`` from a dense ``U`` or from its projection ``Pi(U)``."""
    if isinstance(U, StructuredMatrix):
        return S.congruence_of_projection(U)
    return S.congruence(U)


def precondition(K: StructuredMatrix, C: StructuredMatrix, M: torch.Tensor) -> torch.Tensor:
    """``C C^T M K K^T`` through structured products only."""
    x = K.rmatmul_t(K.rmatmul(M))
    return C.matmul(C.t_matmul(x))
