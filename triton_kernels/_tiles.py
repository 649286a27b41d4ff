r"""Tile pieces shared by the Triton kernels.

Gram kernels (``symmetric_factor_update``, ``patch_covariance``): an output ``F'`` is symmetric,
so only its upper triangle of ``BLOCK x BLOCK`` tiles is computed. With ``T`` tiles per side
there are ``T (T + 1) / 2`` upper tiles ``(ti, tj)``, ``ti <= tj``, numbered column by column::

    k = tj (tj + 1) / 2 + ti,      tj = floor((sqrt(8 k + 1) - 1) / 2)

(:func:`upper_tile`; the floating-point square root is corrected by one step either way, which
makes the inverse map exact for any tile count a launch can have). :func:`epilogue_store` writes
``decay * F + alpha * acc`` for the upper entries of a tile to ``(i, j)`` and, with ``F[j, i]``,
to ``(j, i)``: every output entry comes from one accumulated value, so the result is exactly
symmetric whenever ``F`` is, and it follows the definition for any ``F``.

When the tile programs cannot fill a GPU and there are many rows, the rows are split into ranges
(:func:`plan_splits`): each range's partial tile goes to a workspace ``(S, B, D, D)``
(:func:`store_partial`) and :func:`split_reduce_kernel` sums the ``S`` partials in a fixed order
before the same epilogue (deterministic, no atomics).

``decay`` and ``alpha`` are fp64 kernel arguments on a GPU; the interpreter narrows float
arguments to fp32, so under it they travel in a small fp64 tensor (:func:`scalar_args`,
``SCALARS_IN_MEMORY``).

SINGD block kernels: every diagonal block of a factor is a ``B x B`` slot of a packed
``(blocks, B, B)`` tensor, processed as one ``BLOCK x BLOCK`` tile (:func:`slot_tile`,
:func:`load_slot`).
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

# Axis 0 of a CUDA grid holds up to 2^31 - 1 programs, axes 1 and 2 up to 65535.
MAX_GRID_X = 2**31 - 1
MAX_GRID_Y = 65535


# ------------------------------------------------------------------------------- Gram tiles

@triton.jit
def upper_tile(pid):
    """Linear index -> upper-triangle tile ``(ti, tj)``, ``ti <= tj``, numbered column by column
    (``pid = tj (tj + 1) / 2 + ti``)."""
    kf = pid.to(tl.float32)
    tj = ((tl.sqrt(8.0 * kf + 1.0) - 1.0) * 0.5).to(tl.int32)
    # one correction step either way makes the float estimate exact
    tj = tl.where(tj * (tj + 1) // 2 > pid, tj - 1, tj)
    tj = tl.where((tj + 1) * (tj + 2) // 2 <= pid, tj + 1, tj)
    ti = pid - tj * (tj + 1) // 2
    return ti, tj


@triton.jit
def gram_dot(a, b, acc, IEEE_DOT: tl.constexpr, WIDEN: tl.constexpr):
    """``acc + a^T b`` for ``[step, BLOCK]`` tiles: full-fp32 products (``IEEE_DOT``, the
    16-bit tiles widened first with ``WIDEN``) or the tensor cores' (TF32 for fp32)."""
    if IEEE_DOT:
        if WIDEN:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        return tl.dot(tl.trans(a), b, acc, input_precision="ieee")
    return tl.dot(tl.trans(a), b, acc)


@triton.jit
def epilogue_store(acc, f_base, o_base, decay, alpha, offs_i, offs_j, D, sfi, sfj, soi, soj,
                   HAS_FACTOR: tl.constexpr):
    """For the upper entries (i <= j) of the tile: ``out[i, j] = decay * F[i, j] + alpha * acc``
    and ``out[j, i] = decay * F[j, i] + alpha * acc`` (the same value whenever F is symmetric)."""
    mask_ij = (offs_i < D)[:, None] & (offs_j < D)[None, :]
    upper = mask_ij & (offs_i[:, None] <= offs_j[None, :])
    ii = offs_i.to(tl.int64)
    jj = offs_j.to(tl.int64)
    g = acc * alpha.to(acc.dtype)
    if HAS_FACTOR:
        f = tl.load(f_base + ii[:, None] * sfi + jj[None, :] * sfj, mask=upper, other=0.0)
        f_t = tl.load(f_base + jj[None, :] * sfi + ii[:, None] * sfj, mask=upper, other=0.0)
        out = f.to(acc.dtype) * decay.to(acc.dtype) + g
        out_t = f_t.to(acc.dtype) * decay.to(acc.dtype) + g
    else:
        out = g
        out_t = g
    tl.store(o_base + ii[:, None] * soi + jj[None, :] * soj, out.to(o_base.dtype.element_ty),
             mask=upper)
    tl.store(o_base + jj[None, :] * soi + ii[:, None] * soj, out_t.to(o_base.dtype.element_ty),
             mask=upper)


