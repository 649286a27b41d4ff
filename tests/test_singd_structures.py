"""SINGD structures: Table 1's projections from explicit per-entry formulas, every product
against the dense computation (fp64), and closure of the factor update."""
import pytest
import torch

from kfac_kernels.singd.structures import STRUCTURES, structure_class

TOL = 1e-12
DIM = 11
K = 5  # block size: blocks of 5, 5 and a last one of 1; hierarchical d2 = 3, d3 = 2


def _k(name):
    return K if STRUCTURES[name].takes_block_size else None


def table1_projection(name: str, m: torch.Tensor, k: int | None) -> torch.Tensor:
    """Table 1 of Lin et al. (2024) written entry by entry (independent of the classes)."""
    d = m.shape[0]
    out = torch.zeros_like(m)
    if name == "upper-triangular-toeplitz":
        b = [sum(float(m[i, i + j]) for i in range(d - j)) / (d - j) for j in range(d)]
        for i in range(d):
            for j in range(i, d):
                out[i, j] = b[j - i] * (1 if j == i else 2)
        return out
    for i in range(d):
        for j in range(d):
            if name == "dense":
                w = 1
            elif name == "diagonal":
                w = 1 if i == j else 0
            elif name == "block-diagonal":
                w = 1 if i // k == j // k else 0
            elif name == "lower-triangular":
                w = 1 if i == j else (2 if i > j else 0)
            elif name == "rank-k-lower-triangular":
                if i < k:
                    w = 1 if j < k else 2           # [M11, 2 M12]
                else:
                    w = 1 if i == j else 0          # [0, Diag(M22)]
            elif name == "hierarchical":
                # d2 = ceil(k/2) leading, d3 = floor(k/2) trailing; a matrix smaller than k
                # fills the leading block first
                d2, d3 = min(k - k // 2, d), k // 2
                d3 = min(d3, d - d2)
                first, last = set(range(d2)), set(range(d - d3, d))
                if i in first:
                    w = 1 if j in first else 2      # [M11, 2 M12, 2 M13]
                elif i in last:
                    w = 1 if j in last else (2 if j not in first else 0)   # [0, 2 M32, M33]
                else:
                    w = 1 if i == j else 0          # [0, Diag(M22), 0]
            else:
                raise AssertionError(name)
            out[i, j] = w * m[i, j]
    return out


def _sym(d, gen):
    a = torch.randn(d, d, dtype=torch.float64, generator=gen)
    return a + a.T


def _random_structured(name, gen, d=DIM):
    cls = STRUCTURES[name]
    return cls.project(_sym(d, gen), _k(name))


def _err(a, b):
    return float((a - b).abs().max()) / max(float(b.abs().max()), 1e-300)


@pytest.mark.parametrize("name", list(STRUCTURES))
def test_projection_matches_table1(name):
    gen = torch.Generator().manual_seed(0)
    m = _sym(DIM, gen)
    got = STRUCTURES[name].project(m, _k(name)).to_dense()
    assert _err(got, table1_projection(name, m, _k(name))) < TOL


@pytest.mark.parametrize("name", list(STRUCTURES))
def test_stores_only_non_zeros_and_round_trips(name):
    gen = torch.Generator().manual_seed(1)
    cls = STRUCTURES[name]
    s = _random_structured(name, gen)
    mask = table1_projection(name, torch.ones(DIM, DIM, dtype=torch.float64), _k(name)) != 0
    expected = DIM if name == "upper-triangular-toeplitz" else int(mask.sum())
    assert s.numel() == expected
    dense = s.to_dense()
    assert not bool(dense[~mask].any()), "non-zeros outside the structure"
    assert torch.equal(cls.from_dense(dense, _k(name)).to_dense(), dense)
    assert torch.equal(cls.eye(DIM, _k(name), dtype=torch.float64).to_dense(),
                       torch.eye(DIM, dtype=torch.float64))
    assert not bool(cls.zeros(DIM, _k(name), dtype=torch.float64).to_dense().any())


@pytest.mark.parametrize("name", list(STRUCTURES))
def test_products_match_dense(name):
    gen = torch.Generator().manual_seed(2)
    s = _random_structured(name, gen)
    other = _random_structured(name, gen)
    d = s.to_dense()
    x = torch.randn(DIM, 7, dtype=torch.float64, generator=gen)
    y = torch.randn(6, DIM, dtype=torch.float64, generator=gen)
    assert _err(s.matmul(x), d @ x) < TOL
    assert _err(s.t_matmul(x), d.T @ x) < TOL
    assert _err(s.rmatmul(y), y @ d) < TOL
    assert _err(s.rmatmul_t(y), y @ d.T) < TOL
    batched = torch.randn(3, DIM, 4, dtype=torch.float64, generator=gen)
    assert _err(s.matmul(batched), d @ batched) < TOL
    assert _err(s.compose(other).to_dense(), d @ other.to_dense()) < TOL
    assert abs(float(s.trace()) - float(torch.trace(d))) < TOL * float(d.abs().max()) * DIM
    assert _err(s.add(other, -0.5).to_dense(), d - 0.5 * other.to_dense()) < TOL
    assert _err(s.scale(3.0).to_dense(), 3 * d) < TOL
    assert _err(s.add_identity(-1.0).to_dense(), d - torch.eye(DIM, dtype=d.dtype)) < TOL


@pytest.mark.parametrize("name", list(STRUCTURES))
def test_projected_products_match_table1(name):
    """gram, congruence and gram_of_rows equal Table 1's map of the dense products."""
    gen = torch.Generator().manual_seed(3)
    k = _k(name)
    s = _random_structured(name, gen)
    d = s.to_dense()
    rows = torch.randn(9, DIM, dtype=torch.float64, generator=gen)
    u = rows.T @ rows
    assert _err(s.gram().to_dense(), table1_projection(name, d.T @ d, k)) < TOL
    assert _err(s.congruence(u).to_dense(), table1_projection(name, d.T @ u @ d, k)) < TOL
    assert _err(s.gram_of_rows(rows).to_dense(), table1_projection(name, d.T @ u @ d, k)) < TOL


@pytest.mark.parametrize("name", list(STRUCTURES))
def test_statistics_from_rows_match_table1(name):
    """Pi(U) equals Table 1's map of the dense second moment, and where the class says Pi(U)
    suffices, Pi(S^T U S) from Pi(U) equals the dense product's
    projection (the triangular family needs all of U and says so)."""
    gen = torch.Generator().manual_seed(5)
    k = _k(name)
    cls = STRUCTURES[name]
    s = _random_structured(name, gen)
    d = s.to_dense()
    rows = torch.randn(7, DIM, dtype=torch.float64, generator=gen)
    u = rows.T @ rows
    p = cls.project(u, k)
    assert type(p) is cls
    assert _err(p.to_dense(), table1_projection(name, u, k)) < TOL
    if cls.projection_suffices:
        assert _err(s.congruence_of_projection(p).to_dense(),
                    table1_projection(name, d.T @ u @ d, k)) < TOL
    else:
        with pytest.raises(NotImplementedError, match="needs all of U"):
            s.congruence_of_projection(p)


@pytest.mark.parametrize("name", list(STRUCTURES))
def test_factor_update_preserves_structure(name):
    """K <- K (I - beta1 m_K) with m_K = Pi(...) stays in the structure, and equals the dense
    product."""
    gen = torch.Generator().manual_seed(4)
    k = _k(name)
    cls = STRUCTURES[name]
    mask = table1_projection(name, torch.ones(DIM, DIM, dtype=torch.float64), k) != 0
    kmat = cls.eye(DIM, k, dtype=torch.float64)
    for _ in range(3):
        m = _random_structured(name, gen).scale(0.1)
        step = m.scale(-0.3).add_identity(1.0)
        new = kmat.compose(step)
        dense = kmat.to_dense() @ (torch.eye(DIM, dtype=torch.float64) - 0.3 * m.to_dense())
        assert _err(new.to_dense(), dense) < TOL
        # the dense product itself has no entry outside the structure (closure)
        assert float(dense[~mask].abs().sum()) < TOL
        kmat = new


@pytest.mark.parametrize("dim,k", [(4, 5), (6, 5), (12, 4), (7, 1)])
@pytest.mark.parametrize("name", ["block-diagonal", "hierarchical", "rank-k-lower-triangular"])
def test_block_structures_small_and_odd_dims(name, dim, k):
    gen = torch.Generator().manual_seed(5)
    m = _sym(dim, gen)
    s = STRUCTURES[name].project(m, k)
    assert _err(s.to_dense(), table1_projection(name, m, k)) < TOL
    o = STRUCTURES[name].project(_sym(dim, gen), k)
    assert _err(s.compose(o).to_dense(), s.to_dense() @ o.to_dense()) < TOL


def test_bad_inputs_rejected():
    with pytest.raises(ValueError, match=r"SINGD: unknown structure 'tridiagonal'; expected one "
                                         r"of 'dense', 'diagonal', 'block-diagonal'"):
        structure_class("tridiagonal")
    with pytest.raises(ValueError, match=r"block-diagonal: block size must be an int >= 1, "
                                         r"got 0"):
        STRUCTURES["block-diagonal"].eye(4, 0)
    with pytest.raises(ValueError, match=r"diagonal.from_dense: expected a square matrix, got "
                                         r"shape \(2, 3\)"):
        STRUCTURES["diagonal"].from_dense(torch.zeros(2, 3))
