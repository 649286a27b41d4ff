"""Train a small CNN on scikit-learn's digits with K-FAC-preconditioned SGD, written out by hand.

The explicit three-call loop::

    loss.backward()        # the hooks capture layer inputs and output gradients
    precond.step()         # updates the Kronecker factors, rewrites the gradients in place
    optimizer.step()       # any torch.optim optimizer applies them

Run from the repository root (after `pip install --no-build-isolation -e .`)::

    python python/train_digits_cnn.py
    python python/train_digits_cnn.py --steps 500 --seed 1 --fisher-type mc

``kfac-train`` does the same through ``kfac_kernels.PreconditionedOptimizer``, with more options.
"""
from __future__ import annotations

import argparse
import time

import torch
from torch import nn

import kfac_kernels
from kfac_kernels.apps.data import load_digits_split
from kfac_kernels.apps.models import build_digits_cnn


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    acc = (model(x).argmax(1) == y).float().mean().item()
    model.train()
    return acc


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=0.02)
    parser.add_argument("--damping", type=float, default=0.3)
    parser.add_argument("--fisher-type", choices=("empirical", "mc", "type-2"),
                        default="empirical")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    torch.set_num_threads(1)  # a tiny model: extra threads only add synchronisation
    data = load_digits_split(0)
    model = build_digits_cnn(args.seed)
    loss_fn = nn.CrossEntropyLoss()

    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
    precond = kfac_kernels.KFAC(
        model,
        damping=args.damping,
        factor_decay=0.95,
        inv_update_steps=10,
        kfac_approx="expand",
        fisher_type=args.fisher_type,
        loss_fn=loss_fn,                 # used by precond.backward for "mc" / "type-2"
        loss_average="batch",            # CrossEntropyLoss averages over the batch
        generator=torch.Generator().manual_seed(args.seed),
    )
    print(f"K-FAC preconditions {len(precond.adapters)} layers: {', '.join(precond.adapters)}")

    batches = torch.Generator().manual_seed(args.seed)
    n = data.x_train.shape[0]
    start = time.perf_counter()
    for step in range(1, args.steps + 1):
        idx = torch.randint(n, (args.batch_size,), generator=batches)
        x, y = data.x_train[idx], data.y_train[idx]

        optimizer.zero_grad()
        outputs = model(x)
        if args.fisher_type == "empirical":
            loss = loss_fn(outputs, y)
            loss.backward()
        else:  # sampled or exact Fisher: extra backward passes through the model's outputs
            loss = precond.backward(outputs, y)
        precond.step()
        optimizer.step()

        if step % 50 == 0 or step == args.steps:
            print(f"step {step:4d}  batch loss {loss.item():.4f}  "
                  f"test accuracy {accuracy(model, data.x_test, data.y_test):.4f}")
    wall = time.perf_counter() - start
    print(f"test accuracy {accuracy(model, data.x_test, data.y_test):.4f}  "
          f"({args.steps} steps in {wall:.1f} s)")


if __name__ == "__main__":
    main()
