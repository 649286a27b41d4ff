r"""The reduce mode of the patch covariance: mean patches read from the input once.

Reduce (``csrc/include/patch_covariance.h``) needs, per example ``n`` and segment ``s``, the
mean patch ``abar[n, s, (c, i, j)] = (1 / R) sum_{oh, ow} x[n, c0(s) + c, oh sh + i dh - pt,
ow sw + j dw - pl]`` (0 in the padding; ``R = out_h out_w``), then ``decay F + alpha
sum_n abar_n abar_n^T``.

Window sums as a product
------------------------
Kernel offset ``(i, j)`` sees input pixel ``(y, x)`` at most once, and does so exactly when
``y = oh sh + i dh - pt`` for some ``0 <= oh < out_h`` and ``x = ow sw + j dw - pl`` for some
``0 <= ow < out_w``. With the 0/1 indicators ``row[y, i]`` and ``col[x, j]`` of those two
conditions, the window sum of one channel's plane ``X`` is

    sum_{oh, ow} X[oh sh + i dh - pt, ow sw + j dw - pl] = sum_{y, x} X[y, x] row[y, i] col[x, j]

(padding pixels are 0, so only pixels inside the plane count). For a block of channels and
one input row ``y``, the inner sum over ``x`` for every offset is one product: the
``[BLOCK_C, BLOCK_X]`` tile of the row times the ``[BLOCK_X, BLOCK_T]`` column indicator
(offsets ``t = i kw + j``: ``col[x, j(t)]``), then scaled per offset by ``row[y, i(t)]`` and
accumulated. A program owns ``(n, s, block of BLOCK_C channels, block of BLOCK_T offsets)``;
it builds a column chunk's indicator once, by integer arithmetic (nothing is read for it), then
walks the rows, loading each input element once per offset block (a 3x3 kernel has one; a
row chunk is contiguous in an NCHW input).
The products run in fp32 (``tl.dot`` with full-precision products: the indicators are 0 or 1,
so every product is exact) or fp64 (sums selected by the indicators). A product turns an inf or
NaN pixel into NaN for the offsets that do not see it (``0 * inf``), so a column chunk that
holds one is summed again by selection (after its product loop, which only flags it), leaving
those offsets' means finite as the definition has them. An earlier kernel summed every
patch column over the output grid, reading each input element ``k^2`` times through a masked,
per-element gather.

The sums divided by ``R`` are stored as ``abar`` (fp32, or fp64 for fp64 inputs), with the bias
coordinate set to 1; ``decay F + alpha X^T X`` is then the symmetric factor update kernel
(:mod:`.symmetric_factor_update`) on the ``(S, N, D)`` view of the buffer.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _tiles

__all__ = ["reduce_patch_covariance", "launch_configs"]

#: channels, row positions and kernel offsets per program and step, (BLOCK_C, BLOCK_X, BLOCK_T)
#: (fp32: 105 registers on sm_90, no spills; 64 channels spilled for 16-bit inputs; the sums by
#: selection hold a [BLOCK_C, BLOCK_X, BLOCK_T] slab, hence fp64's smaller tiles). The
#: offsets of a 3x3 kernel fit one block of 16; larger kernels take a grid axis of offset blocks
#: (each reading the input again), so one configuration per dtype serves every geometry.
MEAN_TILES = {torch.float32: (32, 16, 16), torch.float64: (16, 16, 16)}


@triton.jit
def _sees(v, a, PAD, DIL, STR, OUT):
    """Whether input coordinate ``v`` passes the test of kernel offset ``a`` along one axis:
    v + pad - a dil = o str with 0 <= o < OUT (rows: y and i; columns: x and j; broadcast)."""
    u = v + PAD - a * DIL
    q = tl.where(u >= 0, u, 0) // STR
    return (u >= 0) & (u == q * STR) & (q < OUT)


@triton.jit
def _selected_sums(ptrs, mask, col, ti, H, sxh, PAD_T, DIL_H, STR_H, OUT_H, like):
    """A column chunk's window sums, every row's pixels selected by the indicators (no
    products): ``[BLOCK_C, BLOCK_T]`` in ``like``'s dtype."""
    out = tl.zeros_like(like)
    for y in range(0, H):
        v = tl.load(ptrs, mask=mask, other=0.0).to(like.dtype)
        ptrs += sxh
        part = tl.sum(tl.where(col[None, :, :] != 0, v[:, :, None], 0.0), axis=1)
        out += tl.where(_sees(y, ti, PAD_T, DIL_H, STR_H, OUT_H)[None, :], part, 0.0)
    return out


