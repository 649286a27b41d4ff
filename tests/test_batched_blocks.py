"""The cross-layer batched paths of the Kronecker blocks against their one-layer definitions:
same-shape layers preconditioned as one stack (kfac_kernels/blocks/kronecker.py,
BatchedPreconditioner), every block's damping scale from one power iteration
(measure_largest_eigenvalues), a block-diagonal Gram's equal-width blocks in one call
(layers/base.py, gram_of_rows), a bias coordinate's Gram without its ones column
(gram_with_ones) and every factor's moving average in one foreach call."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from kfac_kernels import BDKFAC, KFAC
from kfac_kernels.blocks import sides
from kfac_kernels.blocks.kronecker import measure_largest_eigenvalues
from kfac_kernels.layers import Layout
from kfac_kernels.layers.base import (DENSE, ROWS, GramRows, as_dense, gram_of_rows,
                                      gram_with_ones)

DT = torch.float64

pytestmark = pytest.mark.usefixtures("single_thread")


def deep_mlp(seed=0, depth=4, width=6):
    """Repeated same-shape layers (one batch), a wider first and a last layer of their own,
    and a batch norm after each hidden layer (its own adapter)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        layers = [nn.Linear(5, width), nn.Tanh()]
        for _ in range(depth):
            layers += [nn.Linear(width, width), nn.BatchNorm1d(width), nn.Tanh()]
        layers.append(nn.Linear(width, 3))
        return nn.Sequential(*layers).to(DT)


