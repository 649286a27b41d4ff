r"""Two-level K-FAC (Tselepidis et al., 2020): a coarse-space correction over layers added to K-FAC
or BD-KFAC.

With ``Z`` the ``L x n`` matrix summing the parameters of each of the ``L`` layers (Eq. 5), the
update of Tselepidis et al. (2020), Eq. 6 is

.. math::

    \check F^{-1} \nabla L = \sum_i V_i^\top \tilde F_{i,i}^{-1} V_i \nabla L
                             + Z^\top (\tilde F_{\text{coarse}} + \lambda I)^{-1} Z \nabla L,

the first term being the wrapped preconditioner's (K-FAC or BD-KFAC) and the second adding one
scalar per layer to every parameter of that layer. The coarse Fisher
``F_coarse = Z F~ Z^T`` has entries ``sum(A_ij) * sum(G_ij)``, the sums of all entries of the
cross-layer Kronecker block ``A_ij (x) G_ij`` (App. A, Eq. 7). With per-example vectors
``a_i(n)`` (layer input, averaged over weight-sharing positions, bias coordinate 1) and
``g_i(n)`` (output gradient summed over positions),

.. math::

    \mathrm{sum}(A_{ij}) = \tfrac1N \sum_n s_i(n) s_j(n),\quad
    \mathrm{sum}(G_{ij}) = m \sum_n t_i(n) t_j(n),\qquad
    s_i(n) = \mathbf 1^\top a_i(n),\; t_i(n) = \mathbf 1^\top g_i(n),

(``m`` the loss-average multiplier of the G factors), so ``coarse_method="sums"`` (default) keeps
only two ``L x L`` moment matrices, built from per-example scalars: no cross-layer covariance
matrix and no downsampling of feature maps (the paper needs it for its expand-form
convolutions). ``coarse_method="algorithm1"`` follows the paper's Algorithm 1: it keeps every
cross-layer covariance ``A_ij`` (``d_i x d_j``) and ``G_ij`` with moving averages and sums their
entries with Eq. 7 -- the same numbers at ``O(sum_ij d_i d_j)`` memory. Both use Algorithm 1's
decay ``eps_k = min(1 - 1/k, coarse_decay)`` at the k-th statistics update.

A layer with ``groups > 1`` contributes one coarse unit per group to the statistics, summed into
its layer's row and column (``Z`` sums all of a layer's parameters).

KL-clipping (Eq. 10), if the wrapped preconditioner has it, is applied to the whole update
(fine part plus correction).
"""
from __future__ import annotations

import math
import warnings
import weakref

import torch
import torch.nn.functional as F

from . import _arguments as args
from .graph import GraphRows
from .capture import DetachesHooksOnExit
from .kfac import KFAC

COARSE_METHODS = ("sums", "algorithm1")


class _CoarseCapture:
    """The capture consumer of one layer: its per-example input and output-gradient vectors
    (:meth:`~kfac_kernels.layers.LayerAdapter.example_inputs` / ``example_outputs``), paired by
    forward call."""

    def __init__(self, owner: "TwoLevel", name: str):
        # Weakly: the module hooks reach this consumer, and must not keep the optimizer alive.
        self.owner, self.name = weakref.ref(owner), name

    def add_forward(self, adapter, x, context, index) -> None:
        owner = self.owner()
        if owner is None:
            return
        if isinstance(context, GraphRows):
            raise ValueError(f"TwoLevel: module {self.name!r} runs inside graph_rows; the "
                             "coarse space treats rows as examples and does not support "
                             "graph batches")
        record = owner._pending.setdefault(self.name, {"a": {}, "g": {}})
        record["a"][index] = adapter.example_inputs(x, owner._dtype(self.name))

    def add_backward(self, adapter, grad, context, index, multiplier, group) -> None:
        owner = self.owner()
        if owner is None:
            return
        g = adapter.example_outputs(grad, owner._dtype(self.name))
        # One entry per backward pass through this output: the user's backward (empirical
        # Fisher) or each Monte-Carlo / type-2 pass; scaled so that t t^T carries the weight m.
        record = owner._pending.setdefault(self.name, {"a": {}, "g": {}})
        record["g"].setdefault(index, []).append(g * math.sqrt(multiplier))


