"""gradient_covariance (the G factor) against sums written out example by example, on every
backend (the triton and cuda ones on CUDA tensors too: ``gpu`` marker)."""
from __future__ import annotations

import importlib

import pytest
import torch

from _backend_cases import all_cases
from kfac_kernels import testing
from kfac_kernels.ops import gradient_covariance


def reference(grad, channel_dim, groups, mode, factor, decay, alpha):
    """Loops over examples and positions, in float64."""
    g = grad.double().movedim(channel_dim, -1)
    n, c = g.shape[0], g.shape[-1]
    g = g.reshape(n, -1, c)
    cg = c // groups
    out = []
    for k in range(groups):
        acc = torch.zeros(cg, cg, dtype=torch.float64)
        for i in range(n):
            block = g[i, :, k * cg:(k + 1) * cg]
            if mode == "reduce":
                v = block.sum(0)
                acc += torch.outer(v, v)
            else:
                for row in block:
                    acc += torch.outer(row, row)
        acc *= alpha
        if factor is not None:
            acc += decay * factor[k].double()
        out.append(acc)
    return torch.stack(out)


CASES = [
    # (shape, channel_dim, groups, channels_last)
    ((7, 5), -1, 1, False),
    ((3, 4, 6), -1, 2, False),
    ((2, 3, 2, 5), -1, 1, False),
    ((3, 6, 5, 7), 1, 1, False),
    ((3, 6, 5, 7), 1, 3, False),
    ((2, 4, 5, 3), 1, 4, True),
    ((2, 6, 9), 1, 2, False),  # conv1d output
]


@pytest.mark.parametrize("backend,device", all_cases())
@pytest.mark.parametrize("mode", ["expand", "reduce"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-dim{c[1]}-g{c[2]}"
                         f"{'-cl' if c[3] else ''}")
@pytest.mark.parametrize("with_factor", [False, True])
def test_matches_reference(backend, device, mode, dtype, case, with_factor):
    shape, channel_dim, groups, channels_last = case
    grad = torch.randn(shape, dtype=dtype)
    if channels_last:
        grad = grad.to(memory_format=torch.channels_last)
    cg = shape[channel_dim] // groups
    factor = None
    if with_factor:
        f = torch.randn(groups, cg, cg, dtype=dtype)
        factor = f + f.mT
    out = gradient_covariance(grad.to(device), channel_dim=channel_dim, groups=groups,
                              mode=mode, factor=None if factor is None else factor.to(device),
                              decay=0.7, alpha=0.3, backend=backend).cpu()
    expected = reference(grad, channel_dim, groups, mode, factor, 0.7, 0.3)
    assert out.dtype == dtype
    testing.assert_close_rel(out, expected.to(dtype), rtol=testing.RTOL[dtype] * 10
                             if dtype == torch.float32 else testing.RTOL[dtype])
    if backend != "eager":
        assert torch.equal(out, out.mT)


def test_low_precision_accumulates_in_fp32():
    grad = torch.randn(16, 8, dtype=torch.bfloat16)
    out = gradient_covariance(grad)
    assert out.dtype == torch.float32
    expected = reference(grad, -1, 1, "expand", None, 0.0, 1.0)
    # the only rounding is that of the bf16 inputs themselves: fp32 sums of their products
    testing.assert_close_rel(out, expected.float(), rtol=1e-6)


def test_unbatched_linear_gradient_is_one_example():
    grad = torch.randn(5, dtype=torch.float64)
    out = gradient_covariance(grad, backend="eager")
    torch.testing.assert_close(out[0], torch.outer(grad, grad))


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(mode="sum"), ValueError, "gradient_covariance: mode must be 'expand' or 'reduce'"),
    (dict(groups=0), ValueError, "gradient_covariance: groups must be a positive int"),
    (dict(groups=4), ValueError, "gradient_covariance: 6 channels are not divisible by groups=4"),
    (dict(channel_dim=0), ValueError, "gradient_covariance: channel_dim must not be the batch"),
])
def test_bad_arguments(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        gradient_covariance(torch.randn(3, 6), **kwargs)


def test_grad_must_be_a_tensor():
    with pytest.raises(TypeError, match="gradient_covariance: grad must be a torch.Tensor"):
        gradient_covariance([1.0, 2.0])


def test_features_last_rows_are_not_copied(monkeypatch):
    """For linear-layer gradients the rows reach the kernel as a view of the gradient."""
    module = importlib.import_module("kfac_kernels.ops.gradient_covariance")
    seen = {}
    real = module.symmetric_factor_update

    def spy(factor, rows, decay, alpha, *, backend="auto"):
        seen["ptr"] = rows.data_ptr()
        return real(factor, rows, decay, alpha, backend=backend)

    monkeypatch.setattr(module, "symmetric_factor_update", spy)
    grad = torch.randn(4, 3, 6)
    module.gradient_covariance(grad)
    assert seen["ptr"] == grad.data_ptr()
