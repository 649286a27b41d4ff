"""Triton kernels and their launchers for ``kfac_kernels``, installed as ``kfac_kernels._triton``
(the repository keeps them in its top-level ``triton_kernels/`` folder; no top-level
``triton_kernels`` module is installed: other distributions use that name).

Pure functions of tensors, one module per operation; no optimizer logic lives here. The kernels
run on CUDA tensors, and on CPU tensors under the Triton interpreter (set ``TRITON_INTERPRET=1``
before ``triton`` is first imported).

Importing this package does not import ``triton``: the submodules are loaded on first use
(``kfac_kernels._triton.symmetric_factor_update`` or the attribute of the same name), so a machine
without Triton can import the package and only fails, with Triton's own ``ImportError``, when a
kernel is actually requested.
"""
from __future__ import annotations

import importlib

__all__ = ["block_eigh", "singd_block_factor_update", "singd_block_step",
           "singd_diagonal_factor_update", "singd_diagonal_step",
           "symmetric_factor_update"]


def __getattr__(name: str):
    if name in __all__:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
