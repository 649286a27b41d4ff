"""Oracle tests for ``kfac_kernels.kronecker_factors``: checks that come from outside the code.

The references are exact GGN blocks computed with ``torch.func`` (``tests/_ggn.py``), the exactness
results of Eschenhagen et al. (2023) (Prop. 1: K-FAC-expand is exact for deep linear networks in the
expand setting; Prop. 2: K-FAC-reduce is exact for deep linear networks in the reduce setting, i.e.
with a scaled sum over the weight-sharing dimension before the loss), elementary facts (one example
and no weight sharing: K-FAC with the type-2 Fisher is exact for any network), the unbiasedness of
the Monte-Carlo Fisher, and hand-computed gradients for the empirical Fisher.

Everything runs in float64 (models are made with ``.double()``; the default dtype is untouched).

Why the exactness statements hold (``a~`` is the layer input with a trailing 1 for the bias,
``B`` the Jacobian of the network output w.r.t. the layer output, constant in a deep linear
network, and ``H`` the Hessian of the loss w.r.t. the output):

* expand setting, loss on every position: GGN = sum_{n,r} a~ a~^T (x) B^T H B, and
  K-FAC-expand gives A = 1/(NR) sum a~ a~^T, G = NR B^T H B.
* reduce setting, output = c sum_r (...): GGN = c^2 sum_n (sum_r a~)(sum_r a~)^T (x) B^T H B,
  K-FAC-reduce gives A = 1/N sum_n abar abar^T, G = N R^2 c^2 B^T H B.
* For a convolution followed by average pooling the Jacobian of the pooled output w.r.t. every
  spatial position of an earlier conv's output must be the same; circular padding with stride 1
  and size-preserving padding makes it so (each position is visited once per kernel offset).
"""
from __future__ import annotations

import copy
import time

import pytest
import torch
from torch import nn

import kfac_kernels

try:
    from _ggn import (exact_ggn_block, exact_ggn_blocks, group_blocks, kron_factors,
                      off_group_blocks_norm, rel_err)
except ImportError:  # pragma: no cover - when tests/ is imported as a package
    from tests._ggn import (exact_ggn_block, exact_ggn_blocks, group_blocks, kron_factors,
                            off_group_blocks_norm, rel_err)

DT = torch.float64
EXACT_TOL = 1e-10
NOT_EXACT = 1e-3

# Measured errors, printed at the end of the session when run with ``-s`` (kept for reporting).
MEASURED: dict[str, float] = {}


def _record(key: str, value: float) -> float:
    MEASURED[key] = value
    return value


@pytest.fixture(scope="module", autouse=True)
def _print_measured():
    start = time.perf_counter()
    yield
    if MEASURED:
        print(f"\n[test_oracles] measured relative errors ({time.perf_counter() - start:.2f}s):")
        for k, v in sorted(MEASURED.items()):
            print(f"  {k:70s} {v:.3e}")


def factors(model, loss_fn, x, y, **kw):
    return kfac_kernels.kronecker_factors(model, loss_fn, x, y, **kw)


def kfac_errors(model, loss_fn, x, y, names, *, groups=None, **kw) -> dict[str, float]:
    """Relative Frobenius error of kron(G, A) against the exact GGN block, per layer. For a
    grouped convolution (``groups[name] > 1``) the per-group diagonal blocks are compared."""
    groups = groups or {}
    fac = factors(model, loss_fn, x, y, **kw)
    exact = exact_ggn_blocks(model, loss_fn, x, y, names)
    errs = {}
    for name in names:
        assert name in fac, f"layer {name!r} missing from kronecker_factors: {sorted(fac)}"
        a, g = fac[name]
        assert a.dtype == DT and g.dtype == DT
        ng = groups.get(name, 1)
        if ng > 1:
            assert a.dim() == 3 and g.dim() == 3 and a.shape[0] == ng and g.shape[0] == ng, \
                (a.shape, g.shape)
            blocks = group_blocks(exact[name], ng)
            errs[name] = max(rel_err(torch.kron(g[i], a[i]), blocks[i]) for i in range(ng))
        else:
            assert a.dim() == 2 and g.dim() == 2, (a.shape, g.shape)
            k = torch.kron(g, a)
            assert k.shape == exact[name].shape, (k.shape, exact[name].shape)
            errs[name] = rel_err(k, exact[name])
    return errs


