r"""Adaptive K-FAC: Levenberg-Marquardt damping, and a learning rate and momentum chosen on every
step from the quadratic model (Martens & Grosse (2015), Sec. 6-7), as a ``torch.optim``
optimizer.

Each step, with ``g`` the gradient of the objective ``h`` (the loss, plus ``weight_decay / 2
|theta|^2``) on the mini-batch, ``F`` the exact mini-batch GGN and ``D`` the damping:

* ``Delta = -(F_kfac + D)^{-1} g``: the K-FAC (or BD-KFAC) preconditioned gradient with the
  current damping (:class:`~kfac_kernels.KFAC`'s relative damping: ``D`` is ``lambda`` times
  each layer's curvature scale, the largest eigenvalue of its Kronecker block; parameters no layer
  adapter covers use the mean of the covered layers' scales, ``(1 + lambda) s`` on their
  gradient);
* ``alpha, mu`` minimise the damped quadratic model ``M(d) = g^T d + d^T (F + D + eta I) d / 2``
  over ``d = alpha Delta + mu delta_prev`` (a 2 x 2 linear system; ``mu = 0`` on the first step
  or when the system is singular), and the parameters move by ``delta = alpha Delta +
  mu delta_prev``;
* every ``damping_adaptation_interval`` steps, the reduction ratio ``rho = (h(theta + delta) -
  h(theta)) / (M_0(delta) - M_0(0))`` of the *undamped* model ``M_0`` adapts the damping:
  ``lambda <- omega lambda`` when ``rho > 3/4``, ``lambda <- lambda / omega`` when ``rho < 1/4``,
  ``omega = damping_adaptation_decay ** interval`` (Sec. 6.5);
* optionally (``factor_damping_interval``; by default ``gamma = lambda``), the K-FAC
  preconditioner keeps a damping of its own, ``gamma`` (relative, like ``lambda``; it starts
  equal to it): every ``factor_damping_interval`` steps, ``Delta`` is computed with
  ``gamma omega_2``, ``gamma`` and ``gamma / omega_2`` (``omega_2 = sqrt(decay) **
  factor_damping_interval``), and the ``gamma`` whose ``alpha Delta + mu delta_prev`` gives the
  lowest value of the damped model ``M`` is kept and its step taken (Sec. 6.6, the greedy
  adaptation of a separate damping of the approximate Fisher). The rule above adapts the
  trust region of the model; this one the quality of the direction. Tied to ``lambda``, the
  damping falls to its floor wherever the model fits the batch (``rho`` near 1), and the
  preconditioner then amplifies the weak directions so much that ``alpha`` shrinks to about
  1e-3 (deep-linear, digits-vit); kept apart, it did not reach the kfac-train targets sooner
  (see :data:`DEFAULT_FACTOR_DAMPING_INTERVAL`).

No learning rate and no KL-clipping: the model's ``alpha`` sets the step length.

Cost per step, on top of the forward/backward pass and K-FAC's own work: the GGN-vector
products ``J Delta`` and ``J delta_prev`` by forward-mode differentiation (``torch.func``'s
``functional_call`` with dual parameters) of the closure's forward pass, one per vector (each
about one to two forward passes; one on the first step), and products with the loss Hessian at
the outputs (output-sized); every ``damping_adaptation_interval`` steps one more forward pass
for ``h(theta + delta)``; every ``factor_damping_interval`` steps two more preconditionings and
their two GGN-vector products. These passes restore the random state of the closure's forward pass
(the same dropout masks) and run on copies of the buffers (batch-norm running statistics are
updated once per step, by the closure's own pass); attention runs in PyTorch's math kernel
there (the fused CPU kernels have no forward-mode derivative).

Usage::

    opt = AdaptiveKFAC(model, nn.CrossEntropyLoss())
    for x, y in loader:
        loss = opt.step(lambda: (model(x), y))   # the closure returns (outputs, targets)

``step`` computes the loss ``loss_fn(outputs, targets)``, its backward pass (and the sampled or
type-2 passes of the Fisher) itself; gradients left in ``.grad`` before the call are discarded.
"""
from __future__ import annotations