@triton.jit
def _pc_mean_kernel(x_ptr, abar_ptr, S, C_BLOCKS, T_BLOCKS, SEG_C, H, W, D, DN, C_START, C_STEP,
                    sxn, sxc, sxh, sxw, KH, KW, OUT_H, OUT_W, STR_H, STR_W, DIL_H, DIL_W,
                    PAD_T, PAD_L, ACC_FP64: tl.constexpr, BLOCK_C: tl.constexpr,
                    BLOCK_X: tl.constexpr, BLOCK_T: tl.constexpr):
    """abar[(n * S + s) * D + c * KH * KW + t] = window sum of offset t over channel c of
    segment s, divided by OUT_H * OUT_W (1 at d = DN when D = DN + 1); one program per
    (((n * S + s) * C_BLOCKS + channel block) * T_BLOCKS + offset block), one grid axis."""
    pid = tl.program_id(0)
    tb = pid % T_BLOCKS
    rest = pid // T_BLOCKS
    cb = rest % C_BLOCKS
    row = rest // C_BLOCKS  # n * S + s
    n = row // S
    s = row - n * S
    kk = KH * KW
    offs_c = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    offs_t = tb * BLOCK_T + tl.arange(0, BLOCK_T)
    c_ok = offs_c < SEG_C
    t_ok = offs_t < kk
    ti = offs_t // KW
    tj = offs_t - ti * KW
    base = (x_ptr + n.to(tl.int64) * sxn + (C_START + s.to(tl.int64) * C_STEP) * sxc
            + offs_c.to(tl.int64)[:, None] * sxc)
    if ACC_FP64:
        acc = tl.zeros((BLOCK_C, BLOCK_T), dtype=tl.float64)
    else:
        acc = tl.zeros((BLOCK_C, BLOCK_T), dtype=tl.float32)
    for x0 in range(0, W, BLOCK_X):
        xs = x0 + tl.arange(0, BLOCK_X)
        x_ok = xs < W
        # offset (i, j) sees column x iff x + pl - j dw = ow sw with 0 <= ow < OUT_W: the
        # [BLOCK_X, BLOCK_T] column indicator, built once per column chunk
        col = tl.where(_sees(xs[:, None], tj[None, :], PAD_L, DIL_W, STR_W, OUT_W)
                       & x_ok[:, None] & t_ok[None, :], 1.0, 0.0).to(acc.dtype)
        ptrs = base + xs.to(tl.int64)[None, :] * sxw  # row 0's chunk
        mask = c_ok[:, None] & x_ok[None, :]
        if ACC_FP64:
            acc += _selected_sums(ptrs, mask, col, ti, H, sxh, PAD_T, DIL_H, STR_H, OUT_H, acc)
        else:
            part = tl.zeros((BLOCK_C, BLOCK_T), dtype=tl.float32)
            bad = tl.zeros((BLOCK_C, BLOCK_X), dtype=tl.int32)
            row_ptrs = ptrs
            for y in range(0, H):
                v = tl.load(row_ptrs, mask=mask, other=0.0).to(tl.float32)
                row_ptrs += sxh
                bad = bad | ((v != v) | (tl.abs(v) == float("inf"))).to(tl.int32)
                sees = _sees(y, ti, PAD_T, DIL_H, STR_H, OUT_H)
                part += tl.where(sees[None, :], tl.dot(v, col, input_precision="ieee"), 0.0)
            if tl.max(bad) > 0:
                # the product made 0 * inf = NaN of the offsets that do not see a non-finite
                # pixel of the chunk: sum it again by selection (rare)
                part = _selected_sums(ptrs, mask, col, ti, H, sxh, PAD_T, DIL_H, STR_H, OUT_H,
                                      part)
            acc += part
    mean = acc / (OUT_H * OUT_W)
    out_row = abar_ptr + row.to(tl.int64) * D
    tl.store(out_row + offs_c[:, None] * kk + offs_t[None, :],
             mean.to(abar_ptr.dtype.element_ty), mask=c_ok[:, None] & t_ok[None, :])
    if D > DN:
        if (cb == 0) & (tb == 0):  # the bias coordinate
            tl.store(out_row + DN, tl.full((), 1.0, abar_ptr.dtype.element_ty))


