"""kfac-kernels against its peers on the CPU: the convolution factor, the K-FAC step, SINGD.

Peers (none is a dependency of kfac-kernels; a missing one is skipped with a message):
curvlinops (``curvlinops-for-pytorch``), einconv, kfac-pytorch (gpauloski, import ``kfac``),
ASDL (``asdfghjkl``, import ``asdl``) and singd (f-dangel). Install them into a scratch
environment that also sees kfac-kernels, e.g.::

    python -m venv --system-site-packages /tmp/peers && . /tmp/peers/bin/activate
    pip install --no-deps curvlinops-for-pytorch einconv asdfghjkl singd einops opt-einsum \\
        backpack-for-pytorch unfoldNd linear_operator jaxtyping
    pip install --no-deps <a checkout of github.com/gpauloski/kfac-pytorch>
    pip install --no-build-isolation --no-deps -e <kfac-kernels>

Run from the repository root (one command, end to end; ``--quick`` for a short smoke run)::

    python -m bench.bench_peers [--rounds 5] [--sections factors steps singd]
        [--models resnet18 vit] [--no-memory] [--out bench/results/peers_cpu.json]

Everything runs in one process on one intra-op thread and is timed in CPU time
(``time.process_time``); contenders are interleaved (each round runs every contender once, in a
rotated order) and the records keep the median, the minimum and the maximum over the rounds.

* **factors**: the input factor ``A`` of a 3x3 stride-1 convolution (``C`` in and out channels,
  padding 1, no bias) at every ResNet-18 stage, ``C`` = 64, 128, 256, 512 at the CIFAR (32, 16,
  8, 4) and ImageNet (56, 28, 14, 7) spatial sizes, batch 32, expand and reduce forms, as each
  library computes it (:mod:`bench.peer_factors`). Before timing, each result times the scaling
  of :data:`bench.peer_factors.SCALE_TO_OURS` must equal ours (relative max error below 1e-4,
  fp32). Peak extra memory (the output plus every temporary) of one call, in a fresh process
  (:mod:`bench.memory`).
* **steps**: one whole training step (forward, backward, preconditioner, ``SGD(momentum=0.9)``)
  of ResNet-18 (CIFAR stem, 32x32 inputs, batch 32) and a 4-layer ViT (width 128, 4 heads,
  MLP 512, patch 4, batch 32) with the factors updated every step and the inverses
  (decompositions) every step (``T=1``) or every 10 steps (``T=10``: ten steps timed together,
  one inverse update amortised over them), as a ratio to
  one ``torch.optim.AdamW`` step of the same model. K-FAC contenders share damping ``1e-3``,
  factor decay 0.95 (ASDL: ``ema_decay=0.05``, its convention), the empirical Fisher, the
  expand form, and precondition the same layers (``nn.Linear``, ``nn.Conv2d``; the norm layers
  are left to SGD: :data:`PEER_SKIPPED`, ASDL's ``ignore_modules``) with KL-clipping
  ``kl_clip=0.001`` where the library has it (kfac-pytorch's default; ASDL has none): ours
  ``KFAC`` eigen (exact damping), inverse and cholesky (factored damping); kfac-pytorch eigen
  and inverse (its defaults otherwise); ASDL's ``KfacGradientMaker`` (Cholesky inverses).
  Without the clipping, inverses 10 steps old at damping ``1e-3`` make the ViT diverge (our
  loss 2.5 -> 184 in 5 steps; ASDL's factors stop being positive definite), and a diverged
  run's steps slow down (1.5-1.8 s instead of 0.22 s for ours): what would be timed is the
  divergence.
* **singd**: ours ``SINGD`` (dense; diagonal ``fused=True``; norm layers left to the plain
  update, as singd does) against singd's ``SINGD`` with the same hyperparameters (``lr=0.01,
  momentum=0.9, damping=1e-3, alpha1=0.5, lr_cov=1e-2``, expand), ``T`` in 1 and 10, as
  ratios to AdamW's step.

The JSON records the CPU model, torch and peer versions, the thread count, the load average at
the start and end and ``"shared_machine"`` (``--shared-machine``, default on: say ``--quiet-machine``
when nothing else ran).
"""
from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import json
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

if __name__ == "__main__":  # script mode: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from torch import nn

from bench import peer_factors
from bench.bench_singd import ViT, resnet18
from bench.conftest import environment_info

BATCH = 32
STAGES = {"cifar": ((64, 32), (128, 16), (256, 8), (512, 4)),
          "imagenet": ((64, 56), (128, 28), (256, 14), (512, 7))}
