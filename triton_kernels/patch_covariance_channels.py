r"""Expand-mode patch covariance on the tensor cores: tiles of channels, loaded asynchronously.

The generic expand kernel (:mod:`.patch_covariance`) tiles the patch columns in the output's
order ``d = (c * kh + i) * kw + j``: neighbouring columns of a tile are neighbouring kernel
offsets, so a tile row is a gather of scattered scalars. No load is wider than one element, and
Triton does not pipeline loads narrower than 4 bytes (the asynchronous copy ``cp.async`` moves 4,
8 or 16): the tiles of the 16-bit inputs are gathered synchronously, and the kernel waits for its
loads, then computes (``bench/results/static_sm90.json``).

This kernel tiles the columns in the order ``e = (i * kw + j) * CP + c`` instead (``CP``: the
segment's channels rounded up to a whole number of tiles), so that one column tile is one kernel
tap ``(i, j)`` and ``BLOCK`` consecutive channels. The rows come from a channels-last input whose
segments start, step and (loaded) channel counts are multiples of 16, like its other strides
(:func:`aligned_channels`: ``x`` itself when it is so, else one copy, each segment padded with
zeros to 16 channels). The tile row of output position ``(n, oh, ow)`` is then ``BLOCK``
contiguous elements ``x[n, oh * sh + i * dh - pt, ow * sw + j * dw - pl, c0 : c0 + BLOCK]``,
16-byte aligned: Triton moves it in 16-byte asynchronous copies (16-bit inputs; 4-byte ones for
TF32, whose shared-memory layout it picks) and, ``NUM_STAGES`` deep, loads the next row steps
while the tensor cores (``wgmma`` on sm_90, ``mma.sync`` on sm_80) multiply the current one. The
padding and the rows past the range are the copies' zero fill (masked loads).

The row arithmetic is what bounded the gathering kernels on an H200 (instruction issue,
``bench/results/static_vs_h200.json``), so it is kept small: a row's ``(n, oh, ow)`` is divided
out once and then advanced by ``BLOCK_K`` rows per step with carries; its input offset is
computed once for both tiles, a tap adds one scalar, a bounds test is one unsigned comparison,
and every offset is int32 (the launcher checks that they fit). The product loop is 250 SASS
instructions per 64-row step on sm_90 (``bench/results/static_sm90.json``,
``sass_main_loop``).

Every unordered pair of column tiles is one program (:func:`~._tiles.upper_tile` over the
``T = kh kw CP / BLOCK (+ 1 with a bias)`` tiles). The epilogue maps the tile's columns back to the
output's order, ``d(e) = c * kh * kw + (i * kw + j)``, and writes ``alpha * acc`` to both
``(d_i, d_j)`` and ``(d_j, d_i)``: all entries of a tile pair with ``ti < tj`` (output indices of
two different tiles may come in either order), and on a diagonal pair those with ``d_i <= d_j``,
so every output entry is written by one accumulated value (exactly symmetric). With a bias, one
more tile holds the constant-1 column (its first column; the others are padding).

With a factor, or row ranges (when the tile programs cannot fill the GPU), the kernel writes
raw sums instead, mapped and mirrored the same way: to ``out`` itself for one range, else to a
``(S, segments, D, D)`` workspace; :func:`~._tiles.split_reduce_kernel` then sums the ranges in
order (deterministic, no atomics) and applies ``decay * F + alpha * sum``. Reading a factor
tile in this kernel's epilogue, beside the 128 x 128 accumulators, would spill registers.

Summation: every row step's products accumulate into one fp32 accumulator inside the
tensor-core instructions, as in a cuBLAS product (a second, two-level accumulator would not fit
in the registers beside the pipelined loads).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _tiles
from ._tiles import gram_dot, upper_tile

# Column tile, row step, pipeline depth and warps of the launch on a GPU: 128 x 128 fp32
# accumulators over 8 warps (64 registers a thread), and per stage two 64 x 128 16-bit input
# tiles (32 KiB; the same for TF32's row steps of 32): three stages fit in an SM's shared
# memory (one program per SM: the registers allow no second). The L2 traffic of the gathered
# tiles falls with the tile width (two BLOCK-wide tiles per BLOCK x BLOCK product), which is why
# the tile is 128. Segments of 64 to 127 channels (ResNet's first stage, the 64-channel
# diagonal blocks of a 256-channel layer) would leave half of such a tile padding: they take
# 64-wide tiles over 4 warps (NARROW_BLOCK; 16 KiB a stage, several programs per SM).
BLOCK = 128
NARROW_BLOCK = 64
STEPS = {torch.float16: 64, torch.bfloat16: 64, torch.float32: 32}
NUM_STAGES = 3
# Under the interpreter (CPU tensors, tests) smaller tiles keep the NumPy work small.
BLOCK_INTERPRETED = 16
STEP_INTERPRETED = 32
NUM_WARPS = {BLOCK: 8, NARROW_BLOCK: 4, BLOCK_INTERPRETED: 4}


@triton.jit
def _column_tile(t, CB, KK, KW, CSEG, CLOAD, DN, D, DIL_H, DIL_W, PAD_T, PAD_L, sxc,
                 BLOCK: tl.constexpr):
    """Column tile ``t``: int32 element offsets of its channels, its kernel offset ``(dy, dx)``
    relative to the top-left input position, which columns are loaded (the ``CLOAD`` channels
    of the input's segment: a multiple of 16, so that the mask is constant over every 16-byte
    copy; the ones past ``CSEG`` are the launcher's zeros), which is the bias column, and the
    output index of every column (``D``, out of range, past the ``CSEG`` data channels)."""
    lane = tl.arange(0, BLOCK)
    o = t // CB
    ch = (t - o * CB) * BLOCK + lane
    # per-lane comparisons against tile-dependent limits (no scalar-by-vector logic: the
    # interpreter widens such masks to integers)
    load = ch < tl.where(o < KK, CLOAD, 0)
    data = ch < tl.where(o < KK, CSEG, 0)
    bias = lane < tl.where(o == KK, 1, 0)
    ki = o // KW
    dy = ki * DIL_H - PAD_T
    dx = (o - ki * KW) * DIL_W - PAD_L
    d_out = tl.where(data, ch * KK + o, tl.where(bias, DN, D))
    return ch * sxc, dy, dx, load, bias, d_out


@triton.jit
def _load_tile(x_seg, row_off, y0, x0, row_ok, col_off, dy, dx, load, bias, H, W, sxh, sxw,
               HAS_BIAS: tl.constexpr):
    """``[BLOCK_K, BLOCK]`` tile: one masked load of contiguous channels per row (0 in the
    padding and past the row range), 1 in the bias column of the valid rows. ``row_off`` is
    the rows' int32 offset at the tile's top-left tap; the tap ``(dy, dx)`` adds one scalar,
    and each bounds test is one unsigned comparison."""
    inside = (row_ok & ((y0 + dy).to(tl.uint32) < H.to(tl.uint32))
              & ((x0 + dx).to(tl.uint32) < W.to(tl.uint32)))
    tap = dy * sxh + dx * sxw
    v = tl.load(x_seg + tap + row_off[:, None] + col_off[None, :],
                mask=inside[:, None] & load[None, :], other=0.0)
    if HAS_BIAS:
        v = tl.where(row_ok[:, None] & bias[None, :], 1.0, v).to(v.dtype)
    return v


@triton.jit
def _store_mirrored(o_base, acc, alpha, d_i, d_j, shift, D, soi, soj, SCALE: tl.constexpr):
    """``alpha * acc`` (``SCALE`` off: ``acc``) to ``(d_i, d_j)`` and ``(d_j, d_i)`` for every
    pair of output entries once: where ``d_i <= d_j + shift`` (``shift`` is ``D`` on an
    off-diagonal tile pair: all its entries). Offsets in int32 (the launcher checks that they
    fit)."""
    ii = d_i[:, None]
    jj = d_j[None, :]
    keep = (ii < D) & (jj < D) & (ii <= jj + shift)
    g = acc * alpha.to(acc.dtype) if SCALE else acc
    g = g.to(o_base.dtype.element_ty)
    tl.store(o_base + ii * soi + jj * soj, g, mask=keep)
    tl.store(o_base + jj * soi + ii * soj, g, mask=keep)


@triton.jit
def _pc_expand_channels_kernel(
        x_ptr, out_ptr, ws_ptr, scal_ptr, alpha: tl.float64,
        M, OUT_H, OUT_W, H, W, D, DN, CSEG, CLOAD, C_START, C_STEP, KK, KW, CB, N_TILES,
        ROWS_PER_SPLIT,
        sxn, sxc, sxh, sxw, STR_H, STR_W, DIL_H, DIL_W, PAD_T, PAD_L,
        sob, soi, soj, wss, wsb, wsi, wsj,
        HAS_BIAS: tl.constexpr, RAW: tl.constexpr,
        IEEE_DOT: tl.constexpr, WIDEN: tl.constexpr, BLOCK: tl.constexpr,
        BLOCK_K: tl.constexpr, SCALARS_IN_MEMORY: tl.constexpr):
    """One program per (segment, unordered pair of column tiles[, row range]); see the module
    docstring."""
    pid = tl.program_id(0)
    s = pid // N_TILES
    ti, tj = upper_tile(pid % N_TILES)
    split = tl.program_id(1)
    s64 = s.to(tl.int64)
    x_seg = x_ptr + (C_START + s64 * C_STEP) * sxc
    off_i, dy_i, dx_i, data_i, bias_i, d_i = _column_tile(
        ti, CB, KK, KW, CSEG, CLOAD, DN, D, DIL_H, DIL_W, PAD_T, PAD_L, sxc, BLOCK)
    off_j, dy_j, dx_j, data_j, bias_j, d_j = _column_tile(
        tj, CB, KK, KW, CSEG, CLOAD, DN, D, DIL_H, DIL_W, PAD_T, PAD_L, sxc, BLOCK)
    row_start = split * ROWS_PER_SPLIT
    row_end = tl.minimum(row_start + ROWS_PER_SPLIT, M)
    # Row r = (n, oh, ow): decomposed once, then advanced by BLOCK_K rows per step with carries
    # instead of divisions (at most one carry each: the step's remainder is below one image,
    # its row count below one row); all offsets int32 (the launcher checks that x's offsets
    # fit). Per copied row this leaves a few integer instructions beside the tensor-core work.
    lane = tl.arange(0, BLOCK_K)
    r = row_start + lane
    n = r // (OUT_H * OUT_W)
    p = r - n * (OUT_H * OUT_W)
    oh = p // OUT_W
    ow = p - oh * OUT_W
    step_n = BLOCK_K // (OUT_H * OUT_W)
    step_p = BLOCK_K - step_n * (OUT_H * OUT_W)
    step_oh = step_p // OUT_W
    step_ow = step_p - step_oh * OUT_W
    acc = tl.zeros((BLOCK, BLOCK), dtype=tl.float32)
    for k0 in range(row_start, row_end, BLOCK_K):
        row_ok = k0 + lane < row_end
        y0 = oh * STR_H
        x0 = ow * STR_W
        row_off = n * sxn + y0 * sxh + x0 * sxw
        a = _load_tile(x_seg, row_off, y0, x0, row_ok, off_i, dy_i, dx_i, data_i, bias_i, H,
                       W, sxh, sxw, HAS_BIAS)
        b = _load_tile(x_seg, row_off, y0, x0, row_ok, off_j, dy_j, dx_j, data_j, bias_j, H,
                       W, sxh, sxw, HAS_BIAS)
        acc = gram_dot(a, b, acc, IEEE_DOT, WIDEN)
        ow += step_ow
        carry = ow >= OUT_W
        ow = tl.where(carry, ow - OUT_W, ow)
        oh += step_oh + carry.to(tl.int32)
        carry = oh >= OUT_H
        oh = tl.where(carry, oh - OUT_H, oh)
        n += step_n + carry.to(tl.int32)
    # every unordered pair of output entries once: all of an off-diagonal tile pair, the upper
    # entries (in the output's order) of a diagonal one
    shift = tl.where(ti != tj, D, 0)
    if RAW:
        w_base = ws_ptr + split.to(tl.int64) * wss + s64 * wsb
        _store_mirrored(w_base, acc, alpha, d_i, d_j, shift, D, wsi, wsj, False)
    else:
        if SCALARS_IN_MEMORY:
            alpha = tl.load(scal_ptr + 1)  # [decay, alpha]
        _store_mirrored(out_ptr + s64 * sob, acc, alpha, d_i, d_j, shift, D, soi, soj, True)


def tiles(dtype: torch.dtype, interpreted: bool, channels: int) -> tuple[int, int]:
    """``(BLOCK, BLOCK_K)`` of a launch for segments of ``channels`` channels."""
    if interpreted:
        return BLOCK_INTERPRETED, STEP_INTERPRETED
    return (BLOCK if channels >= BLOCK else NARROW_BLOCK), STEPS[dtype]


def min_channels(interpreted: bool) -> int:
    """The fewest channels a segment needs for this kernel by default (its narrowest tile)."""
    return BLOCK_INTERPRETED if interpreted else NARROW_BLOCK


def int32_offsets(x: torch.Tensor, rows: int, d: int) -> bool:
    """Whether the kernel's int32 offsets hold: rows, output entries ``d * d`` and the input's
    elements (as copied channels-last with 16-channel padding, the larger case) below 2^31."""
    n, c, h, w = x.shape
    return rows < 2**31 and d * d < 2**31 and n * h * w * (c + 15 * c) < 2**31


def aligned_channels(x: torch.Tensor, num_segments: int, start: int, step: int,
                     channels: int) -> tuple[torch.Tensor, int, int, int]:
    """``(x', start', step', loaded)``: the segments' channels with unit stride and every row of
    a segment 16-element aligned (start, step, the loaded channel count ``loaded >= channels``,
    the other strides and the address multiples of 16), as the compiled kernel assumes
    (``launch_configs``). ``x`` itself when it is already so (a channels-last input with
    channel counts that are multiples of 16); otherwise one channels-last copy of the
    segments, each padded with zeros to a multiple of 16 channels."""
    def aligned(*values):
        return all(v % 16 == 0 for v in values)

    n, _, h, w = x.shape
    if (x.stride(1) == 1 and aligned(start, channels, x.stride(0), x.stride(2), x.stride(3),
                                     x.data_ptr() // x.element_size())
            and (num_segments == 1 or aligned(step))):
        return x, start, step, channels
    padded = -(-channels // 16) * 16
    make = torch.zeros if padded != channels else torch.empty
    buf = make((n, h, w, num_segments, padded), dtype=x.dtype, device=x.device)
    sn, sc, sh, sw = x.stride()
    segments = x.as_strided((n, h, w, num_segments, channels), (sn, sh, sw, step * sc, sc),
                            x.storage_offset() + start * sc)
    buf[..., :channels].copy_(segments)
    buf = buf.view(n, h, w, num_segments * padded)
    return buf.permute(0, 3, 1, 2), 0, padded, padded


def expand_channels(x, geometry, oh, ow, num_segments, segment_start, segment_step,
                    segment_channels, dn, d, bias, factor, decay, alpha, ieee, widen, splits,
                    name):
    """The expand-mode covariance by :func:`_pc_expand_channels_kernel` (a new fp32 tensor);
    the arguments as for ``patch_covariance_triton``."""
    kh, kw, sh, sw, dh, dw, pt, pl = geometry
    interpreted = _tiles.interpreted()
    x, first, step, loaded = aligned_channels(x, num_segments, segment_start, segment_step,
                                              segment_channels)
    n, _, h, w = x.shape
    out = torch.empty((num_segments, d, d), dtype=torch.float32, device=x.device)
    m = n * oh * ow
    block, block_k = tiles(x.dtype, interpreted, segment_channels)
    col_blocks = triton.cdiv(segment_channels, block)
    n_t = kh * kw * col_blocks + (1 if bias else 0)
    n_tiles = n_t * (n_t + 1) // 2
    programs = num_segments * n_tiles
    n_split, rows_per_split = _tiles.plan_splits(name, x.device, programs, m, block_k, splits)
    scal, in_memory = _tiles.scalar_args(decay, alpha, device=x.device, placeholder=out)
    # With a factor, or several row ranges, the kernel writes raw sums (to ``out`` itself for
    # one range) and the generic reduction pass applies ``decay * F + alpha * sum``: reading
    # a factor tile beside the accumulators would spill registers.
    raw = factor is not None or n_split > 1
    ws = out.unsqueeze(0) if n_split == 1 else torch.empty(
        (n_split, num_segments, d, d), dtype=torch.float32, device=x.device)
    _pc_expand_channels_kernel[(programs, n_split)](
        x, out, ws, scal, alpha,
        m, oh, ow, h, w, d, dn, segment_channels, loaded, first, step, kh * kw, kw,
        col_blocks, n_tiles, rows_per_split, *x.stride(), sh, sw, dh, dw, pt, pl,
        *out.stride(), *ws.stride(),
        HAS_BIAS=bias, RAW=raw, IEEE_DOT=ieee, WIDEN=widen, BLOCK=block, BLOCK_K=block_k,
        SCALARS_IN_MEMORY=in_memory, num_warps=NUM_WARPS[block],
        num_stages=NUM_STAGES,
    )
    if raw:
        # the raw sums are in the output's order: the generic reduction's tiles apply (with
        # one range it reads and writes ``out`` in place: each of its programs reads the
        # upper tile it writes, and the lower one it also writes is read by no program)
        out_block = _tiles.gram_block(torch.float32, d)
        out_t = triton.cdiv(d, out_block)
        out_tiles = out_t * (out_t + 1) // 2
        _tiles.launch_split_reduce(factor, out, ws, scal, decay, alpha, d, out_tiles, n_split,
                                   num_segments * out_tiles, False, out_block, in_memory)
    return out


# What Triton's run-time specialisation sees on the rows aligned_channels makes: a unit channel
# stride, and these parameters multiples of 16 (the out and workspace tensors are new).
_ALIGNED = ("x_ptr", "out_ptr", "ws_ptr", "CLOAD", "C_START", "C_STEP", "sxn", "sxh", "sxw")
_TYPES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


def launch_configs():
    """Every configuration a launch on a GPU can pick: per input dtype (fp32 on TF32 only) and
    tile width, with a bias tile or not, writing the result or raw sums; the rows aligned as
    :func:`aligned_channels` makes them."""
    from ._aot import KernelConfig

    return [KernelConfig(_pc_expand_channels_kernel,
                         dict(HAS_BIAS=has_bias, RAW=raw, IEEE_DOT=False, WIDEN=False,
                              BLOCK=block, BLOCK_K=STEPS[dtype], SCALARS_IN_MEMORY=False),
                         pointers={"x_ptr": t, "out_ptr": "fp32", "ws_ptr": "fp32",
                                   "scal_ptr": "fp32"},
                         num_warps=NUM_WARPS[block], num_stages=NUM_STAGES, ones=("sxc",),
                         aligned=_ALIGNED)
            for block in (BLOCK, NARROW_BLOCK) for dtype, t in _TYPES.items()
            for has_bias in (False, True) for raw in (False, True)]