def capture_steps(precond, model, steps=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(16, 5, generator=gen, dtype=DT)
        y = torch.randn(16, 3, generator=gen, dtype=DT)
        model.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        precond.step()


def one_by_one(precond, grads):
    return {n: precond.blocks[n].precondition(m, precond.compute_method, precond.damping,
                                              precond._split, precond.relative_damping)
            for n, m in grads.items()}


CONFIGS = [
    (KFAC, dict()),                                                        # eigen, exact
    (KFAC, dict(damping_form="factored", damping_split="pi")),
    (KFAC, dict(compute_method="inverse", damping_form="factored")),
    (KFAC, dict(compute_method="cholesky", damping_form="factored", relative_damping=1e-2)),
    (BDKFAC, dict(num_blocks=2)),                                          # inverse, blocks
    (BDKFAC, dict(num_blocks=3, compute_method="eigen", damping_split="pi")),
]


@pytest.mark.parametrize("cls,kwargs", CONFIGS)
def test_stacked_layers_are_preconditioned_as_each_layer_alone(cls, kwargs):
    model = deep_mlp()
    precond = cls(model, inv_update_steps=2, **kwargs)
    capture_steps(precond, model)
    grads = precond.gradient_matrices()
    got = precond._precondition_many(grads)
    assert list(got) == list(grads)
    batches = precond._batched._stacks
    assert batches and max(len(decs) for decs, *_ in batches.values()) == 4  # the 4 repeats
    for name, want in one_by_one(precond, grads).items():
        torch.testing.assert_close(got[name], want, rtol=1e-12, atol=1e-14)


def test_stacked_decompositions_follow_a_new_decomposition():
    """The stacks are kept between steps while the decompositions stay, and rebuilt when any
    of them is replaced (an inverse step): the result follows the new one."""
    model = deep_mlp()
    precond = BDKFAC(model, num_blocks=2, inv_update_steps=2)
    capture_steps(precond, model, steps=2)
    grads = precond.gradient_matrices()
    precond._precondition_many(grads)
    kept = {k: v[1] for k, v in precond._batched._stacks.items()}
    precond._precondition_many(grads)
    assert all(precond._batched._stacks[k][1] is v for k, v in kept.items())
    capture_steps(precond, model, steps=2, seed=1)             # a new decomposition
    grads = precond.gradient_matrices()
    got = precond._precondition_many(grads)
    assert all(precond._batched._stacks[k][1] is not v for k, v in kept.items())
    for name, want in one_by_one(precond, grads).items():
        torch.testing.assert_close(got[name], want, rtol=1e-12, atol=1e-14)


def test_a_block_not_yet_verified_takes_its_own_path():
    model = deep_mlp()
    precond = BDKFAC(model, num_blocks=2)
    capture_steps(precond, model, steps=2)
    name = next(n for n in precond.blocks if n.startswith("2"))
    block = precond.blocks[name]
    block.unverified = torch.tensor(float("nan"), dtype=DT)     # a first, non-finite one
    grads = precond.gradient_matrices()
    got = precond._precondition_many(grads)
    assert torch.equal(got[name], grads[name])                   # left unpreconditioned
    assert all(name not in decs for decs, *_ in precond._batched._stacks.values())


def test_largest_eigenvalues_of_many_blocks_at_once_and_cached():
    model = deep_mlp()
    precond = BDKFAC(model, num_blocks=3)
    capture_steps(precond, model, steps=2)
    blocks = list(precond.blocks.values())
    measure_largest_eigenvalues(blocks)
    for b in blocks:
        a, g = b._largest[1]
        torch.testing.assert_close(a, sides.largest_eigenvalue(b.A, b.a_layout) / b.A_count,
                                   rtol=1e-12, atol=0)
        torch.testing.assert_close(g, sides.largest_eigenvalue(b.G, b.g_layout),
                                   rtol=1e-12, atol=0)
        exact = max(torch.linalg.eigvalsh(p)[..., -1].max() for p in b.G)
        torch.testing.assert_close(g.max(), exact, rtol=1e-4, atol=0)
    cached = {b.name: b._largest for b in blocks}
    assert all(b.largest_eigenvalues() is cached[b.name][1] for b in blocks)
    capture_steps(precond, model, steps=1, seed=2)               # the factors move in place
    assert all(b._largest is cached[b.name] and not b._largest_is_current() for b in blocks)
    fresh = blocks[1].largest_eigenvalues()
    torch.testing.assert_close(fresh[1], sides.largest_eigenvalue(blocks[1].G,
                                                                  blocks[1].g_layout))


def test_many_sides_of_mixed_widths_and_layouts():
    gen = torch.Generator().manual_seed(0)
    sides_in = []
    for widths in [(3, 3, 5), (5,), (3, 4)]:
        parts = [torch.randn(2, w, 7, generator=gen, dtype=DT) for w in widths]
        sides_in.append(([p @ p.mT for p in parts], Layout("blocks", widths)))
    sides_in.append(([torch.rand(2, 6, generator=gen, dtype=DT)], Layout("diagonal")))
    got = sides.largest_eigenvalues(sides_in)
    for value, (parts, layout) in zip(got, sides_in):
        torch.testing.assert_close(value, sides.largest_eigenvalue(parts, layout), rtol=1e-12,
                                   atol=0)


@pytest.mark.parametrize("widths", [(3, 3, 3, 4), (5, 5), (4, 6), (2, 2, 2)])
def test_equal_width_blocks_in_one_gram_call(widths):
    gen = torch.Generator().manual_seed(sum(widths))
    rows = torch.randn(1, 9, sum(widths), generator=gen, dtype=DT)
    got = gram_of_rows(None, rows, Layout("blocks", widths), 0.0, 0.5, "auto")
    start = 0
    assert len(got) == len(widths)
    for part, w in zip(got, widths):
        x = rows[..., start:start + w]
        torch.testing.assert_close(part, 0.5 * x.mT @ x, rtol=1e-13, atol=1e-14)
        start += w


@pytest.mark.parametrize("edge", [True, False], ids=["edge", "copy"])
@pytest.mark.parametrize("with_current", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, DT], ids=str)
def test_bias_coordinate_without_the_ones_column(dtype, with_current, edge, monkeypatch):
    """``gram_with_ones`` (the dense A of a layer with a bias, the ones column implicit) against
    the Gram of the rows with that column appended; exactly symmetric. ``edge``: the last row
    and column written by hand (rows above ``ONES_COPY_MAX`` entries); else the ones column
    appended (small rows)."""
    from kfac_kernels.layers import base
    monkeypatch.setattr(base, "ONES_COPY_MAX", 0 if edge else 1 << 16)
    gen = torch.Generator().manual_seed(3)
    rows = torch.randn(2, 11, 70, generator=gen, dtype=DT)  # 70: the last tile is 6 wide
    ones = torch.cat([rows, rows.new_ones(2, 11, 1)], dim=-1)
    current = None
    if with_current:
        base = torch.randn(2, 71, 80, generator=gen, dtype=DT)
        current = (base @ base.mT).to(dtype)
    got = gram_with_ones(current, rows.to(dtype), 0.7, 0.25, "auto")
    want = gram_of_rows(current, ones.to(dtype), DENSE, 0.7, 0.25, "auto")
    assert got.dtype == dtype and torch.equal(got, got.mT)
    tol = 1e-13 if dtype == DT else 1e-5
    torch.testing.assert_close(got, want, rtol=tol, atol=tol * want.abs().max().item())
    exact = 0.25 * ones.mT @ ones + (0.7 * current.double() if with_current else 0)
    torch.testing.assert_close(got.double(), exact, rtol=tol, atol=tol * exact.abs().max().item())


