r"""SINGD / IKFAC factor update of diagonal ``K`` and ``C`` for many layers in one call (Lin et al.
(2024), Fig. 4, step 1, with Table 1's diagonal projection).

All layers' diagonals are packed into flat vectors: layer ``l`` owns ``k[k_offsets[l]:
k_offsets[l+1]]`` (``d_i`` entries) and ``c[c_offsets[l]:c_offsets[l+1]]`` (``d_o``), with the
diagonals ``u`` of its ``U`` and ``g`` of its ``G``::

    h_k = k^2 u,  h_c = c^2 g
    a_k = sum(h_c)/d_o, b_k = lam sum(c^2)/d_o, a_c = sum(h_k)/d_i, b_c = lam sum(k^2)/d_i
          (kfac_like / IKFAC: a = 1, b = lam)
    s_k = (a_k h_k + b_k k^2 - 1) / 2        s_c = (a_c h_c + b_c c^2 - 1) / 2
    m_k <- alpha1 m_k + s_k, s_k = m_k       (when m_k, m_c are given; same for C)
    k <- k (1 - lr_cov s_k)                  c <- c (1 - lr_cov s_c)

in place on ``k``, ``c`` (and ``m_k``, ``m_c``): one launch for every layer of the structure
instead of about ten small ops per factor per layer.
"""
from __future__ import annotations

import torch

from .._backend import native_has_op, resolve_backend
from ._cuda_auto import cuda_order
from ._library import check_same
from ._checks import check_bool, check_finite_floats, check_like

_OP = "singd_diagonal_factor_update"


def singd_diagonal_factor_update_eager(k, c, m_k, m_c, u, g, k_offsets, c_offsets, damping,
                                       alpha1, lr_cov, kfac_like):
    """The definition, layer by layer with torch ops (in place)."""
    for l in range(len(k_offsets) - 1):
        ks = slice(k_offsets[l], k_offsets[l + 1])
        cs = slice(c_offsets[l], c_offsets[l + 1])
        kk, cc = k[ks] * k[ks], c[cs] * c[cs]
        hk, hc = kk * u[ks], cc * g[cs]
        d_i, d_o = kk.numel(), cc.numel()
        if kfac_like:
            a_k, b_k, a_c, b_c = 1.0, damping, 1.0, damping
        else:
            a_k, b_k = hc.sum() / d_o, damping * cc.sum() / d_o
            a_c, b_c = hk.sum() / d_i, damping * kk.sum() / d_i
        s_k = 0.5 * (a_k * hk + b_k * kk - 1.0)
        s_c = 0.5 * (a_c * hc + b_c * cc - 1.0)
        if m_k is not None:
            s_k = alpha1 * m_k[ks] + s_k
            s_c = alpha1 * m_c[cs] + s_c
            m_k[ks] = s_k
            m_c[cs] = s_c
        k[ks] = k[ks] * (1.0 - lr_cov * s_k)
        c[cs] = c[cs] * (1.0 - lr_cov * s_c)


def _offsets(name, off, n):
    if (not isinstance(off, (list, tuple)) or not off or off[0] != 0 or off[-1] != n
            or any(not isinstance(o, int) or isinstance(o, bool) for o in off)
            or any(b <= a for a, b in zip(off, off[1:]))):
        raise ValueError(f"{_OP}: {name} must be a list of increasing ints from 0 to {n}, got "
                         f"{off!r}")


