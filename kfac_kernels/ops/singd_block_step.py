r"""Fused SINGD parameter step for block-diagonal Kronecker factors (Lin et al. (2024), Fig. 4,
steps 2-3).

For a layer with weight ``W`` (``rows x cols``, the weight reshaped to ``(d_out, -1)``) and
optional bias ``b`` (its coordinate is the last column of the parameter matrix ``[W | b]``, so
the last block of ``K`` couples it to the weight), gradient ``M = [dW | db]``, block-diagonal
``C`` (blocks ``c``, used sizes ``c_dims`` summing to ``rows``) and ``K`` (blocks ``k``,
``k_dims`` summing to ``cols`` plus one with a bias) and momentum buffers ``B`` of the same
layout:

.. math::

    D = C C^\top M K K^\top + \gamma [W | b], \qquad
    B \leftarrow \alpha_2 B + D \;(\text{first step: } B \leftarrow D), \qquad
    [W | b] \leftarrow [W | b] - \beta_2 B

in one pass over the tiles (``C`` row block ``i``, ``K`` column block ``j``:
``D_ij = (C_i C_i^T) M_ij (K_j K_j^T)``), in place on the parameters and buffers. The blocks of
``c`` / ``k`` sit in the top-left corners of ``b x b`` slots (as in
:func:`kfac_kernels.ops.singd_block_factor_update`). ``c``, ``k`` and the buffers are fp32 (fp64
for fp64 parameters); parameters and gradients may be bfloat16, in which case every operation is
evaluated in fp32 and the parameters are rounded once.
"""
from __future__ import annotations

import torch

from .._backend import native_has_op, resolve_backend
from ._cuda_auto import cuda_order
from ._library import check_same
from ._checks import check_bool, check_finite_floats, check_writable, within_block_limit
from .singd_diagonal_step import accumulation_dtype

_OP = "singd_block_step"
_PARAM_DTYPES = (torch.float32, torch.float64, torch.bfloat16)
# Largest slot (b of c and k) each kernel backend takes, its tiles on chip: Triton in registers
# (kfac_kernels._triton.singd_block_step.MAX_BLOCK: at 64 they spill), CUDA in shared memory
# (kMaxBlock of csrc/cuda/singd_block_step.cu). eager and cpu take any size.
MAX_BLOCK = {"triton": 32, "cuda": 32}
_warned: set[str] = set()


def _outer_blocks(x, dims):
    return torch.block_diag(*[x[j, :n, :n] @ x[j, :n, :n].mT for j, n in enumerate(dims)])


def singd_block_step_eager(weight, weight_grad, bias, bias_grad, c, c_dims, k, k_dims,
                           weight_buf, bias_buf, lr, momentum, weight_decay, first):
    """The definition, with dense torch ops (in place on the parameters and buffers)."""
    acc = weight_buf.dtype
    cols = weight.shape[1]
    m, p, buf = weight_grad.to(acc), weight.to(acc), weight_buf
    if bias is not None:
        m = torch.cat([m, bias_grad.to(acc)[:, None]], dim=1)
        p = torch.cat([p, bias.to(acc)[:, None]], dim=1)
        buf = torch.cat([weight_buf, bias_buf[:, None]], dim=1)
    d = (_outer_blocks(c, c_dims) @ m) @ _outer_blocks(k, k_dims)
    if weight_decay != 0.0:
        d = d + weight_decay * p
    buf = d if first else momentum * buf + d
    new = p - lr * buf
    weight_buf.copy_(buf[:, :cols])
    weight.copy_(new[:, :cols])
    if bias is not None:
        bias_buf.copy_(buf[:, cols])
        bias.copy_(new[:, cols])


def _check(weight, weight_grad, bias, bias_grad, c, c_dims, k, k_dims, weight_buf, bias_buf,
           lr, momentum, weight_decay, first) -> None:
    named = [("weight", weight), ("weight_grad", weight_grad), ("c", c), ("k", k),
             ("weight_buf", weight_buf)]
    if bias is not None:
        named += [("bias", bias), ("bias_grad", bias_grad), ("bias_buf", bias_buf)]
    elif bias_grad is not None or bias_buf is not None:
        raise ValueError(f"{_OP}: bias_grad and bias_buf must be None without a bias")
    for name, t in named:
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{_OP}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if weight.dim() != 2:
        raise ValueError(f"{_OP}: weight must be 2-D (rows, cols), got shape "
                         f"{tuple(weight.shape)}")
    if weight.dtype not in _PARAM_DTYPES:
        raise TypeError(f"{_OP}: weight must be float32, float64 or bfloat16, got "
                        f"{weight.dtype}")
    acc = accumulation_dtype(weight.dtype)
    rows, cols = weight.shape
    expect = [("weight_grad", weight_grad, (rows, cols), weight.dtype),
              ("weight_buf", weight_buf, (rows, cols), acc)]
    if bias is not None:
        expect += [("bias", bias, (rows,), weight.dtype), ("bias_grad", bias_grad, (rows,),
                                                            weight.dtype),
                   ("bias_buf", bias_buf, (rows,), acc)]
    for name, t, shape, dt in expect:
        if tuple(t.shape) != shape or t.dtype != dt:
            raise ValueError(f"{_OP}: {name} must have shape {shape} and dtype {dt}, got "
                             f"{tuple(t.shape)} and {t.dtype}")
    width = cols + (1 if bias is not None else 0)
    for name, x, dims, total in (("c", c, c_dims, rows), ("k", k, k_dims, width)):
        if x.dim() != 3 or x.shape[1] != x.shape[2] or x.dtype != acc:
            raise ValueError(f"{_OP}: {name} must be a (blocks, b, b) {acc} tensor, got shape "
                             f"{tuple(x.shape)} and dtype {x.dtype}")
        if (not isinstance(dims, (list, tuple)) or len(dims) != x.shape[0]
                or any(isinstance(d, bool) or not isinstance(d, int) or not 1 <= d <= x.shape[1]
                       for d in dims) or sum(dims) != total):
            raise ValueError(f"{_OP}: {name}_dims must be {x.shape[0]} ints in "
                             f"[1, {x.shape[1]}] summing to {total}, got {dims!r}")
    for name, t in named:
        if t.device != weight.device:
            raise ValueError(f"{_OP}: all tensors must be on {weight.device}, got {name} on "
                             f"{t.device}")
    check_finite_floats(_OP, lr=lr, momentum=momentum, weight_decay=weight_decay)
    check_bool(_OP, "first", first)