class TwoLevel(DetachesHooksOnExit):
    """Two-level K-FAC: ``loss.backward(); precond.step(); optimizer.step()`` as with the
    wrapped preconditioner.

    Args:
        preconditioner: a :class:`kfac_kernels.KFAC` (any ``structure``, e.g. a
            :class:`~kfac_kernels.BDKFAC`), any ``fisher_type``: the coarse statistics read the
            output gradients of the same backward passes as its G factors (``loss.backward()``
            for ``"empirical"``, the sampled or type-2 passes of
            ``preconditioner.backward(outputs, targets)`` otherwise). Its layers are the coarse
            space's ``L`` layers.
        coarse_damping: ``lambda`` of ``(F_coarse + lambda I)^{-1}`` (default: the
            preconditioner's damping, as Tselepidis et al. (2020), App. A, do).
        coarse_decay: cap of Algorithm 1's decay ``eps_k = min(1 - 1/k, coarse_decay)``.
        coarse_method: ``"sums"`` (per-example scalars) or ``"algorithm1"`` (cross-layer
            covariance matrices, the paper's algorithm).

    The coarse statistics are captured on the preconditioner's factor-update steps and its
    inverse is recomputed on its inverse-update steps.
    """

    def __init__(self, preconditioner: KFAC, *, coarse_damping: float | None = None,
                 coarse_decay: float = 0.95, coarse_method: str = "sums"):
        who = type(self).__name__
        args.instance(who, "preconditioner", preconditioner, KFAC,
                      "a kfac_kernels.KFAC or BDKFAC", allow_none=False)
        coarse_damping = args.positive_float(who, "coarse_damping", coarse_damping,
                                             allow_none=True)
        coarse_decay = args.fraction(who, "coarse_decay", coarse_decay)
        args.choice(who, "coarse_method", coarse_method, COARSE_METHODS)
        special = [n for n, a in preconditioner.adapters.items()
                   if getattr(a, "attention_module", None) is not None or getattr(a, "tied", False)]
        if special:
            raise ValueError(f"{who}: the coarse space does not cover nn.MultiheadAttention or "
                             f"tied embedding weights (modules {special}); build the "
                             "preconditioner with skip_modules=[...] for them")
        self.inner = preconditioner
        self.coarse_damping = preconditioner.damping if coarse_damping is None else coarse_damping
        self.coarse_decay = coarse_decay
        self.coarse_method = coarse_method
        self.names = list(preconditioner.adapters)
        self.units = [(i, g) for i, name in enumerate(self.names)
                      for g in range(preconditioner.adapters[name].groups)]
        # k of Algorithm 1 (see updates), on the device: reading it would synchronise.
        self._count = torch.zeros((), dtype=torch.float64,
                                  device=preconditioner.blocks[self.names[0]].device)
        self._layer_of: torch.Tensor | None = None
        self.stats: dict[str, torch.Tensor] = {}
        self.coarse_inverse: torch.Tensor | None = None
        self._pending: dict[str, dict[str, dict]] = {}
        self._warned = False
        for name in self.names:
            preconditioner.capture.subscribe(name, _CoarseCapture(self, name))

    @property
    def skip_reason(self) -> str | None:
        """Why the last :meth:`step` did nothing (see :attr:`kfac_kernels.KFAC.skip_reason`)."""
        return self.inner.skip_reason

    def _dtype(self, name: str) -> torch.dtype:
        return self.inner.blocks[name].dtype

    def backward(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The wrapped preconditioner's :meth:`~kfac_kernels.KFAC.backward` (needed for
        ``fisher_type="mc"`` / ``"type-2"``, whose extra passes also feed the coarse
        statistics)."""
        return self.inner.backward(outputs, targets)

    def discard_pending(self) -> None:
        self._pending = {}
        self.inner.discard_pending()

    def remove_hooks(self) -> None:
        self.inner.remove_hooks()

    # --- statistics -------------------------------------------------------------------------
    def _batch_vectors(self):
        """Per layer ``(a, g)``: ``(groups, N, D)`` and ``(P, groups, N, d)`` over this step's
        forward passes (``P`` backward passes each: 1 for the empirical Fisher, one per sample
        or column for ``"mc"`` / ``"type-2"``), or ``None`` if some layer saw no data or the
        passes do not line up."""
        out = []
        count = None
        for name in self.names:
            rec = self._pending.get(name)
            if rec is None or not rec["a"] or not rec["g"]:
                return None
            # The forward calls whose outputs were backpropagated: a call without a backward
            # (an activation-checkpointing recomputation, a forward that was not trained on)
            # pairs with nothing and is left out.
            calls = sorted(set(rec["a"]) & set(rec["g"]))
            if not calls:
                return None
            passes = {len(rec["g"][i]) for i in calls}
            if len(passes) != 1:
                return None
            a = torch.cat([rec["a"][i] for i in calls], dim=1)
            g = torch.cat([torch.stack(rec["g"][i]) for i in calls], dim=2)
            if a.shape[1] != g.shape[2] or (count is not None and a.shape[1] != count):
                raise RuntimeError(
                    f"{type(self).__name__}: module {name!r} saw {a.shape[1]} examples in its "
                    f"inputs and {g.shape[2]} in its output gradients while other layers saw "
                    f"{count}; the coarse statistics pair examples across layers, so every "
                    "layer must be called exactly once per example (no shared modules)")
            count = a.shape[1]
            out.append((a, g))
        return out

    def _update_statistics(self) -> None:
        vectors = self._batch_vectors()
        self._pending = {}
        if vectors is None:
            return
        n = vectors[0][0].shape[1]
        if self.coarse_method == "sums":
            s = torch.cat([a.sum(-1) for a, _ in vectors])              # (units, N)
            t = torch.cat([g.sum(-1) for _, g in vectors], dim=1)       # (P, units, N)
            t = t.transpose(0, 1).reshape(t.shape[1], -1)               # passes as examples
            batch = {"sum_A": s @ s.T, "sum_G": t @ t.T}
        else:
            a_all = [a[grp] for a, _ in vectors for grp in range(a.shape[0])]   # (N, D_u)
            g_all = [g[:, grp].reshape(-1, g.shape[-1])                         # (P N, d_u)
                     for _, g in vectors for grp in range(g.shape[1])]
            batch = {}
            for u in range(len(a_all)):
                for v in range(u + 1):
                    batch[f"A{u},{v}"] = a_all[u].T @ a_all[v]
                    batch[f"G{u},{v}"] = g_all[u].T @ g_all[v]
        if self.inner.is_distributed:
            # As for the factors: the A side pooled over all ranks' examples, the G side
            # averaged over ranks (its vectors carry the capture's 1/world weight), so every
            # rank gets the same F_coarse.
            keys = sorted(batch)
            ref = batch[keys[0]]
            flat = torch.cat([batch[k].reshape(-1) for k in keys] + [ref.new_tensor([float(n)])])
            torch.distributed.all_reduce(flat, group=self.inner.process_group)
            at = 0
            for k in keys:
                batch[k] = flat[at:at + batch[k].numel()].reshape(batch[k].shape)
                at += batch[k].numel()
            n = flat[-1]  # stays on the device
        batch = {k: (v / n if k.startswith(("sum_A", "A")) else v) for k, v in batch.items()}
        # Without a host read: a non-finite batch leaves the statistics as they were (and does
        # not count as an update); the warning comes with the next step's one read.
        health = torch.stack([t.sum() for t in batch.values()]).sum()
        self.inner.checks.add(health, self, "_warn_nonfinite")
        ok = health.isfinite()
        count = self._count + ok.to(self._count.dtype)
        if not self.stats:
            self.stats, self._count = batch, count
            return
        eps = (1.0 - 1.0 / count.clamp_min(1.0)).clamp_max(self.coarse_decay)
        self.stats = {k: torch.where(ok, torch.where(count <= 1, v, torch.lerp(
            v, self.stats[k], eps.to(v.dtype))), self.stats[k]) for k, v in batch.items()}
        self._count = count

    def _warn_nonfinite(self) -> None:
        if not self._warned:
            self._warned = True
            warnings.warn(f"{type(self).__name__}: non-finite coarse statistics; skipped (and "
                          "whenever this happens again)", RuntimeWarning, stacklevel=4)

    @property
    def updates(self) -> int:
        """k of Algorithm 1: the statistics batches folded in so far (a host read)."""
        return int(self._count)

    def coarse_fisher(self) -> torch.Tensor | None:
        """``F_coarse`` (``L x L``) from the current statistics, or ``None`` before any."""
        if not self.stats:
            return None
        if self.coarse_method == "sums":
            unit = self.stats["sum_A"] * self.stats["sum_G"]
        else:
            size = len(self.units)
            ref = next(iter(self.stats.values()))
            unit = ref.new_zeros(size, size)
            for u in range(size):
                for v in range(u + 1):
                    a, g = self.stats[f"A{u},{v}"], self.stats[f"G{u},{v}"]
                    # Eq. 7: sum(G_uv 1_{m x n} A_uv), never forming kron(A_uv, G_uv)
                    val = (g @ g.new_ones(g.shape[1], a.shape[0]) @ a).sum()
                    unit[u, v] = unit[v, u] = val
        if self._layer_of is None or self._layer_of.device != unit.device:
            self._layer_of = torch.tensor([i for i, _ in self.units], device=unit.device)
        layer_of = self._layer_of
        onehot = F.one_hot(layer_of, len(self.names)).to(unit.dtype)  # (units, L)
        return onehot.T @ unit @ onehot

    def _refresh_coarse(self) -> None:
        fc = self.coarse_fisher()
        if fc is None:
            return
        eye = torch.eye(fc.shape[0], dtype=torch.float64, device=fc.device)
        inv = torch.linalg.inv_ex(fc.double() + self.coarse_damping * eye).inverse.to(fc.dtype)
        # No host read: a non-finite inverse keeps the previous one, and before any the coarse
        # correction is zero (the step is the fine preconditioner's alone).
        ok = inv.sum().isfinite()
        old = self.coarse_inverse if self.coarse_inverse is not None else torch.zeros_like(inv)
        self.coarse_inverse = torch.where(ok, inv, old)

    # --- the step ---------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, lr=None) -> bool:
        inner = self.inner
        grads = inner.gradient_matrices()
        factor_step, refresh = inner.is_factor_step, inner.is_inverse_step
        fine = inner.precondition_gradients(grads)
        if fine is None:
            self._pending = {}
            return False
        if factor_step:
            self._update_statistics()
        if refresh or self.coarse_inverse is None:
            self._refresh_coarse()
        # A layer without a preconditioner yet keeps its gradient as the fine part.
        updates = {n: fine.get(n, m) for n, m in grads.items()}
        if self.coarse_inverse is not None and len(grads) == len(self.names):
            ref = self.coarse_inverse
            z = torch.stack([grads[n].to(ref.dtype).sum() for n in self.names])
            correction = ref @ z
            for i, n in enumerate(self.names):
                updates[n] = updates[n] + correction[i].to(updates[n].dtype)
        # KL-clipping (if the wrapped preconditioner has it) over the whole update.
        inner.apply_updates(updates, grads, lr)
        return True

    # --- state ------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"inner": self.inner.state_dict(), "updates": self._count.clone(),
                "stats": dict(self.stats), "coarse_inverse": self.coarse_inverse}

    def load_state_dict(self, state_dict: dict) -> None:
        who = f"{type(self).__name__}.load_state_dict"
        for key in ("inner", "updates", "stats", "coarse_inverse"):
            if key not in state_dict:
                raise KeyError(f"{who}: state_dict has no {key!r} entry")
        inv = state_dict["coarse_inverse"]
        if inv is not None and tuple(inv.shape) != (len(self.names),) * 2:
            raise ValueError(f"{who}: coarse_inverse has shape {tuple(inv.shape)}; expected "
                             f"{(len(self.names),) * 2} (one row per covered layer)")
        self.inner.load_state_dict(state_dict["inner"])
        device = self.inner.blocks[self.names[0]].device
        self._count = torch.as_tensor(state_dict["updates"], dtype=torch.float64).to(device)
        self.stats = {k: v.detach().clone().to(device) for k, v in state_dict["stats"].items()}
        self.coarse_inverse = None if inv is None else inv.detach().clone().to(device)
        self._pending = {}
