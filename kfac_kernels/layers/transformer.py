"""Adapters for transformer layers: ``nn.Embedding``, ``nn.MultiheadAttention`` and a weight tied
between an input embedding and an output projection.

* ``nn.Embedding`` is a linear layer on one-hot inputs: its Linear-form weight is ``weight.T``
  (``(d, V)``), so ``G`` (``d x d``) comes from output gradients and ``A`` (``V x V``) from the
  one-hot inputs. In the expand form ``A`` is diagonal (token frequencies,
  ``E[one_hot one_hot^T]``), accumulated from token counts in the diagonal layout. In the reduce
  form the per-example mean one-hot vectors are not one-hot, and ``A`` is the dense Eq. 10 factor
  of Eschenhagen et al. (2023).
* ``nn.MultiheadAttention`` applies its packed input projection and its ``out_proj``
  functionally, so module hooks never see them. While a capture is attached, the module's
  forward is recomputed in a forward hook with the projections made explicit (``F.linear`` with
  the module's own parameters, ``F.multi_head_attention_forward`` with identity projections for
  the attention core) and the recomputed output replaces the original one, so gradients flow
  through tensors the capture has hooked. The dropout masks are the original ones (the RNG state
  is replayed). ``in_proj`` is one adapter with three groups (query, key, value rows of
  ``in_proj_weight``, each a Linear on its own input: exactly the factors of an attention built
  from three ``nn.Linear`` projections); ``out_proj`` is a Linear on the concatenated heads.
* A weight tied between an ``nn.Embedding`` and an output ``nn.Linear`` (the same Parameter,
  Zhang et al. (2019), App. A.1): see :class:`TiedEmbeddingAdapter`.
"""
from __future__ import annotations

import inspect
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from .base import DIAGONAL, LayerAdapter, Layout, gram_of_rows, gram_with_ones, write_scaled
from .linear import LinearAdapter


def _token_rows(x: torch.Tensor) -> torch.Tensor:
    """Token ids as ``(N, R)``: the first dim is the batch (a 0-d input is one token)."""
    if x.dim() == 0:
        return x.reshape(1, 1)
    return x.reshape(x.shape[0], -1)


def _diagonal_as(diag: torch.Tensor, layout: Layout):
    """A ``(groups, D)`` diagonal in ``layout`` (dense: a diagonal matrix)."""
    if layout.kind == "diagonal":
        return diag
    if layout.kind == "dense":
        return torch.diag_embed(diag)
    out, start = [], 0
    for w in layout.widths:
        out.append(torch.diag_embed(diag[:, start:start + w]))
        start += w
    return out


def _accumulate(new, current, decay: float):
    if current is None:
        return new
    if isinstance(new, torch.Tensor):
        return new.add_(current, alpha=decay)
    return [n.add_(c, alpha=decay) for n, c in zip(new, current)]


class EmbeddingAdapter(LayerAdapter):
    """``nn.Embedding``: Linear form ``weight.T`` (``(d, V)``), no bias."""

    @property
    def bias(self):
        return None

    @property
    def out_features_per_group(self) -> int:
        return self.weight.shape[1]

    @property
    def in_features_per_group(self) -> int:
        return self.weight.shape[0]

    @property
    def in_partition_features(self) -> int:
        return self.weight.shape[0]

    def layout_override(self, side: str, approx: str) -> Layout | None:
        """The expand form's A is diagonal: kept as a diagonal whatever the consumer asks."""
        return DIAGONAL if side == "A" and approx == "expand" else None

    def grad_matrix(self):
        g = self.weight.grad
        if g is None:
            return None
        if g.is_sparse:
            raise ValueError(f"module {self.name!r}: sparse embedding gradients are not "
                             "supported; construct nn.Embedding with sparse=False")
        return g.T.unsqueeze(0)

    def set_grad_matrix(self, mat: torch.Tensor, scale: torch.Tensor | None = None) -> None:
        write_scaled(self.weight.grad, mat[0].T, scale)

    def input_positions(self, x: torch.Tensor) -> torch.Tensor:
        ids = _token_rows(x)
        return F.one_hot(ids, self.weight.shape[0]).to(self.weight.dtype).unsqueeze(0)

    def batched_output(self, g: torch.Tensor) -> torch.Tensor:
        return g.unsqueeze(0) if g.dim() == 1 else g

    def input_gram(self, x, approx, layout, dtype, backend, current=None, decay=1.0, alpha=1.0,
                   context=None):
        if approx == "reduce":
            return super().input_gram(x, approx, layout, dtype, backend, current, decay, alpha)
        ids = _token_rows(x).reshape(-1)
        if ids.numel() == 0:
            return current, 0
        counts = torch.bincount(ids, minlength=self.weight.shape[0]).to(dtype) * alpha
        return _accumulate(_diagonal_as(counts[None], layout), current, decay), ids.numel()


