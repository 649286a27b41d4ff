r"""Curvature statistics of SINGD kept in the factors' structure (kernel 1 of the fused update).

For diagonal and block-diagonal ``K`` (and ``C``), :math:`H_K = \hat\Pi(K^T U K)` depends on ``U``
only through :math:`\hat\Pi(U)` (its diagonal, or its diagonal blocks), and
:math:`\hat\Pi(U) = \hat\Pi(a^T a) / m` is accumulated straight from the layer's input rows ``a``
(``m`` rows): the ``d x d`` matrix ``U`` is never formed. The cost is ``O(m d)`` (diagonal) or
``O(m d k)`` (blocks of size ``k``) instead of ``O(m d^2)``, the memory ``O(d)`` / ``O(d k)``
instead of ``O(d^2)``. Since :math:`\hat\Pi` is linear, sums of these statistics over
micro-batches (or processes) are the statistics of the summed ``U``.

Accumulating :math:`\hat\Pi(a^T a)` rather than :math:`\hat\Pi((a K)^T (a K))` keeps the
statistics independent of ``K`` (``K`` is applied once per factor update, as
``congruence_of_projection``), which is cheaper (``m d k`` instead of ``2 m d k``) and safe when
the factors change between forward passes.

Which sides use rows:

* the input side of ``nn.Linear`` layers (plain adapters: no graph batches, attention or tied
  embeddings);
* the input side of ``nn.Conv1d/2d`` layers with a diagonal ``K`` and ``kfac_approx="expand"``,
  straight from the input without im2col: the diagonal entry of patch coordinate
  ``(channel, kernel offset)`` is the sum of the squared (padded) input over the window of
  positions that offset reads, so it is a strided window sum of ``sum_n x^2``
  (:func:`conv_input_diagonal`, ``O(N C H W + C k^2 H_out W_out)``, no unfolded patches).
  the diagonal blocks of a block-diagonal ``K`` of a convolution (``kfac_approx="expand"``)
  from the patches of ``k / gcd(k_h k_w, k)`` channels at a time, a chunk holding whole blocks
  (:func:`conv_input_blocks`): the patches of the whole layer are never unfolded and ``U`` is
  never formed, the work is ``O(N R D k)`` instead of ``O(N R D^2)``;
* the output-gradient side of ``nn.Linear`` and ``nn.Conv1d/2d`` layers (the gradient rows are
  the output gradient itself, no unfolding needed).

Everything else (other structures, other layers) takes the dense ``U`` / ``G`` of
:class:`kfac_kernels.capture.CurvatureCapture`, which this class extends.
"""
from __future__ import annotations

import math

import torch
from torch.nn import functional as F

from .. import distributed as dist_utils
from ..capture import CurvatureCapture
from ..graph import active_graph_rows
from ..layers import ConvAdapter, LinearAdapter
from ..ops.gradient_covariance import gradient_rows
from ..ops.patch_covariance import as_4d, conv_geometry, pre_pad
from .structures import BlockDiagonal, StructuredMatrix

Projection = tuple[type[StructuredMatrix], "int | None"]


def _plain(adapter) -> bool:
    return (getattr(adapter, "attention_module", None) is None
            and not getattr(adapter, "tied", False))


def row_sides(adapter, k_projection: Projection, c_projection: Projection,
              kfac_approx: str = "expand") -> tuple[bool, bool]:
    """Whether the input (``K``) and output-gradient (``C``) statistics of a layer are
    accumulated from rows in the structure (see the module docstring)."""
    plain = _plain(adapter)
    inputs = (plain and type(adapter) is LinearAdapter
              and k_projection[0].projection_suffices and k_projection[0].name != "dense")
    inputs = inputs or (plain and type(adapter) is ConvAdapter and kfac_approx == "expand"
                        and k_projection[0].name in ("diagonal", "block-diagonal"))
    grads = (plain and type(adapter) in (LinearAdapter, ConvAdapter)
             and c_projection[0].projection_suffices and c_projection[0].name != "dense")
    return inputs, grads


def _padded_input(adapter: ConvAdapter, x: torch.Tensor, dtype: torch.dtype, pad_zeros: bool):
    """A convolution's input as ``(N, C, H, W)`` in ``dtype`` with its non-zero padding modes
    applied, and its geometry; ``pad_zeros`` also applies the zero padding (else it is left in
    ``geom.pad``)."""
    m = adapter.module
    if x.dim() == adapter.spatial_dims + 1:  # unbatched input
        x = x.unsqueeze(0)
    geom = conv_geometry(tuple(x.shape[2:]), m.kernel_size, m.stride, m.padding, m.dilation)
    x, geom = pre_pad(x, geom, m.padding_mode)
    x = as_4d(x).to(dtype)
    if pad_zeros:
        top, bottom, left, right = geom.pad
        x = F.pad(x, (left, right, top, bottom))
    return x, geom


