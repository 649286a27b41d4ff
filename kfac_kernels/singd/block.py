r"""SINGD's curvature block: the structured factors ``K``, ``C`` (and momenta ``m_K``, ``m_C``) of
one layer, per group, fed by the one capture.

The block asks the capture for the statistics its structures need: for diagonal and
block-diagonal ``K`` (``C``), :math:`H_K = \hat\Pi(K^T U K)` depends on ``U`` only through
:math:`\hat\Pi(U)` (its diagonal, or its diagonal blocks), so only those are accumulated -- from
the layer's rows, or for convolutions from the input without im2col
(:func:`kfac_kernels.ops.patch_covariance_diagonal` /
:func:`~kfac_kernels.ops.patch_covariance_blocks`) -- and the ``d x d`` matrix ``U`` is never
formed: ``O(m d)`` / ``O(m d k)`` work and ``O(d)`` / ``O(d k)`` memory instead of ``O(m d^2)``
and ``O(d^2)``. Since :math:`\hat\Pi` is linear, sums over micro-batches (or processes) are the
statistics of the summed ``U``. Other structures take the dense ``U`` / ``G``
(``statistics_from_rows=False`` takes them for every structure and projects: the readable
reference path; the same result up to round-off).

``K`` is applied once per factor update (``congruence_of_projection``), so the statistics do not
depend on ``K`` (cheaper, and safe when the factors change between forward passes).
"""
from __future__ import annotations

import torch

from .._flags import keep_finite
from ..blocks.base import CurvatureBlock
from ..layers import DENSE, DIAGONAL, ROWS, GramRows, Layout, blocks
from ..ops._symmetric_matmul import block_edges, symmetric_matmul
from .structures import BlockDiagonal, Dense, Diagonal, StructuredMatrix
from .update import GramOfRows, factor_update, precondition
from .warm import warm_factor


def structure_layout(cls: type[StructuredMatrix], k: int | None, dim: int,
                     from_rows: bool, rows_statistics: bool = False) -> Layout:
    """The statistic a structure needs of a side of ``dim`` coordinates (``rows_statistics``:
    whether the layer's adapter can hand over its rows)."""
    if from_rows and cls is Dense and rows_statistics:
        return ROWS
    if not from_rows or cls not in (Diagonal, BlockDiagonal):
        return DENSE
    if cls is Diagonal:
        return DIAGONAL
    q, r = divmod(dim, k)
    return blocks([k] * q + ([r] if r else []))


def to_structure(value, layout: Layout, cls, k, dim: int, group: int):
    """Group ``group`` of a statistic in ``layout`` as ``cls`` consumes it: its projection
    (:class:`Diagonal`, :class:`BlockDiagonal`) where the layout holds exactly that, else the
    dense matrix (``factor_update`` projects a dense statistic itself); a
    :class:`~kfac_kernels.layers.GramRows` statistic as its rows (:class:`GramOfRows`)."""
    if isinstance(value, GramRows):
        return GramOfRows(value.rows[group])
    if layout.kind == "diagonal":
        if cls is Diagonal:
            return Diagonal(dim, (value[group],))
        return torch.diag_embed(value[group])
    if layout.kind == "blocks":
        parts = [b[group] for b in value]
        q = dim // k if k else 0
        if cls is BlockDiagonal and all(p.shape[-1] == k for p in parts[:q]) \
                and len(parts) - q in (0, 1):
            full = torch.stack(parts[:q]) if q else parts[0].new_zeros(0, k, k)
            last = parts[q] if len(parts) > q else parts[0].new_zeros(0, 0)
            return BlockDiagonal(dim, (full, last), k)
        return torch.block_diag(*parts)
    return value[group]


