"""Exact generalised Gauss-Newton (GGN) blocks with ``torch.func``, used as an oracle.

For a layer with weight ``W`` and optional bias ``b`` the block is laid out in the row-major
order of ``[W | b]``: ``W`` is reshaped to ``(d_out, -1)`` (for a convolution
``(C_out, C_in/groups * prod(kernel))``), the bias is appended as a last column, and the matrix is
flattened row by row.  With this order a Kronecker-factored approximation of the block is
``kron(G, A)`` with ``G`` on the output side and ``A`` (bias coordinate last) on the input side.

The GGN is ``J^T H J``: ``J`` the Jacobian of the model's output with respect to the layer's
parameters (``torch.func.jacrev`` over ``torch.func.functional_call``) and ``H`` the Hessian of
the loss with respect to the model's output (``torch.func.hessian``), so any reduction of the
loss (sum, mean) and any loss with a Hessian (MSE, cross-entropy) is handled the same way.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.func import functional_call, hessian, jacrev


def output_hessian(loss_fn, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Hessian of ``loss_fn(outputs, targets)`` w.r.t. ``outputs``, as an ``(M, M)`` matrix with
    ``M = outputs.numel()`` (row-major flattening of ``outputs``)."""
    outputs = outputs.detach()
    h = hessian(lambda o: loss_fn(o, targets))(outputs)
    m = outputs.numel()
    return h.reshape(m, m)


def layer_param_jacobian(model: nn.Module, inputs: torch.Tensor, name: str) -> torch.Tensor:
    """Jacobian of ``model(inputs)`` (flattened) w.r.t. the ``[W | b]`` parameters of the module
    ``name``, columns in the row-major ``[W | b]`` order: shape ``(M, d_out * (D + has_bias))``."""
    module = model.get_submodule(name)
    params = {k: v.detach() for k, v in model.named_parameters()}
    buffers = {k: v.detach() for k, v in model.named_buffers()}
    w_key = f"{name}.weight" if name else "weight"
    b_key = f"{name}.bias" if name else "bias"
    has_bias = getattr(module, "bias", None) is not None

    def f(w, b):
        p = dict(params)
        p[w_key] = w
        if has_bias:
            p[b_key] = b
        return functional_call(model, (p, buffers), (inputs,))

    w = params[w_key]
    b = params[b_key] if has_bias else torch.zeros(0, dtype=w.dtype)
    out = f(w, b)
    m = out.numel()
    d_out = w.shape[0]
    jw, jb = jacrev(f, argnums=(0, 1))(w, b)
    jw = jw.reshape(m, d_out, -1)
    if has_bias:
        jb = jb.reshape(m, d_out, 1)
        j = torch.cat([jw, jb], dim=-1)
    else:
        j = jw
    return j.reshape(m, -1)


def exact_ggn_block(model: nn.Module, loss_fn, inputs: torch.Tensor, targets: torch.Tensor,
                    name: str) -> torch.Tensor:
    """The exact GGN block of the module ``name`` in the row-major ``[W | b]`` order."""
    with torch.no_grad():
        outputs = model(inputs)
    h = output_hessian(loss_fn, outputs, targets)
    j = layer_param_jacobian(model, inputs, name)
    return j.T @ h @ j


def exact_ggn_blocks(model: nn.Module, loss_fn, inputs: torch.Tensor, targets: torch.Tensor,
                     names) -> dict[str, torch.Tensor]:
    """``{name: exact_ggn_block(...)}`` for each name in ``names`` (the output Hessian is computed
    once)."""
    with torch.no_grad():
        outputs = model(inputs)
    h = output_hessian(loss_fn, outputs, targets)
    out = {}
    for name in names:
        j = layer_param_jacobian(model, inputs, name)
        out[name] = j.T @ h @ j
    return out


def group_blocks(ggn: torch.Tensor, groups: int) -> list[torch.Tensor]:
    """The ``groups`` diagonal sub-blocks of a grouped convolution's GGN block: group ``g`` owns
    the output channels ``[g * C_out/groups, (g+1) * C_out/groups)``, i.e. a contiguous range of
    rows of ``[W | b]`` and therefore a contiguous range of the row-major flattening."""
    n = ggn.shape[0]
    assert n % groups == 0
    s = n // groups
    return [ggn[g * s:(g + 1) * s, g * s:(g + 1) * s] for g in range(groups)]


def off_group_blocks_norm(ggn: torch.Tensor, groups: int) -> float:
    """Frobenius norm of everything outside the diagonal per-group blocks."""
    n = ggn.shape[0]
    s = n // groups
    mask = torch.ones(n, n, dtype=torch.bool)
    for g in range(groups):
        mask[g * s:(g + 1) * s, g * s:(g + 1) * s] = False
    return float(torch.linalg.norm(ggn[mask]))


def kron_factors(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """``kron(G, A)``; for stacked per-group factors ``(groups, ., .)`` the block-diagonal matrix
    of the per-group Kronecker products."""
    if a.dim() == 3:
        return torch.block_diag(*[torch.kron(g[i], a[i]) for i in range(a.shape[0])])
    return torch.kron(g, a)


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """``||actual - expected||_F / ||expected||_F`` in fp64."""
    a = actual.detach().to(torch.float64)
    e = expected.detach().to(torch.float64)
    return float(torch.linalg.norm(a - e) / torch.linalg.norm(e))


def param_ggn_block(model: nn.Module, loss_fn, inputs, targets: torch.Tensor, w_key: str,
                    b_key: str | None = None) -> torch.Tensor:
    """The exact GGN block of the parameters ``w_key`` (and ``b_key``) of ``model`` by their
    ``named_parameters`` keys, in the row-major order of ``[W | b]`` (``W`` reshaped to
    ``(rows, -1)``); for parameters that are not a module's ``weight``/``bias`` (e.g.
    ``in_proj_weight`` of ``nn.MultiheadAttention``). ``inputs`` may be a tuple."""
    params = {k: v.detach() for k, v in model.named_parameters()}
    buffers = {k: v.detach() for k, v in model.named_buffers()}
    args = inputs if isinstance(inputs, tuple) else (inputs,)

    def f(w, b):
        p = dict(params)
        p[w_key] = w
        if b_key is not None:
            p[b_key] = b
        return functional_call(model, (p, buffers), args)

    w = params[w_key]
    b = params[b_key] if b_key is not None else torch.zeros(0, dtype=w.dtype)
    with torch.no_grad():
        out = f(w, b)
    h = output_hessian(loss_fn, out, targets)
    m, rows = out.numel(), w.shape[0]
    jw, jb = jacrev(f, argnums=(0, 1))(w, b)
    j = jw.reshape(m, rows, -1)
    if b_key is not None:
        j = torch.cat([j, jb.reshape(m, rows, 1)], dim=-1)
    j = j.reshape(m, -1)
    return j.T @ h @ j
