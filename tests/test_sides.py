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
