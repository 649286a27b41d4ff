r"""Patch covariance: the input-side Kronecker factor A of a convolution, without im2col.

For a convolution with input ``x`` of shape ``(N, C, L)`` or ``(N, C, H, W)``, let
``a_{n,r}`` be the im2col patch of example ``n`` at output position ``r`` (``R`` positions),
flattened channel-major then kernel rows then kernel columns, the order of
``weight.reshape(C_out, -1)``; with ``bias=True`` a last coordinate equal to 1 is appended.

.. math::

    \text{expand:}\quad A = \frac{1}{N R} \sum_{n, r} a_{n,r} a_{n,r}^\top
    \qquad
    \text{reduce:}\quad A = \frac{1}{N} \sum_n \bar a_n \bar a_n^\top,\;
    \bar a_n = \frac{1}{R} \sum_r a_{n,r}

(Eschenhagen et al. (2023), Eq. 7 and 10). ``groups > 1`` gives one factor per group, stacked.
``num_blocks`` gives only the diagonal blocks of a channel partition (BD-KFAC, Yu & Tatebe, Sec.
4.2).

The ``eager`` backend is the definition (``F.unfold`` then a matmul). The ``cpu``, ``cuda`` and
``triton`` kernels never build the unfolded tensor: expand forms tiles of ``A`` from input tiles
(implicit im2col), reduce sums each kernel offset's window of the input to get the mean patches
(additions of the window's own pixels only, never a subtraction of a larger sum: a huge or
non-finite pixel changes only the entries that involve it, as in the definition), and both
compute one triangle and mirror it. They accumulate in fp32 (fp64 for fp64
inputs). On the tensor cores (16-bit inputs; fp32 with TF32 allowed) and for segments of at
least 128 channels, the ``triton`` backend's expand kernel reads a channels-last copy of the
input (``x`` itself when it is channels-last with 16-aligned segments) in contiguous 16-byte
asynchronous copies (:mod:`kfac_kernels._triton.patch_covariance_channels`). Memory of the ``cpu`` kernel beyond the returned factor: expand sums straight into the
factor's upper triangle, so its temporaries are a panel of patch rows (at most about an eighth of
the unfolded tensor, and a few MB) and per-thread tiles; reduce keeps the mean patches,
``O(N * D)``. The ``cpu`` backend has two more algorithms for expand factors (``algorithm``, see
:func:`patch_covariance`): for stride-1 convolutions, the shifted correlations of the padded
input (:mod:`._shifted_gram`: every block pair with the same relative kernel offset shares one
``gemm``, the padded images' margins are subtracted, about a third of the unfolded Gram's flops
for 3x3 kernels; it subtracts, so a non-finite pixel spreads over its channel's rows), and for
large factors with many rows, chunked unfolding with one BLAS ``X X^T`` per chunk of examples;
both hold one chunk of examples at a time, never the whole unfolded tensor.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .._backend import native_has_op, resolve_backend
from ._cuda_auto import cuda_order
from ._library import check_same
from ._shifted_gram import (ROW_CHUNK_BYTES, add_shifted_gram_, relative_offsets, shift_plan,
                            shifted_gram_flop_ratio)
from ._symmetric_matmul import add_symmetric_matmul_, block_edges, mirror_upper

_OP = "patch_covariance"
_MODES = ("expand", "reduce")
_PADDING_MODES = ("zeros", "reflect", "replicate", "circular")
_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
_ALGORITHMS = ("auto", "implicit", "chunked", "shifted")


@dataclass(frozen=True)
class ConvGeometry:
    """A convolution's geometry in 2-d form (a 1-d convolution has a height of 1)."""

    kernel: tuple[int, int]
    stride: tuple[int, int]
    dilation: tuple[int, int]
    pad: tuple[int, int, int, int]  # top, bottom, left, right (zero padding)
    in_size: tuple[int, int]
    out_size: tuple[int, int]

    @property
    def positions(self) -> int:
        return self.out_size[0] * self.out_size[1]


def _tuple(value, n: int, name: str) -> tuple[int, ...]:
    if isinstance(value, bool):
        raise TypeError(f"{_OP}: {name} must be an int or a tuple of {n} ints, got {value!r}")
    if isinstance(value, int):
        return (value,) * n
    if isinstance(value, (tuple, list)) and len(value) == n and all(
            isinstance(v, int) and not isinstance(v, bool) for v in value):
        return tuple(value)
    raise TypeError(f"{_OP}: {name} must be an int or a tuple of {n} ints, got {value!r}")


