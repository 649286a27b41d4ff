"""Curvature capture: forward hooks for layer inputs, tensor hooks for output gradients.

The gradient w.r.t. a module's output is read from a hook on the output *tensor*, registered in
the module's forward hook. Such a hook sees the gradient of the tensor as it was when the hook was
registered, so a following ``nn.ReLU(inplace=True)`` (which makes module backward hooks fail) is
handled: the factor receives the gradient w.r.t. the pre-activation output.

Both sides are accumulated as sums by the kernel-backed ops -- :func:`kfac_kernels.ops.patch_covariance`
for convolution inputs (never unfolded), :func:`kfac_kernels.ops.symmetric_factor_update` for linear
inputs and :func:`kfac_kernels.ops.gradient_covariance` for output gradients -- so several forward/backward passes before a step (a module called twice, gradient
accumulation, type-2 and MC backward passes) add up:

* ``A = (sum of input rows' outer products) / (number of rows)`` -- the average input second
  moment of seed 001, Eq. 7 (expand) and Eq. 10 (reduce).
* ``G = multiplier * (sum of output-gradient rows' outer products)``, where the multiplier turns
  gradients of the user's loss ``L = c * sum(per-example losses)`` into the curvature of ``L``:
  ``1/c`` for the empirical Fisher (``loss_average``: ``None`` -> 1, ``"batch"`` -> ``N``,
  ``"batch+sequence"`` -> ``N * R``), and ``1`` (type-2) or ``1/mc_samples`` (MC) when the
  backward vectors are already columns of a factorisation of the Hessian of ``L``.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Callable

import torch

from .graph import GraphRows, active_graph_rows, check_rows, graph_sums
from .layers import LayerAdapter, LinearAdapter
from .ops.gradient_covariance import gradient_covariance
from .ops.symmetric_factor_update import symmetric_factor_update

LOSS_AVERAGES = (None, "batch", "batch+sequence")
KFAC_APPROXES = ("expand", "reduce")


@dataclass
class Accumulator:
    """Unnormalised per-step sums for one layer (stacked over groups)."""

    a_sum: torch.Tensor | None = None
    a_rows: int = 0
    g_sum: torch.Tensor | None = None
    g_passes: int = 0
    # Tied embedding/output weights: token counts of the embedding use (vocabulary side), and
    # the embedding use's output-gradient second moments (feature side; scaled like G, so kept
    # apart from the input sums: across processes they are averaged, the input sums added).
    token_counts: torch.Tensor | None = None
    tied_a_sum: torch.Tensor | None = None

    def input_sum(self) -> torch.Tensor | None:
        """``a_sum`` plus, for a tied weight, the embedding use's part."""
        if self.tied_a_sum is None:
            return self.a_sum
        return self.tied_a_sum if self.a_sum is None else self.a_sum + self.tied_a_sum


def default_factor_dtype(param: torch.Tensor) -> torch.dtype:
    """Factors of low-precision layers are kept in fp32; fp32/fp64 layers keep their dtype."""
    return torch.float32 if param.dtype in (torch.float16, torch.bfloat16) else param.dtype


