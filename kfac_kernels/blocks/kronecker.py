r"""K-FAC's curvature block: ``kron(G, A)`` of one layer, with dense, block-diagonal or diagonal
factors, their moving averages, decompositions and the preconditioned gradient.

Factors (Martens & Grosse (2015); Eschenhagen et al. (2023), Eq. 7 and 10):
``A = E[a a^T]`` over the input rows (bias coordinate last) and ``G`` the weighted second moment
of the output-gradient rows (see :mod:`kfac_kernels.capture`). The block keeps the moving
average of the per-step *sums* of input-row outer products and of the row counts,
``A = A_sum / A_count``: the update ``F <- decay F + (1 - decay) S`` is then one pass over each
factor (a ``lerp``) with no division, and the count folds into the decompositions (the
eigenvalues of ``A`` are those of ``A_sum`` over the count). With a constant number of rows per
step this is exactly the moving average of the per-step means.

Preconditioning of the gradient matrix ``M = [dW | db]`` (per group):

* ``compute_method="eigen"``, ``damping_form="exact"`` (Yu & Tatebe, Sec. 3):
  ``Q_G [(Q_G^T M Q_A) / (lambda_G lambda_A^T + gamma)] Q_A^T`` -- ``(G (x) A + gamma I)^{-1}``
  applied exactly;
* ``damping_form="factored"`` (Tselepidis et al. (2020), Eq. 8-9):
  ``(G + gamma_G I)^{-1} M (A + gamma_A I)^{-1}`` with ``gamma_A = pi sqrt(gamma)``,
  ``gamma_G = sqrt(gamma) / pi``, ``pi = sqrt((tr A / dim A) / (tr G / dim G))``
  (``damping_split="pi"``) or ``gamma_A = gamma_G = gamma`` (``"equal"``, the BD-KFAC paper's
  precomputed damped block inverses, Sec. 4.4), through eigendecompositions or, with
  ``compute_method="inverse"``, precomputed damped inverses, or, with
  ``compute_method="cholesky"``, the Cholesky factors ``L L^T = F + gamma I`` and two
  triangular solves per side and step (:func:`.sides.cholesky_solve_rows`): as many flops per
  step as the products with the inverses, without forming them (LAPACK ``potri``, 2/3 n^3): the faster form
  when the decomposition is refreshed every step or two.

Relative damping (``relative=True`` below; :class:`~kfac_kernels.KFAC`'s default): ``gamma``
is a fraction of the layer's curvature scale, the largest eigenvalue of ``kron(G, A)``,
``m = lambda_max(A) lambda_max(G)``: exact damping uses ``gamma m`` (per group), the factored
forms ``sqrt(gamma) lambda_max(A)`` on ``A`` and ``sqrt(gamma) lambda_max(G)`` on ``G``. The
preconditioner then amplifies no direction by more than ``1 / gamma`` relative to the layer's
stiffest one, whatever the layer's size, the loss scale (a loss multiplied by ``c`` multiplies
``G`` and ``m`` by ``c``: the preconditioned gradient is unchanged) or the task. (The mean
eigenvalue would be a poor unit: most eigenvalues of a wide layer's factors are tiny, so the
mean shrinks with the width and a fixed fraction of it leaves the weak directions undamped.)
With eigendecompositions ``lambda_max`` comes from the decomposed factors, so the damping moves
with the preconditioner; precomputed inverses take it from a few power iterations.

A block-diagonal side keeps only the diagonal blocks of a partition of the layer's features
(Yu & Tatebe, Sec. 4.1-4.2; convolutions partition channels, ``|S_i| k_h k_w``
coordinates per block); every product above is then a product with ``blockdiag`` matrices, and
no dense factor is ever formed. A diagonal side (an embedding's token frequencies, the
vocabulary side of a tied weight) needs no decomposition.
"""
from __future__ import annotations

import functools
import math

import torch

from ..layers import DENSE, LayerAdapter, Layout, StepSums, blocks
from .._flags import keep_finite
from . import sides
from .base import CurvatureBlock
from .decompositions import Job


