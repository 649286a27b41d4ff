r"""Triton kernel of the fused SINGD parameter step for block-diagonal factors (see
``kfac_kernels.ops.singd_block_step`` for the definition).

One program per tile (``C`` row block ``i``, ``K`` column block ``j``): it forms ``C_i C_i^T`` and
``K_j K_j^T`` (``tl.dot`` tiles of at least 16, masked to the used sizes), loads the gradient
tile (the column past the weight's last one from the bias gradient), computes
``(C_i C_i^T) M_ij (K_j K_j^T)`` in the accumulation dtype ("ieee": no TF32), adds the weight
decay, updates the momentum buffer and writes the parameters, each rounded once (bfloat16 to
nearest even, by integer arithmetic: the interpreter's float-to-bfloat16 cast does not round to
nearest).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["singd_block_step_triton"]


@triton.jit
def _outer(ptr, j, n, B: tl.constexpr, BLOCK: tl.constexpr):
    r = tl.arange(0, BLOCK)[:, None]
    c = tl.arange(0, BLOCK)[None, :]
    x = tl.load(ptr + j * B * B + r * B + c, mask=(r < n) & (c < n), other=0.0)
    return tl.dot(x, tl.trans(x), input_precision="ieee")


@triton.jit
def _round(x, ptr, PARAM_BF16: tl.constexpr):
    """``x`` in the element type of ``ptr``; bfloat16 rounded to nearest even by integer
    arithmetic on the fp32 bits, so the interpreter and the GPU round alike (a NaN stays NaN:
    its exponent bits are all set and the carry cannot clear them)."""
    if PARAM_BF16:
        u = x.to(tl.float32).to(tl.uint32, bitcast=True)
        u = u + 0x7FFF + ((u >> 16) & 1)
        return (u >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(ptr.dtype.element_ty)


@triton.jit
def _step_kernel(w_ptr, wg_ptr, b_ptr, bg_ptr, c_ptr, cd_ptr, ro_ptr, k_ptr, kd_ptr, co_ptr,
                 wb_ptr, bb_ptr, s_ptr, cols, k_blocks, HAS_BIAS: tl.constexpr,
                 FIRST: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr,
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
    w_off = rows * cols + colsj
    g = tl.load(wg_ptr + w_off, mask=in_w, other=0.0).to(lr.dtype)
    p = tl.load(w_ptr + w_off, mask=in_w, other=0.0).to(lr.dtype)
    if FIRST:
        buf = tl.zeros([BLOCK_C, BLOCK_K], dtype=lr.dtype)
    else:
        buf = tl.load(wb_ptr + w_off, mask=in_w, other=0.0)
    if HAS_BIAS:
        in_b = inside & (colsj == cols)
        b_off = rows + colsj * 0
        g += tl.load(bg_ptr + b_off, mask=in_b, other=0.0).to(lr.dtype)
        p += tl.load(b_ptr + b_off, mask=in_b, other=0.0).to(lr.dtype)
        if not FIRST:
            buf += tl.load(bb_ptr + b_off, mask=in_b, other=0.0)
    d = tl.dot(tl.dot(cc, g, input_precision="ieee"), kk, input_precision="ieee")
    d = d + wd * p
    if FIRST:
        buf = d
    else:
        buf = mom * buf + d
    new = p - lr * buf
    tl.store(wb_ptr + w_off, buf, mask=in_w)
    tl.store(w_ptr + w_off, _round(new, w_ptr, PARAM_BF16), mask=in_w)
    if HAS_BIAS:
        tl.store(bb_ptr + b_off, buf, mask=in_b)
        tl.store(b_ptr + b_off, _round(new, b_ptr, PARAM_BF16), mask=in_b)


def _tile(b: int) -> int:
    return max(16, triton.next_power_of_2(b))


def singd_block_step_triton(weight, weight_grad, bias, bias_grad, c, c_dims, k, k_dims,
                            weight_buf, bias_buf, lr, momentum, weight_decay, first):
    """In place on the parameters and buffers; arguments checked by the op."""
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
    grid = (c.shape[0] * k.shape[0],)
    _step_kernel[grid](weight, weight_grad, bias if has_bias else weight,
                       bias_grad if has_bias else weight_grad, c, cd, prefix(c_dims), k, kd,
                       prefix(k_dims), weight_buf, bias_buf if has_bias else weight_buf, scalars,
                       weight.shape[1], k.shape[0], HAS_BIAS=has_bias, FIRST=bool(first),
                       BC=c.shape[1], BK=k.shape[1], BLOCK_C=_tile(c.shape[1]),
                       BLOCK_K=_tile(k.shape[1]),
                       PARAM_BF16=weight.dtype == torch.bfloat16)