FACTOR_RTOL = 1e-4
DAMPING, DECAY, LR = 1e-3, 0.95, 0.01
KL_CLIP = 1e-3  # kfac-pytorch's default, given to every K-FAC contender that has it
# The layers no peer preconditions (kfac-pytorch and singd: linear and conv layers only; ASDL is
# told to ignore them): ours leave them to the base optimizer too, so that every contender does
# the same work.
PEER_SKIPPED = (nn.LayerNorm, nn.BatchNorm1d, nn.BatchNorm2d)


# ---------------------------------------------------------------------------------------------
# peers


def peer_versions() -> dict[str, str | None]:
    """Installed version of each peer (``None`` when it cannot be imported)."""
    out = {}
    for name, (module, dist) in peer_factors.PACKAGES.items():
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                importlib.import_module(module)
            out[name] = importlib.metadata.version(dist)
        except Exception:  # noqa: BLE001 - any failure to import means "not available"
            out[name] = None
    return out


def _say_missing(versions: dict) -> list[str]:
    missing = [name for name, v in versions.items() if v is None]
    for name in missing:
        print(f"skipping {name}: not installed (pip install --no-deps "
              f"{peer_factors.PACKAGES[name][1]} into a scratch environment; see "
              "bench/bench_peers.py)", flush=True)
    return missing


def _stats(times: list[float]) -> dict:
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times),
            "rounds": len(times)}


def _interleaved(contenders: dict, rounds: int,
                 failures: dict[str, str] | None = None) -> dict[str, list[float]]:
    """``contenders``: name -> zero-argument callable returning the CPU seconds of one sample.
    Each round runs every contender once, the order rotated by one each round. With
    ``failures`` (name -> error), a contender that raises is recorded there and dropped from
    the later rounds (a peer whose factorisation fails must not cost the others' results)."""
    names = list(contenders)
    times = {name: [] for name in names}
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            if failures is not None and name in failures:
                continue
            try:
                times[name].append(contenders[name]())
            except Exception as err:  # noqa: BLE001 -- recorded, reported, never hidden
                if failures is None:
                    raise
                failures[name] = _error_line(err)
                print(f"  {name} failed: {failures[name]}", flush=True)
    return {name: ts for name, ts in times.items() if name not in (failures or {})}


def _error_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"[:300]


# ---------------------------------------------------------------------------------------------
# factors


def _timed_factor(fn, x, mode):
    def run():
        t0 = time.process_time()
        fn(x, 3, 1, 1, mode)
        return time.process_time() - t0
    return run


def bench_factors(libs: list[str], rounds: int, memory: bool, quick: bool) -> list[dict]:
    gen = torch.Generator().manual_seed(0)
    records = []
    for resolution, stages in STAGES.items():
        for c, hw in stages[:2] if quick else stages:
            x = torch.randn(BATCH, c, hw, hw, generator=gen)
            r = hw * hw
            for mode in ("expand", "reduce"):
                present = [lib for lib in ["ours", *libs] if mode in peer_factors.FORMS[lib]]
                ref = peer_factors.ours(x, 3, 1, 1, mode)
                checks = {}
                for lib in present:
                    got = peer_factors.FUNCTIONS[lib](x, 3, 1, 1, mode)
                    got = got * peer_factors.SCALE_TO_OURS[lib](mode, BATCH, r)
                    err = float((got - ref).abs().max() / ref.abs().max())
                    if not err < FACTOR_RTOL:
                        raise AssertionError(f"{lib} {mode} factor at C={c}, {hw}x{hw} differs "
                                             f"from ours after scaling: rel. error {err:.2e}")
                    checks[lib] = err
                times = _interleaved({lib: _timed_factor(peer_factors.FUNCTIONS[lib], x, mode)
                                      for lib in present}, rounds)
                ours_med = statistics.median(times["ours"])
                for lib in present:
                    rec = {"resolution": resolution, "c": c, "hw": hw, "n": BATCH, "mode": mode,
                           "library": lib, "rel_error_vs_ours_scaled": checks[lib],
                           **_stats(times[lib]),
                           "time_vs_ours": statistics.median(times[lib]) / ours_med}
                    if memory:
                        rec.update(_factor_memory(lib, x.shape, mode))
                    records.append(rec)
                    print(f"factor {resolution} C={c} {hw}x{hw} {mode:6} {lib:12} "
                          f"{rec['median_s']:.4f}s x{rec['time_vs_ours']:.2f}"
                          + (f" peak {rec.get('peak_extra_bytes', 0) / 2**20:.1f} MiB"
                             if memory else ""), flush=True)
    return records


