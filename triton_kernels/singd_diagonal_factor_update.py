r"""Triton kernel of the many-layer diagonal SINGD factor update (see
``kfac_kernels.ops.singd_diagonal_factor_update`` for the definition).

One program per layer: a first sweep over the layer's ``k`` and ``c`` in ``BLOCK`` chunks sums
``k^2 u``, ``k^2``, ``c^2 g``, ``c^2`` (fixed order, so the result is deterministic); a second sweep
applies the update. Offsets and the scalars (``damping``, ``alpha1``, ``lr_cov`` in the vectors'
dtype, so fp64 keeps its accuracy) are read from small device tensors.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["singd_diagonal_factor_update_triton", "launch_configs"]

BLOCK = 128


@triton.jit
def _update_side(x_ptr, m_ptr, h_ptr, start, end, a, b, alpha1, lr_cov,
                 HAS_M: tl.constexpr, BLOCK: tl.constexpr):
    for s in range(start, end, BLOCK):
        idx = s + tl.arange(0, BLOCK)
        mask = idx < end
        x = tl.load(x_ptr + idx, mask=mask, other=0.0)
        h = tl.load(h_ptr + idx, mask=mask, other=0.0)
        xx = x * x
        st = 0.5 * (a * (xx * h) + b * xx - 1.0)
        if HAS_M:
            st = alpha1 * tl.load(m_ptr + idx, mask=mask, other=0.0) + st
            tl.store(m_ptr + idx, st, mask=mask)
        tl.store(x_ptr + idx, x * (1.0 - lr_cov * st), mask=mask)


@triton.jit
def _factor_kernel(k_ptr, c_ptr, mk_ptr, mc_ptr, u_ptr, g_ptr, off_ptr, s_ptr, layers,
                   HAS_M: tl.constexpr, KFAC_LIKE: tl.constexpr, BLOCK: tl.constexpr):
    l = tl.program_id(0)
    k0 = tl.load(off_ptr + l)
    k1 = tl.load(off_ptr + l + 1)
    c0 = tl.load(off_ptr + layers + 1 + l)
    c1 = tl.load(off_ptr + layers + 2 + l)
    damping = tl.load(s_ptr)
    alpha1 = tl.load(s_ptr + 1)
    lr_cov = tl.load(s_ptr + 2)
    hk = tl.zeros([BLOCK], dtype=damping.dtype)
    kk = tl.zeros([BLOCK], dtype=damping.dtype)
    for s in range(k0, k1, BLOCK):
        idx = s + tl.arange(0, BLOCK)
        mask = idx < k1
        x = tl.load(k_ptr + idx, mask=mask, other=0.0)
        kk += x * x
        hk += x * x * tl.load(u_ptr + idx, mask=mask, other=0.0)
    hc = tl.zeros([BLOCK], dtype=damping.dtype)
    cc = tl.zeros([BLOCK], dtype=damping.dtype)
    for s in range(c0, c1, BLOCK):
        idx = s + tl.arange(0, BLOCK)
        mask = idx < c1
        x = tl.load(c_ptr + idx, mask=mask, other=0.0)
        cc += x * x
        hc += x * x * tl.load(g_ptr + idx, mask=mask, other=0.0)
    d_i = (k1 - k0).to(damping.dtype)
    d_o = (c1 - c0).to(damping.dtype)
    if KFAC_LIKE:
        a_k = damping * 0.0 + 1.0
        b_k = damping
        a_c = a_k
        b_c = damping
    else:
        a_k = tl.sum(hc, axis=0) / d_o
        b_k = damping * tl.sum(cc, axis=0) / d_o
        a_c = tl.sum(hk, axis=0) / d_i
        b_c = damping * tl.sum(kk, axis=0) / d_i
    _update_side(k_ptr, mk_ptr, u_ptr, k0, k1, a_k, b_k, alpha1, lr_cov, HAS_M, BLOCK)
    _update_side(c_ptr, mc_ptr, g_ptr, c0, c1, a_c, b_c, alpha1, lr_cov, HAS_M, BLOCK)


def launch_configs():
    """Every configuration the launcher picks: per dtype, with momenta or not, IKFAC or not."""
    from ._aot import KernelConfig

    return [KernelConfig(_factor_kernel, dict(HAS_M=has_m, KFAC_LIKE=kfac_like, BLOCK=BLOCK),
                         pointers={**{n: t for n in ("k_ptr", "c_ptr", "mk_ptr", "mc_ptr",
                                                     "u_ptr", "g_ptr", "s_ptr")},
                                   "off_ptr": "i64"})
            for t in ("fp32", "fp64") for has_m in (False, True) for kfac_like in (False, True)]


def singd_diagonal_factor_update_triton(k, c, m_k, m_c, u, g, k_offsets, c_offsets, damping,
                                        alpha1, lr_cov, kfac_like):
    """In place on ``k``, ``c`` (``m_k``, ``m_c``); arguments checked by the op."""
    layers = len(k_offsets) - 1
    if layers == 0:
        return
    off = torch.tensor(list(k_offsets) + list(c_offsets), dtype=torch.int64, device=k.device)
    scalars = torch.tensor([damping, alpha1, lr_cov], dtype=k.dtype, device=k.device)
    has_m = m_k is not None
    _factor_kernel[(layers,)](k, c, m_k if has_m else k, m_c if has_m else c, u, g, off, scalars,
                              layers, HAS_M=has_m, KFAC_LIKE=bool(kfac_like), BLOCK=BLOCK)