# --- nn.MultiheadAttention ---------------------------------------------------------------------

def unsupported_attention_reason(module: nn.MultiheadAttention) -> str | None:
    if not module._qkv_same_embed_dim:
        return ("kdim/vdim differ from embed_dim (separate q/k/v projection weights of "
                "different widths)")
    return None


_MHA_SIGNATURE = inspect.signature(nn.MultiheadAttention.forward)


def _batch_first(t: torch.Tensor, batched: bool) -> torch.Tensor:
    """``(L, N, E)`` -> ``(N, L, E)``; an unbatched ``(L, E)`` -> ``(1, L, E)``."""
    return t.transpose(0, 1) if batched else t.unsqueeze(0)


class AttentionHooks:
    """The one pair of hooks of an ``nn.MultiheadAttention`` that feeds both its adapters."""

    def __init__(self, module: nn.MultiheadAttention):
        self.module = module
        self.in_proj: AttentionInProjAdapter | None = None
        self.out_proj: AttentionOutProjAdapter | None = None
        self._attached: set[int] = set()

    def attach(self, capture) -> list:
        if id(capture) in self._attached and capture.attached:
            return []
        self._attached.add(id(capture))
        return [self.module.register_forward_pre_hook(self._pre_hook),
                self.module.register_forward_hook(partial(self._hook, capture), with_kwargs=True)]

    def _pre_hook(self, module, args) -> None:
        # The recomputation in _hook replays the dropout masks of the original call.
        if module.training and module.dropout > 0 and torch.is_grad_enabled():
            cuda = None
            if torch.cuda.is_available() and args and args[0].is_cuda:
                cuda = torch.cuda.get_rng_state(args[0].device)
            module._kfac_rng_state = (torch.random.get_rng_state(), cuda)
        else:
            module._kfac_rng_state = None

    def _hook(self, capture, module, args, kwargs, output):
        rng = getattr(module, "_kfac_rng_state", None)
        module._kfac_rng_state = None
        wanted = [a for a in (self.in_proj, self.out_proj)
                  if a is not None and capture.active(a, module)]
        if not wanted:
            return None
        return self._recompute(capture, args, kwargs, rng)

    def _recompute(self, capture, args, kwargs, rng_state):
        """Recompute the module's forward with explicit projections, feeding the capture."""
        module = self.module
        bound = _MHA_SIGNATURE.bind(module, *args, **kwargs)
        bound.apply_defaults()
        p = bound.arguments
        query, key, value = p["query"], p["key"], p["value"]
        batched = query.dim() == 3
        if module.batch_first and batched:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        e = module.embed_dim
        w, b = module.in_proj_weight, module.in_proj_bias
        wq, wk, wv = w.chunk(3)
        bq, bk, bv = b.chunk(3) if b is not None else (None, None, None)
        projected = [F.linear(query, wq, bq), F.linear(key, wk, bk), F.linear(value, wv, bv)]
        if self.in_proj is not None:
            sources = tuple(_batch_first(t.detach(), batched) for t in (query, key, value))
            capture.record(self.in_proj, module, sources, list(enumerate(projected)), batched)
        eye = torch.eye(e, dtype=query.dtype, device=query.device)
        if rng_state is not None:
            torch.random.set_rng_state(rng_state[0])
            if rng_state[1] is not None:
                torch.cuda.set_rng_state(rng_state[1], query.device)
        heads, weights = F.multi_head_attention_forward(
            projected[0], projected[1], projected[2], e, module.num_heads, None, None,
            module.bias_k, module.bias_v, module.add_zero_attn, module.dropout, eye, None,
            training=module.training, key_padding_mask=p["key_padding_mask"],
            need_weights=p["need_weights"], attn_mask=p["attn_mask"],
            use_separate_proj_weight=True, q_proj_weight=eye, k_proj_weight=eye,
            v_proj_weight=eye, average_attn_weights=p["average_attn_weights"],
            is_causal=p["is_causal"])
        out = F.linear(heads, module.out_proj.weight, module.out_proj.bias)
        if self.out_proj is not None:
            capture.record(self.out_proj, module, _batch_first(heads.detach(), batched), out,
                           batched)
        if module.batch_first and batched:
            out = out.transpose(0, 1)
        return out, weights


