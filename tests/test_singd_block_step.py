"""The fused block-diagonal SINGD parameter step: every backend against the eager reference
(bf16 judged against fp64), and the eager reference against SINGD's structured `precondition`
with BlockDiagonal factors plus the paper's momentum rule. The triton and cuda backends also run
on CUDA tensors (``gpu`` marker; skipped without a CUDA device)."""
import pytest
import torch

from _backend_cases import all_cases, kernel_cases
from kfac_kernels._backend import native_has_op
from kfac_kernels.ops.singd_block_step import singd_block_step
from kfac_kernels.singd.optimizer import precondition
from kfac_kernels.singd.structures import BlockDiagonal
from kfac_kernels.testing import RTOL, rel_error

ROWS, COLS, BC, BK = 7, 8, 3, 4   # C blocks 3, 3, 1; K blocks 4, 4, 1 (the bias column)


def _blocks(dim, b):
    q, r = divmod(dim, b)
    return [b] * q + ([r] if r else [])


def _packed(dims, b, gen):
    out = torch.zeros(len(dims), b, b, dtype=torch.float64)
    for j, n in enumerate(dims):
        out[j, :n, :n] = torch.eye(n, dtype=torch.float64) + 0.3 * torch.randn(
            n, n, generator=gen, dtype=torch.float64)
    return out


def _problem(dtype, bias=True, seed=0, shape=(ROWS, COLS, BC, BK)):
    rows, cols, bc, bk = shape
    gen = torch.Generator().manual_seed(seed)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    width = cols + (1 if bias else 0)
    c_dims, k_dims = _blocks(rows, bc), _blocks(width, bk)
    t = {"weight": torch.randn(rows, cols, generator=gen, dtype=torch.float64),
         "weight_grad": torch.randn(rows, cols, generator=gen, dtype=torch.float64),
         "weight_buf": torch.randn(rows, cols, generator=gen, dtype=torch.float64)}
    if bias:
        for name in ("bias", "bias_grad", "bias_buf"):
            t[name] = torch.randn(rows, generator=gen, dtype=torch.float64)
    c, k = _packed(c_dims, bc, gen), _packed(k_dims, bk, gen)
    args = [t["weight"].to(dtype), t["weight_grad"].to(dtype),
            t["bias"].to(dtype) if bias else None, t["bias_grad"].to(dtype) if bias else None,
            c.to(acc), c_dims, k.to(acc), k_dims, t["weight_buf"].to(acc),
            t["bias_buf"].to(acc) if bias else None]
    return args


def _run(backend, args, first=False, wd=1e-2, device="cpu"):
    """The step on copies of ``args`` on ``device``; the parameters and buffers back on the
    CPU."""
    args = [a.clone().to(device) if isinstance(a, torch.Tensor) else a for a in args]
    singd_block_step(*args, 0.1, 0.9, wd, first, backend=backend)
    return [a.cpu() for i, a in enumerate(args) if i in (0, 2, 8, 9) and a is not None]


@pytest.mark.parametrize("backend,device", kernel_cases())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("bias,first", [(True, False), (False, True), (True, True)])
def test_backends_match_eager(backend, device, dtype, bias, first):
    args = _problem(dtype, bias)
    for got, want, before in zip(_run(backend, args, first, device=device),
                                 _run("eager", args, first),
                                 [a for i, a in enumerate(args) if i in (0, 2, 8, 9)
                                  and a is not None]):
        assert rel_error(got, want) <= RTOL[dtype]
        assert rel_error(got, before) > 1e-3


# (rows, cols, bc, bk): the CPU kernel has unrolled paths for K blocks of 8, 16 and 32 (and a
# general one); the last K block is partial (the remainder plus the bias column) in every case.
SHAPES = [(33, 40, 16, 16), (20, 70, 3, 8), (40, 95, 32, 32), (9, 23, 5, 7), (1, 5, 1, 16)]


