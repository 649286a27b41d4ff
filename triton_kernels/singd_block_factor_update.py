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

from ._tiles import load_slot, slot_tile

__all__ = ["singd_block_factor_update_triton", "launch_configs", "MAX_BLOCK"]

MAX_BLOCK = 32


@triton.jit
def _traces(x_ptr, s_ptr, j, n, B, BLOCK: tl.constexpr):
    x, _ = load_slot(x_ptr, j, n, B, BLOCK)
    s, _ = load_slot(s_ptr, j, n, B, BLOCK)
    sx = tl.dot(s, x, input_precision="ieee")
    # Tr(X^T S X) = sum(X * (S X)), Tr(X^T X) = sum(X * X)
    return tl.sum(tl.sum(x * sx, axis=1), axis=0), tl.sum(tl.sum(x * x, axis=1), axis=0)


@triton.jit
def _coefficients(k_ptr, u_ptr, c_ptr, g_ptr, kd_ptr, cd_ptr, kl_ptr, cl_ptr, s_ptr, coef_ptr,
                  BK, BC, BLOCK_K: tl.constexpr,
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
def _update(x_ptr, m_ptr, s_ptr, dims_ptr, layer_ptr, coef_ptr, scal_ptr, side, B,
            BLOCK: tl.constexpr, HAS_M: tl.constexpr):
    j = tl.program_id(0)
    n = tl.load(dims_ptr + j)
    l = tl.load(layer_ptr + j)
    a = tl.load(coef_ptr + 4 * l + 2 * side)
    b = tl.load(coef_ptr + 4 * l + 2 * side + 1)
    alpha1 = tl.load(scal_ptr + 1)
    lr_cov = tl.load(scal_ptr + 2)
    x, mask = load_slot(x_ptr, j, n, B, BLOCK)
    s, _ = load_slot(s_ptr, j, n, B, BLOCK)
    xt = tl.trans(x)
    h = tl.dot(xt, tl.dot(s, x, input_precision="ieee"), input_precision="ieee")
    q = tl.dot(xt, x, input_precision="ieee")
    r = tl.arange(0, BLOCK)[:, None]
    c = tl.arange(0, BLOCK)[None, :]
    eye = tl.where((r == c) & (r < n), 1.0, 0.0).to(x.dtype)
    st = 0.5 * (a * h + b * q - eye)
    offs = tl.cast(j, tl.int64) * B * B + r * B + c
    if HAS_M:
        st = alpha1 * tl.load(m_ptr + offs, mask=mask, other=0.0) + st
        tl.store(m_ptr + offs, st, mask=mask)
    new = x - lr_cov * tl.dot(x, st, input_precision="ieee")
    tl.store(x_ptr + offs, new, mask=mask)


def launch_configs():
    """Every configuration the launcher picks: per dtype, the tiles of slots of every size up
    to ``MAX_BLOCK``, IKFAC or not, with momenta or not."""
    from ._aot import KernelConfig

    tiles = sorted({slot_tile(b) for b in range(1, MAX_BLOCK + 1)})
    out = []
    for t in ("fp32", "fp64"):
        ints = {"kd_ptr": "i64", "cd_ptr": "i64", "kl_ptr": "i64", "cl_ptr": "i64"}
        for bk in tiles:
            for bc in tiles:
                for kfac_like in (False, True):
                    out.append(KernelConfig(_coefficients, dict(
                        BLOCK_K=bk, BLOCK_C=bc, KFAC_LIKE=kfac_like), pointers={
                            **{n: t for n in ("k_ptr", "u_ptr", "c_ptr", "g_ptr", "s_ptr",
                                              "coef_ptr")}, **ints}))
        for block in tiles:
            for has_m in (False, True):
                out.append(KernelConfig(_update, dict(BLOCK=block, HAS_M=has_m), pointers={
                    **{n: t for n in ("x_ptr", "m_ptr", "s_ptr", "coef_ptr", "scal_ptr")},
                    "dims_ptr": "i64", "layer_ptr": "i64"}))
    return out


def singd_block_factor_update_triton(k, c, m_k, m_c, u, g, k_dims, c_dims, k_layer_offsets,
                                     c_layer_offsets, damping, alpha1, lr_cov, kfac_like):
    """In place on ``k``, ``c`` (``m_k``, ``m_c``); arguments checked by the op (slots of at
    most ``MAX_BLOCK``)."""
    if max(k.shape[1], c.shape[1]) > MAX_BLOCK:
        raise ValueError(f"singd_block_factor_update_triton: blocks of at most {MAX_BLOCK}, got "
                         f"{k.shape[1]} and {c.shape[1]}")
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
    _coefficients[(layers,)](k, u, c, g, kd, cd, kl, cl, scalars, coef, bk, bc,
                             BLOCK_K=slot_tile(bk), BLOCK_C=slot_tile(bc),
                             KFAC_LIKE=bool(kfac_like))
    has_m = m_k is not None
    _update[(k.shape[0],)](k, m_k if has_m else k, u, kd, layer_of(k_layer_offsets), coef,
                           scalars, 0, bk, BLOCK=slot_tile(bk), HAS_M=has_m)
    _update[(c.shape[0],)](c, m_c if has_m else c, g, cd, layer_of(c_layer_offsets), coef,
                           scalars, 1, bc, BLOCK=slot_tile(bc), HAS_M=has_m)
