"""Counting the calls that would synchronise the host with a GPU, on CPU tensors: reading a
tensor's value on the host (``item``, ``bool``, ``float``, ``int``, ``tolist``, ``numpy``,
``cpu()``, ``nonzero`` whose size the host needs) and making a tensor from host data (``torch.tensor`` / ``torch.as_tensor``, a
host-to-device copy on a GPU). Where the count grows, the line is recorded. While counting, CPU
tensors take the path of device tensors (``kfac_kernels._flags.CPU_READS_FREE`` off: on the CPU
the package reads values that decide what is stored at once, which costs nothing there)."""
from __future__ import annotations

import contextlib
import traceback
from collections import Counter

import torch

_READS = ("item", "__bool__", "__float__", "__int__", "__index__", "tolist", "numpy", "cpu",
          "nonzero")


@contextlib.contextmanager
def count_syncs(package: str = "kfac_kernels"):
    """Yield a Counter of ``(kind, file:line)`` for every such call made from ``package``."""
    counts: Counter = Counter()
    originals = {}

    def where():
        for frame in reversed(traceback.extract_stack()[:-2]):
            parts = frame.filename.replace("\\", "/").split("/")
            if "optim" in parts and "torch" in parts:
                return None  # inside a torch.optim optimizer the package wraps: its own reads
            if package in parts:
                return f"{frame.filename.split(package + '/')[-1]}:{frame.lineno}"
        return None

    def wrap(owner, name):
        original = getattr(owner, name)
        originals[(owner, name)] = original

        def counted(*args, **kwargs):
            site = where()
            if site is not None:
                counts[(name, site)] += 1
            return original(*args, **kwargs)
        setattr(owner, name, counted)

    for name in _READS:
        wrap(torch.Tensor, name)
    for name in ("tensor", "as_tensor"):
        wrap(torch, name)
    try:
        with host_reads(False):
            yield counts
    finally:
        for (owner, name), original in originals.items():
            setattr(owner, name, original)


@contextlib.contextmanager
def host_reads(free: bool):
    """CPU tensors read their health flags on the host (``free``) or take the device path
    (``kfac_kernels._flags.CPU_READS_FREE``) inside the block."""
    from kfac_kernels import _flags

    before, _flags.CPU_READS_FREE = _flags.CPU_READS_FREE, free
    try:
        yield
    finally:
        _flags.CPU_READS_FREE = before
