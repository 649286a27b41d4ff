r"""K-FAC preconditioner (expand and reduce forms) over any torch.optim optimizer.

For every supported layer with Kronecker factors ``A`` (inputs, bias last) and ``G`` (output
gradients), the gradient matrix ``M = [dW | db]`` is replaced by

* exact eigen damping (seed 000, Sec. 3), ``compute_method="eigen"``:
  ``Q_G [(Q_G^T M Q_A) / (lambda_G lambda_A^T + damping)] Q_A^T``, i.e. ``(G (x) A + damping I)^{-1}``
  applied exactly;
* factored Tikhonov damping with the pi heuristic (seed 004, Eq. 8-9):
  ``(G + sqrt(damping)/pi I)^{-1} M (A + pi sqrt(damping) I)^{-1}`` with
  ``pi = sqrt((tr A / dim A) / (tr G / dim G))``, through eigendecompositions or explicit inverses
  (``compute_method="inverse"``).

Optionally all preconditioned gradients are scaled by the KL-clipping factor (seed 004, Eq. 10)
``nu = min(1, sqrt(kl_clip / (lr^2 sum_l |<V_l, M_l>|))``.

Usage::

    precond = KFAC(model, damping=1e-3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for x, y in loader:
        optimizer.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()          # or: loss = precond.backward(model(x), y) for "mc" / "type-2"
        precond.step()           # rewrites .grad of the covered layers
        optimizer.step()

or as one object: ``PreconditionedOptimizer(optimizer, precond)``.
"""
from __future__ import annotations

import math
import warnings
from typing import Callable, Iterable

import torch
from torch import nn

from . import distributed as dist_utils
from .capture import CurvatureCapture
from .curvature import (check_common, curvature_backward, find_adapters,
                        validate_skip_modules)
from .losses import check_loss_fn, loss_coefficient

DAMPING_FORMS = ("exact", "factored")
COMPUTE_METHODS = ("eigen", "inverse")


DISTRIBUTED_STRATEGIES = ("comm-opt", "mem-opt")


def _positive_float(who, name, value, allow_none=False):
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(
            value) or value <= 0:
        raise ValueError(f"{who}: {name} must be a positive finite float, got {value!r}")


def _positive_int(who, name, value):
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{who}: {name} must be an int >= 1, got {value!r}")


def _all_finite(factors) -> bool:
    """Whether every tensor of a factor (a tensor or a list of blocks, nested) is finite."""
    if isinstance(factors, torch.Tensor):
        return bool(torch.isfinite(factors).all())
    return all(_all_finite(f) for f in factors)


def _lerp(new, old, decay: float):
    """The moving average ``decay * old + (1 - decay) * new`` of a tensor or a list of blocks."""
    if isinstance(new, torch.Tensor):
        return torch.lerp(new, old, decay)
    return [_lerp(n, o, decay) for n, o in zip(new, old)]


