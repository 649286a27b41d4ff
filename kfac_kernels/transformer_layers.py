"""Adapters for transformer layers: ``nn.Embedding``, ``nn.MultiheadAttention`` and a weight tied
between an input embedding and an output projection.

* ``nn.Embedding`` is a linear layer on one-hot inputs: its Linear-form weight is
  ``weight.T`` (``(d, V)``), so ``G`` (``d x d``) comes from output gradients and ``A``
  (``V x V``) from the one-hot inputs. In the expand form ``A`` is diagonal (token frequencies,
  ``E[one_hot one_hot^T]``); it is accumulated from token counts and stored as a dense diagonal
  matrix so that every preconditioner path handles it unchanged (``V x V`` memory: meant for
  character and small word vocabularies). In the reduce form the per-example mean one-hot
  vectors (frequency vectors) are not one-hot, and ``A`` is the dense Eq. 10 factor.
* ``nn.MultiheadAttention`` applies its packed input projection ``in_proj_weight`` and its
  ``out_proj`` functionally, so module hooks never see them. While a capture is attached, the
  module's forward is recomputed in a forward hook with the projections made explicit
  (``F.linear`` with the module's own parameters, ``F.multi_head_attention_forward`` with
  identity projections for the attention core) and the recomputed output replaces the
  original one, so gradients flow through tensors the capture has hooked. The dropout masks are
  the original ones (the RNG state is replayed). ``in_proj`` is one adapter with three groups
  (query, key, value rows of ``in_proj_weight``, each a Linear on its own input: exactly the
  factors of an attention built from three ``nn.Linear`` projections); ``out_proj`` is a Linear
  on the concatenated heads.
* A weight tied between an ``nn.Embedding`` and an output ``nn.Linear`` (the same Parameter,
  seed 003 App. A.1): see :class:`TiedEmbeddingAdapter`.
"""
from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F
from torch import nn

from .layers import LayerAdapter, LinearAdapter


def _token_rows(x: torch.Tensor) -> torch.Tensor:
    """Token ids as ``(N, R)``: the first dim is the batch (a 0-d input is one token)."""
    if x.dim() == 0:
        return x.reshape(1, 1)
    return x.reshape(x.shape[0], -1)


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

    def grad_matrix(self):
        g = self.weight.grad
        if g is None:
            return None
        if g.is_sparse:
            raise ValueError(f"module {self.name!r}: sparse embedding gradients are not "
                             "supported; construct nn.Embedding with sparse=False")
        return g.T.unsqueeze(0)

    def set_grad_matrix(self, mat: torch.Tensor) -> None:
        self.weight.grad.copy_(mat[0].T)

    def input_positions(self, x: torch.Tensor) -> torch.Tensor:
        ids = _token_rows(x)
        return F.one_hot(ids, self.weight.shape[0]).to(self.weight.dtype).unsqueeze(0)

    def batched_output(self, g: torch.Tensor) -> torch.Tensor:
        return g.unsqueeze(0) if g.dim() == 1 else g

    def accumulate_input(self, current, x, kfac_approx, dtype, backend):
        if kfac_approx == "reduce":
            return super().accumulate_input(current, x, kfac_approx, dtype, backend)
        ids = _token_rows(x).reshape(-1)
        if ids.numel() == 0:
            return current, 0
        v = self.weight.shape[0]
        counts = torch.bincount(ids, minlength=v).to(dtype)
        diag = torch.diag_embed(counts).unsqueeze(0)
        return (diag if current is None else current + diag), ids.numel()


class AttentionInProjAdapter(LinearAdapter):
    """The packed ``in_proj_weight`` / ``in_proj_bias`` of an ``nn.MultiheadAttention``: three
    groups (query, key, value rows), each a Linear on its own input."""

    groups = 3
    attention_role = "in_proj"

    def __init__(self, name: str, module: nn.MultiheadAttention):
        super().__init__(name, module)
        self.attention_module = module

    @property
    def weight(self):
        return self.module.in_proj_weight

    @staticmethod
    def group_approx(group: int, kfac_approx: str) -> str:
        """The key group always uses the expand form: the output gradients of the key
        projection sum to zero over the key positions (softmax is invariant to a shift shared
        by all keys), so K-FAC-reduce would give it ``G = 0``."""
        return "expand" if group == 1 else kfac_approx

    @property
    def bias(self):
        b = self.module.in_proj_bias
        return b if b is not None and b.requires_grad else None


