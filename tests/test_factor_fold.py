"""K-FAC folds a step's statistics into its stored dense factors while the capture forms them
(``KroneckerBlock.fold_decay``): ``decay F + (1 - decay) S`` comes out of the Gram kernels'
own ``decay * factor + alpha * X^T X`` instead of a separate ``lerp`` over every factor.

The oracle is the separate update (``fold_while_capturing = False``): the factors, and so the
steps, must agree to round-off on every layer type (the adapters that add statistics by hand
keep the separate update) and every way a step gathers its statistics (several forward calls,
several sampled backward passes, gradient accumulation)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kfac_kernels import KFAC

DT = torch.float64

pytestmark = pytest.mark.usefixtures("single_thread")


class Mixed(nn.Module):
    """Every adapter with a dense side: convolutions (a grouped one, one without bias),
    BatchNorm, attention, a LayerNorm, a linear layer called twice and a tied embedding head."""

    def __init__(self, v=7, d=8):
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        self.grouped = nn.Conv2d(4, 4, 3, padding=1, groups=2, bias=False)
        self.bn = nn.BatchNorm2d(4)
        self.proj = nn.Linear(16, d)
        self.emb = nn.Embedding(v, d)
        self.attn = nn.MultiheadAttention(d, 2, batch_first=True)
        self.norm = nn.LayerNorm(d)
        self.twice = nn.Linear(d, d)
        self.head = nn.Linear(d, v)
        self.head.weight = self.emb.weight

    def forward(self, image, tokens):
        h = torch.relu(self.bn(self.grouped(torch.relu(self.conv(image)))))
        h = self.proj(F.adaptive_avg_pool2d(h, 2).flatten(1))[:, None] + self.emb(tokens)
        h = h + self.attn(h, h, h, need_weights=False)[0]
        h = self.norm(h)
        h = torch.tanh(self.twice(torch.tanh(self.twice(h))))
        return self.head(h)


def _batch(seed):
    gen = torch.Generator().manual_seed(seed)
    image = torch.randn(6, 2, 4, 4, generator=gen, dtype=DT)
    tokens = torch.randint(0, 7, (6, 5), generator=gen)
    return image, tokens, torch.randint(0, 7, (6, 5), generator=gen)


def _loss(logits, y):
    return F.cross_entropy(logits.transpose(1, 2), y)


def _run(fold: bool, steps: int = 4, **options):
    torch.manual_seed(0)
    model = Mixed().to(DT)
    precond = KFAC(model, damping=0.1, factor_decay=0.8, inv_update_steps=1, **options)
    precond.fold_while_capturing = fold
    precond._arm_capture()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    accumulate = options.get("grad_accumulation_steps", 1)
    sampled = options.get("fisher_type", "empirical") != "empirical"
    for step in range(steps):
        opt.zero_grad()
        for micro in range(accumulate):
            image, tokens, y = _batch(10 * step + micro)
            logits = model(image, tokens)
            if sampled:
                precond.backward(logits.transpose(1, 2), y)
            else:
                (_loss(logits, y) / accumulate).backward()
        assert precond.step() is True
        opt.step()
    return model, precond


CASES = {
    "empirical": dict(),
    "mc-two-samples": dict(fisher_type="mc", mc_samples=2, loss_fn=nn.CrossEntropyLoss()),
    "accumulated": dict(grad_accumulation_steps=2),
    "block-diagonal": dict(structure="block-diagonal"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_folded_factors_equal_the_separate_update(case):
    options = CASES[case]
    model_f, folded = _run(True, **options)
    model_s, separate = _run(False, **options)
    assert folded.factors.keys() == separate.factors.keys()
    for name, (a, g) in separate.factors.items():
        fa, fg = folded.factors[name]
        for mine, ref, side in ((fa, a, "A"), (fg, g, "G")):
            for m, r in zip(mine if isinstance(mine, list) else [mine],
                            ref if isinstance(ref, list) else [ref]):
                torch.testing.assert_close(m, r, rtol=1e-12, atol=1e-14,
                                           msg=lambda msg: f"{side} of {name}: {msg}")
    for (name, p), q in zip(model_f.named_parameters(), model_s.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12, msg=lambda m: f"{name}: {m}")


def test_dense_layers_take_no_separate_update(monkeypatch):
    """After the first step, the factors of dense layers come out of the Gram kernels: no lerp
    over them. The sides accumulated by hand still take one: the tied embedding head's (token
    counts) and attention's G (three grouped outputs added group by group)."""
    calls = []
    lerp = torch._foreach_lerp_

    def counting(stored, new, weight):
        calls.append({id(t) for t in stored})
        return lerp(stored, new, weight)

    monkeypatch.setattr(torch, "_foreach_lerp_", counting)
    _, precond = _run(True, steps=3)
    blocks = precond.blocks
    by_hand = {id(t) for t in blocks["head"].A + blocks["head"].G + blocks["attn"].G}
    assert calls == [by_hand, by_hand]  # steps 2 and 3: the first takes its statistics as such
    assert all(b.fold_decay == 0.8 for b in blocks.values())


