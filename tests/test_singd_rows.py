"""SINGD's dense factors from rows (the ROWS layout): while a step has no more rows than
coordinates, ``K^T U K`` is computed as ``(X K)^T (X K) / m`` from the kept rows, never forming
``U``; with more rows the dense ``U`` is accumulated. Both must train exactly like the dense
statistics of the reference path."""
import math
import warnings

import pytest
import torch
from torch import nn

from kfac_kernels import SINGD
from kfac_kernels.layers import GramRows
from kfac_kernels.ops import patch_rows

from test_singd_statistics import CONVS, _conv_args, _input, _patches

F64 = torch.float64


@pytest.mark.parametrize("conv", CONVS)
def test_patch_rows_are_the_unfolded_patches(conv):
    conv = conv.double()
    x = _input(conv)
    got = patch_rows(x, *_conv_args(conv), bias=conv.bias is not None,
                     padding_mode=conv.padding_mode)
    assert torch.equal(got, _patches(conv, x))


def _model():
    torch.manual_seed(0)
    # a stride-2 convolution whose 2 x 8 x 4 x 4 = 128 patches are fewer than its D = 145
    # coordinates; the first convolution has more patches (512) than coordinates (28)
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(16, 16, 3, stride=2, padding=1, padding_mode="reflect"),
                         nn.ReLU(), nn.Conv2d(16, 8, 3, padding=1, groups=2, bias=False),
                         nn.Flatten(), nn.Linear(8 * 4 * 4, 10)).double()


def _train(steps=4, micro=1, **kw):
    model = _model()
    opt = SINGD(model, lr=0.05, lr_cov=0.05, T=1, damping=1e-2, structures="dense",
                grad_accumulation_steps=micro, **kw)
    gen = torch.Generator().manual_seed(1)
    seen = []
    for _ in range(steps):
        x = torch.randn(2 * micro, 3, 8, 8, generator=gen, dtype=F64)
        y = torch.randint(0, 10, (2 * micro,), generator=gen)
        opt.zero_grad()
        for xs, ys in zip(x.chunk(micro), y.chunk(micro)):
            (nn.functional.cross_entropy(model(xs), ys) / micro).backward()
        seen.append({n: (type(b.pending.a).__name__, type(b.pending.g).__name__)
                     for n, b in opt.blocks.items()})
        opt.step()
    return torch.cat([p.detach().flatten() for p in model.parameters()]), seen[-1]


@pytest.mark.parametrize("kfac_approx", ["expand", "reduce"])
@pytest.mark.parametrize("micro", [1, 3])
def test_dense_factors_from_rows_train_like_the_dense_statistics(kfac_approx, micro):
    ref, held = _train(micro=micro, kfac_approx=kfac_approx, statistics_from_rows=False)
    assert set(held.values()) == {("Tensor", "Tensor")}
    got, held = _train(micro=micro, kfac_approx=kfac_approx)
    assert float((got - ref).norm() / ref.norm()) < 1e-12
    if kfac_approx == "expand":
        # 2 * micro * 16 patches against 145 coordinates: rows for one micro-batch (32 rows)
        # and for three (96); the first convolution (512 patches per micro-batch) goes dense
        assert held["2"][0] == "GramRows" and held["0"][0] == "Tensor"
        assert held["6"] == ("GramRows", "GramRows")


def test_rows_become_the_dense_matrix_once_they_outnumber_the_coordinates():
    """Micro-batches add rows until there are more than ``D``; the statistic is then the Gram,
    equal to the sum of every micro-batch's outer products."""
    torch.manual_seed(0)
    lin = nn.Linear(6, 3).double()
    opt = SINGD(lin, structures="dense", grad_accumulation_steps=3)
    xs = [torch.randn(3, 6, dtype=F64) for _ in range(3)]
    kinds = []
    for x in xs:
        lin(x).pow(2).sum().backward()
        kinds.append(type(opt.blocks[""].pending.a).__name__)
    assert kinds == ["GramRows", "GramRows", "Tensor"]     # 3, 6, then 9 rows for D = 7
    rows = torch.cat([torch.cat([x, torch.ones(3, 1, dtype=F64)], 1) for x in xs])
    assert torch.allclose(opt.blocks[""].pending.a[0], rows.T @ rows, rtol=1e-13, atol=0)


def test_gram_rows_weights_fold_into_the_rows():
    rows = torch.randn(1, 4, 5, dtype=F64)
    more = torch.randn(1, 2, 5, dtype=F64)
    got = GramRows(rows).extended(more, 0.5, 3.0).gram()[0]
    want = 0.5 * rows[0].T @ rows[0] + 3.0 * more[0].T @ more[0]
    assert torch.allclose(got, want, rtol=1e-13, atol=1e-14)


