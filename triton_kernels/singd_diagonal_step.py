r"""Triton kernel of the fused SINGD step for diagonal factors (see
``kfac_kernels.ops.singd_diagonal_step``)::

    d = c_i (c_i ((g_ij k_j) k_j)) + weight_decay p_ij
    b_ij = first ? d : momentum b_ij + d;     p_ij -= lr b_ij

One program per ``BLOCK_R x BLOCK_C`` tile; ``p`` and ``g`` are loaded in their dtype (fp32,
fp64 or bf16) and converted to the accumulation type of ``b``; ``p`` is stored back rounded once.
``lr``, ``momentum`` and ``weight_decay`` are read from a small tensor in the accumulation dtype
(a Python float argument would be narrowed to fp32, losing the fp64 path's accuracy).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["singd_diagonal_step_triton"]


@triton.jit
def _step_kernel(p_ptr, g_ptr, c_ptr, k_ptr, b_ptr, s_ptr, rows, cols, p_sr, g_sr, b_sr,
                 FIRST: tl.constexpr, DECAY: tl.constexpr, BF16: tl.constexpr,
                 BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    pid_r = tl.program_id(0)
    pid_c = tl.program_id(1)
    r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    cc = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = (r[:, None] < rows) & (cc[None, :] < cols)
    lr = tl.load(s_ptr)
    mom = tl.load(s_ptr + 1)
    wd = tl.load(s_ptr + 2)
    ci = tl.load(c_ptr + r, mask=r < rows, other=0.0)
    kj = tl.load(k_ptr + cc, mask=cc < cols, other=0.0)
    b_off = r[:, None] * b_sr + cc[None, :]
    p_raw = tl.load(p_ptr + r[:, None] * p_sr + cc[None, :], mask=mask, other=0.0)
    p = p_raw.to(ci.dtype)
    g = tl.load(g_ptr + r[:, None] * g_sr + cc[None, :], mask=mask, other=0.0).to(ci.dtype)
    d = ci[:, None] * (ci[:, None] * ((g * kj[None, :]) * kj[None, :]))
    if DECAY:
        d = d + wd * p
    if FIRST:
        b = d
    else:
        b = mom * tl.load(b_ptr + b_off, mask=mask, other=0.0) + d
    tl.store(b_ptr + b_off, b, mask=mask)
    out = p - lr * b
    if BF16:
        # Round to nearest even on the bits, as the eager, C++ and CUDA paths do (the
        # interpreter's float32 -> bfloat16 cast truncates); NaN stays NaN (quiet bit set).
        u = out.to(tl.uint32, bitcast=True)
        rounded = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
        nan = (u & 0x7FFFFFFF) > 0x7F800000
        bits = tl.where(nan, (u >> 16) | 0x40, rounded).to(tl.uint16)
        tl.store(p_ptr + r[:, None] * p_sr + cc[None, :], bits.to(tl.bfloat16, bitcast=True),
                 mask=mask)
    else:
        tl.store(p_ptr + r[:, None] * p_sr + cc[None, :], out.to(p_raw.dtype), mask=mask)


def singd_diagonal_step_triton(param, grad, c, k, buf, lr, momentum, weight_decay, first):
    """In place on ``param`` and ``buf``; arguments checked by the op."""
    rows, cols = param.shape
    if rows == 0 or cols == 0:
        return
    scalars = torch.tensor([lr, momentum, weight_decay], dtype=buf.dtype, device=buf.device)
    block_r, block_c = 16, 64
    grid = (triton.cdiv(rows, block_r), triton.cdiv(cols, block_c))
    _step_kernel[grid](param, grad, c, k, buf, scalars, rows, cols, param.stride(0),
                       grad.stride(0), buf.stride(0), FIRST=bool(first),
                       DECAY=weight_decay != 0.0, BF16=param.dtype == torch.bfloat16,
                       BLOCK_R=block_r, BLOCK_C=block_c)