def deep_linear(dims, bias=True):
    layers = [nn.Linear(dims[i], dims[i + 1], bias=bias if isinstance(bias, bool) else bias[i])
              for i in range(len(dims) - 1)]
    return nn.Sequential(*layers).double()


class MeanOverShared(nn.Module):
    """A network applied to ``(N, R, D)`` followed by the mean over ``R`` (the reduce setting)."""

    def __init__(self, body: nn.Module, dim: int = 1):
        super().__init__()
        self.body = body
        self.dim = dim

    def forward(self, x):
        return self.body(x).mean(dim=self.dim)


def linear_names(model):
    return [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv1d,
                                                                  nn.Conv2d))]


# ---------------------------------------------------------------------------------------------
# (a) Prop. 1: deep linear network, expand setting
# ---------------------------------------------------------------------------------------------

EXPAND_CASES = [
    # (dims, input shape without the feature dim, bias)
    ([5, 4, 3], (3, 4), True),
    ([4, 5, 3, 2], (2, 3), True),
    ([3, 4, 2], (2, 2, 3), True),           # two weight-sharing dims (N, R1, R2, D)
    ([4, 3, 2], (3, 4), [False, True]),     # a layer without bias
]


@pytest.mark.parametrize("dims,lead,bias", EXPAND_CASES)
def test_prop1_expand_exact_deep_linear(dims, lead, bias):
    torch.manual_seed(0)
    model = deep_linear(dims, bias)
    x = torch.randn(*lead, dims[0], dtype=DT)
    y = torch.randn(*lead, dims[-1], dtype=DT)
    loss_fn = nn.MSELoss(reduction="sum")
    names = linear_names(model)
    errs = kfac_errors(model, loss_fn, x, y, names, kfac_approx="expand", fisher_type="type-2",
                       loss_average=None)
    for name, e in errs.items():
        _record(f"(a) expand exact dims={dims} lead={lead} layer {name}", e)
        assert e <= EXACT_TOL, f"layer {name}: expand not exact, rel err {e:.3e}"
    # K-FAC-reduce in the expand setting is not exact.
    errs_r = kfac_errors(model, loss_fn, x, y, names, kfac_approx="reduce", fisher_type="type-2",
                         loss_average=None)
    for name, e in errs_r.items():
        _record(f"(a) reduce NOT exact dims={dims} lead={lead} layer {name}", e)
        assert e > NOT_EXACT, f"layer {name}: reduce unexpectedly exact in the expand setting"


# ---------------------------------------------------------------------------------------------
# (b) Prop. 2: deep linear network, reduce setting (mean over R before the loss)
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dims,lead,bias", [
    ([5, 4, 3], (3, 4), True),
    ([4, 5, 3, 2], (2, 3), True),
    ([4, 3, 2], (3, 5), [True, False]),
])
def test_prop2_reduce_exact_deep_linear(dims, lead, bias):
    torch.manual_seed(1)
    model = MeanOverShared(deep_linear(dims, bias)).double()
    x = torch.randn(*lead, dims[0], dtype=DT)
    y = torch.randn(lead[0], dims[-1], dtype=DT)
    loss_fn = nn.MSELoss(reduction="sum")
    names = linear_names(model)
    errs = kfac_errors(model, loss_fn, x, y, names, kfac_approx="reduce", fisher_type="type-2",
                       loss_average=None)
    for name, e in errs.items():
        _record(f"(b) reduce exact dims={dims} layer {name}", e)
        assert e <= EXACT_TOL, f"layer {name}: reduce not exact, rel err {e:.3e}"
    errs_e = kfac_errors(model, loss_fn, x, y, names, kfac_approx="expand", fisher_type="type-2",
                         loss_average=None)
    for name, e in errs_e.items():
        _record(f"(b) expand NOT exact dims={dims} layer {name}", e)
        assert e > NOT_EXACT, f"layer {name}: expand unexpectedly exact in the reduce setting"


