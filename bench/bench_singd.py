"""SINGD step time and optimizer-state memory against ``torch.optim.AdamW`` on the CPU.

Models (float32, CIFAR shapes: 3 x 32 x 32 inputs, 10 classes):

* ``small-resnet``: a 16-channel stem and three stages of one basic block with 16, 32 and 64
  channels, BatchNorm, global average pooling; batch 8;
* ``resnet18``: ResNet-18 in its CIFAR form (3x3 stem, no max-pool, stages of two basic blocks
  with 64, 128, 256, 512 channels); batch 8 (small batch);
* ``vit-tiny``: ViT-tiny on patches of 4 (64 tokens + a class token), width 192, depth 12,
  3 heads, MLP 768, pre-norm, attention written with ``nn.Linear`` layers; batch 8.

For AdamW and for SINGD with each structure at ``T`` in {1, 10}, eager path and (diagonal and
block-diagonal) fused path, the script times whole training steps (forward, backward, optimizer
step; SINGD's curvature capture runs inside forward and backward) and ``optimizer.step()``
alone, and counts the bytes of the optimizer state (SINGD: ``K, C, m_K, m_C`` and momentum
buffers; AdamW: its two moment buffers). On ``resnet18`` the structures whose factors are
formed densely (dense, and the triangular family, which forms the dense factor inside its
products) are left out: its 4608-wide convolution factors make one dense factor update take
several seconds on one CPU thread.

Run from the repository root::

    python -m bench.bench_singd [--models small-resnet resnet18 vit-tiny] [--steps 10]
        [--warmup 3] [--threads 1] [--out bench/results/singd_cpu.json]

Not collected as a test (no ``test_`` functions). BatchNorm and LayerNorm parameters are updated
by SINGD's identity-preconditioned rule (SGD with momentum).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch
from torch import nn

from bench.conftest import environment_info
from kfac_kernels import SINGD
from kfac_kernels.singd import STRUCTURES


class Block(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.short = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                    nn.BatchNorm2d(cout)) if stride != 1 or cin != cout
                      else nn.Identity())

    def forward(self, x):
        y = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(y)) + self.short(x))


def small_resnet() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
                         Block(16, 16, 1), Block(16, 32, 2), Block(32, 64, 2),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10))


def resnet18() -> nn.Module:
    torch.manual_seed(0)
    layers = [nn.Conv2d(3, 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64), nn.ReLU()]
    cin = 64
    for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
        layers += [Block(cin, cout, stride), Block(cout, cout, 1)]
        cin = cout
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(512, 10)]
    return nn.Sequential(*layers)


class Attention(nn.Module):
    def __init__(self, width, heads):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x):
        n, t, w = x.shape
        q, k, v = self.qkv(x).reshape(n, t, 3, self.heads, w // self.heads).permute(2, 0, 3, 1, 4)
        y = nn.functional.scaled_dot_product_attention(q, k, v)
        return self.proj(y.transpose(1, 2).reshape(n, t, w))


class EncoderBlock(nn.Module):
    def __init__(self, width, heads, mlp):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.attn = Attention(width, heads)
        self.fc1, self.fc2 = nn.Linear(width, mlp), nn.Linear(mlp, width)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.fc2(nn.functional.gelu(self.fc1(self.norm2(x))))


class ViT(nn.Module):
    def __init__(self, patch=4, width=192, depth=12, heads=3, mlp=768, classes=10, size=32):
        super().__init__()
        self.patch = nn.Conv2d(3, width, patch, patch)
        self.cls = nn.Parameter(torch.zeros(1, 1, width))
        self.pos = nn.Parameter(0.02 * torch.randn(1, (size // patch) ** 2 + 1, width))
        self.blocks = nn.Sequential(*[EncoderBlock(width, heads, mlp) for _ in range(depth)])
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, classes)

    def forward(self, x):
        x = self.patch(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1) + self.pos
        return self.head(self.norm(self.blocks(x))[:, 0])


def vit_tiny() -> nn.Module:
    torch.manual_seed(0)
    return ViT()


MODELS = {
    "small-resnet": (small_resnet, "small ResNet (16-32-64), CIFAR shapes, batch 8, float32"),
    "resnet18": (resnet18, "ResNet-18 (CIFAR stem), CIFAR shapes, batch 8, float32"),
    "vit-tiny": (vit_tiny, "ViT-tiny (patch 4 on 32x32, width 192, depth 12, heads 3, MLP 768), "
                           "batch 8, float32"),
}
# structures whose products form the dense factor (left out on resnet18, see the docstring)
DENSE_FORMED = tuple(name for name in STRUCTURES if name not in ("diagonal", "block-diagonal"))


def state_bytes(opt) -> int:
    total = 0
    for st in opt.state.values():
        total += sum(t.numel() * t.element_size() for t in st.values()
                     if isinstance(t, torch.Tensor) and t.dim() > 0)
    for layer in getattr(opt, "factors", {}).values():
        for mats in layer.values():
            total += sum(t.numel() * t.element_size() for m in mats for t in m.data)
    return total


def measure(build, make_opt, steps: int, warmup: int = 3, dtype=torch.float32) -> dict:
    model = build().to(dtype)
    opt = make_opt(model)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(8, 3, 32, 32, generator=gen).to(dtype)
    y = torch.randint(0, 10, (8,), generator=gen)
    full, step_only = [], []
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        t1 = time.perf_counter()
        opt.step()
        t2 = time.perf_counter()
        if i >= warmup:
            full.append(t2 - t0)
            step_only.append(t2 - t1)
    return {"step_s_mean": statistics.fmean(full), "step_s_median": statistics.median(full),
            "optimizer_step_s_mean": statistics.fmean(step_only),
            "state_bytes": state_bytes(opt)}


def bench_model(name: str, steps: int, warmup: int, dtype=torch.float32,
                structures=None) -> dict:
    build, description = MODELS[name]
    if dtype != torch.float32:
        description = description.replace("float32", str(dtype).replace("torch.", ""))
    results = []
    adamw = measure(build, lambda m: torch.optim.AdamW(m.parameters(), lr=1e-3), steps, warmup,
                    dtype)
    results.append({"optimizer": "adamw", **adamw})
    print(name, "adamw", adamw, flush=True)
    chosen = [s for s in STRUCTURES if name != "resnet18" or s not in DENSE_FORMED]
    chosen = [s for s in chosen if structures is None or s in structures]
    configs = [(s, T, False) for s in chosen for T in (1, 10)]
    configs += [(s, T, True) for s in ("diagonal", "block-diagonal") if s in chosen
                for T in (1, 10)]
    for structure, T, fused in configs:
        r = measure(build, lambda m: SINGD(m, lr=0.05, lr_cov=3e-4, T=T, structures=structure,
                                           block_size=16, fused=fused), steps, warmup, dtype)
        row = {"optimizer": f"singd-{structure}", "T": T, "fused": fused, **r,
               "step_time_vs_adamw": r["step_s_mean"] / adamw["step_s_mean"],
               "optimizer_step_vs_adamw": (r["optimizer_step_s_mean"]
                                           / adamw["optimizer_step_s_mean"]),
               "state_memory_vs_adamw": r["state_bytes"] / adamw["state_bytes"]}
        results.append(row)
        print(name, row, flush=True)
    return {"description": description, "results": results}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                        help="model, inputs and (SINGD's default) factor storage dtype")
    parser.add_argument("--structures", nargs="+", choices=STRUCTURES, default=None)
    parser.add_argument("--out", default="bench/results/singd_cpu.json")
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    torch.set_num_threads(args.threads)
    env = environment_info("cpu")
    env["loadavg_1m_start"] = os.getloadavg()[0]
    models = {}
    for name in args.models:
        models[name] = bench_model(name, args.steps, args.warmup, dtype, args.structures)
        models[name]["steps_timed"] = args.steps
        models[name]["warmup_steps"] = args.warmup
    env["loadavg_1m_end"] = os.getloadavg()[0]
    out = {"benchmark": "singd_step_time_and_memory", "environment": env, "models": models}
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump(out, f, indent=1)
        f.write("\n")
    print("wrote", args.out)


if __name__ == "__main__":
    main()
