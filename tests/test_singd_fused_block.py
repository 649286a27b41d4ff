"""SINGD with block-diagonal factors: fused=True (all layers' factor updates in one
singd_block_factor_update call, each layer's parameter step in one singd_block_step pass)
against the readable path on a small CNN (a convolution, two
Linear layers, a LayerNorm; blocks of 4 with smaller last blocks and layers narrower than one
block)."""
import pytest
import torch
from torch import nn

from kfac_kernels import SINGD
from kfac_kernels.singd import fused as fused_module
from kfac_kernels.testing import backends_for


def _model(dtype):
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.ReLU(), nn.Flatten(),
                         nn.Linear(3 * 5 * 5, 10), nn.LayerNorm(10), nn.Linear(10, 3)).to(dtype)


def _final(dtype, fused, backend="auto", **kwargs):
    gen = torch.Generator().manual_seed(0)
    model = _model(dtype)
    opt = SINGD(model, lr=0.05, lr_cov=0.05, T=2, structures="block-diagonal", block_size=4,
                weight_decay=1e-3, damping=1e-2, fused=fused,
                backend=backend if fused else "auto", **kwargs)
    for _ in range(5):
        x = torch.randn(8, 1, 5, 5, generator=gen).to(dtype)
        y = torch.randint(0, 3, (8,), generator=gen)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x).float(), y).backward()
        opt.step()
    return torch.cat([p.detach().double().flatten() for p in model.parameters()])


def _rel(a, b):
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("backend", backends_for("cpu"))
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
@pytest.mark.parametrize("kfac_like", [False, True])
def test_fused_block_path_matches_reference_path(backend, dtype, tol, kfac_like, monkeypatch):
    calls, steps = [], []
    real, real_step = fused_module.singd_block_factor_update, fused_module.singd_block_step
    monkeypatch.setattr(fused_module, "singd_block_factor_update",
                        lambda *a, **kw: calls.append(1) or real(*a, **kw))
    monkeypatch.setattr(fused_module, "singd_block_step",
                        lambda *a, **kw: steps.append(1) or real_step(*a, **kw))
    kw = dict(kfac_like=kfac_like, alpha1=0.0 if kfac_like else 0.5)
    ref = _final(dtype, False, **kw)
    assert not calls
    got = _final(dtype, True, backend, **kw)
    assert len(calls) == 3   # steps 0, 2, 4 with T=2: one call each for all layers
    assert len(steps) == 5 * 4   # every step, one pass per layer (conv, LayerNorm, 2 Linear)
    assert _rel(got, ref) < tol
    init = torch.cat([p.detach().double().flatten() for p in _model(dtype).parameters()])
    assert _rel(got, init) > 1e-3


@pytest.mark.parametrize("backend", [b for b in backends_for("cpu") if b != "triton"])
def test_fused_block_path_in_bf16_is_within_twice_the_reference_error(backend):
    """bf16 parameters and factors: both paths judged against an fp64 run."""
    exact = _final(torch.float64, False)
    ref_err = _rel(_final(torch.bfloat16, False), exact)
    got_err = _rel(_final(torch.bfloat16, True, backend), exact)
    assert got_err <= 2 * ref_err + 1e-6