# ---------------------------------------------------------------------------------------------
# (c) Conv2d: expand setting (single conv, loss on every output position)
# ---------------------------------------------------------------------------------------------

CONV2D_EXPAND = [
    dict(in_channels=2, out_channels=3, kernel_size=3),
    dict(in_channels=2, out_channels=3, kernel_size=3, stride=2, padding=1),
    dict(in_channels=2, out_channels=3, kernel_size=3, dilation=2, padding=2),
    dict(in_channels=4, out_channels=4, kernel_size=2, groups=2),
    dict(in_channels=4, out_channels=6, kernel_size=3, groups=2, stride=2, padding=1),
    dict(in_channels=2, out_channels=3, kernel_size=(2, 3), stride=(1, 2), padding=(1, 0)),
    dict(in_channels=2, out_channels=3, kernel_size=3, padding="same", padding_mode="reflect"),
    dict(in_channels=2, out_channels=3, kernel_size=3, padding=1, padding_mode="circular"),
    dict(in_channels=2, out_channels=3, kernel_size=3, padding=1, padding_mode="replicate"),
    dict(in_channels=2, out_channels=3, kernel_size=4, padding="same"),
    dict(in_channels=2, out_channels=3, kernel_size=3, padding="valid", bias=False),
]


@pytest.mark.parametrize("kw", CONV2D_EXPAND, ids=lambda kw: ",".join(f"{k}={v}" for k, v in
                                                                     kw.items()))
def test_conv2d_expand_exact(kw):
    torch.manual_seed(2)
    conv = nn.Conv2d(**kw).double()
    model = nn.Sequential(conv)
    x = torch.randn(2, kw["in_channels"], 5, 6, dtype=DT)
    with torch.no_grad():
        y = torch.randn_like(model(x))
    loss_fn = nn.MSELoss(reduction="sum")
    groups = kw.get("groups", 1)
    errs = kfac_errors(model, loss_fn, x, y, ["0"], groups={"0": groups}, kfac_approx="expand",
                       fisher_type="type-2", loss_average=None)
    _record(f"(c) conv2d expand exact {kw}", errs["0"])
    assert errs["0"] <= EXACT_TOL, f"conv2d expand not exact: {errs['0']:.3e}"
    if groups > 1:
        # The groups do not interact: the exact block is block-diagonal over groups, so the
        # stacked per-group factors describe the whole block.
        exact = exact_ggn_block(model, loss_fn, x, y, "0")
        assert off_group_blocks_norm(exact, groups) <= 1e-12 * float(torch.linalg.norm(exact))
        a, g = factors(model, loss_fn, x, y, kfac_approx="expand", fisher_type="type-2",
                       loss_average=None)["0"]
        e = rel_err(kron_factors(a, g), exact)
        _record(f"(c) conv2d expand exact, full block-diag {kw}", e)
        assert e <= EXACT_TOL


# ---------------------------------------------------------------------------------------------
# (c) Conv reduce setting: circular convs, average pooling, linear head
# ---------------------------------------------------------------------------------------------

def conv_pool_net(dim, c_in, c1, c2, c_out, k=3, dilation=1, groups1=1, groups2=1):
    conv = nn.Conv2d if dim == 2 else nn.Conv1d
    pool = nn.AdaptiveAvgPool2d(1) if dim == 2 else nn.AdaptiveAvgPool1d(1)
    pad = dilation * (k - 1) // 2
    return nn.Sequential(
        conv(c_in, c1, k, padding=pad, dilation=dilation, padding_mode="circular",
             groups=groups1),
        conv(c1, c2, k, padding=pad, dilation=dilation, padding_mode="circular", groups=groups2),
        pool, nn.Flatten(), nn.Linear(c2, c_out)).double()


