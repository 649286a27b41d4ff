"""A character-level transformer language model on text shipped with Python: K-FAC vs AdamW.

The text is the docstrings of a few standard-library modules (read with ``ast`` from
``sysconfig.get_paths()["stdlib"]``) and the Zen of Python (``this``), so nothing is downloaded. The
model: token and position embeddings (the token embedding tied to the output projection), pre-norm
blocks of ``nn.MultiheadAttention`` (causal mask) and an MLP. K-FAC covers the embeddings, the tied
weight (Zhang et al. (2019), App. A.1: swapped factors, a diagonal vocabulary factor), the packed
attention projections and ``out_proj``, and the MLP; the loss is per character, so the expand form
is used (Eschenhagen et al., 2023).

Run from the repository root::

    PYTHONPATH=. python python/char_transformer_lm.py
    PYTHONPATH=. python python/char_transformer_lm.py --steps 500 --no-tie
"""
from __future__ import annotations

import argparse
import ast
import codecs
import math
import os
import sysconfig
import time

import torch
import torch.nn.functional as F
from torch import nn

import kfac_kernels

MODULES = ("textwrap.py", "functools.py", "argparse.py", "this.py")


def stdlib_text() -> str:
    root = sysconfig.get_paths()["stdlib"]
    parts = []
    for fname in MODULES:
        with open(os.path.join(root, fname), encoding="utf-8") as f:
            source = f.read()
        if fname == "this.py":  # the Zen of Python is stored rot13-encoded
            encoded = ast.literal_eval(source.split("s = ", 1)[1].split("\n\nd")[0])
            parts.append(codecs.decode(encoded, "rot13"))
            continue
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef)):
                doc = ast.get_docstring(node)
                if doc:
                    parts.append(doc)
    text = "\n\n".join(parts)
    return "".join(c for c in text if c.isprintable() or c == "\n")


class Block(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x, mask):
        h = self.ln1(x)
        x = x + self.attn(h, h, h, attn_mask=mask, need_weights=False)[0]
        return x + self.mlp(self.ln2(x))


class CharTransformer(nn.Module):
    def __init__(self, vocab: int, context: int, d: int = 64, heads: int = 4, layers: int = 2,
                 tie: bool = True):
        super().__init__()
        self.tok = nn.Embedding(vocab, d)
        self.pos = nn.Embedding(context, d)
        self.blocks = nn.ModuleList(Block(d, heads) for _ in range(layers))
        self.ln = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)
        if tie:
            self.head.weight = self.tok.weight
        nn.init.normal_(self.tok.weight, std=0.02)  # small logits through the tied head
        nn.init.normal_(self.pos.weight, std=0.02)
        self.register_buffer("mask", torch.triu(torch.ones(context, context, dtype=torch.bool), 1))

    def forward(self, idx):
        n, t = idx.shape
        x = self.tok(idx) + self.pos(torch.arange(t, device=idx.device))
        for block in self.blocks:
            x = block(x, self.mask[:t, :t])
        return self.head(self.ln(x)).transpose(1, 2)  # (N, V, T) for cross_entropy


def batches(data: torch.Tensor, context: int, batch_size: int, gen: torch.Generator):
    starts = torch.randint(len(data) - context - 1, (batch_size,), generator=gen)
    x = torch.stack([data[s:s + context] for s in starts.tolist()])
    y = torch.stack([data[s + 1:s + context + 1] for s in starts.tolist()])
    return x, y


@torch.no_grad()
def evaluate(model, data, context, gen, batches_=8, batch_size=64) -> float:
    model.eval()
    total = 0.0
    for _ in range(batches_):
        x, y = batches(data, context, batch_size, gen)
        total += F.cross_entropy(model(x), y).item()
    model.train()
    return total / batches_


def train(name, args, data_train, data_val, vocab):
    torch.manual_seed(args.seed)
    model = CharTransformer(vocab, args.context, tie=not args.no_tie)
    if name == "kfac":
        optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
        # LayerNorm affine parameters are left out: plain momentum SGD updates them.
        precond = kfac_kernels.KFAC(model, damping=args.damping, inv_update_steps=10,
                                    kl_clip=args.kl_clip, lr=args.lr,
                                    kfac_approx="expand", loss_average="batch+sequence",
                                    skip_modules=[nn.LayerNorm])
        print("K-FAC covers:", ", ".join(precond.adapters))
    else:
        optimizer = torch.optim.AdamW(model.parameters(), lr=args.adam_lr, weight_decay=0.01)
        precond = None
    gen = torch.Generator().manual_seed(args.seed)
    start, losses = time.perf_counter(), []
    for step in range(1, args.steps + 1):
        x, y = batches(data_train, args.context, args.batch_size, gen)
        optimizer.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        if precond is not None:
            precond.step()
        optimizer.step()
        losses.append(loss.item())
        if step % 50 == 0 or step == args.steps:
            print(f"{name:6s} step {step:4d}  train loss (last 50) "
                  f"{sum(losses[-50:]) / len(losses[-50:]):.4f}")
    wall = time.perf_counter() - start
    val = evaluate(model, data_val, args.context, torch.Generator().manual_seed(123))
    print(f"{name:6s} validation loss {val:.4f} ({val / math.log(2):.3f} bits/char), "
          f"{args.steps} steps in {wall:.1f} s")
    return val


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--context", type=int, default=32)
    parser.add_argument("--lr", type=float, default=0.3)
    parser.add_argument("--damping", type=float, default=0.1)
    parser.add_argument("--kl-clip", type=float, default=1e-3)
    parser.add_argument("--adam-lr", type=float, default=3e-3)
    parser.add_argument("--no-tie", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--optimizers", default="kfac,adamw",
                        help="comma-separated subset of kfac,adamw")
    args = parser.parse_args()
    torch.set_num_threads(1)
    text = stdlib_text()
    chars = sorted(set(text))
    data = torch.tensor([chars.index(c) for c in text])
    split = int(0.9 * len(data))
    print(f"{len(text)} characters, vocabulary {len(chars)}, "
          f"{'tied' if not args.no_tie else 'untied'} embedding/output weights")
    for name in args.optimizers.split(","):
        train(name, args, data[:split], data[split:], len(chars))


if __name__ == "__main__":
    main()
