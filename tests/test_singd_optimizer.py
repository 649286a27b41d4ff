"""SINGD optimizer: Fig. 4 re-implemented from the paper's equations (fp64), Theorem 1,
scale invariance (App. F), resume, AMP skipping and argument checks."""
import math
import warnings

import pytest
import torch
from torch import nn

from kfac_kernels import SINGD
from kfac_kernels.singd.optimizer import factor_update, precondition
from kfac_kernels.singd.structures import STRUCTURES

F64 = torch.float64


# --- Fig. 3 / 4 from the paper, dense matrices, one Linear layer -------------------------------
def paper_singd(w0, b0, batches, *, lr, momentum, damping, alpha1, weight_decay, T, lr_cov,
                kfac_like, project):
    """The update of Fig. 4 (``kfac_like``: Fig. 3 / Eq. 10) written from the paper, for
    ``y = x W^T + b`` with a batch-mean cross-entropy loss. ``project`` is Pi of Table 1 on
    dense matrices (identity for INGD)."""
    w, b = w0.clone(), b0.clone()
    d_o, d_i = w.shape[0], w.shape[1] + 1
    K, C = torch.eye(d_i, dtype=F64), torch.eye(d_o, dtype=F64)
    mK, mC = torch.zeros(d_i, d_i, dtype=F64), torch.zeros(d_o, d_o, dtype=F64)
    buf_w, buf_b = torch.zeros_like(w), torch.zeros_like(b)
    for t, (x, target) in enumerate(batches):
        n = x.shape[0]
        wv, bv = w.clone().requires_grad_(), b.clone().requires_grad_()
        y = x @ wv.T + bv
        y.retain_grad()
        loss = nn.functional.cross_entropy(y, target)
        loss.backward()
        grad = torch.cat([wv.grad, bv.grad[:, None]], dim=1)   # vec^{-1}(g), d_o x d_i
        if t % T == 0:
            a = torch.cat([x, torch.ones(n, 1, dtype=F64)], dim=1)
            U = a.T @ a / n                                       # E[a a^T]
            g = y.grad * n                                        # per-example output grads
            G = g.T @ g / n                                       # E[g g^T]
            HK, HC = project(K.T @ U @ K), project(C.T @ G @ C)
            if kfac_like:
                newK = project(d_o * HK + damping * d_o * K.T @ K - d_o * torch.eye(d_i, dtype=F64)) / (2 * d_o)
                newC = project(d_i * HC + damping * d_i * C.T @ C - d_i * torch.eye(d_o, dtype=F64)) / (2 * d_i)
            else:
                c2 = damping * torch.trace(C.T @ C)
                k2 = damping * torch.trace(K.T @ K)
                newK = alpha1 * mK + project(torch.trace(HC) * HK + c2 * K.T @ K
                                             - d_o * torch.eye(d_i, dtype=F64)) / (2 * d_o)
                newC = alpha1 * mC + project(torch.trace(HK) * HC + k2 * C.T @ C
                                             - d_i * torch.eye(d_o, dtype=F64)) / (2 * d_i)
            mK, mC = newK, newC
            K = K @ (torch.eye(d_i, dtype=F64) - lr_cov * mK)
            C = C @ (torch.eye(d_o, dtype=F64) - lr_cov * mC)
        step = C @ C.T @ grad @ K @ K.T
        buf_w = momentum * buf_w + step[:, :-1] + weight_decay * w
        buf_b = momentum * buf_b + step[:, -1] + weight_decay * b
        w = w - lr * buf_w
        b = b - lr * buf_b
    return w, b, K, C


def _diag_projection(m):
    return torch.diag(torch.diagonal(m))


def _batches(n_steps, n=16, d_in=5, classes=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, d_in, dtype=F64, generator=gen),
             torch.randint(0, classes, (n,), generator=gen)) for _ in range(n_steps)]


