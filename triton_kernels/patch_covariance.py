r"""Triton kernels for the patch covariance (the ``A`` factor of a convolution) without im2col.

Definition (``csrc/include/patch_covariance.h``): ``x`` is ``(N, C, H, W)``; the patch of example
``n`` at output position ``(oh, ow)`` and channel segment ``s`` has coordinates ``(c, i, j)``,
flattened as ``d = (c * kh + i) * kw + j``, with value
``x[n, c0(s) + c, oh * sh + i * dh - pad_top, ow * sw + j * dw - pad_left]`` (0 in the padding),
``c0(s) = segment_start + s * segment_step``; with ``bias`` a last coordinate equal to 1 is
appended (``D = segment_channels * kh * kw + bias``). For every segment::

    expand:  out[s] = decay * factor[s] + alpha * sum_{n, oh, ow} a a^T
    reduce:  out[s] = decay * factor[s] + alpha * sum_n abar_n abar_n^T     (abar_n: mean patch)

Expand: implicit im2col
-----------------------
The patch matrix (rows ``r = (n, oh, ow)``, ``N * out_h * out_w`` of them; columns ``d``) is
never stored. One program per (segment, upper-triangular output tile ``ti <= tj``) — a linear
program index is mapped to ``(ti, tj)`` so no program is spent on the lower triangle — walks the
rows in ``BLOCK_K`` steps. For a step it computes the row coordinates (``n, oh, ow`` -> a row
offset and the top-left input position) and, once per program, the column coordinates
(``c, i, j`` -> a column offset and the kernel offset), so the ``[BLOCK_K, BLOCK]`` tile of patches
is one masked gather from ``x`` (any strides; masked elements, the padding, read as 0). The two
tiles' product is accumulated:

* float32: ``tl.dot(tl.trans(a), b, input_precision="ieee")``, fp32 accumulation; on CUDA
  tensors with TF32 allowed for ``torch.matmul`` (``torch.backends.cuda.matmul.allow_tf32``,
  or ``fp32_precision = "tf32"``), the same rule as ``torch.matmul``, ``input_precision="tf32"``
  (tensor cores);
* float16 / bfloat16: the 16-bit tiles go to ``tl.dot`` directly (tensor cores), fp32 accumulation
  (under the interpreter, whose ``tl.dot`` mishandles bfloat16, bfloat16 tiles are widened to fp32
  first: the same exact products);
* float64: a sum of outer products in fp64 (``tl.dot`` has no portable fp64 path).

Every ``CHUNK`` steps the chunk's sum is added to the running total (two-level summation). The
epilogue computes ``g = alpha * acc`` once for each upper-triangle entry of the tile and writes
``decay * factor[i, j] + g`` to ``(i, j)`` and ``decay * factor[j, i] + g`` to ``(j, i)``, so the
result is exactly symmetric whenever the factor is.
When the tile programs cannot fill a GPU and there are many rows, the rows are split into ranges
whose partial tiles go to a workspace and are summed in a fixed order by a second kernel
(deterministic, no atomics).

Reduce
------
:mod:`.patch_covariance_reduce`: a first kernel writes the mean patches ``abar`` into an
``(N, S, D)`` buffer (the bias coordinate set to 1), reading each input element once (a window
sum is a product of the plane with 0/1 row and column indicators); ``decay * factor + alpha *
X^T X`` is then the symmetric factor update kernel on the buffer viewed as ``(S, N, D)``.

``decay`` and ``alpha`` are fp64 kernel arguments on a GPU; the interpreter narrows float
arguments to fp32, so there they are read from a small fp64 tensor instead. Under
``TRITON_INTERPRET=1`` the kernels run on CPU tensors (slowly: keep shapes small).
"""
from __future__ import annotations

import contextlib
import itertools

import torch
import triton
import triton.language as tl

from . import _tiles
from ._tiles import epilogue_store, gram_dot, store_partial, upper_tile
from .patch_covariance_channels import expand_channels
from .patch_covariance_channels import launch_configs as channels_configs
from .patch_covariance_channels import int32_offsets
from .patch_covariance_channels import min_channels as channels_min
from .patch_covariance_reduce import launch_configs as reduce_configs
from .patch_covariance_reduce import reduce_patch_covariance

__all__ = ["patch_covariance_triton", "launch_configs"]

_NAME = "patch_covariance_triton"
_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


