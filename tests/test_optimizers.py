"""Generic behaviour of every optimizer and structure in the registry (tests/optimizer_registry.py):
a checkpoint resumes bit-identically, a non-finite step changes nothing (and is said), a
GradScaler overflow is skipped, hooks can be removed."""
from __future__ import annotations

import io
import math
import warnings

import pytest
import torch
from torch import nn

from kfac_kernels import AdaptiveKFAC

from optimizer_registry import OPTIMIZERS  # tests/ is on sys.path under pytest

DT = torch.float64
pytestmark = pytest.mark.usefixtures("single_thread")


def _model(seed=0):
    """A conv (grouped), a BatchNorm, Linear layers (two of the same shape: SINGD's dense
    factors of those go as one stack) and a LayerNorm: every adapter kind the structures treat
    differently."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                             nn.Conv2d(4, 4, 3, stride=2, groups=2), nn.ReLU(), nn.Flatten(),
                             nn.Linear(4 * 3 * 3, 6), nn.LayerNorm(6), nn.Tanh(),
                             nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 6), nn.Tanh(),
                             nn.Linear(6, 3)).to(DT)


def _batches(steps, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, 1, 8, 8, generator=gen, dtype=DT),
             torch.randint(0, 3, (8,), generator=gen)) for _ in range(steps)]


def _run(info, model, opt, batches):
    for x, y in batches:
        info.train_step(opt, model, x, y)


def _params(model):
    return [p.detach().clone() for p in model.parameters()]


def _flat_state(state):
    """Every tensor of a (nested) state dict with its path."""
    out = {}

    def walk(prefix, obj):
        if isinstance(obj, torch.Tensor):
            out[prefix] = obj
        elif isinstance(obj, dict):
            for k, v in obj.items():
                walk(f"{prefix}/{k}", v)
        elif isinstance(obj, (list, tuple)):
            for i, v in enumerate(obj):
                walk(f"{prefix}/{i}", v)
    walk("", state)
    return out


IDS = [info.name for info in OPTIMIZERS]


@pytest.mark.parametrize("split", [3, 4], ids=["mid-period", "on-period"])
@pytest.mark.parametrize("info", OPTIMIZERS, ids=IDS)
def test_checkpoint_resumes_bit_identically(info, split):
    """Saved after ``split`` steps (the inverses are refreshed every 2), loaded into a fresh
    model of another initialisation and a fresh optimizer, resumed: the parameters and every
    tensor of the optimizer's state equal the uninterrupted run's."""
    batches = _batches(7)
    model = _model()
    opt = info.build(model)
    _run(info, model, opt, batches)

    half = _model()
    opt_half = info.build(half)
    _run(info, half, opt_half, batches[:split])
    buf = io.BytesIO()
    torch.save({"model": half.state_dict(), "opt": opt_half.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=False)
    resumed = _model(seed=1)  # another initialisation: everything comes from the checkpoint
    resumed.load_state_dict(saved["model"])
    opt_resumed = info.build(resumed)
    opt_resumed.load_state_dict(saved["opt"])
    _run(info, resumed, opt_resumed, batches[split:])

    for p, q in zip(model.parameters(), resumed.parameters()):
        assert torch.equal(p, q)
    full, again = _flat_state(opt.state_dict()), _flat_state(opt_resumed.state_dict())
    assert full.keys() == again.keys()
    for key, value in full.items():
        assert torch.equal(value, again[key]), key


@pytest.mark.parametrize("info", OPTIMIZERS, ids=IDS)
def test_nonfinite_step_changes_nothing_and_is_said(info):
    model = _model()
    opt = info.build(model)
    batches = _batches(3)
    _run(info, model, opt, batches[:1])
    params, state = _params(model), {k: v.clone() for k, v in _flat_state(
        opt.state_dict()).items()}
    x, y = batches[1]
    # a NaN in one entry of a layer's gradient, whichever loop computes it
    hook = model[6].weight.register_hook(
        lambda g: g.index_put((torch.tensor([0]), torch.tensor([0])), torch.tensor(float("nan"),
                                                                                dtype=g.dtype)))
    with pytest.warns(RuntimeWarning, match="the gradients of step 2 are not finite") as rec:
        info.train_step(opt, model, x, y)
    hook.remove()
    # the advice fits the optimizer: an adaptive one has no learning rate to lower
    said = " ".join(str(w.message) for w in rec)
    adaptive = isinstance(opt, AdaptiveKFAC)
    assert ("raise the initial damping (damping=" in said) == adaptive
    assert ("lower the learning rate" in said) != adaptive
    for p, q in zip(model.parameters(), params):
        assert torch.equal(p, q)
    after = _flat_state(opt.state_dict())
    for key, value in state.items():
        if not key.endswith("generator"):  # the MC labels were drawn by the backward pass
            assert torch.equal(value, after[key]), key
    _run(info, model, opt, batches[2:])  # a finite step afterwards trains
    assert any(not torch.equal(p, q) for p, q in zip(model.parameters(), params))


@pytest.mark.parametrize("info", [i for i in OPTIMIZERS if i.grad_scaler and
                                  i.fisher == "empirical"],
                         ids=[i.name for i in OPTIMIZERS if i.grad_scaler and
                              i.fisher == "empirical"])
def test_grad_scaler_overflow_is_skipped_silently(info):
    """The classic AMP start: a scale so large that the first backward overflows. The scaler
    skips the step; nothing changes and nothing is warned (an overflow is expected)."""
    model = _model()
    opt = info.build(model)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 64)
    x, y = _batches(1)[0]
    params = _params(model)
    opt.zero_grad()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        # 1e300 * 2^64 overflows float64: every gradient is inf/NaN.
        scaler.scale(torch.nn.functional.cross_entropy(model(x), y) * 1e300).backward()
        scaler.step(opt)
    scaler.update()
    assert scaler.get_scale() < 2.0 ** 64
    for p, q in zip(model.parameters(), params):
        assert torch.equal(p, q)


@pytest.mark.parametrize("info", OPTIMIZERS, ids=IDS)
def test_removed_hooks_capture_nothing(info):
    model = _model()
    opt = info.build(model)
    precond = info.preconditioner(opt)
    precond.remove_hooks()
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


@pytest.mark.parametrize("info", OPTIMIZERS, ids=IDS)
def test_dropped_optimizer_stops_capturing_and_is_freed(info):
    """The hooks hold the capture, never the optimizer: dropping the optimizer frees it and its
    finaliser detaches every hook."""
    import gc
    import weakref

    model = _model()
    opt = info.build(model)
    _run(info, model, opt, _batches(3))
    ref = weakref.ref(info.preconditioner(opt))
    # Freed by reference counting alone, at once: no reference cycle through the optimizer
    # (a cycle would keep it capturing until the garbage collector happened to run).
    gc.disable()
    try:
        del opt
        assert ref() is None
    finally:
        gc.enable()
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


@pytest.mark.parametrize("info", OPTIMIZERS, ids=IDS)
def test_context_manager_detaches(info):
    model = _model()
    with info.build(model) as opt:
        _run(info, model, opt, _batches(1))
        assert any(m._forward_hooks for m in model.modules())
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def test_second_optimizer_on_a_model_is_said():
    from kfac_kernels import KFAC, SINGD

    model = _model()
    first = KFAC(model)
    with pytest.warns(UserWarning, match=r"SINGD: modules \[.*\] are already captured by a KFAC "
                                         r"created earlier on this model"):
        SINGD(model)
    first.remove_hooks()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        KFAC(model)  # the earlier ones: removed hooks, or dropped


@pytest.mark.parametrize("info", OPTIMIZERS, ids=IDS)
def test_one_host_read_per_step(info):
    """On a GPU a host read of a tensor waits for the device. A step reads one thing, whether
    its gradients are finite (to skip it, as GradScaler does); every other check stays on the
    device and is read together with the next step's. Counted on CPU tensors over 8 steps that
    include factor, decomposition and (for SINGD) preconditioner steps; nothing is made from
    host data either (a host-to-device copy)."""
    from _syncs import count_syncs
    model = _model()
    opt = info.build(model)
    batches = _batches(9)
    _run(info, model, opt, batches[:1])  # lazy state, warnings of the first step
    with count_syncs() as counts:
        _run(info, model, opt, batches[1:])
    reads = sum(n for (kind, _), n in counts.items() if kind not in ("tensor", "as_tensor"))
    made = {site: n for (kind, site), n in counts.items() if kind in ("tensor", "as_tensor")}
    assert reads <= 8, counts
    assert not made, made


def test_grad_scaler_scale_is_not_read_on_the_host():
    """The backward hooks divide the statistics by a GradScaler's scale on the device (a host
    read per layer would stall the backward pass on a GPU): no read, and the factors equal
    those of an unscaled run through growths of the scale (powers of two: exactly)."""
    from _syncs import count_syncs

    from kfac_kernels import KFAC, PreconditionedOptimizer

    def run(scaler, overflow_at=None):
        model = _model()
        precond = KFAC(model, damping=0.1, grad_scaler=scaler)
        opt = PreconditionedOptimizer(torch.optim.SGD(model.parameters(), lr=0.01), precond)
        scales = []
        with count_syncs() as counts:
            for i, (x, y) in enumerate(_batches(7)):
                opt.zero_grad()
                loss = torch.nn.functional.cross_entropy(model(x), y)
                if scaler is None:
                    loss.backward()
                    opt.step()
                    continue
                scaler.scale(loss * (math.inf if i == overflow_at else 1.0)).backward()
                scaler.step(opt)
                scaler.update()
                scales.append(scaler.get_scale())
        reads = {key: n for key, n in counts.items() if not key[1].startswith("_flags")}
        return precond, reads, scales

    growing = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10, growth_interval=2)
    scaled, reads, scales = run(growing)
    assert scales[-1] > scales[0] and not reads, (scales, reads)
    plain, _, _ = run(None)
    for name, block in plain.blocks.items():
        for p, q in zip(block.G, scaled.blocks[name].G):
            torch.testing.assert_close(q, p, rtol=1e-12, atol=0)
    # An overflow (skipped by the scaler, which then backs off): still no read.
    _, reads, scales = run(torch.amp.GradScaler("cpu", init_scale=2.0 ** 10), overflow_at=4)
    assert scales[4] < scales[3] and not reads, (scales, reads)