def _check(k, c, m_k, m_c, u, g, k_offsets, c_offsets, damping, alpha1, lr_cov, kfac_like):
    for name, t in (("k", k), ("c", c), ("u", u), ("g", g)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{_OP}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if k.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"{_OP}: k must be float32 or float64, got {k.dtype}")
    if (m_k is None) != (m_c is None):
        raise ValueError(f"{_OP}: m_k and m_c must both be given or both be None")
    vectors = [("k", k, k), ("u", u, k), ("c", c, c), ("g", g, c)]
    if m_k is not None:
        vectors += [("m_k", m_k, k), ("m_c", m_c, c)]
    for name, t, ref in vectors:
        check_like(_OP, name, t, (ref.numel(),), k.dtype, k.device, "vector")
    _offsets("k_offsets", k_offsets, k.numel())
    _offsets("c_offsets", c_offsets, c.numel())
    if len(k_offsets) != len(c_offsets):
        raise ValueError(f"{_OP}: k_offsets and c_offsets must have the same length (layers + 1)")
    check_finite_floats(_OP, damping=damping, alpha1=alpha1, lr_cov=lr_cov)
    check_bool(_OP, "kfac_like", kfac_like)


def singd_diagonal_factor_update(k: torch.Tensor, c: torch.Tensor, m_k: torch.Tensor | None,
                                 m_c: torch.Tensor | None, u: torch.Tensor, g: torch.Tensor,
                                 k_offsets: list[int], c_offsets: list[int], damping: float,
                                 alpha1: float, lr_cov: float, kfac_like: bool, *,
                                 backend: str = "auto") -> None:
    """Update ``k``, ``c`` (and ``m_k``, ``m_c``) in place; see the module docstring.

    Args:
        k, c: packed diagonals of every layer's ``K`` and ``C`` (fp32 or fp64, contiguous).
        m_k, m_c: packed Riemannian momenta, or both ``None`` (IKFAC, or ``alpha1 = 0``).
        u, g: packed diagonals of the layers' ``U`` and ``G``.
        k_offsets, c_offsets: ``layers + 1`` increasing offsets from 0 to ``k.numel()`` /
            ``c.numel()``.
        damping, alpha1, lr_cov, kfac_like: ``lambda``, ``alpha1``, ``beta1``, IKFAC.
        backend: ``"auto"``, ``"eager"``, ``"cpu"``, ``"cuda"`` or ``"triton"``.
    """
    _check(k, c, m_k, m_c, u, g, k_offsets, c_offsets, damping, alpha1, lr_cov, kfac_like)
    chosen = resolve_backend(backend, k.device, _OP, cuda_order(_OP))
    damping, alpha1, lr_cov = float(damping), float(alpha1), float(lr_cov)
    if chosen == "eager":
        singd_diagonal_factor_update_eager(k, c, m_k, m_c, u, g, k_offsets, c_offsets, damping,
                                           alpha1, lr_cov, kfac_like)
        return
    if chosen == "triton":
        from kfac_kernels._triton.singd_diagonal_factor_update import (
            singd_diagonal_factor_update_triton)
        singd_diagonal_factor_update_triton(k, c, m_k, m_c, u, g, k_offsets, c_offsets, damping,
                                            alpha1, lr_cov, kfac_like)
        return
    torch.ops.kfac_kernels.singd_diagonal_factor_update(k, c, m_k, m_c, u, g, list(k_offsets),
                                                        list(c_offsets), damping, alpha1, lr_cov,
                                                        kfac_like)


def _register_fake() -> None:
    """Shape/dtype propagation and validation for torch.compile and FakeTensor, registered
    whether or not the native extension is built (the schema lives in ops/_library.py)."""

    @torch.library.register_fake("kfac_kernels::singd_diagonal_factor_update")
    def _(k, c, m_k, m_c, u, g, k_offsets, c_offsets, damping, alpha1, lr_cov, kfac_like):
        for name, t, ref in (("u", u, k), ("g", g, c), ("m_k", m_k, k), ("m_c", m_c, c)):
            if t is not None:
                check_same(_OP, name, t, ref.shape, ref.dtype)
        torch._check(len(k_offsets) == len(c_offsets),
                     lambda: f"{_OP}: k_offsets and c_offsets must have one entry per layer")
        torch._check(k_offsets[-1] == k.numel() and c_offsets[-1] == c.numel(),
                     lambda: f"{_OP}: the offsets must end at the sizes of k and c")


_register_fake()
