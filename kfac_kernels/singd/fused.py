"""The fused paths of :class:`kfac_kernels.singd.SINGD` (``fused=True``): the factor update of
all layers of a diagonal or block-diagonal structure in one kernel call, and each layer's
parameter step (``C C^T [dW | db] K K^T`` + weight decay + momentum + parameter) in one pass
(diagonal factors: the steps of all layers in one call).
Same result as the readable path up to round-off; the structure packing lives here."""
from __future__ import annotations

import torch

from ..ops.singd_block_factor_update import singd_block_factor_update
from ..ops.singd_block_step import singd_block_step
from ..ops.singd_diagonal_factor_update import singd_diagonal_factor_update
from ..ops.singd_diagonal_step import accumulation_dtype, singd_diagonal_step_foreach
from .guard import bounded_health, fused_bound, select
from .structures import BlockDiagonal, Diagonal, StructuredMatrix


def _slots(mat: BlockDiagonal, dtype) -> tuple[torch.Tensor, list[int]]:
    """The diagonal blocks of ``mat`` as ``(blocks, k, k)`` slots (the smaller last block padded
    with zeros) and their used sizes."""
    full, last = mat.data
    b, r = mat.k, last.shape[0]
    out = full.to(dtype)
    if r:
        pad = torch.zeros(1, b, b, dtype=dtype, device=out.device)
        pad[0, :r, :r] = last
        out = torch.cat([out, pad])
    return out.contiguous(), [b] * full.shape[0] + ([r] if r else [])


