r"""Triton kernels of the many-layer block-diagonal SINGD factor update (see
``kfac_kernels.ops.singd_block_factor_update`` for the definition).

Two kernels: ``_coefficients`` runs one program per layer and walks its blocks in order, summing
``Tr(B^T U B)`` and ``Tr(B^T B)`` (fixed order, so the result is deterministic) into the layer's
``a_k, b_k, a_c, b_c``; ``_update`` runs one program per block (launched once for the ``K`` and
once for the ``C`` blocks) and applies ``S = (a H + b B^T B - I)/2``, the momentum and
``B (I - lr_cov S)``. Every block is a ``BLOCK x BLOCK`` tile (``BLOCK`` a power of two >= 16,
the smallest ``tl.dot`` tile) masked to its used size; products use ``tl.dot`` in full fp32
("ieee", no TF32) or fp64. Sizes, layer offsets and the layer of every block are device tensors
made once per layout and the coefficients' scratch is kept per device, stream and size
(``_tiles.cached_int64``, ``_tiles.cached_workspace``); ``damping``, ``alpha1``, ``lr_cov`` are
fp64 kernel arguments rounded once to the factors' dtype in the kernel (a host fp64 tensor under
the interpreter: ``SCALARS_IN_MEMORY``).
"""
from __future__ import annotations

import triton
import triton.language as tl

from ._tiles import cached_int64, cached_workspace, load_slot, scalar_args, slot_tile

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
                  damping: tl.float64, BK, BC, BLOCK_K: tl.constexpr,
                  BLOCK_C: tl.constexpr, KFAC_LIKE: tl.constexpr,
                  SCALARS_IN_MEMORY: tl.constexpr):
    l = tl.program_id(0)
    if SCALARS_IN_MEMORY:
        damping = tl.load(s_ptr)
    damping = damping.to(k_ptr.dtype.element_ty)
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
def _update(x_ptr, m_ptr, s_ptr, dims_ptr, layer_ptr, coef_ptr, scal_ptr, alpha1: tl.float64,
            lr_cov: tl.float64, side, B, BLOCK: tl.constexpr, HAS_M: tl.constexpr,
            SCALARS_IN_MEMORY: tl.constexpr):
    j = tl.program_id(0)
    n = tl.load(dims_ptr + j)
    l = tl.load(layer_ptr + j)
    a = tl.load(coef_ptr + 4 * l + 2 * side)
    b = tl.load(coef_ptr + 4 * l + 2 * side + 1)
    if SCALARS_IN_MEMORY:
        alpha1 = tl.load(scal_ptr + 1)
        lr_cov = tl.load(scal_ptr + 2)
    alpha1 = alpha1.to(x_ptr.dtype.element_ty)
    lr_cov = lr_cov.to(x_ptr.dtype.element_ty)
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
                        BLOCK_K=bk, BLOCK_C=bc, KFAC_LIKE=kfac_like, SCALARS_IN_MEMORY=False),
                        pointers={**{n: t for n in ("k_ptr", "u_ptr", "c_ptr", "g_ptr",
                                                    "coef_ptr")}, "s_ptr": "fp64", **ints}))
        for block in tiles:
            for has_m in (False, True):
                out.append(KernelConfig(_update, dict(BLOCK=block, HAS_M=has_m,
                                                      SCALARS_IN_MEMORY=False), pointers={
                    **{n: t for n in ("x_ptr", "m_ptr", "s_ptr", "coef_ptr")},
                    "scal_ptr": "fp64", "dims_ptr": "i64", "layer_ptr": "i64"}))
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

    def layer_of(offsets):
        return [l for l in range(layers) for _ in range(offsets[l], offsets[l + 1])]

    kd, cd = cached_int64(k_dims, dev), cached_int64(c_dims, dev)
    kl, cl = cached_int64(k_layer_offsets, dev), cached_int64(c_layer_offsets, dev)
    scal, in_memory = scalar_args(damping, alpha1, lr_cov, device=dev, placeholder=k)
    coef = cached_workspace(4 * layers, k.dtype, dev)  # written before it is read
    bk, bc = k.shape[1], c.shape[1]
    _coefficients[(layers,)](k, u, c, g, kd, cd, kl, cl, scal, coef, float(damping), bk, bc,
                             BLOCK_K=slot_tile(bk), BLOCK_C=slot_tile(bc),
                             KFAC_LIKE=bool(kfac_like), SCALARS_IN_MEMORY=in_memory)
    has_m = m_k is not None
    for x, m, h, dims, offsets, side, b in ((k, m_k, u, kd, k_layer_offsets, 0, bk),
                                            (c, m_c, g, cd, c_layer_offsets, 1, bc)):
        _update[(x.shape[0],)](x, m if has_m else x, h, dims,
                               cached_int64(offsets, dev, "layer of slot", layer_of), coef, scal,
                               float(alpha1), float(lr_cov), side, b, BLOCK=slot_tile(b),
                               HAS_M=has_m, SCALARS_IN_MEMORY=in_memory)
