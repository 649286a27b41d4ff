"""Generic behaviour of every optimizer and structure in the registry (tests/optimizer_registry.py):
a checkpoint resumes bit-identically, a non-finite step changes nothing (and is said), a
GradScaler overflow is skipped, hooks can be removed."""
from __future__ import annotations

import io
import warnings

import pytest
import torch
from torch import nn

from optimizer_registry import OPTIMIZERS  # tests/ is on sys.path under pytest

DT = torch.float64
pytestmark = pytest.mark.usefixtures("single_thread")


def _model(seed=0):
    """A conv (grouped), a BatchNorm, two Linear layers and a LayerNorm: every adapter kind the
    structures treat differently."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                             nn.Conv2d(4, 4, 3, stride=2, groups=2), nn.ReLU(), nn.Flatten(),
                             nn.Linear(4 * 3 * 3, 6), nn.LayerNorm(6), nn.Tanh(),
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


@pytest.mark.parametrize("info", OPTIMIZERS, ids=IDS)
def test_checkpoint_resumes_bit_identically(info):
    batches = _batches(7)
    model = _model()
    opt = info.build(model)
    _run(info, model, opt, batches)

    half = _model()
    opt_half = info.build(half)
    _run(info, half, opt_half, batches[:4])
    buf = io.BytesIO()
    torch.save({"model": half.state_dict(), "opt": opt_half.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=False)
    resumed = _model(seed=1)  # another initialisation: everything comes from the checkpoint
    resumed.load_state_dict(saved["model"])
    opt_resumed = info.build(resumed)
    opt_resumed.load_state_dict(saved["opt"])
    _run(info, resumed, opt_resumed, batches[4:])

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
    with pytest.warns(RuntimeWarning, match="the gradients of step 2 are not finite"):
        info.train_step(opt, model, x, y)
    hook.remove()
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
