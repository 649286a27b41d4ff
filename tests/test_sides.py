"""The per-side helpers of the Kronecker blocks (kfac_kernels/blocks/sides.py) against dense
linear algebra."""
from __future__ import annotations

import pytest
import torch

from kfac_kernels.blocks import sides
from kfac_kernels.layers import Layout


def _psd(groups, n, gen, top=10.0):
    """PSD blocks with a clear spectral gap (largest eigenvalue ``top``, the rest in [0, 1])."""
    q, _ = torch.linalg.qr(torch.randn(groups, n, n, generator=gen, dtype=torch.float64))
    lam = torch.rand(groups, n, generator=gen, dtype=torch.float64)
    lam[:, 0] = top
    return (q * lam[:, None, :]) @ q.mT


@pytest.mark.parametrize("widths", [(10,), (4, 4, 4, 4), (36, 36, 36, 37), (2, 2, 2, 4), (7, 3)])
@pytest.mark.parametrize("groups", [1, 3])
def test_largest_eigenvalue_of_block_sides(widths, groups):
    """All parts iterate as one zero-padded stack: the padding must not change any part's
    largest eigenvalue, and the side's value is the largest over its parts."""
    gen = torch.Generator().manual_seed(len(widths) * 10 + groups)
    tops = [3.0 + 2.0 * i for i in range(len(widths))]
    parts = [_psd(groups, w, gen, top).float() for w, top in zip(widths, tops)]
    got = sides.largest_eigenvalue(parts, Layout("blocks", widths))
    exact = torch.stack([torch.linalg.eigvalsh(p.double())[..., -1] for p in parts]).amax(0)
    assert got.shape == (groups,)
    torch.testing.assert_close(got.double(), exact, rtol=1e-4, atol=0)


def test_largest_eigenvalue_of_a_dense_side_and_of_zeros():
    gen = torch.Generator().manual_seed(3)
    a = _psd(2, 9, gen, top=5.0)
    got = sides.largest_eigenvalue([a], Layout("dense"))
    torch.testing.assert_close(got, torch.linalg.eigvalsh(a)[..., -1], rtol=1e-8, atol=0)
    zero = sides.largest_eigenvalue([torch.zeros(1, 4, 4), torch.zeros(1, 3, 3)],
                                    Layout("blocks", (4, 3)))
    assert torch.equal(zero, torch.zeros(1))


def _blocks(groups, widths, gen):
    return [torch.randn(groups, w, w, generator=gen, dtype=torch.float64) for w in widths]


@pytest.mark.parametrize("widths", [(4, 4, 4, 5), (16, 16, 16, 16), (36, 36, 36, 37),
                                    (40, 40, 40, 40), (7, 3)],
                         ids=["dense-ragged", "dense-equal", "stacked-ragged", "stacked-equal",
                              "dense-unequal"])
@pytest.mark.parametrize("transpose", [False, True])
@pytest.mark.parametrize("groups", [1, 3])
def test_prepared_block_sides_multiply_as_the_block_diagonal_matrix(widths, transpose, groups):
    """A block-diagonal side's kept form (dense up to DENSE_BLOCKS_MAX wide, else its equal
    blocks stacked) against the explicit block-diagonal matrix, from both sides."""
    gen = torch.Generator().manual_seed(sum(widths) + groups)
    parts = _blocks(groups, widths, gen)
    layout = Layout("blocks", widths)
    n = sum(widths)
    full = torch.stack([torch.block_diag(*[p[g] for p in parts]) for g in range(groups)])
    full = full.mT if transpose else full
    rows = torch.randn(groups, n, 5, generator=gen, dtype=torch.float64)
    cols = torch.randn(groups, 6, n, generator=gen, dtype=torch.float64)
    cache = {}
    for _ in range(2):                                   # prepared, then kept
        torch.testing.assert_close(sides.left(parts, rows, layout, transpose, cache=cache),
                                   full @ rows, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(sides.left(parts, rows, layout, transpose), full @ rows,
                                   rtol=1e-12, atol=1e-12)
    right_cache = {}
    torch.testing.assert_close(sides.right(cols, parts, layout, transpose, cache=right_cache),
                               cols @ full, rtol=1e-12, atol=1e-12)
    dense = sides._dense(n, rows.shape[-1])
    assert dense == (n <= sides.DENSE_BLOCKS_MAX)         # these widths, 5 columns
    assert cache[transpose, dense][2][0] == ("dense" if dense else "stacked")


def test_prepared_side_follows_in_place_changes_and_new_parts(monkeypatch):
    """The kept form is reused while the parts are the same unmodified tensors, rebuilt after
    an in-place write or for new parts, and not kept above PREPARED_MAX entries."""
    gen = torch.Generator().manual_seed(0)
    widths = (4, 4, 5)
    layout = Layout("blocks", widths)
    parts = _blocks(2, widths, gen)
    mat = torch.randn(2, 13, 3, generator=gen, dtype=torch.float64)
    cache = {}

    def check(ps):
        full = torch.stack([torch.block_diag(*[p[g] for p in ps]) for g in range(2)])
        torch.testing.assert_close(sides.left(ps, mat, layout, cache=cache), full @ mat,
                                   rtol=1e-12, atol=1e-12)
        return cache[False, True][2]

    first = check(parts)
    assert check(parts) is first                                     # kept
    parts[1].mul_(2.0)                                               # in place: rebuilt
    second = check(parts)
    assert second is not first
    fresh = [p.clone() for p in parts]                               # new parts: rebuilt
    assert check(fresh) is not second
    monkeypatch.setattr(sides, "PREPARED_MAX", 10)
    cache.clear()
    check_full = torch.stack([torch.block_diag(*[p[g] for p in fresh]) for g in range(2)])
    torch.testing.assert_close(sides.left(fresh, mat, layout, cache=cache), check_full @ mat,
                               rtol=1e-12, atol=1e-12)
    assert cache == {}


def test_a_narrow_side_with_many_columns_stays_stacked():
    """The dense form pays for the zero blocks: past DENSE_BLOCKS_WORK multiply-adds the
    stacked form is kept instead, with the same product."""
    gen = torch.Generator().manual_seed(1)
    widths = (16, 16, 16, 17)
    parts = _blocks(2, widths, gen)
    mat = torch.randn(2, 65, 2048, generator=gen, dtype=torch.float64)
    assert not sides._dense(65, 2048)
    cache = {}
    full = torch.stack([torch.block_diag(*[p[g] for p in parts]) for g in range(2)])
    torch.testing.assert_close(sides.left(parts, mat, Layout("blocks", widths), cache=cache),
                               full @ mat, rtol=1e-12, atol=1e-12)
    assert list(cache) == [(False, False)] and cache[False, False][2][0] == "stacked"
