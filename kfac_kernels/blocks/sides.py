r"""One side (``A`` or ``G``) of a Kronecker factor pair, in a layout, as a list of parts.

A side's value is held as a list of *parts*, per group stacked first: a dense side is one part
``(groups, n, n)``, a block-diagonal side one part per diagonal block ``(groups, w, w)``, a
diagonal side one part ``(groups, n)``. The functions here are what every layout must answer:
its trace, its products with a matrix from the left and the right (the preconditioner is
``blockdiag`` of per-part matrices), and the decompositions' bookkeeping.
"""
from __future__ import annotations

import torch

from ..layers import Layout


def as_parts(value, layout: Layout) -> list[torch.Tensor]:
    """The list-of-parts form of a statistic in ``layout``."""
    if value is None:
        return None
    return list(value) if layout.kind == "blocks" else [value]


def trace(parts: list[torch.Tensor], layout: Layout) -> torch.Tensor:
    """``(groups,)`` traces of a side."""
    if layout.kind == "diagonal":
        return parts[0].sum(-1)
    return sum(torch.diagonal(p, dim1=-2, dim2=-1).sum(-1) for p in parts)


def largest_eigenvalue(parts: list[torch.Tensor], layout: Layout,
                       iterations: int = 20) -> torch.Tensor:
    """``(groups,)`` largest eigenvalues of a PSD side (the largest over its parts), by power
    iteration for dense and block parts (a lower bound, accurate to a few digits: enough for a
    damping scale). See :func:`largest_eigenvalues`, which does many sides at once."""
    return largest_eigenvalues([(parts, layout)], iterations)[0]


def largest_eigenvalues(sides: list[tuple[list[torch.Tensor], Layout]],
                        iterations: int = 20) -> list[torch.Tensor]:
    """:func:`largest_eigenvalue` of every ``(parts, layout)`` in ``sides`` (of any layers),
    in as few calls as their part widths allow.

    The parts of every side iterate together, one stack per width, dtype and device (a
    network's many same-size blocks then cost the ops of one: at these sizes the call is
    host-bound, ops and not flops are its cost). Each part is first divided by its trace, so
    its eigenvalues lie in [1 / n, 1]: the iterate then shrinks by at most n^5 in five
    products, and is normalised every fifth one only (a fifth of the normalisations; the same
    iterates up to rounding)."""
    out: list = [None] * len(sides)
    stacks: dict[tuple, list] = {}          # (width, dtype, device) -> [(side, part index, part)]
    for i, (parts, layout) in enumerate(sides):
        if layout.kind == "diagonal":
            out[i] = parts[0].amax(-1)
            continue
        for j, p in enumerate(parts):
            stacks.setdefault((p.shape[-1], p.dtype, p.device), []).append((i, j, p))
    per_part: dict[tuple[int, int], torch.Tensor] = {}
    for members in stacks.values():
        stack = torch.cat([p for _, _, p in members]) if len(members) > 1 else members[0][2]
        lam = _power_iteration(stack, iterations)
        for (i, j, _), value in zip(members, lam.split([p.shape[0] for _, _, p in members])):
            per_part[i, j] = value
    for i, (parts, layout) in enumerate(sides):
        if out[i] is None:
            values = [per_part[i, j] for j in range(len(parts))]
            out[i] = values[0] if len(values) == 1 else torch.stack(values).amax(0)
    return out


def _power_iteration(stack: torch.Tensor, iterations: int) -> torch.Tensor:
    """Largest eigenvalues ``(b,)`` of a stack ``(b, n, n)`` of PSD matrices."""
    tiny = torch.finfo(stack.dtype).tiny
    scale = torch.diagonal(stack, dim1=-2, dim2=-1).sum(-1).clamp_min(tiny)
    unit = stack / scale[:, None, None]
    # row iterates, v^T A (= (A v)^T, A symmetric): a batched row-times-matrix product is many
    # times faster than the batched matrix-times-column one on the CPU (12 against 96 us for
    # 4 blocks of 129, one thread)
    v = torch.ones(stack.shape[:-1], dtype=stack.dtype, device=stack.device)[:, None, :]
    for step in range(1, iterations + 1):
        v = torch.bmm(v, unit)
        if step % 5 == 0 or step == iterations:
            v = v / torch.linalg.vector_norm(v, dim=-1, keepdim=True).clamp_min(tiny)
    return (torch.bmm(v, unit) * v).sum(-1)[:, 0] * scale


