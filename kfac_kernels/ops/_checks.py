"""Argument checks shared by the ops, with the messages their tests pin."""
from __future__ import annotations

import math
import warnings

import torch


def check_finite_floats(op: str, **values) -> None:
    """Each value must be a finite int or float (not a bool)."""
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(
                value):
            raise ValueError(f"{op}: {name} must be a finite float, got {value!r}")


def check_bool(op: str, name: str, value) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{op}: {name} must be a bool, got {type(value).__name__}")


# PyTorch's own message for an in-place write into overlapping memory (e.g. an expanded tensor):
# every backend of an op says the same as its eager reference does.
OVERLAP_MESSAGE = ("unsupported operation: more than one element of the written-to tensor refers "
                   "to a single memory location. Please clone() the tensor before performing the "
                   "operation.")


def check_writable(op: str, **tensors) -> None:
    """Tensors written in place must not overlap themselves (whatever the backend)."""
    for name, t in tensors.items():
        if t is not None and torch._debug_has_internal_overlap(t) == 1:
            raise RuntimeError(f"{op}: {name}: {OVERLAP_MESSAGE}")


def check_like(op: str, name: str, t, shape: tuple, dtype, device, what: str = "tensor") -> None:
    """``t`` must be a contiguous ``dtype`` ``what`` of ``shape`` on ``device``; the message
    says which of these it is not."""
    problems = []
    if tuple(t.shape) != tuple(shape):
        problems.append(f"shape {tuple(t.shape)}, expected {tuple(shape)}")
    if t.dtype != dtype:
        problems.append(f"dtype {t.dtype}, expected {dtype}")
    if t.device != device:
        problems.append(f"device {t.device}, expected {device}")
    if not problems and not t.is_contiguous():
        problems.append(f"strides {t.stride()} (not contiguous; it is read and written as a "
                        "packed array)")
    if problems:
        raise ValueError(f"{op}: {name} must be a contiguous {dtype} {what} of shape "
                         f"{tuple(shape)} on {device}; it has {'; '.join(problems)}")


def within_block_limit(op: str, chosen: str, requested: str, b: int, limits: dict,
                       warned: set) -> str:
    """The backend that runs blocks of size ``b``: ``chosen``, unless its kernel keeps its tiles
    on chip only up to ``limits[chosen]``. Then an explicit request is an error, and ``"auto"``
    computes with the eager path instead (said once per backend)."""
    limit = limits.get(chosen)
    if limit is None or b <= limit:
        return chosen
    if requested != "auto":
        raise ValueError(f"{op}: backend={chosen!r} takes blocks of at most {limit}, got blocks "
                         f"of {b}; use block sizes <= {limit}, or backend='cpu' / 'eager'")
    if chosen not in warned:
        warned.add(chosen)
        warnings.warn(f"{op}: blocks of {b} exceed the {chosen!r} kernel's limit ({limit}) and "
                      f"are computed by the eager path (torch ops); use block sizes <= {limit} "
                      f"for the fused kernel. This is said once", stacklevel=3)
    return "eager"