def singd_block_step(weight: torch.Tensor, weight_grad: torch.Tensor, bias: torch.Tensor | None,
                     bias_grad: torch.Tensor | None, c: torch.Tensor, c_dims: list[int],
                     k: torch.Tensor, k_dims: list[int], weight_buf: torch.Tensor,
                     bias_buf: torch.Tensor | None, lr: float, momentum: float,
                     weight_decay: float, first: bool, *, backend: str = "auto") -> None:
    """Update the parameters and buffers in place (see the module docstring).

    Args:
        weight: ``(rows, cols)`` (a contiguous view of the layer's weight).
        weight_grad: its gradient (same shape and dtype).
        bias, bias_grad: ``(rows,)`` bias and its gradient, or both ``None``.
        c, k: ``(blocks, b, b)`` diagonal blocks of ``C`` and ``K`` (fp32; fp64 for fp64
            parameters); ``c_dims`` / ``k_dims`` their used sizes.
        weight_buf, bias_buf: momentum buffers in the dtype of ``c`` (``bias_buf`` ``None``
            without a bias).
        lr, momentum, weight_decay: ``beta2``, ``alpha2``, ``gamma``.
        first: the buffers have no history yet (``B <- D``).
        backend: ``"auto"``, ``"eager"``, ``"cpu"``, ``"cuda"`` or ``"triton"``. The triton
            and cuda kernels take blocks of at most ``MAX_BLOCK`` (32); ``"auto"`` computes
            larger ones with the eager path (and says so once).
    """
    _check(weight, weight_grad, bias, bias_grad, c, c_dims, k, k_dims, weight_buf, bias_buf, lr,
           momentum, weight_decay, first)
    check_writable(_OP, weight=weight, bias=bias, weight_buf=weight_buf, bias_buf=bias_buf)
    chosen = within_block_limit(_OP, resolve_backend(backend, weight.device, _OP, cuda_order(_OP)), backend,
                                max(c.shape[1], k.shape[1]), MAX_BLOCK, _warned)
    args = [weight, weight_grad, bias, bias_grad, c, list(c_dims), k, list(k_dims), weight_buf,
            bias_buf, float(lr), float(momentum), float(weight_decay), first]
    if chosen == "eager":
        singd_block_step_eager(*args)
        return
    for name, t in (("weight", weight), ("weight_buf", weight_buf), ("bias", bias),
                    ("bias_buf", bias_buf)):
        if t is not None and not t.is_contiguous():
            raise ValueError(f"{_OP}: {name} must be contiguous (it is updated in place)")
    args[1] = weight_grad.contiguous()
    args[3] = bias_grad.contiguous() if bias_grad is not None else None
    args[4], args[6] = c.contiguous(), k.contiguous()
    if chosen == "triton":
        from kfac_kernels._triton.singd_block_step import singd_block_step_triton
        singd_block_step_triton(*args)
        return
    torch.ops.kfac_kernels.singd_block_step(*args)


def _register_fake() -> None:
    """Shape/dtype propagation and validation for torch.compile and FakeTensor, registered
    whether or not the native extension is built (the schema lives in ops/_library.py)."""

    @torch.library.register_fake("kfac_kernels::singd_block_step")
    def _(weight, weight_grad, bias, bias_grad, c, c_dims, k, k_dims, weight_buf, bias_buf, lr,
          momentum, weight_decay, first):
        torch._check(weight.dim() == 2, lambda: f"{_OP}: weight must be 2-D (rows, cols)")
        acc = accumulation_dtype(weight.dtype)
        check_same(_OP, "weight_grad", weight_grad, weight.shape, weight.dtype)
        check_same(_OP, "weight_buf", weight_buf, weight.shape, acc)
        torch._check((bias is None) == (bias_grad is None) == (bias_buf is None),
                     lambda: f"{_OP}: bias, bias_grad and bias_buf must be given together")
        if bias is not None:
            check_same(_OP, "bias", bias, (weight.shape[0],), weight.dtype)
            check_same(_OP, "bias_grad", bias_grad, (weight.shape[0],), weight.dtype)
            check_same(_OP, "bias_buf", bias_buf, (weight.shape[0],), acc)
        torch._check(sum(c_dims) == weight.shape[0],
                     lambda: f"{_OP}: c_dims must sum to weight's {weight.shape[0]} rows")
        width = weight.shape[1] + (0 if bias is None else 1)
        torch._check(sum(k_dims) == width,
                     lambda: f"{_OP}: k_dims must sum to {width} (weight's columns and the bias)")
        for name, x, dims in (("c", c, c_dims), ("k", k, k_dims)):
            torch._check(x.dim() == 3 and x.shape[1] == x.shape[2] and x.dtype == acc
                         and len(dims) == x.shape[0],
                         lambda: f"{_OP}: {name} must be a (blocks, b, b) {acc} tensor with one "
                         f"{name}_dims entry per block")


_register_fake()