@triton.jit
def _columns(offs_d, DN, KH, KW, DIL_H, DIL_W, PAD_T, PAD_L, sxc, sxh, sxw):
    """Column coordinates of patch columns ``offs_d``: element offset (relative to the segment's
    first channel), kernel offsets ``(dy, dx)`` relative to the top-left input position, and
    whether the column is a data column (``d < DN``)."""
    kk = KH * KW
    ch = offs_d // kk
    rem = offs_d - ch * kk
    ki = rem // KW
    kj = rem - ki * KW
    dy = ki * DIL_H - PAD_T
    dx = kj * DIL_W - PAD_L
    off = ch.to(tl.int64) * sxc + dy.to(tl.int64) * sxh + dx.to(tl.int64) * sxw
    return off, dy, dx, offs_d < DN


@triton.jit
def _gather(x_seg, row_off, y0, x0, row_ok, col_off, dy, dx, col_data, col_bias, H, W):
    """``[BLOCK_K, BLOCK]`` tile of patches: masked gather (0 in the padding and past the row
    range), 1 in the bias column of the valid rows."""
    y = y0[:, None] + dy[None, :]
    xx = x0[:, None] + dx[None, :]
    mask = (row_ok[:, None] & col_data[None, :] & (y >= 0) & (y < H) & (xx >= 0) & (xx < W))
    v = tl.load(x_seg + row_off[:, None] + col_off[None, :], mask=mask, other=0.0)
    v = tl.where(row_ok[:, None] & col_bias[None, :], 1.0, v)
    return v.to(x_seg.dtype.element_ty)


@triton.jit
def _pc_expand_kernel(x_ptr, f_ptr, out_ptr, ws_ptr, scal_ptr, decay: tl.float64,
                      alpha: tl.float64,
                      M, R, OUT_W, H, W, D, DN, C_START, C_STEP, N_TILES, ROWS_PER_SPLIT,
                      sxn, sxc, sxh, sxw, KH, KW, STR_H, STR_W, DIL_H, DIL_W, PAD_T, PAD_L,
                      sfb, sfi, sfj, sob, soi, soj, wss, wsb, wsi, wsj,
                      HAS_FACTOR: tl.constexpr, SPLIT: tl.constexpr,
                      ACC_FP64: tl.constexpr, IEEE_DOT: tl.constexpr, WIDEN: tl.constexpr,
                      BLOCK: tl.constexpr, BLOCK_K: tl.constexpr, CHUNK: tl.constexpr,
                      SCALARS_IN_MEMORY: tl.constexpr):
    """One program per (segment, upper tile[, row range]); see the module docstring."""
    pid = tl.program_id(0)
    s = pid // N_TILES
    ti, tj = upper_tile(pid % N_TILES)
    split = tl.program_id(1)
    offs_i = ti * BLOCK + tl.arange(0, BLOCK)
    offs_j = tj * BLOCK + tl.arange(0, BLOCK)
    s64 = s.to(tl.int64)
    x_seg = x_ptr + (C_START + s64 * C_STEP) * sxc
    off_i, dy_i, dx_i, data_i = _columns(offs_i, DN, KH, KW, DIL_H, DIL_W, PAD_T, PAD_L,
                                         sxc, sxh, sxw)
    off_j, dy_j, dx_j, data_j = _columns(offs_j, DN, KH, KW, DIL_H, DIL_W, PAD_T, PAD_L,
                                         sxc, sxh, sxw)
    # the bias column is d = DN, present when D = DN + 1
    bias_i = (offs_i == DN) & (offs_i < D)
    bias_j = (offs_j == DN) & (offs_j < D)
    row_start = split.to(tl.int64) * ROWS_PER_SPLIT
    row_end = tl.minimum(row_start + ROWS_PER_SPLIT, M)
    if ACC_FP64:
        acc = tl.zeros((BLOCK, BLOCK), dtype=tl.float64)
    else:
        acc = tl.zeros((BLOCK, BLOCK), dtype=tl.float32)
    for c0 in range(row_start, row_end, BLOCK_K * CHUNK):
        c_end = tl.minimum(c0 + BLOCK_K * CHUNK, row_end)
        if ACC_FP64:
            part = tl.zeros((BLOCK, BLOCK), dtype=tl.float64)
        else:
            part = tl.zeros((BLOCK, BLOCK), dtype=tl.float32)
        for k0 in range(c0, c_end, BLOCK_K):
            r = k0 + tl.arange(0, BLOCK_K).to(tl.int64)
            row_ok = r < c_end
            n = r // R
            p = r - n * R
            oh = p // OUT_W
            ow = p - oh * OUT_W
            y0 = (oh * STR_H).to(tl.int32)
            x0 = (ow * STR_W).to(tl.int32)
            row_off = n * sxn + y0.to(tl.int64) * sxh + x0.to(tl.int64) * sxw
            a = _gather(x_seg, row_off, y0, x0, row_ok, off_i, dy_i, dx_i, data_i, bias_i, H, W)
            b = _gather(x_seg, row_off, y0, x0, row_ok, off_j, dy_j, dx_j, data_j, bias_j, H, W)
            if ACC_FP64:
                part += tl.sum(a[:, :, None] * b[:, None, :], axis=0)
            else:
                part = gram_dot(a, b, part, IEEE_DOT, WIDEN)
        acc += part
    if SPLIT:
        store_partial(acc, ws_ptr, split, s64, offs_i, offs_j, D, wss, wsb, wsi, wsj)
    else:
        if SCALARS_IN_MEMORY:
            decay = tl.load(scal_ptr)
            alpha = tl.load(scal_ptr + 1)
        epilogue_store(acc, f_ptr + s64 * sfb, out_ptr + s64 * sob, decay, alpha, offs_i, offs_j,
                       D, sfi, sfj, soi, soj, HAS_FACTOR)


