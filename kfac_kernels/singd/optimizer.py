r"""SINGD / INGD / IKFAC (Lin et al. (2024), Fig. 3 and 4) as a ``torch.optim.Optimizer``.

Per supported layer (``nn.Linear``, ``nn.Conv1d``, ``nn.Conv2d``; bias folded in as a last input
coordinate, one factor pair per convolution group) with gradient matrix ``M = [dW | db]``
(``d_o x d_i``), structured factors ``K`` (``d_i``) and ``C`` (``d_o``) and their momenta:

every ``T`` steps, with ``U`` and ``G`` the Kronecker factors captured on that step (the same
scaling as :class:`kfac_kernels.KFAC`: ``U`` the average input second moment, ``G`` the output
gradients' second moment of the summed loss over ``N``)::

    H_K = Pi_K(K^T U K)           H_C = Pi_C(C^T G C)
    c2  = lam Tr(C^T C)           kappa2 = lam Tr(K^T K)
    m_K <- alpha1 m_K + Pi_K(Tr(H_C) H_K + c2 K^T K - d_o I) / (2 d_o)
    m_C <- alpha1 m_C + Pi_C(Tr(H_K) H_C + kappa2 C^T C - d_i I) / (2 d_i)
    K   <- K (I - beta1 m_K)      C <- C (I - beta1 m_C)

and on every step::

    m_mu <- alpha2 m_mu + C C^T M K K^T + gamma mu          mu <- mu - beta2 m_mu

(``m_mu`` per parameter, weight and bias separately, as the published reference implementation
applies momentum and weight decay per parameter). ``kfac_like=True`` is IKFAC (Eq. 10): the trace
terms become ``Tr(I_{d_o}) = d_o`` and ``lam Tr(I_{d_o})`` (likewise for ``C``), with no Riemannian
momentum. Dense structures give INGD. ``K`` and ``C`` start at the identity, the momenta at zero
(the reference implementation's warm start). ``K K^T`` tracks ``(S_K + lam I)^{-1}`` of K-FAC
(Theorem 1): no inverse or decomposition is computed anywhere.

Parameters of other modules (e.g. normalisation layers) are updated by the same rule with
``K = I`` and ``C = I``: SGD with momentum ``alpha2`` and weight decay ``gamma``.

Low precision (``preconditioner_dtype=torch.bfloat16``, or bf16 parameters). Safeguards:

* ``U`` and ``G`` are accumulated in fp32 by the curvature capture (bf16 sums of many outer
  products lose the small ones);
* ``K``, ``C``, ``m_K``, ``m_C`` are *stored* in the low precision but every product, trace and
  the projection are evaluated in fp32 and rounded once when stored (the update ``I - beta1 m``
  differs from ``I`` by ~``beta1``, below bf16's resolution near 1 when computed in bf16);
* the preconditioned gradient ``C C^T M K K^T`` is computed in fp32 and the momentum buffer is kept
  in fp32, so small preconditioned steps are not flushed before they are added up;
* the parameter update ``mu - beta2 m_mu`` is evaluated in fp32 and rounded once;
* a step whose gradients contain NaN/inf (an AMP overflow) changes nothing; non-finite captured
  curvature skips that layer's factor update, and an update that would make a factor non-finite
  is dropped (both warned once), so one bad batch cannot poison ``K`` or ``C``.
"""
from __future__ import annotations

import warnings
from typing import Iterable

import torch
from torch import nn

from .. import _arguments as args
from .. import distributed as dist_utils
from ..capture import (Capture, DetachesHooksOnExit, default_factor_dtype, grad_scaler_scale,
                       weak_method)
from ..curvature import check_common
from ..layers import find_adapters, validate_skip_modules
from .._flags import DeferredChecks, largest_magnitude
from .._skips import SkipCounter
from . import stacked
from .block import SingdBlock
from .fused import FusedSteps
from .guard import DirectionGuard, select
from .structures import BlockDiagonal, Diagonal, StructuredMatrix, structure_class
from .update import factor_update, precondition

__all__ = ["SINGD", "factor_update", "precondition"]

