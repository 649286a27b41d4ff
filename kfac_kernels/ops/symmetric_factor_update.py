r"""Fused symmetric factor update: the accumulation and EMA step of every Kronecker factor.

.. math::

    F \leftarrow \text{decay}\, F + \alpha\, X^\top X, \qquad X \in \mathbb{R}^{m \times d}

For K-FAC's moving average, ``alpha = (1 - decay) / m``; for a plain sum, ``decay = 1,
alpha = 1``. ``X`` holds one row per example (a layer input with the bias coordinate appended, or
an output gradient). A stacked ``X`` of shape ``(B, m, d)`` updates ``B`` factors at once (one per
convolution group). ``factor=None`` means a zero factor (``decay`` is then ignored), which starts
an accumulation without allocating zeros first.

The native and Triton kernels compute one triangle of ``X^T X`` and mirror it, so the result is
exactly symmetric (the eager reference, ``torch.matmul``, need not be). Accumulation is in the
input precision (fp32 or fp64).
"""
from __future__ import annotations

import math

import torch

from .._backend import native_has_op, resolve_backend
from ._cuda_auto import cuda_order
from ._library import check_same

_OP = "symmetric_factor_update"
_DTYPES = (torch.float32, torch.float64)


def symmetric_factor_update_eager(factor: torch.Tensor | None, x: torch.Tensor, decay: float,
                                  alpha: float) -> torch.Tensor:
    """The definition: ``decay * factor + alpha * x^T x`` with torch.matmul."""
    gram = torch.matmul(x.mT, x)
    out = gram.mul_(alpha)
    if factor is not None:
        out.add_(factor, alpha=decay)
    return out


def _check(factor, x, decay, alpha) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{_OP}: x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() not in (2, 3):
        raise ValueError(
            f"{_OP}: x must be 2-D (m, d) or 3-D (batch, m, d), got shape {tuple(x.shape)}")
    if x.dtype not in _DTYPES:
        raise TypeError(f"{_OP}: x must be float32 or float64, got {x.dtype}")
    for name, value in (("decay", decay), ("alpha", alpha)):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"{_OP}: {name} must be a float, got {type(value).__name__}")
        if not math.isfinite(value):
            raise ValueError(f"{_OP}: {name} must be finite, got {value}")
    if factor is None:
        return
    if not isinstance(factor, torch.Tensor):
        raise TypeError(f"{_OP}: factor must be a torch.Tensor or None, got {type(factor).__name__}")
    expected = (*x.shape[:-2], x.shape[-1], x.shape[-1])
    if tuple(factor.shape) != expected:
        raise ValueError(
            f"{_OP}: factor must have shape {expected} to match x of shape {tuple(x.shape)}, "
            f"got {tuple(factor.shape)}")
    if factor.dtype != x.dtype:
        raise TypeError(f"{_OP}: factor and x must have the same dtype, got factor "
                        f"{factor.dtype} and x {x.dtype}")
    if factor.device != x.device:
        raise ValueError(f"{_OP}: factor and x must be on the same device, got factor on "
                         f"{factor.device} and x on {x.device}")


def symmetric_factor_update(factor: torch.Tensor | None, x: torch.Tensor, decay: float,
                            alpha: float, *, backend: str = "auto") -> torch.Tensor:
    """Return ``decay * factor + alpha * x^T x`` (a new tensor; ``factor`` is not modified).

    Args:
        factor: ``(d, d)`` or ``(B, d, d)`` symmetric factor, or ``None`` for zeros.
        x: ``(m, d)`` or ``(B, m, d)`` rows to accumulate, same dtype and device as ``factor``;
            any strides.
        decay: multiplier of the old factor.
        alpha: multiplier of ``x^T x``.
        backend: ``"auto"``, ``"eager"``, ``"cpu"``, ``"cuda"`` or ``"triton"``.
    """
    if (backend == "auto" and type(x) is torch.Tensor and x.device.type == "cpu"
            and type(decay) is float and type(alpha) is float and native_has_op(_OP)):
        # The common call (the capture's, about 50 per step on a 33-layer MLP): the native
        # glue checks every argument that can reach it, so it is tried first, and the Python
        # checks (3.5 us of the 8 us a 64 x 17 call took on one CPU thread) run only for a
        # refused call, whose message they then give.
        try:
            return torch.ops.kfac_kernels.symmetric_factor_update(factor, x, decay, alpha)
        except RuntimeError:
            pass
    _check(factor, x, decay, alpha)
    chosen = resolve_backend(backend, x.device, _OP, cuda_order(_OP))
    decay, alpha = float(decay), float(alpha)
    if chosen == "eager":
        return symmetric_factor_update_eager(factor, x, decay, alpha)
    if chosen == "triton":
        from kfac_kernels._triton.symmetric_factor_update import symmetric_factor_update_triton
        return symmetric_factor_update_triton(factor, x, decay, alpha)
    return torch.ops.kfac_kernels.symmetric_factor_update(factor, x, decay, alpha)


def _register_fake() -> None:
    """Shape/dtype propagation and validation for torch.compile and FakeTensor, registered
    whether or not the native extension is built (the schema lives in ops/_library.py)."""

    @torch.library.register_fake("kfac_kernels::symmetric_factor_update")
    def _(factor, x, decay, alpha):
        torch._check(x.dim() >= 2, lambda: f"{_OP}: x must have at least 2 dims (rows, d), got "
                     f"{x.dim()}")
        d = x.shape[-1]
        shape = (*x.shape[:-2], d, d)
        if factor is not None:
            check_same(_OP, "factor", factor, shape, x.dtype)
        return x.new_empty(shape)


_register_fake()