class _AttentionAdapter(LinearAdapter):
    """A projection of an ``nn.MultiheadAttention`` fed by its :class:`AttentionHooks`; the
    forward context is whether the call was batched (gradients come sequence-first)."""

    rows_statistics = False  # three groups' Grams rescaled separately (input_gram)

    def __init__(self, name: str, module: nn.Module, hooks: AttentionHooks):
        super().__init__(name, module)
        self.hooks = hooks
        self.attention_module = hooks.module

    def attach(self, capture) -> list:
        return self.hooks.attach(capture)

    def input_rows(self, x, approx, context=None):
        return super().input_rows(x, approx)  # batch first already: no graph context

    def bias_free_input_rows(self, x, approx, context=None):
        return super().bias_free_input_rows(x, approx)

    def output_rows(self, grad, approx, context=None, groups=None):
        return super().output_rows(_batch_first(grad, context), approx, None, groups)

    def batch_and_positions(self, grad, context=None):
        return super().batch_and_positions(_batch_first(grad, context))


class AttentionInProjAdapter(_AttentionAdapter):
    """The packed ``in_proj_weight`` / ``in_proj_bias``: three groups (query, key, value
    rows), each a Linear on its own input."""

    groups = 3

    def __init__(self, name: str, hooks: AttentionHooks):
        super().__init__(name, hooks.module, hooks)
        hooks.in_proj = self

    @property
    def weight(self):
        return self.module.in_proj_weight

    @property
    def bias(self):
        b = self.module.in_proj_bias
        return b if b is not None and b.requires_grad else None

    def group_approx(self, group: int, approx: str) -> str:
        """The key group always uses the expand form: the output gradients of the key
        projection sum to zero over the key positions (softmax is invariant to a shift shared
        by all keys), so K-FAC-reduce would give it ``G = 0``."""
        return "expand" if group == 1 else approx

    def input_gram(self, x, approx, layout, dtype, backend, current=None, decay=1.0, alpha=1.0,
                   context=None):
        """``x`` is ``(query, key, value)``, batch first. Each group's sum is rescaled to the
        first group's row count, so that each group's ``A`` is its own mean."""
        parts, counts = [], []
        # dense with a bias: the ones column implicit (gram_with_ones)
        implicit = layout.kind == "dense" and self.bias is not None
        rows_of = LinearAdapter.bias_free_input_rows if implicit else LinearAdapter.input_rows
        for group, src in enumerate(x):
            rows, count = rows_of(self, src, self.group_approx(group, approx))
            parts.append(rows.to(dtype))
            counts.append(count)
        if counts[0] == 0:
            return current, 0
        scales = [alpha * (counts[0] / c if c else 0.0) for c in counts]
        grams = [gram_with_ones(None, rows, 0.0, a, backend) if implicit else
                 gram_of_rows(None, rows, layout, 0.0, a, backend)
                 for rows, a in zip(parts, scales)]
        if layout.kind == "blocks":
            new = [torch.cat(blocks) for blocks in zip(*grams)]
        else:
            new = torch.cat(grams)
        return _accumulate(new, current, decay), counts[0]