class CurvatureCapture:
    """Hooks that accumulate the Kronecker factors of a set of layers.

    Args:
        adapters: qualified module name -> adapter.
        kfac_approx: ``"expand"`` or ``"reduce"``.
        loss_average: how the user's loss was reduced (see module docstring).
        factor_dtype: dtype of factors, or ``None`` for :func:`default_factor_dtype`.
        backend: kernel backend for the accumulation.
        loss_scale: callable returning the current loss scale of a GradScaler (or ``None``);
            output gradients are divided by it.
        train_only: capture only from modules in training mode (so evaluation forwards run with
            gradients enabled do not leak into an optimizer's factors).
    """

    def __init__(self, adapters: dict[str, LayerAdapter], *, kfac_approx: str = "expand",
                 loss_average: str | None = "batch", factor_dtype: torch.dtype | None = None,
                 backend: str = "auto", loss_scale: Callable[[], float | None] | None = None,
                 train_only: bool = False):
        self.adapters = adapters
        self.kfac_approx = kfac_approx
        self.loss_average = loss_average
        self.factor_dtype = factor_dtype
        self.backend = backend
        self.loss_scale = loss_scale
        self.train_only = train_only
        self.capture_inputs = True
        self.capture_grads = True
        # When set, every captured output gradient is weighted by this instead of 1/c.
        self.grad_multiplier: float | None = None
        # Micro-batches per optimizer step whose losses the user averaged (gradient
        # accumulation): the loss is the mean over all of them, so 1/c grows by this factor.
        self.accumulation_steps = 1
        self.acc: dict[str, Accumulator] = {name: Accumulator() for name in adapters}
        self._handles: list = []

    # --- hook management ----------------------------------------------------------------------
    def attach(self) -> "CurvatureCapture":
        from .transformer_layers import TiedEmbeddingAdapter
        attention: dict[int, tuple] = {}
        for name, adapter in self.adapters.items():
            mha = getattr(adapter, "attention_module", None)
            if mha is not None:  # fed by one hook on the attention module
                attention.setdefault(id(mha), (mha, {}))[1][adapter.attention_role] = name
                continue
            self._handles.append(
                adapter.module.register_forward_hook(partial(self._forward_hook, name)))
            if isinstance(adapter, TiedEmbeddingAdapter):
                self._handles.append(adapter.embedding.register_forward_hook(
                    partial(self._tied_embedding_hook, name)))
        for mha, names in attention.values():
            self._handles.append(mha.register_forward_pre_hook(self._attention_pre_hook))
            self._handles.append(mha.register_forward_hook(
                partial(self._attention_hook, names), with_kwargs=True))
        return self

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def __enter__(self) -> "CurvatureCapture":
        return self.attach()

    def __exit__(self, *exc) -> None:
        self.detach()

    def reset(self) -> None:
        self.acc = {name: Accumulator() for name in self.adapters}

    # --- hooks --------------------------------------------------------------------------------
    def dtype_of(self, name: str) -> torch.dtype:
        return self.factor_dtype or default_factor_dtype(self.adapters[name].weight)

    def _active(self, name: str, module) -> bool:
        if not torch.is_grad_enabled() or not self.adapters[name].trainable:
            return False
        if self.train_only and not module.training:
            return False
        return self.capture_inputs or self.capture_grads

    def _forward_hook(self, name: str, module, args, output) -> None:
        if not self._active(name, module):
            return
        adapter = self.adapters[name]
        graph = active_graph_rows(module)
        if graph is not None:
            self._graph_forward(name, adapter, args[0].detach(), output, graph)
            return
        if self.capture_inputs:
            acc = self.acc[name]
            acc.a_sum, count = adapter.accumulate_input(acc.a_sum, args[0].detach(),
                                                        self.kfac_approx, self.dtype_of(name),
                                                        self.backend)
            acc.a_rows += count
        if isinstance(output, torch.Tensor) and output.requires_grad:
            output.register_hook(partial(self._grad_hook, name))

    def multiplier(self, n: int, r: int) -> float:
        """Weight of ``g g^T`` for an output gradient of ``n`` examples and ``r`` positions."""
        if self.grad_multiplier is not None:
            multiplier = self.grad_multiplier
        elif self.loss_average is None:
            multiplier = 1.0
        elif self.loss_average == "batch":
            multiplier = float(n * self.accumulation_steps)
        else:
            multiplier = float(n * r * self.accumulation_steps)
        scale = self.loss_scale() if self.loss_scale is not None else None
        if scale:
            multiplier /= float(scale) ** 2
        return multiplier

    def _grad_hook(self, name: str, grad: torch.Tensor) -> None:
        if not self.capture_grads:
            return
        adapter = self.adapters[name]
        n, r = adapter.batch_and_positions(grad)
        if n * r == 0:
            return
        multiplier = self.multiplier(n, r)
        acc = self.acc[name]
        acc.g_sum = adapter.accumulate_output(acc.g_sum, grad.detach(), self.kfac_approx,
                                              self.dtype_of(name), multiplier, self.backend)
        acc.g_passes += 1

    # --- graph batches (kfac_kernels.graph) -----------------------------------------------------
    def _graph_forward(self, name: str, adapter, x: torch.Tensor, output,
                       graph: GraphRows) -> None:
        if type(adapter) is not LinearAdapter:
            raise ValueError(f"graph_rows: module {name!r} is a {type(adapter).__name__}; graph "
                             "batches are supported for the dense nn.Linear factors of KFAC "
                             "and kronecker_factors")
        check_rows(name, x, graph)
        dtype = self.dtype_of(name)
        if self.capture_inputs and x.shape[0]:
            rows = x.to(dtype)
            if adapter.bias is not None:
                rows = torch.cat([rows, rows.new_ones((rows.shape[0], 1))], dim=1)
            if self.kfac_approx == "reduce":
                rows, _ = graph_sums(rows, graph)
            acc = self.acc[name]
            decay = 0.0 if acc.a_sum is None else 1.0
            acc.a_sum = symmetric_factor_update(acc.a_sum, rows.unsqueeze(0), decay, 1.0,
                                                backend=self.backend)
            acc.a_rows += rows.shape[0]
        if isinstance(output, torch.Tensor) and output.requires_grad:
            output.register_hook(partial(self._graph_grad_hook, name, graph))

    def _graph_grad_hook(self, name: str, graph: GraphRows, grad: torch.Tensor) -> None:
        if not self.capture_grads or grad.shape[0] == 0:
            return
        rows = grad.detach().to(self.dtype_of(name))
        sums, counts = graph_sums(rows, graph)
        # Examples are graphs: loss_average="batch" means a mean over graphs, and
        # "batch+sequence" a mean over all rows.
        multiplier = self.multiplier(counts.numel(), rows.shape[0] / counts.numel())
        if self.kfac_approx == "reduce":
            rows = sums
        acc = self.acc[name]
        decay = 0.0 if acc.g_sum is None else 1.0
        acc.g_sum = symmetric_factor_update(acc.g_sum, rows.unsqueeze(0), decay, multiplier,
                                            backend=self.backend)
        acc.g_passes += 1

    # --- nn.MultiheadAttention (kfac_kernels.transformer_layers) --------------------------------
    def _attention_pre_hook(self, module, args) -> None:
        # The recomputation in _attention_hook replays the dropout masks of the original call.
        if module.training and module.dropout > 0 and torch.is_grad_enabled():
            cuda = None
            if torch.cuda.is_available() and args and args[0].is_cuda:
                cuda = torch.cuda.get_rng_state(args[0].device)
            module._kfac_rng_state = (torch.random.get_rng_state(), cuda)
        else:
            module._kfac_rng_state = None

    def _attention_hook(self, names: dict, module, args, kwargs, output):
        from .transformer_layers import attention_forward
        rng = getattr(module, "_kfac_rng_state", None)
        module._kfac_rng_state = None
        wanted = {role: name for role, name in names.items() if self._active(name, module)}
        if not wanted:
            return None
        return attention_forward(self, module, args, kwargs, wanted, rng)

    def add_grouped_inputs(self, name: str, sources: list[torch.Tensor]) -> None:
        """Input rows of a grouped adapter, one ``(N, R_g, D)`` tensor per group. The groups'
        sums are normalised by the first group's row count (sums of groups with another count
        are rescaled so that each group's ``A`` is its own mean)."""
        if not self.capture_inputs:
            return
        adapter = self.adapters[name]
        dtype = self.dtype_of(name)
        parts, counts = [], []
        for group, src in enumerate(sources):
            rows, count = adapter.input_rows(src, adapter.group_approx(group, self.kfac_approx))
            rows = rows.to(dtype)
            parts.append(torch.einsum("gri,grj->gij", rows, rows))
            counts.append(count)
        if counts[0] == 0:
            return
        total = torch.cat([p * (counts[0] / c if c else 0.0) for p, c in zip(parts, counts)])
        acc = self.acc[name]
        acc.a_sum = total if acc.a_sum is None else acc.a_sum + total
        acc.a_rows += counts[0]

    def grouped_grad(self, name: str, group: int, grad: torch.Tensor) -> None:
        """Output-gradient rows ``(N, R, d_g)`` of one group of a grouped adapter."""
        if not self.capture_grads:
            return
        adapter = self.adapters[name]
        n, r = adapter.batch_and_positions(grad)
        if n * r == 0:
            return
        dtype = self.dtype_of(name)
        part = gradient_covariance(grad.detach(), channel_dim=-1, groups=1,
                                   mode=adapter.group_approx(group, self.kfac_approx),
                                   factor=None, decay=1.0,
                                   alpha=self.multiplier(n, r), out_dtype=dtype,
                                   backend=self.backend)[0]
        acc = self.acc[name]
        if acc.g_sum is None:
            d = adapter.out_features_per_group
            acc.g_sum = torch.zeros((adapter.groups, d, d), dtype=dtype, device=grad.device)
        acc.g_sum[group] += part
        acc.g_passes += 1

    def feed(self, name: str, x: torch.Tensor, output: torch.Tensor | None,
             grad_transform) -> None:
        """Input ``x`` of an adapter whose module is applied functionally, and the output
        tensor whose gradient (passed through ``grad_transform``) feeds ``G``."""
        adapter = self.adapters[name]
        if self.capture_inputs:
            acc = self.acc[name]
            acc.a_sum, count = adapter.accumulate_input(acc.a_sum, x, self.kfac_approx,
                                                        self.dtype_of(name), self.backend)
            acc.a_rows += count
        if output is not None:
            output.register_hook(lambda g: self._grad_hook(name, grad_transform(g)))

    # --- tied embedding / output projection ------------------------------------------------------
    def _tied_embedding_hook(self, name: str, module, args, output) -> None:
        """The embedding use of a tied weight: token counts go to the vocabulary side (G),
        output gradients to the feature side (A) as extra rows (seed 003 App. A.1)."""
        if not self._active(name, module):
            return
        acc = self.acc[name]
        adapter = self.adapters[name]
        if self.capture_inputs:
            counts = torch.bincount(args[0].detach().reshape(-1),
                                    minlength=adapter.weight.shape[0]).to(self.dtype_of(name))
            acc.token_counts = counts if acc.token_counts is None else acc.token_counts + counts
        if isinstance(output, torch.Tensor) and output.requires_grad:
            output.register_hook(partial(self._tied_embedding_grad_hook, name))

    def _tied_embedding_grad_hook(self, name: str, grad: torch.Tensor) -> None:
        if not self.capture_grads:
            return
        adapter = self.adapters[name]
        g = grad.detach().reshape(-1, grad.shape[-1]) if grad.dim() > 1 else grad.reshape(1, -1)
        if g.shape[0] == 0:
            return
        n = grad.shape[0] if grad.dim() > 1 else 1
        dtype = self.dtype_of(name)
        part = gradient_covariance(g, channel_dim=-1, groups=1, mode="expand", factor=None,
                                   decay=1.0, alpha=self.multiplier(n, g.shape[0] // n),
                                   out_dtype=dtype, backend=self.backend)
        width = adapter.in_features_per_group
        if width != part.shape[-1]:  # the head's bias coordinate: 0 for embedding rows
            part = torch.nn.functional.pad(part, (0, width - part.shape[-1]) * 2)
        acc = self.acc[name]
        acc.tied_a_sum = part if acc.tied_a_sum is None else acc.tied_a_sum + part
        acc.a_rows += g.shape[0]

    # --- results ------------------------------------------------------------------------------
    def factors(self, name: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(A, G)`` stacked over groups, or ``None`` if either side saw no data."""
        acc = self.acc[name]
        a_sum = acc.input_sum()
        if a_sum is None or acc.g_sum is None or acc.a_rows == 0:
            return None
        g = acc.g_sum
        if acc.token_counts is not None or getattr(self.adapters[name], "tied", False):
            # The vocabulary side of a tied weight is diagonal (seed 003 App. A.1).
            diag = torch.diagonal(g, dim1=-2, dim2=-1)
            if acc.token_counts is not None:
                diag = diag + acc.token_counts
            g = torch.diag_embed(diag)
        return a_sum / acc.a_rows, g
