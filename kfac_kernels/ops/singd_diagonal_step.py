r"""Fused SINGD parameter step for diagonal Kronecker factors (Lin et al. (2024), Fig. 4, steps
2-3).

For a parameter matrix ``P`` (``rows x cols``; a weight reshaped to ``(d_out, -1)``, or a bias as
``(d_out, 1)``) with gradient ``G``, ``C = diag(c)``, ``K = diag(k)`` and momentum buffer ``B``:

.. math::

    D = C C^\top G K K^\top + \gamma P, \qquad
    B \leftarrow \alpha_2 B + D \;(\text{first step: } B \leftarrow D), \qquad
    P \leftarrow P - \beta_2 B

in one pass over the elements, in place on ``P`` and ``B`` (the eager reference runs about
eight tensor ops and their temporaries). ``c``, ``k`` and ``B`` are fp32 (fp64 for fp64
parameters); ``P`` and ``G`` may be bfloat16, in which case every operation is evaluated in fp32
and ``P`` is rounded once.
"""
from __future__ import annotations

import math

import torch

from .._backend import native_has_op, resolve_backend
from ._cuda_auto import cuda_order
from ._library import check_same
from ._checks import check_bool, check_finite_floats, check_writable

_OP = "singd_diagonal_step"
_PARAM_DTYPES = (torch.float32, torch.float64, torch.bfloat16)


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp64 for fp64 parameters, fp32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def singd_diagonal_step_eager(param, grad, c, k, buf, lr, momentum, weight_decay, first):
    """The definition, with torch ops (in place on ``param`` and ``buf``)."""
    d = c[:, None] * (c[:, None] * ((grad.to(buf.dtype) * k) * k))
    if weight_decay != 0.0:
        d = d + weight_decay * param.to(buf.dtype)
    if first:
        buf.copy_(d)
    else:
        buf.mul_(momentum).add_(d)
    param.copy_(param.to(buf.dtype) - lr * buf)


