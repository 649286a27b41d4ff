r"""Triton kernels of the many-layer block-diagonal SINGD factor update (see
``kfac_kernels.ops.singd_block_factor_update`` for the definition).

Two kernels: ``_coefficients`` runs one program per layer and walks its blocks in order, summing
``Tr(B^T U B)`` and ``Tr(B^T B)`` (fixed order, so the result is deterministic) into the layer's
``a_k, b_k, a_c, b_c``; ``_update`` runs one program per block (launched once for the ``K`` and
once for the ``C`` blocks) and applies ``S = (a H + b B^T B - I)/2``, the momentum and
``B (I - lr_cov S)``. Every block is a ``BLOCK x BLOCK`` tile (``BLOCK`` a power of two >= 16,
the smallest ``tl.dot`` tile) masked to its used size; products use ``tl.dot`` in full fp32
("ieee", no TF32) or fp64.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["singd_block_factor_update_triton"]


@triton.jit
def _load_block(ptr, j, n, B: tl.constexpr, BLOCK: tl.constexpr):
    r = tl.arange(0, BLOCK)[:, None]
    c = tl.arange(0, BLOCK)[None, :]
    mask = (r < n) & (c < n)
    return tl.load(ptr + j * B * B + r * B + c, mask=mask, other=0.0), mask


@triton.jit
def _traces(x_ptr, s_ptr, j, n, B: tl.constexpr, BLOCK: tl.constexpr):
    x, _ = _load_block(x_ptr, j, n, B, BLOCK)
    s, _ = _load_block(s_ptr, j, n, B, BLOCK)
    sx = tl.dot(s, x, input_precision="ieee")
    # Tr(X^T S X) = sum(X * (S X)), Tr(X^T X) = sum(X * X)
    return tl.sum(tl.sum(x * sx, axis=1), axis=0), tl.sum(tl.sum(x * x, axis=1), axis=0)


@triton.jit
def _coefficients(k_ptr, u_ptr, c_ptr, g_ptr, kd_ptr, cd_ptr, kl_ptr, cl_ptr, s_ptr, coef_ptr,
                  BK: tl.constexpr, BC: tl.constexpr, BLOCK_K: tl.constexpr,
                  BLOCK_C: tl.constexpr, KFAC_LIKE: tl.constexpr):
    l = tl.program_id(0)
    damping = tl.load(s_ptr)
    zero = damping * 0.0
    thk, tqk, d_i = zero, zero, zero
    for j in range(tl.load(kl_ptr + l), tl.load(kl_ptr + l + 1)):
        n = tl.load(kd_ptr + j)
        th, tq = _traces(k_ptr, u_ptr, j, n, BK, BLOCK_K)
        thk += th
        tqk += tq
        d_i += n.to(damping.dtype)
    thc, tqc, d_o = zero, zero, zero
    for j in range(tl.load(cl_ptr + l), tl.load(cl_ptr + l + 1)):
        n = tl.load(cd_ptr + j)
        th, tq = _traces(c_ptr, g_ptr, j, n, BC, BLOCK_C)
        thc += th
        tqc += tq
        d_o += n.to(damping.dtype)
    if KFAC_LIKE:
        tl.store(coef_ptr + 4 * l, zero + 1.0)
        tl.store(coef_ptr + 4 * l + 1, damping)
        tl.store(coef_ptr + 4 * l + 2, zero + 1.0)
        tl.store(coef_ptr + 4 * l + 3, damping)
    else:
        tl.store(coef_ptr + 4 * l, thc / d_o)
        tl.store(coef_ptr + 4 * l + 1, damping * tqc / d_o)
        tl.store(coef_ptr + 4 * l + 2, thk / d_i)
        tl.store(coef_ptr + 4 * l + 3, damping * tqk / d_i)


@triton.jit
def _update(x_ptr, m_ptr, s_ptr, dims_ptr, layer_ptr, coef_ptr, scal_ptr, SIDE: tl.constexpr,
            B: tl.constexpr, BLOCK: tl.constexpr, HAS_M: tl.constexpr):
    j = tl.program_id(0)
    n = tl.load(dims_ptr + j)
    l = tl.load(layer_ptr + j)
    a = tl.load(coef_ptr + 4 * l + 2 * SIDE)
    b = tl.load(coef_ptr + 4 * l + 2 * SIDE + 1)
    alpha1 = tl.load(scal_ptr + 1)
    lr_cov = tl.load(scal_ptr + 2)
    x, mask = _load_block(x_ptr, j, n, B, BLOCK)
    s, _ = _load_block(s_ptr, j, n, B, BLOCK)
    xt = tl.trans(x)
    h = tl.dot(xt, tl.dot(s, x, input_precision="ieee"), input_precision="ieee")
    q = tl.dot(xt, x, input_precision="ieee")
    r = tl.arange(0, BLOCK)[:, None]
    c = tl.arange(0, BLOCK)[None, :]
    eye = tl.where((r == c) & (r < n), 1.0, 0.0).to(x.dtype)
    st = 0.5 * (a * h + b * q - eye)
    offs = j * B * B + r * B + c
    if HAS_M:
        st = alpha1 * tl.load(m_ptr + offs, mask=mask, other=0.0) + st
        tl.store(m_ptr + offs, st, mask=mask)
    new = x - lr_cov * tl.dot(x, st, input_precision="ieee")
    tl.store(x_ptr + offs, new, mask=mask)


def _tile(b: int) -> int:
    return max(16, triton.next_power_of_2(b))


def singd_block_factor_update_triton(k, c, m_k, m_c, u, g, k_dims, c_dims, k_layer_offsets,
                                     c_layer_offsets, damping, alpha1, lr_cov, kfac_like):
    """In place on ``k``, ``c`` (``m_k``, ``m_c``); arguments checked by the op."""
    layers = len(k_layer_offsets) - 1
    if layers == 0:
        return
    dev = k.device

    def ints(values):
        return torch.tensor(list(values), dtype=torch.int64, device=dev)

    def layer_of(offsets):
        return ints(l for l in range(layers) for _ in range(offsets[l], offsets[l + 1]))

    kd, cd = ints(k_dims), ints(c_dims)
    kl, cl = ints(k_layer_offsets), ints(c_layer_offsets)
    scalars = torch.tensor([damping, alpha1, lr_cov], dtype=k.dtype, device=dev)
    coef = torch.empty(4 * layers, dtype=k.dtype, device=dev)
    bk, bc = k.shape[1], c.shape[1]
    _coefficients[(layers,)](k, u, c, g, kd, cd, kl, cl, scalars, coef, BK=bk, BC=bc,
                             BLOCK_K=_tile(bk), BLOCK_C=_tile(bc), KFAC_LIKE=bool(kfac_like))
    has_m = m_k is not None
    _update[(k.shape[0],)](k, m_k if has_m else k, u, kd, layer_of(k_layer_offsets), coef,
                           scalars, SIDE=0, B=bk, BLOCK=_tile(bk), HAS_M=has_m)
    _update[(c.shape[0],)](c, m_c if has_m else c, g, cd, layer_of(c_layer_offsets), coef,
                           scalars, SIDE=1, B=bc, BLOCK=_tile(bc), HAS_M=has_m)
