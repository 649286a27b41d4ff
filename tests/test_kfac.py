"""Behaviour of the K-FAC preconditioner as an optimizer component (modelled on torch.optim's own
test suite): argument validation, skipped steps, frozen layers, parameter groups and KL-clipping,
in-place activations, shared modules, checkpointing, AMP loss scaling, NaN handling, the
damping forms against dense linear algebra, and an end-to-end comparison on digits."""
from __future__ import annotations

import copy
import math
import re
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import kfac_kernels
from kfac_kernels import KFAC, PreconditionedOptimizer

DT = torch.float64

pytestmark = pytest.mark.usefixtures("single_thread")


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------

def mlp(dims=(6, 5, 4), *, inplace=False, bias=True, dtype=DT, seed=0):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        layers = []
        for i in range(len(dims) - 1):
            layers.append(nn.Linear(dims[i], dims[i + 1], bias=bias))
            if i < len(dims) - 2:
                layers.append(nn.ReLU(inplace=inplace))
        return nn.Sequential(*layers).to(dtype)


def batch(n=16, d_in=6, classes=4, dtype=DT, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d_in, generator=gen, dtype=dtype)
    y = torch.randint(0, classes, (n,), generator=gen)
    return x, y


def clone_params(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def clone_factors(precond):
    return {n: (a.clone(), g.clone()) for n, (a, g) in precond.factors.items()}


def clone_preconditioners(precond):
    return {n: {k: v.clone() for k, v in d.items()} for n, d in precond.preconditioners.items()}


def assert_params_equal(model, ref):
    for n, p in model.named_parameters():
        assert torch.equal(p.detach(), ref[n]), f"parameter {n} changed"


def assert_factors_equal(precond, ref):
    assert set(precond.factors) == set(ref)
    for n, (a, g) in precond.factors.items():
        assert torch.equal(a, ref[n][0]), f"A of {n} changed"
        assert torch.equal(g, ref[n][1]), f"G of {n} changed"


def grad_matrix(layer):
    """``[dW | db]`` of a Linear/Conv layer as ``(d_out, D)``."""
    m = layer.weight.grad.reshape(layer.weight.shape[0], -1)
    if layer.bias is not None and layer.bias.requires_grad:
        m = torch.cat([m, layer.bias.grad.reshape(-1, 1)], dim=1)
    return m.clone()


def train_step(model, opt, precond, x, y, loss_fn=None):
    loss_fn = loss_fn or nn.CrossEntropyLoss()
    opt.zero_grad()
    loss = loss_fn(model(x), y)
    loss.backward()
    stepped = precond.step() if precond is not None else None
    opt.step()
    return loss.detach(), stepped


def no_forward_hooks(model):
    return all(len(m._forward_hooks) == 0 for m in model.modules())


# ---------------------------------------------------------------------------------------------
# 1. invalid arguments
# ---------------------------------------------------------------------------------------------

def _m():
    return mlp()


INVALID = [
    # (id, kwargs builder, exception, message (escaped, prefix match))
    ("model-not-module", lambda: dict(model=3), TypeError,
     "KFAC: model must be a torch.nn.Module, got int"),
    ("damping-zero", lambda: dict(damping=0), ValueError,
     "KFAC: damping must be a positive finite float, got 0"),
    ("damping-negative", lambda: dict(damping=-1), ValueError,
     "KFAC: damping must be a positive finite float, got -1"),
    ("damping-nan", lambda: dict(damping=float("nan")), ValueError,
     "KFAC: damping must be a positive finite float, got nan"),
    ("damping-inf", lambda: dict(damping=float("inf")), ValueError,
     "KFAC: damping must be a positive finite float, got inf"),
    ("damping-str", lambda: dict(damping="1"), ValueError,
     "KFAC: damping must be a positive finite float, got '1'"),
    ("damping-bool", lambda: dict(damping=True), ValueError,
     "KFAC: damping must be a positive finite float, got True"),
    ("factor_decay-one", lambda: dict(factor_decay=1.0), ValueError,
     "KFAC: factor_decay must be in [0, 1), got 1.0"),
    ("factor_decay-negative", lambda: dict(factor_decay=-0.1), ValueError,
     "KFAC: factor_decay must be in [0, 1), got -0.1"),
    ("factor_decay-nan", lambda: dict(factor_decay=float("nan")), ValueError,
     "KFAC: factor_decay must be in [0, 1), got nan"),
    ("factor_update_steps-zero", lambda: dict(factor_update_steps=0), ValueError,
     "KFAC: factor_update_steps must be an int >= 1, got 0"),
    ("factor_update_steps-float", lambda: dict(factor_update_steps=1.5), ValueError,
     "KFAC: factor_update_steps must be an int >= 1, got 1.5"),
    ("inv_update_steps-zero", lambda: dict(inv_update_steps=0), ValueError,
     "KFAC: inv_update_steps must be an int >= 1, got 0"),
    ("inv_update_steps-bool", lambda: dict(inv_update_steps=True), ValueError,
     "KFAC: inv_update_steps must be an int >= 1, got True"),
    ("kfac_approx", lambda: dict(kfac_approx="foo"), ValueError,
     "KFAC: kfac_approx must be 'expand' or 'reduce', got 'foo'"),
    ("fisher_type", lambda: dict(fisher_type="bar"), ValueError,
     "KFAC: fisher_type must be one of ('empirical', 'mc', 'type-2'), got 'bar'"),
    ("mc-without-loss_fn", lambda: dict(fisher_type="mc"), ValueError,
     "KFAC: fisher_type='mc' needs loss_fn"),
    ("type-2-without-loss_fn", lambda: dict(fisher_type="type-2"), ValueError,
     "KFAC: fisher_type='type-2' needs loss_fn"),
    ("loss_fn-unsupported", lambda: dict(loss_fn=nn.L1Loss()), TypeError,
     "KFAC: loss_fn must be an nn.CrossEntropyLoss, nn.MSELoss or nn.BCEWithLogitsLoss instance, "
     "got L1Loss"),
    ("loss_fn-reduction-none", lambda: dict(loss_fn=nn.CrossEntropyLoss(reduction="none")),
     ValueError, "KFAC: loss_fn.reduction must be 'mean' or 'sum', got 'none'"),
    ("loss_fn-sum-with-batch", lambda: dict(loss_fn=nn.MSELoss(reduction="sum")), ValueError,
     "KFAC: loss_fn has reduction='sum', so loss_average must be None, got 'batch'"),
    ("loss_fn-mean-with-none", lambda: dict(loss_fn=nn.MSELoss(), loss_average=None),
     ValueError, "KFAC: loss_fn has reduction='mean', so loss_average must be 'batch' or"),
    ("loss_fn-bce-pos_weight",
     lambda: dict(loss_fn=nn.BCEWithLogitsLoss(pos_weight=torch.ones(4, dtype=DT))), ValueError,
     "KFAC: nn.BCEWithLogitsLoss with weight or pos_weight is not supported"),
    ("loss_fn-class-weights",
     lambda: dict(loss_fn=nn.CrossEntropyLoss(weight=torch.ones(4, dtype=DT))), ValueError,
     "KFAC: nn.CrossEntropyLoss with class weights is not supported"),
    ("mc_samples-zero", lambda: dict(mc_samples=0), ValueError,
     "KFAC: mc_samples must be an int >= 1, got 0"),
    ("mc_samples-float", lambda: dict(mc_samples=2.0), ValueError,
     "KFAC: mc_samples must be an int >= 1, got 2.0"),
    ("loss_average", lambda: dict(loss_average="tokens"), ValueError,
     "KFAC: loss_average must be None, 'batch' or 'batch+sequence', got 'tokens'"),
    ("damping_form", lambda: dict(damping_form="x"), ValueError,
     "KFAC: damping_form must be 'exact' or 'factored', got 'x'"),
    ("compute_method", lambda: dict(compute_method="svd"), ValueError,
     "KFAC: compute_method must be one of ('eigen', 'inverse', 'cholesky'), got 'svd'"),
    ("inverse-with-exact", lambda: dict(compute_method="inverse", damping_form="exact"),
     ValueError, "KFAC: compute_method='inverse' needs damping_form='factored'"),
    ("kl_clip-negative", lambda: dict(kl_clip=-1), ValueError,
     "KFAC: kl_clip must be a positive finite float or None, got -1"),
    ("kl_clip-zero", lambda: dict(kl_clip=0.0), ValueError,
     "KFAC: kl_clip must be a positive finite float or None, got 0.0"),
    ("lr-negative", lambda: dict(lr=-1), ValueError,
     "KFAC: lr must be a non-negative finite float or None, got -1"),
    ("lr-nan", lambda: dict(lr=float("nan")), ValueError,
     "KFAC: lr must be a non-negative finite float or None, got nan"),
    ("skip_modules-int", lambda: dict(skip_modules=3), TypeError,
     "KFAC: skip_modules must be an iterable of module names (str, fnmatch patterns allowed) "
     "or nn.Module types, got int"),
    ("skip_modules-entry", lambda: dict(skip_modules=[3]), TypeError,
     "KFAC: skip_modules entries must be module names (str) or nn.Module types, got 3"),
    ("skip_modules-unknown-name", lambda: dict(skip_modules=["nonexistent"]), ValueError,
     "KFAC: skip_modules names 'nonexistent', which matches no module of the model"),
    ("skip_modules-not-module-type", lambda: dict(skip_modules=[int]), TypeError,
     "KFAC: skip_modules entries must be module names (str) or nn.Module types, got <class"),
    ("grad_scaler", lambda: dict(grad_scaler="x"), TypeError,
     "KFAC: grad_scaler must be a torch.amp.GradScaler or None, got str"),
    ("factor_dtype-int", lambda: dict(factor_dtype=torch.int32), ValueError,
     "KFAC: factor_dtype must be torch.float32, torch.float64 or None, got torch.int32"),
    ("factor_dtype-half", lambda: dict(factor_dtype=torch.float16), ValueError,
     "KFAC: factor_dtype must be torch.float32, torch.float64 or None, got torch.float16"),
    ("factor_dtype-str", lambda: dict(factor_dtype="float32"), ValueError,
     "KFAC: factor_dtype must be torch.float32, torch.float64 or None, got 'float32'"),
    ("backend", lambda: dict(backend="gpu"), ValueError,
     "KFAC: backend must be one of ('auto', 'eager', 'triton', 'cuda', 'cpu'), got 'gpu'"),
    ("generator", lambda: dict(generator=5), TypeError,
     "KFAC: generator must be a torch.Generator or None, got int"),
    ("no-supported-layers", lambda: dict(model=nn.Sequential(nn.ReLU())), ValueError,
     "KFAC: the model has no supported layers (nn.Linear, nn.Conv1d, nn.Conv2d, "
     "nn.LayerNorm, nn.BatchNorm1d, nn.BatchNorm2d, nn.Embedding, nn.MultiheadAttention) with "
     "trainable weights"),
    ("all-layers-frozen", lambda: dict(model=mlp().requires_grad_(False)), ValueError,
     "KFAC: the model has no supported layers"),
    ("all-layers-skipped", lambda: dict(skip_modules=[nn.Linear]), ValueError,
     "KFAC: the model has no supported layers"),
    ("distributed_strategy", lambda: dict(distributed_strategy="memopt"), ValueError,
     "KFAC: distributed_strategy must be 'comm-opt' or 'mem-opt', got 'memopt'"),
    ("grad_accumulation_steps", lambda: dict(grad_accumulation_steps=0), ValueError,
     "KFAC: grad_accumulation_steps must be"),
    ("distributed", lambda: dict(distributed="yes"), ValueError,
     "KFAC: distributed must be None (automatic), True or False, got 'yes'"),
]


@pytest.mark.parametrize("builder,exc,message", [c[1:] for c in INVALID],
                         ids=[c[0] for c in INVALID])
def test_invalid_constructor_arguments(builder, exc, message):
    kwargs = builder()
    model = kwargs.pop("model", None)
    if model is None:
        model = _m()
    with pytest.raises(exc, match=re.escape(message)):
        KFAC(model, **kwargs)
    if isinstance(model, nn.Module):  # a rejected configuration leaves no hooks behind
        assert no_forward_hooks(model)


def test_invalid_arguments_are_at_least_fifteen():
    assert len(INVALID) >= 15


def test_preconditioned_optimizer_rejects_wrong_types():
    model = _m()
    precond = KFAC(model)
    with pytest.raises(TypeError, match=re.escape(
            "PreconditionedOptimizer: optimizer must be a torch.optim.Optimizer, got Sequential")):
        PreconditionedOptimizer(model, precond)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(TypeError, match=re.escape(
            "PreconditionedOptimizer: preconditioner must be a kfac_kernels preconditioner "
            "(e.g. KFAC), got object")):
        PreconditionedOptimizer(opt, object())
    popt = PreconditionedOptimizer(opt, precond)
    with pytest.raises(RuntimeError, match=re.escape(
            "PreconditionedOptimizer: add parameter groups to the wrapped optimizer")):
        popt.add_param_group({"params": [nn.Parameter(torch.zeros(2))]})
    with pytest.raises(KeyError, match=re.escape(
            "PreconditionedOptimizer.load_state_dict: state_dict has no 'preconditioner' entry")):
        popt.load_state_dict({"optimizer": opt.state_dict()})


def test_kl_clip_without_learning_rate_raises_at_step():
    model = _m()
    precond = KFAC(model, kl_clip=1e-3)
    x, y = batch()
    nn.CrossEntropyLoss()(model(x), y).backward()
    with pytest.raises(RuntimeError, match=re.escape("KFAC: kl_clip needs a learning rate")):
        precond.step()


def test_backward_without_loss_fn_raises():
    model = _m()
    precond = KFAC(model)
    x, y = batch()
    with pytest.raises(RuntimeError, match=re.escape("KFAC.backward needs loss_fn")):
        precond.backward(model(x), y)


def test_valid_edge_values_are_accepted():
    model = _m()
    precond = KFAC(model, factor_decay=0.0, damping=1, lr=0, kl_clip=1, skip_modules="0",
                   factor_dtype=torch.float64, backend="eager", generator=torch.Generator())
    assert set(precond.adapters) == {"2"}
    KFAC(_m(), fisher_type="mc", loss_fn=nn.MSELoss(reduction="sum"), loss_average=None)
    assert set(KFAC(_m(), skip_modules=["[2]"]).adapters) == {"0"}  # fnmatch patterns


# ---------------------------------------------------------------------------------------------
# 2. steps with None gradients
# ---------------------------------------------------------------------------------------------

def test_none_grads_change_nothing(make_cnn, digits):
    model = make_cnn()
    precond = KFAC(model, damping=0.1)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    (x, y), (x2, y2) = digits.batches(16, 2)

    # Before any backward: a forward pass alone, then step.
    params0 = clone_params(model)
    model(x)
    with pytest.warns(RuntimeWarning, match=re.escape(
            "KFAC: step() found no gradients of the covered layers: call loss.backward()")):
        assert precond.step() is False
    opt.step()
    assert precond.steps == 0 and precond.factors == {} and precond.preconditioners == {}
    assert_params_equal(model, params0)

    # After a real step, a forward-only iteration with grads set to None changes nothing.
    train_step(model, opt, precond, x, y)
    assert precond.steps == 1
    params1, factors1 = clone_params(model), clone_factors(precond)
    precs1 = clone_preconditioners(precond)
    opt.zero_grad(set_to_none=True)
    model(x2)
    assert precond.step() is False
    opt.step()
    assert precond.steps == 1
    assert_params_equal(model, params1)
    assert_factors_equal(precond, factors1)
    for name, d in precs1.items():
        for k, v in d.items():
            assert torch.equal(precond.preconditioners[name][k], v)
    assert all(p.grad is None for p in model.parameters())

    # The curvature of the forward-only pass is dropped: the next step equals a run without it.
    ref_model = make_cnn()
    ref_precond = KFAC(ref_model, damping=0.1)
    ref_opt = torch.optim.SGD(ref_model.parameters(), lr=0.05, momentum=0.9)
    train_step(ref_model, ref_opt, ref_precond, x, y)
    train_step(ref_model, ref_opt, ref_precond, x, y)
    train_step(model, opt, precond, x, y)
    assert_factors_equal(precond, clone_factors(ref_precond))
    assert_params_equal(model, clone_params(ref_model))


class TwoHeads(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Linear(6, 5)
        self.head_a = nn.Linear(5, 4)
        self.head_b = nn.Linear(5, 4)

    def forward(self, x, head="a"):
        h = torch.tanh(self.body(x))
        return self.head_a(h) if head == "a" else self.head_b(h)


def test_eval_mode_steps_say_that_nothing_is_captured():
    """A model left in eval mode captures no curvature: the step says so (once) instead of
    returning True with the gradients silently unpreconditioned."""
    model = mlp()
    model.eval()
    precond = KFAC(model, damping=0.1)
    x, y = batch()
    with pytest.warns(RuntimeWarning, match=re.escape(
            "KFAC: step 1 should update the factors but no curvature was captured: the model is "
            "in evaluation mode (call model.train()")) as record:
        for _ in range(3):
            model.zero_grad()
            F.cross_entropy(model(x), y).backward()
            precond.step()
    assert sum("no curvature was captured" in str(w.message) for w in record) == 1
    assert precond.factors == {}


def test_layers_without_grads_are_left_alone():
    model = TwoHeads().double()
    precond = KFAC(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = batch()
    before = clone_params(model)
    opt.zero_grad()
    nn.CrossEntropyLoss()(model(x, "a"), y).backward()
    assert precond.step() is True
    opt.step()
    assert set(precond.factors) == {"body", "head_a"}
    assert model.head_b.weight.grad is None
    assert torch.equal(model.head_b.weight, before["head_b.weight"])
    assert not torch.equal(model.head_a.weight, before["head_a.weight"])


# ---------------------------------------------------------------------------------------------
# 3. frozen layers
# ---------------------------------------------------------------------------------------------

def test_frozen_layers_are_not_covered():
    model = mlp((6, 5, 4, 4))
    model[0].requires_grad_(False)
    precond = KFAC(model, damping=0.1)
    assert set(precond.adapters) == {"2", "4"}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1,
                          momentum=0.9)
    before = clone_params(model)
    for s in range(3):
        x, y = batch(seed=s)
        train_step(model, opt, precond, x, y)
    assert set(precond.factors) == {"2", "4"}
    assert torch.equal(model[0].weight, before["0.weight"])
    assert torch.equal(model[0].bias, before["0.bias"])
    assert not torch.equal(model[2].weight, before["2.weight"])


def test_frozen_bias_has_no_bias_coordinate():
    model = mlp((6, 5, 4))
    model[0].bias.requires_grad_(False)
    precond = KFAC(model, damping=0.1, factor_decay=0.5)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    x, y = batch(n=12)
    before = clone_params(model)
    train_step(model, opt, precond, x, y)
    a0, g0 = precond.factors["0"]
    assert a0.shape == (1, 6, 6), "a frozen bias must not add a coordinate to A"
    assert g0.shape == (1, 5, 5)
    assert torch.allclose(a0[0], x.T @ x / x.shape[0], rtol=1e-12, atol=1e-14)
    assert precond.factors["2"][0].shape == (1, 6, 6)  # 5 inputs + trainable bias
    assert torch.equal(model[0].bias, before["0.bias"])
    assert model[0].bias.grad is None
    assert not torch.equal(model[0].weight, before["0.weight"])


def test_layer_frozen_after_construction_stays_fixed():
    model = mlp((6, 5, 4))
    precond = KFAC(model, damping=0.1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = batch()
    train_step(model, opt, precond, x, y)
    model[2].requires_grad_(False)
    opt.zero_grad(set_to_none=True)
    frozen = clone_params(model)
    for s in range(2):
        x, y = batch(seed=s + 1)
        train_step(model, opt, precond, x, y)
    assert torch.equal(model[2].weight, frozen["2.weight"])
    assert torch.equal(model[2].bias, frozen["2.bias"])
    assert not torch.equal(model[0].weight, frozen["0.weight"])


# ---------------------------------------------------------------------------------------------
# 4. parameter groups and KL-clipping
# ---------------------------------------------------------------------------------------------

LRS = (0.1, 0.01)


def two_group_sgd(model, momentum=0.0):
    return torch.optim.SGD([{"params": model[0].parameters(), "lr": LRS[0]},
                            {"params": model[2].parameters(), "lr": LRS[1]}],
                           lr=1.0, momentum=momentum)


def test_param_groups_with_kl_clip_train(make_cnn, digits):
    model = make_cnn()
    groups = [{"params": list(model[0].parameters()) + list(model[2].parameters()), "lr": 0.05},
              {"params": list(model[6].parameters()) + list(model[8].parameters()), "lr": 0.01}]
    popt = PreconditionedOptimizer(torch.optim.SGD(groups, lr=1.0, momentum=0.9),
                                   KFAC(model, damping=0.1, kl_clip=1e-3))
    # Schedulers act on the shared param_groups.
    sched = torch.optim.lr_scheduler.StepLR(popt, step_size=8, gamma=0.5)
    before = clone_params(model)
    losses = []
    for x, y in digits.batches(32, 8):
        popt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        popt.step()
        sched.step()
        losses.append(float(loss.detach()))
    assert all(math.isfinite(v) for v in losses)
    for n, p in model.named_parameters():
        assert not torch.equal(p, before[n]), f"{n} did not change"
    assert popt.preconditioner.steps == 8
    assert popt.optimizer.param_groups[0]["lr"] == 0.025
    assert popt.optimizer.param_groups[1]["lr"] == 0.005


def _unclipped_and_raw(model, x, y):
    """Raw gradient matrices and the unclipped preconditioned ones, for a twin of ``model``."""
    twin = copy.deepcopy(model)
    precond = KFAC(twin, damping=0.05)
    F.cross_entropy(twin(x), y).backward()
    raw = {n: grad_matrix(twin[int(n)]) for n in ("0", "2")}
    assert precond.step() is True
    pre = {n: grad_matrix(twin[int(n)]) for n in ("0", "2")}
    return raw, pre


@pytest.mark.parametrize("ratio", [1e-2, 1e-6, None])
def test_kl_clip_factor_uses_lr_per_group(ratio):
    """nu = min(1, sqrt(kl_clip / sum_l lr_l^2 |<V_l, M_l>|)) (Tselepidis et al. (2020), Eq. 10),
    with each layer's lr taken from its parameter group; the SGD update is -lr_l * nu * V_l."""
    model = mlp((6, 5, 4))
    x, y = batch(n=20)
    raw, pre = _unclipped_and_raw(model, x, y)
    lrs = {"0": LRS[0], "2": LRS[1]}
    total = sum(lrs[n] ** 2 * abs(float((pre[n] * raw[n]).sum())) for n in pre)
    assert total > 0
    kl_clip = 1e3 * total if ratio is None else ratio * total
    nu = min(1.0, math.sqrt(kl_clip / total))
    if ratio is not None:
        assert nu == pytest.approx(math.sqrt(ratio), rel=1e-12)
    else:
        assert nu == 1.0

    before = clone_params(model)
    popt = PreconditionedOptimizer(two_group_sgd(model),
                                   KFAC(model, damping=0.05, kl_clip=kl_clip))
    popt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    popt.step()
    for n in ("0", "2"):
        layer = model[int(n)]
        delta_w = layer.weight.detach() - before[f"{n}.weight"]
        delta_b = layer.bias.detach() - before[f"{n}.bias"]
        delta = torch.cat([delta_w, delta_b[:, None]], dim=1)
        expected = -lrs[n] * nu * pre[n]
        torch.testing.assert_close(delta, expected, rtol=1e-9, atol=1e-14)
    # The update's norm shrank by exactly nu compared with the unclipped update.
    if ratio is not None:
        for n in ("0", "2"):
            assert float(torch.linalg.norm(-lrs[n] * nu * pre[n])) < float(
                torch.linalg.norm(lrs[n] * pre[n]))


def test_kl_clip_with_constructor_and_step_lr():
    model = mlp((6, 5, 4))
    x, y = batch(n=20)
    raw, pre = _unclipped_and_raw(model, x, y)
    lr = 0.1
    total = sum(lr ** 2 * abs(float((pre[n] * raw[n]).sum())) for n in pre)
    for how in ("constructor", "step"):
        twin = copy.deepcopy(model)
        precond = KFAC(twin, damping=0.05, kl_clip=1e-4 * total,
                       lr=lr if how == "constructor" else None)
        F.cross_entropy(twin(x), y).backward()
        precond.step(**({} if how == "constructor" else {"lr": lr}))
        for n in ("0", "2"):
            torch.testing.assert_close(grad_matrix(twin[int(n)]), 1e-2 * pre[n], rtol=1e-9,
                                       atol=1e-14)


# ---------------------------------------------------------------------------------------------
# 5. in-place ReLU
# ---------------------------------------------------------------------------------------------

def test_inplace_relu_gives_the_same_factors(make_cnn, digits):
    runs = {}
    for inplace in (False, True):
        model = make_cnn(seed=3, inplace=inplace)
        precond = KFAC(model, damping=0.1, inv_update_steps=1)
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        for x, y in digits.batches(32, 3):
            train_step(model, opt, precond, x, y)
        runs[inplace] = (model, precond)
    (m0, p0), (m1, p1) = runs[False], runs[True]
    assert set(p1.factors) == {"0", "2", "6", "8"}
    for name in p0.factors:
        for f0, f1 in zip(p0.factors[name], p1.factors[name]):
            torch.testing.assert_close(f1, f0, rtol=1e-6, atol=1e-6)
    for (n, a), (_, b) in zip(m0.named_parameters(), m1.named_parameters()):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-6)


def test_inplace_relu_g_is_the_preactivation_gradient():
    """G of the first layer equals N * sum g g^T with g = dL/d(pre-activation) computed by hand
    (the ReLU that follows runs in place)."""
    model = mlp((6, 5, 4), inplace=True)
    precond = KFAC(model, damping=0.1)
    x, y = batch(n=10)
    F.cross_entropy(model(x), y).backward()
    precond.step()
    # Independent computation on an out-of-place copy.
    w0, b0 = model[0].weight.detach(), model[0].bias.detach()
    w2, b2 = model[2].weight.detach(), model[2].bias.detach()
    z = (x @ w0.T + b0).requires_grad_(True)
    out = torch.relu(z) @ w2.T + b2
    (g,) = torch.autograd.grad(F.cross_entropy(out, y), z)
    torch.testing.assert_close(precond.factors["0"][1][0], x.shape[0] * g.T @ g, rtol=1e-12,
                               atol=1e-15)


# ---------------------------------------------------------------------------------------------
# 6. a module called twice in one forward
# ---------------------------------------------------------------------------------------------

class SharedTwice(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(5, 5)
        self.head = nn.Linear(5, 3)

    def forward(self, x):
        h = torch.tanh(self.lin(x))
        h = torch.tanh(self.lin(h))
        return self.head(h)


def test_module_called_twice_counts_as_more_examples():
    model = SharedTwice().double()
    precond = KFAC(model, damping=0.1, factor_decay=0.9)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(8, 5, dtype=DT)
    y = torch.randint(0, 3, (8,))
    n = x.shape[0]

    # Record both calls' inputs and output gradients with our own hooks.
    inputs, outputs = [], []

    def hook(module, args, out):
        inputs.append(args[0].detach())
        out.retain_grad()
        outputs.append(out)

    handle = model.lin.register_forward_hook(hook)
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    handle.remove()
    assert len(inputs) == 2
    assert precond.step() is True
    opt.step()

    a, g = precond.factors["lin"]
    ones = torch.ones(n, 1, dtype=DT)
    rows = torch.cat([torch.cat([inputs[0], ones], 1), torch.cat([inputs[1], ones], 1)], 0)
    a_expected = rows.T @ rows / (2 * n)
    g_expected = n * sum(o.grad.T @ o.grad for o in outputs)
    torch.testing.assert_close(a[0], a_expected, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(g[0], g_expected, rtol=1e-12, atol=1e-15)
    # The head (called once) sees one row per example.
    h = torch.tanh(outputs[1]).detach()
    rows_h = torch.cat([h, ones], 1)
    torch.testing.assert_close(precond.factors["head"][0][0], rows_h.T @ rows_h / n,
                               rtol=1e-12, atol=1e-15)
    # Further steps keep working.
    for s in range(3):
        train_step(model, opt, precond, torch.randn(8, 5, dtype=DT), torch.randint(0, 3, (8,)))
    assert precond.steps == 4


# ---------------------------------------------------------------------------------------------
# 7. checkpointing: save -> load -> continue equals the uninterrupted run
# ---------------------------------------------------------------------------------------------

# (Resuming from a checkpoint bit-identically: tests/test_optimizers.py, for every optimizer.)


def test_state_dict_contents_and_roundtrip():
    model = mlp()
    precond = KFAC(model, fisher_type="mc", loss_fn=nn.CrossEntropyLoss(),
                   generator=torch.Generator().manual_seed(3))
    x, y = batch()
    precond.backward(model(x), y)
    precond.step()
    sd = precond.state_dict()
    assert set(sd) >= {"steps", "factors", "preconditioners", "generator"}
    assert sd["steps"] == 1
    assert set(sd["factors"]) == {"0", "2"}
    other = KFAC(mlp(seed=1), fisher_type="mc", loss_fn=nn.CrossEntropyLoss(),
                 generator=torch.Generator().manual_seed(4))
    other.load_state_dict(copy.deepcopy(sd))
    assert other.steps == 1
    assert torch.equal(other.generator.get_state(), precond.generator.get_state())
    for n in sd["factors"]:
        assert torch.equal(other.factors[n][0], precond.factors[n][0])
        # load copies: later changes of the source do not leak in
        assert other.factors[n][0].data_ptr() != precond.factors[n][0].data_ptr()


def _trained_precond(seed=0):
    model = mlp(seed=seed)
    precond = KFAC(model, inv_update_steps=3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for s in range(2):
        x, y = batch(seed=s)
        train_step(model, opt, precond, x, y)
    return model, precond


def _assert_load_fails(precond, sd, exc, message):
    steps, factors = precond.steps, clone_factors(precond)
    with pytest.raises(exc, match=re.escape(message)):
        precond.load_state_dict(sd)
    # A failed load leaves the preconditioner as it was.
    assert precond.steps == steps
    assert_factors_equal(precond, factors)


@pytest.mark.parametrize("key", ["steps", "factors", "preconditioners"])
def test_load_state_dict_missing_key(key):
    _, src = _trained_precond()
    _, dst = _trained_precond(seed=1)
    sd = copy.deepcopy(src.state_dict())
    del sd[key]
    _assert_load_fails(dst, sd, KeyError, f"KFAC.load_state_dict: state_dict has no {key!r} entry")


@pytest.mark.parametrize("section", ["factors", "preconditioners"])
def test_load_state_dict_unknown_module(section):
    _, src = _trained_precond()
    _, dst = _trained_precond(seed=1)
    sd = copy.deepcopy(src.state_dict())
    sd[section]["nope"] = sd[section]["0"]
    _assert_load_fails(dst, sd, ValueError,
                       f"KFAC.load_state_dict: state_dict has {section} for module 'nope', "
                       "which this preconditioner does not cover")


def test_load_state_dict_wrong_factor_shapes():
    _, src = _trained_precond()
    _, dst = _trained_precond(seed=1)
    sd = copy.deepcopy(src.state_dict())
    sd["factors"]["0"]["A"] = torch.zeros(1, 3, 3, dtype=DT)
    _assert_load_fails(dst, sd, ValueError,
                       "KFAC.load_state_dict: factor 'A' of module '0' has part shapes "
                       "[(1, 3, 3)]; expected [(1, 7, 7)] (saved with another structure, "
                       "num_blocks or block_size?)")
    # A state from a differently-sized model is rejected as well.
    bigger = KFAC(mlp((6, 7, 4)))
    with pytest.raises(ValueError, match=re.escape(
            "KFAC.load_state_dict: factor 'G' of module '0'")):
        bigger.load_state_dict(copy.deepcopy(src.state_dict()))


def test_load_state_dict_wrong_preconditioner_shapes():
    """Corrupt preconditioner tensors must be rejected when loading: eigenvalues of shape (1, 1)
    instead of (1, 7) would otherwise broadcast silently into a wrong preconditioned gradient
    at the next step (mid-period, so the loaded decomposition is used)."""
    _, src = _trained_precond()
    _, dst = _trained_precond(seed=1)
    sd = copy.deepcopy(src.state_dict())
    sd["preconditioners"]["0"]["eigvals_A"] = sd["preconditioners"]["0"]["eigvals_A"][:, :1]
    with pytest.raises(ValueError, match=re.escape("KFAC.load_state_dict")):
        dst.load_state_dict(sd)


def test_load_state_dict_from_another_compute_method():
    """A checkpoint of an eigen-form preconditioner loaded into an inverse-form one: either the
    load says so, or the next step works (e.g. by recomputing from the factors) -- not a bare
    KeyError from inside step()."""
    _, src = _trained_precond()
    model = mlp(seed=1)
    dst = KFAC(model, damping_form="factored", compute_method="inverse", inv_update_steps=3)
    try:
        dst.load_state_dict(copy.deepcopy(src.state_dict()))
    except ValueError as err:
        assert "KFAC.load_state_dict" in str(err)
        return
    x, y = batch(seed=5)
    F.cross_entropy(model(x), y).backward()
    assert dst.step() is True
    assert torch.isfinite(model[0].weight.grad).all()


# ---------------------------------------------------------------------------------------------
# 8. GradScaler
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("wrapped", [False, True], ids=["separate", "wrapped"])
def test_grad_scaler_inf_step_changes_nothing(make_cnn, digits, wrapped):
    model = make_cnn()
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    precond = KFAC(model, damping=0.1, grad_scaler=scaler, inv_update_steps=1)
    base = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    opt = PreconditionedOptimizer(base, precond) if wrapped else base
    batches = digits.batches(16, 4)

    def step(x, y, blow_up=1.0):
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        scaler.scale(loss * blow_up).backward()
        scaler.unscale_(opt)
        stepped = None if wrapped else precond.step()
        scaler.step(opt)
        scaler.update()
        return stepped

    assert step(*batches[0]) in (True, None)
    assert precond.steps == 1
    params, factors = clone_params(model), clone_factors(precond)
    precs = clone_preconditioners(precond)
    momenta = {n: base.state[p]["momentum_buffer"].clone() for n, p in model.named_parameters()}
    scale = scaler.get_scale()

    # 1e36 * 1024 overflows float32: every gradient is inf/NaN.
    stepped = step(*batches[1], blow_up=1e36)
    if not wrapped:
        assert stepped is False
    assert scaler.get_scale() == scale * 0.5, "the scaler did not see the overflow"
    assert precond.steps == 1
    assert_params_equal(model, params)
    assert_factors_equal(precond, factors)
    for name, d in precs.items():
        for k, v in d.items():
            assert torch.equal(precond.preconditioners[name][k], v)
    for n, p in model.named_parameters():
        assert torch.equal(base.state[p]["momentum_buffer"], momenta[n])

    # A normal step afterwards works, and its factors do not contain the skipped batch.
    assert step(*batches[2]) in (True, None)
    assert precond.steps == 2
    for n, p in model.named_parameters():
        assert not torch.equal(p.detach(), params[n])
    ref = make_cnn()
    ref_pre = KFAC(ref, damping=0.1, inv_update_steps=1)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.05, momentum=0.9)
    train_step(ref, ref_opt, ref_pre, *batches[0])
    train_step(ref, ref_opt, ref_pre, *batches[2])
    for name in ref_pre.factors:
        for f, r in zip(precond.factors[name], ref_pre.factors[name]):
            torch.testing.assert_close(f, r, rtol=1e-4, atol=1e-6)


def test_grad_scaler_huge_initial_scale_is_skipped(make_cnn, digits):
    """The classic AMP start: a scale so large that the first backward overflows."""
    model = make_cnn()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 127)
    precond = KFAC(model, grad_scaler=scaler)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    params = clone_params(model)
    (x, y), = digits.batches(16, 1)
    opt.zero_grad()
    scaler.scale(F.cross_entropy(model(x), y) * 16).backward()
    scaler.unscale_(opt)
    assert precond.step() is False
    scaler.step(opt)
    scaler.update()
    assert precond.steps == 0 and precond.factors == {}
    assert_params_equal(model, params)


def test_grad_scaler_g_equals_unscaled_g(make_cnn, digits):
    factors = {}
    for use_scaler in (False, True):
        model = make_cnn()
        scaler = torch.amp.GradScaler("cpu", init_scale=1024.0) if use_scaler else None
        precond = KFAC(model, damping=0.1, grad_scaler=scaler)
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        (x, y), = digits.batches(32, 1)
        loss = F.cross_entropy(model(x), y)
        if use_scaler:
            scaler.scale(loss).backward()
            scaler.unscale_(opt)
            assert precond.step() is True
            scaler.step(opt)
            scaler.update()
        else:
            loss.backward()
            precond.step()
            opt.step()
        factors[use_scaler] = clone_factors(precond)
    for name in factors[False]:
        for f_ref, f_scaled in zip(factors[False][name], factors[True][name]):
            torch.testing.assert_close(f_scaled, f_ref, rtol=1e-5, atol=1e-8)


# ---------------------------------------------------------------------------------------------
# 9. NaN / inf
# ---------------------------------------------------------------------------------------------

def test_nan_in_activations_skips_the_step(make_cnn, digits):
    model = make_cnn()
    precond = KFAC(model, damping=0.1)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    (x, y), (x2, y2) = digits.batches(16, 2)
    train_step(model, opt, precond, x, y)
    factors = clone_factors(precond)
    bad = x2.clone()
    bad[3, 0, 4, 4] = float("nan")
    opt.zero_grad()
    F.cross_entropy(model(bad), y2).backward()
    assert not torch.isfinite(model[0].weight.grad).all()
    raw = {n: p.grad.clone() for n, p in model.named_parameters()}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert precond.step() is False
    assert precond.steps == 1
    assert_factors_equal(precond, factors)
    for n, p in model.named_parameters():  # gradients are left for the caller to inspect
        torch.testing.assert_close(p.grad, raw[n], rtol=0, atol=0, equal_nan=True)
    # The NaN batch does not leak into the next update.
    opt.zero_grad()
    train_step(model, opt, precond, x2, y2)
    for name, (a, g) in precond.factors.items():
        assert torch.isfinite(a).all() and torch.isfinite(g).all()


@pytest.mark.parametrize("loss_fn", [nn.CrossEntropyLoss(), nn.BCEWithLogitsLoss()],
                         ids=["cross-entropy", "bce"])
def test_nan_outputs_with_sampled_fisher_skip_the_step(loss_fn):
    """A diverged model's NaN outputs under the Monte-Carlo Fisher: the sampler does not raise
    (torch.multinomial / torch.bernoulli reject NaN probabilities); the step is skipped by the
    finiteness check, as with the empirical Fisher, and the factors keep the earlier batch."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 4))
    precond = KFAC(model, damping=0.1, fisher_type="mc", loss_fn=loss_fn,
                   generator=torch.Generator().manual_seed(0))
    x, y = batch(dtype=torch.float32)
    target = F.one_hot(y, 4).float() if isinstance(loss_fn, nn.BCEWithLogitsLoss) else y
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    opt.zero_grad()
    precond.backward(model(x), target)
    assert precond.step() is True
    factors = clone_factors(precond)
    bad = x.clone()
    bad[1, 2] = float("nan")
    opt.zero_grad()
    loss = precond.backward(model(bad), target)
    assert not torch.isfinite(loss)
    assert precond.step() is False
    assert_factors_equal(precond, factors)


def test_nonfinite_curvature_with_finite_grads_warns_once_and_keeps_factors():
    """Inputs of 1e25 overflow A (1e50 > float32 max) while the gradients (g * 1e25 / N) stay
    finite: the factor update is skipped with one RuntimeWarning, the step still happens."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(6, 4))
    precond = KFAC(model, damping=0.1, inv_update_steps=1)
    opt = torch.optim.SGD(model.parameters(), lr=1e-30)
    x, y = batch(dtype=torch.float32)
    train_step(model, opt, precond, x, y)
    factors, precs = clone_factors(precond), clone_preconditioners(precond)

    huge = x.clone()
    huge[:, 2] = 1e25
    with pytest.warns(RuntimeWarning, match=re.escape(
            "KFAC: non-finite curvature for module '0'")) as record:
        for _ in range(2):
            opt.zero_grad()
            F.cross_entropy(model(huge), y).backward()
            assert torch.isfinite(model[0].weight.grad).all()
            assert precond.step() is True
            assert torch.isfinite(model[0].weight.grad).all()
    assert sum(issubclass(w.category, RuntimeWarning) for w in record) == 1
    assert precond.steps == 3
    assert_factors_equal(precond, factors)
    for k, v in precs["0"].items():
        assert torch.equal(precond.preconditioners["0"][k], v)


def test_nonfinite_loaded_factors_keep_previous_preconditioner():
    model, precond = _trained_precond()
    precs = clone_preconditioners(precond)
    sd = copy.deepcopy(precond.state_dict())
    sd["factors"]["0"]["A"][0, 0, 0] = float("nan")
    sd["steps"] = 3  # the next step refreshes the preconditioners
    precond.load_state_dict(sd)
    precond.factor_update_steps = 1000  # and does not update factors
    x, y = batch(seed=9)
    F.cross_entropy(model(x), y).backward()
    # The decomposition's check stays on the device: the previous one is kept at once, and
    # the warning comes with the next step's one host read.
    assert precond.step() is True
    for k, v in precs["0"].items():
        assert torch.equal(precond.preconditioners["0"][k], v)
    assert torch.isfinite(model[0].weight.grad).all()
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()
    with pytest.warns(RuntimeWarning, match=re.escape(
            "KFAC: the factors of module '0' are not finite; keeping its previous "
            "preconditioner")):
        assert precond.step() is True


def test_eigh_failure_is_retried_in_float64(monkeypatch):
    model = mlp((6, 5, 4), dtype=torch.float32)
    precond = KFAC(model, damping=0.1, eigh_backend="eager")
    x, y = batch(dtype=torch.float32)
    real_eigh = torch.linalg.eigh
    calls = []

    def flaky_eigh(t, *args, **kwargs):
        calls.append(t.dtype)
        if t.dtype == torch.float32:
            raise torch.linalg.LinAlgError("simulated failure to converge")
        return real_eigh(t, *args, **kwargs)

    twin = copy.deepcopy(model)
    twin_precond = KFAC(twin, damping=0.1, eigh_backend="eager")
    monkeypatch.setattr(torch.linalg, "eigh", flaky_eigh)
    F.cross_entropy(model(x), y).backward()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert precond.step() is True
    assert torch.float64 in calls
    for d in precond.preconditioners.values():
        for t in d.values():
            assert t.dtype == torch.float32 and torch.isfinite(t).all()
    monkeypatch.setattr(torch.linalg, "eigh", real_eigh)
    # The same preconditioned gradient as without the failure (up to float32 round-off).
    F.cross_entropy(twin(x), y).backward()
    twin_precond.step()
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6)


def test_eigh_failure_everywhere_warns_and_leaves_gradient(monkeypatch):
    model = mlp((6, 5, 4), dtype=torch.float32)
    precond = KFAC(model, damping=0.1, eigh_backend="eager")
    x, y = batch(dtype=torch.float32)

    def broken_eigh(t, *args, **kwargs):
        raise torch.linalg.LinAlgError("simulated failure")

    monkeypatch.setattr(torch.linalg, "eigh", broken_eigh)
    F.cross_entropy(model(x), y).backward()
    raw = {n: p.grad.clone() for n, p in model.named_parameters()}
    with pytest.warns(RuntimeWarning, match=re.escape(
            "KFAC: could not decompose the factors of module")):
        precond.step()
    assert precond.preconditioners == {}
    for n, p in model.named_parameters():  # no preconditioner yet: the gradient is unchanged
        assert torch.equal(p.grad, raw[n])


# ---------------------------------------------------------------------------------------------
# 10. MC and type-2 Fisher
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("fisher_type", ["mc", "type-2"])
def test_fisher_types_train_with_precond_backward(make_cnn, digits, fisher_type):
    model = make_cnn()
    precond = KFAC(model, damping=0.1, fisher_type=fisher_type, loss_fn=nn.CrossEntropyLoss(),
                   mc_samples=2, generator=torch.Generator().manual_seed(0))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    before = clone_params(model)
    for x, y in digits.batches(16, 3):
        opt.zero_grad()
        out = model(x)
        loss = precond.backward(out, y)
        torch.testing.assert_close(loss, F.cross_entropy(out, y))
        assert precond.step() is True
        opt.step()
    assert set(precond.factors) == {"0", "2", "6", "8"}
    for n, p in model.named_parameters():
        assert torch.isfinite(p).all()
        assert not torch.equal(p, before[n])


def test_backward_gradients_are_those_of_the_loss():
    """The extra curvature passes of precond.backward do not leak into .grad."""
    model = mlp()
    twin = copy.deepcopy(model)
    precond = KFAC(model, fisher_type="type-2", loss_fn=nn.CrossEntropyLoss())
    x, y = batch()
    precond.backward(model(x), y)
    F.cross_entropy(twin(x), y).backward()
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-12, atol=1e-15)


def test_mc_with_plain_backward_raises():
    model = mlp()
    precond = KFAC(model, fisher_type="mc", loss_fn=nn.CrossEntropyLoss())
    x, y = batch()
    F.cross_entropy(model(x), y).backward()
    with pytest.raises(RuntimeError, match=re.escape(
            "`loss = precond.backward(outputs, targets)`")):
        precond.step()
    assert precond.steps == 0 and precond.factors == {}


def test_mc_generator_makes_runs_reproducible():
    results = []
    for i in range(2):
        model = mlp()
        precond = KFAC(model, fisher_type="mc", loss_fn=nn.CrossEntropyLoss(),
                       generator=torch.Generator().manual_seed(11))
        x, y = batch()
        torch.manual_seed(100 + i)  # the global RNG must not matter
        precond.backward(model(x), y)
        precond.step()
        results.append(clone_factors(precond))
    for name in results[0]:
        assert torch.equal(results[0][name][1], results[1][name][1])


@pytest.mark.parametrize("fisher_type", ["empirical", "type-2"])
@pytest.mark.parametrize("loss", ["cross_entropy", "mse_mean", "mse_sum"])
def test_factors_agree_with_kronecker_factors(fisher_type, loss):
    """The optimizer's first factors are the batch factors of ``kronecker_factors`` for the same
    loss: one scale convention whatever the Fisher type (a mean-reduced MSELoss over d_out
    outputs is accepted with loss_average='batch', so its curvature scale must follow)."""
    model = mlp((5, 4, 3))
    x, _ = batch(n=8, d_in=5)
    if loss == "cross_entropy":
        loss_fn, y, loss_average = nn.CrossEntropyLoss(), torch.randint(0, 3, (8,)), "batch"
    else:
        y = torch.randn(8, 3, dtype=DT)
        loss_fn = nn.MSELoss(reduction="mean" if loss == "mse_mean" else "sum")
        loss_average = "batch" if loss == "mse_mean" else None
    expected = kfac_kernels.kronecker_factors(model, loss_fn, x, y, fisher_type=fisher_type,
                                              loss_average=loss_average)
    precond = KFAC(model, fisher_type=fisher_type, loss_fn=loss_fn, loss_average=loss_average)
    precond.backward(model(x), y)
    precond.step()
    for name, (a, g) in expected.items():
        torch.testing.assert_close(precond.factors[name][0][0], a, rtol=1e-12, atol=1e-15)
        torch.testing.assert_close(precond.factors[name][1][0], g, rtol=1e-12, atol=1e-15,
                                   msg=lambda m: f"G of {name}: {m}")


# ---------------------------------------------------------------------------------------------
# 11. damping forms and compute methods
# ---------------------------------------------------------------------------------------------

DAMPING_CONFIGS = [("exact", "eigen"), ("factored", "eigen"), ("factored", "inverse")]


@pytest.mark.parametrize("damping_form,compute_method", DAMPING_CONFIGS)
@pytest.mark.parametrize("kfac_approx", ["expand", "reduce"])
def test_every_damping_form_gives_a_finite_step(make_cnn, digits, damping_form, compute_method,
                                                kfac_approx):
    model = make_cnn()
    precond = KFAC(model, damping=0.1, damping_form=damping_form, compute_method=compute_method,
                   kfac_approx=kfac_approx, inv_update_steps=2)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    before = clone_params(model)
    for x, y in digits.batches(16, 3):
        loss, stepped = train_step(model, opt, precond, x, y)
        assert stepped is True and math.isfinite(float(loss))
    for n, p in model.named_parameters():
        assert torch.isfinite(p).all() and not torch.equal(p, before[n])
    assert set(precond.preconditioners) == {"0", "2", "6", "8"}


def _dense_exact(a, g, m, damping):
    """(kron(G, A) + damping I)^{-1} vec(M), row-major vec."""
    k = torch.kron(g, a)
    eye = torch.eye(k.shape[0], dtype=k.dtype)
    return torch.linalg.solve(k + damping * eye, m.reshape(-1)).reshape(m.shape)


def _dense_factored(a, g, m, damping):
    pi = math.sqrt((float(torch.trace(a)) / a.shape[0]) / (float(torch.trace(g)) / g.shape[0]))
    root = math.sqrt(damping)
    ga = torch.linalg.solve(g + root / pi * torch.eye(g.shape[0], dtype=g.dtype), m)
    return torch.linalg.solve(a + pi * root * torch.eye(a.shape[0], dtype=a.dtype), ga.T).T


@pytest.mark.parametrize("damping_form,compute_method", DAMPING_CONFIGS)
@pytest.mark.parametrize("damping", [1e-3, 0.5])
def test_linear_preconditioning_equals_dense_solve(damping_form, compute_method, damping):
    model = nn.Sequential(nn.Linear(5, 4)).to(DT)
    precond = KFAC(model, damping=damping, damping_form=damping_form,
                   compute_method=compute_method, factor_decay=0.7)
    x, y = batch(n=32, d_in=5)
    F.cross_entropy(model(x), y).backward()
    m = grad_matrix(model[0])
    assert precond.step() is True
    a, g = (f[0] for f in precond.factors["0"])
    # First update: the batch factors themselves (factor_decay plays no role).
    rows = torch.cat([x, torch.ones(32, 1, dtype=DT)], 1)
    torch.testing.assert_close(a, rows.T @ rows / 32, rtol=1e-12, atol=1e-15)
    expected = (_dense_exact if damping_form == "exact" else _dense_factored)(a, g, m, damping)
    got = grad_matrix(model[0])
    err = float(torch.linalg.norm(got - expected) / torch.linalg.norm(expected))
    assert err <= 1e-10, f"relative error {err:.3e}"


@pytest.mark.parametrize("damping_form,compute_method", DAMPING_CONFIGS)
def test_grouped_conv_preconditioning_equals_dense_solve_per_group(damping_form, compute_method):
    model = nn.Sequential(nn.Conv2d(4, 6, 3, padding=1, groups=2), nn.Flatten(),
                          nn.Linear(6 * 5 * 5, 3)).to(DT)
    precond = KFAC(model, damping=0.05, damping_form=damping_form,
                   compute_method=compute_method)
    x = torch.randn(10, 4, 5, 5, dtype=DT)
    y = torch.randint(0, 3, (10,))
    F.cross_entropy(model(x), y).backward()
    conv = model[0]
    m = torch.cat([conv.weight.grad.reshape(6, -1), conv.bias.grad[:, None]], 1).clone()
    precond.step()
    got = torch.cat([conv.weight.grad.reshape(6, -1), conv.bias.grad[:, None]], 1)
    a, g = precond.factors["0"]
    assert a.shape == (2, 2 * 9 + 1, 2 * 9 + 1) and g.shape == (2, 3, 3)
    dense = _dense_exact if damping_form == "exact" else _dense_factored
    for i in range(2):
        rows = slice(3 * i, 3 * (i + 1))
        expected = dense(a[i], g[i], m[rows], 0.05)
        err = float(torch.linalg.norm(got[rows] - expected) / torch.linalg.norm(expected))
        assert err <= 1e-10, f"group {i}: relative error {err:.3e}"


def test_inv_update_steps_reuses_the_decomposition():
    model = mlp()
    precond = KFAC(model, damping=0.1, inv_update_steps=3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    seen = []
    for s in range(4):
        x, y = batch(seed=s)
        train_step(model, opt, precond, x, y)
        seen.append(precond.preconditioners["0"]["eigvecs_A"].clone())
    assert torch.equal(seen[0], seen[1]) and torch.equal(seen[1], seen[2])
    assert not torch.equal(seen[2], seen[3])


@pytest.mark.parametrize("factor_steps,expected", [(1, [0, 1, 2, 3, 4, 6, 9]),
                                                    (2, [0, 2, 4, 6, 9])])
def test_inv_warmup_steps_decompose_at_every_factor_update_first(factor_steps, expected):
    """inv_warmup_steps=5 with inv_update_steps=3: a new decomposition at every factor update
    of steps 0-4, then at every third step only (with factors every second step, step 3's
    decomposition is of step 2's factors: the same as before)."""
    model = mlp()
    precond = KFAC(model, damping=0.1, inv_update_steps=3, inv_warmup_steps=5,
                   factor_update_steps=factor_steps)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    seen, new = None, []
    for s in range(10):
        x, y = batch(seed=s)
        train_step(model, opt, precond, x, y)
        now = precond.preconditioners["0"]["eigvecs_A"].clone()
        if seen is None or not torch.equal(seen, now):
            new.append(s)
        seen = now
    assert new == expected


def test_factor_update_steps_and_decay():
    model = mlp()
    precond = KFAC(model, damping=0.1, factor_update_steps=2, factor_decay=0.75)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)  # keep the weights fixed
    batches = [batch(seed=s) for s in range(3)]
    for x, y in batches:
        train_step(model, opt, precond, x, y)

    def batch_a(x):
        rows = torch.cat([x, torch.ones(x.shape[0], 1, dtype=DT)], 1)
        return rows.T @ rows / x.shape[0]

    # Updates at steps 0 and 2 only: A = 0.75 * A_0 + 0.25 * A_2.
    expected = 0.75 * batch_a(batches[0][0]) + 0.25 * batch_a(batches[2][0])
    torch.testing.assert_close(precond.factors["0"][0][0], expected, rtol=1e-12, atol=1e-15)


def test_eval_forward_does_not_leak_into_factors():
    model = mlp()
    precond = KFAC(model)
    x, y = batch()
    model.eval()
    model(torch.randn(16, 6, dtype=DT) * 10)  # gradients enabled, but evaluation mode
    model.train()
    F.cross_entropy(model(x), y).backward()
    precond.step()
    rows = torch.cat([x, torch.ones(16, 1, dtype=DT)], 1)
    torch.testing.assert_close(precond.factors["0"][0][0], rows.T @ rows / 16, rtol=1e-12,
                               atol=1e-15)


def test_remove_hooks_detaches_everything():
    model = mlp()
    precond = KFAC(model)
    assert not no_forward_hooks(model)
    precond.remove_hooks()
    assert no_forward_hooks(model)


# ---------------------------------------------------------------------------------------------
# 12. K-FAC beats its base optimizer on digits
# ---------------------------------------------------------------------------------------------

_SGD_LOSS: dict[int, float] = {}


def _sgd_digits(make_cnn, digits, seed):
    if seed not in _SGD_LOSS:
        _SGD_LOSS[seed] = _train_digits(make_cnn, digits, seed, False)
    return _SGD_LOSS[seed]


def _train_digits(make_cnn, digits, seed, use_kfac, steps=150, lr=0.01, **kfac_kw):
    torch.manual_seed(seed)
    model = make_cnn(seed=seed)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    if use_kfac:
        opt = PreconditionedOptimizer(opt, KFAC(model, **kfac_kw))
    for x, y in digits.batches(64, steps, seed=seed):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    with torch.no_grad():
        return float(F.cross_entropy(model(digits.x_train), digits.y_train))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_kfac_beats_sgd_on_digits(make_cnn, digits, seed):
    sgd = _sgd_digits(make_cnn, digits, seed)
    kfac = _train_digits(make_cnn, digits, seed, True, damping=0.1)
    assert math.isfinite(kfac)
    assert kfac < sgd, f"seed {seed}: K-FAC train loss {kfac:.4g} >= SGD {sgd:.4g}"


def test_kfac_with_kl_clip_beats_sgd_on_digits(make_cnn, digits):
    sgd = _sgd_digits(make_cnn, digits, 0)
    kfac = _train_digits(make_cnn, digits, 0, True, damping=0.1, kl_clip=1e-3)
    assert kfac < sgd, f"K-FAC+KL-clip train loss {kfac:.4g} >= SGD {sgd:.4g}"


# ---------------------------------------------------------------------------------------------
# 13. unsupported layers
# ---------------------------------------------------------------------------------------------

class Scale(nn.Module):
    """A module with a parameter of its own and no Kronecker factors."""

    def __init__(self, n):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(n, dtype=DT))

    def forward(self, x):
        return x * self.scale


