"""Every op of ``kfac_kernels.ops`` with its reference and sample inputs, in the manner of
torch's ``OpInfo``: the generic tests (tests/test_ops.py) run each op on every backend present
(cuda and triton included where there is a GPU) against the eager reference, and the fuzz test
draws its cases from the same generators.

An entry's ``make(gen, dtype, device, size)`` returns one sample (a dict of inputs, ``size``
in 0..1 scaling its shapes); ``run(sample, backend)`` calls the op on fresh copies of the
inputs and returns the tensors to compare (the outputs, or the updated in-place arguments).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from kfac_kernels import ops

F32, F64 = torch.float32, torch.float64


@dataclass
class OpInfo:
    name: str
    make: Callable[..., dict]
    run: Callable[[dict, str], list[torch.Tensor]]
    dtypes: tuple = (F32, F64)
    float32_only: tuple = ()   # backends that compute in float32 only (documented)
    backends: tuple | None = None  # the non-eager backends the op has (None: every one)

    def has(self, backend: str) -> bool:
        return self.backends is None or backend in self.backends


def _rand(gen, *shape, dtype=F64, device="cpu", lo=None):
    t = torch.randn(*shape, generator=gen, dtype=F64) if lo is None else \
        torch.rand(*shape, generator=gen, dtype=F64) + lo
    return t.to(device=device, dtype=dtype)


def _int(gen, lo, hi):
    return int(torch.randint(lo, hi + 1, (), generator=gen))


def _copy(x):
    return x.clone() if isinstance(x, torch.Tensor) else x


# --- factor accumulation ------------------------------------------------------------------------

def _sfu_make(gen, dtype, device, size=0.3):
    b, m, d = _int(gen, 1, 3), _int(gen, 1, int(8 + 60 * size)), _int(gen, 1, int(4 + 40 * size))
    x = _rand(gen, b, m, d, dtype=dtype, device=device)
    base = _rand(gen, b, d, d + 2, dtype=dtype, device=device)
    factor = base @ base.mT if _int(gen, 0, 1) else None
    return {"factor": factor, "x": x, "decay": 0.9, "alpha": 0.25}


def _sfu_run(s, backend):
    return [ops.symmetric_factor_update(_copy(s["factor"]), s["x"], s["decay"], s["alpha"],
                                        backend=backend)]


def _conv_make(gen, dtype, device, size=0.3):
    groups = _int(gen, 1, 2)
    c = groups * _int(gen, 1, 3)
    kh, kw = _int(gen, 1, 3), _int(gen, 1, 3)
    h, w = _int(gen, kh, kh + int(2 + 8 * size)), _int(gen, kw, kw + int(2 + 8 * size))
    x = _rand(gen, _int(gen, 1, 3), c, h, w, dtype=dtype, device=device)
    return {"x": x, "kernel_size": (kh, kw), "stride": _int(gen, 1, 2),
            "padding": _int(gen, 0, 1), "groups": groups, "bias": bool(_int(gen, 0, 1)),
            "mode": ("expand", "reduce")[_int(gen, 0, 1)],
            "num_blocks": None if _int(gen, 0, 1) else 1}


def _conv_run(s, backend):
    out = ops.patch_covariance(s["x"], s["kernel_size"], s["stride"], s["padding"], 1,
                               s["groups"], mode=s["mode"], num_blocks=s["num_blocks"],
                               bias=s["bias"], backend=backend)
    return out if isinstance(out, list) else [out]


def _gcov_make(gen, dtype, device, size=0.3):
    groups = _int(gen, 1, 3)
    g = _rand(gen, _int(gen, 1, 4), groups * _int(gen, 1, 5), _int(gen, 1, int(3 + 10 * size)),
              dtype=dtype, device=device)
    return {"grad": g, "groups": groups, "mode": ("expand", "reduce")[_int(gen, 0, 1)]}


def _gcov_run(s, backend):
    return [ops.gradient_covariance(s["grad"], channel_dim=1, groups=s["groups"], mode=s["mode"],
                                    decay=0.0, alpha=0.5, backend=backend)]


# --- decompositions ------------------------------------------------------------------------------

def _spd_make(gen, dtype, device, size=0.3):
    n, b = _int(gen, 1, int(4 + 28 * size)), _int(gen, 1, 4)
    x = _rand(gen, b, n, n + 3, dtype=F64)
    a = (x @ x.mT / (n + 3)).to(device=device, dtype=dtype)
    return {"blocks": a, "damping": [0.1 * (i + 1) for i in range(b)]}


def _eigh_run(s, backend):
    vals, vecs = ops.block_eigh(s["blocks"], backend=backend)
    # Eigenvectors are unique up to sign (and rotation within repeated eigenvalues): compare
    # the eigenvalues and the reconstruction Q diag(L) Q^T.
    return [vals, vecs @ torch.diag_embed(vals) @ vecs.mT]


def _inverse_run(s, backend):
    return [ops.block_damped_inverse(s["blocks"], s["damping"], backend=backend)]


def _cholesky_run(s, backend):
    return [ops.block_damped_cholesky(s["blocks"], s["damping"], backend=backend)]


# --- SINGD ----------------------------------------------------------------------------------------

def _diag_step_make(gen, dtype, device, size=0.3):
    rows, cols = _int(gen, 1, int(4 + 40 * size)), _int(gen, 1, int(4 + 40 * size))
    acc = F64 if dtype == F64 else F32
    return {"param": _rand(gen, rows, cols, dtype=dtype, device=device),
            "grad": _rand(gen, rows, cols, dtype=dtype, device=device),
            "c": _rand(gen, rows, dtype=acc, device=device, lo=0.5),
            "k": _rand(gen, cols, dtype=acc, device=device, lo=0.5),
            "buf": _rand(gen, rows, cols, dtype=acc, device=device),
            "first": bool(_int(gen, 0, 1))}


def _diag_step_run(s, backend):
    p, buf = _copy(s["param"]), _copy(s["buf"])
    ops.singd_diagonal_step(p, s["grad"], s["c"], s["k"], buf, 0.1, 0.9, 1e-2, s["first"],
                            backend=backend)
    return [p, buf]


def _diag_foreach_make(gen, dtype, device, size=0.3):
    """1-4 parameters of the given dtype, their inputs as ``<name><i>`` entries of the sample (a
    float32 list ends with a bfloat16 parameter when it has more than one)."""
    n = _int(gen, 1, 4)
    out = {}
    for i in range(n):
        entry = _diag_step_make(gen, dtype, device, size)
        if dtype == F32 and n > 1 and i == n - 1:
            for key in ("param", "grad"):
                entry[key] = entry[key].to(torch.bfloat16)
        out.update({f"{key}{i}": v for key, v in entry.items()})
    return out


def _diag_foreach_run(s, backend):
    n = sum(1 for key in s if key.startswith("param"))
    lists = {key: [s[f"{key}{i}"] for i in range(n)]
             for key in ("param", "grad", "c", "k", "buf", "first")}
    params, bufs = [_copy(t) for t in lists["param"]], [_copy(t) for t in lists["buf"]]
    ops.singd_diagonal_step_foreach(params, lists["grad"], lists["c"], lists["k"], bufs, 0.1,
                                    0.9, 1e-2, lists["first"], backend=backend)
    return [t.float() if t.dtype == torch.bfloat16 else t for t in params + bufs]


def _offsets(sizes):
    out = [0]
    for n in sizes:
        out.append(out[-1] + n)
    return out


def _diag_factor_make(gen, dtype, device, size=0.3):
    layers = _int(gen, 1, 3)
    k_off = _offsets([_int(gen, 1, int(3 + 20 * size)) for _ in range(layers)])
    c_off = _offsets([_int(gen, 1, int(3 + 20 * size)) for _ in range(layers)])
    vec = lambda n, lo: _rand(gen, n, dtype=dtype, device=device, lo=lo)  # noqa: E731
    momentum = bool(_int(gen, 0, 1))
    return {"k": vec(k_off[-1], 0.5), "c": vec(c_off[-1], 0.5),
            "m_k": vec(k_off[-1], -0.5) if momentum else None,
            "m_c": vec(c_off[-1], -0.5) if momentum else None,
            "u": vec(k_off[-1], 0.0), "g": vec(c_off[-1], 0.0), "k_off": k_off, "c_off": c_off,
            "kfac_like": not momentum and bool(_int(gen, 0, 1))}


def _diag_factor_run(s, backend):
    t = {key: _copy(s[key]) for key in ("k", "c", "m_k", "m_c")}
    ops.singd_diagonal_factor_update(t["k"], t["c"], t["m_k"], t["m_c"], s["u"], s["g"],
                                     s["k_off"], s["c_off"], 0.1, 0.5, 0.05, s["kfac_like"],
                                     backend=backend)
    return [v for v in t.values() if v is not None]


def _block_dims(dim, b):
    q, r = divmod(dim, b)
    return [b] * q + ([r] if r else [])


def _packed(gen, dims, b, dtype, device, spd=False):
    out = torch.zeros(len(dims), b, b, dtype=F64)
    for j, n in enumerate(dims):
        x = torch.randn(n, n, generator=gen, dtype=F64)
        out[j, :n, :n] = x @ x.T / n if spd else torch.eye(n, dtype=F64) + 0.3 * x
    return out.to(device=device, dtype=dtype)


def _block_step_make(gen, dtype, device, size=0.3):
    rows, cols = _int(gen, 1, int(4 + 20 * size)), _int(gen, 1, int(4 + 20 * size))
    bc, bk, bias = _int(gen, 1, 5), _int(gen, 1, 5), bool(_int(gen, 0, 1))
    acc = F64 if dtype == F64 else F32
    c_dims, k_dims = _block_dims(rows, bc), _block_dims(cols + bias, bk)
    s = {"weight": _rand(gen, rows, cols, dtype=dtype, device=device),
         "weight_grad": _rand(gen, rows, cols, dtype=dtype, device=device),
         "bias": _rand(gen, rows, dtype=dtype, device=device) if bias else None,
         "bias_grad": _rand(gen, rows, dtype=dtype, device=device) if bias else None,
         "c": _packed(gen, c_dims, bc, acc, device), "c_dims": c_dims,
         "k": _packed(gen, k_dims, bk, acc, device), "k_dims": k_dims,
         "weight_buf": _rand(gen, rows, cols, dtype=acc, device=device),
         "bias_buf": _rand(gen, rows, dtype=acc, device=device) if bias else None,
         "first": bool(_int(gen, 0, 1))}
    return s


def _block_step_run(s, backend):
    t = {key: _copy(s[key]) for key in ("weight", "bias", "weight_buf", "bias_buf")}
    ops.singd_block_step(t["weight"], s["weight_grad"], t["bias"], s["bias_grad"], s["c"],
                         s["c_dims"], s["k"], s["k_dims"], t["weight_buf"], t["bias_buf"], 0.1,
                         0.9, 1e-2, s["first"], backend=backend)
    return [v for v in t.values() if v is not None]


def _block_factor_make(gen, dtype, device, size=0.3):
    layers, bk, bc = _int(gen, 1, 3), _int(gen, 1, 5), _int(gen, 1, 5)
    k_dims, c_dims, k_lay, c_lay = [], [], [0], [0]
    for _ in range(layers):
        dk = _block_dims(_int(gen, 1, int(3 + 12 * size)), bk)
        dc = _block_dims(_int(gen, 1, int(3 + 12 * size)), bc)
        k_dims += dk
        c_dims += dc
        k_lay.append(k_lay[-1] + len(dk))
        c_lay.append(c_lay[-1] + len(dc))
    momentum = bool(_int(gen, 0, 1))
    side = lambda dims, b, spd=False: _packed(gen, dims, b, dtype, device, spd)  # noqa: E731
    return {"k": side(k_dims, bk), "c": side(c_dims, bc),
            "m_k": side(k_dims, bk, True) * 0.1 if momentum else None,
            "m_c": side(c_dims, bc, True) * 0.1 if momentum else None,
            "u": side(k_dims, bk, True), "g": side(c_dims, bc, True), "k_dims": k_dims,
            "c_dims": c_dims, "k_lay": k_lay, "c_lay": c_lay,
            "kfac_like": not momentum and bool(_int(gen, 0, 1))}


def _block_factor_run(s, backend):
    t = {key: _copy(s[key]) for key in ("k", "c", "m_k", "m_c")}
    ops.singd_block_factor_update(t["k"], t["c"], t["m_k"], t["m_c"], s["u"], s["g"],
                                  s["k_dims"], s["c_dims"], s["k_lay"], s["c_lay"], 0.1, 0.5,
                                  0.05, s["kfac_like"], backend=backend)
    return [v for v in t.values() if v is not None]


OPS: list[OpInfo] = [
    OpInfo("symmetric_factor_update", _sfu_make, _sfu_run),
    OpInfo("patch_covariance", _conv_make, _conv_run),
    OpInfo("gradient_covariance", _gcov_make, _gcov_run),
    OpInfo("block_eigh", _spd_make, _eigh_run, float32_only=("triton",)),
    OpInfo("block_damped_inverse", _spd_make, _inverse_run, float32_only=("triton",)),
    OpInfo("block_damped_cholesky", _spd_make, _cholesky_run, backends=("cpu",)),
    OpInfo("singd_diagonal_step", _diag_step_make, _diag_step_run),
    OpInfo("singd_diagonal_step_foreach", _diag_foreach_make, _diag_foreach_run),
    OpInfo("singd_diagonal_factor_update", _diag_factor_make, _diag_factor_run),
    OpInfo("singd_block_step", _block_step_make, _block_step_run),
    OpInfo("singd_block_factor_update", _block_factor_make, _block_factor_run),
]