def conv_input_diagonal(adapter: ConvAdapter, x: torch.Tensor,
                        dtype: torch.dtype) -> tuple[torch.Tensor, int]:
    """``(groups, D)`` diagonal of the sum of a convolution's patch outer products (expand; the
    bias coordinate last) and the number of patches, without unfolding the patches."""
    x, geom = _padded_input(adapter, x, dtype, pad_zeros=False)
    n = x.shape[0]
    top, bottom, left, right = geom.pad
    sq = F.pad((x * x).sum(0), (left, right, top, bottom))   # (C, H_pad, W_pad)
    (kh, kw), (sh, sw), (dh, dw) = geom.kernel, geom.stride, geom.dilation
    oh, ow = geom.out_size
    windows = [sq[:, p * dh:p * dh + sh * (oh - 1) + 1:sh,
                  q * dw:q * dw + sw * (ow - 1) + 1:sw].sum((-2, -1))
               for p in range(kh) for q in range(kw)]
    diag = torch.stack(windows, dim=-1).reshape(adapter.groups, -1)  # channel-major, offsets
    count = n * oh * ow
    if adapter.bias is not None:
        diag = torch.cat([diag, diag.new_full((adapter.groups, 1), float(count))], dim=1)
    return diag, count


def conv_input_blocks(adapter: ConvAdapter, x: torch.Tensor, dtype: torch.dtype,
                      k: int) -> tuple[list[BlockDiagonal], int]:
    """Per group the ``k x k`` diagonal blocks (and the smaller last block) of the sum of a
    convolution's patch outer products (expand; the bias coordinate last) and the number of
    patches. The patches of ``k / gcd(k_h k_w, k)`` channels at a time are unfolded (a chunk
    that holds whole blocks), never those of the whole layer: the temporary is at most ``k``
    channels' worth of patches, and the work is ``O(N R D k)`` instead of the dense
    ``O(N R D^2)``."""
    x, geom = _padded_input(adapter, x, dtype, pad_zeros=True)
    kernel = tuple(geom.kernel)
    per_channel = kernel[0] * kernel[1]
    groups = adapter.groups
    cg = x.shape[1] // groups
    bias = adapter.bias is not None
    dim = cg * per_channel + int(bias)
    chunk = k // math.gcd(per_channel, k)  # chunk * per_channel is a multiple of k
    out = []
    for g in range(groups):
        full, last = [], x.new_zeros(0, 0)
        for start in range(0, cg, chunk):
            stop = min(start + chunk, cg)
            rows = F.unfold(x[:, g * cg + start:g * cg + stop], kernel,
                            dilation=tuple(geom.dilation), stride=tuple(geom.stride))
            rows = rows.transpose(1, 2).reshape(-1, rows.shape[1])  # (N R, patch coordinates)
            if stop == cg and bias:
                rows = torch.cat([rows, rows.new_ones(rows.shape[0], 1)], dim=1)
            q = rows.shape[1] // k
            if q:
                blocks = rows[:, :q * k].reshape(-1, q, k).transpose(0, 1)  # (q, N R, k)
                full.append(blocks.transpose(1, 2) @ blocks)
            if rows.shape[1] > q * k:  # only in the last chunk
                rest = rows[:, q * k:]
                last = rest.T @ rest
        full = torch.cat(full) if full else x.new_zeros(0, k, k)
        out.append(BlockDiagonal(dim, (full, last), k))
    oh, ow = geom.out_size
    return out, x.shape[0] * oh * ow