class FusedSteps:
    """Mixin of :class:`kfac_kernels.singd.SINGD` with the fused factor updates and parameter
    steps (it uses the optimizer's ``blocks``, ``state``, ``_dtypes``, ``_store_factor_update``
    and hyperparameters). The factor updates take the step's statistics per layer (from
    :meth:`kfac_kernels.singd.block.SingdBlock.pending_statistics`); the results are stored as
    views of the packed tensors (freshly made for each update, so nothing is copied back)."""

    def _update_diagonal_factors_fused(self, statistics: dict[str, list]) -> None:
        """Step 1 of Fig. 4 for diagonal K and C of every layer (and group) in one launch per
        compute dtype; the layers are packed into flat vectors."""
        segments: dict[torch.dtype, list] = {}
        for name, stats in statistics.items():
            compute = self._dtypes(name)[2]
            for gi, pair in enumerate(stats):
                u, g = (s.data[0] if isinstance(s, StructuredMatrix) else torch.diagonal(s)
                        for s in pair)
                segments.setdefault(compute, []).append((name, gi, u, g))
        momentum = self._uses_riemannian_momentum
        for compute, segs in segments.items():
            def packed(key):
                return torch.cat([self.blocks[n].factors()[key][gi].data[0].to(compute)
                                  for n, gi, _, _ in segs])
            k, c = packed("K"), packed("C")
            m_k, m_c = (packed("m_K"), packed("m_C")) if momentum else (None, None)
            u = torch.cat([s[2] for s in segs])
            g = torch.cat([s[3] for s in segs])
            k_off, c_off = [0], [0]
            for n, gi, uu, gg in segs:
                k_off.append(k_off[-1] + uu.numel())
                c_off.append(c_off[-1] + gg.numel())
            singd_diagonal_factor_update(k, c, m_k, m_c, u, g, k_off, c_off, self.damping,
                                         self.alpha1, self.lr_cov, self.kfac_like,
                                         backend=self.backend)
            new = {"K": (k, k_off), "C": (c, c_off)}
            if momentum:
                new.update({"m_K": (m_k, k_off), "m_C": (m_c, c_off)})
            for i, (name, gi, _, _) in enumerate(segs):
                self._store_factor_update(name, gi, {
                    key: Diagonal(off[i + 1] - off[i], (vec[off[i]:off[i + 1]],))
                    for key, (vec, off) in new.items()})

    def _update_block_factors_fused(self, statistics: dict[str, list]) -> None:
        """Step 1 of Fig. 4 for block-diagonal K and C of every layer (and group) in one call
        of :func:`kfac_kernels.ops.singd_block_factor_update` per compute dtype: every diagonal
        block (the smaller last one padded) becomes a ``b x b`` slot of one packed tensor."""
        kk, kc = self.block_sizes
        segments: dict[torch.dtype, list] = {}
        for name, stats in statistics.items():
            compute = self._dtypes(name)[2]
            for gi, (u, g) in enumerate(stats):
                u = u if isinstance(u, StructuredMatrix) else BlockDiagonal.project(u, kk)
                g = g if isinstance(g, StructuredMatrix) else BlockDiagonal.project(g, kc)
                segments.setdefault(compute, []).append((name, gi, u, g))
        momentum = self._uses_riemannian_momentum

        for compute, segs in segments.items():
            packed: dict[str, list] = {key: [] for key in ("K", "C", "m_K", "m_C", "U", "G")}
            dims = {"K": [], "C": []}
            layer_off = {"K": [0], "C": [0]}
            for n, gi, u, g in segs:
                st = self.blocks[n].factors()
                for side, stat in (("K", u), ("C", g)):
                    x, d = _slots(st[side][gi], compute)
                    packed[side].append(x)
                    packed["U" if side == "K" else "G"].append(_slots(stat, compute)[0])
                    if momentum:
                        packed["m_" + side].append(_slots(st["m_" + side][gi], compute)[0])
                    dims[side] += d
                    layer_off[side].append(layer_off[side][-1] + len(d))
            cat = {key: torch.cat(v).contiguous() for key, v in packed.items() if v}
            singd_block_factor_update(cat["K"], cat["C"], cat.get("m_K"), cat.get("m_C"),
                                      cat["U"], cat["G"], dims["K"], dims["C"],
                                      layer_off["K"], layer_off["C"], self.damping, self.alpha1,
                                      self.lr_cov, self.kfac_like, backend=self.backend)
            keys = ("K", "C", "m_K", "m_C") if momentum else ("K", "C")
            for i, (name, gi, _, _) in enumerate(segs):
                new = {}
                for key in keys:
                    side = key[-1]
                    lo, hi = layer_off[side][i], layer_off[side][i + 1]
                    ref = self.blocks[name].factors()[key][gi]
                    q = ref.data[0].shape[0]
                    block = cat[key][lo:hi]
                    r = ref.data[1].shape[0]
                    new[key] = BlockDiagonal(ref.dim, (block[:q], block[q, :r, :r] if r else
                                                       ref.data[1].to(compute)), ref.k)
                self._store_factor_update(name, gi, new)

    def _fusable(self, name: str) -> bool:
        if not self.fused or not (all(c is Diagonal for c in self.structure_classes)
                                  or all(c is BlockDiagonal for c in self.structure_classes)):
            return False
        ad = self.adapters[name]
        w, b = ad.weight, ad.bias
        return (ad.groups == 1 and w.is_contiguous() and w.grad is not None
                and (b is None or b.is_contiguous())
                and self._dtypes(name)[2] == accumulation_dtype(w.dtype)
                and w.dtype in (torch.float32, torch.float64, torch.bfloat16))

    def _fused_healths(self, states: dict, grad_max: torch.Tensor) -> dict:
        """The health of every fused layer's direction (``states``: name -> its factors),
        from the bound of :func:`kfac_kernels.singd.guard.fused_bound` with the largest
        gradient entry of the step (``grad_max``, all layers': a bound for each) -- one
        computation over all layers of a compute dtype."""
        out: dict = {}
        by_dtype: dict[torch.dtype, list[str]] = {}
        for name in states:
            by_dtype.setdefault(self._dtypes(name)[2], []).append(name)
        for compute, names in by_dtype.items():
            first = states[names[0]]["C"][0]
            blocks = (first.k, states[names[0]]["K"][0].k) if isinstance(
                first, BlockDiagonal) else (1, 1)
            parts = {key: [[t for t in states[n][key][0].data if t.numel()] for n in names]
                     for key in ("C", "K")}
            flat = [t for key in ("C", "K") for ts in parts[key] for t in ts]
            norms = iter(torch._foreach_norm(flat, float("inf")))
            largest = {key: torch.stack([torch.stack([next(norms) for _ in ts]).amax()
                                         for ts in parts[key]]) for key in ("C", "K")}
            bound = fused_bound(largest["C"], largest["K"], grad_max, *blocks)
            out.update(zip(names, bounded_health(bound, compute).unbind()))
        return out

    def _fused_block_layer_step(self, name: str, state, group, ok=True) -> None:
        """Steps 2-3 of Fig. 4 for block-diagonal factors: weight and bias (the last column of
        ``[W | b]``, coupled to the weight by the last block of ``K``) in one pass of
        :func:`kfac_kernels.ops.singd_block_step`. ``ok``: whether the layer's direction is
        finite (else factors and gradients enter as zeros; :mod:`kfac_kernels.singd.guard`)."""
        ad = self.adapters[name]
        compute = self._dtypes(name)[2]
        c, c_dims = _slots(state["C"][0], compute)
        k, k_dims = _slots(state["K"][0], compute)
        c, k = select(ok, c), select(ok, k)
        w, b = ad.weight, ad.bias
        d_o = w.shape[0]
        mom = group["momentum"]
        bufs, first = [], False
        for p in (w, b):
            if p is None:
                bufs.append(None)
                continue
            buf = self.state[p].get("momentum_buffer") if mom != 0.0 else None
            first = first or buf is None
            bufs.append(buf if buf is not None else torch.empty(p.shape, dtype=compute,
                                                                device=p.device))
        db = None
        if b is not None:
            db = select(ok, b.grad if b.grad is not None else torch.zeros_like(b))
        singd_block_step(w.view(d_o, -1), select(ok, w.grad).reshape(d_o, -1), b, db, c, c_dims,
                         k, k_dims, bufs[0].view(d_o, -1), bufs[1], group["lr"], mom,
                         group["weight_decay"], first, backend=self.backend)
        if mom != 0.0:
            for p, buf in zip((w, b), bufs):
                if p is not None:
                    self.state[p]["momentum_buffer"] = buf

    def _fused_diagonal_steps(self, states: dict, group, finite: dict) -> None:
        """Steps 2-3 of Fig. 4 for diagonal factors of every layer in ``states`` (name -> its
        factors): all weights and biases in one call of
        :func:`kfac_kernels.ops.singd_diagonal_step_foreach` (``finite``: by layer, whether its
        direction is, as for :meth:`_fused_block_layer_step`)."""
        mom = group["momentum"]
        lists: tuple[list, ...] = ([], [], [], [], [], [])   # params, grads, cs, ks, bufs, first
        created = []
        for name, state in states.items():
            ad, ok = self.adapters[name], finite[name]
            compute = self._dtypes(name)[2]
            c = select(ok, state["C"][0].data[0].to(compute))
            k = select(ok, state["K"][0].data[0].to(compute))
            w, b = ad.weight, ad.bias
            d_o = w.shape[0]
            pieces = [(w, select(ok, w.grad), k[:w[0].numel()])]
            if b is not None:
                db = b.grad if b.grad is not None else torch.zeros_like(b)
                pieces.append((b, select(ok, db), k[-1:]))
            for p, grad, kk in pieces:
                buf = self.state[p].get("momentum_buffer") if mom != 0.0 else None
                first = buf is None
                if first:
                    buf = torch.empty(p.shape, dtype=compute, device=p.device)
                    created.append((p, buf))
                for out, value in zip(lists, (p.view(d_o, -1), grad.reshape(d_o, -1), c, kk,
                                              buf.view(d_o, -1), first)):
                    out.append(value)
        singd_diagonal_step_foreach(*lists[:5], group["lr"], mom, group["weight_decay"],
                                    lists[5], backend=self.backend)
        if mom != 0.0:
            for p, buf in created:
                self.state[p]["momentum_buffer"] = buf
