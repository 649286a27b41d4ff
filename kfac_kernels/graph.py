"""Linear layers inside GraphNetwork-style blocks: rows of several graphs concatenated.

A node (edge) update ``nn.Linear`` of a batched GraphNetwork sees an input ``(R_M, D)``: the
nodes (edges) of ``M`` graphs concatenated, graph ``n`` owning ``R_n`` of the rows. Its
weight-sharing dim differs between graphs, so the batch structure must be named: inside ::

    with kfac_kernels.graph_rows(batch_index, modules=[model.node_mlp]):
        out = model(graphs)

every ``nn.Linear`` in ``modules`` (and their submodules) treats row ``i`` of its input as
belonging to graph ``batch_index[i]`` (a 1-D integer tensor of length ``R_M``, values in
``[0, num_graphs)``). The backward pass may run after the block is left. Contexts nest (one for
the node layers, one for the edge layers); the innermost that names a module wins.

* expand (Eschenhagen et al. (2023), App. B.4): every row is an example,
  ``A = sum_rows a a^T / R_M``.
* reduce (Eschenhagen et al. (2023), Eq. 55): per graph
  ``a_hat_n = sum_{r} a_{n,r} / sqrt(R_n)`` and
  ``b_hat_n = sum_r b_{n,r} / sqrt(R_n)`` (a scatter-sum scaled by ``1/sqrt(R_n)``; the bias
  coordinate becomes ``sqrt(R_n)``), ``A = sum_n a_hat a_hat^T / N`` and ``G = m sum_n b_hat
  b_hat^T`` over the ``N`` graphs that have rows.

For ``loss_average="batch"`` the multiplier ``m`` is the number of graphs, not of rows.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterable

import torch
from torch import nn


@dataclass(frozen=True, eq=False)
class GraphRows:
    """The graph of every input row of the layers in ``module_ids``."""

    index: torch.Tensor
    num_graphs: int
    module_ids: frozenset


_ACTIVE: list[GraphRows] = []


@contextmanager
def graph_rows(index: torch.Tensor, modules: nn.Module | Iterable[nn.Module],
               num_graphs: int | None = None):
    """Name the graph of every input row of the linear layers in ``modules`` (see the module
    docstring). ``num_graphs`` defaults to ``index.max() + 1``."""
    who = "graph_rows"
    if not isinstance(index, torch.Tensor) or index.dim() != 1 or index.dtype.is_floating_point \
            or index.dtype.is_complex or index.dtype == torch.bool:
        got = (f"{index.dtype} of shape {tuple(index.shape)}" if isinstance(index, torch.Tensor)
               else type(index).__name__)
        raise ValueError(f"{who}: index must be a 1-D integer tensor (the graph of each row), "
                         f"got {got}")
    if isinstance(modules, nn.Module):
        modules = [modules]
    try:
        modules = list(modules)
    except TypeError:
        raise TypeError(f"{who}: modules must be an nn.Module or an iterable of them, got "
                        f"{type(modules).__name__}") from None
    if not modules or not all(isinstance(m, nn.Module) for m in modules):
        raise TypeError(f"{who}: modules must be a non-empty iterable of nn.Module")
    index = index.detach().long()
    if index.numel() and int(index.min()) < 0:
        raise ValueError(f"{who}: index must be non-negative, got a minimum of {int(index.min())}")
    top = int(index.max()) + 1 if index.numel() else 0
    if num_graphs is None:
        num_graphs = top
    elif isinstance(num_graphs, bool) or not isinstance(num_graphs, int) or num_graphs < top:
        raise ValueError(f"{who}: num_graphs must be an int >= index.max() + 1 = {top}, got "
                         f"{num_graphs!r}")
    ids = frozenset(id(sub) for m in modules for sub in m.modules())
    entry = GraphRows(index, num_graphs, ids)
    _ACTIVE.append(entry)
    try:
        yield entry
    finally:
        _ACTIVE.remove(entry)


def active_graph_rows(module: nn.Module) -> GraphRows | None:
    for entry in reversed(_ACTIVE):
        if id(module) in entry.module_ids:
            return entry
    return None


def graph_sums(rows: torch.Tensor, spec: GraphRows) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-graph ``sum_r rows / sqrt(R_n)`` of the graphs with rows, and their ``R_n``."""
    index = spec.index.to(rows.device)
    sums = rows.new_zeros((spec.num_graphs, rows.shape[-1])).index_add_(0, index, rows)
    counts = torch.bincount(index, minlength=spec.num_graphs)
    present = counts > 0
    scale = counts[present].to(rows.dtype).rsqrt()
    return sums[present] * scale[:, None], counts[present]


def check_rows(name: str, x: torch.Tensor, spec: GraphRows) -> None:
    if x.dim() != 2 or x.shape[0] != spec.index.numel():
        raise ValueError(f"graph_rows: module {name!r} got an input of shape {tuple(x.shape)}; "
                         f"expected (rows, features) with rows = len(index) = "
                         f"{spec.index.numel()}")
