"""SINGD step time and optimizer-state memory against ``torch.optim.AdamW`` on the CPU.

A small residual network at CIFAR shapes (3 x 32 x 32 inputs, 10 classes; a 16-channel stem and
three stages of one basic block with 16, 32 and 64 channels, BatchNorm, global average pooling),
batch size 8, float32. For AdamW and for SINGD with every structure at ``T`` in {1, 10} (plus the
fused diagonal path), the script times whole training steps (forward, backward, optimizer step;
SINGD's curvature capture runs inside forward and backward) and ``optimizer.step()`` alone, and
counts the bytes of the optimizer state (SINGD: ``K, C, m_K, m_C`` and momentum buffers;
AdamW: its two moment buffers).

Run from the repository root::

    python -m bench.bench_singd [--steps 10] [--threads 1] [--out bench/results/singd_cpu.json]

Not collected as a test (no ``test_`` functions). BatchNorm parameters are updated by SINGD's
identity-preconditioned rule (SGD with momentum).
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


def state_bytes(opt) -> int:
    total = 0
    for st in opt.state.values():
        total += sum(t.numel() * t.element_size() for t in st.values()
                     if isinstance(t, torch.Tensor) and t.dim() > 0)
    for layer in getattr(opt, "factors", {}).values():
        for mats in layer.values():
            total += sum(t.numel() * t.element_size() for m in mats for t in m.data)
    return total


def measure(make_opt, steps: int, warmup: int = 3) -> dict:
    model = small_resnet()
    opt = make_opt(model)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(8, 3, 32, 32, generator=gen)
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="bench/results/singd_cpu.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    env = environment_info("cpu")
    env["loadavg_1m_start"] = os.getloadavg()[0]
    results = []
    adamw = measure(lambda m: torch.optim.AdamW(m.parameters(), lr=1e-3), args.steps)
    results.append({"optimizer": "adamw", **adamw})
    print("adamw", adamw, flush=True)
    configs = [(name, T, False) for name in STRUCTURES for T in (1, 10)]
    configs += [("diagonal", T, True) for T in (1, 10)]
    for name, T, fused in configs:
        r = measure(lambda m: SINGD(m, lr=0.05, lr_cov=3e-4, T=T, structures=name,
                                    block_size=16, fused=fused), args.steps)
        row = {"optimizer": f"singd-{name}", "T": T, "fused": fused, **r,
               "step_time_vs_adamw": r["step_s_mean"] / adamw["step_s_mean"],
               "optimizer_step_vs_adamw": (r["optimizer_step_s_mean"]
                                           / adamw["optimizer_step_s_mean"]),
               "state_memory_vs_adamw": r["state_bytes"] / adamw["state_bytes"]}
        results.append(row)
        print(row, flush=True)
    env["loadavg_1m_end"] = os.getloadavg()[0]
    out = {"benchmark": "singd_step_time_and_memory", "model": "small ResNet (16-32-64), "
           "CIFAR shapes, batch 8, float32", "steps_timed": args.steps, "warmup_steps": 3,
           "environment": env, "results": results}
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump(out, f, indent=1)
        f.write("\n")
    print("wrote", args.out)


if __name__ == "__main__":
    main()
