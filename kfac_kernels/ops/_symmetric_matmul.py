"""``a @ b`` for products known to be symmetric, in a little over half the flops of a full ``gemm``.

PyTorch exposes no ``syrk``/``gemmt``, so the output's columns are split into ``nb`` panels and
only the rows on and above each panel's diagonal block are computed: panel ``j`` (columns
``e_j .. e_{j+1}``) by one ``addmm`` of rows ``0 .. e_{j+1}`` into a view of the output (BLAS
writes it in place: the views have unit column stride). The part below the diagonal blocks is
then mirrored from above, one strip per panel, and each diagonal block is averaged with its
transpose, so the result is exactly symmetric. ``nb`` panels cost ``(nb + 1) / (2 nb)`` of the full
product plus ``O(d^2)`` copies.

The panel count (one thread, fp32, an AVX-512 Xeon; ``k^T (u k)`` with ``k``, ``u`` ``d x d``; time
relative to ``torch.mm``): panels of 128 columns up to ``d = 1535`` -- 0.86x at d = 512, 0.77x at
576, 0.76x at 1152, where square blocks of 192 rows or more, computed one ``addmm`` each, took
1.11x, 0.96x and 0.87x -- and six panels from there (0.69x at 2304, 0.71x at 4608; panels of 128
columns fall off BLAS speed in such tall products: 0.79x and 0.83x). Below 256 columns one
product, averaged with its transpose (1.6-1.9x of the bare product at d = 128: the average is a
pass over the output).
"""
from __future__ import annotations

import torch

#: the fewest columns per panel (narrower panels lose more BLAS efficiency than they save flops)
MIN_BLOCK = 128
#: the panels of products at least ``LARGE`` wide (see the module docstring)
MAX_BLOCKS = 6
LARGE = 12 * MIN_BLOCK


def block_edges(d: int) -> list[int]:
    """The panel edges ``e_0 = 0 < ... < e_nb = d`` of a ``d``-wide symmetric product."""
    nb = MAX_BLOCKS if d >= LARGE else max(1, d // MIN_BLOCK)
    return [(i * d) // nb for i in range(nb + 1)]


#: panels at least this wide are mirrored by column blocks (:func:`_copy_transposed`)
WIDE_PANEL = 256
#: the column block of those copies
TRANSPOSE_BLOCK = 32


def _copy_transposed(dst: torch.Tensor, src: torch.Tensor) -> None:
    """``dst.copy_(src.mT)`` by blocks of :data:`TRANSPOSE_BLOCK` columns of ``dst``. Read
    whole, a wide transposed strip of a large matrix takes each element from another cache line
    (and soon another page): one thread, fp32, mirroring the six 768-wide panels of a
    ``4608 x 4608`` product took 45 ms as one copy per panel and 6.9 ms by blocks of 32 columns
    (16: 2.8 ms, 64: 3.0 ms, 128: 4.0 ms on one strip; rows of blocks 18 ms); for panels of 128
    columns the single copy is faster (0.7 vs 1.9 ms at d = 1535)."""
    for c in range(0, dst.shape[-1], TRANSPOSE_BLOCK):
        dst[:, c:c + TRANSPOSE_BLOCK].copy_(src[c:c + TRANSPOSE_BLOCK].mT)


def mirror_upper(out: torch.Tensor, edges: list[int]) -> torch.Tensor:
    """Make ``out`` (``(d, d)``, panels at ``edges``, computed on and above the diagonal blocks)
    exactly symmetric: each panel's strip left of its diagonal block is copied from the panel's
    rows above that block (one transposed copy per panel, by column blocks for wide panels), and
    each diagonal block, computed whole, becomes the mean of itself and its transpose
    (``x + y == y + x`` in floating point; one pass where copying its upper triangle takes
    three)."""
    nb = len(edges) - 1
    for i in range(nb):
        i0, i1 = edges[i], edges[i + 1]
        diag = out[i0:i1, i0:i1]
        if i1 - i0 < WIDE_PANEL:
            if i0:
                out[i0:i1, :i0].copy_(out[:i0, i0:i1].mT)
            diag.copy_(torch.add(diag, diag.mT).mul_(0.5))
            continue
        if i0:
            _copy_transposed(out[i0:i1, :i0], out[:i0, i0:i1])
        transposed = torch.empty_like(diag)
        _copy_transposed(transposed, diag)
        diag.add_(transposed).mul_(0.5)
    return out


def add_symmetric_matmul_(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, *,
                          alpha: float = 1.0, beta: float = 1.0,
                          mirror: bool = True) -> torch.Tensor:
    """``out <- beta * out + alpha * a @ b`` (in place) where ``a @ b`` is symmetric
    (``(d, m) @ (m, d)``; ``beta = 0`` ignores what ``out`` held, NaN included):
    only the panels' rows on and above their diagonal blocks are computed; with ``mirror`` the
    rest is then copied from them (leave ``mirror=False`` to accumulate several products and
    mirror once at the end with :func:`mirror_upper`; ``out``'s part below the diagonal blocks
    is then not updated)."""
    edges = block_edges(out.shape[-1])
    for j in range(len(edges) - 1):
        j0, j1 = edges[j], edges[j + 1]
        out[:j1, j0:j1].addmm_(a[:j1], b[:, j0:j1], beta=beta, alpha=alpha)
    return mirror_upper(out, edges) if mirror else out


def symmetric_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` for a product known to be symmetric, e.g. ``x.mT @ x`` or ``k.mT @ (u @ k)``
    with ``u`` symmetric; exactly symmetric. 2-d, or batched (leading axes) where the product
    is one panel (``d < 2 MIN_BLOCK``)."""
    d = a.shape[-2]
    if len(block_edges(d)) == 2:  # one panel: the full product, averaged with its transpose
        out = a @ b
        return out.add(out.mT).mul_(0.5)
    if a.dim() != 2 or b.dim() != 2:
        raise ValueError(f"symmetric_matmul: a product of {d} columns takes 2-d operands, got "
                         f"{tuple(a.shape)} and {tuple(b.shape)}")
    out = torch.empty(d, d, dtype=torch.promote_types(a.dtype, b.dtype), device=a.device)
    return add_symmetric_matmul_(out, a, b, beta=0.0)
