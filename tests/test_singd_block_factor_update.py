"""The many-layer block-diagonal factor update: every backend against the eager reference, and the
eager reference against the structured Fig. 4 update (SINGD's `factor_update` with BlockDiagonal
structures and dense U, G). The triton and cuda backends also run on CUDA tensors (``gpu``
marker; skipped without a CUDA device)."""
import pytest
import torch

from _backend_cases import kernel_cases
from kfac_kernels._backend import native_has_op
from kfac_kernels.ops.singd_block_factor_update import singd_block_factor_update
from kfac_kernels.singd.optimizer import factor_update
from kfac_kernels.singd.structures import BlockDiagonal
from kfac_kernels.testing import RTOL, rel_error

BK, BC = 4, 3
# per layer: (d_in, d_out); blocks of BK / BC with a smaller last block, and a layer narrower
# than one block
LAYERS = [(9, 7), (2, 1), (4, 6)]


def _blocks(dim, b):
    q, r = divmod(dim, b)
    return [b] * q + ([r] if r else [])


def _problem(dtype, momentum, seed=0):
    gen = torch.Generator().manual_seed(seed)
    k_dims = [n for d, _ in LAYERS for n in _blocks(d, BK)]
    c_dims = [n for _, d in LAYERS for n in _blocks(d, BC)]
    k_off, c_off = [0], [0]
    for d_i, d_o in LAYERS:
        k_off.append(k_off[-1] + len(_blocks(d_i, BK)))
        c_off.append(c_off[-1] + len(_blocks(d_o, BC)))

    def packed(dims, b, kind):
        out = torch.zeros(len(dims), b, b, dtype=torch.float64)
        for j, n in enumerate(dims):
            x = torch.randn(n, n, generator=gen, dtype=torch.float64)
            if kind == "factor":
                x = torch.eye(n, dtype=torch.float64) + 0.2 * x
            elif kind == "spd":
                x = x @ x.T / n
            else:
                x = 0.1 * (x + x.T)
            out[j, :n, :n] = x
        return out.to(dtype)
    k, c = packed(k_dims, BK, "factor"), packed(c_dims, BC, "factor")
    u, g = packed(k_dims, BK, "spd"), packed(c_dims, BC, "spd")
    m_k = packed(k_dims, BK, "sym") if momentum else None
    m_c = packed(c_dims, BC, "sym") if momentum else None
    return k, c, m_k, m_c, u, g, k_dims, c_dims, k_off, c_off


def _run(backend, prob, kfac_like, device="cpu"):
    """The update on copies of ``prob`` on ``device``; the results back on the CPU."""
    k, c, m_k, m_c, u, g, *layout = [t.clone().to(device) if isinstance(t, torch.Tensor) else t
                                     for t in prob]
    singd_block_factor_update(k, c, m_k, m_c, u, g, *layout, 0.1, 0.5, 0.05, kfac_like,
                              backend=backend)
    return [t.cpu() for t in (k, c, m_k, m_c) if t is not None]


@pytest.mark.parametrize("backend,device", kernel_cases())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("momentum,kfac_like", [(True, False), (False, False), (False, True)])
def test_backends_match_eager(backend, device, dtype, momentum, kfac_like):
    prob = _problem(dtype, momentum)
    got_all = _run(backend, prob, kfac_like, device)
    for got, want, before in zip(got_all, _run("eager", prob, kfac_like), prob):
        assert rel_error(got, want) <= RTOL[dtype]
        assert rel_error(got, before) > 1e-4   # the update did something
    # the unused corners of the padded slots are neither read nor written
    k_dims = prob[6]
    for j, n in enumerate(k_dims):
        assert torch.equal(got_all[0][j, n:, :], prob[0][j, n:, :])


def _layer_blocks(x, dims, off, l):
    return [x[j, :dims[j], :dims[j]] for j in range(off[l], off[l + 1])]


def _structured(blocks, dim, b):
    q = dim // b
    full = torch.stack(blocks[:q]) if q else torch.zeros(0, b, b, dtype=blocks[0].dtype)
    last = blocks[q] if len(blocks) > q else torch.zeros(0, 0, dtype=blocks[0].dtype)
    return BlockDiagonal(dim, (full, last), b)