CONV_REDUCE = [
    dict(dim=2, c_in=2, c1=3, c2=4, c_out=3, spatial=(5, 5)),
    dict(dim=2, c_in=2, c1=4, c2=4, c_out=3, groups2=2, spatial=(4, 5)),
    dict(dim=2, c_in=4, c1=4, c2=2, c_out=2, groups1=2, spatial=(5, 4)),
    dict(dim=2, c_in=2, c1=3, c2=3, c_out=2, dilation=2, spatial=(5, 6)),
    dict(dim=1, c_in=2, c1=4, c2=4, c_out=3, groups2=2, spatial=(7,)),
]


@pytest.mark.parametrize("cfg", CONV_REDUCE, ids=lambda c: ",".join(f"{k}={v}" for k, v in
                                                                    c.items()))
def test_conv_reduce_setting_reduce_exact(cfg):
    torch.manual_seed(3)
    cfg = dict(cfg)
    spatial = cfg.pop("spatial")
    model = conv_pool_net(**cfg)
    n = 3
    x = torch.randn(n, cfg["c_in"], *spatial, dtype=DT)
    y = torch.randn(n, cfg["c_out"], dtype=DT)
    loss_fn = nn.MSELoss(reduction="sum")
    names = ["0", "1", "4"]
    groups = {"0": cfg.get("groups1", 1), "1": cfg.get("groups2", 1)}
    errs = kfac_errors(model, loss_fn, x, y, names, groups=groups, kfac_approx="reduce",
                       fisher_type="type-2", loss_average=None)
    for name, e in errs.items():
        _record(f"(c) conv reduce exact {cfg} layer {name}", e)
        assert e <= EXACT_TOL, f"layer {name}: reduce not exact, rel err {e:.3e}"
    errs_e = kfac_errors(model, loss_fn, x, y, names, groups=groups, kfac_approx="expand",
                         fisher_type="type-2", loss_average=None)
    for name in ("0", "1"):
        _record(f"(c) conv expand NOT exact {cfg} layer {name}", errs_e[name])
        assert errs_e[name] > NOT_EXACT, f"conv layer {name}: expand unexpectedly exact"
    # The linear head sees one position per example: expand and reduce coincide and are exact.
    _record(f"(c) conv net expand, linear head exact {cfg}", errs_e["4"])
    assert errs_e["4"] <= EXACT_TOL


# ---------------------------------------------------------------------------------------------
# (d) Conv1d expand with 'same' padding and reflect padding mode
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kw", [
    dict(kernel_size=3, padding="same", padding_mode="reflect"),
    dict(kernel_size=4, padding="same", padding_mode="reflect"),   # asymmetric 'same'
    dict(kernel_size=3, dilation=2, padding="same", padding_mode="reflect"),
    dict(kernel_size=3, padding="same", padding_mode="reflect", groups=2, bias=False),
    dict(kernel_size=3, stride=2, padding=1, padding_mode="circular"),
])
def test_conv1d_expand_exact(kw):
    torch.manual_seed(4)
    c_in, c_out = (4, 4) if kw.get("groups", 1) > 1 else (2, 3)
    model = nn.Sequential(nn.Conv1d(c_in, c_out, **kw)).double()
    x = torch.randn(3, c_in, 7, dtype=DT)
    with torch.no_grad():
        y = torch.randn_like(model(x))
    loss_fn = nn.MSELoss(reduction="sum")
    errs = kfac_errors(model, loss_fn, x, y, ["0"], groups={"0": kw.get("groups", 1)},
                       kfac_approx="expand", fisher_type="type-2", loss_average=None)
    _record(f"(d) conv1d expand exact {kw}", errs["0"])
    assert errs["0"] <= EXACT_TOL, f"conv1d expand not exact: {errs['0']:.3e}"


# ---------------------------------------------------------------------------------------------
# (e) Loss scaling and cross-entropy
# ---------------------------------------------------------------------------------------------