@pytest.mark.parametrize("backend,device", kernel_cases())
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("bias", [True, False])
def test_backends_match_eager_at_block_sizes(backend, device, shape, bias):
    for dtype in (torch.float32, torch.float64):
        args = _problem(dtype, bias, seed=1, shape=shape)
        for got, want in zip(_run(backend, args, device=device), _run("eager", args)):
            assert rel_error(got, want) <= RTOL[dtype], (dtype, rel_error(got, want))
    exact = _run("eager", _problem(torch.float64, bias, seed=1, shape=shape))
    low = _problem(torch.bfloat16, bias, seed=1, shape=shape)
    eager_err = max(rel_error(a.double(), e) for a, e in zip(_run("eager", low), exact))
    got_err = max(rel_error(a.double(), e) for a, e in zip(_run(backend, low, device=device),
                                                           exact))
    assert got_err <= 2 * eager_err + 1e-7


@pytest.mark.parametrize("backend,device", all_cases())
def test_bf16_parameters_within_twice_the_eager_error(backend, device):
    exact = _run("eager", _problem(torch.float64))
    eager_err = max(rel_error(a.double(), e) for a, e in zip(_run("eager", _problem(
        torch.bfloat16)), exact))
    got = _run(backend, _problem(torch.bfloat16), device=device)
    assert got[0].dtype == torch.bfloat16
    assert max(rel_error(a.double(), e) for a, e in zip(got, exact)) <= 2 * eager_err + 1e-7


def test_eager_matches_structured_precondition_and_momentum():
    """Oracle: C C^T M K K^T through BlockDiagonal products (another association), then the
    momentum and parameter update of Fig. 4 written out."""
    w, wg, b, bg, c, c_dims, k, k_dims, wb, bb = _problem(torch.float64)
    got = _run("eager", [w, wg, b, bg, c, c_dims, k, k_dims, wb, bb])

    def structured(x, dims, dim, blk):
        q = dim // blk
        last = x[q, :dims[q], :dims[q]] if len(dims) > q else torch.zeros(0, 0,
                                                                          dtype=x.dtype)
        return BlockDiagonal(dim, (x[:q], last), blk)
    C, K = structured(c, c_dims, ROWS, BC), structured(k, k_dims, COLS + 1, BK)
    m = torch.cat([wg, bg[:, None]], 1)
    p = torch.cat([w, b[:, None]], 1)
    buf = 0.9 * torch.cat([wb, bb[:, None]], 1) + precondition(K, C, m) + 1e-2 * p
    new = p - 0.1 * buf
    assert rel_error(got[0], new[:, :-1]) < 1e-13
    assert rel_error(got[1], new[:, -1]) < 1e-13
    assert rel_error(got[2], buf[:, :-1]) < 1e-13


@pytest.mark.skipif(not native_has_op("singd_block_step"), reason="_C lacks the op")
def test_opcheck():
    args = _problem(torch.float32)
    torch.library.opcheck(torch.ops.kfac_kernels.singd_block_step.default,
                          (*args, 0.1, 0.9, 1e-2, False))


def test_bad_arguments():
    w, wg, b, bg, c, c_dims, k, k_dims, wb, bb = _problem(torch.float32)
    with pytest.raises(ValueError, match=r"singd_block_step: k_dims must be 2 ints in \[1, 4\] "
                                         r"summing to 9, got \[4, 4\]"):
        singd_block_step(w, wg, b, bg, c, c_dims, k[:2], [4, 4], wb, bb, 0.1, 0.9, 0.0, False)
    with pytest.raises(ValueError, match=r"singd_block_step: weight_buf must have shape \(7, 8\) "
                                         r"and dtype torch.float32, got \(7, 8\) and "
                                         r"torch.float64"):
        singd_block_step(w, wg, b, bg, c, c_dims, k, k_dims, wb.double(), bb, 0.1, 0.9, 0.0,
                         False)
    with pytest.raises(ValueError, match=r"singd_block_step: bias_grad and bias_buf must be None "
                                         r"without a bias"):
        singd_block_step(w, wg, None, bg, c, c_dims, k, k_dims, wb, bb, 0.1, 0.9, 0.0, False)
    with pytest.raises(ValueError, match=r"singd_block_step: lr must be a finite float"):
        singd_block_step(w, wg, b, bg, c, c_dims, k, k_dims, wb, bb, float("nan"), 0.9, 0.0,
                         False)