def _check(param, grad, c, k, buf, lr, momentum, weight_decay, first) -> None:
    for name, t in (("param", param), ("grad", grad), ("c", c), ("k", k), ("buf", buf)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{_OP}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if param.dim() != 2:
        raise ValueError(f"{_OP}: param must be 2-D (rows, cols), got shape {tuple(param.shape)}")
    if param.dtype not in _PARAM_DTYPES:
        raise TypeError(f"{_OP}: param must be float32, float64 or bfloat16, got {param.dtype}")
    acc = accumulation_dtype(param.dtype)
    if grad.shape != param.shape or grad.dtype != param.dtype:
        raise ValueError(f"{_OP}: grad must have the shape and dtype of param "
                         f"({tuple(param.shape)}, {param.dtype}), got ({tuple(grad.shape)}, "
                         f"{grad.dtype})")
    if buf.shape != param.shape or buf.dtype != acc:
        raise ValueError(f"{_OP}: buf must have shape {tuple(param.shape)} and dtype {acc}, got "
                         f"{tuple(buf.shape)} and {buf.dtype}")
    rows, cols = param.shape
    for name, t, n in (("c", c, rows), ("k", k, cols)):
        if t.shape != (n,) or t.dtype != acc:
            raise ValueError(f"{_OP}: {name} must be a {acc} vector of {n} entries, got shape "
                             f"{tuple(t.shape)} and dtype {t.dtype}")
    for t in (grad, c, k, buf):
        if t.device != param.device:
            raise ValueError(f"{_OP}: all tensors must be on {param.device}, got one on "
                             f"{t.device}")
    check_finite_floats(_OP, lr=lr, momentum=momentum, weight_decay=weight_decay)
    check_bool(_OP, "first", first)


def _common_case(param, grad, c, k, buf, lr, momentum, weight_decay, first) -> bool:
    """Whether the arguments are valid in the common way (plain tensors, Python floats, a
    bool; ``param``, ``grad`` and ``buf`` with contiguous, non-overlapping rows, ``c`` and ``k``
    contiguous), decided in one pass without building a message: the optimizer calls this op
    once per parameter every step, and on a GPU the host's time per call bounds the fused step
    (``bench/results/static_vs_h200.json``). Such arguments need no overlap check, copy or
    conversion. Anything else goes to :func:`_check` and the general path, which accept it or
    say what is wrong."""
    tensor = torch.Tensor
    if not (type(param) is tensor and type(grad) is tensor and type(c) is tensor
            and type(k) is tensor and type(buf) is tensor and type(lr) is float
            and type(momentum) is float and type(weight_decay) is float and type(first) is bool
            and math.isfinite(lr) and math.isfinite(momentum) and math.isfinite(weight_decay)):
        return False
    shape, dtype, device = param.shape, param.dtype, param.device
    if len(shape) != 2 or dtype not in _PARAM_DTYPES:
        return False
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    if not (grad.shape == shape and grad.dtype == dtype and buf.shape == shape
            and buf.dtype == acc and c.shape == shape[:1] and c.dtype == acc
            and k.shape == shape[1:] and k.dtype == acc and grad.device == device
            and c.device == device and k.device == device and buf.device == device):
        return False
    rows, cols = shape
    # rows of cols unit-stride elements, rows apart by at least cols: no element aliased
    for t in (param, grad, buf):
        s0, s1 = t.stride()
        if not ((s1 == 1 or cols == 1) and (s0 >= cols or rows == 1)):
            return False
    return (c.stride(0) == 1 or rows == 1) and (k.stride(0) == 1 or cols == 1)


def singd_diagonal_step(param: torch.Tensor, grad: torch.Tensor, c: torch.Tensor,
                        k: torch.Tensor, buf: torch.Tensor, lr: float, momentum: float,
                        weight_decay: float, first: bool, *, backend: str = "auto") -> None:
    """Update ``param`` and ``buf`` in place (see the module docstring).

    Args:
        param: ``(rows, cols)`` parameter (a view of the layer's weight or bias), rows contiguous.
        grad: its gradient, same shape and dtype (any layout; copied if rows are strided).
        c, k: diagonals of ``C`` (``rows``) and ``K`` (``cols``), fp32 (fp64 for fp64 params).
        buf: ``(rows, cols)`` momentum buffer in the dtype of ``c``.
        lr, momentum, weight_decay: ``beta2``, ``alpha2``, ``gamma``.
        first: the buffer has no history yet (``B <- D``).
        backend: ``"auto"``, ``"eager"``, ``"cpu"``, ``"cuda"`` or ``"triton"``.
    """
    common = _common_case(param, grad, c, k, buf, lr, momentum, weight_decay, first)
    if not common:
        _check(param, grad, c, k, buf, lr, momentum, weight_decay, first)
        check_writable(_OP, param=param, buf=buf)
        lr, momentum, weight_decay = float(lr), float(momentum), float(weight_decay)
    chosen = resolve_backend(backend, param.device, _OP, cuda_order(_OP))
    if chosen == "eager":
        singd_diagonal_step_eager(param, grad, c, k, buf, lr, momentum, weight_decay, first)
        return
    if not common:
        for name, t in (("param", param), ("buf", buf)):
            if t.shape[1] > 1 and t.stride(1) != 1:
                raise ValueError(f"{_OP}: {name} must have contiguous rows (it is updated in "
                                 f"place)")
        if grad.shape[1] > 1 and grad.stride(1) != 1:
            grad = grad.contiguous()
        c, k = c.contiguous(), k.contiguous()
    if chosen == "triton":
        from kfac_kernels._triton.singd_diagonal_step import singd_diagonal_step_triton
        singd_diagonal_step_triton(param, grad, c, k, buf, lr, momentum, weight_decay, first)
        return
    torch.ops.kfac_kernels.singd_diagonal_step(param, grad, c, k, buf, lr, momentum,
                                               weight_decay, first)


def _register_fake() -> None:
    """Shape/dtype propagation and validation for torch.compile and FakeTensor, registered
    whether or not the native extension is built (the schema lives in ops/_library.py)."""

    @torch.library.register_fake("kfac_kernels::singd_diagonal_step")
    def _(param, grad, c, k, buf, lr, momentum, weight_decay, first):
        torch._check(param.dim() == 2, lambda: f"{_OP}: param must be 2-D (rows, cols)")
        rows, cols = param.shape
        acc = accumulation_dtype(param.dtype)
        check_same(_OP, "grad", grad, param.shape, param.dtype)
        check_same(_OP, "buf", buf, param.shape, acc)
        check_same(_OP, "c", c, (rows,), acc)
        check_same(_OP, "k", k, (cols,), acc)


_register_fake()