# Steps of the expand kernel summed before they join the running total (two-level summation).
_CHUNK = 8
_TYPES = {torch.float32: "fp32", torch.float64: "fp64", torch.float16: "fp16",
          torch.bfloat16: "bf16"}


def tf32_allowed() -> bool:
    """Whether ``torch.matmul`` may use TF32 for fp32 CUDA tensors."""
    matmul = torch.backends.cuda.matmul
    try:
        return bool(matmul.allow_tf32)
    except RuntimeError:  # the legacy and the new switch were both set: the new one decides
        return getattr(matmul, "fp32_precision", "ieee") == "tf32"


def _dot_mode(dtype: torch.dtype, interpreted: bool, tf32: bool = False) -> tuple[bool, bool]:
    """``(IEEE_DOT, WIDEN)``: full-fp32 products for fp32 unless ``tf32`` (then the tensor
    cores' TF32, ``tl.dot``'s default); 16-bit tiles straight to the tensor cores, except
    bfloat16 under the interpreter, whose ``tl.dot`` mishandles it."""
    widen = interpreted and dtype == torch.bfloat16
    return (dtype == torch.float32 and not tf32) or widen, widen


def tile_steps(dtype: torch.dtype, block: int, on_gpu: bool) -> tuple[int, ...]:
    """Row steps a launch can use at ``block`` (the default is the largest). The gathered
    ``step x block`` tiles and their int64 addresses share the registers with the accumulators:
    16 rows for fp32 (whose full-precision products run on the FMA units, operands in
    registers) and for 16-bit inputs at 64 x 64 tiles, 32 otherwise; 8 in fp64 (whose product
    slab is ``block x 8 x block``)."""
    if dtype == torch.float64:
        return _tiles.row_steps(8, on_gpu)
    return _tiles.row_steps(16 if dtype == torch.float32 or block >= 64 else 32, on_gpu)


def launch_configs():
    """Every configuration a launch on a GPU can pick: per input dtype, each tile (defaults and
    overrides) of the expand kernel at its row step, with a factor or not, or a row range
    writing its partial tile; the channels kernel's (:mod:`.patch_covariance_channels`); the
    mean kernel of the reduce mode (:mod:`.patch_covariance_reduce`, whose Gram is
    ``symmetric_factor_update``'s kernel)."""
    from ._aot import KernelConfig

    out = []
    for dtype, t in _TYPES.items():
        acc = _tiles.accumulation(dtype)
        ptrs = {"x_ptr": t}
        ptrs.update({n: _TYPES[acc] for n in ("f_ptr", "out_ptr", "ws_ptr", "scal_ptr")})
        modes = {_dot_mode(dtype, False, tf32) for tf32 in (False, True)}
        for block in _tiles.GRAM_BLOCKS[acc]:
            for step in tile_steps(dtype, block, on_gpu=True):
                for (ieee, widen), (has_factor, split) in itertools.product(
                        sorted(modes, reverse=True),
                        ((False, False), (True, False), (False, True))):
                    out.append(KernelConfig(_pc_expand_kernel, dict(
                        HAS_FACTOR=has_factor, SPLIT=split, ACC_FP64=acc == torch.float64,
                        IEEE_DOT=ieee, WIDEN=widen, BLOCK=block, BLOCK_K=step, CHUNK=_CHUNK,
                        SCALARS_IN_MEMORY=False), pointers=ptrs,
                        num_warps=_tiles.gram_num_warps(block)))
    return (out + reduce_configs(_TYPES) + channels_configs()
            + _tiles.split_reduce_configs())


