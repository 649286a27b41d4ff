"""SINGD statistics from rows (kernel 1): Pi(U), Pi(G) of diagonal / block-diagonal factors
accumulated from layer inputs and output gradients without the dense d x d matrices."""
import pytest
import torch
from torch import nn

from kfac_kernels import SINGD
from kfac_kernels.singd.structures import BlockDiagonal, Diagonal

F64 = torch.float64


def _model(dtype):
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(),
                         nn.Linear(4 * 6 * 6, 10), nn.Tanh(), nn.Linear(10, 3)).to(dtype)


def _data(steps, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, 1, 6, 6, generator=gen).to(dtype),
             torch.randint(0, 3, (8,), generator=gen)) for _ in range(steps)]


def _final(dtype, **kwargs):
    model = _model(dtype)
    opt = SINGD(model, lr=0.05, lr_cov=0.05, T=2, weight_decay=1e-3, damping=1e-2, **kwargs)
    for x, y in _data(5, dtype):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return torch.cat([p.detach().double().flatten() for p in model.parameters()])


@pytest.mark.parametrize("dtype,tol", [(F64, 1e-10), (torch.float32, 1e-5)])
@pytest.mark.parametrize("structures,fused", [("diagonal", False), ("diagonal", True),
                                              ("block-diagonal", False),
                                              (("block-diagonal", "diagonal"), False),
                                              (("diagonal", "dense"), False)])
def test_rows_path_matches_dense_statistics(dtype, tol, structures, fused):
    """Training with statistics from rows equals training with the dense U, G projected."""
    kw = dict(structures=structures, block_size=4, fused=fused)
    ref = _final(dtype, statistics_from_rows=False, **kw)
    got = _final(dtype, statistics_from_rows=True, **kw)
    assert float((got - ref).norm() / ref.norm()) < tol
    assert float((got - _final(dtype, structures="dense")).norm() / ref.norm()) > 1e-4