def test_mean_mse_batch_sequence_expand_exact():
    """MSELoss(mean) divides by N*R*C; kron(G, A) must still equal the exact GGN of that loss."""
    torch.manual_seed(5)
    model = deep_linear([4, 5, 3])
    x = torch.randn(3, 4, 4, dtype=DT)
    y = torch.randn(3, 4, 3, dtype=DT)
    loss_fn = nn.MSELoss(reduction="mean")
    names = linear_names(model)
    errs = kfac_errors(model, loss_fn, x, y, names, kfac_approx="expand", fisher_type="type-2",
                       loss_average="batch+sequence")
    for name, e in errs.items():
        _record(f"(e) MSE mean batch+sequence expand exact layer {name}", e)
        assert e <= EXACT_TOL, f"layer {name}: rel err {e:.3e}"


def test_mean_mse_reduce_setting_exact():
    """Reduce setting with MSELoss(mean) over (N, C) and loss_average='batch'."""
    torch.manual_seed(5)
    model = MeanOverShared(deep_linear([4, 5, 3])).double()
    x = torch.randn(3, 4, 4, dtype=DT)
    y = torch.randn(3, 3, dtype=DT)
    loss_fn = nn.MSELoss(reduction="mean")
    names = linear_names(model)
    errs = kfac_errors(model, loss_fn, x, y, names, kfac_approx="reduce", fisher_type="type-2",
                       loss_average="batch")
    for name, e in errs.items():
        _record(f"(e) MSE mean reduce-setting reduce exact layer {name}", e)
        assert e <= EXACT_TOL, f"layer {name}: rel err {e:.3e}"


def test_mean_mse_batch_no_sharing_exact():
    """Deep linear net on 2-D inputs (no weight sharing), MSELoss(mean): exact (both flavours
    coincide without a weight-sharing dimension)."""
    torch.manual_seed(6)
    model = deep_linear([4, 5, 3, 2])
    x = torch.randn(6, 4, dtype=DT)
    y = torch.randn(6, 2, dtype=DT)
    loss_fn = nn.MSELoss(reduction="mean")
    names = linear_names(model)
    for approx in ("expand", "reduce"):
        errs = kfac_errors(model, loss_fn, x, y, names, kfac_approx=approx,
                           fisher_type="type-2", loss_average="batch")
        for name, e in errs.items():
            _record(f"(e) MSE mean 2-D {approx} exact layer {name}", e)
            assert e <= EXACT_TOL, f"{approx} layer {name}: rel err {e:.3e}"


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_type2_scales_with_reduction(reduction):
    """kron(G, A) is linear in the loss: the mean-reduced result is the sum-reduced one divided
    by the number of averaged terms (N for cross-entropy, numel for MSE)."""
    torch.manual_seed(7)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    x = torch.randn(6, 4, dtype=DT)
    for loss_cls, y, count in [
        (nn.CrossEntropyLoss, torch.randint(0, 3, (6,)), 6),
        (nn.MSELoss, torch.randn(6, 3, dtype=DT), 18),
        (nn.BCEWithLogitsLoss, torch.randint(0, 2, (6, 3)).to(DT), 18),
    ]:
        f_sum = factors(model, loss_cls(reduction="sum"), x, y, fisher_type="type-2",
                        loss_average=None)
        f_mean = factors(model, loss_cls(reduction="mean"), x, y, fisher_type="type-2",
                         loss_average="batch")
        for name in ("0", "2"):
            k_sum = torch.kron(f_sum[name][1], f_sum[name][0])
            k_mean = torch.kron(f_mean[name][1], f_mean[name][0])
            e = rel_err(k_mean, k_sum / count)
            _record(f"(e) {loss_cls.__name__} mean = sum/{count} layer {name}", e)
            assert e <= EXACT_TOL


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_cross_entropy_type2_single_example_exact(reduction):
    """One example, no weight sharing: GGN = a~ a~^T (x) J^T H J = kron(G, A) for every layer of
    any network (here a single linear layer and a tanh MLP)."""
    torch.manual_seed(8)
    loss_fn = nn.CrossEntropyLoss(reduction=reduction)
    la = None if reduction == "sum" else "batch"
    x = torch.randn(1, 4, dtype=DT)
    y = torch.tensor([2])
    for model in (nn.Sequential(nn.Linear(4, 3)).double(),
                  nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()):
        names = linear_names(model)
        for approx in ("expand", "reduce"):
            errs = kfac_errors(model, loss_fn, x, y, names, kfac_approx=approx,
                               fisher_type="type-2", loss_average=la)
            for name, e in errs.items():
                _record(f"(e) CE {reduction} N=1 {approx} {len(names)}-layer exact layer {name}",
                        e)
                assert e <= EXACT_TOL, f"layer {name}: rel err {e:.3e}"


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_binary_cross_entropy_type2_single_example_exact(reduction):
    """nn.BCEWithLogitsLoss, one example: kron(G, A) equals the exact GGN (output Hessian
    diag(p (1 - p)) from torch.func) for every layer, one or several logits."""
    torch.manual_seed(18)
    loss_fn = nn.BCEWithLogitsLoss(reduction=reduction)
    la = None if reduction == "sum" else "batch"
    x = torch.randn(1, 4, dtype=DT)
    for model, y in ((nn.Sequential(nn.Linear(4, 1)).double(), torch.tensor([[1.0]], dtype=DT)),
                     (nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double(),
                      torch.tensor([[0.0, 1.0, 1.0]], dtype=DT))):
        names = linear_names(model)
        errs = kfac_errors(model, loss_fn, x, y, names, kfac_approx="expand",
                           fisher_type="type-2", loss_average=la)
        for name, e in errs.items():
            _record(f"(e) BCE {reduction} N=1 {len(names)}-layer exact layer {name}", e)
            assert e <= EXACT_TOL, f"layer {name}: rel err {e:.3e}"


