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

:func:`singd_diagonal_step_foreach` takes the step of many parameters (a network's weights and
biases) in one call: on a GPU one launch per 24 parameters, their pointers passed in the launch
itself. The per-parameter op costs the host about 11 us a call from Python, and over ResNet-18's
42 weights and biases that, not the kernel, bounds the fused step.
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


def _check(param, grad, c, k, buf, lr, momentum, weight_decay, first, who: str = _OP) -> None:
    """Every rule of the arguments, each broken one named in a message from ``who``."""
    for name, t in (("param", param), ("grad", grad), ("c", c), ("k", k), ("buf", buf)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{who}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if param.dim() != 2:
        raise ValueError(f"{who}: param must be 2-D (rows, cols), got shape {tuple(param.shape)}")
    if param.dtype not in _PARAM_DTYPES:
        raise TypeError(f"{who}: param must be float32, float64 or bfloat16, got {param.dtype}")
    acc = accumulation_dtype(param.dtype)
    if grad.shape != param.shape or grad.dtype != param.dtype:
        raise ValueError(f"{who}: grad must have the shape and dtype of param "
                         f"({tuple(param.shape)}, {param.dtype}), got ({tuple(grad.shape)}, "
                         f"{grad.dtype})")
    if buf.shape != param.shape or buf.dtype != acc:
        raise ValueError(f"{who}: buf must have shape {tuple(param.shape)} and dtype {acc}, got "
                         f"{tuple(buf.shape)} and {buf.dtype}")
    rows, cols = param.shape
    for name, t, n in (("c", c, rows), ("k", k, cols)):
        if t.shape != (n,) or t.dtype != acc:
            raise ValueError(f"{who}: {name} must be a {acc} vector of {n} entries, got shape "
                             f"{tuple(t.shape)} and dtype {t.dtype}")
    for t in (grad, c, k, buf):
        if t.device != param.device:
            raise ValueError(f"{who}: all tensors must be on {param.device}, got one on "
                             f"{t.device}")
    check_finite_floats(who, lr=lr, momentum=momentum, weight_decay=weight_decay)
    check_bool(who, "first", first)


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


def _kernel_layout(who: str, param, grad, c, k, buf):
    """``(grad, c, k)`` as the kernels read them (strided gradient rows and factor vectors
    copied); ``param`` and ``buf``, updated in place, must have contiguous rows already."""
    for name, t in (("param", param), ("buf", buf)):
        if t.shape[1] > 1 and t.stride(1) != 1:
            raise ValueError(f"{who}: {name} must have contiguous rows (it is updated in place)")
    if grad.shape[1] > 1 and grad.stride(1) != 1:
        grad = grad.contiguous()
    return grad, c.contiguous(), k.contiguous()


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
        grad, c, k = _kernel_layout(_OP, param, grad, c, k, buf)
    if chosen == "triton":
        from kfac_kernels._triton.singd_diagonal_step import singd_diagonal_step_triton
        singd_diagonal_step_triton(param, grad, c, k, buf, lr, momentum, weight_decay, first)
        return
    torch.ops.kfac_kernels.singd_diagonal_step(param, grad, c, k, buf, lr, momentum,
                                               weight_decay, first)


_FOREACH = "singd_diagonal_step_foreach"


def singd_diagonal_step_foreach_eager(params, grads, cs, ks, bufs, lr, momentum, weight_decay,
                                      first):
    """The definition: :func:`singd_diagonal_step_eager` of every entry."""
    for entry in zip(params, grads, cs, ks, bufs, first):
        p, g, c, k, b, f = entry
        singd_diagonal_step_eager(p, g, c, k, b, lr, momentum, weight_decay, f)


def singd_diagonal_step_foreach(params: list[torch.Tensor], grads: list[torch.Tensor],
                                cs: list[torch.Tensor], ks: list[torch.Tensor],
                                bufs: list[torch.Tensor], lr: float, momentum: float,
                                weight_decay: float, first: list[bool], *,
                                backend: str = "auto") -> None:
    """:func:`singd_diagonal_step` of every entry of the lists, in one call (one launch per 24
    parameters on CUDA; the entries must not overlap one another).

    Args:
        params, grads, cs, ks, bufs: one entry per parameter, each as for
            :func:`singd_diagonal_step` (any mix of float32, bfloat16 and float64 parameters),
            all on one device.
        lr, momentum, weight_decay: shared by all entries.
        first: one flag per entry (its buffer has no history yet).
        backend: ``"auto"``, ``"eager"``, ``"cpu"``, ``"cuda"`` or ``"triton"`` (a loop of the
            per-parameter Triton kernel).
    """
    lists = {"params": params, "grads": grads, "cs": cs, "ks": ks, "bufs": bufs, "first": first}
    for name, value in lists.items():
        if not isinstance(value, (list, tuple)):
            raise TypeError(f"{_FOREACH}: {name} must be a list, got {type(value).__name__}")
    n = len(params)
    if any(len(v) != n for v in lists.values()):
        raise ValueError(f"{_FOREACH}: params, grads, cs, ks, bufs and first must have the same "
                         f"length, got {', '.join(str(len(v)) for v in lists.values())}")
    if not (type(lr) is float and type(momentum) is float and type(weight_decay) is float
            and math.isfinite(lr) and math.isfinite(momentum) and math.isfinite(weight_decay)):
        check_finite_floats(_FOREACH, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if n == 0:
        return
    device = params[0].device if isinstance(params[0], torch.Tensor) else None
    chosen = (resolve_backend(backend, device, _FOREACH, cuda_order(_FOREACH))
              if device is not None else None)
    if chosen in ("cpu", "cuda"):
        # The native op checks every entry before it writes any (a refusal changes nothing),
        # so it is tried first: the Python checks below cost about 2.5 us per entry, which is
        # the host time this op exists to save. A refused call gets them: they name what is
        # wrong, or make what the kernels cannot take (strided gradient rows) acceptable.
        try:
            torch.ops.kfac_kernels.singd_diagonal_step_foreach(
                list(params), list(grads), list(cs), list(ks), list(bufs), lr, momentum,
                weight_decay, list(first))
            return
        except (RuntimeError, TypeError):
            pass
    grads, cs, ks = list(grads), list(cs), list(ks)
    for i in range(n):
        entry = (params[i], grads[i], cs[i], ks[i], bufs[i], lr, momentum, weight_decay,
                 first[i])
        if not _common_case(*entry):
            who = f"{_FOREACH}: entry {i}"
            _check(*entry, who=who)
            check_writable(who, param=params[i], buf=bufs[i])
            if chosen != "eager":
                grads[i], cs[i], ks[i] = _kernel_layout(who, params[i], grads[i], cs[i], ks[i],
                                                        bufs[i])
        if params[i].device != device:
            raise ValueError(f"{_FOREACH}: all tensors must be on one device, got {device} "
                             f"and {params[i].device}")
    lr, momentum, weight_decay = float(lr), float(momentum), float(weight_decay)
    first = [bool(f) for f in first]
    if chosen == "eager":
        singd_diagonal_step_foreach_eager(params, grads, cs, ks, bufs, lr, momentum,
                                          weight_decay, first)
        return
    if chosen == "triton":
        from kfac_kernels._triton.singd_diagonal_step import singd_diagonal_step_triton
        for p, g, c, k, b, f in zip(params, grads, cs, ks, bufs, first):
            singd_diagonal_step_triton(p, g, c, k, b, lr, momentum, weight_decay, f)
        return
    torch.ops.kfac_kernels.singd_diagonal_step_foreach(list(params), grads, cs, ks, list(bufs),
                                                       lr, momentum, weight_decay, first)


def _fake_check(who: str, param, grad, c, k, buf) -> None:
    """The fake kernels' ``torch._check`` of one parameter's arguments."""
    torch._check(param.dim() == 2, lambda: f"{who}: param must be 2-D (rows, cols)")
    rows, cols = param.shape
    acc = accumulation_dtype(param.dtype)
    check_same(who, "grad", grad, param.shape, param.dtype)
    check_same(who, "buf", buf, param.shape, acc)
    check_same(who, "c", c, (rows,), acc)
    check_same(who, "k", k, (cols,), acc)


def _register_fake() -> None:
    """Shape/dtype propagation and validation for torch.compile and FakeTensor, registered
    whether or not the native extension is built (the schema lives in ops/_library.py)."""

    @torch.library.register_fake("kfac_kernels::singd_diagonal_step")
    def _(param, grad, c, k, buf, lr, momentum, weight_decay, first):
        _fake_check(_OP, param, grad, c, k, buf)

    @torch.library.register_fake("kfac_kernels::singd_diagonal_step_foreach")
    def _(params, grads, cs, ks, bufs, lr, momentum, weight_decay, first):
        n = len(params)
        torch._check(len(grads) == n and len(cs) == n and len(ks) == n and len(bufs) == n
                     and len(first) == n, lambda: f"{_FOREACH}: params, grads, cs, ks, bufs "
                     "and first must have the same length")
        for i, entry in enumerate(zip(params, grads, cs, ks, bufs)):
            _fake_check(f"{_FOREACH}: entry {i}", *entry)


_register_fake()
