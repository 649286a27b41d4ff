"""SINGD's dense factor update and preconditioned gradient of many layers as one stack.

With dense ``K`` and ``C`` (INGD, IKFAC, ``singd-dense``), one layer's update of Fig. 4 of the
SINGD paper is about twenty small products and element-wise ops, its preconditioned gradient
four more, its health checks a few: on a network of many small layers (a deep MLP, the repeated
blocks of a transformer) the CPU step then costs dispatch, not flops. Here the layers whose
factors, statistics and gradients have the same shapes and dtypes go as one stack along a
leading axis: the formula of :func:`kfac_kernels.singd.update._dense_factor_update` and
:func:`~kfac_kernels.singd.update.precondition`, op for op, batched. The results equal the
per-layer path up to round-off (a batched product may order its sums differently).

Only widths whose symmetric products are one product (below 256, one panel of
:func:`kfac_kernels.ops._symmetric_matmul.block_edges`) are stacked: wider layers' products
cost more than their dispatch, and stacking would copy large factors. A layer alone in its
shape, or whose statistics or structure differ, takes the per-layer path.

Each layer stays its own: its health is checked and its non-finite update not stored on its
own (:meth:`kfac_kernels.singd.block.SingdBlock.store`'s rule), and the stored factors are
views of the stacked results (made fresh by each update, so nothing is copied back).
"""
from __future__ import annotations

import torch

from .._flags import reads_are_free
from ..layers import GramRows
from ..ops._symmetric_matmul import block_edges, symmetric_matmul
from .structures import Dense
from .update import GramOfRows


def _one_panel(d: int) -> bool:
    return len(block_edges(d)) == 2


def layer_key(block) -> tuple | None:
    """What layers must share to be stacked (``None``: this one never is): dense ``K`` and
    ``C`` of one group, one-panel widths, the dtypes, momentum, the device. It does not change
    during training: callers keep it."""
    if block.groups != 1 or any(c is not Dense for c in block.classes):
        return None
    d_i, d_o = block.adapter.in_features_per_group, block.adapter.out_features_per_group
    if not (_one_panel(d_i) and _one_panel(d_o)):
        return None
    return (d_i, d_o, block.compute, block.storage, block.momentum, block.device)


def stack_groups(keys: dict) -> tuple[list[list], list]:
    """The names with a shared key in runs of two or more, and the others."""
    by_key: dict = {}
    alone = []
    for name, key in keys.items():
        if key is None:
            alone.append(name)
        else:
            by_key.setdefault(key, []).append(name)
    stacks = []
    for names in by_key.values():
        if len(names) > 1:
            stacks.append(names)
        else:
            alone += names
    return stacks, alone


def pending_key(block) -> tuple | None:
    """The row count, kinds (dense or rows), shapes and dtypes of a layer's pending statistics
    (``None``: not complete, or neither kind). The count is part of it so that a stack's ``U``
    is divided by one number (a vector of counts would be made from host data)."""
    p = block.pending
    if p is None or not p.complete:
        return None
    kinds = [p.rows]
    for v in (p.a, p.g):
        if isinstance(v, GramRows):
            kinds.append(("rows", tuple(v.rows.shape), v.rows.dtype))
        elif isinstance(v, torch.Tensor):
            kinds.append(("dense", tuple(v.shape), v.dtype))
        else:
            return None
    return tuple(kinds)