@pytest.mark.parametrize("variant", ["ingd", "ikfac", "singd-diagonal", "singd-diagonal-fused"])
def test_matches_fig4_written_from_the_paper(variant):
    torch.manual_seed(0)
    layer = nn.Linear(5, 3).double()
    w0, b0 = layer.weight.detach().clone(), layer.bias.detach().clone()
    hp = dict(lr=0.1, momentum=0.8, damping=0.05, alpha1=0.5, weight_decay=0.01, T=2,
              lr_cov=0.2)
    kfac_like = variant == "ikfac"
    structure = "diagonal" if variant.startswith("singd-diagonal") else "dense"
    with pytest.warns(UserWarning, match="alpha1") if kfac_like else _nothing():
        opt = SINGD(layer, **hp, kfac_like=kfac_like, structures=structure,
                    fused=variant.endswith("fused"))
    batches = _batches(7)
    for x, target in batches:
        opt.zero_grad()
        nn.functional.cross_entropy(layer(x), target).backward()
        opt.step()
    project = _diag_projection if structure == "diagonal" else (lambda m: m)
    w, b, K, C = paper_singd(w0, b0, batches, **hp, kfac_like=kfac_like, project=project)
    st = opt.factors[""]
    for got, want in ((layer.weight, w), (layer.bias, b), (st["K"][0].to_dense(), K),
                      (st["C"][0].to_dense(), C)):
        err = float((got.detach() - want).norm() / want.norm())
        assert err < 1e-12, err
    # the preconditioner really moved away from the identity (the comparison is not vacuous)
    assert float((K - torch.eye(6, dtype=F64)).norm()) > 1e-2


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


# --- Theorem 1 ---------------------------------------------------------------------------------
def _ikfac_vs_kfac_error(beta, steps=20, d=6, damping=0.1, seed=0):
    """||K K^T - (S_K + lam I)^{-1}|| after ``steps`` IKFAC updates and the K-FAC moving
    average ``S_K <- (1 - beta) S_K + beta U`` on the same U sequence, from K = I,
    S_K = (1 - lam) I (so that K K^T = (S_K + lam I)^{-1} at the start)."""
    gen = torch.Generator().manual_seed(seed)
    K = STRUCTURES["dense"].eye(d, dtype=F64)
    C = STRUCTURES["dense"].eye(2, dtype=F64)
    S = (1 - damping) * torch.eye(d, dtype=F64)
    for _ in range(steps):
        a = torch.randn(3 * d, d, dtype=F64, generator=gen)
        U = a.T @ a / (3 * d)
        new = factor_update(K, C, U, torch.eye(2, dtype=F64), damping=damping, alpha1=0.0,
                            lr_cov=beta, kfac_like=True)
        K = new["K"]
        S = (1 - beta) * S + beta * U
        target = torch.linalg.inv(S + damping * torch.eye(d, dtype=F64))
    Kd = K.to_dense()
    moved = float(torch.linalg.norm(target - torch.eye(d, dtype=F64)))
    return float(torch.linalg.norm(Kd @ Kd.T - target)), moved


def test_theorem1_error_is_second_order_in_beta1():
    """Each step adds an O(beta1^2) error (Theorem 1), so over the same number of steps halving
    beta1 divides the error by about 4; 3..5 leaves room for the O(beta1^3) terms at these
    beta1 (a first-order error would give 2, an exact match would give no stable ratio)."""
    runs = [_ikfac_vs_kfac_error(beta) for beta in (0.04, 0.02, 0.01)]
    errors = [e for e, _ in runs]
    for big, small in zip(errors, errors[1:]):
        assert 3.0 < big / small < 5.0, errors
    # K K^T tracks a target that itself moved away from the identity
    for err, moved in runs:
        assert err < 0.1 * moved, runs


