"""Benchmark: a whole BD-KFAC inverse update against K-FAC's, and both optimizers' state memory.

The models are ResNet-18 and ResNet-50 at ImageNet shapes (torchvision's layer shapes, built
here so that torchvision is not needed). Every covered layer gets the same random SPD factors in
both optimizers (Wishart matrices ``X X^T / m`` with ``m = d / 2 + 8`` samples: rank-deficient
plus damping, as real factors are); BD-KFAC gets their diagonal blocks. Timed:

* K-FAC: ``KFAC.decompose`` over all layers (exact eigen damping: the eigendecompositions of
  every factor, batched where sizes repeat);
* BD-KFAC: ``BDKFAC.decompose`` over all layers (``num_blocks`` blocks per factor, the paper's
  precomputed damped block inverses: all blocks of all layers through
  :func:`kfac_kernels.ops.block_damped_inverse`, one batched call per block size).

Both cover the same layers (convolutions and the classifier; BD-KFAC's normalisation layers are
skipped for a like-for-like comparison). ``state_bytes`` sums the factors and preconditioners
each optimizer keeps.

Script mode (writes one JSON record per model)::

    python bench/bench_bdkfac.py --threads 2 --json bench/results/bdkfac_cpu.json
    python bench/bench_bdkfac.py --quick            # ResNet-18 only

As a pytest-benchmark file (ResNet-18 only; the ResNet-50 K-FAC update takes minutes on a CPU)::

    python -m pytest bench/bench_bdkfac.py --benchmark-only
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

if __name__ == "__main__":  # script mode: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from torch import nn

from kfac_kernels import BDKFAC, KFAC


# ---------------------------------------------------------------------------------------------
# ResNets with torchvision's layer shapes


class _Block(nn.Module):
    def __init__(self, c_in: int, width: int, stride: int, bottleneck: bool):
        super().__init__()
        expansion = 4 if bottleneck else 1
        c_out = width * expansion
        if bottleneck:
            self.convs = nn.Sequential(
                nn.Conv2d(c_in, width, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
                nn.Conv2d(width, width, 3, stride, 1, bias=False), nn.BatchNorm2d(width),
                nn.ReLU(), nn.Conv2d(width, c_out, 1, bias=False), nn.BatchNorm2d(c_out))
        else:
            self.convs = nn.Sequential(
                nn.Conv2d(c_in, width, 3, stride, 1, bias=False), nn.BatchNorm2d(width),
                nn.ReLU(), nn.Conv2d(width, c_out, 3, 1, 1, bias=False), nn.BatchNorm2d(c_out))
        self.down = None
        if stride != 1 or c_in != c_out:
            self.down = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False),
                                      nn.BatchNorm2d(c_out))

    def forward(self, x):
        skip = x if self.down is None else self.down(x)
        return torch.relu(self.convs(x) + skip)


def resnet(depth: int, classes: int = 1000) -> nn.Module:
    blocks, bottleneck = {18: ([2, 2, 2, 2], False), 50: ([3, 4, 6, 3], True)}[depth]
    expansion = 4 if bottleneck else 1
    layers: list[nn.Module] = [nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64),
                               nn.ReLU(), nn.MaxPool2d(3, 2, 1)]
    c_in = 64
    for stage, count in enumerate(blocks):
        width = 64 * 2 ** stage
        for i in range(count):
            layers.append(_Block(c_in, width, 2 if (i == 0 and stage > 0) else 1, bottleneck))
            c_in = width * expansion
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c_in, classes)]
    return nn.Sequential(*layers)


# ---------------------------------------------------------------------------------------------


def _wishart(d: int, gen: torch.Generator) -> torch.Tensor:
    m = d // 2 + 8
    x = torch.randn(d, m, generator=gen)
    return x @ x.T / m


def _state_bytes(tensors) -> int:
    total = 0
    for t in tensors:
        if isinstance(t, torch.Tensor):
            total += t.numel() * t.element_size()
        elif isinstance(t, dict):
            total += _state_bytes(t.values())
        elif isinstance(t, (list, tuple)):
            total += _state_bytes(t)
    return total


def setup(depth: int, num_blocks: int, seed: int = 0):
    """(kfac, bdkfac) on two copies of a ResNet, with the same random factors (BD-KFAC: their
    diagonal blocks). BD-KFAC in the paper's form: precomputed damped block inverses."""
    kfac = KFAC(resnet(depth), damping=1e-3, skip_modules=[nn.BatchNorm2d])
    bd = BDKFAC(resnet(depth), num_blocks=num_blocks, damping=1e-3, kl_clip=None,
                damping_form="factored", compute_method="inverse", damping_split="equal",
                skip_modules=[nn.BatchNorm2d])
    gen = torch.Generator().manual_seed(seed)
    for name, ad in kfac.adapters.items():
        a = _wishart(ad.in_features_per_group, gen)[None]
        g = _wishart(ad.out_features_per_group, gen)[None]
        kfac.blocks[name].set_factors({"A": [a], "A_count": 1.0, "G": [g]})
        block = bd.blocks[name]
        parts = {}
        for side, full, widths in (("A", a, block.a_layout.widths),
                                   ("G", g, block.g_layout.widths)):
            parts[side], start = [], 0
            for w in widths:
                parts[side].append(full[:, start:start + w, start:start + w].clone())
                start += w
        block.set_factors({"A": parts["A"], "A_count": 1.0, "G": parts["G"]})
    return kfac, bd


