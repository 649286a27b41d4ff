"""Loud skipped steps: a step whose gradients (or, in AdaptiveKFAC, whose quadratic model) are
not finite changes nothing, and says so.

The first skip is a warning naming the step and the likely fixes; later skips are counted and
reported every ``every`` skips, so a run that has diverged (every step skipped) cannot go on
silently.
"""
from __future__ import annotations

import warnings


class SkipCounter:
    #: what to change when the run has diverged
    FIXES = ("lower the learning rate, raise the damping, or use a torch.amp.GradScaler for "
             "low-precision training")

    def __init__(self, who: str, every: int = 100, fixes: str | None = None,
                 cause: str = "the gradients of step {step} are not finite (NaN/inf)",
                 counted: str = "non-finite gradients"):
        self.who = who
        self.fixes = fixes or self.FIXES
        self.cause = cause        # the first warning's sentence, with {step}
        self.counted = counted    # the later warnings' "skipped for ..."
        self.every = every
        self.count = 0
        self.first_step: int | None = None

    def skipped(self, step: int, stacklevel: int = 3) -> None:
        """Record that step ``step`` was skipped (warns on the first and every ``every``-th)."""
        self.count += 1
        if self.first_step is None:
            self.first_step = step
            warnings.warn(
                f"{self.who}: {self.cause.format(step=step)}; the step is "
                f"skipped and changes nothing. If this repeats the run has diverged: {self.fixes}",
                RuntimeWarning, stacklevel=stacklevel)
        elif self.count % self.every == 0:
            warnings.warn(f"{self.who}: {self.count} steps skipped for {self.counted} so "
                          f"far (the first at step {self.first_step})", RuntimeWarning,
                          stacklevel=stacklevel)

    def state_dict(self) -> dict:
        return {"count": self.count, "first_step": self.first_step}

    def load_state_dict(self, state: dict | None) -> None:
        state = state or {}
        self.count = int(state.get("count", 0))
        self.first_step = state.get("first_step")
