r"""Triton kernel for the fused symmetric factor update ``decay * F + alpha * X^T X``.

Algorithm
---------
The output ``F' = decay * F + alpha * X^T X`` (``X`` of shape ``(m, d)``, or ``(B, m, d)`` for a
stack of ``B`` independent factors) is symmetric, so only its upper triangle of ``BLOCK x BLOCK``
tiles is computed. With ``T = ceil(d / BLOCK)`` tiles per side there are ``T (T + 1) / 2`` upper
tiles ``(ti, tj)``, ``ti <= tj``, numbered column by column::

    k = tj (tj + 1) / 2 + ti,      tj = floor((sqrt(8 k + 1) - 1) / 2)

and the launch grid has exactly one program per upper tile and factor, so no program is spent on
the lower triangle (the floating-point square root is corrected by one step either way, which
makes the inverse map exact for any tile count a launch can have).

Each program walks down the rows of ``X`` in chunks of ``BLOCK_M``: it loads the column panels
``X[r:r+BLOCK_M, ti-block]`` (as its transpose) and ``X[r:r+BLOCK_M, tj-block]`` through the
tensor's strides, so any layout of ``X`` is read in place, with masks for the ragged edges
(masked elements read as 0 and contribute nothing), and accumulates their product:

* float32: ``tl.dot`` with ``input_precision="ieee"`` (never TF32, so the result agrees with an
  fp64 reference to ~1e-6 relative), accumulating in fp32;
* float64: ``tl.dot`` has no portable fp64 path, so the product is a sum of outer products,
  ``tl.sum(a[:, :, None] * b[None, :, :], axis=1)``, accumulated in fp64.

The epilogue forms ``alpha * acc + decay * F_tile`` (``F`` is not read at all when it is
``None``) and stores the upper-triangle elements of the tile twice: at ``(i, j)`` and mirrored at
``(j, i)``. Every output element is therefore written from one computed value, so the result is
exactly symmetric (``torch.equal(out, out.mT)``) even on diagonal tiles, where the two halves of
the accumulator need not agree bit for bit. Only the upper triangle of ``F`` is read, which is all
of it for a symmetric factor.

Split over rows
---------------
A K-FAC factor typically has few tiles (``d`` in the hundreds) and many rows (``m`` in the
thousands), so one program per tile can leave most of a GPU idle. When the tile programs cannot
fill the device, the rows are split into ``S`` contiguous ranges: pass one writes each range's
partial Gram tile to an fp32/fp64 workspace ``(S, B, d, d)``, and pass two sums the ``S``
partials in a fixed order and applies the same epilogue. The reduction order is fixed, so the
result is deterministic (no atomics) and still exactly symmetric.

``decay`` and ``alpha`` are passed as fp64 kernel arguments (a plain Python float would be
narrowed to fp32, costing the fp64 path its accuracy) and rounded to the accumulator's type in the
epilogue; no device tensor is created for them, so a launch never waits on a host-to-device copy.
The interpreter ignores the fp64 annotation, so under it they are read from a small fp64 tensor
instead (``SCALARS_IN_MEMORY``).

Under ``TRITON_INTERPRET=1`` the same kernels run on CPU tensors (slowly: keep shapes small).
"""
from __future__ import annotations

import contextlib
import math

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

__all__ = ["symmetric_factor_update_triton"]

# Axis 1 of a CUDA grid is limited to 65535 programs.
_MAX_GRID_Y = 65535


