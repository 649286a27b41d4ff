"""The block_eigh CUDA kernel's shared-memory accesses are free of bank conflicts at the target
sizes (n = 64, 96, 128), counted from its index formulas by ``bench/block_eigh_banks.py``; and
the counter itself sees the conflicts it is meant to see (the layout before the rows were padded:
32-way in fp32, 16-way in fp64)."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench import block_eigh_banks as banks  # noqa: E402


def _lanes(index):
    index = np.asarray(index).reshape(1, 32)
    return index, np.ones_like(index, dtype=bool)


@pytest.mark.parametrize("elem, stride, ways", [
    (4, 1, 1), (4, 32, 32), (4, 33, 1), (4, 2, 2), (4, 0, 1),  # 0: one word, broadcast
    (8, 1, 1), (8, 16, 16), (8, 17, 1), (8, 2, 2),
])
def test_warp_ways_of_strided_lanes(elem, stride, ways):
    index, active = _lanes(np.arange(32) * stride)
    assert banks.warp_ways(index, active, elem)[0] == ways


def test_padded_kernel_is_conflict_free_and_unpadded_is_not():
    table = banks.bank_table((64, 96, 128))
    for dtype, full in (("float32", 32), ("float64", 16)):
        for n in ("64", "96", "128"):
            after = table["after"][dtype][n]
            assert {name: row["max_ways"] for name, row in after.items()} == {
                name: 1.0 for name in after}, (dtype, n)
            before = table["before"][dtype][n]
            assert before["3 A[p][j], A[q][j]"]["max_ways"] == full
            assert before["4 A[j][i] (transposed)"]["max_ways"] == full
    # every per-round access of the kernel is counted (steps 1-4 and the sweep's norm)
    assert len(table["after"]["float32"]["64"]) == 17
