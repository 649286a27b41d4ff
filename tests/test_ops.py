"""Every op of the registry (tests/op_registry.py) on every backend present against the eager
reference, on seeded samples (fp64: 1e-10, fp32: 1e-5 relative; CUDA devices too when present)."""
from __future__ import annotations

import zlib

import pytest
import torch

from kfac_kernels import testing
from op_registry import OPS  # tests/ is on sys.path under pytest

pytestmark = pytest.mark.usefixtures("single_thread")

SAMPLES = 6


def _cases():
    for info in OPS:
        for device in testing.devices():
            for backend in testing.backends_for(device):
                if backend == "eager":
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
