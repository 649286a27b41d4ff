"""AdaptiveKFAC against oracles: the quadratic model's coefficients against the exact dense GGN
(torch.func), the reduction ratio on an exactly quadratic objective, the Newton step on linear
least squares, and its argument checks."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.func import functional_call, hessian, jacrev

from kfac_kernels import AdaptiveKFAC

DT = torch.float64
pytestmark = pytest.mark.usefixtures("single_thread")


def _mlp(seed=0):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).to(DT)


def _dense_ggn(model, loss_fn, x, y) -> torch.Tensor:
    """``J^T H J`` over all parameters (flattened in ``model.parameters()`` order)."""
    names = [n for n, _ in model.named_parameters()]
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    shapes = [p.shape for p in model.parameters()]

    def out(theta):
        parts, at = {}, 0
        for n, s in zip(names, shapes):
            k = s.numel()
            parts[n] = theta[at:at + k].reshape(s)
            at += k
        return functional_call(model, parts, (x,)).reshape(-1)

    j = jacrev(out)(flat)
    o = out(flat).detach()
    h = hessian(lambda z: loss_fn(z.reshape(x.shape[0], -1), y))(o)
    return j.T @ h @ j


def _flat(tensors) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


def test_quadratic_model_coefficients_match_the_exact_ggn():
    model = _mlp()
    loss_fn = nn.CrossEntropyLoss()
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(12, 5, generator=gen, dtype=DT), torch.randint(0, 3, (12,), generator=gen)
    opt = AdaptiveKFAC(model, loss_fn, fisher_type="type-2", damping=1.0,
                       damping_adaptation_interval=1)
    closure = lambda: (model(x), y)  # noqa: E731
    opt.step(closure)
    delta_prev = _flat(opt.state[p]["delta"] for p in model.parameters())
    ggn = _dense_ggn(model, loss_fn, x, y)             # at the parameters of the second step
    opt.step(closure)
    last = {k: v.item() if k in ("alpha", "mu") else v for k, v in opt.last.items()}
    delta = _flat(opt.state[p]["delta"] for p in model.parameters())
    big_delta = (delta - last["mu"] * delta_prev) / last["alpha"]
    vectors = [big_delta, delta_prev]
    expected = torch.tensor([[float(u @ ggn @ v) for v in vectors] for u in vectors], dtype=DT)
    got = last["curvature"].to(DT)
    torch.testing.assert_close(got, expected, rtol=1e-8, atol=1e-12)
    assert abs(last["mu"]) > 0 and last["alpha"] > 0


def test_reduction_ratio_is_one_on_a_quadratic_objective():
    """A linear model with squared error (and L2 weight decay) is exactly quadratic and its GGN
    is its Hessian: the undamped model predicts the change of the objective exactly."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        model = nn.Linear(6, 2).to(DT)
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(20, 6, generator=gen, dtype=DT), torch.randn(20, 2, generator=gen,
                                                                       dtype=DT)
    opt = AdaptiveKFAC(model, nn.MSELoss(), fisher_type="empirical", damping=3.0,
                       damping_adaptation_interval=1, weight_decay=0.01)
    for _ in range(4):
        opt.step(lambda: (model(x), y))
        assert opt.last["rho"].item() == pytest.approx(1.0, abs=1e-9)
    # rho = 1 > 3/4 every time: the damping fell by omega = decay ** 1 per step
    assert opt.damping.item() == pytest.approx(3.0 * 0.9 ** 4)