@pytest.mark.parametrize("layout", [DENSE, ROWS], ids=["dense", "rows"])
@pytest.mark.parametrize("examples", [3, 40])
def test_linear_layer_gram_with_and_without_the_ones_column(layout, examples):
    """A linear layer's ``input_gram``: dense, or rows that do not fit (40 rows of 6), go through
    ``gram_with_ones``; rows that fit stay rows with the ones column. Either way the Gram of the
    rows with the ones column, summed over two calls."""
    from kfac_kernels.layers import LinearAdapter

    gen = torch.Generator().manual_seed(examples)
    adapter = LinearAdapter("fc", nn.Linear(5, 3).double())
    xs = [torch.randn(examples, 5, generator=gen, dtype=DT) for _ in range(2)]
    total = None
    for x in xs:
        total, count = adapter.input_gram(x, "expand", layout, DT, "auto", total, 0.5, 2.0)
        assert count == examples
    ones = [torch.cat([x, x.new_ones(examples, 1)], dim=1) for x in xs]
    want = 0.5 * 2.0 * ones[0].T @ ones[0] + 2.0 * ones[1].T @ ones[1]
    fits = layout == ROWS and 2 * examples <= 6
    assert isinstance(total, GramRows) == fits
    got = as_dense(total)[0]
    torch.testing.assert_close(got, want, rtol=1e-13, atol=1e-13)
    assert torch.equal(got, got.T)


def test_moving_average_of_all_factors_in_one_call_matches_per_part():
    model = deep_mlp()
    precond = BDKFAC(model, num_blocks=2, factor_decay=0.7)
    capture_steps(precond, model, steps=1)
    before = {n: [t.clone() for t in (*b.A, *b.G)] for n, b in precond.blocks.items()}
    count = {n: b.A_count for n, b in precond.blocks.items()}
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(16, 5, generator=gen, dtype=DT)
    y = torch.randn(16, 3, generator=gen, dtype=DT)
    model.zero_grad()
    torch.nn.functional.mse_loss(model(x), y).backward()
    pending = {n: [t.clone() for t in (*sides.as_parts(b.pending.a, b.a_layout),
                                       *sides.as_parts(b.pending.g, b.g_layout))]
               for n, b in precond.blocks.items()}
    rows = {n: b.pending.rows for n, b in precond.blocks.items()}
    precond.step()
    for name, b in precond.blocks.items():
        for now, old, new in zip((*b.A, *b.G), before[name], pending[name]):
            assert torch.equal(now, old.lerp(new, 1.0 - 0.7))   # bit for bit
        assert b.A_count == pytest.approx(0.7 * count[name] + 0.3 * rows[name])


def _denominator_fresh(dec, damping, split, relative):
    from kfac_kernels.blocks.kronecker import KroneckerBlock
    return KroneckerBlock._eigen_denominator(dec, damping, split, relative)


@pytest.mark.parametrize("kwargs", [dict(), dict(damping_form="factored", damping_split="pi"),
                                    dict(damping=1e-2)],
                         ids=["exact-relative", "factored-pi", "exact-absolute"])
def test_eigen_denominator_memo_follows_the_decomposition_and_damping(kwargs):
    """The eigen form's divisor is kept between steps (a small layer's seven small ops), and
    recomputed for a new decomposition, an in-place change of its eigenvalues or ``pi`` (a
    restored or broadcast one) and another damping: every step's result equals the one formed
    from scratch."""
    model = deep_mlp()
    precond = KFAC(model, inv_update_steps=100, **kwargs)
    capture_steps(precond, model, steps=2)
    name = next(iter(precond.blocks))
    block = precond.blocks[name]
    mat = precond.gradient_matrices()[name]
    split, relative = precond._split, precond.relative_damping

    def check(damping):
        got = block.precondition(mat, "eigen", damping, split, relative)
        memo = block._denominator_memo
        assert memo["dec"] is block.decomposition
        assert torch.equal(memo["denom"], _denominator_fresh(block.decomposition, damping, split,
                                                             relative))
        return got

    first = check(precond.damping)
    kept = block._denominator_memo["denom"]
    assert torch.equal(check(precond.damping), first)
    assert block._denominator_memo["denom"] is kept                 # reused
    block.decomposition["eigvals_A"][0].mul_(2.0)                    # in place: recomputed
    moved = check(precond.damping)
    assert block._denominator_memo["denom"] is not kept and not torch.equal(moved, first)
    if "pi" in block.decomposition:
        kept = block._denominator_memo["denom"]
        block.decomposition["pi"][0].mul_(1.5)
        check(precond.damping)
        assert block._denominator_memo["denom"] is not kept
    kept = block._denominator_memo["denom"]
    check(precond.damping * 3)                                       # another damping
    assert block._denominator_memo["denom"] is not kept
    block.decomposition = {k: [t.clone() for t in v] for k, v in block.decomposition.items()}
    check(precond.damping * 3)                                       # a new decomposition


def test_eigen_denominator_of_a_large_layer_is_not_kept(monkeypatch):
    from kfac_kernels.blocks.kronecker import KroneckerBlock
    monkeypatch.setattr(KroneckerBlock, "MEMO_DENOMINATOR", 10)
    model = deep_mlp()
    precond = KFAC(model)
    capture_steps(precond, model, steps=2)
    for block in precond.blocks.values():
        if block.has_factors:
            block.precondition(precond.gradient_matrices()[block.name], "eigen",
                               precond.damping, None, True)
            assert "denom" not in block._denominator_memo
