r"""Triton kernel for the fused symmetric factor update ``decay * F + alpha * X^T X``.

Algorithm
---------
The output ``F' = decay * F + alpha * X^T X`` (``X`` of shape ``(m, d)``, or ``(B, m, d)`` for a
stack of ``B`` independent factors) is symmetric, so only its upper triangle of ``BLOCK x BLOCK``
tiles is computed: the launch grid has exactly one program per upper tile and factor (the tile
numbering, epilogue and row split are those of :mod:`._tiles`).

Each program walks down the rows of ``X`` in chunks of ``BLOCK_M``: it loads the column panels
``X[r:r+BLOCK_M, ti-block]`` (as its transpose) and ``X[r:r+BLOCK_M, tj-block]`` through the
tensor's strides, so any layout of ``X`` is read in place, with masks for the ragged edges
(masked elements read as 0 and contribute nothing), and accumulates their product:

* float32: ``tl.dot`` with ``input_precision="ieee"`` (never TF32, so the result agrees with an
  fp64 reference to ~1e-6 relative), accumulating in fp32;
* float64: ``tl.dot`` has no portable fp64 path, so the product is a sum of outer products,
  ``tl.sum(a[:, :, None] * b[None, :, :], axis=1)``, accumulated in fp64.

The epilogue forms ``alpha * acc + decay * F`` (``F`` is not read at all when it is ``None``)
and stores every upper-triangle element of the tile at ``(i, j)`` and ``(j, i)`` (with
``F[j, i]`` there), so the result is exactly symmetric (``torch.equal(out, out.mT)``) whenever
``F`` is, even on diagonal tiles, where the two halves of the accumulator need not agree bit for
bit.

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

import torch
import triton
import triton.language as tl

from . import _tiles
from ._tiles import epilogue_store, store_partial, upper_tile

__all__ = ["symmetric_factor_update_triton", "launch_configs"]

_NAME = "symmetric_factor_update_triton"


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
    ti, tj = upper_tile(pid % N_TILES)
    s = tl.program_id(1)
    offs_i = ti * BLOCK + tl.arange(0, BLOCK)
    offs_j = tj * BLOCK + tl.arange(0, BLOCK)
    b64 = b.to(tl.int64)
    # int64 row indices: a range may end within BLOCK_M of 2^31
    row_start = s.to(tl.int64) * ROWS_PER_SPLIT
    row_end = tl.minimum(row_start + ROWS_PER_SPLIT, M)
    acc = _gram_tile(x_ptr + b64 * sxb, row_start, row_end, offs_i, offs_j, D, sxm, sxd,
                     BLOCK, BLOCK_M, ACC_FP64)
    if SPLIT:
        store_partial(acc, ws_ptr, s, b64, offs_i, offs_j, D, wss, wsb, wsi, wsj)
    else:
        if SCALARS_IN_MEMORY:
            decay = tl.load(scal_ptr)
            alpha = tl.load(scal_ptr + 1)
        epilogue_store(acc, f_ptr + b64 * sfb, out_ptr + b64 * sob, decay, alpha, offs_i, offs_j,
                       D, sfi, sfj, soi, soj, HAS_FACTOR)


def tile_steps(dtype: torch.dtype, block: int, on_gpu: bool) -> tuple[int, ...]:
    """Row steps a launch can use at ``block`` (the default is the largest): 32 rows in fp32;
    in fp64 the outer-product slab ``block x 8 x block`` stays in registers."""
    return _tiles.row_steps(8 if dtype == torch.float64 else 32, on_gpu)


def launch_configs():
    """Every configuration a launch on a GPU can pick: each tile of ``_tiles.GRAM_BLOCKS`` (the
    defaults and the overrides) at its row step, with a factor or not, or a row range writing
    its partial tile (then the split reduction applies the factor)."""
    from ._aot import KernelConfig

    out = []
    for dtype, t in ((torch.float32, "fp32"), (torch.float64, "fp64")):
        for block in _tiles.GRAM_BLOCKS[dtype]:
            for step in tile_steps(dtype, block, on_gpu=True):
                for has_factor, split in ((False, False), (True, False), (False, True)):
                    out.append(KernelConfig(
                        _sfu_kernel, dict(HAS_FACTOR=has_factor, SPLIT=split,
                                          ACC_FP64=dtype == torch.float64, BLOCK=block,
                                          BLOCK_M=step, SCALARS_IN_MEMORY=False),
                        pointers={n: t for n in ("x_ptr", "f_ptr", "out_ptr", "ws_ptr",
                                                 "scal_ptr")},
                        num_warps=_tiles.gram_num_warps(block)))
    return out + _tiles.split_reduce_configs()


def symmetric_factor_update_triton(factor: torch.Tensor | None, x: torch.Tensor, decay: float,
                                   alpha: float, *, block: int | None = None,
                                   block_m: int | None = None,
                                   split_m: int | None = None) -> torch.Tensor:
    """Return ``decay * factor + alpha * x^T x`` computed by the Triton kernel (a new tensor).

    Args:
        factor: ``(d, d)`` / ``(B, d, d)`` factor or ``None`` (zeros; ``decay`` unused).
        x: ``(m, d)`` / ``(B, m, d)`` float32 or float64, any strides, on CUDA or (under
            ``TRITON_INTERPRET=1``) on the CPU.
        decay, alpha: Python numbers.
        block, block_m: override the tile sizes (for tests and tuning), among those a launch
            can pick anyway (``_tiles.GRAM_BLOCKS``, :func:`tile_steps`).
        split_m: number of row ranges (default: chosen from the GPU's SM count, 1 on the CPU).

    The inputs are expected to be validated by :func:`kfac_kernels.ops.symmetric_factor_update`;
    only what the kernel itself relies on is checked here. The output is contiguous, of the
    input's dtype, and exactly symmetric whenever ``factor`` is.
    """
    if x.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"{_NAME}: x must be float32 or float64, got {x.dtype}")
    if x.dim() not in (2, 3):
        raise ValueError(f"{_NAME}: x must be 2-D or 3-D, got shape {tuple(x.shape)}")
    batched = x.dim() == 3
    xb = x if batched else x.unsqueeze(0)
    nb, m, d = xb.shape
    fb = None
    if factor is not None:
        fb = factor if batched else factor.unsqueeze(0)
        if tuple(fb.shape) != (nb, d, d) or fb.dtype != x.dtype or fb.device != x.device:
            raise ValueError(f"{_NAME}: factor must match x in batch, d, dtype and device")
    out = torch.empty((nb, d, d), dtype=x.dtype, device=x.device)
    if nb == 0 or d == 0:
        return out if batched else out[0]

    fp64 = x.dtype == torch.float64
    block = block or _tiles.gram_block(x.dtype, d)
    steps = tile_steps(x.dtype, block, not _tiles.interpreted())
    block_m = block_m or max(steps)
    _tiles.check_gram_tiles(_NAME, x.dtype, block, block_m, steps)
    n_t = triton.cdiv(d, block)
    n_tiles = n_t * (n_t + 1) // 2
    programs = nb * n_tiles
    splits, rows_per_split = _tiles.plan_splits(_NAME, x.device, programs, m, block_m, split_m)

    decay, alpha = float(decay), float(alpha)
    scal, in_memory = _tiles.scalar_args(decay, alpha, x.device, out)
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
            HAS_FACTOR=fb is not None and splits == 1, SPLIT=splits > 1, ACC_FP64=fp64,
            BLOCK=block, BLOCK_M=block_m, SCALARS_IN_MEMORY=in_memory,
            num_warps=_tiles.gram_num_warps(block),
        )
        if splits > 1:
            _tiles.launch_split_reduce(fb, out, ws, scal, decay, alpha, d, n_tiles, splits,
                                       programs, fp64, block, in_memory)
    return out if batched else out[0]