def test_cached_squares_precondition_like_two_products_and_follow_the_factors():
    """Where the factors serve many steps, ``K K^T`` and ``C C^T`` are formed once and applied
    as one product; the result is the two-product one to round-off, and a factor update (which
    stores new factor tensors) replaces the cached squares."""
    from kfac_kernels.singd.update import precondition
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 12), nn.Tanh(), nn.Linear(12, 3)).double()
    opt = SINGD(model, structures="dense", T=2, lr_cov=0.1, damping=1e-2)
    x, y = torch.randn(16, 20, dtype=F64), torch.randint(0, 3, (16,))
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    block = opt.blocks["0"]
    # two uses of 12 rows against d = 21 (K), of 21 rows against d = 12 (C): both pay
    assert set(block._squares) == {("K", 0), ("C", 0)}
    k, c = (block.factors()[key][0] for key in ("K", "C"))
    squares = {key: val[1] for key, val in block._squares.items()}
    mat = torch.randn(1, 12, 21, dtype=F64)
    got = block.precondition(mat, 2)[0]
    assert all(block._squares[key][1] is sq for key, sq in squares.items())   # reused
    want = precondition(k, c, mat[0])
    assert torch.allclose(got, want, rtol=1e-12, atol=1e-14)
    assert block.dense_square("K", 0, k, rows=1) is None   # one use of 12 rows: not worth it
    for _ in range(2):                                        # the second updates factors
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    new_k = block.factors()["K"][0]
    assert not torch.equal(new_k.data[0], k.data[0])
    fresh = block.dense_square("K", 0, new_k, rows=10 ** 6)
    assert fresh is not squares[("K", 0)]
    assert torch.allclose(fresh, new_k.data[0] @ new_k.data[0].T, rtol=1e-13, atol=1e-15)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_largest_magnitude_and_finite_health(dtype):
    """The aminmax-based checks: exact ``max |t|``, NaN and both infinities seen, no overflow
    from finite values however large."""
    from kfac_kernels._flags import finite_health, largest_magnitude
    big = torch.finfo(dtype).max
    t = torch.tensor([1.0, -big, 3.0], dtype=dtype)
    assert float(largest_magnitude(t)) == float(big)
    assert float(largest_magnitude(torch.zeros(0, dtype=dtype))) == 0.0
    assert torch.isfinite(finite_health([t, t.flip(0), torch.zeros(0, dtype=dtype)]))
    for bad in (float("nan"), float("inf"), -float("inf")):
        u = torch.tensor([[1.0, 2.0], [bad, -4.0]], dtype=dtype)
        assert not torch.isfinite(largest_magnitude(u))
        assert not torch.isfinite(finite_health([t, u]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_finite_health_of_many_small_tensors(dtype):
    """Eight or more small tensors of a dtype share one _foreach_norm call on the CPU: the same
    largest magnitude, each bad value seen wherever it sits, mixed with large tensors and
    another dtype."""
    from kfac_kernels._flags import FOREACH_MIN, SMALL, finite_health
    gen = torch.Generator().manual_seed(0)
    small = [torch.randn(5, 7, generator=gen).to(dtype) for _ in range(FOREACH_MIN + 3)]
    large = torch.randn(SMALL + 1, generator=gen).to(dtype)
    other = torch.randn(3, generator=gen, dtype=torch.float64)
    every = small + [large, other]
    want = max(float(t.abs().max()) for t in every)
    assert float(finite_health(every)) == want
    big = torch.finfo(dtype).max
    small[2][0, 0] = -big                                    # no overflow from finite values
    assert float(finite_health(every)) == float(big)
    for i in (0, 5, len(small) - 1):
        for bad in (float("nan"), float("inf"), -float("inf")):
            kept = small[i][1, 1].clone()
            small[i][1, 1] = bad
            assert not torch.isfinite(finite_health(every)), (i, bad)
            small[i][1, 1] = kept


def test_keep_finite_reads_on_the_cpu_and_selects_on_the_device(stored_health_path):
    """``keep_finite`` stores ``new`` where the health is finite and ``old`` where it is not:
    on the CPU by reading the flag (the very tensors come back, no pass over them), on the
    device path by ``torch.where`` (equal values, fresh tensors)."""
    from kfac_kernels._flags import keep_finite
    new, old = torch.randn(4, 5), torch.randn(4, 5)
    good, bad = torch.tensor(3.0, dtype=torch.float64), torch.tensor(float("nan"),
                                                                     dtype=torch.float64)
    kept_new, kept_old = keep_finite(new, old, good), keep_finite(new, old, bad)
    assert torch.equal(kept_new, new) and torch.equal(kept_old, old)
    host = stored_health_path == "host-read"
    assert (kept_new is new) == host and (kept_old is old) == host
    assert keep_finite(new, None, bad) is new


@pytest.mark.parametrize("name", ["kfac-cholesky", "singd-dense"])
def test_host_read_and_device_select_train_alike(name):
    """The two ways of deciding what is stored give bitwise equal training, through steps
    whose new state is not finite: K-FAC's decompositions of a factor gone NaN (the previous
    one is kept), SINGD's factor update with an infinite ``lr_cov`` (the previous factors are
    kept)."""
    from _syncs import host_reads

    from kfac_kernels import KFAC, SINGD, PreconditionedOptimizer

    def run(free):
        with host_reads(free):
            torch.manual_seed(0)
            model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
            if name == "kfac-cholesky":
                precond = KFAC(model, damping=1e-2, compute_method="cholesky",
                               damping_form="factored", inv_update_steps=1)
                opt = PreconditionedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1),
                                              precond)
            else:
                opt = SINGD(model, lr=0.05, lr_cov=0.05, T=1, structures="dense")
            gen = torch.Generator().manual_seed(1)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                for step in range(6):
                    x = torch.randn(16, 6, generator=gen)
                    y = torch.randint(0, 3, (16,), generator=gen)
                    opt.zero_grad()
                    if step == 3 and name == "kfac-cholesky":  # before the capture reads it
                        precond.blocks["2"].A[0][0, 0, 0] = float("nan")
                    nn.functional.cross_entropy(model(x), y).backward()
                    if name == "singd-dense":  # an update that is not finite at step 3
                        opt.lr_cov = math.inf if step == 3 else 0.05
                    opt.step()
            assert any("not finite" in str(w.message) for w in caught)
            return [p.detach().clone() for p in model.parameters()]

    for a, b in zip(run(True), run(False)):
        assert torch.equal(a, b)