class AttentionOutProjAdapter(LinearAdapter):
    """``out_proj`` of an ``nn.MultiheadAttention`` (applied functionally, fed by the
    attention module's hook)."""

    attention_role = "out_proj"

    def __init__(self, name: str, module: nn.Module, attention: nn.MultiheadAttention):
        super().__init__(name, module)
        self.attention_module = attention


def unsupported_attention_reason(module: nn.MultiheadAttention) -> str | None:
    if not module._qkv_same_embed_dim:
        return ("kdim/vdim differ from embed_dim (separate q/k/v projection weights of "
                "different widths)")
    return None


_MHA_SIGNATURE = inspect.signature(nn.MultiheadAttention.forward)


def _batch_first(t: torch.Tensor, batched: bool) -> torch.Tensor:
    """``(L, N, E)`` -> ``(N, L, E)``; an unbatched ``(L, E)`` -> ``(1, L, E)``."""
    return t.transpose(0, 1) if batched else t.unsqueeze(0)


def attention_forward(capture, module: nn.MultiheadAttention, args, kwargs, names: dict,
                      rng_state) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Recompute ``module(*args, **kwargs)`` with explicit projections, feeding the capture.

    ``names`` maps ``"in_proj"`` / ``"out_proj"`` to the adapter names to feed (either may be
    missing). Returns the module's output tuple.
    """
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
    in_name = names.get("in_proj")
    if in_name is not None:
        sources = [_batch_first(t.detach(), batched) for t in (query, key, value)]
        capture.add_grouped_inputs(in_name, sources)
        for group, t in enumerate(projected):
            if t.requires_grad:
                t.register_hook(lambda g, group=group: capture.grouped_grad(
                    in_name, group, _batch_first(g, batched)))
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
    out_name = names.get("out_proj")
    if out_name is not None:
        capture.feed(out_name, _batch_first(heads.detach(), batched),
                     out if out.requires_grad else None,
                     grad_transform=lambda g: _batch_first(g, batched))
    if module.batch_first and batched:
        out = out.transpose(0, 1)
    return out, weights


class TiedEmbeddingAdapter(LinearAdapter):
    """One weight ``W`` (``(V, d)``) used by an ``nn.Embedding`` and an output ``nn.Linear``
    (``logits = h W^T``), seed 003 App. A.1.

    The factors are those of the Linear (head) orientation: ``kron(G, A)`` approximates the
    curvature of the row-major flattening of ``[W | b]``. The embedding use has the swapped
    factors (its Linear form is ``W^T``); both uses' rows are pooled as extra examples:

    * ``A`` (``d x d``, feature side) ``= (sum over head rows of h h^T + sum over embedding rows
      of m g g^T) / (head rows + embedding rows)``, ``g`` the gradient w.r.t. an embedding
      output and ``m`` the loss multiplier of the capture (``loss_average``);
    * ``G`` (``V x V``, vocabulary side, diagonal) ``= diag(sum over head rows of m g*g) +
      diag(token counts)``, ``g`` the gradient w.r.t. the head's output (the diagonal is the
      seed's choice for the vocabulary side; it is stored as a dense diagonal matrix).

    The head's bias, if any, is part of ``[W | b]`` (its coordinate last in ``A``; embedding
    rows have 0 there). Only the expand form is defined (``kfac_approx="expand"``).
    """

    tied = True

    def __init__(self, name: str, embedding: nn.Embedding, head_name: str, head: nn.Linear):
        super().__init__(name, head)
        self.embedding = embedding
        self.head_name = head_name
