"""One host read per step: device-side checks whose results are collected and read together.

On a GPU every read of a tensor's value on the host (``bool(t)``, ``t.item()``, ``t.tolist()``)
waits for the device. A step has to read one thing -- whether its gradients are finite, to skip
it (``torch.amp.GradScaler`` reads its found-inf flag for the same reason) -- and everything
else it checks is kept on the device: a non-finite factor update or decomposition is not stored
(``torch.where`` keeps the previous value), and its flag is queued here and read with the next
step's one read, when the warning is given. So warnings about factors arrive one step late;
what is stored never depends on the late read.

On the CPU a host read waits for nothing, and there a value that decides what is stored is read
at once (:func:`keep_finite`): a ``torch.where`` over a factor costs a pass over three tensors of
its size (about 3 ms of a ViT K-FAC step on one thread), the read a few microseconds.
:data:`CPU_READS_FREE` off makes CPU tensors take the device path (the tests that count host
reads on the CPU do so).
"""
from __future__ import annotations

import weakref

import torch


class DeferredChecks:
    """Flags (0-d tensors, finite = good) with the method to call when one is not finite.

    The methods are named, with their owner held by a weak reference: a queued check must not
    keep a dropped optimizer (and its hooks on the model) alive."""

    def __init__(self):
        self._pending: list[tuple] = []

    def add(self, health: torch.Tensor, owner, on_failure: str, *args,
            on_success: str | None = None) -> None:
        """Queue ``health``; when read, ``owner.<on_failure>(*args)`` runs if it is not finite,
        else ``owner.<on_success>(*args)`` (if given)."""
        self._pending.append((health, weakref.ref(owner), on_failure, on_success, args))

    def __len__(self) -> int:
        return len(self._pending)

    def read(self, now: list[torch.Tensor] = ()) -> list[bool]:
        """Read ``now`` (0-d tensors, finite = good) and every queued flag in one host read;
        run the queued actions and return ``now``'s results."""
        queued, self._pending = self._pending, []
        values = list(now) + [entry[0] for entry in queued]
        if not values:
            return []
        device = values[0].device
        ok = torch.stack([v.to(device, torch.float64).reshape(()) for v in values]
                         ).isfinite().tolist()
        for good, (_, owner_ref, on_failure, on_success, args) in zip(ok[len(now):], queued):
            owner = owner_ref()
            method = on_failure if not good else on_success
            if owner is not None and method is not None:
                getattr(owner, method)(*args)
        return ok[:len(now)]


def largest_magnitude(t: torch.Tensor) -> torch.Tensor:
    """``max |t|`` as a 0-d tensor (NaN if ``t`` has one; 0 for an empty ``t``): from one
    ``aminmax`` pass, ``max(-min t, max t)`` -- exact, and on the CPU about 10x faster than
    ``abs().max()`` or the inf-norm (whose reduction is not vectorised)."""
    if not t.numel():
        return t.new_zeros(())
    lo, hi = torch.aminmax(t)
    return torch.maximum(-lo, hi)


#: the size up to which a CPU tensor's largest magnitude is taken in the shared foreach call
SMALL = 1 << 14
#: the fewest small tensors for which that call is faster (33 of 110 entries: 101 against
#: 270 us; 3 of 160-1450 entries: 62 against 47 us, one thread)
FOREACH_MIN = 8


def finite_health(tensors) -> torch.Tensor:
    """A 0-d float64 tensor, finite iff every entry of every tensor is (their largest
    magnitude), without a host read: on the CPU one :func:`largest_magnitude` per tensor (many
    small tensors of a dtype: one ``_foreach_norm`` call for them), on a GPU one fused
    ``_foreach_norm`` launch for all of them."""
    tensors = [t for t in tensors if t.numel()]
    if not tensors:
        return torch.zeros((), dtype=torch.float64)
    device = tensors[0].device
    if device.type == "cpu":
        # large tensors by aminmax; the small ones (where dispatch, not the reduction, is the
        # cost) in one _foreach_norm call
        small: dict[torch.dtype, list[torch.Tensor]] = {}
        parts = []
        for t in tensors:
            if t.numel() > SMALL:
                parts.append(largest_magnitude(t))
            else:
                small.setdefault(t.dtype, []).append(t)
        for same in small.values():
            if len(same) >= FOREACH_MIN:
                parts.append(torch.stack(torch._foreach_norm(same, float("inf"))).amax())
            else:
                parts += [largest_magnitude(t) for t in same]
    else:
        parts = torch._foreach_norm([t.float() if t.dtype in (torch.float16, torch.bfloat16)
                                     else t for t in tensors], float("inf"))
    if all(m.dtype == parts[0].dtype for m in parts):
        # the largest of the magnitudes is one of them: taking it before the conversion to
        # float64 is exact (inf and NaN included) and converts once
        return torch.stack(parts).amax().to(torch.float64)
    return torch.stack([m.to(device, torch.float64) for m in parts]).amax()


#: whether a CPU tensor's value is read on the host where that saves a pass (module docstring)
CPU_READS_FREE = True


def reads_are_free(t: torch.Tensor) -> bool:
    """Whether reading ``t``'s value on the host waits for nothing (a CPU tensor)."""
    return CPU_READS_FREE and t.device.type == "cpu"


def keep_finite(new: torch.Tensor, old: torch.Tensor | None, health: torch.Tensor) -> torch.Tensor:
    """``new`` where ``health`` is finite, else ``old`` (``old=None``: ``new``): on a device
    without a host read (``torch.where``); on the CPU by reading ``health``, which returns one of
    the two tensors itself."""
    if old is None:
        return new
    if reads_are_free(health):
        return new if bool(health.isfinite()) else old
    return torch.where(health.isfinite(), new, old)
