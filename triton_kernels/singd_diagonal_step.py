r"""Triton kernel of the fused SINGD step for diagonal factors (see
``kfac_kernels.ops.singd_diagonal_step``)::

    d = c_i (c_i ((g_ij k_j) k_j)) + weight_decay p_ij
    b_ij = first ? d : momentum b_ij + d;     p_ij -= lr b_ij

One program per ``BLOCK_R x BLOCK_C`` tile, the tiles numbered along one grid axis (axis 1 would
stop at 65535 column blocks); offsets are int64 (``row * row_stride`` passes 2^31 on large
parameters). ``p`` and ``g`` are loaded in their dtype (fp32, fp64 or bf16) and converted to the
accumulation type of ``b``; ``p`` is stored back rounded once (bf16: :mod:`._rounding`).
``lr``, ``momentum`` and ``weight_decay`` are read from a small tensor in the accumulation dtype
(a Python float argument would be narrowed to fp32, losing the fp64 path's accuracy).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._rounding import round_to_bfloat16
from ._tiles import MAX_GRID_X

__all__ = ["singd_diagonal_step_triton", "launch_configs"]

BLOCK_R, BLOCK_C = 16, 64


@triton.jit
def _step_kernel(p_ptr, g_ptr, c_ptr, k_ptr, b_ptr, s_ptr, rows, cols, col_blocks,
                 p_sr, g_sr, b_sr, FIRST: tl.constexpr, DECAY: tl.constexpr,
                 BF16: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    pid = tl.program_id(0)
    pid_r = pid // col_blocks
    pid_c = pid - pid_r * col_blocks
    r = pid_r.to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    cc = pid_c.to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = (r[:, None] < rows) & (cc[None, :] < cols)
    lr = tl.load(s_ptr)
    mom = tl.load(s_ptr + 1)
    wd = tl.load(s_ptr + 2)
    ci = tl.load(c_ptr + r, mask=r < rows, other=0.0)
    kj = tl.load(k_ptr + cc, mask=cc < cols, other=0.0)
    p_off = r[:, None] * p_sr + cc[None, :]
    b_off = r[:, None] * b_sr + cc[None, :]
    p_raw = tl.load(p_ptr + p_off, mask=mask, other=0.0)
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
        tl.store(p_ptr + p_off, round_to_bfloat16(out), mask=mask)
    else:
        tl.store(p_ptr + p_off, out.to(p_raw.dtype), mask=mask)


def launch_configs():
    """Every configuration the launcher picks: per parameter dtype, the first step or not, with
    weight decay or not."""
    from ._aot import KernelConfig

    return [KernelConfig(_step_kernel, dict(FIRST=first, DECAY=decay, BF16=t == "bf16",
                                            BLOCK_R=BLOCK_R, BLOCK_C=BLOCK_C),
                         pointers={"p_ptr": t, "g_ptr": t, "c_ptr": acc, "k_ptr": acc,
                                   "b_ptr": acc, "s_ptr": acc})
            for t, acc in (("fp32", "fp32"), ("fp64", "fp64"), ("bf16", "fp32"))
            for first in (False, True) for decay in (False, True)]


def singd_diagonal_step_triton(param, grad, c, k, buf, lr, momentum, weight_decay, first):
    """In place on ``param`` and ``buf``; arguments checked by the op."""
    rows, cols = param.shape
    if rows == 0 or cols == 0:
        return
    scalars = torch.tensor([lr, momentum, weight_decay], dtype=buf.dtype, device=buf.device)
    col_blocks = triton.cdiv(cols, BLOCK_C)
    programs = triton.cdiv(rows, BLOCK_R) * col_blocks
    if programs > MAX_GRID_X:
        raise ValueError(f"singd_diagonal_step_triton: param of shape {tuple(param.shape)} needs "
                         f"{programs} tiles, more than one launch holds ({MAX_GRID_X})")
    _step_kernel[(programs,)](param, grad, c, k, buf, scalars, rows, cols, col_blocks,
                              param.stride(0), grad.stride(0), buf.stride(0), FIRST=bool(first),
                              DECAY=weight_decay != 0.0, BF16=param.dtype == torch.bfloat16,
                              BLOCK_R=BLOCK_R, BLOCK_C=BLOCK_C)