def _factor_memory(lib: str, shape, mode: str) -> dict:
    from bench.memory import peak_extra_memory

    fn = peer_factors.FUNCTIONS[lib].__name__
    mem = peak_extra_memory({"shape": list(shape), "dtype": "float32", "threads": 1,
                             "call": f"bench.peer_factors:{fn}", "args": [3, 1, 1],
                             "kwargs": {"mode": mode}})
    if "oom" in mem:
        return {"memory_oom": mem["oom"]}
    return {"peak_extra_bytes": mem["peak_extra_bytes"], "output_bytes": mem["output_bytes"],
            "memory_method": mem["method"]}


# ---------------------------------------------------------------------------------------------
# whole steps


def vit4() -> nn.Module:
    torch.manual_seed(0)
    return ViT(patch=4, width=128, depth=4, heads=4, mlp=512)


MODELS = {"resnet18": (resnet18, "ResNet-18 (CIFAR stem), 3x32x32 inputs, batch 32, float32"),
          "vit": (vit4, "ViT (patch 4 on 32x32, width 128, depth 4, heads 4, MLP 512), batch 32, "
                        "float32")}


class Contender:
    """A model, its optimizer and a ``step(x, y)``; ``window(steps)`` times that many steps."""

    def __init__(self, build, make):
        self.model = build()
        self.step = make(self.model)

    def window(self, x, y, steps: int) -> float:
        t0 = time.process_time()
        for _ in range(steps):
            self.step(x, y)
        return (time.process_time() - t0) / steps


def _plain(opt_fn):
    def make(model):
        opt = opt_fn(model)

        def step(x, y):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
        return step
    return make


def _adamw(model):
    return torch.optim.AdamW(model.parameters(), lr=1e-3)


def _ours_kfac(method: str, T: int):
    from kfac_kernels import KFAC
    from kfac_kernels.optim import PreconditionedOptimizer

    def opt(model):
        return PreconditionedOptimizer(
            torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9),
            KFAC(model, damping=DAMPING, factor_decay=DECAY, factor_update_steps=1,
                 inv_update_steps=T, kfac_approx="expand", fisher_type="empirical",
                 compute_method=method, skip_modules=PEER_SKIPPED, kl_clip=KL_CLIP,
                 damping_form="exact" if method == "eigen" else "factored"))
    return _plain(opt)


def _kfac_pytorch(method: str, T: int):
    def make(model):
        from kfac.preconditioner import KFACPreconditioner

        sgd = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
        pre = KFACPreconditioner(model, factor_update_steps=1, inv_update_steps=T,
                                 damping=DAMPING, factor_decay=DECAY, lr=LR,
                                 kl_clip=KL_CLIP, compute_method=method)

        def step(x, y):
            sgd.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            pre.step()
            sgd.step()
        return step
    return make


def _silence_nvtx() -> None:
    """ASDL marks its phases with ``torch.cuda.nvtx.range``, which raises on a torch built
    without CUDA: give its modules a no-op ``range`` (timing is unaffected)."""
    import contextlib
    import types

    import asdl.precondition.natural_gradient as ng
    import asdl.utils as asdl_utils

    noop = types.SimpleNamespace(range=lambda *a, **k: contextlib.nullcontext(),
                                 range_push=lambda *a, **k: None,
                                 range_pop=lambda *a, **k: None)
    if not torch.cuda.is_available():
        ng.nvtx = asdl_utils.nvtx = noop


def _asdl(T: int):
    def make(model):
        from asdl import FISHER_EMP, KfacGradientMaker, PreconditioningConfig

        _silence_nvtx()

        sgd = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
        config = PreconditioningConfig(
            data_size=BATCH, damping=DAMPING, ema_decay=1.0 - DECAY,
            curvature_upd_interval=1, preconditioner_upd_interval=T,
            ignore_modules=[nn.BatchNorm1d, nn.BatchNorm2d, nn.LayerNorm])
        maker = KfacGradientMaker(model, config, fisher_type=FISHER_EMP)

        def step(x, y):
            sgd.zero_grad()
            dummy = maker.setup_model_call(model, x)
            maker.setup_loss_call(nn.functional.cross_entropy, dummy, y)
            maker.forward_and_backward()
            sgd.step()
        return step
    return make


SINGD_HP = dict(lr=LR, momentum=0.9, damping=DAMPING, alpha1=0.5, lr_cov=1e-2)


def _ours_singd(structure: str, T: int):
    from kfac_kernels import SINGD

    return _plain(lambda m: SINGD(m, T=T, structures=structure, kfac_approx="expand",
                                  fused=structure == "diagonal", skip_modules=PEER_SKIPPED,
                                  **SINGD_HP))


