"""``backend="auto"`` on CUDA tensors runs the backend measured fastest for the op and shape
(ops/_cuda_auto.py, measured on an H200), passing over backends that are not present.

Checked without a GPU: resolve_backend only needs a CUDA *device* and the availability of each
backend, which the tests set."""
from __future__ import annotations

import pytest
import torch

from kfac_kernels import _backend
from kfac_kernels.ops._cuda_auto import UNFOLD_LIMIT_BYTES, cuda_order

CUDA = torch.device("cuda")


@pytest.fixture
def present(monkeypatch):
    """present(cuda=..., triton=...): which GPU backends this 'machine' has."""
    def set_(cuda: bool, triton: bool):
        monkeypatch.setattr(_backend, "has_native_cuda", lambda: cuda)
        monkeypatch.setattr(_backend, "native_has_op", lambda op: cuda)
        monkeypatch.setattr(_backend, "has_triton", lambda: triton)
    return set_


@pytest.mark.parametrize("n,expected", [(1, "triton"), (16, "triton"), (32, "triton"),
                                        (33, "cuda"), (40, "cuda"), (41, "triton"),
                                        (64, "triton"), (65, "cuda"), (128, "cuda")])
def test_block_eigh_by_size(present, n, expected):
    present(cuda=True, triton=True)
    for op in ("block_eigh", "block_damped_inverse"):
        got = _backend.resolve_backend("auto", CUDA, "block_eigh", cuda_order(op, n=n))
        assert got == expected, (op, n)


def test_block_eigh_fp64_never_triton(present):
    present(cuda=True, triton=True)
    for n in (16, 64):
        assert "triton" not in cuda_order("block_eigh", n=n, dtype=torch.float64)
    present(cuda=False, triton=True)
    assert _backend.resolve_backend(
        "auto", CUDA, "block_eigh", cuda_order("block_eigh", n=16, dtype=torch.float64)) == "eager"


@pytest.mark.parametrize("facts,expected", [
    (dict(mode="reduce", kernel_elements=9), "cuda"),
    (dict(mode="expand", blocked=True, kernel_elements=9), "cuda"),
    (dict(mode="expand", kernel_elements=1), "cuda"),
    (dict(mode="expand", kernel_elements=9, unfolded_bytes=UNFOLD_LIMIT_BYTES + 1), "cuda"),
    (dict(mode="expand", kernel_elements=9, unfolded_bytes=58 << 20), "eager"),
])
def test_patch_covariance_by_shape(present, facts, expected):
    present(cuda=True, triton=True)
    got = _backend.resolve_backend("auto", CUDA, "patch_covariance",
                                   cuda_order("patch_covariance", **facts))
    assert got == expected


@pytest.mark.parametrize("op,expected", [("symmetric_factor_update", "eager"),
                                         ("singd_diagonal_step", "cuda"),
                                         ("singd_diagonal_factor_update", "cuda"),
                                         ("singd_block_step", "triton"),
                                         ("singd_block_factor_update", "triton")])
def test_fixed_orders(present, op, expected):
    present(cuda=True, triton=True)
    assert _backend.resolve_backend("auto", CUDA, op, cuda_order(op)) == expected


@pytest.mark.parametrize("cuda,triton", [(False, True), (True, False), (False, False)])
def test_a_missing_backend_is_passed_over(present, cuda, triton):
    present(cuda=cuda, triton=triton)
    for op, facts in [("singd_block_step", {}), ("singd_diagonal_step", {}),
                      ("block_eigh", dict(n=16)), ("block_eigh", dict(n=33)),
                      ("patch_covariance", dict(mode="reduce"))]:
        order = cuda_order(op, **facts)
        got = _backend.resolve_backend("auto", CUDA, op, order)
        have = {"cuda": cuda, "triton": triton, "eager": True}
        assert got == next(b for b in order if have[b]), (op, facts, got)


def test_cpu_tensors_ignore_the_cuda_order(present):
    present(cuda=True, triton=True)
    got = _backend.resolve_backend("auto", torch.device("cpu"), "singd_block_step",
                                   cuda_order("singd_block_step"))
    assert got in ("cpu", "eager")
