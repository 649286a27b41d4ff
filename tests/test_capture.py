"""Curvature capture against brute force: the ``(A, G)`` of ``kronecker_factors`` for
``nn.Linear`` (inputs of any rank) and ``nn.Conv1d``/``nn.Conv2d`` (every stride, padding,
padding mode, dilation and group setting) versus patches built here by explicit padding and a
loop over output positions, and output gradients from ``torch.autograd.grad``.

The brute-force patches are first checked to reproduce the convolution's own output, so the
reference does not rest on the code under test. Everything is float64.
"""
from __future__ import annotations

import itertools
import math
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import kfac_kernels
from kfac_kernels import available_backends

DT = torch.float64

pytestmark = pytest.mark.usefixtures("single_thread")
TOL = dict(rtol=1e-10, atol=1e-12)
BACKENDS = ["eager", "auto"] + [b for b in available_backends("cpu") if b not in ("eager",)]


# ---------------------------------------------------------------------------------------------
# brute force
# ---------------------------------------------------------------------------------------------

def _as_tuple(v, n):
    return tuple(v) if isinstance(v, (tuple, list)) else (v,) * n


def conv_pads(conv) -> list[tuple[int, int]]:
    """(left, right) padding per spatial dim, as the convolution pads."""
    n = len(conv.kernel_size)
    if conv.padding == "valid":
        return [(0, 0)] * n
    if conv.padding == "same":
        out = []
        for k, d in zip(conv.kernel_size, conv.dilation):
            total = d * (k - 1)
            out.append((total // 2, total - total // 2))
        return out
    return [(p, p) for p in _as_tuple(conv.padding, n)]


def brute_patches(conv, x: torch.Tensor) -> torch.Tensor:
    """``(N, R, groups, C_in_g * prod(kernel))`` patches, one per output position, ordered
    channel-major then kernel offsets (the layout of ``weight.reshape(C_out, -1)``)."""
    n_sp = len(conv.kernel_size)
    flat = []
    for left, right in reversed(conv_pads(conv)):  # F.pad wants the last dim first
        flat += [left, right]
    mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
    xp = F.pad(x, flat, mode=mode) if any(flat) else x
    k, s, d = conv.kernel_size, conv.stride, conv.dilation
    out_sizes = [(xp.shape[2 + i] - d[i] * (k[i] - 1) - 1) // s[i] + 1 for i in range(n_sp)]
    patches = []
    for pos in itertools.product(*[range(o) for o in out_sizes]):
        index = [slice(None), slice(None)]
        for i, o in enumerate(pos):
            start = o * s[i]
            index.append(slice(start, start + d[i] * (k[i] - 1) + 1, d[i]))
        patches.append(xp[tuple(index)])  # (N, C_in, *kernel)
    p = torch.stack(patches, dim=1)  # (N, R, C_in, *kernel)
    n, r = p.shape[:2]
    return p.reshape(n, r, conv.groups, -1), out_sizes


def check_brute_force_conv(conv, x, patches, out_sizes):
    """The brute-force patches reproduce the convolution itself."""
    y = conv(x)
    assert list(y.shape[2:]) == out_sizes
    n, r = patches.shape[:2]
    g = conv.groups
    w = conv.weight.reshape(g, conv.out_channels // g, -1)  # (g, C_out_g, D)
    yb = torch.einsum("nrgd,god->ngor", patches, w).reshape(n, conv.out_channels, r)
    if conv.bias is not None:
        yb = yb + conv.bias[None, :, None]
    torch.testing.assert_close(yb, y.reshape(n, conv.out_channels, r), **TOL)


def with_bias_column(rows: torch.Tensor, bias: bool) -> torch.Tensor:
    if not bias:
        return rows
    return torch.cat([rows, torch.ones(*rows.shape[:-1], 1, dtype=rows.dtype)], dim=-1)


def brute_a(pos: torch.Tensor, bias: bool, approx: str) -> torch.Tensor:
    """``pos``: ``(N, R, D)`` inputs at every weight-sharing position."""
    n, r, dim = pos.shape
    if approx == "expand":
        rows = with_bias_column(pos.reshape(n * r, dim), bias)
        return rows.T @ rows / (n * r)
    rows = with_bias_column(pos.mean(dim=1), bias)
    return rows.T @ rows / n


def brute_g(gpos: torch.Tensor, approx: str, inv_c: float) -> torch.Tensor:
    """``gpos``: ``(N, R, d_out)`` gradients of the loss w.r.t. the layer output."""
    n, r, d = gpos.shape
    if approx == "expand":
        rows = gpos.reshape(n * r, d)
    else:
        rows = gpos.sum(dim=1)
    return inv_c * rows.T @ rows


def output_grad(model, loss_fn, x, y):
    out = model(x).detach().requires_grad_(True)
    (g,) = torch.autograd.grad(loss_fn(out, y), out)
    return out, g


def check_factors(got, expected_a, expected_g, groups, what):
    a, g = got
    if groups == 1:
        assert a.dim() == 2 and g.dim() == 2, (what, a.shape, g.shape)
        a, g = a[None], g[None]
    else:
        assert a.shape[0] == groups and g.shape[0] == groups, (what, a.shape, g.shape)
    assert a.shape == expected_a.shape, (what, a.shape, expected_a.shape)
    assert g.shape == expected_g.shape, (what, g.shape, expected_g.shape)
    torch.testing.assert_close(a, expected_a, **TOL, msg=lambda m: f"{what} A: {m}")
    torch.testing.assert_close(g, expected_g, **TOL, msg=lambda m: f"{what} G: {m}")
    # kron(G, A) is a curvature block: both factors symmetric PSD.
    torch.testing.assert_close(a, a.mT, rtol=0, atol=1e-12)
    assert torch.linalg.eigvalsh(a).min() > -1e-10 * max(1.0, float(a.abs().max()))


# ---------------------------------------------------------------------------------------------
# the Conv2d grid (all pairs of settings covered, greedily)
# ---------------------------------------------------------------------------------------------

FACTORS = {
    "kernel": [1, 3, (3, 1), (2, 3)],
    "stride": [1, 2],
    "padding": [0, 1, (1, 2), "same", "valid"],
    "dilation": [1, 2],
    "groups": [1, 2],
    "padding_mode": ["zeros", "reflect", "replicate", "circular"],
    "bias": [True, False],
    "channels_last": [False, True],
}


def _valid(case) -> bool:
    return not (case["padding"] == "same" and case["stride"] != 1)


def _pairwise_cases() -> list[dict]:
    keys = list(FACTORS)
    candidates = [dict(zip(keys, values)) for values in itertools.product(*FACTORS.values())]
    candidates = [c for c in candidates if _valid(c)]

    def pairs(case):
        return {(k1, repr(case[k1]), k2, repr(case[k2]))
                for k1, k2 in itertools.combinations(keys, 2)}

    cand_pairs = [pairs(c) for c in candidates]
    uncovered = set().union(*cand_pairs)
    chosen = []
    while uncovered:
        best = max(range(len(candidates)), key=lambda i: len(cand_pairs[i] & uncovered))
        chosen.append(candidates[best])
        uncovered -= cand_pairs[best]
    return chosen


# "same" with an even effective kernel pads asymmetrically (left = total // 2): cases where the
# split matters (not circular, where a shift leaves the factors unchanged).
_ASYMMETRIC_SAME = [
    dict(kernel=(2, 4), stride=1, padding="same", dilation=1, groups=1, padding_mode="zeros",
         bias=True, channels_last=False),
    dict(kernel=2, stride=1, padding="same", dilation=1, groups=2, padding_mode="reflect",
         bias=True, channels_last=True),
    dict(kernel=(4, 2), stride=1, padding="same", dilation=(1, 3), groups=1,
         padding_mode="replicate", bias=False, channels_last=False),
]

CONV2D_CASES = _pairwise_cases() + _ASYMMETRIC_SAME


def _case_id(case):
    return "-".join(f"{k}={v}" for k, v in case.items()).replace(" ", "")


def test_conv2d_grid_covers_every_setting():
    assert 20 <= len(CONV2D_CASES) <= 60, len(CONV2D_CASES)
    assert all(_valid(c) for c in CONV2D_CASES)
    for key, values in FACTORS.items():
        for v in values:
            assert any(c[key] == v for c in CONV2D_CASES), (key, v)


def _conv_factors_check(conv, x, backend, loss_fn=None, inv_c=None, y=None):
    model = nn.Sequential(conv)
    n = x.shape[0]
    patches, out_sizes = brute_patches(conv, x)
    check_brute_force_conv(conv, x, patches, out_sizes)
    if loss_fn is None:
        loss_fn, loss_average, inv_c = nn.MSELoss(reduction="sum"), None, 1.0
        with torch.no_grad():
            y = torch.randn_like(conv(x))
    else:
        loss_average = "batch+sequence"
    _, gout = output_grad(model, loss_fn, x, y)
    r = patches.shape[1]
    groups = conv.groups
    cg = conv.out_channels // groups
    gpos = gout.reshape(n, groups, cg, r).permute(1, 0, 3, 2)  # (groups, N, R, C_out_g)
    bias = conv.bias is not None
    for approx in ("expand", "reduce"):
        got = kfac_kernels.kronecker_factors(model, loss_fn, x, y, kfac_approx=approx,
                                             loss_average=loss_average, backend=backend)
        assert set(got) == {"0"}
        exp_a = torch.stack([brute_a(patches[:, :, i], bias, approx) for i in range(groups)])
        exp_g = torch.stack([brute_g(gpos[i], approx, inv_c) for i in range(groups)])
        check_factors(got["0"], exp_a, exp_g, groups, approx)
    assert conv.weight.grad is None, "kronecker_factors must not touch .grad"


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel lengths")
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CONV2D_CASES, ids=_case_id)
def test_conv2d_factors_match_brute_force(case, backend):
    groups = case["groups"]
    conv = nn.Conv2d(2 * groups, 3 * groups, case["kernel"], stride=case["stride"],
                     padding=case["padding"], dilation=case["dilation"], groups=groups,
                     bias=case["bias"], padding_mode=case["padding_mode"]).to(DT)
    x = torch.randn(3, 2 * groups, 7, 9, dtype=DT)  # odd H and W
    if case["channels_last"]:
        x = x.contiguous(memory_format=torch.channels_last)
        assert not x.is_contiguous()
    _conv_factors_check(conv, x, backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kw", [
    dict(kernel_size=3, padding="same", padding_mode="circular"),
    dict(kernel_size=4, padding="same", padding_mode="circular", dilation=1),   # asymmetric
    dict(kernel_size=4, padding="same"),                                        # asymmetric
    dict(kernel_size=2, padding="same", padding_mode="reflect", dilation=3),    # asymmetric
    dict(kernel_size=3, padding="same", padding_mode="circular", dilation=2, groups=2),
    dict(kernel_size=3, stride=2, padding=1, padding_mode="reflect", bias=False),
    dict(kernel_size=2, stride=3, dilation=2, padding="valid"),
    dict(kernel_size=3, padding=2, padding_mode="replicate", groups=2),
], ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()))
def test_conv1d_factors_match_brute_force(kw, backend):
    groups = kw.get("groups", 1)
    conv = nn.Conv1d(2 * groups, 3 * groups, **kw).to(DT)
    x = torch.randn(4, 2 * groups, 11, dtype=DT)
    _conv_factors_check(conv, x, backend)
    # Non-contiguous (a transposed view of a length-major buffer).
    xt = x.transpose(1, 2).contiguous().transpose(1, 2)
    assert not xt.is_contiguous()
    _conv_factors_check(conv, xt, backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("groups", [1, 2])
def test_conv2d_cross_entropy_mean_over_positions(groups, backend):
    """Loss = mean cross-entropy over examples and pixels: G = N R sum g g^T (1/c = N R)."""
    conv = nn.Conv2d(2 * groups, 3 * groups, 3, padding=1, groups=groups).to(DT)
    x = torch.randn(3, 2 * groups, 5, 7, dtype=DT)
    y = torch.randint(0, 3 * groups, (3, 5, 7))
    _conv_factors_check(conv, x, backend, loss_fn=nn.CrossEntropyLoss(), inv_c=3 * 5 * 7, y=y)


# ---------------------------------------------------------------------------------------------
# Linear with inputs of any rank
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("lead", [(5,), (4, 3), (3, 2, 4)], ids=["2d", "3d", "4d"])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("contiguous", [True, False])
def test_linear_factors_match_brute_force(lead, bias, reduction, contiguous, backend):
    d_in, d_out = 4, 3
    model = nn.Sequential(nn.Linear(d_in, d_out, bias=bias)).to(DT)
    if contiguous:
        x = torch.randn(*lead, d_in, dtype=DT)
    else:  # the same shape as a view with permuted strides
        x = torch.randn(d_in, *reversed(lead), dtype=DT).permute(
            *range(len(lead), 0, -1), 0)
        assert x.shape == (*lead, d_in) and not x.is_contiguous()
    y = torch.randn(*lead, d_out, dtype=DT)
    loss_fn = nn.MSELoss(reduction=reduction)
    loss_average = None if reduction == "sum" else "batch"
    inv_c = 1.0 if reduction == "sum" else float(math.prod(lead) * d_out)
    n = lead[0]
    r = math.prod(lead[1:])
    _, gout = output_grad(model, loss_fn, x, y)
    pos = x.reshape(n, r, d_in)
    gpos = gout.reshape(n, r, d_out)
    for approx in ("expand", "reduce"):
        got = kfac_kernels.kronecker_factors(model, loss_fn, x, y, kfac_approx=approx,
                                             loss_average=loss_average, backend=backend)
        check_factors(got["0"], brute_a(pos, bias, approx)[None],
                      brute_g(gpos, approx, inv_c)[None], 1, approx)
    assert model[0].weight.grad is None


@pytest.mark.parametrize("backend", BACKENDS)
def test_linear_cross_entropy_batch_mean(backend):
    """Cross-entropy averaged over the batch: G = N sum_n g_n g_n^T."""
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).to(DT)
    x = torch.randn(8, 5, dtype=DT)
    y = torch.randint(0, 3, (8,))
    got = kfac_kernels.kronecker_factors(model, nn.CrossEntropyLoss(), x, y, backend=backend)
    assert set(got) == {"0", "2"}
    h = torch.tanh(model[0](x)).detach()
    _, g2 = output_grad(nn.Sequential(model[2]), nn.CrossEntropyLoss(), h, y)
    check_factors(got["2"], brute_a(h[:, None], True, "expand")[None],
                  brute_g(g2[:, None], "expand", 8.0)[None], 1, "layer 2")
    z = model[0](x).detach().requires_grad_(True)
    (g0,) = torch.autograd.grad(F.cross_entropy(model[2](torch.tanh(z)), y), z)
    check_factors(got["0"], brute_a(x[:, None], True, "expand")[None],
                  brute_g(g0[:, None], "expand", 8.0)[None], 1, "layer 0")


def test_linear_unbatched_input_is_one_example():
    model = nn.Sequential(nn.Linear(4, 3)).to(DT)
    x = torch.randn(4, dtype=DT)
    y = torch.randn(3, dtype=DT)
    got = kfac_kernels.kronecker_factors(model, nn.MSELoss(reduction="sum"), x, y,
                                         loss_average=None)
    _, g = output_grad(model, nn.MSELoss(reduction="sum"), x, y)
    a = with_bias_column(x[None], True)
    check_factors(got["0"], (a.T @ a)[None], (g[:, None] @ g[None])[None], 1, "unbatched")


# ---------------------------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------------------------

def test_nan_input_is_reported():
    model = nn.Sequential(nn.Linear(4, 3)).to(DT)
    x = torch.randn(5, 4, dtype=DT)
    x[1, 2] = float("nan")
    with pytest.raises(ValueError, match=re.escape(
            "kronecker_factors: the A factor of module '0' is not finite: the layer's inputs "
            "contain NaN or inf")):
        kfac_kernels.kronecker_factors(model, nn.MSELoss(), x, torch.zeros(5, 3, dtype=DT))


@pytest.mark.parametrize("kwargs,exc,message", [
    (dict(kfac_approx="both"), ValueError,
     "kronecker_factors: kfac_approx must be 'expand' or 'reduce', got 'both'"),
    (dict(fisher_type="true"), ValueError, "kronecker_factors: fisher_type must be one of"),
    (dict(loss_average=None), ValueError,
     "kronecker_factors: loss_fn has reduction='mean', so loss_average must be"),
    (dict(backend="gpu"), ValueError, "kronecker_factors: backend must be one of"),
    (dict(mc_samples=0), ValueError, "kronecker_factors: mc_samples must be an int >= 1"),
    (dict(skip_modules=["nope"]), ValueError,
     "kronecker_factors: skip_modules names 'nope', which matches no module of the model"),
])
def test_kronecker_factors_rejects_bad_arguments(kwargs, exc, message):
    model = nn.Sequential(nn.Linear(4, 3)).to(DT)
    x, y = torch.randn(5, 4, dtype=DT), torch.randn(5, 3, dtype=DT)
    with pytest.raises(exc, match=re.escape(message)):
        kfac_kernels.kronecker_factors(model, nn.MSELoss(), x, y, **kwargs)
    assert all(len(m._forward_hooks) == 0 for m in model.modules())


def test_kronecker_factors_rejects_bad_models_and_losses():
    x, y = torch.randn(5, 4, dtype=DT), torch.randn(5, 3, dtype=DT)
    with pytest.raises(TypeError, match=re.escape(
            "kronecker_factors: model must be a torch.nn.Module, got function")):
        kfac_kernels.kronecker_factors(lambda t: t, nn.MSELoss(), x, y)
    with pytest.raises(TypeError, match=re.escape(
            "kronecker_factors: loss_fn must be an nn.CrossEntropyLoss, nn.MSELoss or "
            "nn.BCEWithLogitsLoss instance, got L1Loss")):
        kfac_kernels.kronecker_factors(nn.Linear(4, 3).to(DT), nn.L1Loss(), x, y)
    with pytest.raises(ValueError, match=re.escape(
            "kronecker_factors: the model has no supported layers")):
        kfac_kernels.kronecker_factors(nn.Sequential(nn.Tanh()), nn.MSELoss(), x, x)

    class Pair(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 3)

        def forward(self, t):
            return self.lin(t), t

    model = Pair().to(DT)
    with pytest.raises(TypeError, match=re.escape(
            "kronecker_factors: the model must return a tensor, got tuple")):
        kfac_kernels.kronecker_factors(model, nn.MSELoss(), x, y)
    assert len(model.lin._forward_hooks) == 0
