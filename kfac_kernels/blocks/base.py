"""The curvature block: the curvature of one layer in one factor structure.

A block is a consumer of the :class:`~kfac_kernels.capture.Capture` (it receives the layer's
inputs and output gradients and accumulates the step's statistics in its own layout), and it
owns everything that follows: the moving averages of its factors, their decomposition, the
preconditioned gradient, its share of the distributed work and its checkpoint state. The
optimizers (:class:`~kfac_kernels.KFAC`, :class:`~kfac_kernels.SINGD`) drive blocks; a new
factor structure is a new block class and an entry in :data:`kfac_kernels.blocks.BLOCKS`.
"""
from __future__ import annotations

import torch

from ..layers import LayerAdapter, Layout, StepSums


class CurvatureBlock:
    """Base class: the capture side (per-step :class:`~kfac_kernels.layers.StepSums` in the
    block's layouts) shared by every structure.

    Subclasses set :meth:`layouts` and implement the factor update, decomposition,
    preconditioning and state (see :class:`~kfac_kernels.blocks.KroneckerBlock`).
    """

    #: the name of the structure in :data:`kfac_kernels.blocks.BLOCKS`
    structure = "abstract"

    def __init__(self, name: str, adapter: LayerAdapter, *, approx: str, dtype: torch.dtype,
                 backend: str = "auto", **options):
        self.name = name
        self.adapter = adapter
        self.approx = approx
        self.dtype = dtype
        self.backend = backend
        a_layout, g_layout = self.layouts(adapter, **options)
        self.a_layout = getattr(adapter, "layout_override", _no_override)("A", approx) or a_layout
        self.g_layout = getattr(adapter, "layout_override", _no_override)("G", approx) or g_layout
        self.pending: StepSums | None = None

    @classmethod
    def layouts(cls, adapter: LayerAdapter, **options) -> tuple[Layout, Layout]:
        """The layouts of the A and G statistics this structure accumulates."""
        raise NotImplementedError

    # --- capture consumer -----------------------------------------------------------------------
    def _sums(self) -> StepSums:
        if self.pending is None:
            self.pending = StepSums(self.a_layout, self.g_layout, self.dtype)
        return self.pending

    def add_forward(self, adapter, x, context, index) -> None:
        adapter.accumulate_forward(self._sums(), x, self.approx, self.backend, context)

    def add_backward(self, adapter, grad, context, index, multiplier, group) -> None:
        adapter.accumulate_backward(self._sums(), grad, self.approx, self.backend, multiplier,
                                    context, group)

    def discard_pending(self) -> None:
        self.pending = None

    @property
    def device(self) -> torch.device:
        return self.adapter.weight.device

    @property
    def groups(self) -> int:
        return self.adapter.groups


def _no_override(side, approx):
    return None
