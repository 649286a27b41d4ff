"""SINGD's stacked path (kfac_kernels.singd.stacked): the dense factor updates and preconditioned
gradients of same-shape layers as one stack equal the one-layer-at-a-time path (fp64), and each
layer of a stack keeps its own checks: non-finite statistics, a non-finite factor update and a
non-finite direction each stop that layer alone, said once, naming it."""
import warnings

import pytest
import torch
from torch import nn

from kfac_kernels import SINGD
from kfac_kernels.singd import stacked

F64 = torch.float64
pytestmark = pytest.mark.usefixtures("single_thread")


def _deep_mlp(width=6, depth=4, seed=0):
    """``depth`` blocks of Linear(width, width) + BatchNorm1d + Tanh (two stacks: the Linear
    layers and the BatchNorm layers), then a Linear to 3 classes (alone)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        layers = []
        for _ in range(depth):
            layers += [nn.Linear(width, width), nn.BatchNorm1d(width), nn.Tanh()]
        return nn.Sequential(*layers, nn.Linear(width, 3)).to(F64)


def _batches(steps, batch, width=6, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, width, generator=gen, dtype=F64),
             torch.randint(0, 3, (batch,), generator=gen)) for _ in range(steps)]


def _train(stack, batches, inject=None, **kwargs):
    """Train a fresh deep MLP; ``inject(opt, step)`` runs after each backward pass. Returns the
    model, the optimizer, the warnings' messages and the sizes of the stacked factor updates."""
    model = _deep_mlp()
    opt = SINGD(model, stack_layers=stack, **kwargs)
    sizes = []
    original = stacked.update_factors

    def spy(blocks, *args):
        sizes.append(len(blocks))
        return original(blocks, *args)

    stacked.update_factors = spy
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for i, (x, y) in enumerate(batches):
                opt.zero_grad()
                nn.functional.cross_entropy(model(x), y).backward()
                if inject is not None:
                    inject(opt, i)
                opt.step()
    finally:
        stacked.update_factors = original
    return model, opt, [str(w.message) for w in caught], sizes


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach(), b.detach()
    return float(torch.linalg.norm(a - b) / torch.linalg.norm(b).clamp_min(1e-300))


def _assert_close(run_a, run_b, rtol=1e-12):
    """Norm-wise relative differences (a batched product may sum in another order than a
    single one: round-off of 1e-16, grown by the steps through 13 layers; an element near 0 may
    differ by more than its own 1e-12)."""
    (model_a, opt_a, *_), (model_b, opt_b, *_) = run_a, run_b
    for p, q in zip(model_a.parameters(), model_b.parameters()):
        assert _rel(p, q) <= rtol, _rel(p, q)
    assert opt_a.factors.keys() == opt_b.factors.keys()
    for name, factors in opt_a.factors.items():
        for key, mats in factors.items():
            for s, t in zip(mats, opt_b.factors[name][key]):
                assert _rel(s.to_dense(), t.to_dense()) <= rtol, (name, key)


SETTINGS = {
    "ingd": dict(lr=0.05, lr_cov=0.1, damping=0.01, alpha1=0.5),
    "ikfac": dict(lr=0.05, lr_cov=0.1, damping=0.01, kfac_like=True, alpha1=0.0),
}


@pytest.mark.parametrize("method", ["ingd", "ikfac"])
@pytest.mark.parametrize("T", [1, 3])
@pytest.mark.parametrize("batch", [16, 4], ids=["dense-U", "rows-U"])
@pytest.mark.parametrize("warm_start", [False, True])
def test_stacked_layers_match_one_layer_at_a_time(method, T, batch, warm_start):
    """Same parameters and factors (to round-off, fp64) with and without stacking, through factor
    updates and the steps between them; with 4 rows per step (fewer than the Linear layers' 7
    input coordinates) ``U`` is kept as its rows. The stacks ran: the 4 Linear layers and the 4
    BatchNorm layers, at every factor update."""
    batches = _batches(7, batch)
    settings = dict(SETTINGS[method], T=T, warm_start=warm_start)
    if warm_start:   # K K^T ~ (U + damping I)^-1 from the first step: damping 0.01 diverges
        settings.update(damping=0.1, lr=0.01)
    one = _train(False, batches, **settings)
    many = _train(True, batches, **settings)
    _assert_close(many, one)
    updates = len(range(0, 7, T))
    assert many[3] == [4, 4] * updates and one[3] == []


def _poison_statistics(name, at_step):
    def inject(opt, step):
        if step == at_step:
            opt.blocks[name].pending.g.fill_(float("nan"))
    return inject


def test_one_layer_with_non_finite_statistics_is_skipped_alone():
    """NaN in one layer's output-gradient statistics: its factor update is skipped (with the
    warning naming it), the other layers of its stack update; the same as one layer at a
    time."""
    batches = _batches(4, 16)
    inject = _poison_statistics("3", at_step=2)
    many = _train(True, batches, inject=inject, **SETTINGS["ingd"], T=1)
    one = _train(False, batches, inject=inject, **SETTINGS["ingd"], T=1)
    _assert_close(many, one)
    assert any("non-finite curvature for module '3'" in m for m in many[2]), many[2]
    assert many[3][4:6] == [3, 4]   # step 2: the Linear stack without layer '3'


def test_one_layer_with_a_non_finite_factor_update_keeps_its_factors(stored_health_path):
    """:func:`stacked._store` stores each layer's new factors where all of them are finite and
    keeps the old ones of a layer with an inf, whether the health is read on the host or the
    selection made on the device."""
    model = _deep_mlp()
    opt = SINGD(model, **SETTINGS["ingd"], T=1)
    names = ["0", "3", "6"]
    blocks = [opt.blocks[n] for n in names]
    old = {n: {k: s.data[0].clone() for k, (s,) in opt.blocks[n].factors().items()}
           for n in names}
    new = {k: torch.stack([old[n][k] for n in names]) + 1.0 for k in old["0"]}
    new["C"][1, 0, 0] = float("inf")        # layer '3'
    health = stacked._store(blocks, new)
    assert [bool(h.isfinite()) for h in health] == [True, False, True]
    for i, n in enumerate(names):
        for key, value in opt.blocks[n].factors().items():
            expected = old[n][key] if n == "3" else old[n][key] + 1.0
            assert torch.equal(value[0].data[0], expected), (n, key)


def test_one_layer_with_a_non_finite_direction_restarts_alone(stored_health_path):
    """Factors of one stacked layer set so large that its preconditioned gradient overflows: that
    layer takes no step and restarts (one warning naming it), the other layers train on; the
    same as one layer at a time, on the host-read and on the device path."""
    def inject(opt, step):
        if step == 2:   # replaced, as the optimizer does (the squares are kept by identity)
            factors = opt.blocks["6"].factors()["K"]
            factors[0] = type(factors[0])(factors[0].dim, (factors[0].data[0] * 1e200,), None)

    batches = _batches(5, 16)
    many = _train(True, batches, inject=inject, **SETTINGS["ingd"], T=2)
    one = _train(False, batches, inject=inject, **SETTINGS["ingd"], T=2)
    _assert_close(many, one)
    restarts = [m for m in many[2] if "preconditioned gradient of module" in m]
    assert len(restarts) == 1 and "'6'" in restarts[0], many[2]
    assert all(bool(p.isfinite().all()) for p in many[0].parameters())


def test_stack_layers_must_be_a_bool():
    with pytest.raises(TypeError, match=r"SINGD: stack_layers must be a bool, got 1"):
        SINGD(nn.Linear(3, 2), stack_layers=1)