def test_rows_path_keeps_only_the_structure_and_matches_an_oracle():
    """Neither the linear layers nor the convolution hold a dense U or G; the statistics equal
    the projections of hand-computed second moments."""
    model = _model(F64)
    opt = SINGD(model, structures=("block-diagonal", "diagonal"), block_size=4)
    x, y = _data(1, F64)[0]
    feats = {}
    model[3].register_forward_hook(lambda m, a, o: feats.update(a=a[0].detach()))
    out = model[3](model[2](model[1](model[0](x))))
    out.retain_grad()
    loss = nn.functional.cross_entropy(model[5](model[4](out)), y)
    loss.backward()
    lin, conv = opt.blocks["3"], opt.blocks["0"]
    assert (lin.a_layout.kind, lin.g_layout.kind) == ("blocks", "diagonal")
    assert conv.a_layout.kind == "blocks"
    assert all(b.shape[-1] <= 4 for b in lin.pending.a + conv.pending.a)
    assert lin.pending.g.shape == (1, 10)
    (u_conv, _), = conv.pending_statistics()
    assert isinstance(u_conv, BlockDiagonal)
    (u, g), = lin.pending_statistics()
    assert isinstance(u, BlockDiagonal) and isinstance(g, Diagonal)
    a = torch.cat([feats["a"], torch.ones(8, 1, dtype=F64)], dim=1)
    dense_u = a.T @ a / 8
    mask = (torch.arange(a.shape[1])[:, None] // 4 == torch.arange(a.shape[1])[None, :] // 4)
    assert float((u.to_dense() - dense_u * mask).abs().max()) < 1e-12 * float(dense_u.abs().max())
    go = out.grad * 8  # per-example gradients of the batch-mean loss
    assert torch.allclose(g.data[0], (go * go).sum(0) / 8, rtol=1e-12, atol=0)


def test_statistics_from_rows_must_be_a_bool():
    with pytest.raises(TypeError, match=r"SINGD: statistics_from_rows must be a bool, got 1"):
        SINGD(nn.Linear(3, 2), statistics_from_rows=1)


CONVS = [
    nn.Conv2d(3, 4, 3, padding=1, bias=True),
    nn.Conv2d(4, 2, (3, 2), stride=2, dilation=(1, 2), padding=(2, 1), padding_mode="reflect",
              groups=2, bias=False),
    nn.Conv1d(2, 3, 3, stride=2, padding="valid"),
    nn.Conv2d(3, 3, 3, padding="same", padding_mode="circular"),
    nn.Conv2d(5, 2, 1, bias=True),
    nn.Conv2d(6, 3, (1, 3), stride=(1, 2), padding=(0, 1), groups=3, bias=True),
]


def _patches(conv, x):
    """Oracle: ``(groups, N R, D_g)`` patches (bias coordinate 1 last) from F.unfold on the
    explicitly padded input."""
    one_d = isinstance(conv, nn.Conv1d)
    x4 = x.unsqueeze(2) if one_d else x
    k = (1, conv.kernel_size[0]) if one_d else conv.kernel_size
    s = (1, conv.stride[0]) if one_d else conv.stride
    d = (1, conv.dilation[0]) if one_d else conv.dilation
    if conv.padding == "same":
        pad = [(d[i] * (k[i] - 1)) // 2 for i in range(2)]
    elif conv.padding == "valid":
        pad = [0, 0]
    else:
        pad = [0, conv.padding[0]] if one_d else list(conv.padding)
    mode = conv.padding_mode if conv.padding_mode != "zeros" else "constant"
    xp = nn.functional.pad(x4, (pad[1], pad[1], pad[0], pad[0]), mode=mode)
    patches = nn.functional.unfold(xp, k, dilation=d, stride=s)       # (N, C*kh*kw, L)
    g, n = conv.groups, x.shape[0]
    per = patches.reshape(n, g, -1, patches.shape[-1]).permute(1, 0, 3, 2).reshape(g, -1,
                                                                                    patches.shape[1] // g)
    if conv.bias is not None:
        per = torch.cat([per, per.new_ones(g, per.shape[1], 1)], dim=2)
    return per


def _input(conv):
    gen = torch.Generator().manual_seed(3)
    shape = (2, conv.in_channels, 7) if isinstance(conv, nn.Conv1d) else (2, conv.in_channels,
                                                                          7, 6)
    return torch.randn(*shape, generator=gen, dtype=F64)


def _conv_args(conv):
    return (conv.kernel_size, conv.stride, conv.padding, conv.dilation, conv.groups)


@pytest.mark.parametrize("conv", CONVS)
def test_conv_input_diagonal_matches_the_unfolded_patches(conv):
    """The window sums equal the diagonal of the unfolded patches' second moment."""
    from kfac_kernels.ops import patch_covariance_diagonal
    conv = conv.double()
    x = _input(conv)
    diag = patch_covariance_diagonal(x, *_conv_args(conv), bias=conv.bias is not None,
                                     padding_mode=conv.padding_mode, alpha=1.0)
    per = _patches(conv, x)
    assert torch.allclose(diag, (per * per).sum(1), rtol=1e-12, atol=0)


@pytest.mark.parametrize("conv", CONVS)
@pytest.mark.parametrize("k", [1, 2, 4, 5, 16])
def test_conv_input_blocks_match_the_projected_patch_covariance(conv, k):
    """The chunked block Grams equal the diagonal blocks (block size k, smaller last block
    holding the bias coordinate) of the dense sum of patch outer products."""
    from kfac_kernels.ops import patch_covariance_blocks
    conv = conv.double()
    x = _input(conv)
    per = _patches(conv, x)
    dim = per.shape[-1]
    widths = [k] * (dim // k) + ([dim % k] if dim % k else [])
    blocks = patch_covariance_blocks(x, *_conv_args(conv), widths=widths,
                                     bias=conv.bias is not None,
                                     padding_mode=conv.padding_mode, alpha=1.0)
    assert [tuple(b.shape) for b in blocks] == [(conv.groups, w, w) for w in widths]
    for g, rows in enumerate(per):
        want = BlockDiagonal.project(rows.T @ rows, k)
        got = [b[g] for b in blocks]
        full = torch.stack(got[:dim // k]) if dim // k else got[0].new_zeros(0, k, k)
        assert torch.allclose(full, want.data[0], rtol=1e-12, atol=1e-12)
        if dim % k:
            assert torch.allclose(got[-1], want.data[1], rtol=1e-12, atol=1e-12)