def test_newton_step_on_linear_least_squares():
    """One linear layer with squared error: K-FAC (type-2, no moving average) is the exact
    GGN = Hessian, so with a negligible damping Delta is the Newton step, the model picks
    alpha = 1 and one step reaches the least-squares minimum."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(2)
        model = nn.Linear(4, 3).to(DT)
    gen = torch.Generator().manual_seed(2)
    x, y = torch.randn(30, 4, generator=gen, dtype=DT), torch.randn(30, 3, generator=gen,
                                                                       dtype=DT)
    opt = AdaptiveKFAC(model, nn.MSELoss(), fisher_type="type-2", damping=1e-10,
                       min_damping=1e-12, factor_decay=0.0)
    opt.step(lambda: (model(x), y))
    assert opt.last["alpha"].item() == pytest.approx(1.0, rel=1e-6)
    xb = torch.cat([x, torch.ones(30, 1, dtype=DT)], 1)
    solution = torch.linalg.lstsq(xb, y).solution.T
    torch.testing.assert_close(torch.cat([model.weight, model.bias[:, None]], 1).detach(),
                               solution, rtol=1e-6, atol=1e-8)


def test_block_diagonal_and_every_layer_kind_train():
    """BD-KFAC structure, MC Fisher, a convolution, batch norm, layer norm and a parameter no
    adapter covers: finite steps, the loss goes down, the BN statistics move once per step."""
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4)
            self.fc, self.ln = nn.Linear(4 * 16, 8), nn.LayerNorm(8)
            self.head = nn.Linear(8, 3)
            self.shift = nn.Parameter(torch.zeros(3))

        def forward(self, x):
            h = torch.relu(self.bn(self.conv(x))).flatten(1)
            return self.head(torch.tanh(self.ln(self.fc(h)))) + self.shift

    torch.manual_seed(3)
    model = Net().to(DT)
    gen = torch.Generator().manual_seed(3)
    x, y = torch.randn(16, 1, 4, 4, generator=gen, dtype=DT), torch.randint(0, 3, (16,),
                                                                              generator=gen)
    with pytest.warns(UserWarning, match="no Kronecker-factored curvature"):
        opt = AdaptiveKFAC(model, nn.CrossEntropyLoss(), structure="block-diagonal",
                           num_blocks=2, damping=1.0, generator=torch.Generator().manual_seed(0))
    batches = model.bn.num_batches_tracked.clone()
    losses = [float(opt.step(lambda: (model(x), y))) for _ in range(15)]
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < 0.5 * losses[0]
    assert int(model.bn.num_batches_tracked - batches) == 15
    assert float(model.shift.abs().sum()) > 0


class _ShiftedMLP(nn.Module):
    """An MLP plus a parameter no layer adapter covers."""

    def __init__(self):
        super().__init__()
        self.body = _mlp(4)
        self.shift = nn.Parameter(torch.zeros(3, dtype=DT))

    def forward(self, x):
        return self.body(x) + self.shift


def _three_steps(interval, gamma=None):
    """Three steps (the damping adapted on every one); ``gamma``: the preconditioner's damping
    forced before the third."""
    torch.manual_seed(4)
    model = _ShiftedMLP()
    gen = torch.Generator().manual_seed(4)
    x, y = torch.randn(24, 5, generator=gen, dtype=DT), torch.randint(0, 3, (24,), generator=gen)
    with pytest.warns(UserWarning, match="no Kronecker-factored curvature"):
        opt = AdaptiveKFAC(model, nn.CrossEntropyLoss(), fisher_type="type-2", damping=1.0,
                           damping_adaptation_interval=1, factor_damping_interval=interval)
    for i in range(3):
        if i == 2 and gamma is not None:
            opt.factor_damping = torch.tensor(gamma, dtype=torch.float64)
        opt.step(lambda: (model(x), y))
    return model, opt


def _damped_model_value(last) -> float:
    c = torch.stack([last["alpha"], last["mu"]])
    return float(0.5 * c @ (last["curvature"] + last["damping_terms"]) @ c + last["linear"] @ c)


def test_preconditioner_damping_is_the_greedy_choice_of_martens_grosse():
    """Every T_2 steps gamma becomes whichever of gamma omega_2^{-1, 0, 1} gives the lowest
    damped model value (Martens & Grosse (2015), Sec. 6.6), and that candidate's step is taken:
    checked against three runs that each keep one candidate fixed."""
    model, opt = _three_steps(interval=3)      # gamma re-chosen at the third step
    omega = (0.9 ** 0.5) ** 3                  # sqrt(decay) ** T_2
    runs = {g: _three_steps(interval=10 ** 6, gamma=g) for g in (omega, 1.0, 1.0 / omega)}
    values = {g: _damped_model_value(o.last) for g, (_, o) in runs.items()}
    assert len({round(v, 12) for v in values.values()}) == 3   # the candidates differ
    best = min(values, key=values.get)
    assert opt.factor_damping.item() == pytest.approx(best, rel=1e-12)
    assert _damped_model_value(opt.last) == pytest.approx(values[best], rel=1e-10)
    for got, want in zip(model.parameters(), runs[best][0].parameters()):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)
    # factor_damping_interval=None ties gamma to the adapted lambda
    _, tied = _three_steps(interval=None)
    assert tied.factor_damping is tied.damping and tied.damping.item() != 1.0


def test_a_non_finite_quadratic_model_takes_no_step_and_says_so(monkeypatch):
    """Curvature products that overflow (injected: NaN loss-Hessian products on the second
    step) leave the parameters where they are, and the next step's read warns, naming the
    step; the count survives a state_dict round trip."""
    import kfac_kernels.adaptive as adaptive
    model = _mlp(5)
    gen = torch.Generator().manual_seed(5)
    x, y = torch.randn(16, 5, generator=gen, dtype=DT), torch.randint(0, 3, (16,), generator=gen)
    opt = AdaptiveKFAC(model, nn.CrossEntropyLoss(), fisher_type="type-2")
    closure = lambda: (model(x), y)  # noqa: E731
    opt.step(closure)
    honest = adaptive._loss_hessian_products
    monkeypatch.setattr(adaptive, "_loss_hessian_products",
                        lambda *a: [torch.full_like(v, math.nan) for v in honest(*a)])
    before = [p.detach().clone() for p in model.parameters()]
    opt.step(closure)
    for p, b in zip(model.parameters(), before):
        assert torch.equal(p, b)
    monkeypatch.setattr(adaptive, "_loss_hessian_products", honest)
    with pytest.warns(RuntimeWarning, match="quadratic model of step 2 is not finite"):
        opt.step(closure)
    assert any(not torch.equal(p, b) for p, b in zip(model.parameters(), before))
    fresh = AdaptiveKFAC(_mlp(5), nn.CrossEntropyLoss(), fisher_type="type-2")
    fresh.load_state_dict(opt.state_dict())
    assert (fresh.model_skips.count, fresh.model_skips.first_step) == (1, 2)


def test_arguments_are_checked():
    model = _mlp()
    with pytest.raises(ValueError, match="damping"):
        AdaptiveKFAC(model, nn.CrossEntropyLoss(), damping=0.0)
    with pytest.raises(TypeError, match="lr"):
        AdaptiveKFAC(model, nn.CrossEntropyLoss(), lr=0.1)
    with pytest.raises(ValueError, match="damping_form"):
        AdaptiveKFAC(model, nn.CrossEntropyLoss(), damping_form="factored")
    for bad in (0, 2.5, True):
        with pytest.raises(ValueError, match="factor_damping_interval must be an int >= 1"):
            AdaptiveKFAC(model, nn.CrossEntropyLoss(), factor_damping_interval=bad)
    opt = AdaptiveKFAC(model, nn.CrossEntropyLoss())
    with pytest.raises(TypeError, match="closure"):
        opt.step(None)
