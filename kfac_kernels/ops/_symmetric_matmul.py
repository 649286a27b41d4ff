"""``a @ b`` for products known to be symmetric, in about half the flops of a full ``gemm``.

PyTorch exposes no ``syrk``/``gemmt``, so the product is split into ``nb x nb`` blocks and only
the ``nb (nb + 1) / 2`` blocks on and above the diagonal are computed, each by one ``addmm`` into
a view of the output (BLAS writes it in place: the views have unit column stride); the lower
blocks are then mirrored from the upper ones, and each diagonal block from its own upper
triangle, so the result is exactly symmetric. ``nb`` blocks cost ``(nb + 1) / (2 nb)`` of the full
product (about 0.58 at ``nb = 6``) plus ``O(d^2)`` copies; blocks are kept at 192 rows or more so
that each ``addmm`` still runs at BLAS speed (one block, a plain product, below 384).
"""
from __future__ import annotations

import torch

#: the fewest rows per block (smaller blocks lose more BLAS efficiency than they save flops)
MIN_BLOCK = 192
#: the most blocks (past 6, the per-call overhead and thinner blocks eat the saving)
MAX_BLOCKS = 6


def block_edges(d: int) -> list[int]:
    nb = max(1, min(MAX_BLOCKS, d // MIN_BLOCK))
    return [(i * d) // nb for i in range(nb + 1)]


def mirror_upper(out: torch.Tensor, edges: list[int]) -> torch.Tensor:
    """Copy the upper triangle of ``out`` (``(d, d)``, blocks at ``edges``) onto the lower."""
    nb = len(edges) - 1
    for i in range(nb):
        i0, i1 = edges[i], edges[i + 1]
        diag = out[i0:i1, i0:i1]
        lower = torch.triu(diag, 1).mT
        diag.triu_().add_(lower)
        for j in range(i + 1, nb):
            j0, j1 = edges[j], edges[j + 1]
            out[j0:j1, i0:i1].copy_(out[i0:i1, j0:j1].mT)
    return out


def add_symmetric_matmul_(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, *,
                          alpha: float = 1.0, beta: float = 1.0,
                          mirror: bool = True) -> torch.Tensor:
    """``out <- beta * out + alpha * a @ b`` (in place) where ``a @ b`` is symmetric
    (``(d, m) @ (m, d)``; ``beta = 0`` ignores what ``out`` held, NaN included):
    only the upper block triangle is computed; with ``mirror`` the lower one is then copied from
    it (leave ``mirror=False`` to accumulate several products and mirror once at the end with
    :func:`mirror_upper`; ``out``'s lower part is then not updated)."""
    edges = block_edges(out.shape[-1])
    nb = len(edges) - 1
    for i in range(nb):
        i0, i1 = edges[i], edges[i + 1]
        for j in range(i, nb):
            j0, j1 = edges[j], edges[j + 1]
            out[i0:i1, j0:j1].addmm_(a[i0:i1], b[:, j0:j1], beta=beta, alpha=alpha)
    return mirror_upper(out, edges) if mirror else out


def symmetric_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` (2-d) for a product known to be symmetric, e.g. ``x.mT @ x`` or
    ``k.mT @ (u @ k)`` with ``u`` symmetric; exactly symmetric."""
    d = a.shape[0]
    if d < 2 * MIN_BLOCK:
        out = a @ b
        return mirror_upper(out, [0, d])
    out = torch.empty(d, d, dtype=torch.promote_types(a.dtype, b.dtype), device=a.device)
    return add_symmetric_matmul_(out, a, b, beta=0.0)