class SingdBlock(CurvatureBlock):
    """``K``, ``C`` (structures ``classes``, block sizes ``block_sizes``), stored in
    ``storage`` dtypes, updated in the ``compute`` dtype; see :class:`kfac_kernels.SINGD`."""

    structure = "singd"

    def __init__(self, name, adapter, *, approx, dtype, backend="auto", classes, block_sizes,
                 from_rows: bool, storage: tuple[torch.dtype, torch.dtype],
                 compute: torch.dtype, momentum: bool):
        self.classes, self.block_sizes = classes, block_sizes
        self.storage, self.compute, self.momentum = storage, compute, momentum
        super().__init__(name, adapter, approx=approx, dtype=dtype, backend=backend,
                         classes=classes, block_sizes=block_sizes, from_rows=from_rows)
        self.state: dict[str, list[StructuredMatrix]] | None = None
        # (key, group) -> (the stored factor tensor it was formed from, S S^T): a stored factor
        # is replaced, never changed in place, so identity says whether the square is current
        self._squares: dict[tuple[str, int], tuple[torch.Tensor, torch.Tensor]] = {}

    @classmethod
    def layouts(cls, adapter, *, classes, block_sizes, from_rows, **options):
        (ck, cc), (kk, kc) = classes, block_sizes
        rows = adapter.rows_statistics
        return (structure_layout(ck, kk, adapter.in_features_per_group, from_rows, rows),
                structure_layout(cc, kc, adapter.out_features_per_group, from_rows, rows))

    # --- statistics ---------------------------------------------------------------------------
    def pending_statistics(self) -> list[tuple] | None:
        """Per group ``(U, G)`` of this step in the compute dtype (structured projections or
        dense matrices), or ``None`` when a side saw no data."""
        p = self.pending
        if p is None or not p.complete:
            return None
        (ck, cc), (kk, kc) = self.classes, self.block_sizes
        d_i = self.adapter.in_features_per_group
        d_o = self.adapter.out_features_per_group
        out = []
        for gi in range(self.groups):
            u = to_structure(p.a, self.a_layout, ck, kk, d_i, gi)
            g = to_structure(p.g, self.g_layout, cc, kc, d_o, gi)
            u = u / p.rows if isinstance(u, torch.Tensor) else u.scale(1.0 / p.rows)
            out.append((u.to(self.compute), g.to(self.compute)))
        return out

    @staticmethod
    def statistics_finite(stats: list[tuple]) -> torch.Tensor:
        """A 0-d tensor, finite iff every statistic is (their traces: Gram matrices)."""
        return torch.stack([(torch.diagonal(s).sum() if isinstance(s, torch.Tensor)
                             else s.trace()).to(torch.float64)
                            for pair in stats for s in pair]).sum()

    # --- factors ------------------------------------------------------------------------------
    def initial_state(self) -> dict[str, list[StructuredMatrix]]:
        """``K = C = I`` and zero momenta (the reference implementation's start)."""
        (ck, cc), (kk, kc) = self.classes, self.block_sizes
        dk, dc = self.storage
        dev = self.device
        di, do = self.adapter.in_features_per_group, self.adapter.out_features_per_group
        g = self.groups
        state = {"K": [ck.eye(di, kk, dtype=dk, device=dev) for _ in range(g)],
                 "C": [cc.eye(do, kc, dtype=dc, device=dev) for _ in range(g)]}
        if self.momentum:
            state["m_K"] = [ck.zeros(di, kk, dtype=dk, device=dev) for _ in range(g)]
            state["m_C"] = [cc.zeros(do, kc, dtype=dc, device=dev) for _ in range(g)]
        return state

    def warm_start(self, stats: list[tuple], damping: float) -> None:
        """Start ``K``, ``C`` at ``K K^T ~ (U + damping I)^{-1}``, ``C C^T ~ (G + damping
        I)^{-1}`` of the statistics ``stats`` (per group), the momenta at zero
        (:mod:`kfac_kernels.singd.warm`)."""
        state = self.initial_state()
        (ck, cc), (kk, kc) = self.classes, self.block_sizes
        dk, dc = self.storage
        for gi, (u, g) in enumerate(stats):
            state["K"][gi] = warm_factor(ck, kk, u, damping, self.compute).to(dk)
            state["C"][gi] = warm_factor(cc, kc, g, damping, self.compute).to(dc)
        self.state = state

    def restart(self) -> None:
        """Forget ``K``, ``C`` and their momenta: the next use starts them again (the identity,
        or the warm start at the next factor update; :mod:`kfac_kernels.singd.guard`)."""
        self.state = None
        self._squares.clear()

    def factors(self) -> dict[str, list[StructuredMatrix]]:
        if self.state is None:
            self.state = self.initial_state()
        return self.state

    def update_factors(self, stats: list[tuple], settings: dict) -> torch.Tensor:
        """The readable update of Fig. 4 (IKFAC: Eq. 10) of the SINGD paper, per group; returns
        the update's health (see :meth:`store`)."""
        state = self.factors()
        health = []
        for gi, (u, g) in enumerate(stats):
            old = {key: state[key][gi].to(self.compute) for key in state}
            new = factor_update(old["K"], old["C"], u, g, m_K=old.get("m_K"),
                                m_C=old.get("m_C"), **settings)
            health.append(self.store(gi, new))
        return torch.stack(health).sum()

    def store(self, gi: int, new: dict[str, StructuredMatrix]) -> torch.Tensor:
        """Store group ``gi``'s updated factors in their storage dtypes where the update is
        finite (else the previous ones stay: decided on the device, no host read) and return
        its health, a 0-d tensor finite iff every new factor is."""
        health = torch.stack([s.max_abs().to(torch.float64) for s in new.values()]).sum()
        dk, dc = self.storage
        state = self.factors()
        for key, s in new.items():
            s = s.to(dk if key.endswith("K") else dc)
            old = state[key][gi]
            state[key][gi] = type(s)(s.dim, tuple(keep_finite(n, o, health)
                                                  for n, o in zip(s.data, old.data)), s.k)
        return health

    def precondition(self, mat: torch.Tensor, uses: int = 1) -> torch.Tensor:
        """``C C^T M K K^T`` per group, in the compute dtype; ``uses``: how many steps the
        factors serve (SINGD's ``T``), for :meth:`dense_square`."""
        state = self.factors()
        out = []
        for gi in range(mat.shape[0]):
            k, c = state["K"][gi].to(self.compute), state["C"][gi].to(self.compute)
            d_o, d_i = mat.shape[-2:]
            out.append(precondition(k, c, mat[gi].to(self.compute),
                                    kkt=self.dense_square("K", gi, k, uses * d_o),
                                    cct=self.dense_square("C", gi, c, uses * d_i)))
        return torch.stack(out)

    def dense_square(self, key: str, gi: int, factor: StructuredMatrix,
                     rows: int) -> torch.Tensor | None:
        """``S S^T`` of a dense factor ``S`` (``key``, group ``gi``; in the compute dtype),
        cached until the factor changes, where that is cheaper than two products per use:
        applying ``S S^T`` to the ``rows`` rows the factors will precondition (summed over their
        uses) costs ``2 rows d^2`` flops less than two products, and forming it ``f 2 d^3``
        (``f ~ 0.6``, :func:`~kfac_kernels.ops._symmetric_matmul.symmetric_matmul`); else
        ``None``. One more ``d x d`` matrix per factor where it pays."""
        if type(factor) is not Dense:
            return None
        d = factor.dim
        edges = block_edges(d)
        nb = len(edges) - 1
        if rows * 2 * nb <= (nb + 1) * d:
            return None
        source = self.factors()[key][gi].data[0]
        cached = self._squares.get((key, gi))
        if cached is not None and cached[0] is source:
            return cached[1]
        m = factor.data[0]
        square = symmetric_matmul(m, m.mT)
        self._squares[(key, gi)] = (source, square)
        return square