# --- App. F: scale invariance ---------------------------------------------------------------
def _directions(structure, kfac_like, scale, steps=4, seed=1):
    gen = torch.Generator().manual_seed(seed)
    cls = STRUCTURES[structure]
    k = 2 if cls.takes_block_size else None
    K, C = cls.eye(5, k, dtype=F64), cls.eye(4, k, dtype=F64)
    mK, mC = cls.zeros(5, k, dtype=F64), cls.zeros(4, k, dtype=F64)
    for _ in range(steps):
        a = torch.randn(12, 5, dtype=F64, generator=gen)
        g = torch.randn(12, 4, dtype=F64, generator=gen)
        new = factor_update(K, C, scale * (a.T @ a / 12), (g.T @ g) / scale, damping=0.1,
                            alpha1=0.0 if kfac_like else 0.5, lr_cov=0.05,
                            kfac_like=kfac_like, m_K=None if kfac_like else mK,
                            m_C=None if kfac_like else mC)
        K, C = new["K"], new["C"]
        mK, mC = new.get("m_K", mK), new.get("m_C", mC)
    M = torch.randn(4, 5, dtype=F64, generator=gen)
    return precondition(K, C, M)


@pytest.mark.parametrize("structure", ["dense", "diagonal", "block-diagonal", "hierarchical"])
def test_scale_invariance_of_ingd_and_singd(structure):
    """U -> alpha U, G -> G / alpha leaves INGD/SINGD unchanged (App. F), changes IKFAC."""
    base = _directions(structure, False, 1.0)
    for alpha in (10.0, 0.05):
        moved = _directions(structure, False, alpha)
        assert float((moved - base).norm() / base.norm()) < 1e-12
        ik_base, ik = _directions(structure, True, 1.0), _directions(structure, True, alpha)
        assert float((ik - ik_base).norm() / ik_base.norm()) > 1e-3


def test_kfac_is_not_scale_invariant():
    """The contrast of App. F: (G + lam I)^{-1} M (U + lam I)^{-1} changes with the scaling."""
    gen = torch.Generator().manual_seed(2)
    a, g = torch.randn(12, 5, dtype=F64, generator=gen), torch.randn(12, 4, dtype=F64,
                                                                       generator=gen)
    U, G, M = a.T @ a / 12, g.T @ g / 12, torch.randn(4, 5, dtype=F64, generator=gen)

    def kfac(alpha):
        return (torch.linalg.inv(G / alpha + 0.1 * torch.eye(4, dtype=F64)) @ M
                @ torch.linalg.inv(alpha * U + 0.1 * torch.eye(5, dtype=F64)))
    assert float((kfac(10.0) - kfac(1.0)).norm() / kfac(1.0).norm()) > 1e-2


# --- a small CNN: resume, AMP, low precision ---------------------------------------------------
def _cnn(dtype=torch.float32):
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(),
                         nn.Linear(4 * 6 * 6, 10), nn.LayerNorm(10), nn.Linear(10, 3)).to(dtype)


def _data(steps, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, 1, 6, 6, generator=gen).to(dtype),
             torch.randint(0, 3, (8,), generator=gen)) for _ in range(steps)]


def _train(model, opt, data, scaler=None):
    losses = []
    for x, y in data:
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x).float(), y)
        if scaler is None:
            loss.backward()
            opt.step()
        else:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        losses.append(float(loss.detach()))
    return losses


def test_non_finite_gradients_skip_the_step():
    model = _cnn()
    opt = SINGD(model, lr=0.05, lr_cov=0.05, T=1)
    _train(model, opt, _data(2))
    before = [p.detach().clone() for p in model.parameters()]
    factors = {n: [s.to_dense().clone() for s in st["K"]] for n, st in opt.factors.items()}
    x, y = _data(1, seed=3)[0]
    opt.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    model[3].weight.grad[0, 0] = float("inf")
    opt.step()
    assert opt.steps == 2
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    for n, mats in factors.items():
        assert all(torch.equal(a, s.to_dense()) for a, s in zip(mats, opt.factors[n]["K"]))


@pytest.mark.parametrize("structure,fused", [("dense", False), ("diagonal", False),
                                             ("diagonal", True), ("block-diagonal", True)])