def _with_unsupported():
    return nn.Sequential(nn.Linear(4, 5), Scale(5), nn.Linear(5, 3), nn.PReLU(3, init=0.5),
                         Scale(3)).to(DT)


def test_unsupported_layers_warn_once_naming_them():
    model = _with_unsupported()
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        precond = KFAC(model)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        for s in range(2):
            x = torch.randn(8, 4, dtype=DT)
            y = torch.randint(0, 3, (8,))
            train_step(model, opt, precond, x, y)
    messages = [str(w.message) for w in record]
    assert len(messages) == 1, messages
    assert messages[0] == (
        "KFAC: no Kronecker-factored curvature for 2 Scale (1, 4), 1 PReLU (3): their gradients "
        "are used unchanged. Pass skip_modules=[Scale, nn.PReLU] (or their names) to silence "
        "this warning.")
    assert set(precond.adapters) == {"0", "2"}


def test_model_with_parameters_of_its_own_is_named_not_rooted():
    """The root module with a parameter of its own is named as the model, never '<root>';
    containers without parameters of their own are not listed."""
    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Linear(4, 3))
            self.temperature = nn.Parameter(torch.ones(()))

        def forward(self, x):
            return self.body(x) / self.temperature

    with pytest.warns(UserWarning, match=re.escape(
            "KFAC: no Kronecker-factored curvature for 1 Model (the model itself): their "
            "gradients are used unchanged. Pass skip_modules=[Model]")):
        KFAC(Model())


