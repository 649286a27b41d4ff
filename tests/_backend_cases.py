"""The (backend, device) cases of the kernel parity tests: every kernel backend present for CPU
tensors, and the two GPU backends on CUDA tensors. The GPU cases carry the ``gpu`` marker
(``pytest -m gpu`` runs them) and are skipped, with the reason, on a machine without a CUDA
device or without that backend."""
from __future__ import annotations

import pytest
import torch

from kfac_kernels.testing import backends_for

GPU_BACKENDS = ("triton", "cuda")


def gpu_cases() -> list:
    """``pytest.param(backend, "cuda")`` for ``triton`` and ``cuda``, marked ``gpu``."""
    present = backends_for("cuda") if torch.cuda.is_available() else []
    out = []
    for backend in GPU_BACKENDS:
        marks = [pytest.mark.gpu]
        if not torch.cuda.is_available():
            marks.append(pytest.mark.skip(reason="needs a CUDA device"))
        elif backend not in present:
            marks.append(pytest.mark.skip(reason=f"the {backend!r} backend is not available "
                                                 f"on this machine (kfac_kernels._C built "
                                                 f"without CUDA, or no triton)"))
        out.append(pytest.param(backend, "cuda", id=f"{backend}-cuda", marks=marks))
    return out


def kernel_cases() -> list:
    """The CPU-tensor kernel backends (``eager`` excluded) on ``cpu``, then :func:`gpu_cases`."""
    return [pytest.param(b, "cpu", id=b) for b in backends_for("cpu") if b != "eager"] + (
        gpu_cases())


def all_cases() -> list:
    """:func:`kernel_cases` with ``eager`` on ``cpu`` first."""
    return [pytest.param("eager", "cpu", id="eager")] + kernel_cases()
