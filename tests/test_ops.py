"""Every op of the registry (tests/op_registry.py) on every backend present against the eager
reference, on seeded samples (fp64: 1e-10, fp32: 1e-5 relative; CUDA devices too when present)."""
from __future__ import annotations

import zlib

import pytest
import torch

from kfac_kernels import testing
from kfac_kernels._backend import native_has_op
from op_registry import OPS  # tests/ is on sys.path under pytest

pytestmark = pytest.mark.usefixtures("single_thread")

SAMPLES = 6


def _cases():
    for info in OPS:
        for device in testing.devices():
            for backend in testing.backends_for(device):
                if backend == "eager" or not info.has(backend):
                    continue
                marks = [pytest.mark.gpu] if device.type == "cuda" else []
                for dtype in info.dtypes:
                    if backend in info.float32_only and dtype == torch.float64:
                        continue  # documented: that backend computes in float32 only
                    yield pytest.param(info, device, backend, dtype, marks=marks,
                                       id=f"{info.name}-{device.type}-{backend}-{str(dtype)[6:]}")


@pytest.mark.parametrize("info,device,backend,dtype", list(_cases()))
def test_backend_matches_eager(info, device, backend, dtype):
    gen = torch.Generator().manual_seed(zlib.crc32(info.name.encode()))
    for i in range(SAMPLES):
        sample = info.make(gen, dtype, device, size=i / SAMPLES)
        got = info.run(sample, backend)
        want = info.run(sample, "eager")
        assert len(got) == len(want)
        for g, w in zip(got, want):
            assert g.shape == w.shape and g.dtype == w.dtype, (i, g.shape, w.shape)
            err = testing.rel_error(g.cpu(), w.cpu())
            assert err <= testing.RTOL[dtype], (info.name, backend, i, err)


def _native_calls(info, dtype):
    """The ``torch.ops.kfac_kernels`` calls the op makes on the cpu backend, with copies of
    their arguments taken before the call (in-place ops change them)."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_map

    calls = []

    class Recorder(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.namespace == "kfac_kernels":
                clone = lambda t: t.clone() if isinstance(t, torch.Tensor) else t  # noqa: E731
                calls.append((func, tree_map(clone, args), tree_map(clone, kwargs or {})))
            return func(*args, **(kwargs or {}))

    gen = torch.Generator().manual_seed(zlib.crc32(info.name.encode()))
    sample = info.make(gen, dtype, torch.device("cpu"), size=0.2)
    with Recorder():
        info.run(sample, "cpu")
    return calls


@pytest.mark.skipif(not native_has_op("block_eigh"), reason="needs the native extension")
@pytest.mark.parametrize("info", OPS, ids=[info.name for info in OPS])
def test_opcheck_of_every_native_call(info):
    """``torch.library.opcheck`` (schema, fake kernel, autograd registration, dispatch) of every
    native call each op of the registry makes."""
    calls = _native_calls(info, torch.float64)
    assert calls, f"{info.name} made no native call on the cpu backend"
    for func, args, kwargs in calls:
        torch.library.opcheck(func, args, kwargs)


def test_fake_kernels_exist_and_validate_without_the_extension():
    """The schemas and fake kernels do not need kfac_kernels._C: torch.compile can trace the
    ops on a machine without it, and a fake call with a wrong shape fails with the op's name."""
    import subprocess
    import sys
    code = """
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
import kfac_kernels
from kfac_kernels._backend import native_has_op
assert not native_has_op("block_eigh")
with FakeTensorMode():
    vals, vecs, sweeps = torch.ops.kfac_kernels.block_eigh(torch.empty(3, 5, 5), 30, 1e-7)
    assert vals.shape == (3, 5) and vecs.shape == (3, 5, 5) and sweeps.dtype == torch.int32
    out = torch.ops.kfac_kernels.symmetric_factor_update(None, torch.empty(2, 7, 4), 0.9, 1.0)
    assert out.shape == (2, 4, 4)
    try:
        torch.ops.kfac_kernels.symmetric_factor_update(torch.empty(2, 3, 3),
                                                       torch.empty(2, 7, 4), 0.9, 1.0)
    except RuntimeError as err:
        assert "symmetric_factor_update: factor must have shape (2, 4, 4)" in str(err), err
    else:
        raise AssertionError("no error")
print("ok")
"""
    env = {**__import__("os").environ, "KFAC_KERNELS_DISABLE_NATIVE": "1"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         timeout=300)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-3000:]