def test_non_finite_factor_update_keeps_the_previous_factors(structure, fused, stored_health_path):
    """An lr_cov far too large for the curvature overflows the factor update: it is not
    stored (the factors stay the identity they started from), with one warning, on the
    reference path and on the fused ones. The check stays on the device: its warning comes with
    the next step's one host read."""
    torch.manual_seed(0)
    model = nn.Linear(8, 4)
    opt = SINGD(model, lr=0.05, lr_cov=1e37, T=1, structures=structure, block_size=4,
                fused=fused)
    x, y = 1e3 * torch.randn(16, 8), torch.randint(0, 4, (16,))
    with pytest.warns(RuntimeWarning, match="the factor update of module '' is not finite"):
        for _ in range(2):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
    for key in ("K", "C"):
        for s in opt.factors[""][key]:
            dense = s.to_dense()
            assert torch.equal(dense, torch.eye(dense.shape[0], dtype=dense.dtype))


def _exploding_run(structure, fused, warm_start, steps=30):
    """SINGD with lr_cov=10, far too large: without the direction guard the parameters turned
    inf/NaN within 2-6 steps on every structure, reported only as non-finite gradients later."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))
    opt = SINGD(model, lr=0.05, lr_cov=10.0, T=1, structures=structure, block_size=4,
                fused=fused, warm_start=warm_start)
    gen = torch.Generator().manual_seed(1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(steps):
            x, y = torch.randn(32, 8, generator=gen), torch.randint(0, 4, (32,), generator=gen)
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
    return model, [str(w.message) for w in caught]


@pytest.mark.parametrize("structure,fused", [("dense", False), ("diagonal", False),
                                             ("diagonal", True), ("block-diagonal", True),
                                             ("block-diagonal", False)])
def test_exploding_factors_restart_instead_of_breaking_the_parameters(structure, fused):
    """Factors grown too large make the preconditioned gradient overflow before they overflow
    themselves: the layer then takes a zero direction, its factors restart, and one warning
    names the module and the cause; the parameters stay finite."""
    model, messages = _exploding_run(structure, fused, warm_start=False)
    assert all(bool(p.isfinite().all()) for p in model.parameters())
    assert any("preconditioned gradient of module" in m and "lr_cov too large" in m
               for m in messages), messages


@pytest.mark.parametrize("structure,fused", [("dense", False), ("diagonal", True),
                                             ("block-diagonal", True)])
@pytest.mark.parametrize("warm_start", [False, True])
def test_direction_guard_reads_on_the_cpu_and_selects_on_the_device_alike(structure, fused,
                                                                          warm_start):
    """The guard's host read (CPU) and its device-side selection with the restart at the next
    step's read give the same parameters, bit for bit, through restarts."""
    from _syncs import host_reads

    runs = []
    for free in (True, False):
        with host_reads(free):
            model, messages = _exploding_run(structure, fused, warm_start, steps=12)
        assert any("preconditioned gradient" in m for m in messages)
        runs.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_grad_scaler_matches_unscaled_run():
    """A power-of-two loss scale is undone exactly (gradients by scaler.step, captured output
    gradients by the optimizer), so the trajectory equals the unscaled one."""
    data = _data(4)
    model = _cnn()
    opt = SINGD(model, lr=0.05, lr_cov=0.05, T=1, structures="block-diagonal", block_size=4)
    _train(model, opt, data)
    model2 = _cnn()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 12)
    opt2 = SINGD(model2, lr=0.05, lr_cov=0.05, T=1, structures="block-diagonal", block_size=4,
                 grad_scaler=scaler)
    _train(model2, opt2, data, scaler)
    for p, q in zip(model.parameters(), model2.parameters()):
        assert float((p - q).detach().abs().max()) <= 1e-6 * float(p.detach().abs().max())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("backend", ["eager", "auto"])
