"""Transformer layers in the curvature capture: nn.MultiheadAttention, nn.Embedding and a weight
tied between an input embedding and an output projection.

Oracles (float64):

* exact GGN blocks (``tests/_ggn.py``) where Eschenhagen et al. (2023) show exactness: the last
  linear layer of a network with a Gaussian likelihood (``out_proj`` of an attention whose output
  is the model output: expand with a loss per position, reduce with a mean over positions); the query projection
  of the simplified self-attention of Eschenhagen et al. (2023), Eq. 45 for one example (App.
  B.3.1); one query row of one example (a single row: K-FAC with the type-2 Fisher is exact); an
  embedding followed by a linear layer (a deep linear network on one-hot inputs, Prop. 1);
* an equivalent attention built from ``nn.Linear`` projections (its factors are computed by the
  plain Linear adapters), which pins the split of the packed ``in_proj_weight``;
* factor sums computed by hand with autograd for the tied weight (Zhang et al. (2019), App. A.1).
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import kfac_kernels
from kfac_kernels import KFAC, kronecker_factors

try:
    from _ggn import exact_ggn_block, param_ggn_block, rel_err
except ImportError:  # pragma: no cover
    from tests._ggn import exact_ggn_block, param_ggn_block, rel_err

DT = torch.float64
EXACT_TOL = 1e-10
NOT_EXACT = 1e-3


class ReferenceAttention(nn.Module):
    """Multi-head attention with ``nn.Linear`` projections, the weights copied from ``mha``."""

    def __init__(self, mha: nn.MultiheadAttention):
        super().__init__()
        e = mha.embed_dim
        self.heads, self.batch_first = mha.num_heads, mha.batch_first
        self.q, self.k, self.v, self.o = (nn.Linear(e, e).to(DT) for _ in range(4))
        with torch.no_grad():
            for lin, w, b in zip((self.q, self.k, self.v), mha.in_proj_weight.chunk(3),
                                 mha.in_proj_bias.chunk(3)):
                lin.weight.copy_(w)
                lin.bias.copy_(b)
            self.o.weight.copy_(mha.out_proj.weight)
            self.o.bias.copy_(mha.out_proj.bias)

    def forward(self, query, key, value, attn_mask=None):
        if not self.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        n, lq, e = query.shape
        hd = e // self.heads

        def split(t):
            return t.reshape(n, -1, self.heads, hd).transpose(1, 2)

        q, k, v = split(self.q(query)), split(self.k(key)), split(self.v(value))
        scores = q @ k.transpose(-1, -2) / math.sqrt(hd)
        if attn_mask is not None:
            scores = scores.masked_fill(attn_mask, float("-inf"))
        out = self.o((scores.softmax(-1) @ v).transpose(1, 2).reshape(n, lq, e))
        return out if self.batch_first else out.transpose(0, 1)


class AttentionModel(nn.Module):
    """``readout(attention(xq, xkv, xkv))``; ``attn`` is an MHA or a ReferenceAttention."""

    def __init__(self, attn, e, c, mask=None):
        super().__init__()
        self.attn, self.readout, self.mask = attn, nn.Linear(e, c).to(DT), mask

    def forward(self, xq, xkv):
        if isinstance(self.attn, nn.MultiheadAttention):
            a, _ = self.attn(xq, xkv, xkv, attn_mask=self.mask, need_weights=False)
        else:
            a = self.attn(xq, xkv, xkv, attn_mask=self.mask)
        return self.readout(torch.tanh(a))


def _mha(e=6, heads=2, batch_first=True, seed=0, **kw):
    torch.manual_seed(seed)
    mha = nn.MultiheadAttention(e, heads, batch_first=batch_first, **kw).to(DT)
    with torch.no_grad():  # non-zero biases, so their coordinates are tested too
        mha.in_proj_bias.normal_()
        mha.out_proj.bias.normal_()
    return mha


@pytest.mark.parametrize("kfac_approx", ["expand", "reduce"])
@pytest.mark.parametrize("cross,batch_first,masked", [
    (False, True, True), (False, False, False), (True, True, False)])
def test_attention_factors_equal_linear_projection_attention(kfac_approx, cross, batch_first,
                                                             masked):
    e, c, n, lq = 6, 3, 3, 4
    lk = 5 if cross else lq
    mha = _mha(e, batch_first=batch_first)
    mask = torch.triu(torch.ones(lq, lk, dtype=torch.bool), 1) if masked else None
    model = AttentionModel(mha, e, c, mask)
    ref = AttentionModel(ReferenceAttention(mha), e, c, mask)
    ref.readout.load_state_dict(model.readout.state_dict())
    shape_q = (n, lq, e) if batch_first else (lq, n, e)
    shape_k = (n, lk, e) if batch_first else (lk, n, e)
    xq = torch.randn(shape_q, dtype=DT)
    xkv = torch.randn(shape_k, dtype=DT) if cross else xq
    y = torch.randn(*shape_q[:2], c, dtype=DT)
    kw = dict(kfac_approx=kfac_approx, fisher_type="type-2", loss_average=None)
    got = kronecker_factors(model, nn.MSELoss(reduction="sum"), (xq, xkv), y, **kw)
    want = kronecker_factors(ref, nn.MSELoss(reduction="sum"), (xq, xkv), y, **kw)
    a, g = got["attn"]
    assert a.shape == (3, e + 1, e + 1) and g.shape == (3, e, e)
    if kfac_approx == "reduce":
        # The key projection's output gradients sum to zero over the key positions (softmax is
        # invariant to a shift shared by all keys): plain K-FAC-reduce gives G_k = 0, so the
        # key group uses the expand form.
        assert float(want["attn.k"][1].norm()) < 1e-12 * float(want["attn.q"][1].norm())
        want["attn.k"] = kronecker_factors(ref, nn.MSELoss(reduction="sum"), (xq, xkv), y,
                                           **dict(kw, kfac_approx="expand"))["attn.k"]
    for i, proj in enumerate("qkv"):
        wa, wg = want[f"attn.{proj}"]
        assert rel_err(a[i], wa) < EXACT_TOL, proj
        assert rel_err(g[i], wg) < EXACT_TOL, proj
    for mine, theirs in (("attn.out_proj", "attn.o"), ("readout", "readout")):
        for x, w in zip(got[mine], want[theirs]):
            assert rel_err(x, w) < EXACT_TOL, mine


def test_out_proj_is_exact_in_the_expand_setting():
    """Eschenhagen et al. (2023) Lemma 3: the last linear layer, a loss per position, Gaussian likelihood."""
    mha = _mha()

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = mha

        def forward(self, x):
            return self.attn(x, x, x, need_weights=False)[0]

    model = Model()
    x, y = torch.randn(3, 4, 6, dtype=DT), torch.randn(3, 4, 6, dtype=DT)
    loss = nn.MSELoss(reduction="sum")
    a, g = kronecker_factors(model, loss, x, y, fisher_type="type-2", loss_average=None)[
        "attn.out_proj"]
    ggn = exact_ggn_block(model, loss, x, y, "attn.out_proj")
    assert rel_err(torch.kron(g, a), ggn) < EXACT_TOL


def test_out_proj_is_exact_in_the_reduce_setting():
    """Eschenhagen et al. (2023) Lemma 5 / Prop. 6: the last linear layer followed by a mean over positions."""
    mha = _mha(batch_first=False)

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = mha

        def forward(self, x):
            return self.attn(x, x, x, need_weights=False)[0].mean(dim=0)

    model = Model()
    x, y = torch.randn(4, 3, 6, dtype=DT), torch.randn(3, 6, dtype=DT)
    loss = nn.MSELoss(reduction="sum")
    kw = dict(fisher_type="type-2", loss_average=None)
    a, g = kronecker_factors(model, loss, x, y, kfac_approx="reduce", **kw)["attn.out_proj"]
    ggn = exact_ggn_block(model, loss, x, y, "attn.out_proj")
    assert rel_err(torch.kron(g, a), ggn) < EXACT_TOL
    a, g = kronecker_factors(model, loss, x, y, kfac_approx="expand", **kw)["attn.out_proj"]
    assert rel_err(torch.kron(g, a), ggn) > NOT_EXACT


def test_packed_query_rows_are_exact_for_one_query_row():
    """One example, one query row (cross-attention to 5 keys): the query rows of the packed
    ``in_proj_weight`` form a single-row layer, for which K-FAC (type-2) is exact; the key and
    value rows (5 rows that interact through the softmax) are not."""
    mha = _mha()

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = mha

        def forward(self, xq, xkv):
            return self.attn(xq, xkv, xkv, need_weights=False)[0]

    model = Model()
    xq, xkv = torch.randn(1, 1, 6, dtype=DT), torch.randn(1, 5, 6, dtype=DT)
    loss = nn.CrossEntropyLoss(reduction="sum")
    y = torch.tensor([[2]]).reshape(1, 1)
    model_t = _Transposed(model)
    a, g = kronecker_factors(model_t, loss, (xq, xkv), y, fisher_type="type-2",
                             loss_average=None)["m.attn"]
    ggn = param_ggn_block(model_t, loss, (xq, xkv), y, "m.attn.in_proj_weight",
                          "m.attn.in_proj_bias")
    s = 6 * 7
    assert rel_err(torch.kron(g[0], a[0]), ggn[:s, :s]) < EXACT_TOL
    assert rel_err(torch.kron(g[2], a[2]), ggn[2 * s:, 2 * s:]) > NOT_EXACT


class _Transposed(nn.Module):
    """``(N, L, C)`` logits as ``(N, C, L)`` for nn.CrossEntropyLoss."""

    def __init__(self, m):
        super().__init__()
        self.m = m

    def forward(self, *args):
        return self.m(*args).transpose(1, 2)


def test_simplified_self_attention_query_layer_is_exact_for_one_example():
    """Eschenhagen et al. (2023) Eq. 45-47: f(X) = (X W^Q)(X W^K)^T (X W^V), one example, Gaussian likelihood:
    K-FAC-expand is exact for W^Q, not for W^K and W^V."""
    torch.manual_seed(1)

    class LinearAttention(nn.Module):
        def __init__(self):
            super().__init__()
            self.q, self.k, self.v = (nn.Linear(4, 3, bias=False).to(DT) for _ in range(3))

        def forward(self, x):
            return self.q(x) @ self.k(x).transpose(-1, -2) @ self.v(x)

    model = LinearAttention()
    x, y = torch.randn(1, 5, 4, dtype=DT), torch.randn(1, 5, 3, dtype=DT)
    loss = nn.MSELoss(reduction="sum")
    factors = kronecker_factors(model, loss, x, y, fisher_type="type-2", loss_average=None)
    for name, exact in (("q", True), ("k", False), ("v", False)):
        a, g = factors[name]
        err = rel_err(torch.kron(g, a), exact_ggn_block(model, loss, x, y, name))
        assert (err < EXACT_TOL) if exact else (err > NOT_EXACT), (name, err)


def test_attention_recomputation_keeps_output_gradients_and_dropout_masks():
    mha = _mha(dropout=0.3).train()
    x = torch.randn(3, 4, 6, dtype=DT, requires_grad=True)
    torch.manual_seed(5)
    plain = mha(x, x, x)[0]
    plain_grads = torch.autograd.grad(plain.square().sum(), [x, mha.in_proj_weight])
    precond = KFAC(mha, damping=1e-3)
    torch.manual_seed(5)
    hooked = mha(x, x, x)[0]
    hooked_grads = torch.autograd.grad(hooked.square().sum(), [x, mha.in_proj_weight])
    # The recomputed path ran: inputs and all three groups' output gradients were captured.
    sums = precond.blocks[""].pending  # the attention module is the root: its in_proj adapter
    assert sums.rows == 12 and sums.g_passes == 3
    precond.remove_hooks()
    assert rel_err(hooked, plain) < EXACT_TOL
    for h, p in zip(hooked_grads, plain_grads):
        assert rel_err(h, p) < EXACT_TOL
    # The RNG advances exactly as without the capture (the masks are replayed, not redrawn).
    torch.manual_seed(5)
    mha(x, x, x)
    ref_next = torch.rand(3)
    precond = KFAC(mha, damping=1e-3)
    torch.manual_seed(5)
    mha(x, x, x)
    assert torch.equal(torch.rand(3), ref_next)
    precond.remove_hooks()


# --- nn.Embedding ---------------------------------------------------------------------------
class EmbeddingModel(nn.Module):
    def __init__(self, v=5, d=3, c=4, one_hot=False):
        super().__init__()
        self.one_hot = one_hot
        self.emb = nn.Linear(v, d, bias=False).to(DT) if one_hot else nn.Embedding(v, d).to(DT)
        self.v = v
        self.head = nn.Linear(d, c).to(DT)

    def forward(self, x):
        h = self.emb(F.one_hot(x, self.v).to(DT)) if self.one_hot else self.emb(x)
        return self.head(h)


def _embedding_pair():
    torch.manual_seed(2)
    emb = EmbeddingModel()
    lin = EmbeddingModel(one_hot=True)
    with torch.no_grad():
        lin.emb.weight.copy_(emb.emb.weight.T)
    lin.head.load_state_dict(emb.head.state_dict())
    return emb, lin


@pytest.mark.parametrize("kfac_approx", ["expand", "reduce"])
def test_embedding_factors_equal_linear_on_one_hot(kfac_approx):
    emb, lin = _embedding_pair()
    x, y = torch.randint(0, 5, (3, 6)), torch.randn(3, 6, 4, dtype=DT)
    kw = dict(kfac_approx=kfac_approx, fisher_type="type-2", loss_average="batch")
    got = kronecker_factors(emb, nn.MSELoss(), x, y, **kw)["emb"]
    want = kronecker_factors(lin, nn.MSELoss(), x, y, **kw)["emb"]
    for a, b in zip(got, want):
        assert rel_err(a, b) < EXACT_TOL
    if kfac_approx == "expand":  # token frequencies on the diagonal, nothing else
        counts = torch.bincount(x.reshape(-1), minlength=5).to(DT) / x.numel()
        assert torch.equal(got[0], torch.diag(counts))


def test_embedding_is_exact_as_a_deep_linear_network():
    """Eschenhagen et al. (2023) Prop. 1 (expand, Gaussian): ``kron(A, G)`` in the ``(V, d)`` row-major order of
    ``weight`` (the swapped orientation of the Linear form ``weight.T``)."""
    emb, _ = _embedding_pair()
    x, y = torch.randint(0, 5, (3, 6)), torch.randn(3, 6, 4, dtype=DT)
    loss = nn.MSELoss(reduction="sum")
    a, g = kronecker_factors(emb, loss, x, y, fisher_type="type-2", loss_average=None)["emb"]
    ggn = exact_ggn_block(emb, loss, x, y, "emb")
    assert rel_err(torch.kron(a, g), ggn) < EXACT_TOL


def test_kfac_preconditions_embedding_like_linear_on_one_hot():
    emb, lin = _embedding_pair()
    x, y = torch.randint(0, 5, (4, 6)), torch.randn(4, 6, 4, dtype=DT)
    grads = []
    for model in (emb, lin):
        precond = KFAC(model, damping=1e-2, damping_form="factored")
        nn.MSELoss()(model(x), y).backward()
        assert precond.step()
        grads.append(model.emb.weight.grad)
    assert rel_err(grads[0], grads[1].T) < EXACT_TOL


# --- tied input embedding and output projection ---------------------------------------------
class TiedLM(nn.Module):
    def __init__(self, v=6, d=4, bias=True):
        super().__init__()
        self.emb = nn.Embedding(v, d).to(DT)
        self.mid = nn.Linear(d, d).to(DT)
        self.head = nn.Linear(d, v, bias=bias).to(DT)
        self.head.weight = self.emb.weight

    def forward(self, x):
        return self.head(torch.tanh(self.mid(self.emb(x)))).transpose(1, 2)


@pytest.mark.parametrize("bias", [True, False])
def test_tied_factor_sums_by_hand(bias):
    """Zhang et al. (2019) App. A.1: the feature side pools the head's inputs and the embedding's output
    gradients as examples, the vocabulary side (diagonal) the head's output gradients and the
    token counts."""
    torch.manual_seed(3)
    model = TiedLM(bias=bias)
    x, y = torch.randint(0, 6, (2, 5)), torch.randint(0, 6, (2, 5))
    loss_fn = nn.CrossEntropyLoss(reduction="sum")
    factors = kronecker_factors(model, loss_fn, x, y, loss_average=None)
    assert set(factors) == {"mid", "head"}
    a, g = factors["head"]
    # By hand: plain autograd on the same forward.
    e = model.emb(x)
    e.retain_grad()
    z = torch.tanh(model.mid(e))
    z.retain_grad()
    logits = model.head(z)
    logits.retain_grad()
    loss_fn(logits.transpose(1, 2), y).backward()
    rows = z.detach().reshape(-1, 4)
    if bias:
        rows = torch.cat([rows, torch.ones(10, 1, dtype=DT)], dim=1)
    ge = e.grad.reshape(-1, 4)
    ge_sq = torch.zeros_like(rows.T @ rows)
    ge_sq[:4, :4] = ge.T @ ge
    a_ref = (rows.T @ rows + ge_sq) / (10 + 10)
    g_ref = torch.diag(logits.grad.reshape(-1, 6).square().sum(0)
                       + torch.bincount(x.reshape(-1), minlength=6).to(DT))
    assert rel_err(a, a_ref) < EXACT_TOL
    assert rel_err(g, g_ref) < EXACT_TOL


def test_tied_kfac_trains():
    torch.manual_seed(4)
    model = TiedLM()
    x = torch.randint(0, 6, (8, 7))
    y = torch.roll(x, 1, dims=1)
    precond = KFAC(model, damping=0.3, inv_update_steps=1)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    losses = []
    for _ in range(30):
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        precond.step()
        opt.step()
        losses.append(loss.item())
    assert set(precond.factors) == {"mid", "head"}
    assert losses[-1] < 0.7 * losses[0]


# --- errors ---------------------------------------------------------------------------------
def test_errors_name_the_module_and_the_fix():
    sparse = nn.Sequential(nn.Embedding(4, 3, sparse=True), nn.Linear(3, 2))
    with pytest.raises(ValueError, match=r"KFAC: module '0' is an nn.Embedding with sparse=True; "
                       r"its sparse gradients cannot be preconditioned: use sparse=False or "
                       r"skip_modules=\['0'\]"):
        KFAC(sparse)
    KFAC(sparse, skip_modules=["0"])

    class Cross(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(4, 2, kdim=3, vdim=5)

    with pytest.raises(ValueError, match=r"KFAC: module 'attn' \(nn.MultiheadAttention\) is not "
                       r"supported: kdim/vdim differ from embed_dim .*Pass skip_modules="
                       r"\['attn', 'attn.out_proj'\] or build the attention from nn.Linear"):
        KFAC(Cross())
    with pytest.raises(ValueError, match="needs kfac_approx='expand'"):
        KFAC(TiedLM(), kfac_approx="reduce")
    shared = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 3))
    shared[1].weight = shared[0].weight
    with pytest.raises(ValueError, match=r"KFAC: modules \['0', '1'\] share one weight "
                       "Parameter; only an nn.Embedding tied to an output nn.Linear"):
        KFAC(shared)
    with pytest.raises(ValueError, match="TwoLevel: the coarse space does not cover "
                       "nn.MultiheadAttention"):
        kfac_kernels.TwoLevel(KFAC(_mha()))


def test_state_dict_round_trip_with_attention_embedding_and_tied_weights():
    torch.manual_seed(6)

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.lm = TiedLM()
            self.attn = nn.MultiheadAttention(4, 2, batch_first=True).to(DT)

        def forward(self, x):
            h = self.lm.emb(x)
            h = h + self.attn(h, h, h, need_weights=False)[0]
            return self.lm.head(h).transpose(1, 2)

    model = Model()
    x = torch.randint(0, 6, (3, 5))
    precond = KFAC(model, damping=0.1, skip_modules=["lm.mid"])
    F.cross_entropy(model(x), x).backward()
    precond.step()
    assert set(precond.factors) == {"lm.head", "attn", "attn.out_proj"}
    state = precond.state_dict()
    other = KFAC(model, damping=0.1, skip_modules=["lm.mid"])
    other.load_state_dict(state)
    for name, (a, g) in precond.factors.items():
        assert torch.equal(other.factors[name][0], a) and torch.equal(other.factors[name][1], g)
    a, g = precond.factors["attn"]
    assert a.shape == (3, 5, 5) and g.shape == (3, 4, 4)
    assert precond.factors["lm.head"][1].shape == (1, 6)  # the vocabulary side: its diagonal