def test_cross_entropy_type2_batch_structure():
    """Single linear layer, CE(sum), N > 1: the exact GGN is sum_n a~_n a~_n^T (x) H_n, which is
    not a Kronecker product in general; K-FAC gives A = 1/N sum a~ a~^T and G = sum_n H_n, and
    the per-example factors (N = 1 calls) add up to the exact GGN."""
    torch.manual_seed(9)
    model = nn.Sequential(nn.Linear(4, 3)).double()
    x = torch.randn(5, 4, dtype=DT)
    y = torch.randint(0, 3, (5,))
    loss_fn = nn.CrossEntropyLoss(reduction="sum")
    a, g = factors(model, loss_fn, x, y, fisher_type="type-2", loss_average=None)["0"]
    xt = torch.cat([x, torch.ones(5, 1, dtype=DT)], dim=1)
    a_ref = xt.T @ xt / 5
    with torch.no_grad():
        p = torch.softmax(model(x), dim=1)
    g_ref = sum(torch.diag(p[n]) - torch.outer(p[n], p[n]) for n in range(5))
    e_a, e_g = rel_err(a, a_ref), rel_err(g, g_ref)
    _record("(e) CE sum N=5 A = mean a a^T", e_a)
    _record("(e) CE sum N=5 G = sum_n H_n", e_g)
    assert e_a <= EXACT_TOL and e_g <= EXACT_TOL
    exact = exact_ggn_block(model, loss_fn, x, y, "0")
    total = torch.zeros_like(exact)
    for n in range(5):
        an, gn = factors(model, loss_fn, x[n:n + 1], y[n:n + 1], fisher_type="type-2",
                         loss_average=None)["0"]
        total += torch.kron(gn, an)
    e = rel_err(total, exact)
    _record("(e) CE sum N=5 sum of per-example kron = exact", e)
    assert e <= EXACT_TOL
    e_batch = rel_err(torch.kron(g, a), exact)
    _record("(e) CE sum N=5 batch K-FAC NOT exact", e_batch)
    assert e_batch > NOT_EXACT


