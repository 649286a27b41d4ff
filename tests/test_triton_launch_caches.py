"""The SINGD Triton launchers make no tensor per call once a layout has been seen: the metadata
(block sizes, offsets, the layer of every slot) is cached on the device by value, the scratch
per device, stream and size, and the scalars are fp64 kernel arguments. On a GPU each such
tensor would be an allocation and (for ``torch.tensor``) a host-to-device copy per step.

Counted on CPU tensors under the interpreter (where, alone, the scalars travel in a host fp64
tensor made by ``_tiles.scalar_args``: the interpreter narrows float arguments to fp32)."""
from __future__ import annotations

import inspect
import os
from collections import Counter

import pytest
import torch

import test_singd_block_factor_update as block_factor
import test_singd_block_step as block_step
import test_singd_diagonal_factor_update as diagonal_factor
import test_singd_diagonal_step as diagonal_step
from _syncs import count_syncs

triton = pytest.importorskip("triton")
pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                reason="the Triton kernels run on CPU tensors only under "
                                       "TRITON_INTERPRET=1")

from kfac_kernels._triton import _tiles  # noqa: E402


def _scalar_args_lines() -> range:
    lines, first = inspect.getsourcelines(_tiles.scalar_args)
    return range(first, first + len(lines))


class _CountEmpty:
    """Counts torch.empty / zeros / ones / full calls made from the Triton package."""

    def __init__(self, monkeypatch):
        self.counts: Counter = Counter()
        for name in ("empty", "zeros", "ones", "full"):
            original = getattr(torch, name)

            def counted(*args, _original=original, _name=name, **kwargs):
                frame = inspect.currentframe().f_back
                if "triton_kernels" in frame.f_code.co_filename.replace("\\", "/"):
                    self.counts[(_name, f"{os.path.basename(frame.f_code.co_filename)}:"
                                        f"{frame.f_lineno}")] += 1
                return _original(*args, **kwargs)
            monkeypatch.setattr(torch, name, counted)


def _calls():
    """One call per SINGD op through its public function with backend="triton"; a second call
    of each runs with other scalars (a learning-rate schedule) on the same layout."""
    dstep = diagonal_step._inputs((17, 70), torch.float32)
    dfac = diagonal_factor._problem(torch.float32, True)
    bfac = block_factor._problem(torch.float64, True)
    bstep = block_step._problem(torch.float32)
    return [
        lambda hp: diagonal_step._run("triton", dstep, lr=hp, momentum=0.9, weight_decay=0.01,
                                      first=False),
        lambda hp: diagonal_factor._run("triton", dfac, False),
        lambda hp: block_factor._run("triton", bfac, False),
        lambda hp: block_step._run("triton", bstep, wd=hp),
    ]


@pytest.mark.parametrize("op", range(4), ids=["diagonal_step", "diagonal_factor_update",
                                              "block_factor_update", "block_step"])
def test_second_call_on_a_layout_makes_no_tensor(op, monkeypatch):
    monkeypatch.setattr(_tiles, "_int64_cache", {})
    monkeypatch.setattr(_tiles, "_workspace_cache", {})
    call = _calls()[op]
    scalar_lines = _scalar_args_lines()

    def made(counts):
        return {site: n for site, n in counts.items()
                if not (site[1].startswith("_tiles.py:")
                        and int(site[1].split(":")[1]) in scalar_lines)}

    empties = _CountEmpty(monkeypatch)
    with count_syncs("triton_kernels") as first:
        call(0.1)
    first_made = made(first) | dict(empties.counts)
    empties.counts.clear()
    with count_syncs("triton_kernels") as second:
        call(0.05)
    assert made(second) == {} and dict(empties.counts) == {}, (made(second), empties.counts)
    if op != 0:  # the per-layer ops have metadata: the first call made it (the counter works)
        assert first_made, "the first call on a layout copies its metadata"


def test_scalars_are_kernel_arguments_on_a_gpu(monkeypatch):
    placeholder = torch.empty(3)
    monkeypatch.setattr(_tiles, "interpreted", lambda: False)
    with count_syncs("triton_kernels") as counts:
        scal, in_memory = _tiles.scalar_args(0.1, 0.9, 0.0, device=torch.device("cpu"),
                                             placeholder=placeholder)
    assert scal is placeholder and not in_memory and not counts
    monkeypatch.setattr(_tiles, "interpreted", lambda: True)
    scal, in_memory = _tiles.scalar_args(0.1, 1 / 3, device=torch.device("cpu"),
                                         placeholder=placeholder)
    assert in_memory and scal.dtype == torch.float64 and scal.tolist() == [0.1, 1 / 3]


def test_caches_are_keyed_by_value_device_and_size(monkeypatch):
    monkeypatch.setattr(_tiles, "_int64_cache", {})
    monkeypatch.setattr(_tiles, "_workspace_cache", {})
    cpu = torch.device("cpu")
    a = _tiles.cached_int64([0, 3, 5], cpu)
    assert a.tolist() == [0, 3, 5] and a.dtype == torch.int64
    assert _tiles.cached_int64((0, 3, 5), cpu) is a
    assert _tiles.cached_int64([0, 3, 6], cpu) is not a
    prefix = _tiles.cached_int64([2, 3], cpu, "prefix", lambda v: [0, v[0], v[0] + v[1]])
    assert prefix.tolist() == [0, 2, 5] and prefix is not _tiles.cached_int64([2, 3], cpu)
    w = _tiles.cached_workspace(8, torch.float32, cpu)
    assert _tiles.cached_workspace(8, torch.float32, cpu) is w
    assert _tiles.cached_workspace(8, torch.float64, cpu) is not w
    assert _tiles.cached_workspace(9, torch.float32, cpu).numel() == 9
    monkeypatch.setattr(_tiles, "_CACHE_LIMIT", 0)  # full: correct tensors, nothing kept
    kept = len(_tiles._int64_cache)
    assert _tiles.cached_int64([7], cpu).tolist() == [7] and len(_tiles._int64_cache) == kept
