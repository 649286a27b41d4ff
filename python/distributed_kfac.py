"""Data-parallel K-FAC / BD-KFAC on the digits CNN with DistributedDataParallel.

Run with torchrun (gloo on CPU, NCCL when every rank has a GPU)::

    torchrun --nproc_per_node 2 python/distributed_kfac.py --optimizer kfac --steps 200
    torchrun --nproc_per_node 2 python/distributed_kfac.py --optimizer bdkfac --accumulate 2

Each rank trains on its own shard of every mini-batch; DDP averages the gradients, the
preconditioner all-reduces the Kronecker factors (one triangle, bucketed) and shares the
decompositions out between the ranks (see ``kfac_kernels.distributed``). ``--accumulate k``
splits each rank's shard into ``k`` micro-batches, all but the last under ``no_sync``.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from kfac_kernels import BDKFAC, KFAC, PreconditionedOptimizer
from kfac_kernels.apps.data import load_digits_split
from kfac_kernels.apps.models import build_digits_cnn


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--optimizer", choices=("kfac", "bdkfac"), default="kfac")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=64, help="global batch size")
    parser.add_argument("--accumulate", type=int, default=1)
    args = parser.parse_args(argv)
    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    cuda = torch.cuda.is_available() and "LOCAL_RANK" in os.environ
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ["LOCAL_RANK"])) if cuda else torch.device("cpu")
    data = load_digits_split(seed=0)
    x_train, y_train = data.x_train.to(device), data.y_train.to(device)
    model = build_digits_cnn(seed=0).to(device)
    ddp = nn.parallel.DistributedDataParallel(model)
    if args.optimizer == "kfac":
        opt = PreconditionedOptimizer(
            torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9),
            KFAC(model, damping=0.3, grad_accumulation_steps=args.accumulate))
    else:
        opt = PreconditionedOptimizer(
            torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=1e-2),
            BDKFAC(model, damping=0.3, factor_update_steps=1, inv_update_steps=10,
                   kfac_approx="expand", damping_form="factored", compute_method="inverse",
                   damping_split="equal", kl_clip=None,
                   grad_accumulation_steps=args.accumulate))
    gen = torch.Generator().manual_seed(0)  # the same global batches on every rank
    share = args.batch_size // world
    micro = share // args.accumulate
    for step in range(1, args.steps + 1):
        idx = torch.randint(0, x_train.shape[0], (args.batch_size,), generator=gen)
        idx = idx[rank * share:(rank + 1) * share].to(device)
        opt.zero_grad()
        for i in range(args.accumulate):
            last = i == args.accumulate - 1
            with contextlib.nullcontext() if last else ddp.no_sync():
                part = idx[i * micro:(i + 1) * micro]
                loss = F.cross_entropy(ddp(x_train[part]), y_train[part]) / args.accumulate
                loss.backward()
        opt.step()
        if rank == 0 and (step % 50 == 0 or step == args.steps):
            print(f"step {step}: loss of rank 0's shard {float(loss) * args.accumulate:.4f}",
                  flush=True)
    if rank == 0:
        model.eval()
        with torch.no_grad():
            acc = (model(data.x_test.to(device)).argmax(1) == data.y_test.to(device)).float().mean()
        print(f"{world} ranks, {args.optimizer}: test accuracy {float(acc):.4f}", flush=True)
    # An orderly shutdown: every rank done (rank 0 evaluated alone), the optimizer's hooks and
    # DDP's reducer released, then the process group, so no gloo thread outlives its group.
    opt.remove_hooks()
    del ddp, opt
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
