"""Multi-process K-FAC on torch.distributed (gloo on CPU, NCCL on GPU), KAISA's COMM-OPT layout.

Under DistributedDataParallel every rank sees its own part of the batch and the gradients are
averaged across ranks, i.e. the loss being optimised is ``L = (1/R) sum_r L_r``. Its Kronecker
factors are

* ``A``: the pooled input second moment, ``sum_r a_sum_r / sum_r a_rows_r``;
* ``G``: the average of the ranks' ``G_r`` (each built for its own ``L_r``).

So each factor-update step all-reduces (sums) every layer's unnormalised ``a_sum``, row count and
``g_sum``: only the upper triangles, packed into flat buckets of at most ``bucket_bytes`` (one
collective per bucket instead of one per tensor), then mirrored. With equal per-rank batches this
gives exactly the factors of one process on the concatenated batch.

Decompositions (eigendecompositions, inverses, damped block inverses) are assigned to ranks
greedily by cost (largest first, to the least loaded rank; cost ``sum n^3`` over a layer's
matrices) and every rank broadcasts the preconditioners it computed in one flat buffer, so all
ranks precondition with bit-identical tensors and the replicas stay in sync.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

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


def allreduce_capture(capture, names: list[str], template, process_group=None) -> None:
    """All-reduce a :class:`~kfac_kernels.capture.CurvatureCapture`'s per-layer sums in place:
    ``a_sum`` and the row counts summed, ``g_sum`` averaged over the ranks; for a tied
    embedding/output weight also the token counts summed and the embedding use's gradient part
    of the feature side averaged (it is scaled like ``G``). ``template(name)`` gives zero
    tensors shaped like the layer's ``(a_sum, g_sum)`` (a rank that saw no data for a layer
    sends zeros). Every rank must call it with the same ``names``."""
    world = dist.get_world_size(process_group)
    entries = []
    for name in names:
        acc = capture.acc[name]
        zero_a, zero_g = template(name)
        a = acc.a_sum if acc.a_sum is not None else zero_a
        g = acc.g_sum if acc.g_sum is not None else zero_g
        device = _flatten(zero_a)[0].device
        counts = torch.tensor([float(acc.a_rows), float(acc.g_sum is not None),
                               float(acc.a_sum is not None)], dtype=torch.float64, device=device)
        entries.append((name, a, g, counts, tied_sums(capture, name, zero_a)))
    flat = [t for _, a, g, c, tied in entries
            for t in (*_flatten(a), *_flatten(g), c, *tied)]
    allreduce_symmetric(flat, process_group)
    for name, a, g, counts, tied in entries:
        acc = capture.acc[name]
        acc.a_rows = int(round(float(counts[0])))
        acc.a_sum = a if acc.a_rows > 0 and float(counts[2]) > 0 else None
        acc.g_sum = _scale(g, 1.0 / world) if float(counts[1]) > 0 else None
        set_tied_sums(acc, tied, world)


def tied_sums(capture, name: str, zero_a: torch.Tensor) -> list[torch.Tensor]:
    """For a tied embedding/output weight, the embedding use's gradient part of the feature
    side and its token counts (zeros where this rank has none); ``[]`` for other layers."""
    if not getattr(capture.adapters[name], "tied", False):
        return []
    acc = capture.acc[name]
    vocab = capture.adapters[name].weight.shape[0]
    return [acc.tied_a_sum if acc.tied_a_sum is not None else torch.zeros_like(zero_a),
            acc.token_counts if acc.token_counts is not None else zero_a.new_zeros(vocab)]


def set_tied_sums(acc, tied: list[torch.Tensor], world: int) -> None:
    """Store :func:`tied_sums` after their all-reduce: the gradient part scales like ``G`` and
    is averaged over the ranks, the token counts are summed."""
    if tied:
        acc.tied_a_sum = tied[0] / world if acc.a_rows > 0 else None
        acc.token_counts = tied[1]


def _scale(x, factor: float):
    if isinstance(x, torch.Tensor):
        return x * factor
    return [_scale(t, factor) for t in x]


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