def test_folding_is_off_when_asked_and_in_distributed_runs():
    _, precond = _run(False, steps=1)
    assert all(b.fold_decay is None for b in precond.blocks.values())


def test_a_decay_changed_after_the_capture_applies_from_the_next_step():
    """A schedule that changes ``factor_decay`` between the backward pass and ``step()``: the
    step's statistics were folded with the decay in effect when they were captured; the update
    still uses the new one, as the separate update does."""
    results = []
    for fold in (True, False):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).to(DT)
        precond = KFAC(model, damping=0.1, factor_decay=0.9)
        precond.fold_while_capturing = fold
        precond._arm_capture()
        gen = torch.Generator().manual_seed(1)
        x1, x2 = torch.randn(2, 8, 5, generator=gen, dtype=DT)
        y = torch.randint(0, 3, (8,), generator=gen)
        F.cross_entropy(model(x1), y).backward()
        precond.step()
        a0 = precond.factors["0"][0][0].clone()
        model.zero_grad()
        F.cross_entropy(model(x2), y).backward()
        precond.factor_decay = 0.5
        precond.step()
        rows = torch.cat([x2, torch.ones(8, 1, dtype=DT)], 1)
        expected = 0.5 * a0 + 0.5 * rows.T @ rows / 8
        torch.testing.assert_close(precond.factors["0"][0][0], expected, rtol=1e-12, atol=1e-15)
        results.append(precond.factors)
        assert all(b.fold_decay == (0.5 if fold else None) for b in precond.blocks.values())
    for name, (a, g) in results[1].items():
        torch.testing.assert_close(results[0][name][0], a, rtol=1e-12, atol=1e-15)
        torch.testing.assert_close(results[0][name][1], g, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("fold", [True, False])
def test_a_nonfinite_step_leaves_the_folded_factors_as_they_were(fold):
    """Inputs of 1e25 overflow ``A`` of a convolution and a linear layer (1e50 > float32 max)
    while the gradients stay finite: the kernels read the stored factors without writing them,
    so the skipped update leaves them bit for bit."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.Flatten(), nn.Linear(12, 4))
    precond = KFAC(model, damping=0.1)
    precond.fold_while_capturing = fold
    precond._arm_capture()
    opt = torch.optim.SGD(model.parameters(), lr=1e-30)
    x, y = torch.randn(8, 2, 4, 4), torch.randint(0, 4, (8,))
    for inputs in (x, x):
        opt.zero_grad()
        F.cross_entropy(model(inputs), y).backward()
        precond.step()
    before = {n: (a.clone(), g.clone()) for n, (a, g) in precond.factors.items()}
    huge = x.clone()
    huge[:, 1] = 1e25
    opt.zero_grad()
    F.cross_entropy(model(huge), y).backward()
    with pytest.warns(RuntimeWarning, match="non-finite curvature for module '0'"):
        assert precond.step() is True
    for name, (a, g) in precond.factors.items():
        assert torch.equal(a, before[name][0]) and torch.equal(g, before[name][1]), name
