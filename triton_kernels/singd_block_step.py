r"""Triton kernel of the fused SINGD parameter step for block-diagonal factors (see
``kfac_kernels.ops.singd_block_step`` for the definition).

One program per tile (``C`` row block ``i``, ``K`` column block ``j``): it forms ``C_i C_i^T`` and
``K_j K_j^T`` (``tl.dot`` tiles of at least 16, masked to the used sizes), loads the gradient
tile (the column past the weight's last one from the bias gradient), computes
``(C_i C_i^T) M_ij (K_j K_j^T)`` in the accumulation dtype ("ieee": no TF32), adds the weight
decay, updates the momentum buffer and writes the parameters, each rounded once (bfloat16 by
:mod:`._rounding`). The slot sizes, the bias and the first step are run-time arguments, so the
compiled variants are the parameter dtype and the two tile sizes (``bench/triton_static.py``);
blocks larger than ``MAX_BLOCK`` are refused: at 64 x 64 the tiles no longer fit in registers
(fp32 on sm_80 with four warps: an 8.7 KB stack frame, 23 KB of spill stores, 89 s of ptxas).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._rounding import round_to_bfloat16
from ._tiles import MAX_GRID_X, load_slot, slot_tile

__all__ = ["singd_block_step_triton", "launch_configs", "MAX_BLOCK"]

MAX_BLOCK = 32


@triton.jit
def _outer(ptr, j, n, B, BLOCK: tl.constexpr):
    x, _ = load_slot(ptr, j, n, B, BLOCK)
    return tl.dot(x, tl.trans(x), input_precision="ieee")


@triton.jit
def _step_kernel(w_ptr, wg_ptr, b_ptr, bg_ptr, c_ptr, cd_ptr, ro_ptr, k_ptr, kd_ptr, co_ptr,
                 wb_ptr, bb_ptr, s_ptr, cols, k_blocks, BC, BK, has_bias, first,
                 BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr, PARAM_BF16: tl.constexpr):
    pid = tl.program_id(0)
    i = pid // k_blocks
    j = pid % k_blocks
    ni = tl.load(cd_ptr + i)
    nj = tl.load(kd_ptr + j)
    r0 = tl.load(ro_ptr + i)
    c0 = tl.load(co_ptr + j)
    lr = tl.load(s_ptr)
    mom = tl.load(s_ptr + 1)
    wd = tl.load(s_ptr + 2)
    cc = _outer(c_ptr, i, ni, BC, BLOCK_C)
    kk = _outer(k_ptr, j, nj, BK, BLOCK_K)
    r = tl.arange(0, BLOCK_C)[:, None]
    c = tl.arange(0, BLOCK_K)[None, :]
    rows = r0 + r
    colsj = c0 + c
    inside = (r < ni) & (c < nj)
    in_w = inside & (colsj < cols)
    # the run-time flags as tiles: the interpreter refuses a scalar condition inside a mask
    zero = tl.zeros([BLOCK_C, BLOCK_K], dtype=tl.int32)
    in_b = inside & (colsj == cols) & (zero + has_bias != 0)
    has_history = zero + first == 0
    w_off = rows * cols + colsj
    b_off = rows + colsj * 0
    g = (tl.load(wg_ptr + w_off, mask=in_w, other=0.0).to(lr.dtype)
         + tl.load(bg_ptr + b_off, mask=in_b, other=0.0).to(lr.dtype))
    p = (tl.load(w_ptr + w_off, mask=in_w, other=0.0).to(lr.dtype)
         + tl.load(b_ptr + b_off, mask=in_b, other=0.0).to(lr.dtype))
    d = tl.dot(tl.dot(cc, g, input_precision="ieee"), kk, input_precision="ieee")
    d = d + wd * p
    buf = (tl.load(wb_ptr + w_off, mask=in_w & has_history, other=0.0)
           + tl.load(bb_ptr + b_off, mask=in_b & has_history, other=0.0))
    buf = tl.where(has_history, mom * buf + d, d)
    new = p - lr * buf
    if PARAM_BF16:
        new_p = round_to_bfloat16(new)
    else:
        new_p = new.to(w_ptr.dtype.element_ty)
    tl.store(wb_ptr + w_off, buf, mask=in_w)
    tl.store(w_ptr + w_off, new_p, mask=in_w)
    tl.store(bb_ptr + b_off, buf, mask=in_b)
    tl.store(b_ptr + b_off, new_p, mask=in_b)


def _num_warps(block_c: int, block_k: int) -> int:
    """Eight warps once a tile is 32 wide (four spill there), four below."""
    return 8 if max(block_c, block_k) >= 32 else 4


_PARAM_TYPES = {torch.float32: ("fp32", "fp32"), torch.float64: ("fp64", "fp64"),
                torch.bfloat16: ("bf16", "fp32")}   # parameter dtype: (its type, accumulation)


def launch_configs():
    """Every configuration the launcher picks: per parameter dtype, the tiles of C and K slots
    of every size up to ``MAX_BLOCK``."""
    from ._aot import KernelConfig

    tiles = sorted({slot_tile(b) for b in range(1, MAX_BLOCK + 1)})
    return [KernelConfig(_step_kernel, dict(BLOCK_C=bc, BLOCK_K=bk,
                                            PARAM_BF16=dtype == torch.bfloat16),
                         pointers={**{n: t for n in ("w_ptr", "wg_ptr", "b_ptr", "bg_ptr")},
                                   **{n: acc for n in ("c_ptr", "k_ptr", "wb_ptr", "bb_ptr",
                                                       "s_ptr")},
                                   **{n: "i64" for n in ("cd_ptr", "ro_ptr", "kd_ptr",
                                                         "co_ptr")}},
                         num_warps=_num_warps(bc, bk))
            for dtype, (t, acc) in _PARAM_TYPES.items() for bc in tiles for bk in tiles]


def singd_block_step_triton(weight, weight_grad, bias, bias_grad, c, c_dims, k, k_dims,
                            weight_buf, bias_buf, lr, momentum, weight_decay, first):
    """In place on the parameters and buffers; arguments checked by the op (slots of at most
    ``MAX_BLOCK``)."""
    if max(c.shape[1], k.shape[1]) > MAX_BLOCK:
        raise ValueError(f"singd_block_step_triton: blocks of at most {MAX_BLOCK}, got "
                         f"{c.shape[1]} and {k.shape[1]}")
    dev = weight.device

    def prefix(dims):
        out = [0]
        for n in dims:
            out.append(out[-1] + n)
        return torch.tensor(out, dtype=torch.int64, device=dev)

    cd = torch.tensor(list(c_dims), dtype=torch.int64, device=dev)
    kd = torch.tensor(list(k_dims), dtype=torch.int64, device=dev)
    scalars = torch.tensor([lr, momentum, weight_decay], dtype=weight_buf.dtype, device=dev)
    has_bias = bias is not None
    programs = c.shape[0] * k.shape[0]
    block_c, block_k = slot_tile(c.shape[1]), slot_tile(k.shape[1])
    if programs > MAX_GRID_X:
        raise ValueError(f"singd_block_step_triton: {programs} tiles, more than one launch "
                         f"holds ({MAX_GRID_X})")
    _step_kernel[(programs,)](weight, weight_grad, bias if has_bias else weight,
                              bias_grad if has_bias else weight_grad, c, cd, prefix(c_dims), k,
                              kd, prefix(k_dims), weight_buf,
                              bias_buf if has_bias else weight_buf, scalars, weight.shape[1],
                              k.shape[0], c.shape[1], k.shape[1], int(has_bias), int(bool(first)),
                              BLOCK_C=block_c, BLOCK_K=block_k,
                              PARAM_BF16=weight.dtype == torch.bfloat16,
                              num_warps=_num_warps(block_c, block_k))
