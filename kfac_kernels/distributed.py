"""Multi-process training on torch.distributed (gloo on CPU, NCCL on GPU): statistics
all-reduced, decompositions shared out (KAISA's COMM-OPT and MEM-OPT strategies).

Under DistributedDataParallel every rank sees its own part of the batch and the gradients are
averaged across ranks, i.e. the loss being optimised is ``L = (1/R) sum_r L_r``. Its Kronecker
factors are

* ``A``: the pooled input second moment, ``sum_r a_sum_r / sum_r a_rows_r``;
* ``G``: the average of the ranks' ``G_r`` (each built for its own ``L_r``).

So each factor-update step all-reduces (sums) every layer's unnormalised input sums and row
counts, and its output-gradient sums weighted by ``1/world`` when captured
(:func:`allreduce_pending`): only the upper triangles, packed into flat buckets of at most
``bucket_bytes`` (one collective per bucket instead of one per tensor), then mirrored. With equal
per-rank batches this gives exactly the factors of one process on the concatenated batch.

Decompositions (eigendecompositions, damped inverses) are assigned to ranks greedily by cost
(largest first, to the least loaded rank; cost ``sum n^3`` over a layer's matrices). With
:class:`CommOpt` every rank broadcasts the preconditioners it computed in one flat buffer, so
all ranks precondition with bit-identical tensors and the replicas stay in sync; with
:class:`MemOpt` each rank keeps its own layers' and the preconditioned gradients are
all-reduced.
"""
from __future__ import annotations

import weakref

import torch
import torch.distributed as dist

from .layers.base import as_dense

DEFAULT_BUCKET_BYTES = 25 * 2 ** 20


def is_active(process_group=None) -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(
        process_group) > 1


def enabled(distributed: bool | None, process_group=None) -> bool:
    """An optimizer's ``distributed`` setting resolved: ``None`` means on when more than one
    rank runs."""
    return is_active(process_group) if distributed is None else distributed


def check_arguments(who: str, grad_accumulation_steps, distributed) -> None:
    """The constructor checks of ``grad_accumulation_steps`` and ``distributed`` shared by the
    optimizers."""
    if isinstance(grad_accumulation_steps, bool) or not isinstance(
            grad_accumulation_steps, int) or grad_accumulation_steps < 1:
        raise ValueError(f"{who}: grad_accumulation_steps must be an int >= 1, got "
                         f"{grad_accumulation_steps!r}")
    if distributed not in (None, True, False):
        raise ValueError(f"{who}: distributed must be None (automatic), True or False, got "
                         f"{distributed!r}")
    if distributed and not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(f"{who}: distributed=True needs torch.distributed to be "
                           "initialised first (torch.distributed.init_process_group)")


def _flatten(x) -> list[torch.Tensor]:
    if x is None:
        return []
    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, dict):
        return [t for k in sorted(x) for t in _flatten(x[k])]
    return [t for item in x for t in _flatten(item)]


def _triangle(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    n = t.shape[-1]
    idx = torch.triu_indices(n, n, device=t.device)
    return idx, t[..., idx[0], idx[1]].reshape(-1)


def allreduce_symmetric(tensors: list[torch.Tensor], process_group=None,
                        bucket_bytes: int = DEFAULT_BUCKET_BYTES) -> None:
    """Sum symmetric ``(..., n, n)`` tensors (and 0/1-d tensors, summed whole) over all ranks,
    in place, sending one triangle in flat buckets per dtype."""
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for t in tensors:
        by_dtype.setdefault(t.dtype, []).append(t)
    for dtype, group in by_dtype.items():
        bucket: list[tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]] = []
        size = 0

        def flush():
            if not bucket:
                return
            flat = torch.cat([payload for _, _, payload in bucket])
            dist.all_reduce(flat, group=process_group)
            at = 0
            for target, idx, payload in bucket:
                part = flat[at:at + payload.numel()]
                at += payload.numel()
                if idx is None:
                    target.copy_(part.reshape(target.shape))
                else:
                    lead = target.shape[:-2]
                    vals = part.reshape(*lead, -1)
                    target[..., idx[0], idx[1]] = vals
                    target[..., idx[1], idx[0]] = vals
            bucket.clear()

        for t in group:
            if t.dim() >= 2:
                idx, payload = _triangle(t)
            else:
                idx, payload = None, t.reshape(-1)
            if size and size + payload.numel() * payload.element_size() > bucket_bytes:
                flush()
                size = 0
            bucket.append((t, idx, payload))
            size += payload.numel() * payload.element_size()
        flush()