def _peer_singd(structure: str, T: int):
    def opt(model):
        from singd.optim.optimizer import SINGD as PeerSINGD

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return PeerSINGD(model, T=T, structures=(structure, structure),
                             kfac_approx="expand", **SINGD_HP)
    return _plain(opt)


def kfac_contenders(libs, T):
    out = {"ours-kfac-eigen": _ours_kfac("eigen", T), "ours-kfac-inverse": _ours_kfac("inverse", T),
           "ours-kfac-cholesky": _ours_kfac("cholesky", T)}
    if "kfac-pytorch" in libs:
        out["kfac-pytorch-eigen"] = _kfac_pytorch("eigen", T)
        out["kfac-pytorch-inverse"] = _kfac_pytorch("inverse", T)
    if "asdl" in libs:
        out["asdl-kfac"] = _asdl(T)
    return out


def singd_contenders(libs, T):
    out = {}
    for structure in ("dense", "diagonal"):
        out[f"ours-singd-{structure}"] = _ours_singd(structure, T)
        if "singd" in libs:
            out[f"singd-{structure}"] = _peer_singd(structure, T)
    return out


def bench_steps(section: str, libs, models, rounds: int, periods) -> list[dict]:
    records = []
    make_contenders = kfac_contenders if section == "steps" else singd_contenders
    for model_name in models:
        build, description = MODELS[model_name]
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(BATCH, 3, 32, 32, generator=gen)
        y = torch.randint(0, 10, (BATCH,), generator=gen)
        for T in periods:
            makers = {"adamw": _plain(_adamw), **make_contenders(libs, T)}
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                contenders = {name: Contender(build, make) for name, make in makers.items()}
                failures: dict[str, str] = {}
                # warm-up: one whole window (first updates), a failure recorded like a round's
                _interleaved({name: (lambda c=c: c.window(x, y, T))
                              for name, c in contenders.items()}, 1, failures)
                times = _interleaved({name: (lambda c=c: c.window(x, y, T))
                                      for name, c in contenders.items()
                                      if name not in failures}, rounds, failures)
            own = [name for name in failures if name == "adamw" or name.startswith("ours-")]
            if own:
                raise RuntimeError(f"{section} {model_name} T={T}: "
                                   + "; ".join(f"{n}: {failures[n]}" for n in own))
            adamw = statistics.median(times["adamw"])
            for name, error in failures.items():
                records.append({"section": section, "model": model_name,
                                "description": description, "T": T, "contender": name,
                                "error": error})
            for name, ts in times.items():
                rec = {"section": section, "model": model_name, "description": description,
                       "T": T, "contender": name, **_stats(ts),
                       "step_vs_adamw": statistics.median(ts) / adamw}
                records.append(rec)
                print(f"{section} {model_name} T={T} {name:22} {rec['median_s']:.3f}s/step "
                      f"x{rec['step_vs_adamw']:.2f} AdamW", flush=True)
            del contenders
    return records


# ---------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sections", nargs="+", choices=("factors", "steps", "singd"),
                   default=["factors", "steps", "singd"])
    p.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    p.add_argument("--periods", nargs="+", type=int, default=[1, 10],
                   help="factor/inverse update periods T of the step sections")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--no-memory", action="store_true", help="skip the factor memory")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: 2 rounds, the first two stages, T=1, ViT only")
    p.add_argument("--quiet-machine", action="store_true",
                   help="record shared_machine=false (nothing else ran during the measurement)")
    p.add_argument("--out", default="bench/results/peers_cpu.json")
    args = p.parse_args(argv)
    if args.quick:
        args.rounds, args.periods, args.models = 2, [1], ["vit"]
    torch.set_num_threads(1)
    versions = peer_versions()
    missing = _say_missing(versions)
    libs = [name for name, v in versions.items() if v is not None]
    env = environment_info("cpu")
    env.update({"peers": versions, "shared_machine": not args.quiet_machine,
                "loadavg_1m_start": os.getloadavg()[0], "rounds": args.rounds,
                "timer": "time.process_time, one intra-op thread"})
    started = time.time()
    out = {"benchmark": "peers", "environment": env, "missing_peers": missing}
    if "factors" in args.sections:
        factor_libs = [lib for lib in libs if lib in peer_factors.FUNCTIONS]
        out["factors"] = bench_factors(factor_libs, args.rounds, not args.no_memory, args.quick)
    for section in ("steps", "singd"):
        if section in args.sections:
            out[section] = bench_steps(section, libs, args.models, args.rounds, args.periods)
    env["loadavg_1m_end"] = os.getloadavg()[0]
    env["wall_s"] = time.time() - started
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {args.out} in {env['wall_s']:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