@triton.jit
def store_partial(acc, ws_ptr, split, b64, offs_i, offs_j, D, wss, wsb, wsi, wsj):
    """The partial tile of row range ``split`` and factor/segment ``b64`` into the workspace."""
    mask_ij = (offs_i < D)[:, None] & (offs_j < D)[None, :]
    w_base = ws_ptr + split.to(tl.int64) * wss + b64 * wsb
    tl.store(w_base + offs_i.to(tl.int64)[:, None] * wsi + offs_j.to(tl.int64)[None, :] * wsj,
             acc, mask=mask_ij)


@triton.jit
def split_reduce_kernel(f_ptr, out_ptr, ws_ptr, scal_ptr, decay: tl.float64, alpha: tl.float64,
                        D, N_TILES, N_SPLIT,
                        sfb, sfi, sfj, sob, soi, soj, wss, wsb, wsi, wsj,
                        HAS_FACTOR: tl.constexpr, ACC_FP64: tl.constexpr, BLOCK: tl.constexpr,
                        SCALARS_IN_MEMORY: tl.constexpr):
    """Sum the row ranges' partial tiles of one (factor, upper tile) in order, then the
    epilogue."""
    pid = tl.program_id(0)
    b = pid // N_TILES
    ti, tj = upper_tile(pid % N_TILES)
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
    for k in range(0, N_SPLIT):
        acc += tl.load(w_tile + k * wss, mask=mask_ij, other=0.0)
    if SCALARS_IN_MEMORY:
        decay = tl.load(scal_ptr)
        alpha = tl.load(scal_ptr + 1)
    epilogue_store(acc, f_ptr + b64 * sfb, out_ptr + b64 * sob, decay, alpha, offs_i, offs_j,
                   D, sfi, sfj, soi, soj, HAS_FACTOR)


def interpreted() -> bool:
    """Whether the kernels run under the Triton interpreter (``TRITON_INTERPRET=1``)."""
    return isinstance(split_reduce_kernel, InterpretedFunction)


# Tiles a Gram launcher can pick: BLOCK from the factor size (float32 uses tl.dot, so every
# dimension is at least 16). The row step is each kernel's (``tile_steps`` in its module): on a
# GPU the one that keeps its tiles in registers at that BLOCK (bench/results/static_sm*.json);
# under the interpreter, on CPU tensors, each step is one NumPy operation, so there a larger
# step is cheaper and allowed too.
GRAM_BLOCKS = {torch.float32: (16, 32, 64), torch.float64: (16, 32)}
GRAM_STEP_INTERPRETED = 32


def accumulation(dtype: torch.dtype) -> torch.dtype:
    """fp64 for fp64 inputs, fp32 for fp32, fp16 and bf16."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def gram_block(dtype: torch.dtype, d: int) -> int:
    """The smallest listed tile covering ``d`` (the largest above it)."""
    sizes = GRAM_BLOCKS[accumulation(dtype)]
    return next((b for b in sizes if b >= d), sizes[-1])


def gram_num_warps(block: int) -> int:
    """Eight warps at 64 x 64 tiles (four spill there, on sm_80 most), four below."""
    return 8 if block >= 64 else 4


def row_steps(gpu_step: int, on_gpu: bool) -> tuple[int, ...]:
    """The row steps a launch can use: the GPU one, and under the interpreter its own too (the
    default there, being the larger)."""
    return (gpu_step,) if on_gpu else tuple(sorted({gpu_step, GRAM_STEP_INTERPRETED}))


def check_gram_tiles(name: str, dtype: torch.dtype, block: int, step: int,
                     steps: tuple[int, ...]) -> None:
    """Tile overrides must be sizes a launch picks anyway: those are the ones compiled ahead of
    time and checked for register spills (``bench/triton_static.py``)."""
    blocks = GRAM_BLOCKS[accumulation(dtype)]
    if block not in blocks or step not in steps:
        raise ValueError(f"{name}: {dtype} tiles are block in {blocks} and, at block {block}, "
                         f"row step in {steps}, got {block} and {step}")


def num_splits(device: torch.device, programs: int, m: int, step: int) -> int:
    """How many row ranges to use so that ``programs * S`` roughly fills a GPU (1 on CPU)."""
    if device.type != "cuda" or m <= 0:
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    if programs >= sms:
        return 1
    want = math.ceil(2 * sms / programs)
    # keep every range at least 8 steps long so the workspace pass stays cheap
    most = max(1, m // (8 * step))
    return max(1, min(want, most, MAX_GRID_Y))


def plan_splits(name: str, device: torch.device, programs: int, m: int, step: int,
                splits: int | None) -> tuple[int, int]:
    """``(S, rows_per_range)`` for ``m`` rows: ``splits`` if given (clipped to what the rows and
    the grid allow), else :func:`num_splits`; every range a whole number of steps."""
    if programs > MAX_GRID_X:
        raise ValueError(f"{name}: {programs} (factor, tile) programs, more than one launch "
                         f"holds ({MAX_GRID_X})")
    s = splits if splits is not None else num_splits(device, programs, m, step)
    s = max(1, min(int(s), max(1, triton.cdiv(m, step)), MAX_GRID_Y))
    return s, triton.cdiv(max(m, 1), s * step) * step


def scalar_args(*values: float, device: torch.device, placeholder: torch.Tensor):
    """``(scal, in_memory)``: under the interpreter (which narrows float arguments to fp32 whatever
    their annotation) the scalars travel in a host fp64 tensor; on a GPU they are fp64 kernel
    arguments and ``placeholder`` (never read) stands in for the tensor: no tensor is made."""
    if interpreted():
        return torch.tensor([float(v) for v in values], dtype=torch.float64, device=device), True
    return placeholder, False


@triton.jit
def three_scalars(s_ptr, a, b, c, dtype: tl.constexpr, IN_MEMORY: tl.constexpr):
    """The fp64 scalar arguments ``a, b, c`` (under the interpreter ``s_ptr[0:3]``, see
    :func:`scalar_args`), each rounded once to ``dtype``."""
    if IN_MEMORY:
        a = tl.load(s_ptr)
        b = tl.load(s_ptr + 1)
        c = tl.load(s_ptr + 2)
    return a.to(dtype), b.to(dtype), c.to(dtype)


# Per-call metadata (block sizes, offsets, the layer of every slot) kept on the device by value:
# a layer set's layout is the same at every step, so only its first call copies it to the
# device. Bounded: beyond _CACHE_LIMIT distinct layouts a call makes its own tensor.
_CACHE_LIMIT = 4096
_int64_cache: dict = {}
_workspace_cache: dict = {}


def cached_int64(values, device: torch.device, kind: str = "values", build=None) -> torch.Tensor:
    """The int64 tensor of ``build(values)`` (default: ``values`` itself) on ``device``, made once
    per (device, kind, values); ``values`` is a sequence of ints."""
    key = (torch.device(device), kind, tuple(int(v) for v in values))
    out = _int64_cache.get(key)
    if out is None:
        data = list(build(key[2]) if build is not None else key[2])
        out = torch.tensor(data, dtype=torch.int64, device=device)
        if len(_int64_cache) < _CACHE_LIMIT:
            _int64_cache[key] = out
    return out


def cached_workspace(numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A scratch tensor of ``numel`` elements, one per (device, stream, dtype, size): the kernels
    on one stream run in order, so consecutive calls can share it (its contents are undefined)."""
    device = torch.device(device)
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else None
    key = (device, stream, dtype, int(numel))
    out = _workspace_cache.get(key)
    if out is None:
        out = torch.empty(int(numel), dtype=dtype, device=device)
        if len(_workspace_cache) < _CACHE_LIMIT:
            _workspace_cache[key] = out
    return out


