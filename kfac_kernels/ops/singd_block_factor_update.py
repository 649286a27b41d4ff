r"""SINGD / IKFAC factor update of block-diagonal ``K`` and ``C`` for many layers in one call
(Lin et al. (2024), Fig. 4, step 1, with Table 1's block-diagonal projection).

The diagonal blocks of every layer's ``K`` are packed into one ``(blocks, b, b)`` tensor ``k``
(block ``j`` is ``k_dims[j] x k_dims[j]`` in the top-left corner of its ``b x b`` slot; the rest
of the slot is neither read nor written), layer ``l`` owning blocks
``k_layer_offsets[l]:k_layer_offsets[l+1]``; ``u`` holds the same diagonal blocks of ``U`` (all
the block-diagonal update needs of it), and likewise ``c``, ``g`` for ``C`` and ``G``. Per layer,
with ``d_i`` the sum of its ``k_dims`` and ``d_o`` of its ``c_dims``::

    H_j = B_j^T U_j B_j                       (every K block B_j; the same for C)
    a_k = Tr(H_C)/d_o, b_k = lam Tr(C^T C)/d_o, a_c = Tr(H_K)/d_i, b_c = lam Tr(K^T K)/d_i
          (kfac_like / IKFAC: a = 1, b = lam)
    S_j = (a_k H_j + b_k B_j^T B_j - I) / 2
    M_j <- alpha1 M_j + S_j, S_j = M_j        (when m_k, m_c are given)
    B_j <- B_j (I - lr_cov S_j)

in place on ``k``, ``c`` (and ``m_k``, ``m_c``): one call for every layer of the structure.
"""
from __future__ import annotations

import torch

from .._backend import native_has_op, resolve_backend
from ._cuda_auto import cuda_order
from ._library import check_same
from ._checks import check_bool, check_finite_floats, check_like, within_block_limit

_OP = "singd_block_factor_update"
# Largest slot (b of k and c) the Triton kernels take, their tiles in registers
# (kfac_kernels._triton.singd_block_factor_update.MAX_BLOCK: at 64 they spill); the other
# backends take any size.
MAX_BLOCK = {"triton": 32}
_warned: set[str] = set()


def _side(x, m, stat, dims, offsets, layer):
    """The blocks of one layer as lists of views of their used corners."""
    js = range(offsets[layer], offsets[layer + 1])
    return ([x[j, :dims[j], :dims[j]] for j in js],
            [m[j, :dims[j], :dims[j]] for j in js] if m is not None else None,
            [stat[j, :dims[j], :dims[j]] for j in js])


def singd_block_factor_update_eager(k, c, m_k, m_c, u, g, k_dims, c_dims, k_layer_offsets,
                                    c_layer_offsets, damping, alpha1, lr_cov, kfac_like):
    """The definition, layer by layer and block by block with torch ops (in place)."""
    for l in range(len(k_layer_offsets) - 1):
        kb, mkb, ub = _side(k, m_k, u, k_dims, k_layer_offsets, l)
        cb, mcb, gb = _side(c, m_c, g, c_dims, c_layer_offsets, l)
        hk = [b.mT @ s @ b for b, s in zip(kb, ub)]
        hc = [b.mT @ s @ b for b, s in zip(cb, gb)]
        qk = [b.mT @ b for b in kb]
        qc = [b.mT @ b for b in cb]
        d_i = sum(b.shape[0] for b in kb)
        d_o = sum(b.shape[0] for b in cb)
        if kfac_like:
            a_k, b_k, a_c, b_c = 1.0, damping, 1.0, damping
        else:
            def tr(ms):
                return sum(torch.diagonal(m).sum() for m in ms)
            a_k, b_k = tr(hc) / d_o, damping * tr(qc) / d_o
            a_c, b_c = tr(hk) / d_i, damping * tr(qk) / d_i
        for blocks, moms, hs, qs, a, b in ((kb, mkb, hk, qk, a_k, b_k),
                                           (cb, mcb, hc, qc, a_c, b_c)):
            for j, (blk, h, q) in enumerate(zip(blocks, hs, qs)):
                eye = torch.eye(blk.shape[0], dtype=blk.dtype, device=blk.device)
                s = 0.5 * (a * h + b * q - eye)
                if moms is not None:
                    s = alpha1 * moms[j] + s
                    moms[j].copy_(s)
                blk.copy_(blk @ (eye - lr_cov * s))


def _layout(name, x, dims, offsets):
    if x.dim() != 3 or x.shape[1] != x.shape[2]:
        raise ValueError(f"{_OP}: {name} must be a (blocks, b, b) tensor, got shape "
                         f"{tuple(x.shape)}")
    n, b = x.shape[0], x.shape[1]
    if (not isinstance(dims, (list, tuple)) or len(dims) != n
            or any(isinstance(d, bool) or not isinstance(d, int) or not 1 <= d <= b
                   for d in dims)):
        raise ValueError(f"{_OP}: {name}_dims must be a list of {n} ints in [1, {b}], got "
                         f"{dims!r}")
    if (not isinstance(offsets, (list, tuple)) or not offsets or offsets[0] != 0
            or offsets[-1] != n
            or any(isinstance(o, bool) or not isinstance(o, int) for o in offsets)
            or any(q <= p for p, q in zip(offsets, offsets[1:]))):
        raise ValueError(f"{_OP}: {name}_layer_offsets must be a list of increasing ints from 0 "
                         f"to {n}, got {offsets!r}")


