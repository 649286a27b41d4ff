"""One table of devices, dtypes and tolerances for every test and benchmark.

Tolerances are relative to the reference's magnitude (``rel_error`` below). Low precision is not
given a fixed tolerance: a bf16/fp16 kernel is judged against fp64 and may err at most
``LOW_PRECISION_FACTOR`` times as much as the eager same-dtype computation.
"""
from __future__ import annotations

import torch

from ._backend import available_backends

# rtol per dtype for kernel-vs-reference parity (fp32: 1e-5, fp64: 1e-10, as the issues require).
RTOL = {torch.float32: 1e-5, torch.float64: 1e-10}
LOW_PRECISION_FACTOR = 2.0


def devices() -> list[torch.device]:
    out = [torch.device("cpu")]
    if torch.cuda.is_available():
        out.append(torch.device("cuda"))
    return out


def backends_for(device: torch.device | str) -> list[str]:
    """The concrete backends present for ``device`` (eager first)."""
    return available_backends(device)


def rel_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """``||actual - expected||_F / max(||expected||_F, tiny)``, computed in fp64."""
    a = actual.detach().to(torch.float64)
    e = expected.detach().to(torch.float64)
    denom = max(float(torch.linalg.norm(e)), 1e-300)
    return float(torch.linalg.norm(a - e)) / denom


def assert_close_rel(actual: torch.Tensor, expected: torch.Tensor, rtol: float | None = None,
                     msg: str = "") -> None:
    """Assert the relative Frobenius error is below ``rtol`` (default: from ``RTOL``)."""
    if rtol is None:
        rtol = RTOL[expected.dtype]
    assert actual.shape == expected.shape, f"{msg} shape {actual.shape} != {expected.shape}"
    err = rel_error(actual, expected)
    assert err <= rtol, f"{msg} relative error {err:.3e} > {rtol:.1e}"


def non_contiguous(t: torch.Tensor) -> torch.Tensor:
    """The same values as ``t`` in a non-contiguous layout (transposed storage of the last two
    dims, or a strided slice for 1-D)."""
    if t.dim() >= 2:
        return t.mT.contiguous().mT
    return torch.stack([t, t], dim=-1)[..., 0]
