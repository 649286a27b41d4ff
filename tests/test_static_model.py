"""The static H100 model (``bench/static_model.py``): its occupancy rule on known cases, and the
recorded ``bench/results/static_sm90.json`` carries every prediction with its inputs (the
compiled kernels' resources and instruction mix, bytes, flops, the assumptions)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench import static_model  # noqa: E402

RESULT = ROOT / "bench" / "results" / "static_sm90.json"


@pytest.mark.parametrize("registers, threads, shared, blocks", [
    (32, 256, 0, 8),            # threads: 2048 per SM
    (64, 256, 0, 4),            # registers: 64 K per SM
    (255, 256, 0, 1),
    (80, 256, 16 * 1024, 3),    # 80 registers round to 80 per thread: 3 blocks
    (40, 256, 100 * 1024, 2),   # shared memory: 228 KB per SM, 1 KB reserved per block
    (40, 256, 227 * 1024, 1),
])
def test_occupancy(registers, threads, shared, blocks):
    assert static_model.occupancy(registers, threads, shared) == blocks


def test_block_eigh_shared_bytes_decide_where_the_eigenvectors_live():
    # the sizes of csrc/cuda/block_eigh.cu's comment: fp32 up to 128 on sm_90, 116 on sm_80
    fits = lambda n, elem, limit: static_model._shared_bytes(n, elem, True) <= limit  # noqa: E731
    assert fits(128, 4, 227 * 1024) and fits(116, 4, 163 * 1024)
    assert not fits(118, 4, 163 * 1024)
    assert fits(118, 8, 227 * 1024) and not fits(120, 8, 227 * 1024)
    assert fits(100, 8, 163 * 1024) and not fits(102, 8, 163 * 1024)


def test_recorded_model_has_its_inputs():
    data = json.loads(RESULT.read_text())
    assert data["configs"], "the Triton register table is kept"
    assumptions = data["model"]["assumptions"]
    assert all(set(a) == {"value", "what"} for a in assumptions.values())
    kernels = {r["kernel"]: r for r in data["cuda_kernels"]}
    for name in ("block_eigh_kernel<float, true>", "pc_tile_kernel<__nv_bfloat16, false>"):
        row = kernels[name]
        assert row["registers"] > 0 and row["sass"]["instructions"] > 0
    assert kernels["pc_tile_kernel<__nv_bfloat16, false>"]["sass"].get("HMMA", 0) > 0
    assert kernels["pc_tile_kernel<float, false>"]["sass"].get("HMMA", 0) == 0
    targets = {r["target"].split(",")[0] for r in data["roofline"]}
    assert {"patch_covariance expand bf16", "block_eigh fp32", "singd_diagonal_step fp32",
            "singd_block_step fp32"} <= targets
    for row in data["roofline"]:
        assert row["predicted_s"] > 0 and row["eager_s"] > 0
        assert row["ratio_vs_eager"] == pytest.approx(row["eager_s"] / row["predicted_s"],
                                                      rel=1e-3)
    after = data["block_eigh_bank_conflicts"]["after"]
    assert all(r["max_ways"] == 1 for per_n in after.values() for rows in per_n.values()
               for r in rows.values())
