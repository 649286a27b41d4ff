"""The fused SINGD step for diagonal factors: every backend against the eager reference and
against dense matrices, bf16 judged against fp64, opcheck and argument checks. The triton and
cuda backends also run on CUDA tensors (``gpu`` marker; skipped without a CUDA device)."""
import pytest
import torch

from _backend_cases import kernel_cases
from kfac_kernels._backend import native_has_op
from kfac_kernels.ops.singd_diagonal_step import singd_diagonal_step
from kfac_kernels.testing import LOW_PRECISION_FACTOR, RTOL, backends_for, rel_error

SHAPES = [(5, 7), (1, 1), (17, 70), (3, 1)]


def _inputs(shape, dtype, seed=0, strided=False):
    gen = torch.Generator().manual_seed(seed)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    rows, cols = shape
    if strided:   # rows of a wider matrix: row stride != cols
        param = torch.randn(rows, cols + 3, generator=gen, dtype=torch.float64)[:, :cols]
    else:
        param = torch.randn(rows, cols, generator=gen, dtype=torch.float64)
    grad = torch.randn(cols, rows, generator=gen, dtype=torch.float64).T  # column-major
    c = torch.rand(rows, generator=gen, dtype=torch.float64) + 0.5
    k = torch.rand(cols, generator=gen, dtype=torch.float64) + 0.5
    buf = torch.randn(rows, cols, generator=gen, dtype=torch.float64)
    return (param.to(dtype), grad.to(dtype), c.to(acc), k.to(acc), buf.to(acc))


def _run(backend, inputs, device="cpu", **hp):
    """The step on copies of ``inputs`` moved to ``device`` (a strided ``param`` keeps a row
    stride past its width there too); the results back on the CPU."""
    param, grad, c, k, buf = (t.clone().to(device) if i in (0, 4) else t.to(device)
                              for i, t in enumerate(inputs))
    if param.dim() == 2 and inputs[0].stride(0) != inputs[0].shape[1]:
        wide = torch.zeros(param.shape[0], param.shape[1] + 3, dtype=param.dtype, device=device)
        wide[:, :param.shape[1]] = param
        param = wide[:, :param.shape[1]]
    singd_diagonal_step(param, grad, c, k, buf, backend=backend, **hp)
    return param.cpu(), buf.cpu()


HP = [dict(lr=0.1, momentum=0.9, weight_decay=0.01, first=False),
      dict(lr=0.05, momentum=0.0, weight_decay=0.0, first=True)]


@pytest.mark.parametrize("backend,device", kernel_cases())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("hp", HP)
def test_backends_match_eager(backend, device, dtype, shape, hp):
    inputs = _inputs(shape, dtype, strided=shape[1] > 1)
    p_ref, b_ref = _run("eager", inputs, **hp)
    p, b = _run(backend, inputs, device, **hp)
    assert rel_error(p, p_ref) <= RTOL[dtype]
    assert rel_error(b, b_ref) <= RTOL[dtype]


def test_eager_matches_dense_matrices():
    """Oracle: C C^T G K K^T with dense diagonal matrices, then weight decay and momentum."""
    param, grad, c, k, buf = _inputs((6, 9), torch.float64)
    C, K = torch.diag(c), torch.diag(k)
    d = C @ C.T @ grad @ K @ K.T + 0.01 * param
    want_buf = 0.9 * buf + d
    want_param = param - 0.1 * want_buf
    p, b = _run("eager", (param, grad, c, k, buf), lr=0.1, momentum=0.9, weight_decay=0.01,
                first=False)
    assert rel_error(b, want_buf) < 1e-14
    assert rel_error(p, want_param) < 1e-14


@pytest.mark.parametrize("backend,device", kernel_cases())
def test_bf16_error_against_fp64_within_twice_eager(backend, device):
    inputs = _inputs((17, 70), torch.bfloat16, seed=1)
    exact = _run("eager", tuple(t.double() for t in inputs), **HP[0])[0]
    eager_err = rel_error(_run("eager", inputs, **HP[0])[0], exact)
    err = rel_error(_run(backend, inputs, device, **HP[0])[0], exact)
    assert err <= LOW_PRECISION_FACTOR * eager_err + 1e-7, (err, eager_err)