class AttentionOutProjAdapter(_AttentionAdapter):
    """``out_proj`` of an ``nn.MultiheadAttention`` (applied functionally)."""

    def __init__(self, name: str, module: nn.Module, hooks: AttentionHooks):
        super().__init__(name, module, hooks)
        hooks.out_proj = self


# --- tied embedding / output projection -----------------------------------------------------------

class TiedEmbeddingAdapter(LinearAdapter):
    """One weight ``W`` (``(V, d)``) used by an ``nn.Embedding`` and an output ``nn.Linear``
    (``logits = h W^T``), Zhang et al. (2019), App. A.1.

    The factors are those of the Linear (head) orientation: ``kron(G, A)`` approximates the
    curvature of the row-major flattening of ``[W | b]``. The embedding use has the swapped
    factors (its Linear form is ``W^T``); both uses' rows are pooled as extra examples:

    * ``A`` (``d x d``, feature side) ``= (sum over head rows of h h^T + sum over embedding rows
      of m g g^T) / (head rows + embedding rows)``, ``g`` the gradient w.r.t. an embedding
      output and ``m`` the capture's weight of output gradients;
    * ``G`` (``V x V``, vocabulary side, diagonal) ``= diag(sum over head rows of m g*g) +
      diag(token counts)``, ``g`` the gradient w.r.t. the head's output.

    The head's bias, if any, is part of ``[W | b]`` (its coordinate last in ``A``; embedding rows
    have 0 there). Only the expand form is defined (``kfac_approx="expand"``).
    """

    tied = True
    rows_statistics = False  # the embedding's rows join the Gram (accumulate_backward)

    def __init__(self, name: str, embedding: nn.Embedding, head: nn.Linear):
        super().__init__(name, head)
        self.embedding = embedding

    def layout_override(self, side: str, approx: str) -> Layout | None:
        return DIAGONAL if side == "G" else None

    def attach(self, capture) -> list:
        return super().attach(capture) + [
            self.embedding.register_forward_hook(partial(self._embedding_hook, capture))]

    def _embedding_hook(self, capture, module, args, output) -> None:
        capture.record(self, module, args[0], output, "embedding")

    def batch_and_positions(self, grad, context=None):
        if context != "embedding":
            return super().batch_and_positions(grad)
        n = grad.shape[0] if grad.dim() > 1 else 1
        return n, max(grad.numel() // (grad.shape[-1] * n), 1)

    def accumulate_forward(self, sums, x, approx, backend, context=None):
        if context != "embedding":
            return super().accumulate_forward(sums, x, approx, backend)
        # The embedding's inputs are token ids: their counts go to the vocabulary side (G).
        counts = torch.bincount(x.reshape(-1), minlength=self.weight.shape[0]).to(sums.dtype)
        part = _diagonal_as(counts[None], sums.g_layout)
        sums.g = _accumulate(part, sums.g, 1.0)

    def accumulate_backward(self, sums, grad, approx, backend, multiplier, context=None,
                            group=None):
        if context != "embedding":
            return super().accumulate_backward(sums, grad, approx, backend, multiplier)
        # The embedding's output gradients are extra rows of the feature side (A).
        g = grad.reshape(-1, grad.shape[-1]) if grad.dim() > 1 else grad.reshape(1, -1)
        if g.shape[0] == 0:
            return
        width = self.in_features_per_group
        if width != g.shape[-1]:  # the head's bias coordinate: 0 for embedding rows
            g = F.pad(g, (0, width - g.shape[-1]))
        sums.a = gram_of_rows(sums.a, g.to(sums.dtype)[None], sums.a_layout, 1.0, multiplier,
                              backend)
        sums.rows += g.shape[0]