def allreduce_flat(tensors: list[torch.Tensor], process_group=None) -> None:
    """Sum tensors of any shape over all ranks, in place, as one flat buffer per dtype."""
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for t in tensors:
        by_dtype.setdefault(t.dtype, []).append(t)
    for group in by_dtype.values():
        flat = torch.cat([t.reshape(-1) for t in group])
        dist.all_reduce(flat, group=process_group)
        at = 0
        for t in group:
            t.copy_(flat[at:at + t.numel()].reshape(t.shape))
            at += t.numel()


def allreduce_pending(blocks: dict, process_group=None) -> None:
    """Sum every block's statistics of this step over the ranks, in place: the input-side sums
    and row counts pool all ranks' examples; the output-gradient side was weighted by
    ``1/world`` when captured (:attr:`kfac_kernels.capture.Capture.world_size`), so its sum is
    the ranks' average. A rank that saw no data for a layer sends zeros. Every rank must call
    it with the same blocks. Symmetric statistics travel as one triangle (see
    :func:`allreduce_symmetric`); diagonals as they are."""
    entries = []
    for name in sorted(blocks):
        block = blocks[name]
        sums = block._sums()
        groups = block.groups
        kw = dict(dtype=sums.dtype, device=block.device)
        # Rows (the ROWS layout) differ in number between ranks: they travel as their Gram.
        sums.a, sums.g = as_dense(sums.a), as_dense(sums.g)
        a = sums.a if sums.a is not None else sums.a_layout.zeros(
            groups, block.adapter.in_features_per_group, **kw)
        g = sums.g if sums.g is not None else sums.g_layout.zeros(
            groups, block.adapter.out_features_per_group, **kw)
        counts = torch.tensor([float(sums.rows), float(sums.g is not None),
                               float(sums.a is not None)], dtype=torch.float64,
                              device=block.device)
        entries.append((sums, a, g, counts))
    flat = []
    for sums, a, g, counts in entries:
        for value, layout in ((a, sums.a_layout), (g, sums.g_layout)):
            parts = value if isinstance(value, list) else [value]
            # A diagonal statistic (groups, n) is not a symmetric matrix: flattened views.
            flat += [t.view(-1) if layout.kind == "diagonal" else t for t in parts]
        flat.append(counts)
    allreduce_symmetric(flat, process_group)
    for sums, a, g, counts in entries:
        sums.rows = int(round(float(counts[0])))
        sums.a = a if sums.rows > 0 and float(counts[2]) > 0 else None
        sums.g = g if float(counts[1]) > 0 else None


STRATEGIES = ("comm-opt", "mem-opt")


class CommOpt:
    """KAISA's COMM-OPT: each due layer is decomposed by one rank (greedy by cost, recomputed
    for every refresh) and broadcast, so every rank holds and applies every preconditioner."""

    def __init__(self, driver):
        # A weak reference: the driver owns its strategy, and a cycle would keep a dropped
        # optimizer (and its hooks on the model) alive until the garbage collector runs.
        self._driver = weakref.ref(driver)

    @property
    def driver(self):
        return self._driver()

    def _rank_world(self) -> tuple[int, int]:
        group = self.driver.process_group
        return dist.get_rank(group), dist.get_world_size(group)

    def _costs(self, names) -> dict[str, float]:
        return {n: self.driver.blocks[n].decomposition_cost() for n in names}

    def refresh(self, names: list[str]) -> None:
        d = self.driver
        if not d.is_distributed:
            d.decompose(names, check=False)  # checked with the next step's one host read
            return
        rank, world = self._rank_world()
        owner = assign_greedily(self._costs(names), world)
        # Checked before the broadcast: every rank must receive a finite decomposition (the
        # collectives synchronise the ranks anyway).
        d.decompose([n for n in names if owner[n] == rank])
        templates = {n: d.blocks[n].decomposition_template(d.compute_method, d._split)
                     for n in names}
        results = {n: d.blocks[n].decomposition for n in names if owner[n] == rank}
        for name, dec in broadcast_owned(results, templates, owner, d.process_group).items():
            d.blocks[name].decomposition = dec

    def preconditions(self, name: str) -> bool:
        """Whether this rank preconditions layer ``name`` (it has its decomposition)."""
        return self.driver.blocks[name].decomposition is not None

    def share_updates(self, updates: dict, grads: dict) -> dict:
        return updates