import math

import torch
import torch.autograd.forward_ad as fwAD
from torch import nn

from ._skips import SkipCounter
from .capture import DetachesHooksOnExit
from .kfac import KFAC, gradient_health

# The initial relative damping: large enough that the first steps, taken before the first
# reduction ratio is measured, stay where the quadratic model holds (an initial 1 diverged on the
# digits CNN within 5 steps: the GGN of a saturating softmax underestimates the curvature).
# Against 100 (the earlier default), 10 reached the kfac-train targets in fewer steps on four
# tasks (median of seeds 0-2, batch 64: digits-autoencoder 110 steps where 100 missed on two
# seeds, digits 50 vs 80, digits-bn 40 vs 60), level on graphs (40), behind on deep-linear
# (130 vs 90).
DEFAULT_INITIAL_DAMPING = 10.0
# The floor of the adapted damping. With the reduction ratio near 1 the Levenberg-Marquardt rule
# lowers the damping without end; at 1e-6 the steps fitted each mini-batch of the digits ViT
# (batch loss 0.04, test loss rising from 0.70 to 1.3) until a nearly singular 2 x 2 model
# made the parameters NaN. 1e-4 (amplification at most 1e4 times the stiffest direction's)
# trained it without failing and changed no other task's steps to target.
DEFAULT_MIN_DAMPING = 1e-4
# T_2 of Martens & Grosse (2015), Sec. 6.6 (how often the preconditioner's own damping is
# re-chosen among three candidates): off by default, gamma tied to lambda. Kept apart, on the
# kfac-train tasks (median steps to target of seeds 0-2, an evaluation every 5 steps, tied in
# brackets): T_2 = 20: digits-bn 40 (40), digits 55 (50), deep-linear 90 (95), graphs 50 (40),
# digits-autoencoder not reached on 2 seeds (110); T_2 = 5: 40, 60, 85, 40, 225; digits-vit
# reached by neither (nor tied). The greedy choice on one mini-batch raised gamma early (10 to
# 29 on the autoencoder), where the tied rule lowers it and gets off the plateau sooner.
DEFAULT_FACTOR_DAMPING_INTERVAL = None


def _check(who, name, value, low, high=None, low_open=True):
    ok = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
    ok = ok and (value > low if low_open else value >= low) and (high is None or value < high)
    if not ok:
        rng = f"{'(' if low_open else '['}{low:g}, {'inf' if high is None else f'{high:g}'})"
        raise ValueError(f"{who}: {name} must be a finite float in {rng}, got {value!r}")
    return float(value)


class _Closure(nn.Module):
    """The user's model under a module whose forward is the closure, so that
    ``torch.func.functional_call`` can run the closure with substituted parameters."""

    def __init__(self, model: nn.Module, closure):
        super().__init__()
        self.model = model
        self.closure = closure

    def forward(self):
        return self.closure()


