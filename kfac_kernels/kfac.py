r"""K-FAC (and BD-KFAC) over any torch.optim optimizer: a driver of curvature blocks.

For every supported layer a curvature block (:mod:`kfac_kernels.blocks`) keeps the Kronecker
factors ``A`` (inputs, bias last) and ``G`` (output gradients) in the chosen ``structure``
(``"dense"``, ``"block-diagonal"`` for BD-KFAC, ``"diagonal"``) and replaces the gradient matrix
``M = [dW | db]`` by its preconditioned form (see :mod:`kfac_kernels.blocks.kronecker` for the
formulas of the damping forms). Optionally all preconditioned gradients are scaled by the
KL-clipping factor (Tselepidis et al. (2020), Eq. 10)
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

from . import _arguments as args
from . import distributed as dist_utils
from ._backend import BACKENDS
from ._flags import DeferredChecks, finite_health
from .blocks import BLOCKS, run_jobs
from .blocks.kronecker import (BatchedPreconditioner, measure_largest_eigenvalues,
                               pending_healths)
from .blocks.decompositions import retry_in_float64
from .capture import (Capture, DetachesHooksOnExit, default_factor_dtype, grad_scaler_scale,
                      weak_method)
from .curvature import check_common, curvature_backward
from .layers import SUPPORTED_NAMES, find_adapters, validate_skip_modules
from .losses import check_loss_fn, inverse_coefficient, loss_coefficient

DAMPING_FORMS = ("exact", "factored")
# The default damping: a fraction of each layer's curvature scale (the largest eigenvalue of its
# Kronecker block). 0.1 bounds the amplification of any direction to 10x the stiffest one's.
DEFAULT_RELATIVE_DAMPING = 0.1
COMPUTE_METHODS = ("eigen", "inverse", "cholesky")
DAMPING_SPLITS = ("pi", "equal")


def gradient_health(mats: list[torch.Tensor]) -> torch.Tensor:
    """A 0-d tensor, finite iff every gradient matrix is (their largest magnitude,
    NaN-propagating, :func:`kfac_kernels._flags.finite_health`), no host read."""
    return finite_health(mats)


class KFAC(DetachesHooksOnExit):
    """K-FAC preconditioner: ``loss.backward(); precond.step(); optimizer.step()``.

    Args:
        model: the network; its ``nn.Linear``, ``nn.Conv1d``/``nn.Conv2d``, affine
            ``nn.LayerNorm``/``nn.BatchNorm1d/2d``, ``nn.Embedding`` and
            ``nn.MultiheadAttention`` layers with trainable weights are preconditioned (others
            are named once in a warning and left alone).
        damping: absolute Tikhonov damping ``gamma > 0`` (added to the eigenvalues of
            ``kron(G, A)``, or split between the factors, see ``damping_form``).
        relative_damping: damping as a fraction of each layer's curvature scale, the largest
            eigenvalue ``m = lambda_max(A) lambda_max(G)`` of its Kronecker block: exact
            damping ``relative_damping * m``, factored damping ``sqrt(relative_damping)`` times
            each factor's largest eigenvalue (see :mod:`kfac_kernels.blocks.kronecker`). It
            means the same on every layer and for every loss scale. Pass ``damping`` or
            ``relative_damping``, not both; with neither, the default is
            ``relative_damping=0.1`` (:data:`DEFAULT_RELATIVE_DAMPING`).
        factor_decay: EMA decay of the factors, in ``[0, 1)``; the first update takes the batch
            factors as they are.
        factor_update_steps: update the factors every this many steps.
        inv_update_steps: recompute the eigendecompositions/inverses every this many steps.
        inv_warmup_steps: during the first this many steps, recompute them at every factor
            update as well (the moving average is young then and moves fastest, so a
            preconditioner kept for ``inv_update_steps`` steps lags it most; on the
            ``kfac-train`` tasks BD-KFAC then reached its targets in fewer steps, see the
            README). ``0``: no warm-up.
        structure: the factors' structure, a key of :data:`kfac_kernels.blocks.BLOCKS`:
            ``"dense"``, ``"block-diagonal"`` (BD-KFAC, see ``num_blocks``) or ``"diagonal"``.
        num_blocks, block_size: the partition of ``structure="block-diagonal"``: ``num_blocks``
            near-equal parts of each layer's input features (channels of a convolution) and
            output features (default 4), or parts of ``block_size`` features.
        kfac_approx: ``"expand"`` or ``"reduce"`` (Eschenhagen et al., 2023).
        fisher_type: ``"empirical"`` (uses the gradients of ``loss.backward()``), ``"mc"`` or
            ``"type-2"`` (use ``precond.backward(outputs, targets)``; need ``loss_fn``).
        loss_fn: ``nn.CrossEntropyLoss`` / ``nn.MSELoss`` / ``nn.BCEWithLogitsLoss`` for
            ``precond.backward``.
        mc_samples: labels sampled per factor update for ``"mc"``.
        loss_average: how the loss was reduced: ``None`` (sum), ``"batch"`` (mean over examples)
            or ``"batch+sequence"`` (mean over examples and the layer's weight-sharing dim).
        damping_form: ``"exact"`` (eigen damping) or ``"factored"`` (Tikhonov on each factor).
        compute_method: ``"eigen"``, ``"inverse"`` (precomputed damped inverses) or
            ``"cholesky"`` (Cholesky factors of the damped factors and two triangular solves per
            side and step: faster than ``"inverse"`` when ``inv_update_steps`` is 1 or 2); the
            last two only with ``damping_form="factored"``.
        damping_split: how the factored damping is shared between ``A`` and ``G``: ``"pi"``
            (Tselepidis et al. (2020), Eq. 8-9) or ``"equal"`` (``gamma`` on both, as the
            BD-KFAC paper's damped block inverses).
        kl_clip: KL-clipping constant ``kappa`` or ``None``; needs a learning rate (``lr`` here,
            ``step(lr=...)``, or the optimizer's through :class:`PreconditionedOptimizer`).
        lr: learning rate used by KL-clipping.
        skip_modules: module names (fnmatch patterns) or types not to precondition.
        grad_scaler: a ``torch.amp.GradScaler`` whose scale is removed from captured gradients;
            call ``scaler.unscale_(optimizer)`` before :meth:`step`.
        factor_dtype: dtype of factors and decompositions (default: fp32 for fp16/bf16 layers,
            the parameter dtype otherwise).
        backend: kernel backend of the factor accumulation (``"auto"``, ``"eager"``, ...).
        eigh_backend: kernel backend of the decompositions (:func:`kfac_kernels.ops.block_eigh`,
            :func:`~kfac_kernels.ops.block_damped_inverse`).
        generator: random generator for ``"mc"`` (its state is part of :meth:`state_dict`).
        grad_accumulation_steps: micro-batches per step whose losses are averaged (each
            ``loss / k`` backpropagated, e.g. under DDP's ``no_sync``): the factors are then
            those of the whole step's batch.
        distributed: ``None`` (default: on when ``torch.distributed`` is initialised with more
            than one rank), ``True`` or ``False``. On: factors are all-reduced and the
            decompositions shared out between ranks (:mod:`kfac_kernels.distributed`).
        process_group: the ``torch.distributed`` group (default: the world).
        distributed_strategy: ``"comm-opt"`` (default: each layer decomposed by one rank and
            broadcast; every rank preconditions every layer) or ``"mem-opt"`` (each rank keeps
            and applies only its layers' preconditioners; the preconditioned gradients are
            all-reduced -- less memory, more communication, the same results; a
            :meth:`state_dict` then holds this rank's preconditioners only).

    A module called several times in one forward pass contributes each call's inputs and output
    gradients as additional examples. A step whose gradients contain NaN/inf (an AMP overflow)
    changes nothing: parameters' gradients, factors and step count stay as they were.
    """

    def __init__(self, model: nn.Module, *, damping: float | None = None,
                 relative_damping: float | None = None, factor_decay: float = 0.95,
                 factor_update_steps: int = 1, inv_update_steps: int = 10,
                 inv_warmup_steps: int = 0, structure: str = "dense", num_blocks: int | None = None,
                 block_size: int | None = None, kfac_approx: str = "expand",
                 fisher_type: str = "empirical", loss_fn: nn.Module | None = None,
                 mc_samples: int = 1, loss_average: str | None = "batch",
                 damping_form: str = "exact", compute_method: str = "eigen",
                 damping_split: str = "pi", kl_clip: float | None = None,
                 lr: float | None = None, skip_modules: Iterable = (),
                 grad_scaler: torch.amp.GradScaler | None = None,
                 factor_dtype: torch.dtype | None = None, backend: str = "auto",
                 eigh_backend: str = "auto", generator: torch.Generator | None = None,
                 grad_accumulation_steps: int = 1, distributed: bool | None = None,
                 process_group=None, distributed_strategy: str = "comm-opt"):
        who = type(self).__name__
        args.instance(who, "model", model, nn.Module, "a torch.nn.Module", allow_none=False)
        if damping is not None and relative_damping is not None:
            raise ValueError(f"{who}: pass damping (absolute) or relative_damping, not both "
                             f"(got damping={damping!r}, relative_damping={relative_damping!r})")
        if damping is not None:
            damping = args.positive_float(who, "damping", damping)
        if relative_damping is not None:
            relative_damping = args.positive_float(who, "relative_damping", relative_damping)
        self.relative_damping = damping is None
        if damping is None:
            damping = (DEFAULT_RELATIVE_DAMPING if relative_damping is None
                       else relative_damping)
        factor_decay = args.fraction(who, "factor_decay", factor_decay)
        args.positive_int(who, "factor_update_steps", factor_update_steps)
        args.positive_int(who, "inv_update_steps", inv_update_steps)
        args.non_negative_int(who, "inv_warmup_steps", inv_warmup_steps)
        args.choice(who, "structure", structure, tuple(BLOCKS))
        options = self._structure_options(who, structure, num_blocks, block_size)
        check_common(who, kfac_approx, fisher_type, loss_average, mc_samples, backend, generator)
        if fisher_type != "empirical" and loss_fn is None:
            raise ValueError(f"{who}: fisher_type={fisher_type!r} needs loss_fn (an "
                             "nn.CrossEntropyLoss, nn.MSELoss or nn.BCEWithLogitsLoss) to sample "
                             "or factorise the loss Hessian")
        if loss_fn is not None:
            check_loss_fn(loss_fn, loss_average, who)
        args.choice(who, "damping_form", damping_form, DAMPING_FORMS)
        args.choice(who, "compute_method", compute_method, COMPUTE_METHODS)
        if compute_method != "eigen" and damping_form == "exact":
            raise ValueError(f"{who}: compute_method={compute_method!r} needs "
                             "damping_form='factored'; exact eigen damping needs "
                             "compute_method='eigen'")
        args.choice(who, "damping_split", damping_split, DAMPING_SPLITS)
        kl_clip = args.positive_float(who, "kl_clip", kl_clip, allow_none=True)
        if lr is not None and (isinstance(lr, bool) or not isinstance(lr, (int, float))
                               or not math.isfinite(lr) or lr < 0):
            raise ValueError(f"{who}: lr must be a non-negative finite float or None, got {lr!r}")
        args.instance(who, "grad_scaler", grad_scaler, torch.amp.GradScaler,
                      "a torch.amp.GradScaler")
        if factor_dtype not in (None, torch.float32, torch.float64):
            raise ValueError(f"{who}: factor_dtype must be torch.float32, torch.float64 or None, "
                             f"got {factor_dtype!r}")
        if eigh_backend not in BACKENDS:
            raise ValueError(f"{who}: eigh_backend must be one of "
                             f"{', '.join(map(repr, BACKENDS))}, got {eigh_backend!r}")
        dist_utils.check_arguments(who, grad_accumulation_steps, distributed)
        args.choice(who, "distributed_strategy", distributed_strategy, dist_utils.STRATEGIES)
        skip_modules = validate_skip_modules(model, skip_modules, who)
        self.adapters = find_adapters(model, skip_modules, who, kfac_approx=kfac_approx)
        if not self.adapters:
            raise ValueError(f"{who}: the model has no supported layers ({SUPPORTED_NAMES}) "
                             "with trainable weights")
        self.model = model
        self.damping = damping
        self.factor_decay = factor_decay
        self.factor_update_steps = factor_update_steps
        self.inv_update_steps = inv_update_steps
        self.inv_warmup_steps = inv_warmup_steps
        self.structure = structure
        self.kfac_approx = kfac_approx
        self.fisher_type = fisher_type
        self.loss_fn = loss_fn
        self.mc_samples = mc_samples
        self.loss_average = loss_average
        self.damping_form = damping_form
        self.compute_method = compute_method
        self.damping_split = damping_split
        self.kl_clip = kl_clip
        self.lr = lr
        self.grad_scaler = grad_scaler
        self.generator = generator
        self.backend = backend
        self.eigh_backend = eigh_backend
        self.grad_accumulation_steps = grad_accumulation_steps
        self.distributed = distributed
        self.process_group = process_group
        self.distributed_strategy = distributed_strategy
        self.steps = 0
        # Whether the capture folds dense factors' statistics into them as it forms them
        # (KroneckerBlock.fold_decay); off, each step's sums are folded by a separate lerp.
        self.fold_while_capturing = True
        # Why the last step() did nothing: None, "no gradients" or "non-finite gradients".
        self.skip_reason: str | None = None
        # Device-side checks read with the next step's one host read (kfac_kernels._flags).
        self.checks = DeferredChecks()
        self._batched = BatchedPreconditioner()
        self._warned: set[str] = set()
        block_class = BLOCKS[structure]
        self.blocks = {
            name: block_class(name, adapter, approx=kfac_approx,
                              dtype=factor_dtype or default_factor_dtype(adapter.weight),
                              backend=backend, **options)
            for name, adapter in self.adapters.items()}
        self.capture = Capture(self.adapters, loss_average=loss_average,
                               loss_scale=weak_method(self._loss_scale), train_only=True)
        for name, block in self.blocks.items():
            self.capture.subscribe(name, block)
        self.capture.accumulation_steps = grad_accumulation_steps
        self.capture.attach()
        self.capture.claim(self, who)
        self.distribution = dist_utils.make_strategy(distributed_strategy, self)
        self._arm_capture()

    @staticmethod
    def _structure_options(who, structure, num_blocks, block_size) -> dict:
        if structure != "block-diagonal":
            for name, value in (("num_blocks", num_blocks), ("block_size", block_size)):
                if value is not None:
                    raise ValueError(f"{who}: {name} applies to structure='block-diagonal' only "
                                     f"(got structure={structure!r})")
            return {}
        if block_size is not None:
            args.positive_int(who, "block_size", block_size)
            if num_blocks is not None:
                raise ValueError(f"{who}: pass num_blocks or block_size, not both (got "
                                 f"num_blocks={num_blocks!r}, block_size={block_size!r})")
            return {"block_size": block_size, "num_blocks": None}
        num_blocks = 4 if num_blocks is None else num_blocks
        args.positive_int(who, "num_blocks", num_blocks)
        return {"num_blocks": num_blocks}

    # --- capture ----------------------------------------------------------------------------
    def _loss_scale(self) -> float | None:
        # The scale as a tensor on the device (read on the host it would synchronise).
        return grad_scaler_scale(self.grad_scaler)

    @property
    def is_factor_step(self) -> bool:
        """Whether the coming :meth:`step` updates the factors (curvature is captured)."""
        return self.steps % self.factor_update_steps == 0

    @property
    def is_inverse_step(self) -> bool:
        """Whether the coming :meth:`step` recomputes the decompositions."""
        return self.steps % self.inv_update_steps == 0 or (
            self.steps < self.inv_warmup_steps and self.is_factor_step)

    def _arm_capture(self) -> None:
        """Capture only on factor-update steps; the empirical Fisher reads the user's backward,
        the others only the passes of :meth:`backward`."""
        on = self.is_factor_step
        # Fold the coming statistics into the stored factors as the Gram kernels form them
        # (KroneckerBlock.fold_decay); a distributed step all-reduces the plain sums first.
        fold = None if self.is_distributed or not self.fold_while_capturing else self.factor_decay
        for block in self.blocks.values():
            block.fold_decay = fold
        self.capture.inputs_on = on
        self.capture.grads_on = on and self.fisher_type == "empirical"
        self.capture.world_size = (torch.distributed.get_world_size(self.process_group)
                                   if self.is_distributed else 1)
        self.capture.new_step()

    @property
    def is_distributed(self) -> bool:
        return dist_utils.enabled(self.distributed, self.process_group)

    def discard_pending(self) -> None:
        """Drop curvature captured since the last :meth:`step` (e.g. of a skipped AMP step)."""
        for block in self.blocks.values():
            block.discard_pending()
        self.capture.new_step()

    def remove_hooks(self) -> None:
        """Detach all hooks from the model (the preconditioner stops capturing). Dropping the
        preconditioner does the same; ``with KFAC(model) as precond:`` detaches at the end."""
        self.capture.detach()

    def backward(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """``loss = loss_fn(outputs, targets)``; ``loss.backward()``, with the extra backward
        passes of ``"mc"`` / ``"type-2"`` on factor-update steps. Returns the loss."""
        if self.loss_fn is None:
            raise RuntimeError(f"{type(self).__name__}.backward needs loss_fn: pass loss_fn=... "
                               "to the constructor")
        loss = self.loss_fn(outputs, targets)
        factor_step = self.is_factor_step
        if self.fisher_type != "empirical" and factor_step:
            params = [p for a in self.adapters.values() for p in a.params()]
            curvature_backward(self.capture, self.loss_fn, outputs, targets, self.fisher_type,
                               self.mc_samples, self.generator, params)
        previous = self.capture.grad_multiplier
        if self.fisher_type == "empirical" and factor_step:
            # The loss is known here, so its exact coefficient (e.g. 1/numel for a mean-reduced
            # MSELoss) is used, as kronecker_factors does, instead of the loss_average guess.
            c = loss_coefficient(self.loss_fn, outputs, targets)
            self.capture.grad_multiplier = inverse_coefficient(c)
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

    def gradient_matrices(self) -> dict[str, torch.Tensor]:
        """``[dW | db]`` of every covered layer that has a gradient, by name."""
        mats = {}
        for name, adapter in self.adapters.items():
            if adapter.trainable:
                mat = adapter.grad_matrix()
                if mat is not None:
                    mats[name] = mat
        return mats

    @torch.no_grad()
    def step(self, lr: float | Callable[[torch.Tensor], float] | None = None) -> bool:
        """Update factors/preconditioners when due and precondition the gradients in place.

        Args:
            lr: learning rate for KL-clipping: a float, or a function of a layer's weight
                returning its learning rate; defaults to the constructor's ``lr``.

        Returns ``True`` if gradients were preconditioned, ``False`` if the step was skipped
        (no gradients, or non-finite gradients).
        """
        grads = self.gradient_matrices()
        updates = self.precondition_gradients(grads)
        if updates is None:
            return False
        self.apply_updates(updates, grads, lr)
        return True

    @torch.no_grad()
    def precondition_gradients(self, grads: dict[str, torch.Tensor],
                               health: torch.Tensor | None = None
                               ) -> dict[str, torch.Tensor] | None:
        """One step without KL-clipping and without writing: update the factors and the
        decompositions when due, and return the preconditioned gradient matrices of ``grads``
        (from :meth:`gradient_matrices`); ``None`` (and nothing changed) if the step is
        skipped: no gradients, or non-finite ones. ``health``: a 0-d tensor read together with
        the gradients' (in the step's one host read) that must be finite too, e.g. the loss
        and the gradients of parameters no layer covers (a caller's step skips as a whole)."""
        self.skip_reason = None
        if not grads:
            self.skip_reason = "no gradients"
            self._warn_once("no-gradients", (
                f"{type(self).__name__}: step() found no gradients of the covered layers: call "
                "loss.backward() (or precond.backward(outputs, targets)) before step(); nothing "
                "was preconditioned"))
            self.discard_pending()
            return None
        factor_step = self.is_factor_step
        if factor_step and self.is_distributed:
            dist_utils.allreduce_pending(self.blocks, self.process_group)
        pending = (pending_healths(list(self.blocks.values())) if factor_step else {})
        # The step's one host read: the gradients, this step's statistics and the checks queued
        # by earlier steps (e.g. their decompositions), together.
        grads_ok = gradient_health(list(grads.values()))
        if health is not None:
            grads_ok = grads_ok + health.to(grads_ok.device, grads_ok.dtype)
        ok = self.checks.read([grads_ok, *pending.values()])
        if not ok[0]:
            self.skip_reason = "non-finite gradients"
            self.discard_pending()
            return None
        if factor_step:
            if not any(b.pending is not None for b in self.blocks.values()):
                self._warn_nothing_captured()
            self._update_factors(dict(zip(pending, ok[1:])))
        self.discard_pending()
        due = [n for n in grads if self.blocks[n].has_factors
               and (self.is_inverse_step or self.blocks[n].decomposition is None)]
        self.distribution.refresh(due)
        updates = self._precondition_many({name: mat for name, mat in grads.items()
                                           if self.distribution.preconditions(name)})
        updates = self.distribution.share_updates(updates, grads)
        self.steps += 1
        self._arm_capture()
        return updates

    def apply_updates(self, updates: dict[str, torch.Tensor], grads: dict[str, torch.Tensor],
                      lr=None, kl_clip: bool = True) -> None:
        """Scale ``updates`` by the KL-clipping factor (if on) and write them into the
        parameters' gradients."""
        nu = None
        if kl_clip and self.kl_clip is not None and updates:
            nu = self.kl_clip_factor(updates, grads, lr)
        scales = {}   # nu in each dtype, converted once
        for name, v in updates.items():
            dtype, scale = grads[name].dtype, None
            if nu is not None:
                if v.dtype not in scales:
                    scales[v.dtype] = nu.to(v.dtype)
                if v.dtype == dtype:
                    scale = scales[dtype]     # applied as the update is written: one pass
                else:
                    v = v * scales[v.dtype]   # before the one rounding to the gradient's dtype
            self.adapters[name].set_grad_matrix(v if v.dtype == dtype else v.to(dtype), scale)

    @property
    def _split(self) -> str | None:
        return None if self.damping_form == "exact" else self.damping_split

    def _precondition(self, name: str, mat: torch.Tensor) -> torch.Tensor:
        return self.blocks[name].precondition(mat, self.compute_method, self.damping, self._split,
                                              self.relative_damping)

    def _precondition_many(self, mats: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """:meth:`_precondition` of every layer in ``mats``, same-shape layers stacked."""
        return self._batched(self.blocks, mats, self.compute_method, self.damping, self._split,
                             self.relative_damping)

    def _update_factors(self, finite: dict[str, bool]) -> None:
        """Fold the step's statistics into the factors (``finite``: by layer, whether they
        are)."""
        if self.fisher_type != "empirical":
            missing_g = [name for name, b in self.blocks.items()
                         if b.pending is not None and b.pending.a is not None
                         and b.pending.g is None]
            if missing_g:
                self.discard_pending()
                raise RuntimeError(
                    f"{type(self).__name__}: fisher_type={self.fisher_type!r} captured no output "
                    f"gradients for {missing_g}: compute the loss with "
                    "`loss = precond.backward(outputs, targets)` instead of `loss.backward()`")
        lerps: tuple[list, list] = ([], [])
        for name, ok in finite.items():
            if ok:
                self.blocks[name].fold_pending(self.factor_decay, lerps)
                continue
            self.blocks[name].discard_pending()
            self._warn_once(f"nonfinite-batch:{name}", (
                f"{type(self).__name__}: non-finite curvature for module {name!r} (NaN/inf "
                "in its inputs or output gradients); its factor update is skipped this "
                "step and whenever this happens again"))
        if lerps[0]:
            torch._foreach_lerp_(*lerps, 1.0 - self.factor_decay)

    def _warn_nothing_captured(self) -> None:
        modules = [a.module for a in self.adapters.values()]
        if not any(m.training for m in modules):
            cause = ("the model is in evaluation mode (call model.train(): curvature is "
                     "captured from modules in training mode only)")
        elif not self.capture.attached:
            cause = "its hooks were removed (remove_hooks())"
        else:
            cause = ("no forward pass with gradients enabled reached the covered layers since "
                     "the last step")
        self._warn_once("nothing-captured", (
            f"{type(self).__name__}: step {self.steps + 1} should update the factors but no "
            f"curvature was captured: {cause}; the gradients are preconditioned with the "
            "factors so far (left unchanged before the first update)"))

    def decompose(self, names: list[str], check: bool = True) -> None:
        """Recompute the decompositions of ``names`` on this process, in as few batched calls
        as their sizes allow. Where a result is not finite the previous decomposition is kept
        (before any, the layer's gradient stays unpreconditioned); the failure is found by a
        host read -- right away with ``check``, else with the next step's one read -- and then
        answered by an fp64 retry, or a warning that keeps the previous one."""
        blocks = [self.blocks[n] for n in names]
        if self.relative_damping and self.compute_method != "eigen":
            # their damping scales, all blocks in one batched power iteration
            measure_largest_eigenvalues(blocks)
        jobs = [b.decomposition_jobs(self.compute_method, self.damping, self._split,
                                     self.relative_damping) for b in blocks]
        results = iter(run_jobs([j for js in jobs for j in js], self.eigh_backend))
        for block, js in zip(blocks, jobs):
            health = block.set_decomposition([next(results) for _ in js], self.compute_method,
                                             self.damping, self._split, self.relative_damping)
            if health is None:  # even the fp64 solve raised
                self._decomposition_failed(block)
                continue
            self.checks.add(health, self, "_retry_decomposition", block, js,
                            on_success="_decomposition_verified")
        if check:
            self.checks.read()

    def _retry_decomposition(self, block, jobs) -> None:
        """A decomposition found not finite: once more in fp64 (read at once: this is rare)."""
        if block.factors_finite():
            results = retry_in_float64(jobs, self.eigh_backend)
            health = block.set_decomposition(results, self.compute_method, self.damping,
                                             self._split, self.relative_damping)
            if health is not None and bool(health.isfinite()):
                block.unverified = None
                return
            self._decomposition_failed(block)
            return
        self._warn_once(f"nonfinite-factor:{block.name}", (
            f"{type(self).__name__}: the factors of module {block.name!r} are not finite; keeping "
            "its previous preconditioner"))

    @staticmethod
    def _decomposition_verified(block, jobs) -> None:
        block.unverified = None

    def _decomposition_failed(self, block) -> None:
        self._warn_once(f"decomposition:{block.name}", (
            f"{type(self).__name__}: could not decompose the factors of module {block.name!r}, "
            "even in float64; keeping its previous preconditioner"))

    def kl_clip_factor(self, updates, grads, lr) -> torch.Tensor:
        """``nu`` of KL-clipping for preconditioned gradients ``updates`` of ``grads``: a 0-d
        tensor on their device (no host read)."""
        lr = self.lr if lr is None else lr
        if lr is None:
            raise RuntimeError(f"{type(self).__name__}: kl_clip needs a learning rate: pass "
                               "lr=... to the constructor or to step(), or use "
                               "PreconditionedOptimizer")
        # sum over layers of lr^2 |v . g|, the absolute values and a shared learning rate applied
        # once to the stacked products (``v`` is usually not contiguous: a dot product of its
        # flattened view would copy it)
        names = list(updates)
        dots = [(updates[n] * (grads[n] if grads[n].dtype == updates[n].dtype
                               else grads[n].to(updates[n].dtype))).sum().double()
                for n in names]
        rates = [lr(self.adapters[n].weight) if callable(lr) else lr for n in names]
        shared = len(set(rates)) == 1
        if not shared:
            dots = [dot * rate ** 2 for dot, rate in zip(dots, rates)]
        total = torch.stack(dots).abs().sum()
        if shared:
            total = total * rates[0] ** 2
        nu = torch.sqrt(self.kl_clip / total.clamp_min(1e-300)).clamp_max(1.0)
        return torch.where(total > 0, nu, torch.ones_like(nu))

    # --- views ------------------------------------------------------------------------------
    @property
    def factors(self) -> dict:
        """``(A, G)`` of every layer with factors, in its structure's layout (``A``
        normalised)."""
        return {n: b.factors() for n, b in self.blocks.items() if b.has_factors}

    @property
    def preconditioners(self) -> dict:
        """The current decomposition of every layer that has one (a list per entry for a
        block-diagonal side, else a tensor)."""
        return {n: b.decomposition_state() for n, b in self.blocks.items()
                if b.decomposition is not None}

    # --- state ------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Everything needed to resume bit-identically: step count, factors, decompositions
        and the MC generator state. Tensors are referenced, not copied (as in torch.optim)."""
        return {
            "steps": self.steps,
            "structure": self.structure,
            "factors": {n: b.factor_state() for n, b in self.blocks.items() if b.has_factors},
            "preconditioners": self.preconditioners,
            "generator": None if self.generator is None else self.generator.get_state(),
        }

    def load_state_dict(self, state_dict: dict) -> None:
        who = f"{type(self).__name__}.load_state_dict"
        for key in ("steps", "factors", "preconditioners"):
            if key not in state_dict:
                raise KeyError(f"{who}: state_dict has no {key!r} entry")
        saved = state_dict.get("structure", self.structure)
        if saved != self.structure:
            raise ValueError(f"{who}: state_dict was saved with structure={saved!r}; this "
                             f"preconditioner uses structure={self.structure!r}")
        for section in ("factors", "preconditioners"):
            for name in state_dict[section]:
                if name not in self.blocks:
                    raise ValueError(f"{who}: state_dict has {section} for module {name!r}, "
                                     "which this preconditioner does not cover")
        factors = {name: self.blocks[name].factors_from_state(state, who)
                   for name, state in state_dict["factors"].items()}
        decompositions = {}
        for name, dec in state_dict["preconditioners"].items():
            block = self.blocks[name]
            loaded = block.decomposition_from_state(dec, self.compute_method, self._split, who)
            if loaded is None:
                # Saved with another compute_method/damping_form: rebuilt from the factors at
                # the next step instead of being misread.
                expected = block.decomposition_template(self.compute_method, self._split)
                self._warn_once(f"load-preconditioner:{name}", (
                    f"{who}: the preconditioner of module {name!r} was saved with other settings "
                    f"(entries {sorted(dec)}, expected "
                    f"{sorted(k for k, v in expected.items() if v)}); it is recomputed from the "
                    "factors at the next step"))
                continue
            decompositions[name] = loaded
        for name, block in self.blocks.items():
            block.set_factors(factors.get(name))
            block.decomposition = decompositions.get(name)
            block.unverified = None
        self.checks = DeferredChecks()
        self.steps = int(state_dict["steps"])
        gen_state = state_dict.get("generator")
        if gen_state is not None and self.generator is not None:
            self.generator.set_state(gen_state)
        self.discard_pending()
        self._arm_capture()


class BDKFAC(KFAC):
    """Block-diagonal K-FAC (Yu & Tatebe, BD-KFAC): :class:`KFAC` with
    ``structure="block-diagonal"``; every other argument, and its default, is :class:`KFAC`'s.

    The paper's setting (AdamW underneath, 4 blocks, spatially averaged convolution inputs,
    precomputed damped block inverses with the damping on both factors, KL-clipping, factors
    every 12 steps and inverses every 120) is::

        BDKFAC(model, num_blocks=4, damping=2.8e-3, kfac_approx="reduce",
               damping_form="factored", compute_method="inverse", damping_split="equal",
               kl_clip=2e-3, factor_update_steps=12, inv_update_steps=120)
    """

    def __init__(self, model: nn.Module, *, num_blocks: int | None = None,
                 block_size: int | None = None, **kwargs):
        if "structure" in kwargs:
            raise TypeError("BDKFAC: structure is always 'block-diagonal' (use KFAC for the "
                            "others)")
        super().__init__(model, structure="block-diagonal", num_blocks=num_blocks,
                         block_size=block_size, **kwargs)
