"""Multi-process training on torch.distributed (gloo, CPU): two ranks under
DistributedDataParallel give the parameters of one process on the concatenated batch, also with
gradient accumulation under no_sync; plus the building blocks (bucketed one-triangle all-reduce,
greedy assignment) on their own."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kfac_kernels import distributed as dist_utils

from _distributed_worker import model_for_test  # tests/ is on sys.path under pytest
from optimizer_registry import BY_NAME, OPTIMIZERS

WORKER = Path(__file__).resolve().parent / "_distributed_worker.py"


# Every registry entry marked distributed, and with the tied language model the K-FAC and the
# SINGD entry.
METHODS = ([info.name for info in OPTIMIZERS if info.distributed]
           + [f"{name}-tied" for name in ("kfac", "singd") if BY_NAME[name].tied])
CASES = [(m, a) for m in METHODS for a in (1, 2)]


def _run(tmp_path, world: int, cases: list[str]) -> dict:
    """One job of ``world`` processes running every case in one process group."""
    out = tmp_path / f"results-{world}.pt"
    init = tmp_path / f"init-{world}"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    procs = [subprocess.Popen([sys.executable, str(WORKER), "--rank", str(r), "--world",
                               str(world), "--init-file", str(init), "--cases", ",".join(cases),
                               "--out", str(out)],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True)
             for r in range(world)]
    logs = []
    for p in procs:
        try:
            logs.append(p.communicate(timeout=900)[0])
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
    for p, log in zip(procs, logs):
        assert p.returncode == 0, log
    return torch.load(out)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The one-process references (one per method: the reference does not depend on the
    accumulation) and the two-process runs of every case, each job started once."""
    tmp = tmp_path_factory.mktemp("distributed")
    reference = _run(tmp, 1, [f"{m}:1" for m in METHODS])
    parallel = _run(tmp, 2, [f"{m}:{a}" for m, a in CASES])
    return reference, parallel


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.linalg.norm(a - b) / torch.linalg.norm(b))


@pytest.mark.parametrize("method,accumulate", CASES)
def test_two_processes_match_one_process_on_the_concatenated_batch(runs, method, accumulate):
    reference, parallel = runs
    ref, par = reference[f"{method}:1"], parallel[f"{method}:{accumulate}"]
    assert not isinstance(ref, str), ref
    assert not isinstance(par, str), par
    initial = [p.detach() for p in model_for_test(method).parameters()]
    for p, q, p0 in zip(par, ref, initial):
        assert _rel(p, q) <= 1e-6, (method, accumulate, _rel(p, q))
        assert not torch.allclose(q, p0)  # training moved the parameters


def test_greedy_assignment_balances_cost():
    costs = {"a": 8.0, "b": 5.0, "c": 4.0, "d": 3.0, "e": 1.0}
    owner = dist_utils.assign_greedily(costs, 2)
    # largest first to the least loaded rank: a->0, b->1, c->1, d->0, e->1 (11 vs 10)
    assert owner == {"a": 0, "b": 1, "c": 1, "d": 0, "e": 1}
    assert dist_utils.assign_greedily({"x": 1.0}, 3) == {"x": 0}


def test_allreduce_of_one_triangle_single_process(tmp_path):
    """World of one: the bucketed triangle all-reduce returns symmetric tensors unchanged, also
    across bucket boundaries, and sums 1-d tensors whole."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0,
                            world_size=1)
    try:
        gen = torch.Generator().manual_seed(0)
        mats = []
        for n in (1, 3, 7, 20):
            x = torch.randn(2, n, n, generator=gen, dtype=torch.float64)
            mats.append(x + x.mT)
        counts = torch.tensor([5.0, 1.0], dtype=torch.float64)
        before = [m.clone() for m in mats] + [counts.clone()]
        dist_utils.allreduce_symmetric([*mats, counts], bucket_bytes=64)
        for t, b in zip([*mats, counts], before):
            assert torch.equal(t, b)
    finally:
        dist.destroy_process_group()