def dim(parts: list[torch.Tensor]) -> int:
    return sum(p.shape[-1] for p in parts)


def widths(parts: list[torch.Tensor]) -> list[int]:
    return [p.shape[-1] for p in parts]


def _lead(parts: list[torch.Tensor]) -> int:
    """How many leading parts share the first part's width (at least 1)."""
    q = parts[0].shape[-1]
    return next((i for i, p in enumerate(parts) if p.shape[-1] != q), len(parts))


def _stacked_product(stacked: torch.Tensor, rest: list[torch.Tensor], mat: torch.Tensor,
                     apply) -> torch.Tensor:
    """``apply`` of the stacked equal-width parts ``(groups, lead, q, q)`` to their rows of
    ``mat`` ``(groups, rows, cols)`` in one batched call, of each part of ``rest`` to the rows
    after them, joined."""
    groups, rows, cols = mat.shape
    lead, q = stacked.shape[1], stacked.shape[-1]
    out = [apply(stacked, mat[:, :q * lead].reshape(groups, lead, q, cols)).reshape(
        groups, q * lead, cols)]
    start = q * lead
    for p in rest:
        w = p.shape[-1]
        out.append(apply(p, mat[:, start:start + w]))
        start += w
    return torch.cat(out, dim=1) if len(out) > 1 else out[0]


def _blockwise(parts: list[torch.Tensor], mat: torch.Tensor, apply) -> torch.Tensor:
    """``apply(part, rows)`` for every part and its rows of ``mat`` ``(groups, rows, cols)``,
    joined; the leading equal-size parts are one batched call."""
    if len(parts) == 1:
        return apply(parts[0], mat)
    lead = _lead(parts)
    return _stacked_product(torch.stack(parts[:lead], dim=1), parts[lead:], mat, apply)


#: a block-diagonal side is multiplied as one dense matrix, its zero blocks included, when it
#: is at most this wide and the dense product takes at most DENSE_BLOCKS_WORK multiply-adds:
#: there one product costs less than the batched product of the equal blocks, the last
#: block's own product and the join of the two (see :func:`_prepare`)
DENSE_BLOCKS_MAX = 128
DENSE_BLOCKS_WORK = 3 << 19
#: the most entries of a side whose prepared form (dense or stacked) a cache keeps: above
#: it the products dominate and the copy would only add memory
PREPARED_MAX = 1 << 16


def _dense(n: int, cols: int) -> bool:
    return n <= DENSE_BLOCKS_MAX and n * n * cols <= DENSE_BLOCKS_WORK


def _prepare(parts: list[torch.Tensor], transpose: bool, dense: bool):
    """A block-diagonal side in the form its products take: ``("dense", (groups, n, n))``, or
    ``("stacked", (groups, lead, q, q), rest)`` with the leading equal-size blocks stacked once
    (``parts^T`` with ``transpose``). Measured on one thread (fp32; 4 blocks, the last one
    wider by the bias coordinate where n is odd), per product, blockwise / stacked once /
    dense: n = 17, 64 columns: 18 / 15 / 3.4 us; n = 65, 256 columns: 33 / 39 / 23 us;
    n = 96, 256 columns: 16 / 12.5 / 23 us; n = 256, 64 columns: 40 / 27 / 61 us."""
    if transpose:
        parts = [p.mT for p in parts]
    if dense:
        n = sum(p.shape[-1] for p in parts)
        first = parts[0]
        out = first.new_zeros(first.shape[0], n, n)
        start = 0
        for p in parts:
            w = p.shape[-1]
            out[:, start:start + w, start:start + w] = p
            start += w
        return ("dense", out)
    lead = _lead(parts)
    return ("stacked", torch.stack(parts[:lead], dim=1), parts[lead:])


