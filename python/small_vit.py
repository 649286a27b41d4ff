"""A small vision transformer on scikit-learn's 8x8 digits: K-FAC (reduce or expand) vs AdamW.

Patches of 2x2 (or 4x4) pixels are embedded by an ``nn.Conv2d`` with ``stride = kernel_size``
(covered by K-FAC's convolution factors), followed by ``nn.TransformerEncoderLayer`` blocks (their
``nn.MultiheadAttention`` packed projections and ``out_proj``, and the MLP, are covered) and a mean
over the patch tokens before the classifier: a pooled classification, the reduce setting of
Eschenhagen et al. (2023), so ``kfac_approx="reduce"`` is the default (``--kfac-approx expand``
treats every token as an example).

Run from the repository root::

    PYTHONPATH=. python python/small_vit.py
    PYTHONPATH=. python python/small_vit.py --patch 4 --kfac-approx expand
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from torch import nn

import kfac_kernels
from kfac_kernels.apps.data import load_digits_split


class SmallViT(nn.Module):
    def __init__(self, patch: int = 2, d: int = 32, heads: int = 4, layers: int = 2,
                 classes: int = 10):
        super().__init__()
        self.embed = nn.Conv2d(1, d, kernel_size=patch, stride=patch)
        tokens = (8 // patch) ** 2
        self.pos = nn.Parameter(torch.randn(1, tokens, d) * 0.02)
        self.encoder = nn.ModuleList(
            nn.TransformerEncoderLayer(d, heads, dim_feedforward=2 * d, dropout=0.0,
                                       batch_first=True, norm_first=True)
            for _ in range(layers))
        self.norm = nn.LayerNorm(d)
        self.classifier = nn.Linear(d, classes)

    def forward(self, x):
        t = self.embed(x).flatten(2).transpose(1, 2) + self.pos   # (N, tokens, d)
        for layer in self.encoder:
            t = layer(t)
        return self.classifier(self.norm(t).mean(dim=1))


@torch.no_grad()
def accuracy(model, x, y) -> float:
    model.eval()
    acc = (model(x).argmax(1) == y).float().mean().item()
    model.train()
    return acc


def train(name, args, data):
    torch.manual_seed(args.seed)
    model = SmallViT(patch=args.patch)
    if name == "kfac":
        optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
        precond = kfac_kernels.KFAC(model, damping=args.damping, inv_update_steps=10,
                                    kl_clip=args.kl_clip, lr=args.lr,
                                    kfac_approx=args.kfac_approx, loss_average="batch",
                                    skip_modules=[nn.LayerNorm, ""])  # "" = the root's pos
        print("K-FAC covers:", ", ".join(precond.adapters))
    else:
        optimizer = torch.optim.AdamW(model.parameters(), lr=args.adam_lr, weight_decay=0.01)
        precond = None
    gen = torch.Generator().manual_seed(args.seed)
    n = data.x_train.shape[0]
    losses, start = [], time.perf_counter()
    for step in range(1, args.steps + 1):
        idx = torch.randint(n, (args.batch_size,), generator=gen)
        optimizer.zero_grad()
        loss = F.cross_entropy(model(data.x_train[idx]), data.y_train[idx])
        loss.backward()
        if precond is not None:
            precond.step()
        optimizer.step()
        losses.append(loss.item())
        if step % 50 == 0 or step == args.steps:
            print(f"{name:6s} step {step:4d}  train loss (last 50) "
                  f"{sum(losses[-50:]) / len(losses[-50:]):.4f}  "
                  f"test accuracy {accuracy(model, data.x_test, data.y_test):.4f}")
    print(f"{name:6s} {args.steps} steps in {time.perf_counter() - start:.1f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--patch", type=int, choices=(2, 4), default=2)
    parser.add_argument("--kfac-approx", choices=("reduce", "expand"), default="reduce")
    parser.add_argument("--lr", type=float, default=0.2)
    parser.add_argument("--damping", type=float, default=0.1)
    parser.add_argument("--kl-clip", type=float, default=1e-3)
    parser.add_argument("--adam-lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--optimizers", default="kfac,adamw",
                        help="comma-separated subset of kfac,adamw")
    args = parser.parse_args()
    torch.set_num_threads(1)
    data = load_digits_split(0)
    for name in args.optimizers.split(","):
        train(name, args, data)


if __name__ == "__main__":
    main()
