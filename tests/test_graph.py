"""Linear layers in GraphNetwork-style blocks (Eschenhagen et al. (2023), Eq. 55, App. B.4): rows of
graphs of different sizes concatenated, the graph of each row named with
``kfac_kernels.graph_rows``.

Oracles (float64): a per-graph Python loop (each graph run on its own, its rows' inputs and output
gradients taken from plain autograd, the Eq. 55 sums formed from them), and the exact GGN where
Lemma 5 of Eschenhagen et al. (2023) makes K-FAC-reduce exact (a linear node layer, a sum over each
graph's nodes and a linear readout: b_hat_n = sqrt(R_n) D, so exact when all R_n are equal, and not
otherwise).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kfac_kernels import BDKFAC, KFAC, TwoLevel, graph_rows, kronecker_factors

try:
    from _ggn import exact_ggn_block, rel_err
except ImportError:  # pragma: no cover
    from tests._ggn import exact_ggn_block, rel_err

DT = torch.float64
EXACT_TOL = 1e-10
NOT_EXACT = 1e-3


class GraphNet(nn.Module):
    """Node update ``act(node(x))``, a sum over each graph's nodes, a linear readout."""

    def __init__(self, index, num_graphs, d=3, h=4, c=2, act=torch.tanh):
        super().__init__()
        self.node = nn.Linear(d, h).to(DT)
        self.readout = nn.Linear(h, c).to(DT)
        self.index, self.num_graphs, self.act = index, num_graphs, act

    def forward(self, x):
        h = self.act(self.node(x))
        pooled = h.new_zeros(self.num_graphs, h.shape[1]).index_add(0, self.index, h)
        return self.readout(pooled)


def _batch(sizes, seed=0):
    torch.manual_seed(seed)
    index = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
    perm = torch.randperm(index.numel())  # rows of a graph need not be contiguous
    return torch.randn(index.numel(), 3, dtype=DT), index[perm]


def _per_graph_factors(model, x, index, y, kfac_approx):
    """Eq. 55 (reduce) / App. B.4 (expand) from a loop over the graphs, one at a time."""
    a_rows, g_rows = [], []
    for n in range(model.num_graphs):
        xn = x[index == n]
        s = model.node(xn)
        s.retain_grad()
        out = model.readout(model.act(s).sum(0))
        F.mse_loss(out, y[n], reduction="sum").backward()
        a = torch.cat([xn, torch.ones(len(xn), 1, dtype=DT)], dim=1)
        b = s.grad
        if kfac_approx == "reduce":
            a, b = a.sum(0, keepdim=True) / len(xn) ** 0.5, b.sum(0, keepdim=True) / len(xn) ** 0.5
        a_rows.append(a)
        g_rows.append(b)
    a, b = torch.cat(a_rows), torch.cat(g_rows)
    return a.T @ a / len(a), b.T @ b


@pytest.mark.parametrize("kfac_approx", ["expand", "reduce"])
def test_factors_match_per_graph_loop(kfac_approx):
    sizes = [3, 1, 5, 2]
    x, index = _batch(sizes)
    model = GraphNet(index, len(sizes))
    y = torch.randn(len(sizes), 2, dtype=DT)
    with graph_rows(index, modules=model.node):
        a, g = kronecker_factors(model, nn.MSELoss(reduction="sum"), x, y,
                                 kfac_approx=kfac_approx, loss_average=None)["node"]
    a_ref, g_ref = _per_graph_factors(model, x, index, y, kfac_approx)
    assert rel_err(a, a_ref) < EXACT_TOL
    assert rel_err(g, g_ref) < EXACT_TOL
    # Outside the context the rows are plain examples: reduce then differs.
    a_plain, _ = kronecker_factors(model, nn.MSELoss(reduction="sum"), x, y,
                                   kfac_approx=kfac_approx, loss_average=None)["node"]
    assert (rel_err(a_plain, a_ref) > NOT_EXACT) == (kfac_approx == "reduce")


