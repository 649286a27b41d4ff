"""Preconditioned gradients that are not finite, and the restart of the factors that made them.

SINGD updates its factors ``K`` and ``C`` with a fixed learning rate (``lr_cov``). Where that is
too large for a layer's curvature the factors grow from step to step. Before they overflow
themselves (the factor update's own check catches that: such an update is not stored), their
product with the gradient, ``C C^T G K K^T``, does: the parameters would turn inf/NaN, and the
next steps would only report non-finite gradients, not the cause.

So every layer's preconditioned gradient is checked before it is applied. A layer whose
direction is not finite gets a zero direction for the step (its momentum carries on, weight
decay applies), and its factors and their momenta restart from their initial values (the warm
start, where on, at the next factor update), with one warning naming the module and the fix.

* On the CPU the flags are read at once (a host read costs nothing there) and a good step takes
  no extra pass; on a device the direction is selected by ``torch.where`` and the restart comes
  with the next step's one host read, before that step's factor update. Both paths give the same
  trajectory.
* The fused paths never form the direction: its largest entry is bounded by
  ``(b_C b_K)^2 max|C|^2 max|K|^2 max|G|`` (``b`` the block sizes, 1 for diagonal factors; ``G``
  the largest gradient entry of the step, over all layers), and so are the partial products a
  kernel may form on the way (:func:`fused_bound`); a bound above the largest finite number of
  the compute dtype counts as not finite. Such a layer's step runs
  with its factors and gradient zeroed (the direction is then exactly zero, without an
  ``inf * 0``).
"""
from __future__ import annotations

import torch

from .._flags import reads_are_free


def select(ok, t: torch.Tensor | None) -> torch.Tensor | None:
    """``t`` where the layer is good, zeros where not: ``ok`` is a Python bool (read on the
    host) or a 0-d bool tensor (selected on the device)."""
    if t is None or ok is True:
        return t
    if ok is False:
        return torch.zeros_like(t)
    return torch.where(ok, t, torch.zeros((), dtype=t.dtype, device=t.device))


def bounded_health(bound: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``bound`` (float64) as a health flag: infinite where it exceeds ``dtype``'s range."""
    top = torch.finfo(dtype).max
    return torch.where(bound <= top, bound, torch.full_like(bound, float("inf")))


def fused_bound(c_max: torch.Tensor, k_max: torch.Tensor, g_max: torch.Tensor,
                block_c: int = 1, block_k: int = 1) -> torch.Tensor:
    """A bound on the largest entry of ``C C^T G K K^T`` and of every partial product a kernel
    may form on the way (``C C^T``, ``K K^T``, ``C C^T G``, ``G K K^T``), from the largest
    entries of the factors and of the gradient (tensors of any matching shape: one entry per
    layer), in float64 (NaN where one is NaN). The partial products count: with ``G = 0`` the
    direction is zero, yet ``C C^T`` may already overflow, and ``inf * 0`` is NaN."""
    cm, km, gm = c_max.double(), k_max.double(), g_max.double()
    cc, kk = block_c * cm * cm, block_k * km * km        # entries of C C^T, K K^T
    left, right = block_c * cc * gm, block_k * kk * gm    # of C C^T G, G K K^T
    return torch.stack([cc, kk, left, right, block_k * left * kk]).amax(0)


class DirectionGuard:
    """Mixin of :class:`kfac_kernels.singd.SINGD` (uses its ``blocks``, ``checks`` and
    ``_warn_once``)."""

    def _directions_ok(self, healths: dict[str, torch.Tensor]) -> dict:
        """Per layer: ``True`` / ``False`` (read on the CPU; a bad layer restarts now) or a 0-d
        bool tensor (on a device; the restart is queued for the next host read)."""
        if not healths:
            return {}
        first = next(iter(healths.values()))
        if reads_are_free(first):
            values = torch.stack([h.to(torch.float64).reshape(()) for h in healths.values()])
            ok = dict(zip(healths, values.isfinite().tolist()))
            for name, good in ok.items():
                if not good:
                    self._restart_factors(name)
            return ok
        for name, h in healths.items():
            self.checks.add(h, self, "_restart_factors", name)
        return {name: h.isfinite() for name, h in healths.items()}

    def _restart_factors(self, name: str) -> None:
        self._warn_once(f"nonfinite-direction:{name}", (
            f"SINGD: the preconditioned gradient of module {name!r} is not finite (its factors "
            "K, C grew too large: lr_cov too large for its curvature, or damping too small); "
            "that step left its parameters to their momentum, and its factors restart from their "
            "initial values (this is said once per module)"))
        self.blocks[name].restart()