def pending_statistics(blocks: list) -> tuple[list[list[tuple]], tuple, list[torch.Tensor]]:
    """:meth:`kfac_kernels.singd.block.SingdBlock.pending_statistics` of the stacked layers
    ``blocks`` (one group each, statistics of one :func:`pending_key`) and
    :meth:`~kfac_kernels.singd.block.SingdBlock.statistics_finite` of each, in a few ops for all:
    per layer its ``[(U, G)]`` (views of the stacks), the stacked ``(U, G)`` for
    :func:`update_factors`, and per layer a 0-d float64 tensor, finite iff its statistics are
    (their traces: Gram matrices)."""
    compute = blocks[0].compute
    rows = blocks[0].pending.rows       # the same for all (pending_key)
    stacks, views, traces = [], [], []
    for side in ("a", "g"):
        values = [getattr(b.pending, side) for b in blocks]
        if isinstance(values[0], GramRows):
            x = torch.cat([v.rows for v in values]).to(compute)
            weight = 1.0 * (1.0 / rows) if side == "a" else 1.0   # GramOfRows(x).scale(1 / rows)
            stacks.append(GramOfRows(x, weight))
            views.append([GramOfRows(xi, weight) for xi in x.unbind(0)])
            traces.append((x * x).sum((1, 2)) * weight)
        else:
            m = torch.cat(values)
            if side == "a":   # the Gram of the rows, divided by their count
                m = m / rows
            m = m.to(compute)
            stacks.append(m)
            views.append(list(m.unbind(0)))
            traces.append(torch.diagonal(m, dim1=-2, dim2=-1).sum(-1))
    health = (traces[0].to(torch.float64) + traces[1].to(torch.float64)).unbind(0)
    return [[pair] for pair in zip(*views)], tuple(stacks), list(health)


def stack_statistics(stats: list[tuple]) -> tuple:
    """The stacked ``(U, G)`` of layers' ``(U, G)`` (one group each, of one kind per side and,
    from rows, one weight: :func:`pending_key`)."""
    out = []
    for side in zip(*stats):
        if isinstance(side[0], GramOfRows):
            out.append(GramOfRows(torch.stack([s.x for s in side]), side[0].weight))
        else:
            out.append(torch.stack(side))
    return tuple(out)


def _stacked_factor(blocks: list, key: str, dtype: torch.dtype) -> torch.Tensor:
    return torch.stack([b.factors()[key][0].data[0] for b in blocks]).to(dtype)


def _congruence(S: torch.Tensor, U) -> torch.Tensor:
    """``S^T U S`` per layer from the stacked dense ``U`` or their rows (a
    :class:`~kfac_kernels.singd.update.GramOfRows` of stacked rows, one weight; see
    :func:`kfac_kernels.singd.update._congruence`)."""
    if isinstance(U, GramOfRows):
        y = torch.matmul(U.x, S)
        return symmetric_matmul(y.mT, y) * U.weight
    return symmetric_matmul(S.mT, torch.matmul(U, S))


def update_factors(blocks: list, U, G, settings: dict) -> list[torch.Tensor]:
    """Step 1 of Fig. 4 (IKFAC: Eq. 10) for the stacked layers ``blocks`` (one group each) from
    their stacked statistics ``U``, ``G`` (:func:`pending_statistics`,
    :func:`stack_statistics`): the new factors stored where finite, per layer; returns each
    layer's health (finite iff all of its new factors are)."""
    first = blocks[0]
    compute = first.compute
    damping, alpha1, lr_cov = settings["damping"], settings["alpha1"], settings["lr_cov"]
    kfac_like = settings["kfac_like"]
    d_i, d_o = first.adapter.in_features_per_group, first.adapter.out_features_per_group
    K, C = _stacked_factor(blocks, "K", compute), _stacked_factor(blocks, "C", compute)
    h_k, h_c = _congruence(K, U), _congruence(C, G)
    ktk, ctc = symmetric_matmul(K.mT, K), symmetric_matmul(C.mT, C)

    def trace(m):
        return torch.diagonal(m, dim1=-2, dim2=-1).sum(-1)[:, None, None]

    if kfac_like:
        a_k, b_k, a_c, b_c = 1.0, damping, 1.0, damping
    else:  # every trace before the products are overwritten
        a_k, b_k = trace(h_c) / d_o, damping * trace(ctc) / d_o
        a_c, b_c = trace(h_k) / d_i, damping * trace(ktk) / d_i
    momentum = first.momentum and not kfac_like
    new = {}
    for name, S, h, a, gram, b in (("K", K, h_k, a_k, ktk, b_k), ("C", C, h_c, a_c, ctc, b_c)):
        step = h.mul_(0.5 * a)          # (a H + b S^T S - I) / 2
        if isinstance(b, torch.Tensor):
            step.addcmul_(gram, 0.5 * b)
        else:
            step.add_(gram, alpha=0.5 * b)
        torch.diagonal(step, dim1=-2, dim2=-1).sub_(0.5)
        if momentum:
            step.add_(_stacked_factor(blocks, "m_" + name, compute), alpha=alpha1)
            new["m_" + name] = step
        new[name] = torch.baddbmm(S, S, step, alpha=-lr_cov)
    return _store(blocks, new)


