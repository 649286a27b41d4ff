r"""float32 -> bfloat16 rounding shared by the Triton kernels that store bfloat16 parameters.

Round to nearest even on the fp32 bits, ``(u + 0x7FFF + ((u >> 16) & 1)) >> 16``, as torch, the
C++ and the CUDA kernels round; the interpreter's float32 -> bfloat16 cast truncates instead, so
the kernels do not use it. The carry of that sum would wrap a NaN whose low 16 bits are set:
NVIDIA GPUs produce ``0x7FFFFFFF`` (and ``0xFFFFFFFF`` negated), which would become -0.0 and +0.0.
A NaN therefore keeps its upper half with the quiet bit set (``(u >> 16) | 0x40``), like
``csrc/cpu/bf16_bits.h``.
"""
from __future__ import annotations

import triton
import triton.language as tl

__all__ = ["round_to_bfloat16"]


@triton.jit
def round_to_bfloat16(x):
    """``x`` (float32) as bfloat16, rounded to nearest even; NaN stays NaN, +-inf stays +-inf."""
    u = x.to(tl.float32).to(tl.uint32, bitcast=True)
    rounded = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
    nan = (u & 0x7FFFFFFF) > 0x7F800000
    bits = tl.where(nan, (u >> 16) | 0x40, rounded)
    return bits.to(tl.uint16).to(tl.bfloat16, bitcast=True)