def launch_configs(types: dict) -> list:
    """The mean kernel's configuration per input dtype (``types``: dtype -> its short name)."""
    from ._aot import KernelConfig

    out = []
    for dtype, t in types.items():
        acc = _tiles.accumulation(dtype)
        block_c, block_x, block_t = MEAN_TILES[acc]
        out.append(KernelConfig(_pc_mean_kernel, dict(
            ACC_FP64=acc == torch.float64, BLOCK_C=block_c, BLOCK_X=block_x, BLOCK_T=block_t),
            pointers={"x_ptr": t, "abar_ptr": types[acc]}))
    return out


def mean_patches(x: torch.Tensor, geometry, oh: int, ow: int, num_segments: int,
                 segment_start: int, segment_step: int, segment_channels: int, d: int,
                 acc_dtype: torch.dtype, name: str) -> torch.Tensor:
    """``abar``, ``(N, S, D)`` in ``acc_dtype``: the mean patches (module docstring)."""
    kh, kw, sh, sw, dh, dw, pt, pl = geometry
    n, _, h, w = x.shape
    dn = segment_channels * kh * kw
    abar = torch.empty((n, num_segments, d), dtype=acc_dtype, device=x.device)
    if n == 0:
        return abar
    block_c, block_x, block_t = MEAN_TILES[acc_dtype]
    c_blocks = triton.cdiv(segment_channels, block_c)
    t_blocks = triton.cdiv(kh * kw, block_t)
    programs = n * num_segments * c_blocks * t_blocks
    if programs > _tiles.MAX_GRID_X:
        raise ValueError(f"{name}: too many (example, segment, channel block, offset block) "
                         f"programs for one launch ({programs} > {_tiles.MAX_GRID_X})")
    _pc_mean_kernel[(programs,)](
        x, abar, num_segments, c_blocks, t_blocks, segment_channels, h, w, d, dn, segment_start,
        segment_step, *x.stride(), kh, kw, oh, ow, sh, sw, dh, dw, pt, pl,
        ACC_FP64=acc_dtype == torch.float64, BLOCK_C=block_c, BLOCK_X=block_x, BLOCK_T=block_t,
    )
    return abar


def reduce_patch_covariance(x, geometry, oh, ow, num_segments, segment_start, segment_step,
                            segment_channels, d, factor, decay, alpha, acc_dtype, name):
    """``decay * factor + alpha * sum_n abar_n abar_n^T`` per segment, ``(S, D, D)``."""
    from .symmetric_factor_update import symmetric_factor_update_triton

    abar = mean_patches(x, geometry, oh, ow, num_segments, segment_start, segment_step,
                        segment_channels, d, acc_dtype, name)
    # X[s] = abar[:, s, :], (N, D): the Gram kernel reads the strided view in place
    return symmetric_factor_update_triton(factor, abar.transpose(0, 1), decay, alpha)
