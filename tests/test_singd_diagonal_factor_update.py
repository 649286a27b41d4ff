"""The many-layer diagonal factor update: every backend against the eager reference, and the
eager reference against the structured Fig. 4 update (SINGD's `factor_update` with Diagonal
structures and dense U, G). The triton and cuda backends also run on CUDA tensors (``gpu``
marker; skipped without a CUDA device)."""
import pytest
import torch

from _backend_cases import kernel_cases
from kfac_kernels._backend import native_has_op
from kfac_kernels.ops.singd_diagonal_factor_update import singd_diagonal_factor_update
from kfac_kernels.singd.optimizer import factor_update
from kfac_kernels.singd.structures import Diagonal
from kfac_kernels.testing import RTOL, rel_error

D_IN, D_OUT = [3, 1, 130], [2, 200, 1]   # sizes above the Triton block (128) and of one


def _problem(dtype, momentum, seed=0):
    gen = torch.Generator().manual_seed(seed)
    k_off = [0]
    c_off = [0]
    for a, b in zip(D_IN, D_OUT):
        k_off.append(k_off[-1] + a)
        c_off.append(c_off[-1] + b)

    def vec(n, lo):
        return (torch.rand(n, generator=gen, dtype=torch.float64) + lo).to(dtype)
    k, c = vec(k_off[-1], 0.5), vec(c_off[-1], 0.5)
    u, g = vec(k_off[-1], 0.0), vec(c_off[-1], 0.0)
    m_k = (vec(k_off[-1], -0.5) if momentum else None)
    m_c = (vec(c_off[-1], -0.5) if momentum else None)
    return k, c, m_k, m_c, u, g, k_off, c_off


def _run(backend, prob, kfac_like, device="cpu"):
    """The update on copies of ``prob`` on ``device``; the results back on the CPU."""
    k, c, m_k, m_c, u, g, k_off, c_off = [t.clone().to(device) if isinstance(t, torch.Tensor)
                                          else t for t in prob]
    singd_diagonal_factor_update(k, c, m_k, m_c, u, g, k_off, c_off, 0.1, 0.5, 0.05, kfac_like,
                                 backend=backend)
    return [t.cpu() for t in (k, c, m_k, m_c) if t is not None]


@pytest.mark.parametrize("backend,device", kernel_cases())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("momentum,kfac_like", [(True, False), (False, False), (False, True)])
def test_backends_match_eager(backend, device, dtype, momentum, kfac_like):
    prob = _problem(dtype, momentum)
    for got, want in zip(_run(backend, prob, kfac_like, device), _run("eager", prob, kfac_like)):
        assert rel_error(got, want) <= RTOL[dtype]


@pytest.mark.parametrize("momentum,kfac_like", [(True, False), (False, True)])
def test_eager_matches_structured_fig4_update(momentum, kfac_like):
    prob = _problem(torch.float64, momentum, seed=1)
    k, c, m_k, m_c, u, g, k_off, c_off = prob
    got = _run("eager", prob, kfac_like)
    for l in range(len(D_IN)):
        ks, cs = slice(k_off[l], k_off[l + 1]), slice(c_off[l], c_off[l + 1])
        # dense U, G with the given diagonals and arbitrary off-diagonal entries: the diagonal
        # projection must ignore the latter
        U = torch.diag(u[ks]) + 0.3 * torch.ones(D_IN[l], D_IN[l], dtype=torch.float64)
        U -= 0.3 * torch.eye(D_IN[l], dtype=torch.float64)
        G = torch.diag(g[cs]) - 0.2 * (1 - torch.eye(D_OUT[l], dtype=torch.float64))
        new = factor_update(Diagonal(D_IN[l], (k[ks],)), Diagonal(D_OUT[l], (c[cs],)), U, G,
                            damping=0.1, alpha1=0.5, lr_cov=0.05, kfac_like=kfac_like,
                            m_K=Diagonal(D_IN[l], (m_k[ks],)) if momentum else None,
                            m_C=Diagonal(D_OUT[l], (m_c[cs],)) if momentum else None)
        assert rel_error(got[0][ks], new["K"].data[0]) < 1e-13
        assert rel_error(got[1][cs], new["C"].data[0]) < 1e-13
        if momentum:
            assert rel_error(got[2][ks], new["m_K"].data[0]) < 1e-13


@pytest.mark.skipif(not native_has_op("singd_diagonal_factor_update"), reason="_C lacks the op")
def test_opcheck():
    k, c, m_k, m_c, u, g, k_off, c_off = _problem(torch.float32, True)
    torch.library.opcheck(torch.ops.kfac_kernels.singd_diagonal_factor_update.default,
                          (k, c, m_k, m_c, u, g, k_off, c_off, 0.1, 0.5, 0.05, False))


def test_bad_arguments():
    k, c, m_k, m_c, u, g, k_off, c_off = _problem(torch.float32, True)
    with pytest.raises(ValueError, match=r"singd_diagonal_factor_update: k_offsets must be a "
                                         r"list of increasing ints from 0 to 134, got \[0, 3, 3"):
        singd_diagonal_factor_update(k, c, m_k, m_c, u, g, [0, 3, 3, 134], c_off, 0.1, 0.5,
                                     0.05, False)
    with pytest.raises(ValueError, match=r"singd_diagonal_factor_update: m_k and m_c must both "
                                         r"be given or both be None"):
        singd_diagonal_factor_update(k, c, m_k, None, u, g, k_off, c_off, 0.1, 0.5, 0.05, False)
    with pytest.raises(ValueError, match=r"singd_diagonal_factor_update: u must be a contiguous "
                                         r"torch.float32 vector of shape \(134,\) on cpu; it has "
                                         r"dtype torch.float64, expected torch.float32"):
        singd_diagonal_factor_update(k, c, m_k, m_c, u.double(), g, k_off, c_off, 0.1, 0.5,
                                     0.05, False)
    strided = torch.stack([k, k], dim=1)[:, 0]
    with pytest.raises(ValueError, match=r"singd_diagonal_factor_update: k must be a contiguous "
                                         r"torch.float32 vector of shape \(134,\) on cpu; it has "
                                         r"strides \(2,\) \(not contiguous"):
        singd_diagonal_factor_update(strided, c, m_k, m_c, u, g, k_off, c_off, 0.1, 0.5, 0.05,
                                     False)