def test_norm_layers_are_preconditioned():
    """Affine LayerNorm / BatchNorm layers get Kronecker factors (a 2 x 2 A over [a_hat, 1]) in
    every method, with no warning."""
    model = nn.Sequential(nn.Linear(4, 5), nn.LayerNorm(5), nn.Linear(5, 3),
                          nn.BatchNorm1d(3)).to(DT)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        precond = KFAC(model)
    assert set(precond.adapters) == {"0", "1", "2", "3"}
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    train_step(model, opt, precond, torch.randn(8, 4, dtype=DT), torch.randint(0, 3, (8,)))
    a, g = precond.factors["1"]
    assert a.shape == (1, 2, 2) and g.shape == (1, 5, 5)


@pytest.mark.parametrize("skip", [[Scale, nn.PReLU], ["1", "3", "4"], (Scale, "3")])
def test_skip_modules_silences_the_warning(skip):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        precond = KFAC(_with_unsupported(), skip_modules=skip)
    assert set(precond.adapters) == {"0", "2"}


def test_skip_modules_partial_and_supported():
    with pytest.warns(UserWarning, match=re.escape(
            "KFAC: no Kronecker-factored curvature for 1 PReLU (3):")):
        KFAC(_with_unsupported(), skip_modules=[Scale])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        precond = KFAC(_with_unsupported(), skip_modules=["0"])
    assert set(precond.adapters) == {"2"}