class MemOpt(CommOpt):
    """KAISA's MEM-OPT: each rank keeps only the preconditioners of its own layers (assigned
    once, greedily by cost), preconditions their gradients, and the preconditioned gradients are
    all-reduced every step (a layer nobody can precondition yet keeps its gradient)."""

    def __init__(self, driver):
        super().__init__(driver)
        self._owners: dict[str, int] | None = None

    def owners(self) -> dict[str, int]:
        """The rank keeping each layer's preconditioner, fixed for the run (the costs depend on
        the shapes only)."""
        if self._owners is None:
            _, world = self._rank_world()
            self._owners = assign_greedily(self._costs(sorted(self.driver.blocks)), world)
        return self._owners

    def refresh(self, names: list[str]) -> None:
        d = self.driver
        if not d.is_distributed:
            return super().refresh(names)
        rank, _ = self._rank_world()
        d.decompose([n for n in names if self.owners()[n] == rank])

    def preconditions(self, name: str) -> bool:
        if not self.driver.is_distributed:
            return super().preconditions(name)
        rank, _ = self._rank_world()
        return self.owners()[name] == rank and super().preconditions(name)

    def share_updates(self, updates: dict, grads: dict) -> dict:
        """Every rank sends its layers' preconditioned gradients and zeros for the others; the
        sum is the owner's result (exactly: ``x + 0 = x``)."""
        d = self.driver
        if not d.is_distributed:
            return updates
        names = sorted(grads)
        tensors, present = [], []
        for n in names:
            dtype = d.blocks[n].dtype
            mine = n in updates
            tensors.append(updates[n].to(dtype) if mine
                           else grads[n].new_zeros(grads[n].shape, dtype=dtype))
            present.append(1.0 if mine else 0.0)
        flags = torch.tensor(present, dtype=torch.float64, device=grads[names[0]].device)
        allreduce_flat(tensors + [flags], d.process_group)
        return {n: t for n, t, f in zip(names, tensors, flags.tolist()) if f > 0}


def make_strategy(name: str, driver) -> CommOpt:
    return {"comm-opt": CommOpt, "mem-opt": MemOpt}[name](driver)


def assign_greedily(costs: dict[str, float], world_size: int) -> dict[str, int]:
    """Owner rank per key: largest cost first, each to the currently least loaded rank (ties to
    the lowest rank), so the result is the same on every rank."""
    load = [0.0] * world_size
    owner = {}
    for key in sorted(costs, key=lambda k: (-costs[k], k)):
        rank = min(range(world_size), key=lambda r: (load[r], r))
        owner[key] = rank
        load[rank] += costs[key]
    return owner


def broadcast_owned(results: dict[str, object], templates: dict[str, object],
                    owner: dict[str, int], process_group=None) -> dict[str, object]:
    """Every rank sends the entries it owns; returns every entry on every rank.

    ``templates[key]`` gives the structure (dict/list of tensors) an entry has; an owner without
    a result for ``key`` sends a 0 flag and the key is left out of the result everywhere.
    """
    world = dist.get_world_size(process_group)
    me = dist.get_rank(process_group)
    out: dict[str, object] = {}
    for src in range(world):
        keys = sorted(k for k, r in owner.items() if r == src)
        if not keys:
            continue
        ref = _flatten(templates[keys[0]])[0]
        tensors = []
        flags = torch.zeros(len(keys), dtype=ref.dtype, device=ref.device)
        for i, key in enumerate(keys):
            if me == src and results.get(key) is not None:
                flags[i] = 1
                tensors += [t.to(ref.dtype) for t in _flatten(results[key])]
            else:
                tensors += [torch.zeros_like(t, dtype=ref.dtype) for t in
                            _flatten(templates[key])]
        flat = torch.cat([flags] + [t.reshape(-1) for t in tensors])
        global_src = src if process_group is None else dist.get_global_rank(process_group, src)
        dist.broadcast(flat, src=global_src, group=process_group)
        flags = flat[:len(keys)]
        at = len(keys)
        for i, key in enumerate(keys):
            parts = _flatten(templates[key])
            values = []
            for t in parts:
                values.append(flat[at:at + t.numel()].reshape(t.shape).to(t.dtype))
                at += t.numel()
            if bool(flags[i] > 0):
                out[key] = _rebuild(templates[key], iter(values))
    return out


def _rebuild(template, values):
    if isinstance(template, torch.Tensor):
        return next(values)
    if isinstance(template, dict):
        return {k: _rebuild(template[k], values) for k in sorted(template)}
    return [_rebuild(t, values) for t in template]