LOW_PRECISION = (torch.float16, torch.bfloat16)
STORAGE_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _pair(value):
    return tuple(value) if isinstance(value, (tuple, list)) else (value, value)


class SINGD(DetachesHooksOnExit, FusedSteps, DirectionGuard, torch.optim.Optimizer):
    """Structured inverse-free natural gradient descent (SINGD; INGD, IKFAC as special cases).

    Args:
        model: the network; all its trainable parameters are optimised.
        lr: ``beta2``, learning rate of the parameters.
        momentum: ``alpha2``, momentum of the parameter update, in ``[0, 1)``.
        damping: ``lambda >= 0``.
        alpha1: Riemannian momentum of ``m_K``, ``m_C``, in ``[0, 1)`` (not used by IKFAC).
        weight_decay: ``gamma >= 0``, added to the preconditioned gradient.
        T: update ``K`` and ``C`` every ``T`` steps (curvature is captured on those steps only).
        lr_cov: ``beta1 >= 0``, learning rate of ``K`` and ``C``.
        structures: ``(K structure, C structure)`` or one name for both, from
            :data:`kfac_kernels.singd.STRUCTURES`.
        block_size: ``k`` of the block-diagonal, hierarchical and rank-k lower-triangular
            structures (one int, or a pair for ``K`` and ``C``).
        kfac_approx: ``"expand"`` or ``"reduce"`` for weight-sharing layers (Eschenhagen et al.,
            2023).
        loss_average: ``None`` (summed loss), ``"batch"`` or ``"batch+sequence"``.
        kfac_like: IKFAC (Eq. 10).
        preconditioner_dtype: storage dtype of ``K, C, m_K, m_C`` (one dtype or a pair); default
            the parameter's dtype.
        grad_scaler: a ``torch.amp.GradScaler`` used with this optimizer (its scale is removed
            from the captured output gradients; ``scaler.step`` unscales the gradients and skips
            steps with inf).
        skip_modules: module names (fnmatch patterns) or types whose parameters are updated
            without preconditioning.
        backend: kernel backend of the curvature capture and of the fused step.
        normalize_lr_cov: divide ``lr_cov`` by ``max(1, max |m|)`` for each factor (normalised
            gradient descent on ``K`` and ``C``; the new momentum term is then scaled by
            ``1 - alpha1`` so that ``max |m|`` cannot grow without bound), as the published
            reference implementation offers it: it keeps ``I - beta1 m`` close to the identity
            while the factors warm up from ``I``, so larger ``lr_cov`` stay stable.
        fused: with diagonal ``K`` and ``C``, update the factors of all layers in one launch of
            :func:`kfac_kernels.ops.singd_diagonal_factor_update` and apply steps 2-3 of Fig. 4
            (preconditioning, weight decay, momentum, parameter update) to each weight and bias in
            one pass of :func:`kfac_kernels.ops.singd_diagonal_step`; with block-diagonal ``K`` and
            ``C``, update the factors of all layers in one call of
            :func:`kfac_kernels.ops.singd_block_factor_update` and apply steps 2-3 to each layer's
            weight and bias together in one pass of :func:`kfac_kernels.ops.singd_block_step`; other
            structures (and, for the parameter step, convolutions with groups, non-contiguous
            weights, or factors kept wider than fp32 for fp32 parameters) use the readable path.
            Same result up to round-off.
        statistics_from_rows: for diagonal and block-diagonal structures, accumulate only the
            structure's part of ``U`` (``nn.Linear`` inputs; convolution inputs with
            ``kfac_approx="expand"``, without unfolding the layer's patches) and ``G``
            (``nn.Linear`` and convolution output gradients) from the rows, never forming the dense
            ``d x d`` matrices (:mod:`kfac_kernels.singd.block`). For dense structures of
            ``nn.Linear`` and convolution layers, a step's rows themselves are kept while there
            are no more of them than ``d`` (late CNN stages, small batches): ``K^T U K`` is then
            ``(X K)^T (X K) / m``, ``O(m d^2)`` instead of ``O(d^3)`` flops, and ``U`` is never
            formed (past ``d`` rows, the dense ``U``). ``False`` captures the dense ``U`` and
            ``G`` and projects them (the readable reference path). Same result up to round-off.
        grad_accumulation_steps: micro-batches per step whose losses are averaged (each
            ``loss / k`` backpropagated): ``U`` and ``G`` are then those of the whole batch.
        distributed: ``None`` (on when ``torch.distributed`` runs with more than one rank),
            ``True`` or ``False``. On: ``U`` and ``G`` (or, with ``statistics_from_rows``, their
            diagonals / diagonal blocks) are all-reduced on factor-update steps (one triangle,
            bucketed) so every rank updates ``K`` and ``C`` identically.
        process_group: the ``torch.distributed`` group (default: the world).
        warm_start: start ``K`` and ``C`` at the damped inverse roots of the first captured
            statistics, ``K K^T ~ (U + lambda I)^{-1}``, ``C C^T ~ (G + lambda I)^{-1}``,
            computed with matrix products only (:mod:`kfac_kernels.singd.warm`), instead of
            at the identity; then the factors follow the curvature from the first step and a
            larger ``lr_cov`` (e.g. ``1 - factor_decay`` of K-FAC, 0.05) is stable. ``False``
            (the default) is the reference implementation's start.
        stack_layers: with dense ``K`` and ``C`` (INGD, IKFAC, ``"dense"``), the layers whose
            factors, statistics and gradients have the same shapes and dtypes (the repeated
            layers of a deep MLP or a transformer; widths below 256) are updated and
            preconditioned as one stack, a batched op where each layer would take its own (on
            the CPU such layers cost dispatch, not flops; :mod:`kfac_kernels.singd.stacked`).
            Each layer keeps its own checks. ``False``: one layer at a time (the readable path).
            Same result up to round-off.
    """

    def __init__(self, model: nn.Module, lr: float = 1e-3, momentum: float = 0.9,
                 damping: float = 1e-3, alpha1: float = 0.5, weight_decay: float = 0.0,
                 T: int = 10, lr_cov: float = 1e-2,
                 structures: str | tuple[str, str] = ("dense", "dense"),
                 block_size: int | tuple[int, int] = 16, kfac_approx: str = "expand",
                 loss_average: str | None = "batch", kfac_like: bool = False,
                 preconditioner_dtype=None, grad_scaler: torch.amp.GradScaler | None = None,
                 skip_modules: Iterable = (), backend: str = "auto", fused: bool = False,
                 normalize_lr_cov: bool = False, statistics_from_rows: bool = True,
                 grad_accumulation_steps: int = 1, distributed: bool | None = None,
                 process_group=None, warm_start: bool = False, stack_layers: bool = True):
        who = "SINGD"
        args.instance(who, "model", model, nn.Module, "a torch.nn.Module", allow_none=False)
        lr = args.in_range(who, "lr", lr)
        momentum = args.in_range(who, "momentum", momentum, high=1.0)
        self.damping = args.in_range(who, "damping", damping)
        self.alpha1 = args.in_range(who, "alpha1", alpha1, high=1.0)
        weight_decay = args.in_range(who, "weight_decay", weight_decay)
        self.lr_cov = args.in_range(who, "lr_cov", lr_cov)
        self.warm_start = args.flag(who, "warm_start", warm_start)
        self.T = args.positive_int(who, "T", T)
        names = _pair(structures)
        if len(names) != 2:
            raise ValueError(f"{who}: structures must be a name or a pair of names (K, C), got "
                             f"{structures!r}")
        self.structure_classes = tuple(structure_class(n, who) for n in names)
        sizes = _pair(block_size)
        if len(sizes) != 2:
            raise ValueError(f"{who}: block_size must be an int or a pair of ints, got "
                             f"{block_size!r}")
        for k in sizes:
            args.positive_int(who, "block_size", k)
        self.block_sizes = tuple(k if cls.takes_block_size else None
                                 for k, cls in zip(sizes, self.structure_classes))
        check_common(who, kfac_approx, "empirical", loss_average, 1, backend, None)
        self.kfac_like = args.flag(who, "kfac_like", kfac_like)
        if kfac_like and self.alpha1 != 0.0:
            warnings.warn(f"{who}: kfac_like=True (IKFAC) has no Riemannian momentum; "
                          f"alpha1={self.alpha1} is not used", stacklevel=2)
        self.fused = args.flag(who, "fused", fused)
        self.stack_layers = args.flag(who, "stack_layers", stack_layers)
        self.normalize_lr_cov = args.flag(who, "normalize_lr_cov", normalize_lr_cov)
        self.statistics_from_rows = args.flag(who, "statistics_from_rows", statistics_from_rows)
        dtypes = _pair(preconditioner_dtype)
        if len(dtypes) != 2:
            raise ValueError(f"{who}: preconditioner_dtype must be None, a dtype or a pair "
                             f"(K, C), got {preconditioner_dtype!r}")
        for dt in dtypes:
            if dt is not None and dt not in STORAGE_DTYPES:
                raise ValueError(f"{who}: preconditioner_dtype must be None, one of "
                                 f"{STORAGE_DTYPES} or a pair of them, got "
                                 f"{preconditioner_dtype!r}")
        self.preconditioner_dtypes = dtypes
        self.grad_scaler = args.instance(who, "grad_scaler", grad_scaler, torch.amp.GradScaler,
                                         "a torch.amp.GradScaler")
        dist_utils.check_arguments(who, grad_accumulation_steps, distributed)
        self.distributed = distributed
        self.process_group = process_group
        skip_modules = validate_skip_modules(model, skip_modules, who)
        # Unsupported layers get the K = C = I update (SGD with momentum), said once.
        self.adapters = find_adapters(model, skip_modules, who, kfac_approx=kfac_approx,
                                      unsupported_effect="they get the update with K = C = I "
                                                         "(SGD with momentum)")
        params = [p for p in model.parameters() if p.requires_grad]
        if not params:
            raise ValueError(f"{who}: the model has no trainable parameters")
        self._initialising = True
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay))
        self._initialising = False
        covered = {id(p) for a in self.adapters.values() for p in a.params()}
        self._plain_params = [p for p in params if id(p) not in covered]
        self.model = model
        self.kfac_approx = kfac_approx
        self.loss_average = loss_average
        self.backend = backend
        self.steps = 0
        self._warned: set[str] = set()
        self.skips = SkipCounter("SINGD")
        self.checks = DeferredChecks()  # read with the next step's one host read
        self.blocks = {name: self._make_block(name, ad) for name, ad in self.adapters.items()}
        self._stacked_preconditioner = stacked.StackedPreconditioner()
        self._layer_keys: dict[str, tuple | None] = {}
        self.capture = Capture(self.adapters, loss_average=loss_average,
                               loss_scale=weak_method(self._loss_scale), train_only=True)
        for name, block in self.blocks.items():
            self.capture.subscribe(name, block)
        self.capture.accumulation_steps = grad_accumulation_steps
        self.capture.attach()
        self.capture.claim(self, who)
        self._arm_capture()

    def _make_block(self, name: str, adapter) -> SingdBlock:
        w = adapter.weight
        store = tuple(dt if dt is not None else w.dtype for dt in self.preconditioner_dtypes)
        compute = default_factor_dtype(w)
        for dt in store:
            compute = torch.promote_types(compute, torch.float32 if dt in LOW_PRECISION else dt)
        return SingdBlock(name, adapter, approx=self.kfac_approx,
                          dtype=default_factor_dtype(w), backend=self.backend,
                          classes=self.structure_classes, block_sizes=self.block_sizes,
                          from_rows=self.statistics_from_rows, storage=store, compute=compute,
                          momentum=self._uses_riemannian_momentum)

    def add_param_group(self, param_group: dict) -> None:
        if getattr(self, "_initialising", False):
            return super().add_param_group(param_group)
        raise RuntimeError("SINGD: the optimizer has one parameter group holding all of the "
                           "model's trainable parameters; add_param_group is not supported")

    # --- capture ----------------------------------------------------------------------------
    def _loss_scale(self):
        # The scale as a tensor on the device (read on the host it would synchronise).
        return grad_scaler_scale(self.grad_scaler)

    def _arm_capture(self) -> None:
        on = self.steps % self.T == 0
        self.capture.inputs_on = on
        self.capture.grads_on = on
        self.capture.world_size = (torch.distributed.get_world_size(self.process_group)
                                   if self._is_distributed() else 1)
        self.capture.new_step()

    def _discard_pending(self) -> None:
        for block in self.blocks.values():
            block.discard_pending()
        self.capture.new_step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Also drops curvature captured for a step that was never taken (e.g. skipped by a
        GradScaler)."""
        self._discard_pending()
        super().zero_grad(set_to_none=set_to_none)

    def remove_hooks(self) -> None:
        """Detach the curvature hooks (dropping the optimizer does the same; ``with SINGD(...)
        as opt:`` detaches at the end)."""
        self.capture.detach()

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(message, RuntimeWarning, stacklevel=3)

    # --- dtypes and lazy state --------------------------------------------------------------
    def _dtypes(self, name: str) -> tuple[torch.dtype, torch.dtype, torch.dtype]:
        """(storage of K, storage of C, compute dtype) of a layer."""
        block = self.blocks[name]
        return block.storage[0], block.storage[1], block.compute

    @property
    def factors(self) -> dict[str, dict[str, list[StructuredMatrix]]]:
        """Per layer that has been updated: ``K``, ``C`` (and ``m_K``, ``m_C``) per group."""
        return {n: b.state for n, b in self.blocks.items() if b.state is not None}

    @property
    def _uses_riemannian_momentum(self) -> bool:
        return self.alpha1 != 0.0 and not self.kfac_like

    # --- the step ---------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure=None):
        """One SINGD step. Returns the closure's loss (if given). A step whose gradients are
        not finite is skipped without changing any state."""
        from ..kfac import gradient_health

        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        mats = {}
        for name, ad in self.adapters.items():
            mat = ad.grad_matrix()
            if mat is not None:
                mats[name] = mat
        plain = [p for p in self._plain_params if p.grad is not None]
        grads = list(mats.values()) + [p.grad for p in plain]
        if not grads:
            self._discard_pending()
            return loss
        factor_step = self.steps % self.T == 0
        if factor_step and self._is_distributed():
            # U and G of the loss DDP optimises (see kfac_kernels.distributed); no
            # decompositions to share: every rank updates K and C from the same statistics.
            dist_utils.allreduce_pending(self.blocks, self.process_group)
        stats, stat_stacks, stat_healths = (self._pending_statistics(list(mats)) if factor_step
                                            else ({}, [], {}))
        # The step's one host read: the gradients, this step's statistics and the checks of
        # earlier factor updates, together (kfac_kernels._flags).
        grad_max = gradient_health(grads)
        ok = self.checks.read([grad_max] + list(stat_healths.values()))
        if not ok[0]:
            if not (self.grad_scaler is not None and self.grad_scaler.is_enabled()):
                self.skips.skipped(self.steps + 1)
            self._discard_pending()
            return loss
        group = self.param_groups[0]
        if factor_step:
            self._update_factors(list(mats), stats, dict(zip(stat_healths, ok[1:])),
                                 stat_stacks)
        self._discard_pending()
        # Every layer's direction is checked before it is applied (kfac_kernels.singd.guard).
        # (the fused layers' factors are taken first: a restart below must not re-create them)
        fused = {name: self.blocks[name].factors() for name in mats if self._fusable(name)}
        directions, healths = self._precondition_layers(
            {name: mat for name, mat in mats.items() if name not in fused})
        healths.update(self._fused_healths(fused, grad_max))
        finite = self._directions_ok(healths)
        updates = []
        if fused and self.structure_classes[0] is BlockDiagonal:
            for name, state in fused.items():
                self._fused_block_layer_step(name, state, group, finite[name])
        elif fused:
            self._fused_diagonal_steps(fused, group, finite)
        for name, direction in directions.items():
            updates += self._layer_directions(name, select(finite[name], direction))
        updates += [(p, p.grad.to(torch.promote_types(p.dtype, torch.float32))) for p in plain]
        self._apply_all(updates, group)
        self.steps += 1
        self._arm_capture()
        return loss

    def _is_distributed(self) -> bool:
        return dist_utils.enabled(self.distributed, self.process_group)

    @property
    def _fused_factors(self) -> bool:
        return (self.fused and not self.normalize_lr_cov
                and (all(c is Diagonal for c in self.structure_classes)
                     or all(c is BlockDiagonal for c in self.structure_classes)))

    def _pending_statistics(self, names: list[str]) -> tuple[dict, list, dict]:
        """This step's statistics of the layers ``names`` that have them: per layer its
        ``[(U, G)]`` per group; the stacks (:mod:`kfac_kernels.singd.stacked`), ``(names,
        stacked U and G)``; and per layer a 0-d tensor finite iff its statistics are."""
        stacks, alone = self._stacks({name: self._stack_key(name, stats=True) for name in names})
        stats, healths, stat_stacks = {}, {}, []
        for members in stacks:
            per_layer, stacked_stats, finite = stacked.pending_statistics(
                [self.blocks[n] for n in members])
            stats.update(zip(members, per_layer))
            healths.update(zip(members, finite))
            stat_stacks.append((members, stacked_stats))
        for name in alone:
            st = self.blocks[name].pending_statistics()
            if st is not None:
                stats[name] = st
                healths[name] = SingdBlock.statistics_finite(st)
        order = [n for n in names if n in stats]
        return ({n: stats[n] for n in order}, stat_stacks, {n: healths[n] for n in order})

    def _update_factors(self, names: list[str], stats: dict, finite: dict,
                        stat_stacks: list = ()) -> None:
        """Step 1 of Fig. 4 for every layer with statistics (``finite``: by layer, whether
        they are; the others are skipped, warned once). A non-finite update is not stored;
        that is found with the next step's host read and warned then."""
        if not stats and names:
            in_eval = not any(a.module.training for a in self.adapters.values())
            cause = ("the model is in evaluation mode (call model.train(): curvature is "
                     "captured from modules in training mode only)" if in_eval else
                     "no forward pass with gradients enabled reached the covered layers")
            self._warn_once("nothing-captured", (
                f"SINGD: step {self.steps + 1} should update K and C but no curvature was "
                f"captured: {cause}; the factors keep their previous values"))
            return
        for name, ok in finite.items():
            if not ok:
                del stats[name]
                self._warn_once(f"nonfinite-curvature:{name}", (
                    f"SINGD: non-finite curvature for module {name!r} (NaN/inf in its inputs or "
                    "output gradients); its factor update is skipped this step and whenever "
                    "this happens again"))
        if self.warm_start:
            for name, s in stats.items():
                if self.blocks[name].state is None:
                    self.blocks[name].warm_start(s, self.damping)
        if self._fused_factors:
            if self.structure_classes[0] is Diagonal:
                self._update_diagonal_factors_fused(stats)
            else:
                self._update_block_factors_fused(stats)
            return
        settings = dict(damping=self.damping, alpha1=self.alpha1, lr_cov=self.lr_cov,
                        kfac_like=self.kfac_like, normalize_lr_cov=self.normalize_lr_cov)
        alone = set(stats)
        for members, (u, g) in stat_stacks:
            live = [n for n in members if n in stats]   # the ones with finite statistics
            if len(live) < 2:
                continue
            if len(live) < len(members):
                u, g = stacked.stack_statistics([stats[n][0] for n in live])
            healths = stacked.update_factors([self.blocks[n] for n in live], u, g, settings)
            for name, health in zip(live, healths):
                self._check_update(name, health)
            alone -= set(live)
        for name in stats:
            if name in alone:
                self._check_update(name, self.blocks[name].update_factors(stats[name],
                                                                          settings))

    def _stacks(self, keys: dict[str, tuple | None]) -> tuple[list[list[str]], list[str]]:
        """The layers updated or preconditioned as stacks (:mod:`kfac_kernels.singd.stacked`)
        and the others, from their stack keys."""
        if not self.stack_layers or self.normalize_lr_cov:
            return [], list(keys)
        return stacked.stack_groups(keys)

    def _stack_key(self, name: str, stats: bool = False) -> tuple | None:
        """Layer ``name``'s stack key (:func:`kfac_kernels.singd.stacked.layer_key`, kept);
        ``stats``: with its pending statistics' (:func:`~kfac_kernels.singd.stacked.pending_key`),
        ``None`` where it has none."""
        if name not in self._layer_keys:
            self._layer_keys[name] = stacked.layer_key(self.blocks[name])
        key = self._layer_keys[name]
        if key is None or not stats:
            return key
        kinds = stacked.pending_key(self.blocks[name])
        return None if kinds is None else key + kinds

    def _precondition_layers(self, mats: dict[str, torch.Tensor]) -> tuple[dict, dict]:
        """Each layer's preconditioned gradient matrix (compute dtype) and its largest
        magnitude, in the order of ``mats``."""
        stacks, alone = self._stacks({name: self._stack_key(name) for name in mats})
        directions, healths = {}, {}
        for names in stacks:
            blocks = [self.blocks[n] for n in names]
            outs, maxima = self._stacked_preconditioner(
                blocks, [mats[n] for n in names], self.T, self._stack_key(names[0]))
            directions.update(zip(names, outs))
            healths.update(zip(names, maxima))
        for name in alone:
            directions[name] = self.blocks[name].precondition(mats[name], self.T)
            healths[name] = largest_magnitude(directions[name])
        return ({name: directions[name] for name in mats},
                {name: healths[name] for name in mats})

    def _store_factor_update(self, name: str, gi: int, new: dict) -> None:
        """Store group ``gi``'s updated ``K``, ``C`` (and momenta) of layer ``name`` where
        finite (see :meth:`SingdBlock.store`)."""
        self._check_update(name, self.blocks[name].store(gi, new))

    def _check_update(self, name: str, health: torch.Tensor) -> None:
        self.checks.add(health, self, "_warn_nonfinite_update", name)

    def _warn_nonfinite_update(self, name: str) -> None:
        self._warn_once(f"nonfinite-factor:{name}", (
            f"SINGD: the factor update of module {name!r} is not finite (lr_cov too "
            "large for its curvature?); keeping its previous factors"))

    def _layer_directions(self, name: str, direction: torch.Tensor) -> list[tuple]:
        """``(parameter, its part of the layer's preconditioned gradient)`` pairs."""
        ad = self.adapters[name]
        w, b = ad.weight, ad.bias
        if b is not None:
            return [(w, direction[..., :-1].reshape(w.shape)),
                    (b, direction[..., -1].reshape(b.shape))]
        return [(w, direction.reshape(w.shape))]

    def _apply_all(self, updates: list[tuple], group) -> None:
        """``m <- alpha2 m + direction + gamma p``; ``p <- p - beta2 m`` (fp32 or wider) for
        every ``(p, direction)``: as one ``torch._foreach`` op per stage over the parameters
        stored in their direction's dtype (the arithmetic of ``add_(x, alpha=...)``, the
        reference implementation's), one parameter at a time for the others (low-precision
        parameters with fp32 directions and momenta)."""
        same = [(p, d) for p, d in updates if p.dtype == d.dtype]
        for p, d in updates:
            if p.dtype != d.dtype:
                self._apply(p, d, group)
        if not same:
            return
        wd, mom, lr = group["weight_decay"], group["momentum"], group["lr"]
        params = [p for p, _ in same]
        dirs = [d for _, d in same]
        if wd != 0.0:   # out of place: a direction may be the parameter's .grad itself
            dirs = torch._foreach_add(dirs, params, alpha=wd)
        if mom != 0.0:
            bufs, adds = [], []
            for p, d in zip(params, dirs):
                st = self.state[p]
                if st.get("momentum_buffer") is None:
                    st["momentum_buffer"] = d.clone()
                else:
                    bufs.append(st["momentum_buffer"])
                    adds.append(d)
            if bufs:
                torch._foreach_mul_(bufs, mom)
                torch._foreach_add_(bufs, adds)
            dirs = [self.state[p]["momentum_buffer"] for p in params]
        torch._foreach_add_(params, dirs, alpha=-lr)

    def _apply(self, p: torch.Tensor, direction: torch.Tensor, group) -> None:
        """``m <- alpha2 m + direction + gamma p``; ``p <- p - beta2 m`` in the direction's
        dtype (fp32 or wider), for a parameter stored in a lower precision."""
        wd, mom, lr = group["weight_decay"], group["momentum"], group["lr"]
        d = direction
        if wd != 0.0:
            d = d + wd * p.to(d.dtype)
        if mom != 0.0:
            st = self.state[p]
            buf = st.get("momentum_buffer")
            if buf is None:
                buf = d.clone()
            else:
                buf.mul_(mom).add_(d)
            st["momentum_buffer"] = buf
            d = buf
        p.copy_(p.to(d.dtype) - lr * d)

    # --- state ------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """torch.optim's state dict plus ``"singd"``: step count and the factors (stored
        tensors, referenced, not copied)."""
        sd = super().state_dict()
        sd["singd"] = {
            "steps": self.steps,
            "skips": self.skips.state_dict(),
            "structures": tuple(c.name for c in self.structure_classes),
            "block_sizes": self.block_sizes,
            "factors": {name: {key: [list(s.data) for s in mats] for key, mats in st.items()}
                        for name, st in self.factors.items()},
        }
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        who = "SINGD.load_state_dict"
        if "singd" not in state_dict:
            raise KeyError(f"{who}: state_dict has no 'singd' entry (not saved by SINGD)")
        extra = state_dict["singd"]
        names = tuple(c.name for c in self.structure_classes)
        if tuple(extra["structures"]) != names or tuple(extra["block_sizes"]) != self.block_sizes:
            raise ValueError(f"{who}: saved with structures {tuple(extra['structures'])} and "
                             f"block sizes {tuple(extra['block_sizes'])}; this optimizer uses "
                             f"{names} and {self.block_sizes}")
        factors = {}
        for name, st in extra["factors"].items():
            if name not in self.adapters:
                raise ValueError(f"{who}: state_dict has factors for module {name!r}, which "
                                 "this optimizer does not cover")
            dev = self.adapters[name].weight.device
            template = self.blocks[name].initial_state()
            if set(st) != set(template):
                raise ValueError(f"{who}: factors of module {name!r} have entries {sorted(st)}, "
                                 f"expected {sorted(template)}")
            layer = {}
            for key, mats in st.items():
                layer[key] = []
                for ref, data in zip(template[key], mats):
                    shapes = [tuple(t.shape) for t in ref.data]
                    got = [tuple(t.shape) for t in data]
                    if got != shapes:
                        raise ValueError(f"{who}: {key} of module {name!r} has shapes {got}; "
                                         f"this optimizer's is {shapes} (saved from another "
                                         "model or with other structures?)")
                    layer[key].append(type(ref)(ref.dim, tuple(t.detach().clone().to(dev)
                                                               for t in data), ref.k))
            factors[name] = layer
        rest = {k: v for k, v in state_dict.items() if k != "singd"}
        # torch.optim casts state to the parameter dtype; momentum buffers of low-precision
        # parameters are kept in fp32, so they are restored as saved.
        saved_buffers = {i: s["momentum_buffer"] for i, s in rest.get("state", {}).items()
                         if "momentum_buffer" in s}
        super().load_state_dict(rest)
        params = [p for g in self.param_groups for p in g["params"]]
        for i, buf in saved_buffers.items():
            self.state[params[i]]["momentum_buffer"] = buf.detach().clone().to(params[i].device)
        for name, block in self.blocks.items():
            block.state = factors.get(name)
        self.steps = int(extra["steps"])
        self.skips.load_state_dict(extra.get("skips"))
        self._discard_pending()
        self._arm_capture()
