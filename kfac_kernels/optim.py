"""A preconditioner and a torch.optim optimizer as one optimizer object."""
from __future__ import annotations

import torch

from ._skips import SkipCounter
from .capture import DetachesHooksOnExit


class PreconditionedOptimizer(DetachesHooksOnExit, torch.optim.Optimizer):
    """``step()`` = ``preconditioner.step()`` then ``optimizer.step()``.

    It shares ``param_groups`` and ``state`` with the wrapped optimizer, so learning-rate
    schedulers and ``torch.amp.GradScaler`` work on it as on the optimizer itself. KL-clipping
    reads each layer's learning rate from the parameter group holding its weight. ``zero_grad``
    also drops curvature captured for a step that was never taken (e.g. skipped by a GradScaler).

    A step whose gradients are not finite is skipped as a whole: neither the preconditioner nor
    the wrapped optimizer changes anything (the wrapped optimizer would otherwise write NaN into
    the weights for good). The first such step is a warning naming it, later ones are counted
    (with a ``GradScaler``, ``scaler.step(opt)`` skips overflowing steps before this is called).

    Example::

        opt = PreconditionedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
                                      KFAC(model, damping=1e-3))
        opt.zero_grad(); loss_fn(model(x), y).backward(); opt.step()
    """

    def __init__(self, optimizer: torch.optim.Optimizer, preconditioner):
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError("PreconditionedOptimizer: optimizer must be a torch.optim.Optimizer, "
                            f"got {type(optimizer).__name__}")
        if not (hasattr(preconditioner, "step") and hasattr(preconditioner, "state_dict")):
            raise TypeError("PreconditionedOptimizer: preconditioner must be a kfac_kernels "
                            f"preconditioner (e.g. KFAC), got {type(preconditioner).__name__}")
        self.optimizer = optimizer
        self.preconditioner = preconditioner
        self.skips = SkipCounter("PreconditionedOptimizer")
        self._step_calls = 0
        self._initialising = True
        super().__init__(optimizer.param_groups, optimizer.defaults)
        self._initialising = False
        # Share, do not copy: the wrapped optimizer stays the single source of truth.
        self.param_groups = optimizer.param_groups
        self.state = optimizer.state

    def _lr_of(self):
        lrs = {id(p): float(g["lr"]) for g in self.param_groups for p in g["params"]}
        return lambda p: lrs.get(id(p), 0.0)

    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._step_calls += 1
        done = self.preconditioner.step(lr=self._lr_of())
        if not done and getattr(self.preconditioner, "skip_reason", None) == \
                "non-finite gradients":
            self.skips.skipped(self._step_calls)
            return loss
        self.optimizer.step()
        return loss

    def remove_hooks(self) -> None:
        """Detach the preconditioner's hooks from the model (it stops capturing). Dropping the
        optimizer does the same; ``with PreconditionedOptimizer(...) as opt:`` detaches at the
        end of the block."""
        self.preconditioner.remove_hooks()

    def zero_grad(self, set_to_none: bool = True) -> None:
        if hasattr(self.preconditioner, "discard_pending"):
            self.preconditioner.discard_pending()
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def add_param_group(self, param_group: dict) -> None:
        if self._initialising:  # called by Optimizer.__init__ while sharing the groups
            return super().add_param_group(param_group)
        raise RuntimeError("PreconditionedOptimizer: add parameter groups to the wrapped "
                           "optimizer before wrapping it")

    def state_dict(self) -> dict:
        return {"optimizer": self.optimizer.state_dict(),
                "preconditioner": self.preconditioner.state_dict(),
                "steps": self._step_calls, "skips": self.skips.state_dict()}

    def load_state_dict(self, state_dict: dict) -> None:
        for key in ("optimizer", "preconditioner"):
            if key not in state_dict:
                raise KeyError(f"PreconditionedOptimizer.load_state_dict: state_dict has no "
                               f"{key!r} entry")
        self.optimizer.load_state_dict(state_dict["optimizer"])
        self.preconditioner.load_state_dict(state_dict["preconditioner"])
        self._step_calls = int(state_dict.get("steps", 0))
        self.skips.load_state_dict(state_dict.get("skips"))
        self.param_groups = self.optimizer.param_groups
        self.state = self.optimizer.state

    def __repr__(self) -> str:
        return (f"PreconditionedOptimizer({type(self.preconditioner).__name__}, "
                f"{self.optimizer!r})")