def _check(k, c, m_k, m_c, u, g, k_dims, c_dims, k_layer_offsets, c_layer_offsets, damping,
           alpha1, lr_cov, kfac_like):
    for name, t in (("k", k), ("c", c), ("u", u), ("g", g)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{_OP}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if k.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"{_OP}: k must be float32 or float64, got {k.dtype}")
    if (m_k is None) != (m_c is None):
        raise ValueError(f"{_OP}: m_k and m_c must both be given or both be None")
    _layout("k", k, k_dims, k_layer_offsets)
    _layout("c", c, c_dims, c_layer_offsets)
    if len(k_layer_offsets) != len(c_layer_offsets):
        raise ValueError(f"{_OP}: k_layer_offsets and c_layer_offsets must have the same length "
                         "(layers + 1)")
    blocks = [("k", k, k), ("u", u, k), ("c", c, c), ("g", g, c)]
    if m_k is not None:
        blocks += [("m_k", m_k, k), ("m_c", m_c, c)]
    for name, t, ref in blocks:
        check_like(_OP, name, t, tuple(ref.shape), k.dtype, k.device)
    check_finite_floats(_OP, damping=damping, alpha1=alpha1, lr_cov=lr_cov)
    check_bool(_OP, "kfac_like", kfac_like)


def singd_block_factor_update(k: torch.Tensor, c: torch.Tensor, m_k: torch.Tensor | None,
                              m_c: torch.Tensor | None, u: torch.Tensor, g: torch.Tensor,
                              k_dims: list[int], c_dims: list[int], k_layer_offsets: list[int],
                              c_layer_offsets: list[int], damping: float, alpha1: float,
                              lr_cov: float, kfac_like: bool, *, backend: str = "auto") -> None:
    """Update ``k``, ``c`` (and ``m_k``, ``m_c``) in place; see the module docstring.

    Args:
        k, c: packed diagonal blocks of every layer's ``K`` / ``C``, ``(blocks, b, b)`` (fp32 or
            fp64, contiguous; ``b`` may differ between ``k`` and ``c``).
        m_k, m_c: packed Riemannian momenta (same shapes), or both ``None``.
        u, g: the diagonal blocks of the layers' ``U`` / ``G`` (same shapes as ``k`` / ``c``).
        k_dims, c_dims: the used size of each block (``1 <= dim <= b``).
        k_layer_offsets, c_layer_offsets: ``layers + 1`` increasing block offsets.
        damping, alpha1, lr_cov, kfac_like: ``lambda``, ``alpha1``, ``beta1``, IKFAC.
        backend: ``"auto"``, ``"eager"``, ``"cpu"``, ``"cuda"`` or ``"triton"``. The triton
            kernels take blocks of at most ``MAX_BLOCK`` (32); ``"auto"`` computes larger ones
            with the eager path (and says so once).
    """
    _check(k, c, m_k, m_c, u, g, k_dims, c_dims, k_layer_offsets, c_layer_offsets, damping,
           alpha1, lr_cov, kfac_like)
    chosen = within_block_limit(_OP, resolve_backend(backend, k.device, _OP, cuda_order(_OP)), backend,
                                max(k.shape[1], c.shape[1]), MAX_BLOCK, _warned)
    args = (k, c, m_k, m_c, u, g, list(k_dims), list(c_dims), list(k_layer_offsets),
            list(c_layer_offsets), float(damping), float(alpha1), float(lr_cov), kfac_like)
    if chosen == "eager":
        singd_block_factor_update_eager(*args)
        return
    if chosen == "triton":
        from kfac_kernels._triton.singd_block_factor_update import singd_block_factor_update_triton
        singd_block_factor_update_triton(*args)
        return
    torch.ops.kfac_kernels.singd_block_factor_update(*args)


def _register_fake() -> None:
    """Shape/dtype propagation and validation for torch.compile and FakeTensor, registered
    whether or not the native extension is built (the schema lives in ops/_library.py)."""

    @torch.library.register_fake("kfac_kernels::singd_block_factor_update")
    def _(k, c, m_k, m_c, u, g, k_dims, c_dims, k_layer_offsets, c_layer_offsets, damping,
          alpha1, lr_cov, kfac_like):
        for name, t, ref in (("u", u, k), ("g", g, c), ("m_k", m_k, k), ("m_c", m_c, c)):
            if t is not None:
                check_same(_OP, name, t, ref.shape, ref.dtype)
        torch._check(len(k_layer_offsets) == len(c_layer_offsets),
                     lambda: f"{_OP}: k_layer_offsets and c_layer_offsets must have one entry "
                     "per layer")


_register_fake()