@pytest.mark.skipif(not native_has_op("singd_diagonal_step"), reason="_C lacks the op")
def test_opcheck():
    param, grad, c, k, buf = _inputs((4, 6), torch.float32)
    torch.library.opcheck(torch.ops.kfac_kernels.singd_diagonal_step.default,
                          (param, grad.contiguous(), c, k, buf, 0.1, 0.9, 0.01, False))


def test_bad_arguments():
    param, grad, c, k, buf = _inputs((4, 6), torch.float32)
    with pytest.raises(ValueError, match=r"singd_diagonal_step: buf must have shape \(4, 6\) and "
                                         r"dtype torch.float32, got \(4, 6\) and torch.float64"):
        singd_diagonal_step(param, grad, c, k, buf.double(), 0.1, 0.9, 0.0, False)
    with pytest.raises(ValueError, match=r"singd_diagonal_step: k must be a torch.float32 vector "
                                         r"of 6 entries, got shape \(5,\)"):
        singd_diagonal_step(param, grad, c, k[:5], buf, 0.1, 0.9, 0.0, False)
    with pytest.raises(TypeError, match=r"singd_diagonal_step: param must be float32, float64 or "
                                        r"bfloat16, got torch.float16"):
        singd_diagonal_step(param.half(), grad.half(), c, k, buf, 0.1, 0.9, 0.0, False)
    with pytest.raises(ValueError, match=r"singd_diagonal_step: lr must be a finite float, got "
                                         r"nan"):
        singd_diagonal_step(param, grad, c, k, buf, float("nan"), 0.9, 0.0, False)


@pytest.mark.parametrize("backend", backends_for("cpu"))
def test_overlapping_outputs_are_refused_as_eager_refuses_them(backend):
    """A parameter whose rows share memory (an expanded tensor) would be written in an order
    that decides the result: every backend refuses it with eager's own message."""
    param = torch.zeros(1, 4).expand(3, 4)
    grad = torch.ones(3, 4)
    c, k, buf = torch.ones(3), torch.ones(4), torch.zeros(3, 4)
    with pytest.raises(RuntimeError, match="more than one element of the written-to tensor "
                                           "refers to a single memory location"):
        singd_diagonal_step(param, grad, c, k, buf, 0.1, 0.9, 0.0, True, backend=backend)


# --- singd_diagonal_step_foreach: many parameters in one call --------------------------------

def _foreach_lists(shapes_dtypes, seed=0):
    entries = [_inputs(shape, dtype, seed=seed + i, strided=i % 2 == 1)
               for i, (shape, dtype) in enumerate(shapes_dtypes)]
    return [list(t) for t in zip(*entries)]


MIXED = [((5, 7), torch.float32), ((1, 1), torch.float64), ((17, 70), torch.bfloat16),
         ((3, 1), torch.float32), ((0, 4), torch.float32), ((2, 9), torch.float64)]


@pytest.mark.parametrize("backend,device", kernel_cases())
def test_foreach_equals_one_call_per_parameter(backend, device):
    """Every entry of a mixed list (float32, float64, bfloat16, strided rows, an empty
    parameter, first and accumulating entries) gets bitwise the result of its own
    singd_diagonal_step call on the same backend."""
    from kfac_kernels.ops import singd_diagonal_step_foreach

    params, grads, cs, ks, bufs = _foreach_lists(MIXED)
    first = [i % 3 == 0 for i in range(len(MIXED))]
    mine = [[t.clone().to(device) for t in ts] for ts in (params, bufs)]
    moved = [[t.to(device) for t in ts] for ts in (grads, cs, ks)]
    singd_diagonal_step_foreach(mine[0], *moved, mine[1], 0.1, 0.9, 0.01, first,
                                backend=backend)
    for i, (p, g, c, k, b) in enumerate(zip(params, grads, cs, ks, bufs)):
        p, b = p.clone().to(device), b.clone().to(device)
        singd_diagonal_step(p, g.to(device), c.to(device), k.to(device), b, 0.1, 0.9, 0.01,
                            first[i], backend=backend)
        assert torch.equal(mine[0][i], p) and torch.equal(mine[1][i], b), i


