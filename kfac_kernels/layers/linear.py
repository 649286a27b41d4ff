"""``nn.Linear``: the dims between the batch dim and the features are the weight-sharing dim.

Inside :func:`kfac_kernels.graph_rows` the rows of a ``Linear`` belong to graphs instead: every
row is an example for expand, and reduce sums each graph's rows scaled by ``1/sqrt(R_n)``
(Eschenhagen et al. (2023), Eq. 55); an example is then a graph (``loss_average="batch"`` means
a mean over graphs).
"""
from __future__ import annotations

import torch

from ..graph import active_graph_rows, check_rows, graph_sums
from .base import LayerAdapter, with_ones


class LinearAdapter(LayerAdapter):
    """``nn.Linear`` on inputs ``(*, d_in)``: the dims between the batch dim and the features are
    the weight-sharing dim ``R`` (their product); a 1-D input is one example."""

    rows_statistics = True

    @staticmethod
    def _split(t: torch.Tensor) -> torch.Tensor:
        if t.dim() == 1:
            return t.reshape(1, 1, 1, -1)
        return t.reshape(1, t.shape[0], -1, t.shape[-1])

    def input_positions(self, x: torch.Tensor) -> torch.Tensor:
        return self._split(x)

    def batched_output(self, g: torch.Tensor) -> torch.Tensor:
        return g.unsqueeze(0) if g.dim() == 1 else g

    # --- graph batches ------------------------------------------------------------------------
    def forward_context(self, module):
        return active_graph_rows(module)

    def input_rows(self, x, approx, context=None):
        if context is None:
            return super().input_rows(x, approx)
        check_rows(self.name, x, context)
        rows = x
        if self.bias is not None:
            rows = with_ones(rows)
        if approx == "reduce":
            rows, _ = graph_sums(rows, context)
        return rows.unsqueeze(0), rows.shape[0]

    def bias_free_input_rows(self, x, approx, context=None):
        # in a graph batch, reduce rows sum the bias coordinate too (not ones): no shortcut
        return super().bias_free_input_rows(x, approx) if context is None else None

    def output_rows(self, grad, approx, context=None, groups=None):
        if context is None:
            return super().output_rows(grad, approx, groups=groups)
        rows = grad
        if approx == "reduce":
            rows, _ = graph_sums(rows, context)
        return rows.unsqueeze(0)

    def batch_and_positions(self, grad, context=None):
        if context is None:
            return super().batch_and_positions(grad)
        graphs = int((torch.bincount(context.index, minlength=context.num_graphs) > 0).sum())
        return graphs, (grad.shape[0] / graphs if graphs else 0)