def _prepared(parts: list[torch.Tensor], transpose: bool, cols: int, cache: dict):
    """:func:`_prepare`'s form of ``parts`` for products with ``cols`` columns, kept in
    ``cache`` (the caller's dict for this side) while the same part tensors stay unmodified
    (their identities and versions: in-place writes bump them; the entry keeps the parts
    alive, so an identity is not reused); ``None`` where it is not worth keeping."""
    if sum(p.numel() for p in parts) > PREPARED_MAX:
        return None
    key = (transpose, _dense(sum(p.shape[-1] for p in parts), cols))
    versions = tuple((id(p), p._version) for p in parts)
    entry = cache.get(key)
    if entry is None or entry[0] != versions:
        entry = cache[key] = (versions, parts, _prepare(parts, *key))
    return entry[2]


def _apply_prepared(form, mat: torch.Tensor) -> torch.Tensor:
    if form[0] == "dense":
        return torch.matmul(form[1], mat)
    return _stacked_product(form[1], form[2], mat, torch.matmul)


def left(parts: list[torch.Tensor] | None, mat: torch.Tensor, layout: Layout,
         transpose: bool = False, cache: dict | None = None) -> torch.Tensor:
    """``blockdiag(parts) @ mat`` for ``mat`` ``(groups, rows, cols)`` (``parts^T`` with
    ``transpose``); a diagonal side scales the rows; ``parts=None`` is the identity. The
    leading equal-size blocks are one batched product. ``cache``: a dict, one per side, that
    keeps a block-diagonal side's prepared form between calls (see :func:`_prepared`)."""
    if parts is None:
        return mat
    if layout.kind == "diagonal":
        return parts[0][:, :, None] * mat
    if len(parts) > 1 and cache is not None:
        form = _prepared(parts, transpose, mat.shape[-1], cache)
        if form is not None:
            return _apply_prepared(form, mat)
    if transpose:
        parts = [p.mT for p in parts]
    return _blockwise(parts, mat, torch.matmul)


def right(mat: torch.Tensor, parts: list[torch.Tensor] | None, layout: Layout,
          transpose: bool = False, cache: dict | None = None) -> torch.Tensor:
    """``mat @ blockdiag(parts)`` (``parts^T`` with ``transpose``)."""
    return left(parts, mat.mT, layout, transpose=not transpose, cache=cache).mT


def cholesky_solve_rows(factor: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``(L L^T)^{-1} @ rows`` for a lower Cholesky factor ``L`` (batched), as two triangular
    solves from the right on ``rows^T`` (``Z L L^T = rows^T``): LAPACK's ``trsm`` then reads the
    gradient's row-major storage as it lies. ``torch.cholesky_solve`` copies ``L`` and the
    right-hand side to column-major first; measured on one thread (fp32), this is 1.4x faster
    for ``L`` of 4608 with 512 columns and 1.5-3.5x for ``L`` of 64-512 with 9x as many."""
    y = torch.linalg.solve_triangular(factor.mT, rows.mT, upper=True, left=False)
    return torch.linalg.solve_triangular(factor, y, upper=False, left=False).mT


def solve_left(chol: list[torch.Tensor], mat: torch.Tensor, layout: Layout) -> torch.Tensor:
    """``blockdiag(L L^T)^{-1} @ mat`` from lower Cholesky factors ``L`` (two triangular solves
    per part); a diagonal side holds ``L``'s diagonal (a vector) and divides the rows by its
    square."""
    if layout.kind == "diagonal":
        return mat / (chol[0] * chol[0])[:, :, None]
    return _blockwise(chol, mat, cholesky_solve_rows)


def solve_right(mat: torch.Tensor, chol: list[torch.Tensor], layout: Layout) -> torch.Tensor:
    """``mat @ blockdiag(L L^T)^{-1}`` (the factors are symmetric)."""
    return solve_left(chol, mat.mT, layout).mT


def concat_values(vals: list[torch.Tensor]) -> torch.Tensor:
    """Per-part eigenvalue vectors ``(groups, w)`` joined into ``(groups, n)``."""
    return vals[0] if len(vals) == 1 else torch.cat(vals, dim=-1)