def test_fused_diagonal_path_matches_reference_path(dtype, backend):
    """fused=True (one kernel per weight and bias) against the readable path: fp32 to 1e-5;
    bf16 parameters to within twice the reference path's error against an fp64 run."""
    data = _data(6)
    kwargs = dict(lr=0.05, lr_cov=0.05, T=2, structures="diagonal", weight_decay=1e-3)

    def final(dt, fused):
        model = _cnn(dt)
        opt = SINGD(model, **kwargs, fused=fused, backend=backend if fused else "auto")
        _train(model, opt, [(x.to(dt), y) for x, y in data])
        return torch.cat([p.detach().double().flatten() for p in model.parameters()])

    ref = final(dtype, False)
    got = final(dtype, True)
    if dtype == torch.float32:
        assert float((got - ref).norm() / ref.norm()) < 1e-5
    else:
        exact = final(torch.float64, False)
        ref_err = float((ref - exact).norm() / exact.norm())
        assert float((got - exact).norm() / exact.norm()) <= 2 * ref_err + 1e-6


@pytest.mark.parametrize("structure", list(STRUCTURES))
def test_bf16_training_stays_finite_and_learns(structure):
    model = _cnn(torch.bfloat16)
    opt = SINGD(model, lr=0.05, lr_cov=0.01, damping=1e-3, T=1, structures=structure,
                block_size=4)
    data = _data(4, torch.bfloat16) * 5
    losses = _train(model, opt, data)
    assert all(math.isfinite(v) for v in losses)
    for st in opt.factors.values():
        for mats in st.values():
            assert all(m.dtype == torch.bfloat16 and m.all_finite() for m in mats)
    assert sum(losses[-4:]) < 0.8 * sum(losses[:4]), losses