class StructuredCurvatureCapture(CurvatureCapture):
    """:class:`CurvatureCapture` that keeps :math:`\\hat\\Pi(U)` and :math:`\\hat\\Pi(G)` from rows
    for the layers and sides named in ``input_projections`` / ``grad_projections``
    (module name -> ``(structure class, block size)``).

    :meth:`statistics` returns per group ``(U, G)``, each either a dense matrix or the structured
    :math:`\\hat\\Pi` of it; the same normalisation as :meth:`CurvatureCapture.factors`.
    """

    def __init__(self, adapters, *, input_projections: dict[str, Projection],
                 grad_projections: dict[str, Projection], **kwargs):
        super().__init__(adapters, **kwargs)
        self.input_projections = dict(input_projections)
        self.grad_projections = dict(grad_projections)
        self._projected_a: dict[str, list[StructuredMatrix]] = {}
        self._projected_g: dict[str, list[StructuredMatrix]] = {}

    def reset(self) -> None:
        super().reset()
        self._projected_a = {}
        self._projected_g = {}

    @staticmethod
    def _add(store: dict, name: str, parts: list[StructuredMatrix]) -> None:
        old = store.get(name)
        store[name] = parts if old is None else [a.add(b) for a, b in zip(old, parts)]

    def _forward_hook(self, name: str, module, args, output) -> None:
        if name not in self.input_projections or active_graph_rows(module) is not None:
            return super()._forward_hook(name, module, args, output)
        if not self._active(name, module):
            return
        adapter = self.adapters[name]
        if self.capture_inputs:
            cls, k = self.input_projections[name]
            if isinstance(adapter, ConvAdapter) and cls is BlockDiagonal:
                parts, count = conv_input_blocks(adapter, args[0].detach(), self.dtype_of(name),
                                                 k)
            elif isinstance(adapter, ConvAdapter):
                diag, count = conv_input_diagonal(adapter, args[0].detach(), self.dtype_of(name))
                parts = [cls(d.shape[0], (d,), None) for d in diag]
            else:
                rows, count = adapter.input_rows(args[0].detach(), self.kfac_approx)
                rows = rows.to(self.dtype_of(name))
                parts = [cls.gram_of_rows_projected(r, k) for r in rows]
            if count:
                self._add(self._projected_a, name, parts)
                self.acc[name].a_rows += count
        if isinstance(output, torch.Tensor) and output.requires_grad:
            output.register_hook(lambda g, name=name: self._grad_hook(name, g))

    def _grad_hook(self, name: str, grad: torch.Tensor) -> None:
        if name not in self.grad_projections:
            return super()._grad_hook(name, grad)
        if not self.capture_grads:
            return
        adapter = self.adapters[name]
        n, r = adapter.batch_and_positions(grad)
        if n * r == 0:
            return
        multiplier = self.multiplier(n, r)
        rows = gradient_rows(adapter.batched_output(grad.detach()), adapter.channel_dim,
                             adapter.groups, self.kfac_approx).to(self.dtype_of(name))
        cls, k = self.grad_projections[name]
        self._add(self._projected_g, name,
                  [cls.gram_of_rows_projected(g, k).scale(multiplier) for g in rows])
        self.acc[name].g_passes += 1

    def statistics(self, name: str) -> list[tuple] | None:
        """Per group ``(U, G)`` (dense tensors or structured projections), or ``None`` if either
        side saw no data."""
        acc = self.acc[name]
        a_sum = acc.input_sum()
        if name in self._projected_a:
            u = [p.scale(1.0 / acc.a_rows) for p in self._projected_a[name]]
        elif a_sum is not None and acc.a_rows:
            u = list((a_sum / acc.a_rows).unbind(0))
        else:
            return None
        if name in self._projected_g:
            g = self._projected_g[name]
        elif acc.g_sum is not None:
            pair = self.factors(name) if acc.a_sum is not None else None
            g = list((pair[1] if pair is not None else acc.g_sum).unbind(0))
        else:
            return None
        return list(zip(u, g))

    def _side(self, name: str, inputs: bool) -> list[torch.Tensor]:
        """The tensors holding one side's sum of ``name`` (zeros if this process has none)."""
        acc, ad = self.acc[name], self.adapters[name]
        dim = ad.in_features_per_group if inputs else ad.out_features_per_group
        kw = dict(dtype=self.dtype_of(name), device=ad.weight.device)
        projections = self.input_projections if inputs else self.grad_projections
        store = self._projected_a if inputs else self._projected_g
        if name in projections:
            if name not in store:
                cls, k = projections[name]
                store[name] = [cls.zeros(dim, k, **kw) for _ in range(ad.groups)]
            return [t for part in store[name] for t in part.data]
        if inputs:
            if acc.a_sum is None:
                acc.a_sum = torch.zeros(ad.groups, dim, dim, **kw)
            return [acc.a_sum]
        if acc.g_sum is None:
            acc.g_sum = torch.zeros(ad.groups, dim, dim, **kw)
        return [acc.g_sum]

    def allreduce(self, names: list[str], process_group=None) -> None:
        """All-reduce the statistics of ``names`` in place over the processes of
        ``process_group``, as :func:`kfac_kernels.distributed.allreduce_capture` does for the
        dense sums (input sums and row counts summed, output-gradient sums averaged): the
        structured sums travel as they are stored (``d`` numbers for a diagonal, the blocks of
        a block-diagonal), the dense ones as one triangle. Every process must call it with the
        same ``names``."""
        world = torch.distributed.get_world_size(process_group)
        entries = []
        for name in names:
            acc, ad = self.acc[name], self.adapters[name]
            has_g = acc.g_sum is not None or name in self._projected_g
            counts = torch.tensor([float(acc.a_rows), float(has_g)], dtype=torch.float64,
                                  device=ad.weight.device)
            a = self._side(name, True)
            entries.append((name, a, self._side(name, False), counts,
                            dist_utils.tied_sums(self, name, a[0])))
        dist_utils.allreduce_symmetric(
            [t for _, a, g, c, tied in entries for t in (*a, *g, c, *tied)], process_group)
        for name, _, g, counts, tied in entries:
            acc = self.acc[name]
            acc.a_rows = int(round(float(counts[0])))
            dist_utils.set_tied_sums(acc, tied, world)
            if acc.a_rows == 0:
                acc.a_sum = acc.tied_a_sum = None
                self._projected_a.pop(name, None)
            if float(counts[1]) > 0:
                for t in g:
                    t.mul_(1.0 / world)
            else:
                acc.g_sum = None
                self._projected_g.pop(name, None)