class AdaptiveKFAC(DetachesHooksOnExit, torch.optim.Optimizer):
    """K-FAC with adaptive damping, learning rate and momentum (see the module docstring).

    Args:
        model: the network; all its trainable parameters are optimised.
        loss_fn: ``nn.CrossEntropyLoss``, ``nn.MSELoss`` or ``nn.BCEWithLogitsLoss`` (its
            reduction and ``loss_average`` must agree, as for :class:`~kfac_kernels.KFAC`).
        damping: the initial relative damping ``lambda`` (a fraction of each layer's curvature
            scale), adapted every ``damping_adaptation_interval`` steps.
        min_damping, max_damping: bounds of the adapted damping.
        damping_adaptation_interval: ``T_1`` of Martens & Grosse (2015), Sec. 6.5.
        damping_adaptation_decay: ``omega`` per step (``omega ** T_1`` per adaptation).
        factor_damping_interval: ``T_2`` of Martens & Grosse (2015), Sec. 6.6: every
            ``T_2`` steps the preconditioner's own damping ``gamma`` is chosen greedily among
            ``gamma omega_2^{-1, 0, 1}`` (``omega_2 = sqrt(decay) ** T_2``); ``None`` (the
            default): ``gamma`` is tied to ``lambda``.
        momentum: solve for ``mu`` (``False``: ``mu = 0``, only the step length ``alpha``).
        max_step: ``alpha`` and ``|mu|`` are clipped to ``max_step`` (a safeguard against a
            nearly singular model on a tiny batch).
        weight_decay: ``eta``: the objective is the loss plus ``eta / 2 |theta|^2`` (in the
            gradient, the quadratic model and ``rho``).
        structure, num_blocks, block_size: the K-FAC structure (``"block-diagonal"``: BD-KFAC).
        fisher_type: ``"mc"`` (default), ``"type-2"`` or ``"empirical"``: the factors' curvature.
            The quadratic model always uses the exact GGN.
        Everything else (``factor_decay``, ``factor_update_steps``, ``inv_update_steps``,
        ``kfac_approx``, ``mc_samples``, ``loss_average``, ``damping_form``, ``skip_modules``,
        ``factor_dtype``, ``backend``, ``eigh_backend``, ``generator``) is passed to the
        :class:`~kfac_kernels.KFAC` that keeps the curvature, available as
        :attr:`preconditioner`.

    Attributes after a step: ``damping`` (the current relative damping ``lambda``),
    ``factor_damping`` (the preconditioner's ``gamma``), ``last`` (a dict with
    ``alpha``, ``mu``, ``rho`` (``None`` on steps without adaptation), the undamped model's
    predicted change, the loss, and the model's coefficients: ``curvature`` ``[[D^T F D,
    D^T F d], [d^T F D, d^T F d]]`` (``D = Delta``, ``d = delta_prev``, ``F`` the GGN plus
    ``eta I``), ``damping_terms`` (the same with the damping) and ``linear`` ``[g^T D, g^T d]``).
    """

    def __init__(self, model: nn.Module, loss_fn: nn.Module, *,
                 damping: float = DEFAULT_INITIAL_DAMPING,
                 min_damping: float = DEFAULT_MIN_DAMPING, max_damping: float = 1e4,
                 damping_adaptation_interval: int = 5, damping_adaptation_decay: float = 0.9,
                 factor_damping_interval: int | None = DEFAULT_FACTOR_DAMPING_INTERVAL,
                 momentum: bool = True, max_step: float = 100.0, weight_decay: float = 0.0,
                 structure: str = "dense", fisher_type: str = "mc",
                 factor_update_steps: int = 1, inv_update_steps: int = 10, **kfac_options):
        who = "AdaptiveKFAC"
        if not isinstance(model, nn.Module):
            raise TypeError(f"{who}: model must be a torch.nn.Module, got {type(model).__name__}")
        self.damping = _check(who, "damping", damping, 0.0)
        self.min_damping = _check(who, "min_damping", min_damping, 0.0)
        self.max_damping = _check(who, "max_damping", max_damping, 0.0)
        if not self.min_damping <= self.damping <= self.max_damping:
            raise ValueError(f"{who}: damping must lie in [min_damping, max_damping] = "
                             f"[{min_damping:g}, {max_damping:g}], got {damping!r}")
        if isinstance(damping_adaptation_interval, bool) or not isinstance(
                damping_adaptation_interval, int) or damping_adaptation_interval < 1:
            raise ValueError(f"{who}: damping_adaptation_interval must be an int >= 1, got "
                             f"{damping_adaptation_interval!r}")
        self.interval = damping_adaptation_interval
        self.decay = _check(who, "damping_adaptation_decay", damping_adaptation_decay, 0.0, 1.0)
        if factor_damping_interval is not None and (isinstance(
                factor_damping_interval, bool) or not isinstance(factor_damping_interval, int)
                or factor_damping_interval < 1):
            raise ValueError(f"{who}: factor_damping_interval must be an int >= 1 or None, got "
                             f"{factor_damping_interval!r}")
        self.factor_interval = factor_damping_interval
        if not isinstance(momentum, bool):
            raise TypeError(f"{who}: momentum must be a bool, got {momentum!r}")
        self.use_momentum = momentum
        self.max_step = _check(who, "max_step", max_step, 0.0)
        self.weight_decay = _check(who, "weight_decay", weight_decay, 0.0, low_open=False)
        for key in ("kl_clip", "lr", "damping", "relative_damping", "compute_method"):
            if key in kfac_options:
                raise TypeError(f"{who}: {key} is not an option here (the step length comes "
                                "from the quadratic model; the damping is adapted; the "
                                "decompositions are eigendecompositions)")
        if kfac_options.get("damping_form", "exact") != "exact":
            raise ValueError(f"{who}: damping_form must be 'exact' (the adapted damping is "
                             "applied to the eigenvalues at every step)")
        self.preconditioner = KFAC(model, relative_damping=self.damping, structure=structure,
                                   fisher_type=fisher_type, loss_fn=loss_fn,
                                   factor_update_steps=factor_update_steps,
                                   inv_update_steps=inv_update_steps, **kfac_options)
        params = [p for p in model.parameters() if p.requires_grad]
        self._initialising = True
        super().__init__(params, {})
        self._initialising = False
        covered = {id(p) for a in self.preconditioner.adapters.values() for p in a.params()}
        self._plain = [p for p in params if id(p) not in covered]
        self._plain_ids = {id(p) for p in self._plain}
        self.model = model
        self.loss_fn = loss_fn
        # the current relative damping: a 0-d tensor, adapted on the device
        self.damping = torch.tensor(self.damping, dtype=torch.float64,
                                    device=params[0].device if params else None)
        # the preconditioner's own relative damping (gamma), equal to lambda when not adapted
        self.factor_damping = self.damping.clone()
        self.steps = 0
        # no learning rate here: the initial damping bounds the first steps, taken before the
        # first reduction ratio is measured
        fixes = (f"raise the initial damping (damping={float(self.damping):g} now; the rule "
                 "adapts it from there), or use a torch.amp.GradScaler for low-precision training")
        self.skips = SkipCounter(who, fixes=fixes)
        # A step whose quadratic model is not finite (curvature products that overflowed at
        # parameters that have run away) takes no step; found with the next step's host read.
        self.model_skips = SkipCounter(
            who, fixes=fixes, counted="a non-finite quadratic model",
            cause="the quadratic model of step {step} is not finite (its curvature or gradient "
                  "products overflowed: the parameters have likely run away)")
        self.last: dict = {}

    def add_param_group(self, param_group: dict) -> None:
        if getattr(self, "_initialising", False):
            return super().add_param_group(param_group)
        raise RuntimeError("AdaptiveKFAC: the optimizer has one parameter group holding all of "
                           "the model's trainable parameters; add_param_group is not supported")

    def remove_hooks(self) -> None:
        """Detach the curvature hooks from the model (it stops capturing); ``with
        AdaptiveKFAC(...) as opt:`` detaches at the end of the block."""
        self.preconditioner.remove_hooks()

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.preconditioner.discard_pending()
        super().zero_grad(set_to_none=set_to_none)

    # --- the step ---------------------------------------------------------------------------
    def _params(self) -> list[torch.Tensor]:
        return self.param_groups[0]["params"]

    @torch.no_grad()
    def step(self, closure):
        """One step; ``closure()`` runs the forward pass and returns ``(outputs, targets)``.
        Returns the loss at the parameters before the step (a step whose loss or gradients are
        not finite changes nothing and is said).

        One host read per step, K-FAC's (whether the gradients and the loss are finite, with
        the checks queued by earlier steps): the quadratic model's coefficients, ``alpha``,
        ``mu``, the reduction ratio and the adapted damping are computed and applied on the
        device, never read."""
        if closure is None:
            raise TypeError("AdaptiveKFAC.step needs a closure returning (outputs, targets)")
        kfac = self.preconditioner
        params = self._params()
        super().zero_grad(set_to_none=True)
        devices = sorted({p.device for p in params if p.device.type != "cpu"}, key=str)
        rng = _rng_state(devices)
        with torch.enable_grad():
            outputs, targets = closure()
            loss = kfac.backward(outputs, targets)
        if self.weight_decay:
            for p in params:
                if p.grad is not None:
                    p.grad.add_(p, alpha=self.weight_decay)
        grads = kfac.gradient_matrices()
        plain = [p.grad for p in self._plain if p.grad is not None]
        g = {p: p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in params}
        self.damping = self.damping.to(loss.device)
        self.factor_damping = (self.factor_damping.to(loss.device) if self.factor_interval
                               else self.damping)
        kfac.damping = self.factor_damping
        updates = kfac.precondition_gradients(
            grads, health=gradient_health(plain + [loss.detach().reshape(1)]))
        if updates is None:
            if kfac.skip_reason == "non-finite gradients":
                self.skips.skipped(self.steps + 1)
            super().zero_grad(set_to_none=True)
            return loss.detach()
        weights = self._damping_weights(updates)
        # the mean curvature scale of the covered layers: the plain parameters' unit
        plain_scale = (torch.stack([w.double().mean() for w in weights.values()]).mean()
                       / self.damping if weights else torch.ones_like(self.damping))
        for p in self._plain:
            weights[p] = (self.damping * plain_scale).to(p.dtype)
        gammas = [self.factor_damping]
        if self.factor_interval and (self.steps + 1) % self.factor_interval == 0:
            omega = math.sqrt(self.decay) ** self.factor_interval
            gammas += [(self.factor_damping * omega).clamp_min(self.min_damping),
                       (self.factor_damping / omega).clamp_max(self.max_damping)]
        # (each candidate but the last is copied out of the gradients the next one overwrites)
        deltas = [self._direction(updates, grads, g, plain_scale, gammas[0], len(gammas) > 1)]
        for i, gamma in enumerate(gammas[1:], 2):
            # the same factors and decompositions under another damping (no side effects)
            kfac.damping = gamma
            others = kfac.distribution.share_updates(kfac._precondition_many(
                {n: m for n, m in grads.items() if kfac.distribution.preconditions(n)}), grads)
            deltas.append(self._direction(others, grads, g, plain_scale, gamma,
                                          i < len(gammas)))
        kfac.damping = self.factor_damping
        prev = {p: self.state[p]["delta"] for p in params if "delta" in self.state[p]}
        use_prev = self.use_momentum and len(prev) == len(params)

        jvps = self._jvps(closure, deltas + ([prev] if use_prev else []), rng, devices)
        hess = _loss_hessian_products(self.loss_fn, outputs.detach(), targets, jvps)
        models = [self._model([delta] + ([prev] if use_prev else []),
                              [jvps[c]] + jvps[len(deltas):], [hess[c]] + hess[len(deltas):], g,
                              weights) for c, delta in enumerate(deltas)]
        if len(models) == 1:
            coef, curv, damp, lin, predicted, _ = models[0]
            chosen = [1.0]
        else:
            # the candidate with the lowest damped model value, chosen on the device; a
            # non-finite value never wins, ties keep the current gamma (listed first)
            values = torch.stack([m[5] for m in models])
            best = torch.where(values.isfinite(), values, math.inf).argmin().reshape(1)
            coef, curv, damp, lin, predicted = (
                torch.index_select(torch.stack([m[i] for m in models]), 0, best)[0]
                for i in range(5))
            chosen = [(best == c).to(coef.dtype)[0] for c in range(len(models))]
            self.factor_damping = torch.index_select(torch.stack(gammas), 0, best)[0]
        # read with the next step's one host read; a non-finite model took no step (_solve)
        finite = curv.isfinite().all() & damp.isfinite().all() & lin.isfinite().all()
        kfac.checks.add(torch.where(finite, 0.0, math.nan), self, "_model_failed",
                        self.steps + 1)
        k = coef.shape[0]
        # delta = alpha Delta + mu delta_prev for all parameters at once (multi-tensor kernels),
        # applied and kept as the next step's delta_prev; with candidates, each Delta is
        # weighted by alpha where chosen and by 0 elsewhere (exact: x + 0 = x)
        moves = torch._foreach_mul([deltas[0][p] for p in params], coef[0] * chosen[0])
        for c in range(1, len(deltas)):
            torch._foreach_add_(moves, torch._foreach_mul([deltas[c][p] for p in params],
                                                          coef[0] * chosen[c]))
        if k == 2:
            torch._foreach_add_(moves, torch._foreach_mul([prev[p] for p in params], coef[1]))
        torch._foreach_add_(params, moves)
        step = dict(zip(params, moves))
        for p, move in step.items():
            self.state[p]["delta"] = move
        self.steps += 1
        rho = None
        if self.steps % self.interval == 0:
            rho = self._adapt_damping(closure, rng, devices, loss, step, predicted)
            if not self.factor_interval:
                self.factor_damping = self.damping     # tied
        zero = torch.zeros_like(coef[0])
        self.last = {"alpha": coef[0], "mu": coef[1] if k == 2 else zero,
                     "rho": rho, "predicted_change": predicted, "loss": loss.detach(),
                     "damping": self.damping, "factor_damping": self.factor_damping,
                     "curvature": curv, "damping_terms": damp, "linear": lin}
        super().zero_grad(set_to_none=True)
        return loss.detach()

    def _adapt_damping(self, closure, rng, devices, loss, step, predicted) -> torch.Tensor:
        """The Levenberg-Marquardt rule on the device: returns ``rho`` and updates
        :attr:`damping` (``-inf`` when the model predicted no decrease)."""
        new_loss = self._loss_at_current(closure, rng, devices)
        change = new_loss.double() - loss.detach().double()
        if self.weight_decay:
            change = change + 0.5 * self.weight_decay * sum(
                (p.double() ** 2).sum() - ((p - step[p]).double() ** 2).sum()
                for p in self._params())
        rho = torch.where(predicted < 0, change / predicted.clamp_max(-torch.finfo(
            predicted.dtype).tiny), torch.full_like(predicted, -math.inf))
        omega = self.decay ** self.interval
        raise_it = ~change.isfinite() | ~(rho >= 0.25)
        lower_it = rho > 0.75
        self.damping = torch.where(
            raise_it, (self.damping / omega).clamp_max(self.max_damping),
            torch.where(lower_it, (self.damping * omega).clamp_min(self.min_damping),
                        self.damping))
        return rho

    def _model_failed(self, step: int) -> None:
        self.model_skips.skipped(step, stacklevel=5)

    def _direction(self, updates: dict, grads: dict, g: dict, plain_scale: torch.Tensor,
                   gamma: torch.Tensor, copy: bool) -> dict:
        """``Delta`` by parameter: the preconditioned gradient matrices ``updates`` written back
        in the parameters' shapes (through their gradients, which it overwrites), negated (in
        place unless ``copy``); the parameters no layer covers get ``-g / ((1 + gamma) s)``,
        ``s`` their curvature unit."""
        self.preconditioner.apply_updates(updates, grads, kl_clip=False)
        out = {}
        for p in self._params():
            if id(p) in self._plain_ids:
                out[p] = -(g[p] / ((1.0 + gamma) * plain_scale).to(p.dtype))
            else:
                out[p] = (torch.zeros_like(p) if p.grad is None
                          else p.grad.neg() if copy else p.grad.neg_())
        return out

    def _model(self, vectors: list, jvps: list, hess: list, g: dict, weights: dict) -> tuple:
        """The quadratic model over ``d = V c`` (``V``: ``Delta`` and, with momentum,
        ``delta_prev``): its minimiser ``c`` (``alpha, mu``), the undamped and damping
        ``k x k`` matrices, the linear term, the undamped model's predicted change and the
        damped model's value at ``c``."""
        k = len(vectors)
        pairs = [(i, j) for i in range(k) for j in range(k)]
        gram, damp, lin = _subspace_products(vectors, g, weights)
        curv = torch.stack([(jvps[i].double() * hess[j].double()).sum()
                            for i, j in pairs]).reshape(k, k) + self.weight_decay * gram
        curv = 0.5 * (curv + curv.mT)  # symmetric J^T H J: the two products differ by round-off
        coef = self._solve(curv + damp, lin)
        predicted = 0.5 * coef @ curv @ coef + lin @ coef
        return coef, curv, damp, lin, predicted, predicted + 0.5 * coef @ damp @ coef

    def _solve(self, matrix: torch.Tensor, lin: torch.Tensor) -> torch.Tensor:
        """``argmin`` of ``c^T matrix c / 2 + lin^T c`` on the device: the 2 x 2 system, or
        ``alpha`` alone (``mu = 0``) when it is singular; clipped to ``max_step``; zero (no
        step) where the model is not finite."""
        m00 = matrix[0, 0]
        alone = torch.where(m00 > 0, -lin[0] / torch.where(m00 > 0, m00, 1.0), 0.0)
        coef = torch.stack([alone, torch.zeros_like(alone)])[:matrix.shape[0]]
        if matrix.shape[0] == 2:
            m01, m11 = matrix[0, 1], matrix[1, 1]
            det = m00 * m11 - m01 ** 2
            regular = det > 1e-12 * m00 * m11
            det = torch.where(regular, det, 1.0)
            both = torch.stack([-(m11 * lin[0] - m01 * lin[1]) / det,
                                -(m00 * lin[1] - m01 * lin[0]) / det])
            coef = torch.where(regular, both, coef)
        coef = coef.clamp(-self.max_step, self.max_step)
        return torch.where(coef.isfinite().all(), coef, 0.0)

    def _damping_weights(self, updates: dict) -> dict:
        """Per covered parameter, the absolute damping of each entry (``lambda`` times its
        layer's curvature scale, per group), in the parameter's shape."""
        kfac = self.preconditioner
        out = {}
        for name, v in updates.items():
            adapter = kfac.adapters[name]
            block = kfac.blocks[name]
            scale = (self.damping * _scale_of(block)).to(v.dtype)
            mat = scale[:, None, None].expand_as(v).contiguous()
            saved = {p: p.grad for p in adapter.params()}
            for p in adapter.params():
                p.grad = torch.empty_like(p)
            adapter.set_grad_matrix(mat)
            for p in adapter.params():
                out[p] = p.grad
                p.grad = saved[p]
        return out

    def _functional(self, closure, tensors: dict):
        """``closure()`` with the model's parameters replaced by ``tensors`` and its buffers by
        copies; the curvature capture off."""
        kfac = self.preconditioner
        wrapper = _Closure(self.model, closure)
        names = {id(p): n for n, p in self.model.named_parameters()}
        swap = {"model." + names[id(p)]: t for p, t in tensors.items()}
        swap.update({"model." + n: b.clone() for n, b in self.model.named_buffers()})
        flags = kfac.capture.inputs_on, kfac.capture.grads_on
        kfac.capture.inputs_on = kfac.capture.grads_on = False
        try:
            from torch.nn.attention import SDPBackend, sdpa_kernel
            with sdpa_kernel([SDPBackend.MATH]):
                return torch.func.functional_call(wrapper, swap, ())
        finally:
            kfac.capture.inputs_on, kfac.capture.grads_on = flags

    def _jvps(self, closure, vectors: list[dict], rng, devices) -> list[torch.Tensor]:
        """``J v`` of the outputs for every ``v`` (forward mode, same random state)."""
        out = []
        for v in vectors:
            with _restored_rng(rng, devices), fwAD.dual_level():
                duals = {p: fwAD.make_dual(p.detach(), v[p].to(p.dtype)) for p in self._params()}
                outputs, _ = self._functional(closure, duals)
                tangent = fwAD.unpack_dual(outputs).tangent
                out.append(torch.zeros_like(outputs) if tangent is None else tangent.detach())
        return out

    def _loss_at_current(self, closure, rng, devices) -> torch.Tensor:
        with _restored_rng(rng, devices):
            outputs, targets = self._functional(closure, {})
            return self.loss_fn(outputs, targets)

    # --- state ------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """torch.optim's state (the last update of every parameter) plus ``"adaptive"``: the
        damping, the step count and the K-FAC state."""
        sd = super().state_dict()
        sd["adaptive"] = {"damping": self.damping, "factor_damping": self.factor_damping,
                          "steps": self.steps,
                          "skips": self.skips.state_dict(),
                          "model_skips": self.model_skips.state_dict(),
                          "kfac": self.preconditioner.state_dict()}
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        if "adaptive" not in state_dict:
            raise KeyError("AdaptiveKFAC.load_state_dict: state_dict has no 'adaptive' entry "
                           "(not saved by AdaptiveKFAC)")
        extra = state_dict["adaptive"]
        super().load_state_dict({k: v for k, v in state_dict.items() if k != "adaptive"})
        self.preconditioner.load_state_dict(extra["kfac"])
        self.damping = torch.as_tensor(extra["damping"], dtype=torch.float64).to(
            self.damping.device)
        # (a state saved before gamma was kept apart had gamma = lambda)
        self.factor_damping = torch.as_tensor(extra.get("factor_damping", extra["damping"]),
                                              dtype=torch.float64).to(self.damping.device)
        self.steps = int(extra["steps"])
        self.skips.load_state_dict(extra.get("skips"))
        self.model_skips.load_state_dict(extra.get("model_skips"))


def _scale_of(block) -> torch.Tensor:
    """The curvature scale per group that relative damping multiplies (the one the block's
    preconditioning used: from the eigenvalues of its decomposition)."""
    dec = block.decomposition
    tiny = torch.finfo(dec["eigvals_A"][0].dtype).tiny
    la = torch.cat(dec["eigvals_A"], -1) if len(dec["eigvals_A"]) > 1 else dec["eigvals_A"][0]
    lg = torch.cat(dec["eigvals_G"], -1) if len(dec["eigvals_G"]) > 1 else dec["eigvals_G"][0]
    return la.amax(-1).clamp_min(tiny) * lg.amax(-1).clamp_min(tiny)


def _subspace_products(vectors: list[dict], g: dict, weights: dict):
    """Over all parameters, in float64: the ``k x k`` Gram matrix ``V^T V`` of the vectors, the
    same weighted by the damping, ``V^T W V``, and their products with the gradient, ``V^T g``.
    One small matrix product per parameter (``[V | W V]^T [V | g]``) instead of an elementwise
    pass per pair and parameter, whose many small operations took 5-30% of the step on the
    small kfac-train models. A parameter without a damping weight (a layer that got no gradient) adds no
    damping."""
    k = len(vectors)
    parts = []
    for p in vectors[0]:
        v = torch.stack([vec[p].reshape(-1) for vec in vectors]).double()
        w = weights.get(p)
        w = torch.zeros((), dtype=torch.float64, device=v.device) if w is None else w.double()
        rows = torch.cat([v, v * (w.reshape(-1) if w.dim() else w)])
        parts.append(rows @ torch.cat([v, g[p].reshape(1, -1).double()]).mT)
    total = torch.stack(parts).sum(0)
    return total[:k, :k], total[k:, :k], total[:k, k]


def _loss_hessian_products(loss_fn, outputs: torch.Tensor, targets, vectors: list) -> list:
    """``H v`` for each ``v``, ``H`` the Hessian of ``loss_fn`` w.r.t. the outputs (exact, by
    differentiating the gradient once more)."""
    with torch.enable_grad():
        o = outputs.detach().requires_grad_(True)
        (grad,) = torch.autograd.grad(loss_fn(o, targets), o, create_graph=True)
        return [torch.autograd.grad(grad, o, v.to(o.dtype), retain_graph=True)[0].detach()
                for v in vectors]


def _rng_state(devices) -> tuple:
    return (torch.get_rng_state(), [torch.cuda.get_rng_state(d) for d in devices])


class _restored_rng:
    """Run a block with the random state of ``state``, leaving the current state as it was."""

    def __init__(self, state, devices):
        self.state, self.devices = state, devices

    def __enter__(self):
        self.saved = _rng_state(self.devices)
        torch.set_rng_state(self.state[0])
        for d, s in zip(self.devices, self.state[1]):
            torch.cuda.set_rng_state(s, d)

    def __exit__(self, *exc):
        torch.set_rng_state(self.saved[0])
        for d, s in zip(self.devices, self.saved[1]):
            torch.cuda.set_rng_state(s, d)
        return False