def _pair(name: str, value) -> tuple[int, int]:
    try:
        a, b = (int(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"{_NAME}: {name} must be 2 ints (height, width), got {value!r}") from None
    return a, b


def patch_covariance_triton(x: torch.Tensor, kernel_size, stride, dilation, padding, out_size,
                            num_segments: int, segment_start: int, segment_step: int,
                            segment_channels: int, reduce: bool, bias: bool,
                            factor: torch.Tensor | None, decay: float, alpha: float, *,
                            block: int | None = None, block_k: int | None = None,
                            splits: int | None = None, kernel: str | None = None) -> torch.Tensor:
    """The patch covariance of ``x`` computed by the Triton kernels (a new tensor).

    The arguments mean what they mean for ``torch.ops.kfac_kernels.patch_covariance`` (see the
    module docstring and ``csrc/include/patch_covariance.h``):

    Args:
        x: ``(N, C, H, W)`` float32, float64, float16 or bfloat16, any strides, on CUDA or (under
            ``TRITON_INTERPRET=1``) on the CPU.
        kernel_size, stride, dilation: ``(height, width)`` ints.
        padding: ``(pad_top, pad_left)``; the padding after the input is implied by ``out_size``.
        out_size: ``(out_h, out_w)``, the convolution's output size.
        num_segments, segment_start, segment_step, segment_channels: segment ``s`` covers the
            channels ``[segment_start + s * segment_step, ... + segment_channels)``.
        reduce: ``False`` (expand: sum over every patch) or ``True`` (reduce: sum over examples
            of the mean patches).
        bias: append a constant-1 coordinate to every patch.
        factor: ``(num_segments, D, D)`` of the accumulation dtype, any strides, or ``None``
            (zeros; ``decay`` unused).
        decay, alpha: Python numbers.
        block, block_k: tile sizes (for tests and tuning), among those a launch can pick anyway
            (``_tiles.GRAM_BLOCKS``, :func:`tile_steps`).
        splits: number of row ranges of the expand kernel (default: chosen from the GPU's SM
            count, 1 on the CPU).
        kernel: the expand kernel, ``"channels"`` (:mod:`.patch_covariance_channels`: tiles of
            contiguous channels, asynchronous loads) or ``"generic"``; by default the channels
            kernel where the products run on the tensor cores (16-bit inputs; fp32 with TF32
            allowed), a segment has at least the narrowest channel tile of channels (64 on a GPU:
            64-wide tiles up to 127 channels, 128-wide from there) and no
            tile override is given; the generic one otherwise (and always for fp64).

    Returns:
        ``(num_segments, D, D)``, contiguous, float64 for a float64 ``x`` and float32 otherwise;
        exactly symmetric when ``factor`` is (or is ``None``).
    """
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        raise ValueError(f"{_NAME}: x must be a 4-D (N, C, H, W) tensor, got "
                         f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
    if x.dtype not in _DTYPES:
        raise TypeError(f"{_NAME}: x must be float32, float64, float16 or bfloat16, got {x.dtype}")
    kh, kw = _pair("kernel_size", kernel_size)
    sh, sw = _pair("stride", stride)
    dh, dw = _pair("dilation", dilation)
    pt, pl = _pair("padding", padding)
    oh, ow = _pair("out_size", out_size)
    if min(kh, kw, sh, sw, dh, dw, oh, ow) < 1 or min(pt, pl) < 0:
        raise ValueError(f"{_NAME}: kernel_size, stride, dilation and out_size must be positive "
                         f"and padding non-negative")
    n, c, h, w = x.shape
    num_segments, segment_start = int(num_segments), int(segment_start)
    segment_step, segment_channels = int(segment_step), int(segment_channels)
    if num_segments < 1 or segment_channels < 1 or segment_start < 0 or segment_step < 0:
        raise ValueError(f"{_NAME}: num_segments and segment_channels must be positive, "
                         f"segment_start and segment_step non-negative")
    if segment_start + (num_segments - 1) * segment_step + segment_channels > c:
        raise ValueError(f"{_NAME}: the segments do not fit in the {c} channels of x")
    reduce, bias = bool(reduce), bool(bias)
    acc_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    dn = segment_channels * kh * kw
    d = dn + (1 if bias else 0)
    if factor is not None:
        if (tuple(factor.shape) != (num_segments, d, d) or factor.dtype != acc_dtype
                or factor.device != x.device):
            raise ValueError(f"{_NAME}: factor must be a ({num_segments}, {d}, {d}) {acc_dtype} "
                             f"tensor on {x.device}, got {tuple(factor.shape)} {factor.dtype} "
                             f"on {factor.device}")
    decay, alpha = float(decay), float(alpha)
    geometry = (kh, kw, sh, sw, dh, dw, pt, pl)
    guard = torch.cuda.device(x.device) if x.device.type == "cuda" else contextlib.nullcontext()
    with guard:
        if kernel not in (None, "channels", "generic"):
            raise ValueError(f"{_NAME}: kernel must be 'channels' or 'generic', got {kernel!r}")
        if reduce:
            return reduce_patch_covariance(x, geometry, oh, ow, num_segments, segment_start,
                                           segment_step, segment_channels, d, factor, decay,
                                           alpha, acc_dtype, _NAME)
        interpreted = _tiles.interpreted()
        ieee, widen = _dot_mode(x.dtype, interpreted, x.is_cuda and tf32_allowed())
        if kernel is None:
            tensor_cores = x.dtype in (torch.float16, torch.bfloat16) or not ieee
            # the channels kernel's offsets are int32 (rows, input, output), and its tiles
            # are a channel-tile wide: narrower segments would leave them mostly padding
            fits = int32_offsets(x, n * oh * ow, d)
            wide = segment_channels >= channels_min(interpreted)
            kernel = ("channels" if tensor_cores and fits and wide and block is None
                      and block_k is None else "generic")
        if kernel == "channels":
            if (x.dtype == torch.float64 or block is not None or block_k is not None
                    or not int32_offsets(x, n * oh * ow, d)):
                raise ValueError(f"{_NAME}: the channels kernel takes float32, float16 or "
                                 f"bfloat16 inputs, fewer than 2^31 rows, input and output "
                                 f"elements, and no tile override")
            if ieee and not interpreted:
                # its 128-wide tiles are compiled for the tensor cores only (launch_configs)
                raise ValueError(f"{_NAME}: the channels kernel runs on the tensor cores: "
                                 f"float32 inputs need TF32 allowed "
                                 f"(torch.backends.cuda.matmul.allow_tf32)")
            return expand_channels(x, geometry, oh, ow, num_segments, segment_start,
                                   segment_step, segment_channels, dn, d, bias, factor, decay,
                                   alpha, ieee, widen, splits, _NAME)
        return _expand(x, geometry, oh, ow, num_segments, segment_start, segment_step, dn, d,
                       bias, factor, decay, alpha, acc_dtype, block, block_k, splits,
                       interpreted, ieee, widen)


def _expand(x, geometry, oh, ow, num_segments, segment_start, segment_step, dn, d, bias, factor,
            decay, alpha, acc_dtype, block, block_k, splits, interpreted, ieee, widen):
    kh, kw, sh, sw, dh, dw, pt, pl = geometry
    n, _, h, w = x.shape
    out = torch.empty((num_segments, d, d), dtype=acc_dtype, device=x.device)
    m = n * oh * ow
    fp64 = x.dtype == torch.float64
    block = block or _tiles.gram_block(x.dtype, d)
    steps = tile_steps(x.dtype, block, not interpreted)
    block_k = block_k or max(steps)
    _tiles.check_gram_tiles(_NAME, x.dtype, block, block_k, steps)
    n_t = triton.cdiv(d, block)
    n_tiles = n_t * (n_t + 1) // 2
    programs = num_segments * n_tiles
    n_split, rows_per_split = _tiles.plan_splits(_NAME, x.device, programs, m, block_k, splits)
    scal, in_memory = _tiles.scalar_args(decay, alpha, device=x.device, placeholder=out)
    f_arg = factor if factor is not None else out  # never read without HAS_FACTOR
    f_strides = factor.stride() if factor is not None else (0, 0, 0)
    ws = None
    ws_strides = (0, 0, 0, 0)
    if n_split > 1:
        ws = torch.empty((n_split, num_segments, d, d), dtype=acc_dtype, device=x.device)
        ws_strides = ws.stride()
    _pc_expand_kernel[(programs, n_split)](
        x, f_arg, out, ws if ws is not None else out, scal, decay, alpha,
        m, oh * ow, ow, h, w, d, dn, segment_start, segment_step, n_tiles, rows_per_split,
        *x.stride(), kh, kw, sh, sw, dh, dw, pt, pl,
        *f_strides, *out.stride(), *ws_strides,
        HAS_FACTOR=factor is not None and n_split == 1, SPLIT=n_split > 1, ACC_FP64=fp64,
        IEEE_DOT=ieee, WIDEN=widen, BLOCK=block, BLOCK_K=block_k, CHUNK=_CHUNK,
        SCALARS_IN_MEMORY=in_memory, num_warps=_tiles.gram_num_warps(block),
    )
    if n_split > 1:
        _tiles.launch_split_reduce(factor, out, ws, scal, decay, alpha, d, n_tiles, n_split,
                                   programs, fp64, block, in_memory)
    return out

