"""The schemas of ``torch.ops.kfac_kernels``, defined here rather than in the native extension.

Each op module registers its fake kernel (shape and dtype propagation for ``torch.compile`` and
``FakeTensor``, with ``torch._check`` validation of what the native kernels require) against these
schemas whether or not ``kfac_kernels._C`` is built; the extension only adds implementations
(``TORCH_LIBRARY_IMPL`` for CPU and CUDA in ``csrc/torch/``). Whether an op has a real kernel for
a device is asked of the dispatcher (:func:`has_kernel`).
"""
from __future__ import annotations

import torch

NAMESPACE = "kfac_kernels"

SCHEMAS = {
    # decay * factor + alpha * x^T x over the last two dims, one triangle computed, mirrored.
    "symmetric_factor_update":
        "(Tensor? factor, Tensor x, float decay, float alpha) -> Tensor",
    # x: (N, C, H, W); kernel_size, stride, dilation, padding (top, left), out_size: 2 ints
    # each; see csrc/include/patch_covariance.h.
    "patch_covariance":
        "(Tensor x, int[] kernel_size, int[] stride, int[] dilation, int[] padding, "
        "int[] out_size, int num_segments, int segment_start, int segment_step, "
        "int segment_channels, bool reduce, bool bias, Tensor? factor, float decay, float alpha) "
        "-> Tensor",
    # blocks: (B, n, n), lower triangle read; eigenvalues (B, n) ascending, eigenvectors
    # (B, n, n) as columns, sweeps (B,) int32.
    "block_eigh": "(Tensor blocks, int max_sweeps, float tol) -> (Tensor, Tensor, Tensor)",
    # Q (max(Lambda, 0) + damping[b] I)^-1 Q^T per block; (inverse, sweeps).
    "block_damped_inverse":
        "(Tensor blocks, Tensor damping, int max_sweeps, float tol) -> (Tensor, Tensor)",
    # lower Cholesky factor of blocks + diag(damping) per block (lower triangle read), zeros
    # above the diagonal; a failed or non-finite block is all NaN.
    "block_damped_cholesky": "(Tensor blocks, Tensor damping) -> Tensor",
    "singd_diagonal_step":
        "(Tensor(a!) param, Tensor grad, Tensor c, Tensor k, Tensor(b!) buf, float lr, "
        "float momentum, float weight_decay, bool first) -> ()",
    # singd_diagonal_step of many parameters in one call (one flag `first` per parameter).
    "singd_diagonal_step_foreach":
        "(Tensor(a!)[] params, Tensor[] grads, Tensor[] cs, Tensor[] ks, Tensor(b!)[] bufs, "
        "float lr, float momentum, float weight_decay, bool[] first) -> ()",
    "singd_diagonal_factor_update":
        "(Tensor(a!) k, Tensor(b!) c, Tensor(c!)? m_k, Tensor(d!)? m_c, Tensor u, Tensor g, "
        "int[] k_offsets, int[] c_offsets, float damping, float alpha1, float lr_cov, "
        "bool kfac_like) -> ()",
    "singd_block_factor_update":
        "(Tensor(a!) k, Tensor(b!) c, Tensor(c!)? m_k, Tensor(d!)? m_c, Tensor u, Tensor g, "
        "int[] k_dims, int[] c_dims, int[] k_layer_offsets, int[] c_layer_offsets, "
        "float damping, float alpha1, float lr_cov, bool kfac_like) -> ()",
    "singd_block_step":
        "(Tensor(a!) weight, Tensor weight_grad, Tensor(b!)? bias, Tensor? bias_grad, Tensor c, "
        "int[] c_dims, Tensor k, int[] k_dims, Tensor(c!) weight_buf, Tensor(d!)? bias_buf, "
        "float lr, float momentum, float weight_decay, bool first) -> ()",
}

_LIBRARY = torch.library.Library(NAMESPACE, "DEF")
for _name, _schema in SCHEMAS.items():
    _LIBRARY.define(_name + _schema)


def has_kernel(op: str, dispatch_key: str = "CPU") -> bool:
    """Whether a real (not fake) kernel of ``op`` is registered for ``dispatch_key``."""
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"{NAMESPACE}::{op}", dispatch_key)


def check_same(who: str, name: str, t: torch.Tensor, shape, dtype) -> None:
    """``torch._check`` that ``t`` has ``shape`` and ``dtype`` (for the fake kernels)."""
    torch._check(tuple(t.shape) == tuple(shape),
                 lambda: f"{who}: {name} must have shape {tuple(shape)}, got {tuple(t.shape)}")
    torch._check(t.dtype == dtype, lambda: f"{who}: {name} must be {dtype}, got {t.dtype}")