@pytest.mark.parametrize("sizes,exact", [([2, 2, 2], True), ([1], True), ([1, 3, 2], False)])
def test_reduce_is_exact_for_equal_graph_sizes(sizes, exact):
    x, index = _batch(sizes, seed=1)
    model = GraphNet(index, len(sizes), act=lambda t: t)
    y = torch.randn(len(sizes), 2, dtype=DT)
    loss = nn.MSELoss(reduction="sum")
    with graph_rows(index, modules=[model.node]):
        a, g = kronecker_factors(model, loss, x, y, kfac_approx="reduce",
                                 fisher_type="type-2", loss_average=None)["node"]
    err = rel_err(torch.kron(g, a), exact_ggn_block(model, loss, x, y, "node"))
    assert (err < EXACT_TOL) if exact else (err > NOT_EXACT), err


def test_kfac_batch_average_counts_graphs():
    """``loss_average="batch"`` with ``loss.backward()``: the multiplier is the number of
    graphs (the examples), as kronecker_factors' exact loss coefficient gives."""
    sizes = [3, 1, 4]
    x, index = _batch(sizes, seed=2)
    model = GraphNet(index, len(sizes))
    y = torch.tensor([0, 1, 1])
    precond = KFAC(model, damping=1e-3, kfac_approx="reduce", skip_modules=["readout"])
    with graph_rows(index, modules=model.node):
        F.cross_entropy(model(x), y).backward()
    precond.step()
    with graph_rows(index, modules=model.node):
        want = kronecker_factors(model, nn.CrossEntropyLoss(), x, y, kfac_approx="reduce")
    for got, ref in zip(precond.factors["node"], want["node"]):
        assert rel_err(got[0], ref) < EXACT_TOL


def test_block_diagonal_factors_of_graph_batches():
    """BD-KFAC reads the same graph rows as K-FAC: its blocks are the diagonal blocks of the
    dense graph factors (both approximations)."""
    sizes = [3, 1, 4]
    x, index = _batch(sizes, seed=3)
    y = torch.tensor([0, 1, 1])
    for approx in ("expand", "reduce"):
        model = GraphNet(index, len(sizes))
        dense = KFAC(model, kfac_approx=approx, skip_modules=["readout"])
        block = BDKFAC(model, num_blocks=2, kfac_approx=approx, skip_modules=["readout"])
        with graph_rows(index, modules=model.node):
            F.cross_entropy(model(x), y).backward()
        dense.step()
        block.step()
        a, g = dense.factors["node"]
        bd = block.blocks["node"]
        for blocks_, full, widths in ((block.factors["node"][0], a, bd.a_layout.widths),
                                      (block.factors["node"][1], g, bd.g_layout.widths)):
            start = 0
            for blk, w in zip(blocks_, widths):
                assert rel_err(blk, full[:, start:start + w, start:start + w]) < EXACT_TOL
                start += w


def test_nested_contexts_and_errors():
    x, index = _batch([2, 3])
    model = GraphNet(index, 2)
    with pytest.raises(ValueError, match=r"graph_rows: index must be a 1-D integer tensor"):
        with graph_rows(index.double(), modules=model.node):
            pass
    with pytest.raises(ValueError, match=r"graph_rows: num_graphs must be an int >= "
                       r"index.max\(\) \+ 1 = 2, got 1"):
        with graph_rows(index, modules=model.node, num_graphs=1):
            pass
    with pytest.raises(TypeError, match="graph_rows: modules must be"):
        with graph_rows(index, modules=3):
            pass
    y = torch.randn(2, 2, dtype=DT)
    with pytest.raises(ValueError, match=r"graph_rows: module 'node' got an input of shape "
                       r"\(5, 3\); expected \(rows, features\) with rows = len\(index\) = 4"):
        with graph_rows(index[:4], modules=model.node):
            kronecker_factors(model, nn.MSELoss(), x, y)
    with graph_rows(index[:4], modules=model):       # outer: wrong, shadowed by the inner
        with graph_rows(index, modules=model.node):
            kronecker_factors(model, nn.MSELoss(), x, y, skip_modules=["readout"])
    two = TwoLevel(KFAC(model))
    with pytest.raises(ValueError, match=r"TwoLevel: module 'node' runs inside graph_rows"):
        with graph_rows(index, modules=model.node):
            model(x)
    two.remove_hooks()
    two.inner.remove_hooks()