def time_refresh(precond, repeats: int = 1) -> float:
    names = list(precond.factors)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        precond.decompose(names)
        best = min(best, time.perf_counter() - t0)
    return best


def check(kfac: KFAC, bd: BDKFAC) -> float:
    """Largest relative residual ``||(B + gamma I) B^-1(gamma) - I||`` over BD-KFAC's blocks."""
    worst = 0.0
    for name, (a_blocks, g_blocks) in bd.factors.items():
        dec = bd.preconditioners[name]
        for blocks, invs in ((a_blocks, dec["inv_A"]), (g_blocks, dec["inv_G"])):
            for blk, inv in zip(blocks, invs):
                eye = torch.eye(blk.shape[-1], dtype=torch.float64)
                r = (blk.double() + bd.damping * eye) @ inv.double() - eye
                worst = max(worst, float(torch.linalg.norm(r) / torch.linalg.norm(eye)))
    return worst


def measure(depth: int, num_blocks: int, threads: int, kfac_repeats: int = 1,
            bd_repeats: int = 3) -> dict:
    torch.set_num_threads(threads)
    kfac, bd = setup(depth, num_blocks)
    bd_s = time_refresh(bd, bd_repeats)
    residual = check(kfac, bd)
    if residual > 1e-3:
        raise AssertionError(f"BD-KFAC block inverses are wrong: residual {residual:.2e}")
    kfac_s = time_refresh(kfac, kfac_repeats)
    dims = [(ad.in_features_per_group, ad.out_features_per_group)
            for ad in kfac.adapters.values()]
    return {
        "model": f"resnet{depth}", "num_blocks": num_blocks, "threads": threads,
        "layers": len(dims), "largest_factor": max(max(d) for d in dims),
        "blocks": sum(len(a) + len(g) for a, g in bd.factors.values()),
        "kfac_inverse_update_s": kfac_s, "bdkfac_inverse_update_s": bd_s,
        "speedup": kfac_s / bd_s, "bdkfac_max_inverse_residual": residual,
        "kfac_state_bytes": _state_bytes([kfac.factors, kfac.preconditioners]),
        "bdkfac_state_bytes": _state_bytes([bd.factors, bd.preconditioners]),
    }


def test_resnet18_bdkfac_inverse_update(benchmark):
    kfac, bd = setup(18, 4)
    benchmark.pedantic(bd.decompose, args=(list(bd.factors),), rounds=3,
                       iterations=1)
    assert check(kfac, bd) < 1e-3
    benchmark.extra_info["bdkfac_state_bytes"] = _state_bytes([bd.factors, bd.preconditioners])


def main(argv=None) -> int:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from conftest import environment_info

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, nargs="+", default=[1])
    parser.add_argument("--num-blocks", type=int, default=4)
    parser.add_argument("--quick", action="store_true", help="ResNet-18 only")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    records = []
    for threads in args.threads:
        for depth in ((18,) if args.quick else (18, 50)):
            rec = measure(depth, args.num_blocks, threads)
            records.append(rec)
            print(json.dumps(rec), flush=True)
    out = {"benchmark": "bdkfac_inverse_update", "environment": environment_info("cpu"),
           "results": records}
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