@pytest.mark.parametrize("momentum,kfac_like", [(True, False), (False, True)])
def test_eager_matches_structured_fig4_update(momentum, kfac_like):
    """Against factor_update with dense U, G whose off-block entries must be ignored."""
    prob = _problem(torch.float64, momentum, seed=1)
    k, c, m_k, m_c, u, g, k_dims, c_dims, k_off, c_off = prob
    got = _run("eager", prob, kfac_like)
    gen = torch.Generator().manual_seed(2)
    for l, (d_i, d_o) in enumerate(LAYERS):
        def dense(x, dims, off, dim):
            noise = torch.randn(dim, dim, generator=gen, dtype=torch.float64)
            mask = torch.block_diag(*[torch.ones(n, n, dtype=torch.float64)
                                      for n in dims[off[l]:off[l + 1]]])
            return torch.block_diag(*_layer_blocks(x, dims, off, l)) + (noise + noise.T) * (
                1 - mask)
        K = _structured(_layer_blocks(k, k_dims, k_off, l), d_i, BK)
        C = _structured(_layer_blocks(c, c_dims, c_off, l), d_o, BC)
        mK = _structured(_layer_blocks(m_k, k_dims, k_off, l), d_i, BK) if momentum else None
        mC = _structured(_layer_blocks(m_c, c_dims, c_off, l), d_o, BC) if momentum else None
        new = factor_update(K, C, dense(u, k_dims, k_off, d_i), dense(g, c_dims, c_off, d_o),
                            damping=0.1, alpha1=0.5, lr_cov=0.05, kfac_like=kfac_like,
                            m_K=mK, m_C=mC)
        want_k = torch.block_diag(*_layer_blocks(got[0], k_dims, k_off, l))
        want_c = torch.block_diag(*_layer_blocks(got[1], c_dims, c_off, l))
        assert rel_error(want_k, new["K"].to_dense()) < 1e-13
        assert rel_error(want_c, new["C"].to_dense()) < 1e-13
        if momentum:
            got_mk = torch.block_diag(*_layer_blocks(got[2], k_dims, k_off, l))
            assert rel_error(got_mk, new["m_K"].to_dense()) < 1e-13


@pytest.mark.skipif(not native_has_op("singd_block_factor_update"), reason="_C lacks the op")
def test_opcheck():
    k, c, m_k, m_c, u, g, *layout = _problem(torch.float32, True)
    torch.library.opcheck(torch.ops.kfac_kernels.singd_block_factor_update.default,
                          (k, c, m_k, m_c, u, g, *layout, 0.1, 0.5, 0.05, False))


def test_bad_arguments():
    k, c, m_k, m_c, u, g, k_dims, c_dims, k_off, c_off = _problem(torch.float32, True)
    with pytest.raises(ValueError, match=r"singd_block_factor_update: k_layer_offsets must be a "
                                         r"list of increasing ints from 0 to 5, got \[0, 3, 3"):
        singd_block_factor_update(k, c, m_k, m_c, u, g, k_dims, c_dims, [0, 3, 3, 5], c_off,
                                  0.1, 0.5, 0.05, False)
    with pytest.raises(ValueError, match=r"singd_block_factor_update: k_dims must be a list of 5 "
                                         r"ints in \[1, 4\], got \[5"):
        singd_block_factor_update(k, c, m_k, m_c, u, g, [5] + k_dims[1:], c_dims, k_off, c_off,
                                  0.1, 0.5, 0.05, False)
    with pytest.raises(ValueError, match=r"singd_block_factor_update: m_k and m_c must both be "
                                         r"given or both be None"):
        singd_block_factor_update(k, c, m_k, None, u, g, k_dims, c_dims, k_off, c_off, 0.1, 0.5,
                                  0.05, False)
    with pytest.raises(ValueError, match=r"singd_block_factor_update: u must be a contiguous "
                                         r"torch.float32 tensor of shape \(5, 4, 4\) on cpu; it "
                                         r"has dtype torch.float64"):
        singd_block_factor_update(k, c, m_k, m_c, u.double(), g, k_dims, c_dims, k_off, c_off,
                                  0.1, 0.5, 0.05, False)
