"""One process of the multi-process parity test (tests/test_distributed.py), also runnable alone.

    python tests/_distributed_worker.py --rank R --world W --init-file F --cases kfac:1,kfac:2 \
        --out P

For every case ``method:accumulate``, trains a small fp64 CNN (or a tied language model) for a
few steps on a fixed batch sequence. With ``--world 1`` it is the single-process reference on
the whole batch; with ``--world 2`` each rank takes its half under DistributedDataParallel
(gloo) and, with accumulation 2, splits it into two micro-batches (the first under
``no_sync``). All cases run in one process group; rank 0 saves ``{case: final parameters}``
(or the error of a case that failed) to ``--out``.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # the optimizer registry

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

BATCH = 16
STEPS = 4


VOCAB, SEQ = 7, 5


class TiedLM(nn.Module):
    """Embedding and output projection sharing one weight (Zhang et al. (2019), App. A.1)."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, 4)
        self.mid = nn.Linear(4, 4)
        self.head = nn.Linear(4, VOCAB)
        self.head.weight = self.emb.weight

    def forward(self, x):
        return self.head(torch.tanh(self.mid(self.emb(x)))).transpose(1, 2)  # (N, V, T)


def model_for_test(method: str = "kfac") -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        if method.endswith("-tied"):
            return TiedLM().double()
        return nn.Sequential(
            nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 6, 3, stride=2), nn.ReLU(),
            nn.Flatten(), nn.Linear(6 * 3 * 3, 7), nn.LayerNorm(7), nn.ReLU(),
            nn.Linear(7, 5)).double()


def batches(method: str = "kfac"):
    gen = torch.Generator().manual_seed(1)
    if method.endswith("-tied"):  # next-token prediction on random token sequences
        out = []
        for _ in range(STEPS):
            x = torch.randint(0, VOCAB, (BATCH, SEQ + 1), generator=gen)
            out.append((x[:, :-1], x[:, 1:]))
        return out
    return [(torch.randn(BATCH, 1, 8, 8, generator=gen, dtype=torch.float64),
             torch.randint(0, 5, (BATCH,), generator=gen)) for _ in range(STEPS)]


def split_case(method: str) -> tuple[str, bool]:
    """``entry`` or ``entry-tied`` (the tied language model) -> (registry entry, tied)."""
    return (method[:-len("-tied")], True) if method.endswith("-tied") else (method, False)


def make_optimizer(method: str, model: nn.Module, accumulate: int):
    from optimizer_registry import BY_NAME

    return BY_NAME[split_case(method)[0]].build(model, accumulate)


def run_case(method: str, accumulate: int, rank: int, world: int) -> list[torch.Tensor]:
    model = model_for_test(method)
    wrapped = nn.parallel.DistributedDataParallel(model) if world > 1 else model
    opt = make_optimizer(method, model, accumulate)
    share = BATCH // world
    for x, y in batches(method):
        x, y = x[rank * share:(rank + 1) * share], y[rank * share:(rank + 1) * share]
        opt.zero_grad()
        micro = share // accumulate
        for i in range(accumulate):
            last = i == accumulate - 1
            sync = contextlib.nullcontext() if (last or world == 1) else wrapped.no_sync()
            with sync:
                xs, ys = x[i * micro:(i + 1) * micro], y[i * micro:(i + 1) * micro]
                (F.cross_entropy(wrapped(xs), ys) / accumulate).backward()
        opt.step()
    if method.endswith("-memopt") and world > 1:
        # MEM-OPT: this rank holds the preconditioners of its own layers only
        precond = opt.preconditioner
        held, everything = set(precond.preconditioners), set(precond.adapters)
        owned = {n for n, r in precond.distribution.owners().items() if r == rank}
        assert held == owned and held != everything, (held, owned)
    return [p.detach().clone() for p in model.parameters()]


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--rank", type=int, default=0)
    p.add_argument("--world", type=int, default=1)
    p.add_argument("--init-file", default=None)
    p.add_argument("--cases", default="kfac:1", help="comma-separated method:accumulate")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    if args.world > 1:
        dist.init_process_group("gloo", init_method=f"file://{args.init_file}", rank=args.rank,
                                world_size=args.world)
    results = {}
    for case in args.cases.split(","):
        method, accumulate = case.split(":")
        try:
            results[case] = run_case(method, int(accumulate), args.rank, args.world)
        except Exception as err:  # recorded: the test of that case reports it
            results[case] = f"{type(err).__name__}: {err}"
        if args.world > 1:
            dist.barrier()
    if args.rank == 0:
        torch.save(results, args.out)
    if args.world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    status = main()
    sys.stdout.flush()
    sys.stderr.flush()
    # Leave without interpreter finalisation: gloo's worker threads can still hold tensors of
    # the finished work then, and releasing them during finalisation occasionally aborts the
    # process ("terminate called without an active exception", SIGABRT) after it has done
    # everything (seen in 2 of 44 two-process runs on a loaded 2-core machine).
    os._exit(status)
