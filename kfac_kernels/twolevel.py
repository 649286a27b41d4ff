r"""Two-level K-FAC (seed 004): a coarse-space correction over layers added to K-FAC or BD-KFAC.

With ``Z`` the ``L x n`` matrix summing the parameters of each of the ``L`` layers (Eq. 5), the
update of seed 004 Eq. 6 is

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

import torch
import torch.nn.functional as F

from .block_layers import NormAdapter
from .graph import active_graph_rows
from .kfac import KFAC
from .layers import ConvAdapter
from .ops.gradient_covariance import gradient_rows
from .ops.patch_covariance import as_4d, conv_geometry, pre_pad

COARSE_METHODS = ("sums", "algorithm1")


def _conv_mean_patches(adapter: ConvAdapter, x: torch.Tensor) -> tuple[torch.Tensor, object]:
    """``(N, C, kh*kw)``: every example's patch averaged over the output positions, from strided
    slices of the (padded) input -- O(kh kw input) work, no unfolded tensor."""
    m = adapter.module
    if x.dim() == adapter.spatial_dims + 1:
        x = x.unsqueeze(0)
    geom = conv_geometry(tuple(x.shape[2:]), m.kernel_size, m.stride, m.padding, m.dilation)
    x, geom = pre_pad(x, geom, m.padding_mode)
    x4 = as_4d(x)
    top, bottom, left, right = geom.pad
    x4 = F.pad(x4, (left, right, top, bottom))
    (kh, kw), (sh, sw), (dh, dw), (ho, wo) = geom.kernel, geom.stride, geom.dilation, geom.out_size
    cols = []
    for u in range(kh):
        for v in range(kw):
            sl = x4[:, :, u * dh:u * dh + sh * (ho - 1) + 1:sh, v * dw:v * dw + sw * (wo - 1) + 1:sw]
            cols.append(sl.mean(dim=(2, 3)))
    return torch.stack(cols, dim=2)


def example_inputs(adapter, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``(groups, N, D_g)``: each example's input vector averaged over weight-sharing positions,
    bias coordinate (1) last."""
    if isinstance(adapter, NormAdapter):
        a = adapter._normalized(x.to(dtype))
        n = a.shape[0]
        vec = a.reshape(n, -1).mean(dim=1, keepdim=True)
        rows = vec[None]
    elif isinstance(adapter, ConvAdapter):
        patches = _conv_mean_patches(adapter, x.to(dtype))          # (N, C, k)
        n, c, k = patches.shape
        rows = patches.reshape(n, adapter.groups, (c // adapter.groups) * k).transpose(0, 1)
    else:
        rows = adapter.input_positions(x.to(dtype)).mean(dim=2)      # (1, N, D)
    if adapter.bias is not None:
        rows = torch.cat([rows, rows.new_ones((*rows.shape[:-1], 1))], dim=-1)
    return rows


def example_gradients(adapter, grad: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``(groups, N, d_out_g)``: each example's output gradient summed over positions."""
    if isinstance(adapter, NormAdapter):
        return adapter._per_example_sums(grad).to(dtype)
    return gradient_rows(adapter.batched_output(grad), adapter.channel_dim, adapter.groups,
                         "reduce").to(dtype)


class TwoLevel:
    """Two-level K-FAC: ``loss.backward(); precond.step(); optimizer.step()`` as with the
    wrapped preconditioner.

    Args:
        preconditioner: a :class:`kfac_kernels.KFAC` or :class:`kfac_kernels.BDKFAC`, any
            ``fisher_type``: the coarse statistics read the output gradients of the same
            backward passes as its G factors (``loss.backward()`` for ``"empirical"``, the
            sampled or type-2 passes of ``preconditioner.backward(outputs, targets)``
            otherwise). Its layers are the coarse space's ``L`` layers.
        coarse_damping: ``lambda`` of ``(F_coarse + lambda I)^{-1}`` (default: the
            preconditioner's damping, as seed 004 App. A does).
        coarse_decay: cap of Algorithm 1's decay ``eps_k = min(1 - 1/k, coarse_decay)``.
        coarse_method: ``"sums"`` (per-example scalars) or ``"algorithm1"`` (cross-layer
            covariance matrices, the paper's algorithm).

    The coarse statistics are captured on the preconditioner's factor-update steps and its
    inverse is recomputed on its inverse-update steps.
    """

    def __init__(self, preconditioner: KFAC, *, coarse_damping: float | None = None,
                 coarse_decay: float = 0.95, coarse_method: str = "sums"):
        who = type(self).__name__
        if not isinstance(preconditioner, KFAC):
            raise TypeError(f"{who}: preconditioner must be a kfac_kernels.KFAC or BDKFAC, got "
                            f"{type(preconditioner).__name__}")
        if coarse_damping is not None and (
                isinstance(coarse_damping, bool) or not isinstance(coarse_damping, (int, float))
                or not math.isfinite(coarse_damping) or coarse_damping <= 0):
            raise ValueError(f"{who}: coarse_damping must be a positive finite float or None, got "
                             f"{coarse_damping!r}")
        if isinstance(coarse_decay, bool) or not isinstance(coarse_decay, (int, float)) or not (
                0.0 <= coarse_decay < 1.0):
            raise ValueError(f"{who}: coarse_decay must be in [0, 1), got {coarse_decay!r}")
        if coarse_method not in COARSE_METHODS:
            raise ValueError(f"{who}: coarse_method must be 'sums' or 'algorithm1', got "
                             f"{coarse_method!r}")
        special = [n for n, a in preconditioner.adapters.items()
                   if getattr(a, "attention_module", None) is not None or getattr(a, "tied", False)]
        if special:
            raise ValueError(f"{who}: the coarse space does not cover nn.MultiheadAttention or "
                             f"tied embedding weights (modules {special}); build the "
                             "preconditioner with skip_modules=[...] for them")
        self.inner = preconditioner
        self.coarse_damping = float(preconditioner.damping if coarse_damping is None
                                    else coarse_damping)
        self.coarse_decay = float(coarse_decay)
        self.coarse_method = coarse_method
        self.names = list(preconditioner.adapters)
        self.units = [(i, g) for i, name in enumerate(self.names)
                      for g in range(preconditioner.adapters[name].groups)]
        self.updates = 0                   # k of Algorithm 1
        self.stats: dict[str, torch.Tensor] = {}
        self.coarse_inverse: torch.Tensor | None = None
        self._pending: dict[str, dict[str, list]] = {}
        self._handles = [preconditioner.adapters[n].module.register_forward_hook(
            self._make_forward_hook(n)) for n in self.names]

    # --- capture ----------------------------------------------------------------------------
    def _dtype(self, name: str) -> torch.dtype:
        return self.inner.capture.dtype_of(name)

    def _make_forward_hook(self, name: str):
        def hook(module, args, output):
            inner = self.inner
            if not torch.is_grad_enabled() or not module.training:
                return
            if not inner._is_factor_step() or not inner.adapters[name].trainable:
                return
            if active_graph_rows(module) is not None:
                raise ValueError(f"TwoLevel: module {name!r} runs inside graph_rows; the "
                                 "coarse space treats rows as examples and does not support "
                                 "graph batches")
            adapter = inner.adapters[name]
            rec = self._pending.setdefault(name, {"a": [], "g": {}})
            index = len(rec["a"])  # pairs this pass's inputs with its output gradients
            rec["a"].append(example_inputs(adapter, args[0].detach(), self._dtype(name)))
            if isinstance(output, torch.Tensor) and output.requires_grad:
                output.register_hook(lambda grad: self._grad_hook(name, index, grad))
        return hook

    def _grad_hook(self, name: str, index: int, grad: torch.Tensor) -> None:
        inner = self.inner
        if not inner.capture.capture_grads:
            return
        adapter = inner.adapters[name]
        n, r = adapter.batch_and_positions(grad)
        if n * r == 0:
            return
        mult = inner.capture.multiplier(n, r)
        g = example_gradients(adapter, grad.detach(), self._dtype(name))
        rec = self._pending.setdefault(name, {"a": [], "g": {}})
        # One entry per backward pass through this output: the user's backward (empirical
        # Fisher) or each Monte-Carlo / type-2 pass of the preconditioner's backward; scaled so
        # that t t^T carries the multiplier m.
        rec["g"].setdefault(index, []).append(g * math.sqrt(mult))

    def backward(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The wrapped preconditioner's :meth:`~kfac_kernels.KFAC.backward` (needed for
        ``fisher_type="mc"`` / ``"type-2"``, whose extra passes also feed the coarse
        statistics)."""
        return self.inner.backward(outputs, targets)

    def discard_pending(self) -> None:
        self._pending = {}
        self.inner.discard_pending()

    def remove_hooks(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
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
            if sorted(rec["g"]) != list(range(len(rec["a"]))):
                return None  # a pass without its backward (e.g. evaluation with grad enabled)
            passes = {len(rec["g"][i]) for i in range(len(rec["a"]))}
            if len(passes) != 1:
                return None
            a = torch.cat(rec["a"], dim=1)
            g = torch.cat([torch.stack(rec["g"][i]) for i in range(len(rec["a"]))], dim=2)
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
        scale_g = 1.0
        if self.inner._is_distributed():
            # As for the factors: the A side pooled over all ranks' examples, the G side
            # averaged over ranks (kfac_kernels.distributed), so every rank gets the same F_coarse.
            keys = sorted(batch)
            ref = batch[keys[0]]
            flat = torch.cat([batch[k].reshape(-1) for k in keys] + [ref.new_tensor([float(n)])])
            torch.distributed.all_reduce(flat, group=self.inner.process_group)
            at = 0
            for k in keys:
                batch[k] = flat[at:at + batch[k].numel()].reshape(batch[k].shape)
                at += batch[k].numel()
            n = float(flat[-1])
            scale_g = 1.0 / torch.distributed.get_world_size(self.inner.process_group)
        batch = {k: (v / n if k.startswith(("sum_A", "A")) else v * scale_g)
                 for k, v in batch.items()}
        if not all(bool(torch.isfinite(t).all()) for t in batch.values()):
            self.inner._warn_once("twolevel-nonfinite", (
                f"{type(self).__name__}: non-finite coarse statistics this step; skipped"))
            return
        self.updates += 1
        eps = min(1.0 - 1.0 / self.updates, self.coarse_decay)
        if not self.stats:
            self.stats = batch
        else:
            self.stats = {k: torch.lerp(v, self.stats[k], eps) for k, v in batch.items()}

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
        layer_of = torch.tensor([i for i, _ in self.units], device=unit.device)
        onehot = F.one_hot(layer_of, len(self.names)).to(unit.dtype)  # (units, L)
        return onehot.T @ unit @ onehot

    def _refresh_coarse(self) -> None:
        fc = self.coarse_fisher()
        if fc is None:
            return
        eye = torch.eye(fc.shape[0], dtype=torch.float64, device=fc.device)
        inv = torch.linalg.inv(fc.double() + self.coarse_damping * eye)
        if bool(torch.isfinite(inv).all()):
            self.coarse_inverse = inv.to(fc.dtype)

    # --- the step ---------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, lr=None) -> bool:
        inner = self.inner
        raw = {n: inner.adapters[n].grad_matrix() for n in self.names}
        raw = {n: m.clone() for n, m in raw.items() if m is not None}
        factor_step = inner._is_factor_step()
        refresh = inner.steps % inner.inv_update_steps == 0
        kl_clip, inner.kl_clip = inner.kl_clip, None
        try:
            done = inner.step(lr)
        finally:
            inner.kl_clip = kl_clip
        if not done:
            self._pending = {}
            return False
        if factor_step:
            self._update_statistics()
        if refresh or self.coarse_inverse is None:
            self._refresh_coarse()
        updates = {n: inner.adapters[n].grad_matrix() for n in raw}
        if self.coarse_inverse is not None and len(raw) == len(self.names):
            ref = self.coarse_inverse
            z = torch.stack([raw[n].to(ref.dtype).sum() for n in self.names])
            correction = ref @ z
            for i, n in enumerate(self.names):
                updates[n] = updates[n] + correction[i].to(updates[n].dtype)
        if kl_clip is not None:
            nu = inner._kl_clip_factor(updates, raw, lr)
            if nu < 1.0:
                updates = {n: v * nu for n, v in updates.items()}
        for n, v in updates.items():
            inner.adapters[n].set_grad_matrix(v)
        return True

    # --- state ------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"inner": self.inner.state_dict(), "updates": self.updates,
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
        device = self.inner.adapters[self.names[0]].weight.device
        self.updates = int(state_dict["updates"])
        self.stats = {k: v.detach().clone().to(device) for k, v in state_dict["stats"].items()}
        self.coarse_inverse = None if inv is None else inv.detach().clone().to(device)
        self._pending = {}