# ---------------------------------------------------------------------------------------------
# (f) Monte-Carlo Fisher converges to the type-2 result
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("loss_name", ["ce", "mse", "bce"])
def test_mc_fisher_converges_to_type2(loss_name):
    torch.manual_seed(10)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    x = torch.randn(8, 3, dtype=DT)
    if loss_name == "ce":
        loss_fn, y, la = nn.CrossEntropyLoss(reduction="mean"), torch.randint(0, 3, (8,)), "batch"
    elif loss_name == "mse":
        loss_fn, y, la = nn.MSELoss(reduction="sum"), torch.randn(8, 3, dtype=DT), None
    else:
        loss_fn, la = nn.BCEWithLogitsLoss(reduction="mean"), "batch"
        y = torch.randint(0, 2, (8, 3)).to(DT)
    exact = factors(model, loss_fn, x, y, fisher_type="type-2", loss_average=la)
    errs = {}
    for s in (1, 2000):
        gen = torch.Generator().manual_seed(1234)
        mc = factors(model, loss_fn, x, y, fisher_type="mc", mc_samples=s, loss_average=la,
                     generator=gen)
        for name in ("0", "2"):
            # A does not depend on the sampled labels.
            assert rel_err(mc[name][0], exact[name][0]) <= EXACT_TOL
            k_mc = torch.kron(mc[name][1], mc[name][0])
            k_ex = torch.kron(exact[name][1], exact[name][0])
            errs[(s, name)] = _record(f"(f) MC {loss_name} S={s} layer {name}",
                                      rel_err(k_mc, k_ex))
    for name in ("0", "2"):
        assert errs[(2000, name)] <= 0.05, errs
        assert errs[(1, name)] > 3 * errs[(2000, name)], errs
        assert errs[(1, name)] > 0.05, errs
    # Same generator state, same result.
    gen1 = torch.Generator().manual_seed(99)
    gen2 = torch.Generator().manual_seed(99)
    r1 = factors(model, loss_fn, x, y, fisher_type="mc", mc_samples=3, loss_average=la,
                 generator=gen1)
    r2 = factors(model, loss_fn, x, y, fisher_type="mc", mc_samples=3, loss_average=la,
                 generator=gen2)
    for name in r1:
        assert torch.equal(r1[name][1], r2[name][1])


# ---------------------------------------------------------------------------------------------
# (g) Empirical Fisher against hand-computed gradients
# ---------------------------------------------------------------------------------------------

def _per_example_output_grads(layer, loss_fn_sum, x, y):
    """Rows: the gradient of the sum-reduced loss w.r.t. the layer's output, per example (the
    gradient of example n's own summed loss terms)."""
    s = layer(x).detach().requires_grad_(True)
    (grad,) = torch.autograd.grad(loss_fn_sum(s, y), s)
    return grad


@pytest.mark.parametrize("loss_name", ["ce", "mse"])
@pytest.mark.parametrize("n", [1, 4])
@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_empirical_fisher_single_linear(loss_name, n, reduction):
    """Single linear layer, no weight sharing. With L = c * sum_n l_n (c = 1 for sum, 1/N for
    CE mean, 1/numel for MSE mean, l_n the summed loss terms of example n) the empirical Fisher of
    L is c * sum_n grad l_n grad l_n^T = c * sum_n (a~_n a~_n^T) (x) (d_n d_n^T) with
    d_n = dl_n/ds. K-FAC (same normalisation as for the GGN): A = 1/N sum_n a~_n a~_n^T and
    G = c * sum_n d_n d_n^T; for N = 1 kron(G, A) is the empirical Fisher itself."""
    torch.manual_seed(11)
    layer = nn.Linear(4, 3).double()
    model = nn.Sequential(layer)
    x = torch.randn(n, 4, dtype=DT)
    if loss_name == "ce":
        y = torch.randint(0, 3, (n,))
        loss_cls = nn.CrossEntropyLoss
        count = n
    else:
        y = torch.randn(n, 3, dtype=DT)
        loss_cls = nn.MSELoss
        count = 3 * n
    c = 1.0 if reduction == "sum" else 1.0 / count
    loss_fn = loss_cls(reduction=reduction)
    la = None if reduction == "sum" else "batch"
    a, g = factors(model, loss_fn, x, y, fisher_type="empirical", loss_average=la)["0"]
    d = _per_example_output_grads(layer, loss_cls(reduction="sum"), x, y)
    xt = torch.cat([x, torch.ones(n, 1, dtype=DT)], dim=1)
    a_ref = xt.T @ xt / n
    g_ref = c * d.T @ d
    e_a, e_g = rel_err(a, a_ref), rel_err(g, g_ref)
    _record(f"(g) empirical {loss_name} {reduction} N={n} A", e_a)
    _record(f"(g) empirical {loss_name} {reduction} N={n} G", e_g)
    assert e_a <= EXACT_TOL, e_a
    assert e_g <= EXACT_TOL, e_g
    if n == 1:
        # For one example this is exactly the empirical Fisher of the loss as computed: the
        # outer product of the parameter gradient of L, divided by c (Fisher of c * l is c times
        # the outer product of grad l).
        loss = loss_fn(layer(x), y)
        gw, gb = torch.autograd.grad(loss, [layer.weight, layer.bias])
        flat = torch.cat([gw, gb[:, None]], dim=1).reshape(-1)
        ef = torch.outer(flat, flat) / c
        e = rel_err(torch.kron(g, a), ef)
        _record(f"(g) empirical {loss_name} {reduction} N=1 kron = EF", e)
        assert e <= EXACT_TOL