def folds_while_capturing(adapter: LayerAdapter) -> bool:
    """Whether ``adapter`` accumulates its statistics through the base class's
    :meth:`~kfac_kernels.layers.LayerAdapter.accumulate_forward` / ``accumulate_backward``,
    which honour :meth:`~kfac_kernels.layers.StepSums.fold_into` (an adapter that adds
    statistics by hand, e.g. a tied embedding's token counts, keeps plain sums)."""
    cls = type(adapter)
    return (cls.accumulate_forward is LayerAdapter.accumulate_forward
            and cls.accumulate_backward is LayerAdapter.accumulate_backward)


def partition_sizes(features: int, num_blocks: int | None = None,
                    block_size: int | None = None) -> list[int]:
    """Sizes of the contiguous parts ``S_1 .. S_n`` of ``features`` features.

    ``num_blocks``: ``min(num_blocks, features)`` near-equal parts; ``block_size``:
    ``max(1, features // block_size)`` parts of ``block_size``. The last part absorbs the
    remainder in both cases (Yu & Tatebe, Sec. 4.1).
    """
    if block_size is not None:
        n = max(1, features // block_size)
        return [block_size] * (n - 1) + [features - block_size * (n - 1)]
    n = max(1, min(int(num_blocks), features))
    q = features // n
    return [q] * (n - 1) + [features - q * (n - 1)]


def _pi(trace_a, dim_a, trace_g, dim_g) -> torch.Tensor:
    """Per-group pi (1 where a trace is not positive)."""
    ta, tg = trace_a / dim_a, trace_g / dim_g
    ok = (ta > 0) & (tg > 0)
    return torch.where(ok, torch.sqrt(ta.clamp_min(1e-300) / tg.clamp_min(1e-300)),
                       torch.ones_like(ta))


class KroneckerBlock(CurvatureBlock):
    """Dense Kronecker factors ``A`` and ``G`` of one layer (the base of the other layouts)."""

    structure = "dense"

    #: When set (by :class:`~kfac_kernels.KFAC`, to its ``factor_decay``), the capture folds a
    #: step's statistics of a dense side into the stored factor as they arrive:
    #: ``decay F + (1 - decay) S`` comes out of the Gram kernel that forms ``S``
    #: (:meth:`~kfac_kernels.layers.StepSums.fold_into`), a new tensor taken as the factor by
    #: :meth:`fold_pending`, instead of one more pass over each factor (a ``lerp``, 1.7 ms of a
    #: 4-layer ViT's step on one CPU thread). ``None``: the step's sums are kept apart (the
    #: distributed all-reduce sums them first).
    fold_decay: float | None = None

    def __init__(self, name: str, adapter: LayerAdapter, *, approx: str, dtype: torch.dtype,
                 backend: str = "auto", **options):
        super().__init__(name, adapter, approx=approx, dtype=dtype, backend=backend, **options)
        self.A: list[torch.Tensor] | None = None   # moving average of input-row sums, by part
        self.A_count = 0.0                          # moving average of the rows per step
        self.G: list[torch.Tensor] | None = None
        self.decomposition: dict[str, list[torch.Tensor]] | None = None
        # The health of a first decomposition until a host read has found it finite.
        self.unverified: torch.Tensor | None = None
        # (key, (lambda_max(A), lambda_max(G))) of the factors last measured; the key changes
        # with every new factor list (the generation) and in-place update (tensor versions)
        self._largest: tuple | None = None
        self._damping_memo: tuple | None = None  # (key, (gamma_A, gamma_G)): see _dampings
        self._denominator_memo: dict = {}  # see _eigen_denominator
        self._generation = 0

    @classmethod
    def layouts(cls, adapter, **options) -> tuple[Layout, Layout]:
        return DENSE, DENSE

    # --- factors ------------------------------------------------------------------------------
    def _sums(self) -> StepSums:
        if self.pending is None:
            sums = super()._sums()
            if self.fold_decay is not None and self.A is not None and folds_while_capturing(
                    self.adapter):
                priors = {side: stored[0] for side, stored, layout in (
                    ("a", self.A, self.a_layout), ("g", self.G, self.g_layout))
                    if layout.kind == "dense"}
                if priors:
                    sums.fold_into(priors, self.fold_decay)
        return self.pending

    def fold_pending(self, decay: float, lerps: tuple[list, list] | None = None) -> None:
        """``F <- decay F + (1 - decay) S`` for both sides (the first step takes ``S``); a side
        the capture already folded (:attr:`fold_decay`) is taken as it is.

        ``lerps``: two lists ``(stored, new)`` to which the parts are appended instead of
        folded here, for the caller to fold every block's parts in one
        ``torch._foreach_lerp_`` (on the CPU a per-part ``lerp_`` costs more in dispatch than
        in arithmetic for the small parts of block-diagonal factors)."""
        p = self.pending
        self.pending = None
        a = sides.as_parts(p.a, self.a_layout)
        g = sides.as_parts(p.g, self.g_layout)
        if self.A is None:
            self.A, self.A_count, self.G = a, float(p.rows), g
            self._generation += 1
            return
        stored_parts, new_parts = ([], []) if lerps is None else lerps
        for side, new in (("a", a), ("g", g)):
            stored = self.A if side == "a" else self.G
            if side not in p.folded:
                stored_parts.extend(stored)
                new_parts.extend(new)
            elif p.keep == decay:
                if side == "a":
                    self.A = new
                else:
                    self.G = new
                self._generation += 1
            else:
                # the decay changed since the capture (a schedule): F + w (keep F + (1 - keep) S
                # - F) with w (1 - keep) = 1 - decay is the update with the new decay
                torch._foreach_lerp_(stored, new, (1.0 - decay) / (1.0 - p.keep))
        if lerps is None and stored_parts:
            torch._foreach_lerp_(stored_parts, new_parts, 1.0 - decay)
        self.A_count = decay * self.A_count + (1.0 - decay) * p.rows

    @property
    def has_factors(self) -> bool:
        return self.A is not None

    def factors(self) -> tuple:
        """``(A, G)`` in the block's layouts (``A`` normalised by its count)."""
        a = [p / self.A_count for p in self.A]
        return self._from_parts(a, self.a_layout), self._from_parts(list(self.G), self.g_layout)

    @staticmethod
    def _from_parts(parts, layout):
        return parts if layout.kind == "blocks" else parts[0]

    def reset_factors(self) -> None:
        self.A, self.A_count, self.G = None, 0.0, None
        self._generation += 1

    def factors_finite(self) -> bool:
        if self.A is None:
            return True
        return bool(torch.isfinite(sides.trace(self.A, self.a_layout).sum()
                                   + sides.trace(self.G, self.g_layout).sum()))

    # --- decompositions -------------------------------------------------------------------------
    def _pi(self) -> torch.Tensor:
        tr_a = sides.trace(self.A, self.a_layout) / self.A_count
        tr_g = sides.trace(self.G, self.g_layout)
        return _pi(tr_a, sides.dim(self.A), tr_g, sides.dim(self.G))

    @staticmethod
    def _split_damping(damping: float, split: str, pi: torch.Tensor):
        """``(gamma_A, gamma_G)`` per group of the factored damping."""
        if split == "equal":
            d = torch.full_like(pi, damping)
            return d, d
        root = math.sqrt(damping)
        return pi * root, root / pi

    def largest_eigenvalues(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(lambda_max(A), lambda_max(G))`` per group of the current factors, by power
        iteration (floored at the smallest normal number of their dtype, so that a relative
        damping stays positive); measured once per factor update (see
        :func:`measure_largest_eigenvalues`, which measures many blocks at once)."""
        if not self._largest_is_current():
            measure_largest_eigenvalues([self])
        return self._largest[1]

    def _largest_is_current(self) -> bool:
        # the factor tensors are updated in place: their versions tell whether they changed
        key = self._factor_key()
        return self._largest is not None and self._largest[0] == key

    def _factor_key(self) -> tuple:
        return (self._generation, self.A_count, *(t._version for t in (*self.A, *self.G)))

    def _dampings(self, damping: float, split: str, relative: bool = False
                  ) -> tuple[torch.Tensor, torch.Tensor]:
        # kept for the factors they were computed from: a decomposition asks for them twice
        # (its jobs, then its results), and each time costs trace reductions and small ops
        key = (self._factor_key(), damping, split, relative)
        if self._damping_memo is not None and self._damping_memo[0] == key:
            return self._damping_memo[1]
        if relative:
            a, g = self.largest_eigenvalues()
            root = math.sqrt(damping)
            out = root * a, root * g
        else:
            out = self._split_damping(damping, split, self._pi())
        self._damping_memo = (key, out)
        return out

    def decomposition_jobs(self, method: str, damping: float, split: str,
                           relative: bool = False) -> list[Job]:
        """The matrices to decompose: eigendecompositions of every non-diagonal part, or
        damped inverses (``A``'s with its count folded in: ``(A_sum / c + d I)^{-1}
        = c (A_sum + c d I)^{-1}``)."""
        jobs = []
        if method == "eigen":
            for parts, layout in ((self.A, self.a_layout), (self.G, self.g_layout)):
                if layout.kind != "diagonal":
                    jobs += [Job("eigh", p) for p in parts]
            return jobs
        damp_a, damp_g = self._dampings(damping, split, relative)
        for parts, layout, damp in ((self.A, self.a_layout, damp_a * self.A_count),
                                    (self.G, self.g_layout, damp_g)):
            if layout.kind != "diagonal":
                jobs += [Job(method, p, damp) for p in parts]
        return jobs

    def set_decomposition(self, results: list, method: str, damping: float,
                          split: str | None, relative: bool = False) -> torch.Tensor | None:
        """Store the results of :meth:`decomposition_jobs` (in order) and return their health (a
        0-d tensor, finite iff every new tensor is; ``None`` if a result is missing, nothing
        stored). Without a host read: where the new decomposition is not finite the previous
        one is kept element for element, and before any verified decomposition the
        preconditioned gradient falls back to the gradient (:attr:`unverified`)."""
        if any(r is None for r in results):
            return None
        it = iter(results)
        out: dict[str, list[torch.Tensor]] = {}
        scale = {"A": 1.0 / self.A_count, "G": 1.0}
        if method == "eigen":
            for side, parts, layout in (("A", self.A, self.a_layout), ("G", self.G, self.g_layout)):
                if layout.kind == "diagonal":
                    out[f"eigvals_{side}"] = [(parts[0] * scale[side]).clamp_min(0)]
                    out[f"eigvecs_{side}"] = []
                    continue
                vals, vecs = zip(*(next(it) for _ in parts))
                # Round-off can leave tiny negative eigenvalues of these PSD factors.
                out[f"eigvals_{side}"] = [(v * scale[side]).clamp_min(0) for v in vals]
                out[f"eigvecs_{side}"] = list(vecs)
            if split is not None:
                out["pi"] = [self._pi()]
        else:  # damped inverses or their Cholesky factors
            key = "inv" if method == "inverse" else "chol"
            # A's count folds in: (A_sum / c + d I)^{-1} = c (A_sum + c d I)^{-1}, and the
            # Cholesky factor of A_sum / c + d I is that of A_sum + c d I over sqrt(c).
            count_power = 1.0 if method == "inverse" else -0.5
            damp_a, damp_g = self._dampings(damping, split, relative)
            for side, parts, layout, damp in (("A", self.A, self.a_layout, damp_a),
                                              ("G", self.G, self.g_layout, damp_g)):
                if layout.kind == "diagonal":
                    shifted = parts[0] * scale[side] + damp[:, None]
                    out[f"{key}_{side}"] = [1.0 / shifted if method == "inverse"
                                            else shifted.sqrt()]
                elif side == "A":
                    # in place: each result is this block's own slice of a fresh batched solve
                    out[f"{key}_A"] = [next(it).mul_(self.A_count ** count_power)
                                       for _ in parts]
                else:
                    out[f"{key}_G"] = [next(it) for _ in parts]
        # Eigenvalue sums and the traces of inverses: non-finite with any non-finite entry.
        # (a diagonal side's inverse or Cholesky factor is a vector: all of it counts)
        health = sum(t.sum() if key.startswith(("eigvals", "pi")) or t.dim() < 3 else
                     torch.diagonal(t, dim1=-2, dim2=-1).sum()
                     for key, parts in out.items() if not key.startswith("eigvecs")
                     for t in parts)
        old = self.decomposition
        if old is not None and {k: [t.shape for t in v] for k, v in old.items()} == {
                k: [t.shape for t in v] for k, v in out.items()}:
            out = {k: [keep_finite(n, o, health) for n, o in zip(v, old[k])]
                   for k, v in out.items()}
        else:
            self.unverified = health
        self.decomposition = out
        return health

    def precondition(self, mat: torch.Tensor, method: str, damping: float,
                     split: str | None, relative: bool = False) -> torch.Tensor:
        """The preconditioned gradient matrix (``split=None``: exact eigen damping;
        ``relative``: ``damping`` is relative to the curvature scale, see the module
        docstring). With eigendecompositions any ``damping`` applies without recomputing
        them; precomputed inverses keep the damping of their decomposition."""
        out = self._precondition(mat, method, damping, split, relative)
        if self.unverified is not None:  # no decomposition known to be finite yet
            out = keep_finite(out, mat.to(out.dtype), self.unverified)
        return out

    def _precondition(self, mat, method, damping, split, relative):
        return self._apply(self.decomposition, self.a_layout, self.g_layout, mat, method,
                           damping, split, relative, self._denominator_memo)

    @classmethod
    def _apply(cls, dec, a_layout, g_layout, mat, method, damping, split, relative, memo=None):
        """The preconditioned ``mat`` ``(groups, rows, cols)`` by decomposition ``dec`` (every
        tensor with the same leading groups axis: one layer's, or several layers' stacked);
        ``memo``: see :meth:`_eigen_denominator`."""
        ref = dec[{"eigen": "eigvals_A", "inverse": "inv_A", "cholesky": "chol_A"}[method]][0]
        m = mat if mat.dtype == ref.dtype else mat.to(ref.dtype)
        if method == "cholesky":
            out = sides.solve_left(dec["chol_G"], m, g_layout)
            return sides.solve_right(out, dec["chol_A"], a_layout)
        # the block-diagonal sides' prepared forms, kept with the memo, one cache per side
        forms = None if memo is None else memo.setdefault("sides", {})

        def cache(key):
            return None if forms is None else forms.setdefault(key, {})

        if method == "inverse":
            out = sides.left(dec["inv_G"], m, g_layout, cache=cache("inv_G"))
            return sides.right(out, dec["inv_A"], a_layout, cache=cache("inv_A"))
        qa = dec["eigvecs_A"] or None
        qg = dec["eigvecs_G"] or None
        ca, cg = cache("eigvecs_A"), cache("eigvecs_G")
        rotated = sides.right(sides.left(qg, m, g_layout, transpose=True, cache=cg), qa,
                              a_layout, cache=ca)
        denom = cls._eigen_denominator(dec, damping, split, relative, memo)
        return sides.right(sides.left(qg, rotated / denom, g_layout, cache=cg), qa,
                           a_layout, transpose=True, cache=ca)

    #: the most entries of an eigen-form denominator that a memo keeps (small layers, where
    #: the seven small ops that form it cost more in dispatch than the products; a large
    #: layer would keep a gradient-sized tensor for nothing)
    MEMO_DENOMINATOR = 1 << 16

    @classmethod
    def _eigen_denominator(cls, dec, damping, split, relative, memo=None) -> torch.Tensor:
        """The eigen form's ``(groups, d_out, D)`` divisor of the rotated gradient. It changes
        only with the decomposition and the damping: ``memo`` (a dict owned by the caller)
        keeps the last one, checked by the decomposition's identity, its eigenvalues' and
        ``pi``'s versions (in-place writes bump them) and the damping settings."""
        values = (*dec["eigvals_A"], *dec["eigvals_G"], *dec.get("pi", ()))
        if memo is not None:
            # A tensor damping (an adapted one) is known by its identity and version: comparing
            # two tensors by value would be a host read (the memo keeps it, so its id stays its).
            tag = ((id(damping), damping._version) if isinstance(damping, torch.Tensor)
                   else damping)
            key = (tag, split, relative, *(t._version for t in values))
            if memo.get("dec") is dec and memo.get("key") == key:
                return memo["denom"]
        la = sides.concat_values(dec["eigvals_A"])
        lg = sides.concat_values(dec["eigvals_G"])
        if relative:
            tiny = torch.finfo(la.dtype).tiny
            top_a, top_g = la.amax(-1).clamp_min(tiny), lg.amax(-1).clamp_min(tiny)
        if split is None:
            gamma = damping * (top_a * top_g)[:, None, None] if relative else damping
            denom = lg[:, :, None] * la[:, None, :] + gamma
        else:
            if relative:
                root = math.sqrt(damping)
                gamma_a, gamma_g = root * top_a, root * top_g
            else:
                gamma_a, gamma_g = cls._split_damping(damping, split, dec["pi"][0])
            denom = ((lg + gamma_g[:, None])[:, :, None]) * ((la + gamma_a[:, None])[:, None, :])
        if memo is not None:
            for name in ("dec", "key", "denom", "damping"):
                memo.pop(name, None)
            if denom.numel() <= cls.MEMO_DENOMINATOR:
                memo.update(dec=dec, key=key, denom=denom, damping=damping)
        return denom

    def decomposition_cost(self) -> float:
        """``sum groups * n^3`` over the parts to decompose (the distributed share-out)."""
        g = self.groups
        total = 0.0
        for layout, widths in ((self.a_layout, self._widths("A")), (self.g_layout,
                                                                    self._widths("G"))):
            if layout.kind != "diagonal":
                total += sum(g * w ** 3 for w in widths)
        return total

    # --- shapes and state -----------------------------------------------------------------------
    def _widths(self, side: str) -> list[int]:
        layout = self.a_layout if side == "A" else self.g_layout
        dim = (self.adapter.in_features_per_group if side == "A"
               else self.adapter.out_features_per_group)
        return list(layout.widths) if layout.kind == "blocks" else [dim]

    def _part_shapes(self, side: str) -> list[tuple]:
        layout = self.a_layout if side == "A" else self.g_layout
        g = self.groups
        if layout.kind == "diagonal":
            return [(g, self._widths(side)[0])]
        return [(g, w, w) for w in self._widths(side)]

    def factor_template(self) -> dict:
        kw = dict(dtype=self.dtype, device=self.device)
        return {"A": [torch.zeros(s, **kw) for s in self._part_shapes("A")],
                "G": [torch.zeros(s, **kw) for s in self._part_shapes("G")]}

    def decomposition_template(self, method: str, split: str | None) -> dict:
        kw = dict(dtype=self.dtype, device=self.device)
        g = self.groups
        out = {}
        for side in ("A", "G"):
            layout = self.a_layout if side == "A" else self.g_layout
            shapes = self._part_shapes(side)
            if method in ("inverse", "cholesky"):
                key = "inv" if method == "inverse" else "chol"
                out[f"{key}_{side}"] = [torch.zeros(s, **kw) for s in shapes]
            elif layout.kind == "diagonal":
                out[f"eigvals_{side}"] = [torch.zeros(shapes[0], **kw)]
                out[f"eigvecs_{side}"] = []
            else:
                out[f"eigvals_{side}"] = [torch.zeros(s[:2], **kw) for s in shapes]
                out[f"eigvecs_{side}"] = [torch.zeros(s, **kw) for s in shapes]
        if method == "eigen" and split is not None:
            out["pi"] = [torch.zeros(g, **kw)]
        return out

    # A side's parts are exported as a list for a block-diagonal side, else as one tensor (the
    # formats of dense K-FAC and of BD-KFAC); inside, always a list.
    def _layout_of(self, key: str) -> Layout:
        return self.a_layout if key.endswith("A") else self.g_layout

    def _export(self, key: str, parts: list):
        if self._layout_of(key).kind == "blocks" or key == "pi":
            return parts[0] if key == "pi" else list(parts)
        return parts[0] if parts else None

    @staticmethod
    def _import(value) -> list:
        if value is None:
            return []
        return [value] if isinstance(value, torch.Tensor) else list(value)

    def decomposition_state(self) -> dict | None:
        """The decomposition in the exported format (``None`` entries left out)."""
        if self.decomposition is None:
            return None
        out = {k: self._export(k, v) for k, v in self.decomposition.items()}
        return {k: v for k, v in out.items() if v is not None}

    def decomposition_from_state(self, state: dict, method: str, split, who: str) -> dict | None:
        """A decomposition from :meth:`decomposition_state`'s format, checked against the
        shapes of the current settings; ``None`` if it was saved with other settings."""
        expected = self.decomposition_template(method, split)
        wanted = {k for k, v in expected.items() if v}
        if set(state) != wanted:
            return None
        out = {}
        for key, parts in expected.items():
            got = self._import(state.get(key))
            if [tuple(t.shape) for t in got] != [tuple(t.shape) for t in parts]:
                raise ValueError(f"{who}: preconditioner entry {key!r} of module {self.name!r} "
                                 f"has shapes {[tuple(t.shape) for t in got]}; expected "
                                 f"{[tuple(t.shape) for t in parts]}")
            out[key] = [t.detach().clone().to(self.device) for t in got]
        return out

    def factor_state(self) -> dict | None:
        if self.A is None:
            return None
        return {"A": self._export("A", self.A), "A_count": self.A_count,
                "G": self._export("G", self.G)}

    def factors_from_state(self, state: dict, who: str) -> dict:
        """:meth:`factor_state`'s format checked against this block's shapes, on its device."""
        template = self.factor_template()
        parts = {"A": self._import(state["A"]), "G": self._import(state["G"])}
        for key in ("A", "G"):
            got = [tuple(t.shape) for t in parts[key]]
            want = [tuple(t.shape) for t in template[key]]
            if got != want:
                raise ValueError(f"{who}: factor {key!r} of module {self.name!r} has part "
                                 f"shapes {got}; expected {want} (saved with another structure, "
                                 "num_blocks or block_size?)")
        return {"A": [t.detach().clone().to(self.device) for t in parts["A"]],
                "G": [t.detach().clone().to(self.device) for t in parts["G"]],
                "A_count": float(state["A_count"])}

    def set_factors(self, loaded: dict | None) -> None:
        if loaded is None:
            self.reset_factors()
        else:
            self.A, self.G, self.A_count = loaded["A"], loaded["G"], loaded["A_count"]
            self._generation += 1


@functools.lru_cache(maxsize=64)
def _segment_index(segments: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """The segment index as a tensor on ``device``, made once per layout (a copy to a GPU
    would wait for it every step)."""
    return torch.tensor(segments, device=device)


def pending_healths(blocks: list[KroneckerBlock]) -> dict[str, torch.Tensor]:
    """By block name, for every block whose step statistics saw data on both sides, a 0-d
    tensor finite iff they are: the 1-norm of the diagonals of its Gram parts (a NaN or inf
    row makes a diagonal entry non-finite; only the diagonals are read). One
    ``_foreach_norm`` serves all blocks instead of a few ops per part."""
    diagonals, owners = [], []
    for i, b in enumerate(blocks):
        p = b.pending
        if p is None or not p.complete:
            continue
        for value, layout in ((p.a, b.a_layout), (p.g, b.g_layout)):
            for part in sides.as_parts(value, layout):
                diagonals.append(part if layout.kind == "diagonal"
                                 else torch.diagonal(part, dim1=-2, dim2=-1))
                owners.append(i)
    if not diagonals:
        return {}
    device = diagonals[0].device
    if any(d.device != device for d in diagonals):   # a model spread over devices: per part
        norms = torch.stack([torch.linalg.vector_norm(d, 1).to(device) for d in diagonals])
    else:
        norms = torch.stack(torch._foreach_norm(diagonals, 1))
    present = sorted(set(owners))
    position = {i: k for k, i in enumerate(present)}
    index = _segment_index(tuple(position[i] for i in owners), device)
    per_block = norms.new_zeros(len(present)).index_add_(0, index, norms)
    return {blocks[i].name: h for i, h in zip(present, per_block.unbind(0))}


def measure_largest_eigenvalues(blocks: list[KroneckerBlock]) -> None:
    """:meth:`KroneckerBlock.largest_eigenvalues` of the ``blocks`` whose factors changed
    since their last measurement, all in one :func:`sides.largest_eigenvalues` call."""
    blocks = [b for b in blocks if b.A is not None and not b._largest_is_current()]
    if not blocks:
        return
    values = sides.largest_eigenvalues([side for b in blocks for side in
                                        ((b.A, b.a_layout), (b.G, b.g_layout))])
    for b, a, g in zip(blocks, values[::2], values[1::2]):
        tiny = torch.finfo(b.A[0].dtype).tiny
        b._largest = (b._factor_key(), ((a / b.A_count).clamp_min(tiny), g.clamp_min(tiny)))


class BlockDiagonalBlock(KroneckerBlock):
    """Block-diagonal factors (Yu & Tatebe): the diagonal blocks of a partition of
    the layer's input features (channels for a convolution; the bias coordinate in the last
    block) and output features into ``num_blocks`` near-equal parts, or parts of
    ``block_size``."""

    structure = "block-diagonal"

    @classmethod
    def layouts(cls, adapter, *, num_blocks=4, block_size=None, **options):
        if getattr(adapter, "partitionable_inputs", True):
            unit, bias = adapter.input_unit, int(adapter.bias is not None)
            a = [s * unit for s in partition_sizes(adapter.in_partition_features, num_blocks,
                                                   block_size)]
            a[-1] += bias
        else:
            a = [adapter.in_features_per_group]
        g = partition_sizes(adapter.out_features_per_group, num_blocks, block_size)
        return blocks(a), blocks(g)


class DiagonalBlock(KroneckerBlock):
    """Diagonal factors: ``diag(A)``, ``diag(G)`` -- no decomposition, ``O(d_in + d_out)``
    memory per layer."""

    structure = "diagonal"

    @classmethod
    def layouts(cls, adapter, **options):
        from ..layers import DIAGONAL
        return DIAGONAL, DIAGONAL


class BatchedPreconditioner:
    """Preconditions many layers' gradients in one go: the blocks whose decompositions have the
    same structure and shapes (the repeated layers of a deep MLP or a transformer) are
    preconditioned as one stack along the groups axis, with their decompositions stacked once
    per decomposition (kept until one of them changes). On the CPU, a layer's few small
    products cost more in dispatch than in arithmetic; one stacked call serves all of them.

    Blocks with a large decomposition (more than :attr:`MAX_STACKED` entries), or a first
    decomposition not yet verified finite, take their own path: for them stacking saves
    nothing and would copy a large decomposition."""

    MAX_STACKED = 1 << 16

    def __init__(self):
        self._stacks: dict[tuple, tuple[list, dict, dict]] = {}  # (decs, stacked, memo)
        # by layer: (its decomposition, that decomposition's shapes or None if too large)
        self._shapes: dict[str, tuple] = {}

    def _key(self, name: str, block: KroneckerBlock, mat: torch.Tensor) -> tuple | None:
        dec = block.decomposition
        if dec is None or block.unverified is not None or (
                type(block)._precondition is not KroneckerBlock._precondition):
            return None
        cached = self._shapes.get(name)
        if cached is None or cached[0] is not dec:
            tensors = [t for v in dec.values() for t in v]
            shapes = None if sum(t.numel() for t in tensors) > self.MAX_STACKED else tuple(
                (k, tuple((tuple(t.shape[1:]), t.dtype, t.device) for t in v))
                for k, v in dec.items())
            cached = self._shapes[name] = (dec, shapes)
        if cached[1] is None:
            return None
        return (block.a_layout, block.g_layout, cached[1], tuple(mat.shape[1:]), mat.dtype)

    def __call__(self, blocks: dict[str, KroneckerBlock], mats: dict[str, torch.Tensor],
                 method: str, damping: float, split: str | None,
                 relative: bool) -> dict[str, torch.Tensor]:
        """``{name: preconditioned mats[name]}``, as ``blocks[name].precondition`` would
        give."""
        groups: dict[tuple, list[str]] = {}
        out = {}
        for name, mat in mats.items():
            key = self._key(name, blocks[name], mat)
            if key is None:
                out[name] = blocks[name].precondition(mat, method, damping, split, relative)
            else:
                groups.setdefault(key, []).append(name)
        live = {}
        for key, names in groups.items():
            if len(names) == 1:
                out[names[0]] = blocks[names[0]].precondition(mats[names[0]], method, damping,
                                                              split, relative)
                continue
            decs = [blocks[n].decomposition for n in names]
            cached = self._stacks.get(key)
            if cached is None or len(cached[0]) != len(decs) or any(
                    a is not b for a, b in zip(cached[0], decs)):
                stacked = {k: [torch.cat([d[k][j] for d in decs]) for j in range(len(v))]
                           for k, v in decs[0].items()}
                cached = (decs, stacked, {})
            live[key] = cached
            first = blocks[names[0]]
            result = KroneckerBlock._apply(cached[1], first.a_layout, first.g_layout,
                                           torch.cat([mats[n] for n in names]), method,
                                           damping, split, relative, cached[2])
            out.update(zip(names, result.split([mats[n].shape[0] for n in names])))
        self._stacks = live       # the stacks of decompositions no longer in use are dropped
        return {name: out[name] for name in mats}
