"""Argument checks shared by the ops, with the messages their tests pin."""
from __future__ import annotations

import math


def check_finite_floats(op: str, **values) -> None:
    """Each value must be a finite int or float (not a bool)."""
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(
                value):
            raise ValueError(f"{op}: {name} must be a finite float, got {value!r}")


def check_bool(op: str, name: str, value) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{op}: {name} must be a bool, got {type(value).__name__}")