# ---------------------------------------------------------------------------------------------
# (h) In-place activation after a captured layer
# ---------------------------------------------------------------------------------------------

def test_inplace_relu_captures_preactivation_gradient():
    torch.manual_seed(12)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(inplace=True), nn.Linear(6, 3)).double()
    ref = copy.deepcopy(model)
    ref[1] = nn.ReLU(inplace=False)
    n = 5
    x = torch.randn(n, 4, dtype=DT)
    y = torch.randn(n, 3, dtype=DT)
    loss_fn = nn.MSELoss(reduction="sum")
    fac = factors(model, loss_fn, x, y, fisher_type="empirical", loss_average=None)
    # manual: gradient w.r.t. the pre-activation output of the first Linear
    s0 = ref[0](x)
    h = torch.relu(s0)
    out = ref[2](h)
    d0, dh = torch.autograd.grad(loss_fn(out, y), [s0, h])
    assert (s0 < 0).any()  # the test can tell the pre- from the post-activation gradient
    g0_ref = d0.T @ d0
    g0_wrong = dh.T @ dh
    assert rel_err(g0_wrong, g0_ref) > NOT_EXACT
    e = rel_err(fac["0"][1], g0_ref)
    _record("(h) inplace ReLU: G of first Linear vs pre-activation grads", e)
    assert e <= EXACT_TOL, f"G(0) rel err {e:.3e} (vs post-activation grads: " \
                           f"{rel_err(fac['0'][1], g0_wrong):.3e})"
    # A of the second layer is built from the activated values
    ht = torch.cat([h.detach(), torch.ones(n, 1, dtype=DT)], dim=1)
    e_a = rel_err(fac["2"][0], ht.T @ ht / n)
    _record("(h) inplace ReLU: A of second Linear", e_a)
    assert e_a <= EXACT_TOL
    st = torch.cat([x, torch.ones(n, 1, dtype=DT)], dim=1)
    assert rel_err(fac["0"][0], st.T @ st / n) <= EXACT_TOL
    # type-2 with one example is exact for every layer (compare with the non-inplace copy)
    fac2 = factors(model, loss_fn, x[:1], y[:1], fisher_type="type-2", loss_average=None)
    exact = exact_ggn_blocks(ref, loss_fn, x[:1], y[:1], ["0", "2"])
    for name in ("0", "2"):
        e2 = rel_err(torch.kron(fac2[name][1], fac2[name][0]), exact[name])
        _record(f"(h) inplace ReLU: type-2 N=1 exact layer {name}", e2)
        assert e2 <= EXACT_TOL
    # the model still computes the right function after the call (hooks removed, no side
    # effects on the parameters' gradients)
    assert all(p.grad is None for p in model.parameters())
    with torch.no_grad():
        assert torch.allclose(model(x), ref(x))