class KFAC:
    """K-FAC preconditioner: ``loss.backward(); precond.step(); optimizer.step()``.

    Args:
        model: the network; its ``nn.Linear`` and ``nn.Conv1d``/``nn.Conv2d`` layers with
            trainable weights are preconditioned (others are reported once and left alone).
        damping: Tikhonov damping ``gamma > 0``.
        factor_decay: EMA decay of the factors, in ``[0, 1)``; the first update takes the batch
            factors as they are.
        factor_update_steps: update the factors every this many steps.
        inv_update_steps: recompute the eigendecompositions/inverses every this many steps.
        kfac_approx: ``"expand"`` or ``"reduce"`` (seed 001).
        fisher_type: ``"empirical"`` (uses the gradients of ``loss.backward()``), ``"mc"`` or
            ``"type-2"`` (use ``precond.backward(outputs, targets)``; need ``loss_fn``).
        loss_fn: ``nn.CrossEntropyLoss`` / ``nn.MSELoss`` / ``nn.BCEWithLogitsLoss`` for
            ``precond.backward``.
        mc_samples: labels sampled per factor update for ``"mc"``.
        loss_average: how the loss was reduced: ``None`` (sum), ``"batch"`` (mean over examples)
            or ``"batch+sequence"`` (mean over examples and the layer's weight-sharing dim).
        damping_form: ``"exact"`` (eigen damping) or ``"factored"`` (Tikhonov with pi).
        compute_method: ``"eigen"`` or ``"inverse"`` (only with ``damping_form="factored"``).
        kl_clip: KL-clipping constant ``kappa`` or ``None``; needs a learning rate (``lr`` here,
            ``step(lr=...)``, or the optimizer's through :class:`PreconditionedOptimizer`).
        lr: learning rate used by KL-clipping.
        skip_modules: module names (fnmatch patterns) or types not to precondition.
        grad_scaler: a ``torch.amp.GradScaler`` whose scale is removed from captured gradients;
            call ``scaler.unscale_(optimizer)`` before :meth:`step`.
        factor_dtype: dtype of factors and decompositions (default: fp32 for fp16/bf16 layers,
            the parameter dtype otherwise).
        backend: kernel backend for the factor accumulation (``"auto"``, ``"eager"``, ...).
        generator: random generator for ``"mc"`` (its state is part of :meth:`state_dict`).
        grad_accumulation_steps: micro-batches per step whose losses are averaged (each
            ``loss / k`` backpropagated, e.g. under DDP's ``no_sync``): the factors are then
            those of the whole step's batch.
        distributed: ``None`` (default: on when ``torch.distributed`` is initialised with more
            than one rank), ``True`` or ``False``. On: factors are all-reduced and the
            decompositions shared out between ranks (:mod:`kfac_kernels.distributed`).
        process_group: the ``torch.distributed`` group (default: the world).
        distributed_strategy: how the ranks share the decompositions (KAISA's terms):
            ``"comm-opt"`` (default): each layer is decomposed by one rank and the result
            broadcast, so every rank holds every preconditioner and preconditions locally;
            ``"mem-opt"``: each rank keeps only the preconditioners of its own layers (assigned
            once, greedily by cost), preconditions their gradients and the preconditioned
            gradients are all-reduced every step -- less memory, more communication. The
            results are the same. With ``"mem-opt"`` a :meth:`state_dict` holds this rank's
            preconditioners only: save and load one per rank.

    A module called several times in one forward pass contributes each call's inputs and output
    gradients as additional examples. A step whose gradients contain NaN/inf (an AMP overflow)
    changes nothing: parameters' gradients, factors and step count stay as they were.
    """

    def __init__(self, model: nn.Module, *, damping: float = 1e-3, factor_decay: float = 0.95,
                 factor_update_steps: int = 1, inv_update_steps: int = 10,
                 kfac_approx: str = "expand", fisher_type: str = "empirical",
                 loss_fn: nn.Module | None = None, mc_samples: int = 1,
                 loss_average: str | None = "batch", damping_form: str = "exact",
                 compute_method: str = "eigen", kl_clip: float | None = None,
                 lr: float | None = None, skip_modules: Iterable = (),
                 grad_scaler: torch.amp.GradScaler | None = None,
                 factor_dtype: torch.dtype | None = None, backend: str = "auto",
                 generator: torch.Generator | None = None,
                 grad_accumulation_steps: int = 1, distributed: bool | None = None,
                 process_group=None, distributed_strategy: str = "comm-opt"):
        who = type(self).__name__
        if not isinstance(model, nn.Module):
            raise TypeError(f"{who}: model must be a torch.nn.Module, got {type(model).__name__}")
        _positive_float(who, "damping", damping)
        if isinstance(factor_decay, bool) or not isinstance(factor_decay, (int, float)) or not (
                0.0 <= factor_decay < 1.0):
            raise ValueError(f"{who}: factor_decay must be in [0, 1), got {factor_decay!r}")
        _positive_int(who, "factor_update_steps", factor_update_steps)
        _positive_int(who, "inv_update_steps", inv_update_steps)
        check_common(who, kfac_approx, fisher_type, loss_average, mc_samples, backend, generator)
        if fisher_type != "empirical" and loss_fn is None:
            raise ValueError(f"{who}: fisher_type={fisher_type!r} needs loss_fn (an "
                             "nn.CrossEntropyLoss, nn.MSELoss or nn.BCEWithLogitsLoss) to sample "
                             "or factorise the loss Hessian")
        if loss_fn is not None:
            check_loss_fn(loss_fn, loss_average, who)
        if damping_form not in DAMPING_FORMS:
            raise ValueError(f"{who}: damping_form must be 'exact' or 'factored', got "
                             f"{damping_form!r}")
        if compute_method not in COMPUTE_METHODS:
            raise ValueError(f"{who}: compute_method must be 'eigen' or 'inverse', got "
                             f"{compute_method!r}")
        if compute_method == "inverse" and damping_form == "exact":
            raise ValueError(f"{who}: compute_method='inverse' needs damping_form='factored'; "
                             "exact eigen damping needs compute_method='eigen'")
        _positive_float(who, "kl_clip", kl_clip, allow_none=True)
        if lr is not None and (isinstance(lr, bool) or not isinstance(lr, (int, float))
                               or not math.isfinite(lr) or lr < 0):
            raise ValueError(f"{who}: lr must be a non-negative finite float or None, got {lr!r}")
        if grad_scaler is not None and not isinstance(grad_scaler, torch.amp.GradScaler):
            raise TypeError(f"{who}: grad_scaler must be a torch.amp.GradScaler or None, got "
                            f"{type(grad_scaler).__name__}")
        if factor_dtype is not None and (not isinstance(factor_dtype, torch.dtype) or
                                         factor_dtype not in (torch.float32, torch.float64)):
            raise ValueError(f"{who}: factor_dtype must be torch.float32, torch.float64 or None, "
                             f"got {factor_dtype!r}")
        dist_utils.check_arguments(who, grad_accumulation_steps, distributed)
        if distributed_strategy not in DISTRIBUTED_STRATEGIES:
            raise ValueError(f"{who}: distributed_strategy must be 'comm-opt' or 'mem-opt', got "
                             f"{distributed_strategy!r}")
        skip_modules = validate_skip_modules(model, skip_modules, who)
        self._kfac_approx_for_adapters = kfac_approx
        self.adapters = self._find_adapters(model, skip_modules, who)
        if not self.adapters:
            raise ValueError(f"{who}: the model has no supported layers "
                             f"({self._SUPPORTED_NAMES}) with trainable weights")
        self.model = model
        self.damping = float(damping)
        self.factor_decay = float(factor_decay)
        self.factor_update_steps = factor_update_steps
        self.inv_update_steps = inv_update_steps
        self.kfac_approx = kfac_approx
        self.fisher_type = fisher_type
        self.loss_fn = loss_fn
        self.mc_samples = mc_samples
        self.loss_average = loss_average
        self.damping_form = damping_form
        self.compute_method = compute_method
        self.kl_clip = None if kl_clip is None else float(kl_clip)
        self.lr = lr
        self.grad_scaler = grad_scaler
        self.generator = generator
        self.backend = backend
        self.grad_accumulation_steps = grad_accumulation_steps
        self.distributed = distributed
        self.process_group = process_group
        self.distributed_strategy = distributed_strategy
        self._owners: dict[str, int] | None = None
        self.steps = 0
        # name -> (A, G) moving averages, stacked over groups
        self.factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        # name -> tensors of the current preconditioner (eigen- or inverse-form)
        self.preconditioners: dict[str, dict[str, torch.Tensor]] = {}
        self._warned: set[str] = set()
        self.capture = self._capture_class(self.adapters, kfac_approx=kfac_approx,
                                           loss_average=loss_average, factor_dtype=factor_dtype,
                                           backend=backend, loss_scale=self._loss_scale,
                                           train_only=True).attach()
        self.capture.accumulation_steps = grad_accumulation_steps
        self._arm_capture()

    # Subclasses (BDKFAC) cover other layers and keep factors in other forms.
    _SUPPORTED_NAMES = "nn.Linear, nn.Conv1d, nn.Conv2d, nn.Embedding, nn.MultiheadAttention"
    _capture_class = CurvatureCapture

    def _find_adapters(self, model: nn.Module, skip_modules: tuple, who: str) -> dict:
        return find_adapters(model, skip_modules, who, kfac_approx=self._kfac_approx_for_adapters)

    # --- capture ----------------------------------------------------------------------------
    def _loss_scale(self) -> float | None:
        s = self.grad_scaler
        return s.get_scale() if s is not None and s.is_enabled() else None

    def _is_factor_step(self) -> bool:
        return self.steps % self.factor_update_steps == 0

    def _arm_capture(self) -> None:
        """Capture only on factor-update steps; the empirical Fisher reads the user's backward,
        the others only the passes of :meth:`backward`."""
        on = self._is_factor_step()
        self.capture.capture_inputs = on
        self.capture.capture_grads = on and self.fisher_type == "empirical"

    def discard_pending(self) -> None:
        """Drop curvature captured since the last :meth:`step` (e.g. of a skipped AMP step)."""
        self.capture.reset()

    def remove_hooks(self) -> None:
        """Detach all hooks from the model (the preconditioner stops capturing)."""
        self.capture.detach()

    def backward(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """``loss = loss_fn(outputs, targets)``; ``loss.backward()``, with the extra backward
        passes of ``"mc"`` / ``"type-2"`` on factor-update steps. Returns the loss."""
        if self.loss_fn is None:
            raise RuntimeError(f"{type(self).__name__}.backward needs loss_fn: pass loss_fn=... "
                               "to the constructor")
        loss = self.loss_fn(outputs, targets)
        factor_step = self._is_factor_step()
        if self.fisher_type != "empirical" and factor_step:
            params = [p for a in self.adapters.values() for p in a.params()]
            curvature_backward(self.capture, self.loss_fn, outputs, targets, self.fisher_type,
                               self.mc_samples, self.generator, params)
        previous = self.capture.grad_multiplier
        if self.fisher_type == "empirical" and factor_step:
            # The loss is known here, so its exact coefficient (e.g. 1/numel for a mean-reduced
            # MSELoss) is used, as kronecker_factors does, instead of the loss_average guess.
            c = loss_coefficient(self.loss_fn, outputs, targets)
            self.capture.grad_multiplier = 1.0 / c if c > 0 else 0.0
        try:
            if self.grad_scaler is not None and self.grad_scaler.is_enabled():
                self.grad_scaler.scale(loss).backward()
            else:
                loss.backward()
        finally:
            self.capture.grad_multiplier = previous
        return loss

    # --- the step ---------------------------------------------------------------------------
    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(message, RuntimeWarning, stacklevel=3)

    @torch.no_grad()
    def step(self, lr: float | Callable[[torch.Tensor], float] | None = None) -> bool:
        """Update factors/preconditioners when due and precondition the gradients in place.

        Args:
            lr: learning rate for KL-clipping: a float, or a function of a layer's weight
                returning its learning rate; defaults to the constructor's ``lr``.

        Returns ``True`` if gradients were preconditioned, ``False`` if the step was skipped
        (no gradients, or non-finite gradients).
        """
        mats = {}
        for name, adapter in self.adapters.items():
            if adapter.trainable:
                mat = adapter.grad_matrix()
                if mat is not None:
                    mats[name] = mat
        if not mats:
            self.capture.reset()
            return False
        finite = torch.stack([torch.isfinite(m).all() for m in mats.values()]).all()
        if not bool(finite):
            self.capture.reset()
            return False
        if self._is_factor_step():
            self._update_factors()
        self.capture.reset()
        refresh = self.steps % self.inv_update_steps == 0
        self._refresh_preconditioners([
            name for name in mats
            if name in self.factors and (refresh or name not in self.preconditioners)])
        updates = {name: self._precondition(name, mat) for name, mat in mats.items()
                   if name in self.preconditioners}
        if self.distributed_strategy == "mem-opt" and self._is_distributed():
            updates = self._share_updates(updates, mats)
        if self.kl_clip is not None and updates:
            nu = self._kl_clip_factor(updates, mats, lr)
            if nu < 1.0:
                updates = {name: v * nu for name, v in updates.items()}
        for name, v in updates.items():
            self.adapters[name].set_grad_matrix(v.to(mats[name].dtype))
        self.steps += 1
        self._arm_capture()
        return True

    def _is_distributed(self) -> bool:
        return dist_utils.enabled(self.distributed, self.process_group)

    def _factor_template(self, name: str):
        """Zero tensors with the structure of a layer's (A, G) sums."""
        ad = self.adapters[name]
        kw = dict(dtype=self.capture.dtype_of(name), device=ad.weight.device)
        g, da, dg = ad.groups, ad.in_features_per_group, ad.out_features_per_group
        return torch.zeros(g, da, da, **kw), torch.zeros(g, dg, dg, **kw)

    def _allreduce_capture(self) -> None:
        """Sum every layer's unnormalised factor sums and row counts over the ranks (one
        triangle, bucketed); G becomes the ranks' average (see :mod:`kfac_kernels.distributed`)."""
        dist_utils.allreduce_capture(self.capture, sorted(self.adapters), self._factor_template,
                                     self.process_group)

    def _update_factors(self) -> None:
        if self._is_distributed():
            self._allreduce_capture()
        if self.fisher_type != "empirical":
            missing_g = [name for name, acc in self.capture.acc.items()
                         if acc.a_sum is not None and acc.g_sum is None]
            if missing_g:
                self.capture.reset()
                raise RuntimeError(
                    f"{type(self).__name__}: fisher_type={self.fisher_type!r} captured no output "
                    f"gradients for {missing_g}: compute the loss with "
                    "`loss = precond.backward(outputs, targets)` instead of `loss.backward()`")
        for name in self.adapters:
            pair = self.capture.factors(name)
            if pair is None:
                continue
            if not _all_finite(pair):
                self._warn_once(f"nonfinite-batch:{name}", (
                    f"{type(self).__name__}: non-finite curvature for module {name!r} (NaN/inf "
                    "in its inputs or output gradients); its factor update is skipped this "
                    "step and whenever this happens again"))
                continue
            if name not in self.factors:
                self.factors[name] = pair
            else:
                a, g = self.factors[name]
                d = self.factor_decay
                self.factors[name] = (_lerp(pair[0], a, d), _lerp(pair[1], g, d))

    def _refresh_preconditioners(self, names: list[str]) -> None:
        if not self._is_distributed():
            self._refresh_local(names)
            return
        rank = torch.distributed.get_rank(self.process_group)
        if self.distributed_strategy == "mem-opt":
            owner = self._layer_owners()
            self._refresh_local([n for n in names if owner[n] == rank])
            return
        # Every rank decomposes its share (greedy by cost) and broadcasts it.
        world = torch.distributed.get_world_size(self.process_group)
        owner = dist_utils.assign_greedily({n: self._decomposition_cost(n) for n in names},
                                            world)
        self._refresh_local([n for n in names if owner[n] == rank])
        templates = {n: self._preconditioner_template(n) for n in names}
        results = {n: self.preconditioners.get(n) for n in names if owner[n] == rank}
        shared = dist_utils.broadcast_owned(results, templates, owner, self.process_group)
        self.preconditioners.update(shared)

    def _layer_owners(self) -> dict[str, int]:
        """MEM-OPT: the rank that keeps each layer's preconditioner, fixed for the run (the
        costs depend on the shapes only)."""
        if self._owners is None:
            world = torch.distributed.get_world_size(self.process_group)
            self._owners = dist_utils.assign_greedily(
                {n: self._decomposition_cost(n) for n in sorted(self.adapters)}, world)
        return self._owners

    def _share_updates(self, updates: dict, mats: dict) -> dict:
        """MEM-OPT: every rank sends its layers' preconditioned gradients and zeros for the
        others; the sum is the owner's result (exactly: x + 0 = x). A layer no rank has a
        preconditioner for yet keeps its gradient."""
        names = sorted(mats)
        rank = torch.distributed.get_rank(self.process_group)
        owner = self._layer_owners()
        tensors, present = [], []
        for n in names:
            mine = n in updates and owner[n] == rank
            dtype = self.capture.dtype_of(n)
            tensors.append(updates[n].to(dtype) if mine else mats[n].new_zeros(
                mats[n].shape, dtype=dtype))
            present.append(1.0 if mine else 0.0)
        flags = torch.tensor(present, dtype=torch.float64, device=mats[names[0]].device)
        dist_utils.allreduce_flat(tensors + [flags], self.process_group)
        return {n: t for n, t, f in zip(names, tensors, flags.tolist()) if f > 0}

    def _refresh_local(self, names: list[str]) -> None:
        for name in names:
            self._update_preconditioner(name)

    def _decomposition_cost(self, name: str) -> float:
        ad = self.adapters[name]
        return float(ad.groups * (ad.in_features_per_group ** 3 + ad.out_features_per_group ** 3))

    def _preconditioner_template(self, name: str) -> dict:
        ad = self.adapters[name]
        kw = dict(dtype=self.capture.dtype_of(name), device=ad.weight.device)
        return {k: torch.zeros(shape, **kw) for k, shape in self._preconditioner_shapes(name).items()}

    def _pi(self, a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """Per-group pi of seed 004 Eq. 8 (1 where a trace is not positive)."""
        ta = torch.diagonal(a, dim1=-2, dim2=-1).mean(-1)
        tg = torch.diagonal(g, dim1=-2, dim2=-1).mean(-1)
        ok = (ta > 0) & (tg > 0)
        return torch.where(ok, torch.sqrt(ta.clamp_min(1e-300) / tg.clamp_min(1e-300)),
                           torch.ones_like(ta))

    def _decompose(self, a: torch.Tensor, g: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.compute_method == "eigen":
            la, qa = torch.linalg.eigh(a)
            lg, qg = torch.linalg.eigh(g)
            # Round-off can leave tiny negative eigenvalues of these PSD factors.
            out = {"eigvals_A": la.clamp_min(0), "eigvecs_A": qa,
                   "eigvals_G": lg.clamp_min(0), "eigvecs_G": qg}
            if self.damping_form == "factored":
                out["pi"] = self._pi(a, g)
            return out
        pi = self._pi(a, g)
        root = math.sqrt(self.damping)
        eye_a = torch.eye(a.shape[-1], dtype=a.dtype, device=a.device)
        eye_g = torch.eye(g.shape[-1], dtype=g.dtype, device=g.device)
        inv_a = torch.linalg.inv(a + (pi * root)[:, None, None] * eye_a)
        inv_g = torch.linalg.inv(g + (root / pi)[:, None, None] * eye_g)
        return {"inv_A": inv_a, "inv_G": inv_g, "pi": pi}

    def _update_preconditioner(self, name: str) -> None:
        a, g = self.factors[name]
        if not (bool(torch.isfinite(a).all()) and bool(torch.isfinite(g).all())):
            self._warn_once(f"nonfinite-factor:{name}", (
                f"{type(self).__name__}: the factors of module {name!r} are not finite; keeping "
                "its previous preconditioner"))
            return
        try:
            dec = self._decompose(a, g)
        except torch.linalg.LinAlgError:
            dec = None
        if dec is None or not all(bool(torch.isfinite(t).all()) for t in dec.values()):
            # Retry in fp64: eigh/inv of ill-conditioned fp32 factors can fail to converge.
            try:
                dec64 = self._decompose(a.double(), g.double())
                dec = {k: v.to(a.dtype) for k, v in dec64.items()}
            except torch.linalg.LinAlgError:
                dec = None
            if dec is None or not all(bool(torch.isfinite(t).all()) for t in dec.values()):
                self._warn_once(f"decomposition:{name}", (
                    f"{type(self).__name__}: could not decompose the factors of module "
                    f"{name!r}, even in float64; keeping its previous preconditioner"))
                return
        self.preconditioners[name] = dec

    def _precondition(self, name: str, mat: torch.Tensor) -> torch.Tensor:
        dec = self.preconditioners[name]
        ref = next(iter(dec.values()))
        m = mat.to(ref.dtype)
        if self.compute_method == "inverse":
            return dec["inv_G"] @ m @ dec["inv_A"]
        qa, qg = dec["eigvecs_A"], dec["eigvecs_G"]
        la, lg = dec["eigvals_A"], dec["eigvals_G"]
        rotated = qg.mT @ m @ qa
        if self.damping_form == "exact":
            denom = lg[:, :, None] * la[:, None, :] + self.damping
        else:
            root = math.sqrt(self.damping)
            pi = dec["pi"][:, None, None]
            denom = (lg[:, :, None] + root / pi) * (la[:, None, :] + pi * root)
        return qg @ (rotated / denom) @ qa.mT

    def _kl_clip_factor(self, updates, mats, lr) -> float:
        lr = self.lr if lr is None else lr
        if lr is None:
            raise RuntimeError(f"{type(self).__name__}: kl_clip needs a learning rate: pass "
                               "lr=... to the constructor or to step(), or use "
                               "PreconditionedOptimizer")
        total = 0.0
        for name, v in updates.items():
            layer_lr = lr(self.adapters[name].weight) if callable(lr) else lr
            total += layer_lr ** 2 * abs(float((v * mats[name].to(v.dtype)).sum()))
        if total <= 0.0:
            return 1.0
        return min(1.0, math.sqrt(self.kl_clip / total))

    # --- state ------------------------------------------------------------------------------
    def _preconditioner_shapes(self, name: str) -> dict[str, tuple[int, ...]]:
        """The entries (and shapes) of a preconditioner under the current settings."""
        ad = self.adapters[name]
        g, da, dg = ad.groups, ad.in_features_per_group, ad.out_features_per_group
        if self.compute_method == "inverse":
            return {"inv_A": (g, da, da), "inv_G": (g, dg, dg), "pi": (g,)}
        out = {"eigvals_A": (g, da), "eigvecs_A": (g, da, da), "eigvals_G": (g, dg),
               "eigvecs_G": (g, dg, dg)}
        if self.damping_form == "factored":
            out["pi"] = (g,)
        return out

    def state_dict(self) -> dict:
        """Everything needed to resume bit-identically: step count, factors, preconditioners
        and the MC generator state. Tensors are referenced, not copied (as in torch.optim)."""
        return {
            "steps": self.steps,
            "factors": {n: {"A": a, "G": g} for n, (a, g) in self.factors.items()},
            "preconditioners": {n: dict(d) for n, d in self.preconditioners.items()},
            "generator": None if self.generator is None else self.generator.get_state(),
        }

    def load_state_dict(self, state_dict: dict) -> None:
        who = f"{type(self).__name__}.load_state_dict"
        for key in ("steps", "factors", "preconditioners"):
            if key not in state_dict:
                raise KeyError(f"{who}: state_dict has no {key!r} entry")
        factors, preconditioners = {}, {}
        for section, target in (("factors", factors), ("preconditioners", preconditioners)):
            for name, tensors in state_dict[section].items():
                if name not in self.adapters:
                    raise ValueError(f"{who}: state_dict has {section} for module {name!r}, "
                                     "which this preconditioner does not cover")
                w = self.adapters[name].weight
                target[name] = {k: t.detach().clone().to(w.device) for k, t in tensors.items()}
        for name, pair in factors.items():
            a, g = pair["A"], pair["G"]
            ad = self.adapters[name]
            want_a = (ad.groups, ad.in_features_per_group, ad.in_features_per_group)
            want_g = (ad.groups, ad.out_features_per_group, ad.out_features_per_group)
            if tuple(a.shape) != want_a or tuple(g.shape) != want_g:
                raise ValueError(f"{who}: factors of module {name!r} have shapes "
                                 f"{tuple(a.shape)}, {tuple(g.shape)}; expected {want_a}, {want_g}")
        for name, dec in list(preconditioners.items()):
            expected = self._preconditioner_shapes(name)
            if set(dec) != set(expected):
                # Saved with another compute_method/damping_form: rebuilt from the factors at
                # the next step instead of being misread.
                self._warn_once(f"load-preconditioner:{name}", (
                    f"{who}: the preconditioner of module {name!r} was saved with other settings "
                    f"(entries {sorted(dec)}, expected {sorted(expected)}); it is recomputed "
                    "from the factors at the next step"))
                del preconditioners[name]
                continue
            for key, shape in expected.items():
                if tuple(dec[key].shape) != shape:
                    raise ValueError(f"{who}: preconditioner entry {key!r} of module {name!r} has "
                                     f"shape {tuple(dec[key].shape)}; expected {shape}")
        self.steps = int(state_dict["steps"])
        self.factors = {n: (p["A"], p["G"]) for n, p in factors.items()}
        self.preconditioners = preconditioners
        gen_state = state_dict.get("generator")
        if gen_state is not None and self.generator is not None:
            self.generator.set_state(gen_state)
        self.capture.reset()
        self._arm_capture()
