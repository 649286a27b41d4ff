"""Hypothesis for the property-based tests, or stand-ins that mark those tests skipped (with the
reason) when Hypothesis is not installed, so they are reported instead of silently vanishing."""
from __future__ import annotations

import pytest

try:
    from hypothesis import assume, given, settings
    from hypothesis import strategies as st
except ImportError:  # pragma: no cover - hypothesis is a test dependency
    _REASON = "hypothesis is not installed (pip install hypothesis)"

    class _Anything:
        """Accepts any strategy construction at import time."""

        def __getattr__(self, name):
            return self

        def __call__(self, *args, **kwargs):
            return self

    st = _Anything()

    def given(*args, **kwargs):
        return pytest.mark.skip(reason=_REASON)

    def settings(*args, **kwargs):
        return lambda fn: fn

    def assume(condition):
        return True

__all__ = ["assume", "given", "settings", "st"]