# --- arguments ---------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs,message", [
    (dict(structures=("dense", "banded")), r"SINGD: unknown structure 'banded'; expected one of "
                                           r"'dense', 'diagonal', 'block-diagonal', "
                                           r"'hierarchical', 'lower-triangular', "
                                           r"'rank-k-lower-triangular', "
                                           r"'upper-triangular-toeplitz'"),
    (dict(block_size=0), r"SINGD: block_size must be an int >= 1, got 0"),
    (dict(block_size=(4, -2)), r"SINGD: block_size must be an int >= 1, got -2"),
    (dict(lr=-0.1), r"SINGD: lr must be a finite float in \[0, inf\), got -0.1"),
    (dict(lr_cov=-1e-3), r"SINGD: lr_cov must be a finite float in \[0, inf\), got -0.001"),
    (dict(damping=-1.0), r"SINGD: damping must be a finite float in \[0, inf\), got -1.0"),
    (dict(weight_decay=float("nan")), r"SINGD: weight_decay must be a finite float in "
                                      r"\[0, inf\), got nan"),
    (dict(momentum=1.0), r"SINGD: momentum must be a finite float in \[0, 1\), got 1.0"),
    (dict(alpha1=-0.5), r"SINGD: alpha1 must be a finite float in \[0, 1\), got -0.5"),
    (dict(T=0), r"SINGD: T must be an int >= 1, got 0"),
    (dict(T=2.0), r"SINGD: T must be an int >= 1, got 2.0"),
    (dict(kfac_approx="mean"), r"SINGD: kfac_approx must be 'expand' or 'reduce', got 'mean'"),
    (dict(preconditioner_dtype=torch.int8), r"SINGD: preconditioner_dtype must be None, one of"),
])
def test_bad_arguments_are_rejected(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SINGD(nn.Linear(3, 2), **kwargs)


def test_bad_types_and_state_dicts_are_rejected():
    with pytest.raises(TypeError, match=r"SINGD: model must be a torch.nn.Module, got list"):
        SINGD([nn.Parameter(torch.zeros(2))])
    with pytest.raises(TypeError, match=r"SINGD: grad_scaler must be a torch.amp.GradScaler or "
                                        r"None, got float"):
        SINGD(nn.Linear(3, 2), grad_scaler=1.0)
    opt = SINGD(nn.Linear(3, 2), structures="diagonal")
    with pytest.raises(RuntimeError, match=r"SINGD: the optimizer has one parameter group"):
        opt.add_param_group({"params": [nn.Parameter(torch.zeros(2))]})
    with pytest.raises(ValueError, match=r"SINGD: preconditioner_dtype must be None, a dtype or "
                                         r"a pair \(K, C\)"):
        SINGD(nn.Linear(3, 2), preconditioner_dtype=(None, None, None))
    with pytest.raises(KeyError, match=r"SINGD.load_state_dict: state_dict has no 'singd' entry"):
        opt.load_state_dict({"state": {}, "param_groups": []})
    other = SINGD(nn.Linear(3, 2), structures="dense").state_dict()
    with pytest.raises(ValueError, match=r"SINGD.load_state_dict: saved with structures "
                                         r"\('dense', 'dense'\)"):
        opt.load_state_dict(other)


def test_grouped_conv1d_and_reduce_keep_one_factor_pair_per_group():
    """Conv1d with groups=2 and kfac_approx="reduce": one K per group, built from that group's
    mean patches only (on the first step from K = I, I - K = beta1 m_K with
    m_K = (Tr(H_C)/d_o U_g + (c^2/d_o - 1) I) / 2, so its off-diagonal is proportional to U_g's)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv1d(4, 6, 3, groups=2), nn.Flatten(), nn.Linear(6 * 5, 2))
    opt = SINGD(model, lr=0.05, lr_cov=0.1, T=1, structures="dense", kfac_approx="reduce",
                loss_average="batch")
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(5, 4, 7, generator=gen), torch.randint(0, 2, (5,), generator=gen)
    opt.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    U = [None, None]
    # reduce: per-example mean patch of each group's input channels, bias coordinate last
    patches = x.unfold(2, 3, 1)                                     # (N, C_in, L_out, 3)
    for g in range(2):
        mean = patches[:, 2 * g:2 * g + 2].mean(2).reshape(5, -1)   # (N, 2 * 3)
        a = torch.cat([mean, torch.ones(5, 1)], 1)
        U[g] = a.T @ a / 5
    opt.step()
    K = opt.factors["0"]["K"]
    assert len(K) == 2 and K[0].dim == 7
    for g in range(2):
        k = K[g].to_dense()
        assert torch.isfinite(k).all()
        assert torch.allclose(k, k.T, atol=1e-6)
        dev = torch.eye(7) - k
        off = ~torch.eye(7, dtype=torch.bool)
        ratio = dev[off] / U[g][off]
        assert float(ratio.std() / ratio.mean().abs()) < 1e-3, ratio


def test_normalize_lr_cov_bounds_the_factor_step():
    """normalize_lr_cov: beta1 / max(1, max|m|) with m's new term scaled by (1 - alpha1), as the
    reference implementation does; with large curvature the plain step leaves I - beta1 m
    indefinite, the normalised one keeps it close to I (max|m| bounds m's spectrum here up to
    the small off-diagonal part of U)."""
    d = 4
    K, C = STRUCTURES["dense"].eye(d, dtype=F64), STRUCTURES["dense"].eye(3, dtype=F64)
    mK, mC = STRUCTURES["dense"].zeros(d, dtype=F64), STRUCTURES["dense"].zeros(3, dtype=F64)
    U = 1e4 * torch.eye(d, dtype=F64) + torch.ones(d, d, dtype=F64)
    G = torch.eye(3, dtype=F64)
    kw = dict(damping=0.1, alpha1=0.5, lr_cov=0.1, kfac_like=False, m_K=mK, m_C=mC)
    plain = factor_update(K, C, U, G, **kw)
    normed = factor_update(K, C, U, G, **kw, normalize_lr_cov=True)
    # by hand: m = (1 - alpha1)/2 (Tr(G)/d_o U + lam Tr(I_3)/d_o I - I)
    m = 0.25 * (U + 0.1 * torch.eye(d, dtype=F64) - torch.eye(d, dtype=F64))
    want = torch.eye(d, dtype=F64) - 0.1 / float(m.abs().max()) * m
    assert float((normed["K"].to_dense() - want).norm() / want.norm()) < 1e-14
    assert float(torch.linalg.eigvalsh(plain["K"].to_dense()).min()) < 0   # indefinite
    eig = torch.linalg.eigvalsh(normed["K"].to_dense())
    assert float(eig.min()) > 0.85 and float(eig.max()) <= 1.1
