"""What ``backend="auto"`` runs on CUDA tensors: the backend measured fastest for the op and shape.

Measured on an NVIDIA H200 (torch 2.11, Triton 3.6, CUDA 13.0), medians of CUDA-event timings:
``bench/results/nvidia-h200.md`` (``kfac-bench``) and ``bench/results/nvidia-h200_targets.json``
(``bench/gpu_targets.py``). Each rule below names the measurements it rests on, in ms. The
order is a preference: a backend that is not present (no CUDA build of the extension, no
Triton) is passed over, and eager (torch ops: cuBLAS, cuSOLVER) runs when none is.

Where a library call wins, it is the product, not the gather: cuBLAS reaches far more of the
tensor cores than the Gram kernels' synchronous gathers (the static model's misses are in
``bench/results/static_vs_h200.json``), so the kernels keep the cases where they avoid work or
memory (reduce mode, diagonal blocks, 1x1 convolutions, large unfolded inputs).
"""
from __future__ import annotations

import torch

# The unfolded patch matrix (N R x D) that the eager expand path materialises: above this size
# the kernels, which never form it, run instead (memory over speed).
UNFOLD_LIMIT_BYTES = 256 << 20

_ORDER = {
    # X 4096x256: eager 0.055, triton 0.134, cuda 0.150; X 8192x512: 0.121, 0.189, 0.288 (and
    # gradient_covariance, which forms rows and calls this op: eager 0.09-0.11 vs 0.17-0.31)
    "symmetric_factor_update": ("eager", "triton", "cuda"),
    # P 512x4608 fp32: cuda 0.042, triton 0.065; 256x2305: 0.060, 0.101; bf16 mixed (0.112 vs
    # 0.088, 0.043 vs 0.067); ResNet-18's 21 layers fp32: cuda 0.495, triton 1.124
    "singd_diagonal_step": ("cuda", "triton", "eager"),
    # not measured yet: one launch per 24 parameters (the per-layer ops are host-bound; the
    # static model predicts 0.13 ms over ResNet-18 of which one launch); triton is a loop of
    # the per-parameter Triton kernel
    "singd_diagonal_step_foreach": ("cuda", "triton", "eager"),
    # 8 layers: cuda 0.086, triton 0.071; 20 layers: 0.045, 0.064
    "singd_diagonal_factor_update": ("cuda", "triton", "eager"),
    # blocks of 32, 4 cases: triton 0.149-0.339, cuda 0.338-0.774; ResNet-18: 2.23 vs 3.91
    "singd_block_step": ("triton", "cuda", "eager"),
    # 8 layers: triton 0.476, cuda 2.134; 20 layers: 0.289, 1.069
    "singd_block_factor_update": ("triton", "cuda", "eager"),
}


def cuda_order(op: str, *, n: int | None = None, dtype: torch.dtype | None = None,
               mode: str | None = None, blocked: bool = False, kernel_elements: int = 0,
               unfolded_bytes: int = 0) -> tuple[str, ...]:
    """The backends for ``"auto"`` on CUDA tensors, fastest first.

    Args:
        op: the op's name.
        n: block size (block_eigh, block_damped_inverse).
        dtype: compute dtype (Triton's Jacobi computes in fp32 only).
        mode, blocked, kernel_elements, unfolded_bytes: patch_covariance's mode, whether only
            diagonal blocks are formed, ``kh * kw``, and the bytes of its unfolded patch matrix.
    """
    if op in ("block_eigh", "block_damped_inverse"):
        order = _eigh_order(n or 0)
        if dtype == torch.float64:
            order = tuple(b for b in order if b != "triton")
        return order
    if op == "patch_covariance":
        return _patch_order(mode, blocked, kernel_elements, unfolded_bytes)
    return _ORDER.get(op, ("cuda", "triton", "eager"))


def _eigh_order(n: int) -> tuple[str, ...]:
    # eigh, B512 n16: triton 0.180, cuda 0.262, eager 0.499 (B64: 0.125, 0.194, 0.172);
    # B512 n32: triton 0.705, eager 0.734, cuda 1.188 (damped inverse: 0.830, 1.199, 1.324)
    if n <= 32:
        return ("triton", "eager", "cuda")
    # n33, B64: cuda 0.91, triton 1.78, eager 39.7; B1024: 2.77, 11.6, 709. Triton pads to the
    # next power of two, so from n33 it costs what n64 costs (1.47 / 11.2): the crossover with
    # the CUDA kernel (4.15 / 15.1 at n64) lies between the measured 33 and 64, put at 40
    if n <= 40:
        return ("cuda", "triton", "eager")
    # n64: triton 1.47 / 11.2 / 3.08 (B64 / B1024 / B256), cuda 4.15 / 15.1 / 5.01
    if n <= 64:
        return ("triton", "cuda", "eager")
    # n96, n128 (Triton's limit is 64): cuda 13.0 / 59.9 and 31.4 / 250.6, eager 78 / 1260 and
    # 112 / 1826
    return ("cuda", "eager")


def _patch_order(mode, blocked: bool, kernel_elements: int, unfolded_bytes: int):
    # reduce, ResNet-50 stage 3: cuda 0.143, triton 0.157, eager 0.518 (bf16: 0.154, 0.170,
    # 0.507); ResNet-18 / 1x1 cases: cuda 0.073-0.107, triton 0.216-0.268, eager 0.307-0.340
    if mode == "reduce":
        return ("cuda", "triton", "eager")
    # 4 diagonal blocks, ResNet-50 stage 3: bf16 cuda 1.26, triton 1.48, eager 1.94; fp32
    # cuda 1.87, eager 2.71, triton 6.38
    if blocked:
        return ("cuda", "eager", "triton")
    # 1x1, N16 C512 14x14: cuda 0.258, eager 0.332, triton 0.474
    if kernel_elements == 1 or unfolded_bytes > UNFOLD_LIMIT_BYTES:
        return ("cuda", "triton", "eager")
    # 3x3: unfold + cuBLAS 0.75-0.93 against cuda 1.13-4.74 and triton 3.2-4.5 (bf16, fp32
    # with and without TF32; ResNet-18 CIFAR stages 1 and 3, ResNet-50 stage 3)
    return ("eager", "cuda", "triton")