def split_reduce_configs():
    """The configurations of :func:`split_reduce_kernel` (fp32 / fp64 workspaces, every tile,
    with a factor or not)."""
    from ._aot import KernelConfig

    return [KernelConfig(split_reduce_kernel,
                         dict(HAS_FACTOR=has_factor, ACC_FP64=dtype == torch.float64,
                              BLOCK=block, SCALARS_IN_MEMORY=False),
                         pointers={n: t for n in ("f_ptr", "out_ptr", "ws_ptr", "scal_ptr")},
                         num_warps=gram_num_warps(block))
            for dtype, t in ((torch.float32, "fp32"), (torch.float64, "fp64"))
            for block in GRAM_BLOCKS[dtype] for has_factor in (False, True)]


def launch_split_reduce(factor, out, ws, scal, decay, alpha, d, n_tiles, splits, programs,
                        fp64, block, in_memory):
    """Second pass of a row-split Gram launch: ``out = decay * factor + alpha * sum(ws)``."""
    f_arg = factor if factor is not None else out  # never read without HAS_FACTOR
    f_strides = factor.stride() if factor is not None else (0, 0, 0)
    split_reduce_kernel[(programs,)](
        f_arg, out, ws, scal, decay, alpha, d, n_tiles, splits,
        *f_strides, *out.stride(), *ws.stride(),
        HAS_FACTOR=factor is not None, ACC_FP64=fp64, BLOCK=block,
        SCALARS_IN_MEMORY=in_memory, num_warps=gram_num_warps(block),
    )


# ------------------------------------------------------------------------- SINGD block slots

def slot_tile(b: int) -> int:
    """The tile holding a ``b x b`` slot: a power of two, at least 16 (``tl.dot``'s minimum)."""
    return max(16, triton.next_power_of_2(b))


@triton.jit
def load_slot(ptr, j, n, B, BLOCK: tl.constexpr):
    """Slot ``j`` of a packed ``(blocks, B, B)`` tensor as a ``BLOCK x BLOCK`` tile, its used
    ``n x n`` corner loaded (0 elsewhere), and that corner's mask."""
    r = tl.arange(0, BLOCK)[:, None]
    c = tl.arange(0, BLOCK)[None, :]
    mask = (r < n) & (c < n)
    # int64: j * B * B passes 2^31 on a large packed tensor (j may be a plain int in a loop)
    return tl.load(ptr + tl.cast(j, tl.int64) * B * B + r * B + c, mask=mask, other=0.0), mask
