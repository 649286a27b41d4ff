"""The layer adapter: how a module's inputs and output gradients become Kronecker statistics.

An adapter knows one layer type. It hooks its modules (:meth:`LayerAdapter.attach`) and hands
what the hooks see to the :class:`~kfac_kernels.capture.Capture`, which passes it on to the
curvature blocks subscribed to the layer. A block asks the adapter for a *side statistic* in a
:class:`Layout` -- the Gram matrix of the layer's input rows (``A`` side) or output-gradient rows
(``G`` side), dense, as diagonal blocks, or as its diagonal -- accumulated into what the block
already holds through the public ops (:mod:`kfac_kernels.ops`), which pick the kernel.

A *row* is one example of the weight-sharing sum (Eschenhagen et al. (2023)):

* ``expand`` (Eq. 7): one row per example and weight-sharing position, ``N * R`` rows;
* ``reduce`` (Eq. 10): one row per example; inputs averaged over the ``R`` positions, output
  gradients summed over them.

The bias is folded in as a last input coordinate equal to 1, so ``kron(G, A)`` is the curvature
block of the row-major flattening of ``[W | b]`` with ``W`` reshaped to ``(d_out, -1)``. A
convolution with ``groups > 1`` has one factor pair per group, stacked along the first dim.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial

import torch
from torch import nn

from ..ops.gradient_covariance import gradient_rows
from ..ops.symmetric_factor_update import symmetric_factor_update


@dataclass(frozen=True)
class Layout:
    """Which part of a side's Gram matrix ``X^T X`` (per group) to accumulate.

    * ``"dense"``: the whole ``(groups, D, D)`` matrix;
    * ``"blocks"``: the diagonal blocks of the contiguous coordinate ranges ``widths`` (summing
      to ``D``), a list of ``(groups, w, w)`` tensors;
    * ``"diagonal"``: the diagonal, ``(groups, D)``;
    * ``"rows"``: the whole matrix as its rows (a :class:`GramRows`) while a step has at most
      ``D`` of them, past that the dense matrix. A consumer that only needs products
      ``S^T (X^T X) S`` computes them as ``(X S)^T (X S)``: ``O(m D^2)`` instead of ``O(D^3)``
      when there are fewer rows ``m`` than coordinates ``D`` (SINGD's dense factors at the late
      stages of a CNN), and the ``D x D`` matrix is never formed.
    """

    kind: str
    widths: tuple[int, ...] = ()

    def __post_init__(self):
        if self.kind not in ("dense", "blocks", "diagonal", "rows"):
            raise ValueError(f"Layout: kind must be 'dense', 'blocks', 'diagonal' or 'rows', "
                             f"got {self.kind!r}")

    def zeros(self, groups: int, dim: int, **kw):
        """A zero statistic of this layout for ``groups`` Gram matrices of size ``dim``."""
        if self.kind in ("dense", "rows"):
            return torch.zeros(groups, dim, dim, **kw)
        if self.kind == "diagonal":
            return torch.zeros(groups, dim, **kw)
        return [torch.zeros(groups, w, w, **kw) for w in self.widths]


DENSE = Layout("dense")
DIAGONAL = Layout("diagonal")
ROWS = Layout("rows")


class GramRows:
    """``rows^T rows`` per group, kept as ``rows`` ``(groups, m, D)`` (a :data:`ROWS`
    statistic with at most ``D`` rows); weights are folded into the rows as square roots."""

    def __init__(self, rows: torch.Tensor):
        self.rows = rows

    @property
    def count(self) -> int:
        return self.rows.shape[1]

    def gram(self, backend: str = "auto") -> torch.Tensor:
        """The dense ``(groups, D, D)`` matrix."""
        return symmetric_factor_update(None, self.rows, 0.0, 1.0, backend=backend)

    def extended(self, rows: torch.Tensor, decay: float, alpha: float) -> "GramRows":
        """``decay * self + alpha * rows^T rows`` as one stack of rows (``decay, alpha >= 0``)."""
        old = self.rows if decay == 1.0 else self.rows * math.sqrt(decay)
        new = rows if alpha == 1.0 else rows * math.sqrt(alpha)
        return GramRows(torch.cat([old, new.to(old.dtype)], dim=1))


def write_scaled(dst: torch.Tensor, src: torch.Tensor, scale: torch.Tensor | None) -> None:
    """``dst <- src`` (``src * scale`` if a scale is given): one pass over ``dst`` either way."""
    if scale is None:
        dst.copy_(src)
    else:
        torch.mul(src, scale, out=dst)


def as_dense(value, backend: str = "auto"):
    """A statistic with :class:`GramRows` replaced by its dense matrix (others unchanged)."""
    return value.gram(backend) if isinstance(value, GramRows) else value


def rows_fit(current, count: int, dim: int) -> bool:
    """Whether a :data:`ROWS` statistic ``current`` (``None``, :class:`GramRows` or dense) can
    take ``count`` more rows of width ``dim`` and stay rows."""
    if isinstance(current, torch.Tensor):
        return False
    return (current.count if current is not None else 0) + count <= dim


def stays_rows(current, count: int, dim: int, decay: float, alpha: float) -> bool:
    """Whether :func:`gram_of_rows` keeps a :data:`ROWS` statistic as rows (else it forms the
    dense matrix)."""
    return alpha >= 0 and decay >= 0 and rows_fit(current, count, dim)


def blocks(widths) -> Layout:
    return Layout("blocks", tuple(int(w) for w in widths))


def _offsets(widths) -> list[int]:
    out, start = [], 0
    for w in widths:
        out.append(start)
        start += w
    return out


def gram_of_rows(current, rows: torch.Tensor, layout: Layout, decay: float, alpha: float,
                 backend: str):
    """``decay * current + alpha * rows^T rows`` in ``layout`` for ``rows`` ``(groups, m, D)``
    (``current=None``: start from zero). Dense and block Grams go through
    :func:`kfac_kernels.ops.symmetric_factor_update` (one triangle, mirrored)."""
    if layout.kind == "rows":
        if stays_rows(current, rows.shape[1], rows.shape[-1], decay, alpha):
            return (GramRows(rows if alpha == 1.0 else rows * math.sqrt(alpha))
                    if current is None else current.extended(rows, decay, alpha))
        current = as_dense(current, backend)
    if layout.kind in ("dense", "rows"):
        return symmetric_factor_update(current, rows, decay if current is not None else 0.0,
                                       alpha, backend=backend)
    if layout.kind == "diagonal":
        diag = (rows * rows).sum(dim=1) * alpha
        return diag if current is None else diag.add_(current, alpha=decay)
    out, widths, first = [], layout.widths, 0
    lead = next((i for i, w in enumerate(widths) if w != widths[0]), len(widths))
    if current is None and lead > 1 and rows.shape[0] == 1:
        # the leading equal-width blocks as one batched call on a strided view of the rows
        # ((lead, m, w), no copy): one dispatch instead of one per block
        q = widths[0]
        stacked = rows[0, :, :q * lead].unflatten(-1, (lead, q)).transpose(0, 1)
        grams = symmetric_factor_update(None, stacked, 0.0, alpha, backend=backend)
        out, first = [g[None] for g in grams.unbind(0)], lead
    for i, (c0, w) in enumerate(zip(_offsets(widths), widths)):
        if i < first:
            continue
        prev = None if current is None else current[i]
        out.append(symmetric_factor_update(prev, rows[..., c0:c0 + w],
                                           decay if prev is not None else 0.0, alpha,
                                           backend=backend))
    return out


def with_ones(rows: torch.Tensor) -> torch.Tensor:
    """``rows`` with a column of ones appended (the bias coordinate)."""
    return torch.cat([rows, rows.new_ones((*rows.shape[:-1], 1))], dim=-1)


#: the most entries (rows x inputs, per group) for which :func:`gram_with_ones` appends the
#: ones column instead of writing the edge by hand
ONES_COPY_MAX = 1 << 16


def gram_with_ones(current, rows: torch.Tensor, decay: float, alpha: float,
                   backend: str) -> torch.Tensor:
    """:func:`gram_of_rows` of ``rows`` with a column of ones appended, dense layout, without
    forming that ``(groups, m, D + 1)`` copy: ``[X 1]^T [X 1] = [[X^T X, X^T 1], [1^T X, m]]``.
    The ``X^T X`` block goes through :func:`~kfac_kernels.ops.symmetric_factor_update` on the rows
    as they lie (and on ``current``'s block as a view); the last row and column are the column
    sums, written to both (exactly symmetric). At a ViT's 2080 rows of 128 (512) inputs this
    saves the copy (0.1 (0.5) ms on one CPU thread) and half (a fifth) of the Gram kernel's
    64-wide tile pairs, whose last tile would hold the ones column alone (3 instead of 6 pairs,
    36 instead of 45). Up to :data:`ONES_COPY_MAX` entries of rows the copy is cheaper than
    the ten small ops that write the edge (digits-autoencoder's 64 rows of 16-256 inputs: 12-81
    instead of 36-115 us per call, one thread; even at 512 x 128)."""
    groups, m, d = rows.shape
    decay = decay if current is not None else 0.0
    if rows[0].numel() <= ONES_COPY_MAX:
        return symmetric_factor_update(current, with_ones(rows), decay, alpha, backend=backend)
    out = rows.new_empty((groups, d + 1, d + 1))
    out[:, :d, :d] = symmetric_factor_update(
        None if current is None else current[:, :d, :d], rows, decay, alpha, backend=backend)
    edge = rows.sum(dim=1).mul_(alpha)
    corner = rows.new_full((groups,), alpha * m)
    if current is not None:
        edge.add_(current[:, d, :d], alpha=decay)
        corner.add_(current[:, d, d], alpha=decay)
    out[:, d, :d] = edge
    out[:, :d, d] = edge
    out[:, d, d] = corner
    return out


def _add_group(total, part, group: int) -> None:
    """``total[group] += part[0]`` for a statistic of any layout (tensor or list of blocks)."""
    part = as_dense(part)
    if isinstance(total, torch.Tensor):
        total[group] += part[0]
    else:
        for t, p in zip(total, part):
            t[group] += p[0]


class StepSums:
    """One step's unnormalised statistics of a layer, for one consumer: the A-side Gram of the
    input rows and their count, the G-side Gram of the weighted output-gradient rows, each in
    the consumer's :class:`Layout` and dtype. Several forward/backward passes add up."""

    def __init__(self, a_layout: Layout, g_layout: Layout, dtype: torch.dtype):
        self.a_layout, self.g_layout, self.dtype = a_layout, g_layout, dtype
        self.a = None
        self.rows = 0
        self.g = None
        self.g_passes = 0
        # A consumer's moving average to fold the statistics into as they arrive (see
        # fold_into): by side, the stored average; ``keep`` its weight.
        self.priors: dict[str, torch.Tensor] = {}
        self.keep = 0.0
        self.folded: set[str] = set()  # the sides that hold ``keep * prior + (1 - keep) * sum``

    @property
    def complete(self) -> bool:
        """Whether both sides saw data."""
        return self.a is not None and self.rows > 0 and self.g is not None

    def fold_into(self, priors: dict[str, torch.Tensor], keep: float) -> None:
        """Accumulate ``keep * prior + (1 - keep) * (the step's sum)`` on the sides in
        ``priors`` (``"a"``, ``"g"``; dense layouts) instead of the sum alone: the moving
        average's update comes out of the Gram kernels' own ``decay * F + alpha * X^T X`` (the
        prior is read, not modified), and the consumer takes the result as its new average
        instead of a separate pass over each factor. A side whose first contribution cannot
        take a prior (a grouped output, :meth:`LayerAdapter.accumulate_backward`) stays a
        plain sum."""
        self.priors, self.keep = dict(priors), float(keep)

    def contribution(self, side: str, current, multiplier: float = 1.0):
        """``(current, decay, alpha)`` for the next Gram of ``side`` added to ``current`` (the
        side's sum so far) with weight ``multiplier``: the first contribution of a folded side
        starts from the prior."""
        prior = self.priors.get(side)
        if prior is None:
            return current, 1.0, multiplier
        scale = 1.0 - self.keep
        if current is None:
            self.folded.add(side)
            return prior, self.keep, multiplier * scale
        return current, 1.0, multiplier * scale

    def unfolded(self, side: str, multiplier: float = 1.0) -> float:
        """The weight of a contribution added to ``side`` by hand: a side not started yet
        stays a plain sum; a folded one scales it by ``1 - keep``."""
        if side in self.folded:
            return multiplier * (1.0 - self.keep)
        self.priors.pop(side, None)
        return multiplier


class LayerAdapter:
    """Base adapter. ``name`` is the qualified module name, ``module`` the module.

    Subclasses define the rows (:meth:`input_positions`, :meth:`batched_output`) and may
    override the statistics where a kernel computes them without rows (convolutions).
    """

    groups: int = 1
    channel_dim = -1  # where an output (gradient) holds the features
    # Whether input_gram / output_gram take the ROWS layout (adapters whose statistics are
    # plain Grams of rows: Linear, Conv).
    rows_statistics = False
    # Coordinates of the A side per partitioned input feature (k_h * k_w for a convolution:
    # block-diagonal factors partition channels, Yu & Tatebe, Sec. 4.2).
    input_unit = 1

    def __init__(self, name: str, module: nn.Module):
        self.name = name
        self.module = module

    # --- parameters -------------------------------------------------------------------------
    @property
    def weight(self) -> nn.Parameter:
        return self.module.weight

    @property
    def bias(self) -> nn.Parameter | None:
        """The bias if it exists and trains (a frozen bias is not part of the curvature block)."""
        b = getattr(self.module, "bias", None)
        return b if b is not None and b.requires_grad else None

    @property
    def trainable(self) -> bool:
        return self.weight.requires_grad

    def params(self) -> list[nn.Parameter]:
        return [p for p in (self.weight, self.bias) if p is not None]

    @property
    def out_features_per_group(self) -> int:
        return self.weight.shape[0] // self.groups

    @property
    def in_features_per_group(self) -> int:
        """Width of A: the input (patch) dimension of one group, plus one for the bias."""
        return math.prod(self.weight.shape[1:]) + (1 if self.bias is not None else 0)

    @property
    def in_partition_features(self) -> int:
        """Input features a block-diagonal A partitions (each ``input_unit`` coordinates wide,
        the bias coordinate joining the last block)."""
        return math.prod(self.weight.shape[1:]) // self.input_unit

    def grad_matrix(self) -> torch.Tensor | None:
        """``[dW | db]`` as ``(groups, d_out_g, D_g)``, or ``None`` if ``weight.grad`` is None."""
        w = self.weight
        if w.grad is None:
            return None
        mat = w.grad.reshape(self.groups, self.out_features_per_group, -1)
        b = self.bias
        if b is not None:
            db = b.grad if b.grad is not None else torch.zeros_like(b)
            mat = torch.cat([mat, db.reshape(self.groups, -1, 1)], dim=2)
        return mat

    def set_grad_matrix(self, mat: torch.Tensor, scale: torch.Tensor | None = None) -> None:
        """Write a ``(groups, d_out_g, D_g)`` matrix (times ``scale``, a 0-d tensor, if given)
        back into ``weight.grad`` / ``bias.grad``."""
        w, b = self.weight, self.bias
        if b is not None:
            wmat, bcol = mat[..., :-1], mat[..., -1]
            if b.grad is None:
                b.grad = torch.empty_like(b)
            write_scaled(b.grad, bcol.reshape(b.shape), scale)
        else:
            wmat = mat
        write_scaled(w.grad, wmat.reshape(w.shape), scale)

    # --- hooks --------------------------------------------------------------------------------
    def attach(self, capture) -> list:
        """Hook the module: its input and its output tensor go to ``capture``."""
        return [self.module.register_forward_hook(partial(self._forward_hook, capture))]

    def _forward_hook(self, capture, module, args, output) -> None:
        capture.record(self, module, args[0], output, self.forward_context(module))

    def forward_context(self, module: nn.Module):
        """What the backward pass of this forward needs to know (e.g. the graph of each row)."""
        return None

    # --- rows ---------------------------------------------------------------------------------
    def input_positions(self, x: torch.Tensor) -> torch.Tensor:
        """Layer input as ``(groups, N, R, D_g)`` without the bias coordinate."""
        raise NotImplementedError

    def batched_output(self, g: torch.Tensor) -> torch.Tensor:
        """An output (gradient) with its batch dim (added for unbatched calls)."""
        raise NotImplementedError

    def input_rows(self, x: torch.Tensor, approx: str, context=None) -> tuple[torch.Tensor, int]:
        """Rows for A, ``(groups, m, D_g)`` with the bias coordinate, and their count (the
        normaliser: ``N * R`` for expand, ``N`` for reduce)."""
        rows, count = self.bias_free_input_rows(x, approx, context)
        return (with_ones(rows) if self.bias is not None else rows), count

    def bias_free_input_rows(self, x: torch.Tensor, approx: str,
                             context=None) -> tuple[torch.Tensor, int] | None:
        """:meth:`input_rows` without the bias coordinate, where that coordinate is a column of
        ones appended to them (the dense Gram then takes it without the copy:
        :func:`gram_with_ones`); ``None`` where it is not (such an adapter builds its own
        :meth:`input_rows`, which here starts from these rows)."""
        pos = self.input_positions(x)
        groups, n, r, d = pos.shape
        rows = pos.reshape(groups, n * r, d) if approx == "expand" else pos.mean(dim=2)
        return rows, rows.shape[1]

    def output_rows(self, grad: torch.Tensor, approx: str, context=None,
                    groups: int | None = None) -> torch.Tensor:
        """Rows for G, ``(groups, m, d_out_g)`` (``groups=1`` for the gradient of one group's
        output)."""
        return gradient_rows(self.batched_output(grad), self.channel_dim,
                             self.groups if groups is None else groups, approx)

    def batch_and_positions(self, grad: torch.Tensor, context=None) -> tuple[int, int]:
        """``(N, R)`` of an output (gradient) tensor: examples and weight-sharing positions."""
        g = self.batched_output(grad)
        n, c = g.shape[0], g.shape[self.channel_dim]
        return n, (g.numel() // (n * c) if n * c else 0)

    # --- statistics ---------------------------------------------------------------------------
    def input_gram(self, x: torch.Tensor, approx: str, layout: Layout, dtype: torch.dtype,
                   backend: str, current=None, decay: float = 1.0, alpha: float = 1.0,
                   context=None):
        """``(decay * current + alpha * sum of input-row outer products, rows)`` in ``layout``;
        ``current=None`` starts a sum. Returns ``(current, 0)`` when there are no rows."""
        plain = (self.bias_free_input_rows(x, approx, context)
                 if self.bias is not None and layout.kind in ("dense", "rows") else None)
        if plain is not None:
            rows, count = plain
            if count == 0:
                return current, 0
            if layout.kind == "dense" or not stays_rows(current, count, rows.shape[-1] + 1,
                                                         decay, alpha):
                return gram_with_ones(as_dense(current, backend), rows.to(dtype), decay, alpha,
                                      backend), count
            rows = with_ones(rows)  # they stay rows: the column is part of them
        else:
            rows, count = self.input_rows(x, approx, context)
        if count == 0:
            return current, 0
        return gram_of_rows(current, rows.to(dtype), layout, decay, alpha, backend), count

    def output_gram(self, grad: torch.Tensor, approx: str, layout: Layout, dtype: torch.dtype,
                    backend: str, current=None, decay: float = 1.0, alpha: float = 1.0,
                    context=None, groups: int | None = None):
        """``decay * current + alpha * sum of output-gradient-row outer products``."""
        rows = self.output_rows(grad, approx, context, groups).to(dtype)
        return gram_of_rows(current, rows, layout, decay, alpha, backend)

    def accumulate_forward(self, sums: StepSums, x, approx: str, backend: str,
                           context=None) -> None:
        """Add a forward call's input to ``sums``."""
        current, decay, alpha = sums.contribution("a", sums.a)
        new, count = self.input_gram(x, approx, sums.a_layout, sums.dtype, backend, current,
                                     decay, alpha, context=context)
        if count == 0 and sums.a is None:   # nothing added: the side has not started
            sums.folded.discard("a")
            return
        sums.a = new
        sums.rows += count

    def accumulate_backward(self, sums: StepSums, grad: torch.Tensor, approx: str, backend: str,
                            multiplier: float, context=None, group=None) -> None:
        """Add an output gradient (weighted by ``multiplier``) to ``sums``; ``group`` names the
        group of a grouped output (its gradient then covers that group only)."""
        if group is None:
            current, decay, alpha = sums.contribution("g", sums.g, multiplier)
            sums.g = self.output_gram(grad, approx, sums.g_layout, sums.dtype, backend, current,
                                      decay, alpha, context=context)
        else:
            alpha = sums.unfolded("g", multiplier)
            if sums.g is None:
                sums.g = sums.g_layout.zeros(self.groups, self.out_features_per_group,
                                             dtype=sums.dtype, device=grad.device)
            part = self.output_gram(grad, self.group_approx(group, approx), sums.g_layout,
                                    sums.dtype, backend, alpha=alpha, context=context,
                                    groups=1)
            _add_group(sums.g, part, group)
        sums.g_passes += 1

    def group_approx(self, group: int, approx: str) -> str:
        """The approximation used for one group of a grouped layer."""
        return approx

    def example_inputs(self, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """``(groups, N, D_g)``: each example's input averaged over weight-sharing positions,
        bias coordinate (1) last (the per-example vectors of two-level K-FAC)."""
        return self.input_rows(x.to(dtype), "reduce")[0]

    def example_outputs(self, grad: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """``(groups, N, d_out_g)``: each example's output gradient summed over positions."""
        return self.output_rows(grad, "reduce").to(dtype)