@triton.jit
def _upper_tile(pid):
    """Map a linear index to the upper-triangle tile ``(ti, tj)``, ``ti <= tj`` (column order)."""
    kf = pid.to(tl.float32)
    tj = ((tl.sqrt(8.0 * kf + 1.0) - 1.0) * 0.5).to(tl.int32)
    # one correction step either way makes the float estimate exact
    tj = tl.where(tj * (tj + 1) // 2 > pid, tj - 1, tj)
    tj = tl.where((tj + 1) * (tj + 2) // 2 <= pid, tj + 1, tj)
    ti = pid - tj * (tj + 1) // 2
    return ti, tj


@triton.jit
def _gram_tile(x_base, row_start, row_end, offs_i, offs_j, D, sxm, sxd,
               BLOCK: tl.constexpr, BLOCK_M: tl.constexpr, ACC_FP64: tl.constexpr):
    """``sum_{r in [row_start, row_end)} x[r, offs_i]^T x[r, offs_j]`` as a (BLOCK, BLOCK) tile."""
    if ACC_FP64:
        acc = tl.zeros((BLOCK, BLOCK), dtype=tl.float64)
    else:
        acc = tl.zeros((BLOCK, BLOCK), dtype=tl.float32)
    mask_i = offs_i < D
    mask_j = offs_j < D
    cols_i = offs_i.to(tl.int64) * sxd
    cols_j = offs_j.to(tl.int64) * sxd
    for r0 in range(row_start, row_end, BLOCK_M):
        offs_m = r0 + tl.arange(0, BLOCK_M)
        mask_m = offs_m < row_end
        rows = offs_m.to(tl.int64) * sxm
        # a^T: (BLOCK, BLOCK_M) panel of columns offs_i; b: (BLOCK_M, BLOCK) panel of columns offs_j
        a_t = tl.load(x_base + cols_i[:, None] + rows[None, :],
                      mask=mask_i[:, None] & mask_m[None, :], other=0.0)
        b = tl.load(x_base + rows[:, None] + cols_j[None, :],
                    mask=mask_m[:, None] & mask_j[None, :], other=0.0)
        if ACC_FP64:
            acc += tl.sum(a_t[:, :, None] * b[None, :, :], axis=1)
        else:
            acc = tl.dot(a_t, b, acc, input_precision="ieee")
    return acc


@triton.jit
def _epilogue_store(acc, f_base, o_base, decay, alpha, offs_i, offs_j, D, sfi, sfj, soi, soj,
                    HAS_FACTOR: tl.constexpr):
    """``alpha * acc + decay * F`` stored at (i, j) and (j, i) for the upper elements only."""
    out = acc * alpha.to(acc.dtype)
    mask_ij = (offs_i < D)[:, None] & (offs_j < D)[None, :]
    ii = offs_i.to(tl.int64)
    jj = offs_j.to(tl.int64)
    if HAS_FACTOR:
        f = tl.load(f_base + ii[:, None] * sfi + jj[None, :] * sfj, mask=mask_ij, other=0.0)
        out += f.to(acc.dtype) * decay.to(acc.dtype)
    out = out.to(o_base.dtype.element_ty)
    upper = mask_ij & (offs_i[:, None] <= offs_j[None, :])
    tl.store(o_base + ii[:, None] * soi + jj[None, :] * soj, out, mask=upper)
    tl.store(o_base + jj[None, :] * soi + ii[:, None] * soj, out, mask=upper)


@triton.jit
def _sfu_kernel(x_ptr, f_ptr, out_ptr, ws_ptr, scal_ptr, decay: tl.float64, alpha: tl.float64,
                M, D, N_TILES, ROWS_PER_SPLIT,
                sxb, sxm, sxd, sfb, sfi, sfj, sob, soi, soj, wss, wsb, wsi, wsj,
                HAS_FACTOR: tl.constexpr, SPLIT: tl.constexpr, ACC_FP64: tl.constexpr,
                BLOCK: tl.constexpr, BLOCK_M: tl.constexpr, SCALARS_IN_MEMORY: tl.constexpr):
    """One program per (factor, upper tile[, row range]).

    With ``SPLIT`` the program writes its partial Gram tile to the workspace; otherwise it covers
    all rows and applies the epilogue itself.
    """
    pid = tl.program_id(0)
    b = pid // N_TILES
    ti, tj = _upper_tile(pid % N_TILES)
    s = tl.program_id(1)
    offs_i = ti * BLOCK + tl.arange(0, BLOCK)
    offs_j = tj * BLOCK + tl.arange(0, BLOCK)
    b64 = b.to(tl.int64)
    row_start = s * ROWS_PER_SPLIT
    row_end = tl.minimum(row_start + ROWS_PER_SPLIT, M)
    acc = _gram_tile(x_ptr + b64 * sxb, row_start, row_end, offs_i, offs_j, D, sxm, sxd,
                     BLOCK, BLOCK_M, ACC_FP64)
    if SPLIT:
        mask_ij = (offs_i < D)[:, None] & (offs_j < D)[None, :]
        w_base = ws_ptr + s.to(tl.int64) * wss + b64 * wsb
        tl.store(w_base + offs_i.to(tl.int64)[:, None] * wsi + offs_j.to(tl.int64)[None, :] * wsj,
                 acc, mask=mask_ij)
    else:
        if SCALARS_IN_MEMORY:
            decay = tl.load(scal_ptr)
            alpha = tl.load(scal_ptr + 1)
        _epilogue_store(acc, f_ptr + b64 * sfb, out_ptr + b64 * sob, decay, alpha, offs_i, offs_j,
                        D, sfi, sfj, soi, soj, HAS_FACTOR)


@triton.jit
def _sfu_reduce_kernel(f_ptr, out_ptr, ws_ptr, scal_ptr, decay: tl.float64, alpha: tl.float64,
                       D, N_TILES, N_SPLIT,
                       sfb, sfi, sfj, sob, soi, soj, wss, wsb, wsi, wsj,
                       HAS_FACTOR: tl.constexpr, ACC_FP64: tl.constexpr, BLOCK: tl.constexpr,
                       SCALARS_IN_MEMORY: tl.constexpr):
    """Sum the row-range partials of one upper tile in a fixed order, then the epilogue."""
    pid = tl.program_id(0)
    b = pid // N_TILES
    ti, tj = _upper_tile(pid % N_TILES)
    offs_i = ti * BLOCK + tl.arange(0, BLOCK)
    offs_j = tj * BLOCK + tl.arange(0, BLOCK)
    b64 = b.to(tl.int64)
    mask_ij = (offs_i < D)[:, None] & (offs_j < D)[None, :]
    if ACC_FP64:
        acc = tl.zeros((BLOCK, BLOCK), dtype=tl.float64)
    else:
        acc = tl.zeros((BLOCK, BLOCK), dtype=tl.float32)
    w_tile = (ws_ptr + b64 * wsb + offs_i.to(tl.int64)[:, None] * wsi
              + offs_j.to(tl.int64)[None, :] * wsj)
    for s in range(0, N_SPLIT):
        acc += tl.load(w_tile + s * wss, mask=mask_ij, other=0.0)
    if SCALARS_IN_MEMORY:
        decay = tl.load(scal_ptr)
        alpha = tl.load(scal_ptr + 1)
    _epilogue_store(acc, f_ptr + b64 * sfb, out_ptr + b64 * sob, decay, alpha, offs_i, offs_j,
                    D, sfi, sfj, soi, soj, HAS_FACTOR)


def _interpreted() -> bool:
    """Whether the kernels run under the Triton interpreter (``TRITON_INTERPRET=1``)."""
    return isinstance(_sfu_kernel, InterpretedFunction)


def _default_blocks(dtype: torch.dtype, d: int, device: torch.device) -> tuple[int, int]:
    """Tile sizes ``(BLOCK, BLOCK_M)``.

    float32 uses ``tl.dot``, so every dimension is at least 16. float64 materialises a
    ``BLOCK x BLOCK_M x BLOCK`` product slab per step, kept small in registers on a GPU; the
    interpreter (CPU tensors) runs each step as one NumPy operation, so there a larger slab means
    fewer, cheaper steps.
    """
    block = min(64, max(16, triton.next_power_of_2(d)))
    if dtype == torch.float64:
        return min(block, 32), (8 if device.type == "cuda" else 32)
    return block, 32


def _num_splits(device: torch.device, programs: int, m: int, block_m: int) -> int:
    """How many row ranges to use so that ``programs * S`` roughly fills a GPU (1 on CPU)."""
    if device.type != "cuda" or m <= 0:
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    if programs >= sms:
        return 1
    want = math.ceil(2 * sms / programs)
    # keep every range at least 8 chunks long so the workspace pass stays cheap
    most = max(1, m // (8 * block_m))
    return max(1, min(want, most, _MAX_GRID_Y))


def symmetric_factor_update_triton(factor: torch.Tensor | None, x: torch.Tensor, decay: float,
                                   alpha: float, *, block: int | None = None,
                                   block_m: int | None = None,
                                   split_m: int | None = None) -> torch.Tensor:
    """Return ``decay * factor + alpha * x^T x`` computed by the Triton kernel (a new tensor).

    Args:
        factor: ``(d, d)`` / ``(B, d, d)`` symmetric factor or ``None`` (zeros; ``decay`` unused).
        x: ``(m, d)`` / ``(B, m, d)`` float32 or float64, any strides, on CUDA or (under
            ``TRITON_INTERPRET=1``) on the CPU.
        decay, alpha: Python numbers.
        block, block_m: override the tile sizes (powers of two, ``>= 16`` for float32); for tests
            and tuning.
        split_m: number of row ranges (default: chosen from the GPU's SM count, 1 on the CPU).

    The inputs are expected to be validated by :func:`kfac_kernels.ops.symmetric_factor_update`;
    only what the kernel itself relies on is checked here. The output is contiguous, of the
    input's dtype, and exactly symmetric.
    """
    if x.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"symmetric_factor_update_triton: x must be float32 or float64, "
                        f"got {x.dtype}")
    if x.dim() not in (2, 3):
        raise ValueError(f"symmetric_factor_update_triton: x must be 2-D or 3-D, "
                         f"got shape {tuple(x.shape)}")
    batched = x.dim() == 3
    xb = x if batched else x.unsqueeze(0)
    nb, m, d = xb.shape
    fb = None
    if factor is not None:
        fb = factor if batched else factor.unsqueeze(0)
        if tuple(fb.shape) != (nb, d, d) or fb.dtype != x.dtype or fb.device != x.device:
            raise ValueError("symmetric_factor_update_triton: factor must match x in batch, d, "
                             "dtype and device")
    out = torch.empty((nb, d, d), dtype=x.dtype, device=x.device)
    if nb == 0 or d == 0:
        return out if batched else out[0]

    fp64 = x.dtype == torch.float64
    dflt_block, dflt_block_m = _default_blocks(x.dtype, d, x.device)
    block = block or dflt_block
    block_m = block_m or dflt_block_m
    if not fp64 and (block < 16 or block_m < 16):
        raise ValueError("symmetric_factor_update_triton: float32 tiles need block, block_m >= 16")
    n_t = triton.cdiv(d, block)
    n_tiles = n_t * (n_t + 1) // 2
    programs = nb * n_tiles
    if programs >= 2**31:
        raise ValueError("symmetric_factor_update_triton: too many tiles for one launch")
    splits = split_m if split_m is not None else _num_splits(x.device, programs, m, block_m)
    splits = max(1, min(int(splits), max(1, triton.cdiv(m, block_m)), _MAX_GRID_Y))
    rows_per_split = triton.cdiv(max(m, 1), splits * block_m) * block_m

    decay, alpha = float(decay), float(alpha)
    in_memory = _interpreted()
    # the interpreter narrows float arguments to fp32 whatever their annotation; there the two
    # scalars travel in a (host) tensor instead
    scal = (torch.tensor([decay, alpha], dtype=torch.float64, device=x.device) if in_memory
            else out)
    f_arg = fb if fb is not None else xb  # never read when HAS_FACTOR is False
    f_strides = fb.stride() if fb is not None else (0, 0, 0)
    sxb, sxm, sxd = xb.stride()
    ws = None
    if splits > 1:
        ws = torch.empty((splits, nb, d, d), dtype=x.dtype, device=x.device)
        ws_strides = ws.stride()
    else:
        ws_strides = (0, 0, 0, 0)

    guard = torch.cuda.device(x.device) if x.device.type == "cuda" else contextlib.nullcontext()
    with guard:
        _sfu_kernel[(programs, splits)](
            xb, f_arg, out, ws if ws is not None else out, scal, decay, alpha,
            m, d, n_tiles, rows_per_split,
            sxb, sxm, sxd, *f_strides, *out.stride(), *ws_strides,
            HAS_FACTOR=fb is not None, SPLIT=splits > 1, ACC_FP64=fp64,
            BLOCK=block, BLOCK_M=block_m, SCALARS_IN_MEMORY=in_memory,
        )
        if splits > 1:
            _sfu_reduce_kernel[(programs,)](
                f_arg, out, ws, scal, decay, alpha, d, n_tiles, splits,
                *f_strides, *out.stride(), *ws_strides,
                HAS_FACTOR=fb is not None, ACC_FP64=fp64, BLOCK=block,
                SCALARS_IN_MEMORY=in_memory,
            )
    return out if batched else out[0]

