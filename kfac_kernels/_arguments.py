"""Constructor argument checks shared by the optimizers, with the messages their tests pin:
every message starts with the class (``who``) and names the argument and the value."""
from __future__ import annotations

import math


def _is_number(value) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)


def positive_float(who: str, name: str, value, allow_none: bool = False) -> float | None:
    if value is None and allow_none:
        return None
    if not _is_number(value) or value <= 0:
        suffix = " or None" if allow_none else ""
        raise ValueError(f"{who}: {name} must be a positive finite float{suffix}, got {value!r}")
    return float(value)


def positive_int(who: str, name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{who}: {name} must be an int >= 1, got {value!r}")
    return value


def non_negative_int(who: str, name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{who}: {name} must be an int >= 0, got {value!r}")
    return value


def in_range(who: str, name: str, value, low: float = 0.0, high: float | None = None) -> float:
    """A finite number in ``[low, high)`` (``[low, inf)`` without ``high``)."""
    if not _is_number(value) or value < low or (high is not None and value >= high):
        bound = "inf" if high is None else f"{high:g}"
        raise ValueError(f"{who}: {name} must be a finite float in [{low:g}, {bound}), got "
                         f"{value!r}")
    return float(value)


def fraction(who: str, name: str, value) -> float:
    """A decay in ``[0, 1)``."""
    if not _is_number(value) or not 0.0 <= value < 1.0:
        raise ValueError(f"{who}: {name} must be in [0, 1), got {value!r}")
    return float(value)


def choice(who: str, name: str, value, choices: tuple):
    if value not in choices:
        listed = (" or ".join(map(repr, choices)) if len(choices) == 2
                  else f"one of {tuple(choices)}")
        raise ValueError(f"{who}: {name} must be {listed}, got {value!r}")
    return value


def instance(who: str, name: str, value, types, described: str, allow_none: bool = True):
    if (value is None and allow_none) or isinstance(value, types):
        return value
    suffix = " or None" if allow_none else ""
    raise TypeError(f"{who}: {name} must be {described}{suffix}, got {type(value).__name__}")


def flag(who: str, name: str, value) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{who}: {name} must be a bool, got {value!r}")
    return value