def conv_geometry(in_size, kernel_size, stride=1, padding=0, dilation=1) -> ConvGeometry:
    """Normalise nn.Conv1d/2d-style arguments for an input of spatial size ``in_size``.

    ``padding`` may be an int, a tuple (symmetric per dim), ``"valid"`` or ``"same"`` (stride
    1; an odd total is split as PyTorch does, the extra row/column at the end).
    """
    nd = len(in_size)
    kernel = _tuple(kernel_size, nd, "kernel_size")
    stride_t = _tuple(stride, nd, "stride")
    dilation_t = _tuple(dilation, nd, "dilation")
    for name, vals in (("kernel_size", kernel), ("stride", stride_t), ("dilation", dilation_t)):
        if any(v < 1 for v in vals):
            raise ValueError(f"{_OP}: {name} must be positive, got {vals}")
    if isinstance(padding, str):
        if padding == "valid":
            pads = [(0, 0)] * nd
        elif padding == "same":
            if any(s != 1 for s in stride_t):
                raise ValueError(f"{_OP}: padding='same' needs stride 1, got stride {stride_t}")
            pads = []
            for k, d in zip(kernel, dilation_t):
                total = d * (k - 1)
                pads.append((total // 2, total - total // 2))
        else:
            raise ValueError(f"{_OP}: padding must be an int, a tuple, 'same' or 'valid', got "
                             f"{padding!r}")
    else:
        pad_t = _tuple(padding, nd, "padding")
        if any(p < 0 for p in pad_t):
            raise ValueError(f"{_OP}: padding must be non-negative, got {pad_t}")
        pads = [(p, p) for p in pad_t]
    out = []
    for size, k, s, d, (p0, p1) in zip(in_size, kernel, stride_t, dilation_t, pads):
        span = d * (k - 1) + 1
        if size + p0 + p1 < span:
            raise ValueError(
                f"{_OP}: the kernel (extent {span} with dilation {d}) is larger than the padded "
                f"input (size {size} + padding {p0 + p1})")
        out.append((size + p0 + p1 - span) // s + 1)
    if nd == 1:
        return ConvGeometry((1, kernel[0]), (1, stride_t[0]), (1, dilation_t[0]),
                            (0, 0, *pads[0]), (1, in_size[0]), (1, out[0]))
    return ConvGeometry(kernel, stride_t, dilation_t, (*pads[0], *pads[1]), tuple(in_size),
                        tuple(out))


def as_4d(x: torch.Tensor) -> torch.Tensor:
    return x.unsqueeze(2) if x.dim() == 3 else x


def block_sizes(channels: int, num_blocks) -> list[int]:
    """Channel counts of the blocks: ``num_blocks`` near-equal parts (the last absorbs the
    remainder) or an explicit list that sums to ``channels``."""
    if isinstance(num_blocks, bool):
        raise TypeError(f"{_OP}: num_blocks must be an int or a list of channel counts")
    if isinstance(num_blocks, int):
        if not 1 <= num_blocks <= channels:
            raise ValueError(f"{_OP}: num_blocks must be between 1 and the channels per group "
                             f"({channels}), got {num_blocks}")
        q = channels // num_blocks
        return [q] * (num_blocks - 1) + [channels - q * (num_blocks - 1)]
    if isinstance(num_blocks, (list, tuple)) and num_blocks and all(
            isinstance(b, int) and not isinstance(b, bool) and b >= 1 for b in num_blocks):
        if sum(num_blocks) != channels:
            raise ValueError(f"{_OP}: the block channel counts {list(num_blocks)} must sum to the "
                             f"channels per group ({channels})")
        return list(num_blocks)
    raise TypeError(f"{_OP}: num_blocks must be an int or a list of positive channel counts, got "
                    f"{num_blocks!r}")


@dataclass(frozen=True)
class Segments:
    """Equal-width channel segments ``[start + s * step, ... + channels)``, ``s < count``."""

    count: int
    start: int
    step: int
    channels: int
    bias: bool


def plan_segments(channels: int, groups: int, num_blocks, bias: bool) -> list[Segments]:
    """Segment batches whose concatenated outputs are the factors, by group then block."""
    cg = channels // groups
    if num_blocks is None:
        return [Segments(groups, 0, cg, cg, bias)]
    sizes = block_sizes(cg, num_blocks)
    plans = []
    for g in range(groups):
        start = g * cg
        for b, size in enumerate(sizes):
            plans.append(Segments(1, start, size, size, bias and b == len(sizes) - 1))
            start += size
    return plans


def patch_gram_eager(x4: torch.Tensor, geom: ConvGeometry, seg: Segments, reduce: bool,
                     factor, decay: float, alpha: float) -> torch.Tensor:
    """The definition for one segment batch: F.unfold, then ``decay*factor + alpha*X^T X``
    (sum over patches for expand, over examples of mean patches for reduce)."""
    top, bottom, left, right = geom.pad
    xp = F.pad(x4, (left, right, top, bottom))
    patches = F.unfold(xp, geom.kernel, dilation=geom.dilation, stride=geom.stride)
    n, _, r = patches.shape
    k = geom.kernel[0] * geom.kernel[1]
    patches = patches.reshape(n, x4.shape[1], k, r)
    outs = []
    for s in range(seg.count):
        c0 = seg.start + s * seg.step
        p = patches[:, c0:c0 + seg.channels].reshape(n, seg.channels * k, r)
        if reduce:
            rows = p.mean(dim=2)
        else:
            rows = p.permute(0, 2, 1).reshape(n * r, seg.channels * k)
        if seg.bias:
            rows = torch.cat([rows, rows.new_ones(rows.shape[0], 1)], dim=1)
        gram = (rows.mT @ rows) * alpha
        if factor is not None:
            gram = gram + decay * factor[s].to(gram.dtype)
        outs.append(gram)
    return torch.stack(outs)


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


#: the chunked algorithm holds at most this many bytes of patches at once, or a quarter of the
#: result where that is more (one chunk of examples; one example at least)
CHUNK_BYTES = 8 << 20
#: what the shifted path's canvas budget leaves for the blocks in flight and for BLAS's own
#: packing buffers, which MKL allocates at a process's first product of a size. At 256
#: channels (8x8 and 14x14, batch 32) a first call ends 0.3-0.5 MiB over one chunk with 2 MiB;
#: 3 MiB cut that to 0.1-0.2 MiB but, by splitting the batch into 5 canvases instead of 2, cost
#: 17-29 % in time (one pass over the result per canvas), so 2 MiB stays.
SHIFTED_BLAS_BYTES = 2 << 20


def _window(x4: torch.Tensor, geom: ConvGeometry, i: int, j: int) -> torch.Tensor:
    """The input pixels under kernel offset ``(i, j)`` at every output position:
    ``(N, C, H_out, W_out)``, a strided view of the (padded) input."""
    (sh, sw), (dh, dw), (ho, wo) = geom.stride, geom.dilation, geom.out_size
    return x4[:, :, i * dh:i * dh + sh * (ho - 1) + 1:sh, j * dw:j * dw + sw * (wo - 1) + 1:sw]


def _chunk_columns(xs: torch.Tensor, geom: ConvGeometry, reduce: bool,
                   dtype: torch.dtype) -> torch.Tensor:
    """The patches of a chunk of examples ``xs`` (``(n, c, H, W)``) as the columns of a
    ``(c kh kw, n R)`` matrix (expand) or their means over the positions, ``(c kh kw, n)``
    (reduce): coordinate-major, so ``X X^T`` is one BLAS product. One strided copy per kernel
    offset (no ``F.unfold``)."""
    kh, kw = geom.kernel
    n, c, h, w = xs.shape
    ho, wo = geom.out_size
    # channel-major first (one pass over the chunk's input, padded in the same copy): each
    # offset's copy then moves whole rows of a window instead of gathering across channels
    top, bottom, left, right = geom.pad
    xt = xs.new_zeros(c, n, h + top + bottom, w + left + right)
    xt[:, :, top:top + h, left:left + w] = xs.transpose(0, 1)
    if reduce:
        cols = torch.empty(c, kh, kw, n, dtype=dtype, device=xs.device)
        for i in range(kh):
            for j in range(kw):
                cols[:, i, j] = _window(xt, geom, i, j).sum((2, 3), dtype=dtype)
        return cols.view(c * kh * kw, n).div_(geom.positions)
    cols = torch.empty(c, kh, kw, n, ho, wo, dtype=dtype, device=xs.device)
    for i in range(kh):
        for j in range(kw):
            cols[:, i, j].copy_(_window(xt, geom, i, j))
    return cols.view(c * kh * kw, n * ho * wo)


def patch_gram_chunked(x4: torch.Tensor, geom: ConvGeometry, seg: Segments, reduce: bool,
                       factor, decay: float, alpha: float) -> torch.Tensor:
    """``decay * factor + alpha * sum`` for one segment batch by chunked unfolding: the patches
    of a chunk of examples (at most :data:`CHUNK_BYTES`, at least one example) are copied into a
    coordinate-major matrix ``X`` and ``X X^T`` is added by BLAS, upper block triangle only
    (:mod:`._symmetric_matmul`), mirrored once at the end. Accumulates in fp32 (fp64 for fp64
    inputs); memory beyond the result: one chunk of patches, at most
    ``max(CHUNK_BYTES, result / 4)`` (one example at least), and its padded input."""
    dtype = accumulation_dtype(x4.dtype)
    kh, kw = geom.kernel
    n = x4.shape[0]
    d0 = seg.channels * kh * kw
    d = d0 + int(seg.bias)
    item = torch.finfo(dtype).bits // 8
    per_example = d0 * (1 if reduce else geom.positions) * item
    # a chunk holds at most max(CHUNK_BYTES, a quarter of the result) and one example at least;
    # the examples are spread evenly over the chunks (no thin last product)
    budget = max(CHUNK_BYTES, d * d * item // 4)
    chunks = -(-n // max(1, budget // max(per_example, 1)))
    step = -(-n // chunks)
    prior = factor is not None and decay != 0.0
    if prior:
        out = factor.to(dtype) * decay
    else:  # the first product overwrites (beta = 0): no pass to zero the result
        out = torch.empty(seg.count, d, d, dtype=dtype, device=x4.device)
        if seg.bias:
            out[:, :, d0] = 0.0
    edges = block_edges(d0)
    for s in range(seg.count):
        c0 = seg.start + s * seg.step
        main, total = out[s, :d0, :d0], 0
        for e0 in range(0, n, step):
            xs = x4[e0:e0 + step, c0:c0 + seg.channels]
            cols = _chunk_columns(xs, geom, reduce, dtype)
            add_symmetric_matmul_(main, cols, cols.mT, alpha=alpha, mirror=False,
                                  beta=1.0 if prior or e0 else 0.0)
            if seg.bias:
                out[s, :d0, d0].add_(cols.sum(1), alpha=alpha)
            total += cols.shape[1]
            del xs, cols  # before the next chunk is built: one chunk alive at a time
        mirror_upper(main, edges)
        if seg.bias:
            out[s, d0, d0] += alpha * total
            out[s, d0, :d0] = out[s, :d0, d0]
    return out


def patch_gram_shifted(x4: torch.Tensor, geom: ConvGeometry, seg: Segments,
                       factor, decay: float, alpha: float) -> torch.Tensor:
    """``decay * factor + alpha * sum`` for one segment batch of a stride-1 expand factor, from
    the input's shifted correlations (:mod:`._shifted_gram`: one ``gemm`` per relative kernel
    offset instead of one per pair of offsets, plus small Grams of the padded images' margins).
    Accumulates in fp32 (fp64 for fp64 inputs); memory beyond the result: a canvas of padded
    examples and the ``(2k-1)^2 / 2`` correlations of ``c x c``, within
    :func:`shifted_chunk_examples`'s budget, and a band of about 1 MiB of the result's rows."""
    dtype = accumulation_dtype(x4.dtype)
    kh, kw = geom.kernel
    n = x4.shape[0]
    d0 = seg.channels * kh * kw
    d = d0 + int(seg.bias)
    top, bottom, left, right = geom.pad
    step = shifted_chunk_examples(x4.shape, geom, seg.channels, dtype)

    def plan_of(examples: int):
        return shift_plan(examples, geom.in_size, geom.kernel, geom.dilation, geom.pad,
                          geom.out_size)

    prior = factor is not None and decay != 0.0
    out = factor.to(dtype) * decay if prior else torch.empty(seg.count, d, d, dtype=dtype,
                                                             device=x4.device)
    for s in range(seg.count):
        c0 = seg.start + s * seg.step
        xs = x4[:, c0:c0 + seg.channels]
        add_shifted_gram_(out[s], xs, step, geom.pad, alpha, prior, plan_of)
        if seg.bias:  # each coordinate's sum over the patches: its offset's window of the
            # input, clipped to the unpadded pixels (the padding adds zeros)
            (dh, dw), (ho, wo), (h, w) = geom.dilation, geom.out_size, xs.shape[2:]
            sums = torch.stack([
                xs[:, :, max(0, a * dh - top):min(h, a * dh - top + ho),
                   max(0, b * dw - left):min(w, b * dw - left + wo)].sum((0, 2, 3), dtype=dtype)
                for a in range(kh) for b in range(kw)], dim=1).view(d0)
            if prior:
                out[s, :d0, d0].add_(sums, alpha=alpha)
                out[s, d0, d0] += alpha * n * geom.positions
            else:
                out[s, :d0, d0] = sums * alpha
                out[s, d0, d0] = alpha * n * geom.positions
            out[s, d0, :d0] = out[s, :d0, d0]
    return out


def shifted_chunk_examples(shape, geom: ConvGeometry, channels: int, dtype) -> int:
    """Examples per padded canvas of :func:`patch_gram_shifted`: the canvas, the correlations,
    a band of the result's rows and :data:`SHIFTED_BLAS_BYTES` for BLAS's buffers and the
    blocks in flight within ``max(CHUNK_BYTES, result / 4)``; one example at least, spread
    evenly over the chunks."""
    n, _, h, w = shape
    kh, kw = geom.kernel
    top, bottom, left, right = geom.pad
    item = torch.finfo(dtype).bits // 8
    d = channels * kh * kw + 1
    per_example = channels * (h + top + bottom) * (w + left + right) * item
    correlations = len(relative_offsets(geom.kernel))
    budget = (max(CHUNK_BYTES, d * d * item // 4) - correlations * channels ** 2 * item
              - ROW_CHUNK_BYTES - SHIFTED_BLAS_BYTES)
    chunks = -(-n // max(1, budget // per_example))
    return -(-n // chunks)


def shifted_is_faster(n: int, geom: ConvGeometry, seg: Segments, reduce: bool) -> bool:
    """The measured rule for :func:`patch_gram_shifted` (see :func:`patch_covariance`)."""
    if reduce or geom.stride != (1, 1) or geom.kernel == (1, 1):
        return False
    ratio = shifted_gram_flop_ratio(n, geom.in_size, geom.kernel, geom.dilation, geom.pad,
                                    geom.out_size)
    kh, kw = geom.kernel
    d = seg.channels * kh * kw
    saved = n * geom.positions * d * d / 2 * (1.0 - ratio)
    correlations = len(relative_offsets(geom.kernel)) * seg.channels ** 2
    return (ratio <= SHIFTED_MAX_FLOP_RATIO and saved >= SHIFTED_MIN_SAVED_MACS
            and correlations <= n * geom.positions * d / 4)


#: the shifted algorithm is chosen for stride-1 expand factors where it does at most this
#: fraction of the unfolded Gram's multiply-adds and saves at least this many of them: below,
#: its ~60 small operations per call (about 1 ms on one thread) and thinner products cost more
#: than the arithmetic saved (``bench/results/patch_covariance_crossover_cpu.json``); and where
#: its ``c x c`` correlations hold at most a quarter of the unfolded tensor's entries (many
#: channels at few positions, e.g. 512 channels at 7x7 with batch 32, stay with the kernel,
#: which was at most 1.3x slower there: its memory stays far below the unfolded tensor's)
SHIFTED_MAX_FLOP_RATIO = 0.75
SHIFTED_MIN_SAVED_MACS = 4e7


def cpu_algorithm(n: int, geom: ConvGeometry, seg: Segments, reduce: bool) -> str:
    """What ``algorithm="auto"`` runs on the ``cpu`` backend: ``"shifted"`` where
    :func:`shifted_is_faster`, else ``"implicit"``. The chunked path is never picked: it was
    slower than the im2col-free kernel at every one of the 178 shapes of the last crossover
    sweep (by 0-25 % for large expand factors, stride 1 and 2; see :func:`patch_covariance`)."""
    return "shifted" if shifted_is_faster(n, geom, seg, reduce) else "implicit"


def patch_gram(x4: torch.Tensor, geom: ConvGeometry, seg: Segments, reduce: bool,
               factor: torch.Tensor | None, decay: float, alpha: float,
               backend: str, algorithm: str = "auto") -> torch.Tensor:
    """``decay * factor + alpha * sum`` for one segment batch on a concrete backend, as
    ``(count, D, D)``; the native/Triton result has the accumulation dtype. ``algorithm``
    (``cpu`` backend only): ``"auto"`` (:func:`cpu_algorithm`), ``"implicit"`` (the
    im2col-free kernel), ``"chunked"`` (:func:`patch_gram_chunked`) or ``"shifted"``
    (:func:`patch_gram_shifted`)."""
    if backend == "eager":
        return patch_gram_eager(x4, geom, seg, reduce, factor, decay, alpha)
    if backend == "cpu":
        if algorithm == "auto":
            algorithm = cpu_algorithm(x4.shape[0], geom, seg, reduce)
        if algorithm == "shifted":
            if reduce or geom.stride != (1, 1):
                raise ValueError(
                    f"{_OP}: algorithm='shifted' computes expand factors of stride-1 "
                    f"convolutions; got mode={'reduce' if reduce else 'expand'!r}, stride "
                    f"{geom.stride}")
            return patch_gram_shifted(x4, geom, seg, factor, decay, alpha)
        if algorithm == "chunked":
            return patch_gram_chunked(x4, geom, seg, reduce, factor, decay, alpha)
    args = (x4, list(geom.kernel), list(geom.stride), list(geom.dilation),
            [geom.pad[0], geom.pad[2]], list(geom.out_size), seg.count, seg.start, seg.step,
            seg.channels, reduce, seg.bias, factor, float(decay), float(alpha))
    if backend == "triton":
        from kfac_kernels._triton.patch_covariance import patch_covariance_triton
        return patch_covariance_triton(*args)
    return torch.ops.kfac_kernels.patch_covariance(*args)


def pre_pad(x: torch.Tensor, geom: ConvGeometry, padding_mode: str) -> tuple[torch.Tensor,
                                                                           ConvGeometry]:
    """Apply a non-zero padding mode explicitly (O(input) memory) so the kernels only see zero
    padding."""
    if padding_mode == "zeros" or not any(geom.pad):
        return x, geom
    top, bottom, left, right = geom.pad
    for pads, size in (((top, bottom), x.shape[2] if x.dim() == 4 else 1), ((left, right),
                                                                            x.shape[-1])):
        limit = size - 1 if padding_mode == "reflect" else size
        if padding_mode in ("reflect", "circular") and max(pads) > limit:
            raise ValueError(f"{_OP}: padding {max(pads)} is too large for "
                             f"padding_mode={padding_mode!r} and an input of spatial size "
                             f"{tuple(x.shape[2:])}: {padding_mode} padding must be at most "
                             f"{'the size - 1' if padding_mode == 'reflect' else 'the size'} in "
                             "each dim")
    pads = (left, right) if x.dim() == 3 else (left, right, top, bottom)
    xp = F.pad(x, pads, mode=padding_mode)
    size = tuple(xp.shape[2:]) if x.dim() == 4 else (1, xp.shape[-1])
    return xp, ConvGeometry(geom.kernel, geom.stride, geom.dilation, (0, 0, 0, 0), size,
                            geom.out_size)


def padded_input(x: torch.Tensor, kernel_size, stride=1, padding=0, dilation=1,
                 padding_mode: str = "zeros", *, pad_zeros: bool = False
                 ) -> tuple[torch.Tensor, ConvGeometry]:
    """A convolution input as ``(N, C, H, W)`` (1-d: height 1) with its padding applied as the
    module applies it, and its geometry: non-zero padding modes always (O(input) memory);
    zero padding only with ``pad_zeros`` (else it stays in ``geom.pad`` for the kernels)."""
    geom = conv_geometry(tuple(x.shape[2:]), kernel_size, stride, padding, dilation)
    x, geom = pre_pad(x, geom, padding_mode)
    x = as_4d(x)
    if pad_zeros and any(geom.pad):
        top, bottom, left, right = geom.pad
        x = F.pad(x, (left, right, top, bottom))
        geom = ConvGeometry(geom.kernel, geom.stride, geom.dilation, (0, 0, 0, 0),
                            tuple(x.shape[2:]), geom.out_size)
    return x, geom


def check_input(x, groups: int) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{_OP}: x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() not in (3, 4):
        raise ValueError(f"{_OP}: x must be (N, C, L) or (N, C, H, W), got shape "
                         f"{tuple(x.shape)}")
    if x.dtype not in _DTYPES:
        raise TypeError(f"{_OP}: x must be float32, float64, float16 or bfloat16, got {x.dtype}")
    if x.shape[0] == 0:
        raise ValueError(f"{_OP}: x has a zero-size batch (shape {tuple(x.shape)}); a factor "
                         "needs at least one example")
    if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1:
        raise ValueError(f"{_OP}: groups must be a positive int, got {groups!r}")
    if x.shape[1] % groups != 0:
        raise ValueError(f"{_OP}: the {x.shape[1]} input channels are not divisible by "
                         f"groups={groups}")


def patch_covariance(x: torch.Tensor, kernel_size, stride=1, padding=0, dilation=1, groups=1, *,
                     mode: str = "expand", num_blocks=None, bias: bool = False,
                     out_dtype: torch.dtype | None = None, padding_mode: str = "zeros",
                     stacked: bool = False, factor=None, decay: float = 0.0,
                     alpha: float | None = None, backend: str = "auto",
                     algorithm: str = "auto"):
    """The convolution input factor ``A`` (see the module docstring for the formula), or with
    ``factor`` / ``alpha`` the update ``decay * factor + alpha * sum`` of a stored one.

    Args:
        x: ``(N, C, L)`` or ``(N, C, H, W)``, any strides (channels_last included); fp32,
            fp16, bf16 or fp64.
        kernel_size, stride, padding, dilation, groups: as ``nn.Conv1d``/``nn.Conv2d`` take them
            (``padding`` also ``"same"``/``"valid"``).
        mode: ``"expand"`` or ``"reduce"``.
        num_blocks: ``None``, an int, or a list of channel counts per group: compute only the
            diagonal blocks of that channel partition (the bias coordinate joins the last block).
        bias: append a constant-1 coordinate (last).
        out_dtype: dtype of the result (default ``x.dtype``, or ``factor``'s); kernels
            accumulate in fp32 (fp64).
        padding_mode: ``"zeros"``, ``"reflect"``, ``"replicate"`` or ``"circular"``.
        stacked: return groups stacked first even for one group, and blocks as a list over
            blocks of ``(groups, D_i, D_i)`` (the layout of a stored factor).
        factor: a stored factor in the stacked layout to update (implies ``stacked``).
        decay: multiplier of ``factor``.
        alpha: multiplier of the sum of patch outer products (default: the mean,
            ``1 / (N R)`` for expand, ``1 / N`` for reduce).
        backend: ``"auto"``, ``"eager"``, ``"cpu"``, ``"cuda"`` or ``"triton"``.
        algorithm: how the ``cpu`` backend computes the factor: ``"auto"`` (by shape, below),
            ``"implicit"`` (the im2col-free C++ kernel), ``"chunked"`` (chunked unfolding and
            BLAS) or ``"shifted"`` (shifted correlations; stride-1 expand factors only). Other
            backends take ``"auto"`` only.

    The ``cpu`` backend's choice (``algorithm="auto"``, :func:`cpu_algorithm`): the shifted
    correlations for stride-1 expand factors where they do at most 0.75 of the unfolded Gram's
    multiply-adds and save at least ``4e7`` of them (on one thread, 2.1-2.8x the kernel's speed
    for 3x3 convolutions of 64-512 channels at 14x14 and above, 1.1-1.4x at 7x7 and 8x8; at 4x4
    the margins make it slower, and below ``4e7`` saved its per-call work costs more) and its
    ``(2k-1)^2 / 2`` correlations of ``c x c`` hold at most a quarter of the unfolded tensor,
    e.g. every stride-1 3x3 convolution of ResNet-18 on CIFAR but the last stage's; the
    im2col-free kernel everywhere else (strided and 1x1 convolutions, small factors; for
    reduce, its shared window sums beat per-offset ones everywhere, 2-8x). The chunked path is
    there to be asked for: the last sweep found it 0-25 % slower than the kernel at every
    measured shape, stride 2 and large factors included. Measured with ``bench/patch_covariance_crossover.py``
    (``bench/results/patch_covariance_crossover_cpu.json``, one thread, 178 shapes). Memory
    beyond the result of the shifted and chunked paths: one chunk of examples (at most
    ``max(8 MiB, result / 4)`` of padded input or patches, one example at least).

    Returns:
        ``(D, D)`` for ``groups == 1``, ``(groups, D_g, D_g)`` for ``groups > 1``, or with
        ``num_blocks`` a list of ``(D_i, D_i)`` tensors by group then block; with ``stacked``
        (or ``factor``) ``(groups, D, D)``, or a list over blocks of ``(groups, D_i, D_i)``.
    """
    check_input(x, groups)
    if mode not in _MODES:
        raise ValueError(f"{_OP}: mode must be 'expand' or 'reduce', got {mode!r}")
    if padding_mode not in _PADDING_MODES:
        raise ValueError(f"{_OP}: padding_mode must be one of {_PADDING_MODES}, got "
                         f"{padding_mode!r}")
    if out_dtype is not None and out_dtype not in _DTYPES:
        raise TypeError(f"{_OP}: out_dtype must be a floating dtype or None, got {out_dtype!r}")
    if algorithm not in _ALGORITHMS:
        raise ValueError(f"{_OP}: algorithm must be one of {_ALGORITHMS}, got {algorithm!r}")
    chosen = resolve_backend(backend, x.device, _OP)
    if algorithm != "auto" and chosen != "cpu":
        raise ValueError(f"{_OP}: algorithm={algorithm!r} chooses between the cpu backend's "
                         f"algorithms, but the backend is {chosen!r}; pass algorithm='auto' or "
                         "backend='cpu'")
    geom = conv_geometry(tuple(x.shape[2:]), kernel_size, stride, padding, dilation)
    xp, geom = pre_pad(x, geom, padding_mode)
    x4 = as_4d(xp)
    reduce = mode == "reduce"
    n = x.shape[0]
    if backend == "auto" and x.device.type == "cuda":
        taps = geom.kernel[0] * geom.kernel[1]
        unfolded = n * geom.positions * x.shape[1] * taps * x.element_size()
        chosen = resolve_backend(backend, x.device, _OP, cuda_order(
            _OP, mode=mode, blocked=num_blocks is not None, kernel_elements=taps,
            unfolded_bytes=unfolded))
    if alpha is None:
        alpha = 1.0 / n if reduce else 1.0 / (n * geom.positions)
    if factor is not None or stacked:
        return _stacked(x4, geom, groups, num_blocks, bias, reduce, factor, decay, alpha,
                        out_dtype, chosen, algorithm)
    out_dtype = out_dtype or x.dtype
    results = [patch_gram(x4, geom, seg, reduce, None, 0.0, alpha, chosen, algorithm)
               .to(out_dtype)
               for seg in plan_segments(x.shape[1], groups, num_blocks, bias)]
    if num_blocks is not None:
        return [block for stacked_blocks in results for block in stacked_blocks]
    out = results[0]
    return out[0] if groups == 1 else out


def _stacked(x4, geom, groups, num_blocks, bias, reduce, factor, decay, alpha, out_dtype,
             backend, algorithm="auto"):
    """The stacked layout: one segment batch over the groups per channel block (the same
    channel range of every group), accumulated into ``factor``."""
    cg = x4.shape[1] // groups
    sizes = [cg] if num_blocks is None else block_sizes(cg, num_blocks)
    parts = [factor] if num_blocks is None and factor is not None else factor
    if out_dtype is None:
        out_dtype = (parts[0].dtype if factor is not None else x4.dtype)
    # The kernels accumulate in fp32 (fp64): a factor in another dtype is converted first.
    x_dtype = x4.dtype if backend != "eager" and accumulation_dtype(x4.dtype) == out_dtype \
        else out_dtype
    x4 = x4.to(x_dtype)
    out, start = [], 0
    for i, size in enumerate(sizes):
        seg = Segments(groups, start, cg, size, bias and i == len(sizes) - 1)
        prev = None if parts is None else parts[i]
        if prev is not None:
            want = (groups, size * geom.kernel[0] * geom.kernel[1] + int(seg.bias))
            if tuple(prev.shape) != (want[0], want[1], want[1]):
                raise ValueError(f"{_OP}: factor block {i} has shape {tuple(prev.shape)}; "
                                 f"expected {(want[0], want[1], want[1])}")
        out.append(patch_gram(x4, geom, seg, reduce, prev, float(decay) if prev is not None
                              else 0.0, float(alpha), backend, algorithm).to(out_dtype))
        start += size
    return out[0] if num_blocks is None else out


def _register_fake() -> None:
    """Shape/dtype propagation and validation for torch.compile and FakeTensor, registered
    whether or not the native extension is built (the schema lives in ops/_library.py)."""

    @torch.library.register_fake("kfac_kernels::patch_covariance")
    def _(x, kernel_size, stride, dilation, padding, out_size, num_segments, segment_start,
          segment_step, segment_channels, reduce, bias, factor, decay, alpha):
        torch._check(x.dim() == 4, lambda: f"{_OP}: x must be (N, C, H, W), got {x.dim()} dims")
        for name, v in (("kernel_size", kernel_size), ("stride", stride),
                        ("dilation", dilation), ("padding", padding), ("out_size", out_size)):
            torch._check(len(v) == 2, lambda: f"{_OP}: {name} must have 2 entries, got {len(v)}")
        torch._check(num_segments >= 1 and segment_channels >= 1,
                     lambda: f"{_OP}: num_segments and segment_channels must be positive")
        torch._check(segment_start + (num_segments - 1) * segment_step + segment_channels
                     <= x.shape[1], lambda: f"{_OP}: the channel segments exceed x's "
                     f"{x.shape[1]} channels")
        d = segment_channels * kernel_size[0] * kernel_size[1] + (1 if bias else 0)
        dtype = accumulation_dtype(x.dtype)
        if factor is not None:
            check_same(_OP, "factor", factor, (num_segments, d, d), dtype)
        return x.new_empty((num_segments, d, d), dtype=dtype)


_register_fake()
