"""Kernel-backed operations. Each module holds the eager reference, the dispatch and the formula."""
from .symmetric_factor_update import symmetric_factor_update, symmetric_factor_update_eager

__all__ = ["symmetric_factor_update", "symmetric_factor_update_eager"]