def test_foreach_bad_arguments_name_the_entry():
    from kfac_kernels.ops import singd_diagonal_step_foreach

    params, grads, cs, ks, bufs = _foreach_lists(MIXED[:3])
    first = [False] * 3
    with pytest.raises(ValueError, match=r"singd_diagonal_step_foreach: params, grads, cs, ks, "
                                         r"bufs and first must have the same length, got 3, 3, "
                                         r"3, 2, 3, 3"):
        singd_diagonal_step_foreach(params, grads, cs, ks[:2], bufs, 0.1, 0.9, 0.0, first)
    bad = list(ks)
    bad[2] = bad[2][:5]
    with pytest.raises(ValueError, match=r"singd_diagonal_step_foreach: entry 2: k must be a "
                                         r"torch.float32 vector of 70 entries, got shape \(5,\)"):
        singd_diagonal_step_foreach(params, grads, cs, bad, bufs, 0.1, 0.9, 0.0, first)
    with pytest.raises(TypeError, match=r"singd_diagonal_step_foreach: params must be a list, "
                                        r"got Tensor"):
        singd_diagonal_step_foreach(params[0], grads, cs, ks, bufs, 0.1, 0.9, 0.0, first)
    with pytest.raises(ValueError, match=r"singd_diagonal_step_foreach: lr must be a finite "
                                         r"float, got inf"):
        singd_diagonal_step_foreach(params, grads, cs, ks, bufs, float("inf"), 0.9, 0.0, first)
    singd_diagonal_step_foreach([], [], [], [], [], 0.1, 0.9, 0.0, [])   # nothing to do


@pytest.mark.skipif(not native_has_op("singd_diagonal_step_foreach"), reason="_C lacks the op")
def test_foreach_native_checks_lengths():
    params, grads, cs, ks, bufs = _foreach_lists(MIXED[:2])
    with pytest.raises(RuntimeError, match="must have the same length"):
        torch.ops.kfac_kernels.singd_diagonal_step_foreach(params, grads, cs, ks, bufs, 0.1,
                                                           0.9, 0.0, [False])


@pytest.mark.parametrize("backend", backends_for("cpu"))
def test_foreach_refuses_what_the_single_step_refuses(backend):
    """An entry that overlaps itself, or has strided gradient rows (copied first), is handled
    as the per-parameter op handles it, whatever the backend."""
    from kfac_kernels.ops import singd_diagonal_step_foreach

    params, grads, cs, ks, bufs = _foreach_lists(MIXED[:2])
    params[1] = torch.zeros(1, 1, dtype=torch.float64).expand(1, 1)   # fine: one element
    params.append(torch.zeros(1, 4).expand(3, 4))
    grads.append(torch.ones(4, 3).T)                                    # strided rows
    cs.append(torch.ones(3))
    ks.append(torch.ones(4))
    bufs.append(torch.zeros(3, 4))
    with pytest.raises(RuntimeError, match="singd_diagonal_step_foreach: entry 2: param: unsupported "
                                           "operation: more "
                                           "than one element of the written-to tensor refers "
                                           "to a single memory location"):
        singd_diagonal_step_foreach(params, grads, cs, ks, bufs, 0.1, 0.9, 0.0,
                                    [True, False, True], backend=backend)
    params[2] = torch.zeros(3, 4)
    singd_diagonal_step_foreach(params, grads, cs, ks, bufs, 0.1, 0.9, 0.0,
                                [True, False, True], backend=backend)
    torch.testing.assert_close(params[2], torch.full((3, 4), -0.1))


@pytest.mark.skipif(not native_has_op("singd_diagonal_step_foreach"), reason="_C lacks the op")
def test_native_ops_refuse_a_parameter_that_overlaps_itself():
    """The native glue's own check (the foreach op calls it before any Python check)."""
    param = torch.zeros(1, 4).expand(3, 4)
    args = (torch.ones(3, 4), torch.ones(3), torch.ones(4), torch.zeros(3, 4))
    with pytest.raises(RuntimeError, match="must not overlap themselves"):
        torch.ops.kfac_kernels.singd_diagonal_step(param, *args, 0.1, 0.9, 0.0, True)
    with pytest.raises(RuntimeError, match="must not overlap themselves"):
        torch.ops.kfac_kernels.singd_diagonal_step_foreach([param], *([a] for a in args), 0.1,
                                                           0.9, 0.0, [True])
