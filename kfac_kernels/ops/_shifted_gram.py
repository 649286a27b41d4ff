r"""The expand factor of a stride-1 convolution from shifted correlations of its input.

For a stride-1 convolution the block of ``A`` that pairs kernel offsets ``t = (a, b)`` and
``t' = (a', b')`` is

.. math::

    B_{t t'} = \sum_{o \in \mathrm{Out}} x_{o + \delta_t} \, x_{o + \delta_{t'}}^\top

(``x`` the zero-padded input as a ``C``-vector per pixel, ``o`` the output positions, ``\delta``
the offsets). Lay the padded images end to end as one flat sequence of pixels (``X``, a
``(C, L)`` matrix) and let ``o`` run over *every* flat position instead of the output ones:
each term then depends only on ``s = \delta_{t'} - \delta_t``, and the sum is the correlation

.. math::

    R_s = \sum_q X_q X_{q+s}^\top = X_{[0, L-s)} \, X_{[s, L)}^\top ,

one ``gemm``, shared by every pair with the same relative offset. The extra terms, from flat
positions that are not output positions (the right and bottom margins of each padded image,
where a kernel offset reaches past the row or into the next image), are subtracted again:

.. math::

    B_{t t'} = R_{\delta_{t'} - \delta_t} - \sum_{o \notin \mathrm{Out}}
               x_{o + \delta_t} \, x_{o + \delta_{t'}}^\top .

That correction only involves the few offsets of each margin position that land on a pixel of
an image (3 of 9 for a 3x3 kernel with padding 1), so it is computed per group of margin
positions with the same landing offsets (a position whose offsets are a subset of a group's
joins it, gathering zeros for the rest), one small Gram per group.

Cost for a ``k x k`` kernel, ``C`` channels, ``N`` images of ``H x W`` padded to
``H_p x W_p``: the ``((2k-1)^2 + 1) / 2`` correlations take about
``(2k-1)^2 N H_p W_p C^2 / 2`` multiply-adds, against ``k^4 N H W C^2 / 2`` for the symmetric
Gram of the unfolded patches, i.e. about ``25 / 81`` of them for 3x3 (``81 / 625`` for 5x5)
before the margins; the margin Grams add about ``2 k^3 N (H_p + W_p) C^2`` (3x3 with padding
1, batch 32, all counted: 0.38 of the unfolded Gram at 32x32, 0.47 at 14x14, 0.61 at 8x8, 0.97
at 4x4). No unfolded tensor is formed: memory beyond the result is the padded input (a chunk
of examples at a time) and the ``(2k-1)^2`` correlations (``C x C`` each, fewer entries than
the result).

Non-finite inputs: the margins are *subtracted*, so a non-finite pixel reaches every entry of
its channel's rows, where the definition leaves finite the kernel offsets that never see it
(the factor is non-finite either way).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ShiftPlan:
    """The index arithmetic of one geometry and batch size (cached: it depends on shapes only).

    ``shifts``: the relative kernel offsets ``(dh, dw)`` computed by a ``gemm`` (the other half
    are their transposes) and ``shift_of`` their flat shifts; ``partner[t][t']``: the relative
    offset of the block ``(t, t')`` and whether it is the transpose of a computed one;
    ``groups``: per group of margin positions, the kernel offsets that may land on a pixel and
    the flat gather index ``(n_g, m_g)`` into the canvas (offsets that miss point at the
    canvas's last pixel, which is always zero).
    """

    kernel: tuple[int, int]
    canvas: tuple[int, int]  # padded height and width
    prefix: int  # zero pixels in front of the first image (the largest offset)
    length: int  # N * H_p * W_p
    shifts: tuple[tuple[int, int], ...]
    shift_of: dict
    partner: tuple[tuple[tuple[tuple[int, int], bool], ...], ...]
    groups: tuple[tuple[tuple[int, ...], torch.Tensor], ...]
    flops: float  # the products' multiply-adds per channel^2 (what BLAS computes)


def _merge_patterns(patterns: list[tuple[int, ...]]) -> dict:
    """Each landing pattern mapped to a maximal pattern that contains it (fewer, larger Grams;
    the offsets a position lacks are gathered as zeros)."""
    maximal = [p for p in patterns if not any(set(p) < set(q) for q in patterns)]
    return {p: next(q for q in maximal if set(p) <= set(q)) for p in patterns}


def relative_offsets(kernel: tuple[int, int]) -> list[tuple[int, int]]:
    """The relative kernel offsets ``(dh, dw)``, in kernel steps, that get a correlation each:
    the half with a non-negative flat shift (``((2k_h-1)(2k_w-1) + 1) / 2`` of them)."""
    kh, kw = kernel
    return [(ah, aw) for ah in range(kh) for aw in range(-(kw - 1), kw) if ah or aw >= 0]


@functools.lru_cache(maxsize=64)
def shift_plan(n: int, in_size: tuple[int, int], kernel: tuple[int, int],
               dilation: tuple[int, int], pad: tuple[int, int, int, int],
               out_size: tuple[int, int]) -> ShiftPlan:
    kh, kw = kernel
    dh, dw = dilation
    top, bottom, left, right = pad
    h, w = in_size
    hp, wp = h + top + bottom, w + left + right
    ho, wo = out_size
    taps = [(a, b) for a in range(kh) for b in range(kw)]
    offsets = torch.tensor([a * dh * wp + b * dw for a, b in taps])
    prefix = int(offsets.max())
    length = n * hp * wp
    zero_pixel = prefix + length
    shifts = relative_offsets((kh, kw))
    shift_of = {key: key[0] * dh * wp + key[1] * dw for key in shifts}
    partner = []
    for a, b in taps:
        row = []
        for a2, b2 in taps:
            key = (a2 - a, b2 - b)
            row.append((key, False) if key in shift_of else ((-key[0], -key[1]), True))
        partner.append(tuple(row))
    # which pixels of the canvas (prefix, images, one zero pixel) hold data, and which flat
    # positions o (-prefix <= o < length) are not output positions: the margins
    data = torch.zeros(zero_pixel + 1, dtype=torch.bool)
    data[prefix:zero_pixel].view(n, hp, wp)[:, top:top + h, left:left + w] = True
    is_out = torch.zeros(zero_pixel, dtype=torch.bool)
    is_out[prefix:].view(n, hp, wp)[:, :ho, :wo] = True
    margin = torch.nonzero(~is_out).squeeze(1)
    index = (margin[:, None] + offsets[None, :]).clamp_(max=zero_pixel)
    lands = data[index]
    index[~lands] = zero_pixel
    keep = lands.any(1)
    flops = 0.0
    groups = []
    if keep.any():
        patterns, inverse = torch.unique(lands[keep], dim=0, return_inverse=True)
        as_taps = [tuple(torch.nonzero(p).squeeze(1).tolist()) for p in patterns]
        merged = _merge_patterns(as_taps)
        kept = index[keep]
        for target in dict.fromkeys(merged.values()):
            members = [g for g, p in enumerate(as_taps) if merged[p] == target]
            rows = kept[torch.isin(inverse, torch.tensor(members))][:, list(target)]
            groups.append((target, rows.contiguous()))
            flops += rows.shape[0] * len(target) ** 2  # a full product: y^T y by gemm
    for key in shifts:
        flops += (length - shift_of[key]) * (0.5 if key == (0, 0) else 1.0)
    return ShiftPlan((kh, kw), (hp, wp), prefix, length, tuple(shifts), shift_of,
                     tuple(partner), tuple(groups), flops)


def shifted_gram_flop_ratio(n: int, in_size, kernel, dilation, pad, out_size) -> float:
    """Multiply-adds of :func:`add_shifted_gram_` over those of the unfolded patches' symmetric
    Gram (``n R D^2 / 2``, ``D = k_h k_w`` per channel pair): below 1 it does less arithmetic."""
    plan = shift_plan(n, tuple(in_size), tuple(kernel), tuple(dilation), tuple(pad),
                      tuple(out_size))
    taps = kernel[0] * kernel[1]
    return plan.flops / (n * out_size[0] * out_size[1] * taps * taps / 2)


def _symmetric(gram: torch.Tensor) -> torch.Tensor:
    """``gram``'s upper triangle mirrored: exactly symmetric (a BLAS ``X^T X`` need not be)."""
    return torch.triu(gram).add_(torch.triu(gram, 1).mT)


def _canvas(xs: torch.Tensor, plan: ShiftPlan, pad, dtype) -> torch.Tensor:
    """``xs`` (``(n, c, h, w)``) zero-padded, images end to end behind ``plan.prefix`` zero
    pixels and followed by one: ``(c, prefix + n H_p W_p + 1)``."""
    n, c, h, w = xs.shape
    top, _, left, _ = pad
    hp, wp = plan.canvas
    canvas = xs.new_zeros(c, plan.prefix + plan.length + 1, dtype=dtype)
    canvas[:, plan.prefix:-1].view(c, n, hp, wp)[:, :, top:top + h, left:left + w] = \
        xs.transpose(0, 1)
    return canvas


#: bytes of result rows assembled at once (contiguously, then copied as whole rows)
ROW_CHUNK_BYTES = 1 << 20


def _subtract_margins_(out4: torch.Tensor, plan: ShiftPlan, canvas: torch.Tensor,
                       alpha: float) -> None:
    """``out4 -= alpha * (the margin positions' patch Grams)`` for one chunk's canvas, per group
    and block (``i <= j``; the transpose into ``(j, i)``): one ``c x c`` product alive."""
    pixels = canvas.mT  # (pixels, c): a gather takes whole pixels
    for taps_g, index in plan.groups:
        for i, t in enumerate(taps_g):
            y_i = pixels[index[:, i]]  # one offset's pixels at a time: (n_g, c)
            for j in range(i, len(taps_g)):
                b = y_i.mT @ (y_i if j == i else pixels[index[:, j]])
                if i == j:
                    out4[:, t, :, t].sub_(_symmetric(b).mul_(alpha))
                else:
                    b.mul_(alpha)
                    out4[:, t, :, taps_g[j]].sub_(b)
                    out4[:, taps_g[j], :, t].sub_(b.mT)


def _add_rows_(rows: torch.Tensor, plan: ShiftPlan, corr: dict, assign: bool) -> None:
    """Add (``assign``: write) the correlations into the result ``rows`` (``(c, k^2, D0)``) a
    band at a time: one kernel offset ``t``, about :data:`ROW_CHUNK_BYTES` of its channels'
    rows, built contiguously and written as whole rows (no pass over the result strided by the
    kernel size)."""
    c, taps, width = rows.shape
    band = max(1, ROW_CHUNK_BYTES // (width * rows.element_size()))
    for t in range(taps):
        sources = [corr[key].mT if flipped else corr[key] for key, flipped in plan.partner[t]]
        for r0 in range(0, c, band):
            row = torch.stack([src[r0:r0 + band] for src in sources], dim=2)
            row = row.view(row.shape[0], width)
            if assign:
                rows[r0:r0 + band, t].copy_(row)
            else:
                rows[r0:r0 + band, t].add_(row)


def add_shifted_gram_(out: torch.Tensor, x: torch.Tensor, examples_per_chunk: int, pad,
                      alpha: float, accumulate: bool, plan_of) -> None:
    """``out[:D0, :D0] (+)= alpha * sum_o patch_o patch_o^T`` for one channel segment ``x``
    (``(N, c, h, w)``), ``D0 = c k_h k_w`` in ``weight.reshape(C_out, -1)`` order (channel-major,
    then the kernel offsets); assigns when ``accumulate`` is false. ``plan_of(n)`` gives the
    :class:`ShiftPlan` of ``n`` examples.

    The examples go ``examples_per_chunk`` at a time (one padded canvas alive at once) and
    their correlations (``c x c``) add up; the margins' Grams are subtracted from the result
    block by block, each chunk's while its canvas lives (with several chunks the result is
    cleared first and the correlations added last; with one, they are written first). Exactly
    symmetric if ``out`` was: every block and its mirror get the same numbers, transposed, in
    the same order. Memory beyond ``out``: a canvas, the correlations, one band of rows and one
    ``c x c`` product."""
    n, c = x.shape[:2]
    single = examples_per_chunk >= n
    corr: dict = {}
    plan = plan_of(min(n, examples_per_chunk))
    taps = plan.kernel[0] * plan.kernel[1]
    rows = out[:c * taps, :c * taps].view(c, taps, c * taps)
    out4 = rows.view(c, taps, c, taps)
    if not accumulate and not single:
        rows.zero_()
    for e0 in range(0, n, examples_per_chunk):
        xs = x[e0:e0 + examples_per_chunk]
        plan = plan_of(xs.shape[0])
        canvas = _canvas(xs, plan, pad, out.dtype)
        flat = canvas[:, plan.prefix:-1]
        for key in plan.shifts:
            s = plan.shift_of[key]
            if key in corr:
                corr[key].addmm_(flat[:, :plan.length - s], flat[:, s:].mT)
            else:
                corr[key] = flat[:, :plan.length - s] @ flat[:, s:].mT
        if single:
            for key in plan.shifts:
                corr[key] = (_symmetric(corr[key]) if key == (0, 0) else corr[key]).mul_(alpha)
            _add_rows_(rows, plan, corr, assign=not accumulate)
            corr.clear()
        _subtract_margins_(out4, plan, canvas, alpha)
        del canvas, flat
    if not single:
        for key in plan.shifts:
            corr[key] = (_symmetric(corr[key]) if key == (0, 0) else corr[key]).mul_(alpha)
        _add_rows_(rows, plan, corr, assign=False)