def _largest_magnitudes(stack: torch.Tensor) -> torch.Tensor:
    """``max |x|`` per layer of a stack (NaN where a layer has one), in float64."""
    lo, hi = torch.aminmax(stack.reshape(stack.shape[0], -1), dim=-1)
    return torch.maximum(-lo, hi).to(torch.float64)


def _store(blocks: list, new: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    """Store each layer's new factors (in their storage dtypes) where all of them are finite,
    else keep its old ones; on the CPU by reading the healths (free there), on a device by
    ``torch.where``."""
    health = torch.stack([_largest_magnitudes(t) for t in new.values()]).sum(0)
    storage = blocks[0].storage
    read = reads_are_free(health)
    ok = health.isfinite().tolist() if read else None
    for key, t in new.items():
        t = t.to(storage[0] if key.endswith("K") else storage[1])
        if not read:
            old = _stacked_factor(blocks, key, t.dtype)
            t = torch.where(health.isfinite()[:, None, None], t, old)
        dim = t.shape[-1]
        for i, (block, view) in enumerate(zip(blocks, t.unbind(0))):
            if read and not ok[i]:
                continue
            block.factors()[key][0] = Dense(dim, (view,), None)
    return list(health.unbind(0))


class StackedPreconditioner:
    """``C C^T M K K^T`` of the stacked layers' gradient matrices, with the dense squares
    ``K K^T``, ``C C^T`` where :meth:`kfac_kernels.singd.block.SingdBlock.dense_square` would
    use them, kept until one of the stack's factors changes."""

    def __init__(self):
        # key -> (the factors they were formed from, K K^T or K, C C^T or C, which are squares)
        self._squares: dict[tuple, tuple] = {}

    def __call__(self, blocks: list, mats: list[torch.Tensor], uses: int,
                 key: tuple) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """The preconditioned ``mats`` (each ``(1, d_o, d_i)``, in the compute dtype) and
        their largest magnitudes (float64)."""
        first = blocks[0]
        compute = first.compute
        M = torch.cat(mats).to(compute)
        d_o, d_i = M.shape[-2:]
        sources = [(b.factors()["K"][0].data[0], b.factors()["C"][0].data[0]) for b in blocks]
        cached = self._squares.get(key)
        if cached is None or len(cached[0]) != len(sources) or any(
                a is not c or b is not d for (a, b), (c, d) in zip(sources, cached[0])):
            K = _stacked_factor(blocks, "K", compute)
            C = _stacked_factor(blocks, "C", compute)
            # one panel: a square pays where the rows it serves outnumber its width
            kkt = symmetric_matmul(K, K.mT) if uses * d_o > d_i else None
            cct = symmetric_matmul(C, C.mT) if uses * d_i > d_o else None
            cached = self._squares[key] = (sources, K if kkt is None else kkt,
                                           C if cct is None else cct, kkt is not None,
                                           cct is not None)
        _, k_side, c_side, k_square, c_square = cached
        x = torch.matmul(M, k_side) if k_square else torch.matmul(torch.matmul(M, k_side),
                                                                   k_side.mT)
        out = (torch.matmul(c_side, x) if c_square
               else torch.matmul(c_side, torch.matmul(c_side.mT, x)))
        return list(out.split(1)), list(_largest_magnitudes(out).unbind(0))
