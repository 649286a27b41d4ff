"""Tselepidis et al. (2020)'s deep linear MLP experiment (App. B.1): one-level against two-level K-FAC.

A linear network of width 10 with batch normalisation -- an input layer and ``--depth`` hidden
layers, each ``Linear`` + ``BatchNorm1d``, and a ``Linear`` output: 66 K-FAC layers at the
paper's depth 64 -- is trained on planted targets: 25 000 Gaussian 10-d inputs whose binary
target comes from a separate random one-layer linear network of the same width
(``teacher(x) > 0``), with binary cross-entropy on the logit, in epochs of shuffled batches of
512. As in the experiment script the paper's authors published, the target is a single binary
label, the linear layers have no biases and are initialised with Kaiming-uniform for ReLU
(``--init default`` keeps PyTorch's, sqrt(6) times smaller), and the Fisher is the true one
(labels sampled from the model, ``fisher_type="mc"``); ``--outputs 10 --bias --loss
mse|bce|ce`` give the wider variants (10 binary targets, or the teacher's largest output as one
of 10 classes).

Both K-FAC variants precondition SGD with momentum 0.9 and weight decay 1e-3 and use the paper's
settings (learning rate 1e-3, damping 1e-2, KL-clipping 1e-3, factors every 10 steps,
preconditioner every 100, eigen damping; the coarse damping is the fine one unless
``--coarse-damping`` says otherwise); the same seed gives both the same data, batches and
initial weights. After every epoch the training loss -- the objective on the whole training set,
the network in training mode -- is logged.

    python python/deep_linear_two_level.py                   # the paper's size, 3 seeds
    python python/deep_linear_two_level.py --depth 16 --train 4096 --epochs 10

Measured on a CPU (``python -m bench.two_level_deep_linear`` ->
bench/results/two_level_deep_linear.json; the README's results section lists every run): after
20 epochs two-level K-FAC is ahead on 9 of 10 seeds (median training loss 0.028 against 0.075);
on seed 0 it collapses to a constant output (loss log 2) in the first 100 steps, whose coarse
inverse, built from one batch, gives corrections of up to 7.3e3 per weight (1.5e4 on seed 1,
which recovers). At 16 hidden layers (4096 samples,
30 epochs; tests/test_twolevel.py) it is ahead on seeds 0-9.
"""
from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from torch import nn

from kfac_kernels import KFAC, PreconditionedOptimizer, TwoLevel
from kfac_kernels.apps.workloads import deep_linear_mlp, planted_data

LOSSES = {"mse": nn.MSELoss, "bce": nn.BCEWithLogitsLoss, "ce": nn.CrossEntropyLoss}


def train(two_level: bool, *, depth: int = 64, width: int = 10, outputs: int = 1,
          bias: bool = False, loss: str = "bce", fisher: str = "mc", n_train: int = 25000,
          batch: int = 512, epochs: int = 20, seed: int = 0, lr: float = 1e-3,
          init: str = "kaiming-relu", coarse_damping: float | None = None) -> list[float]:
    """Train one model; returns the training loss after every epoch."""
    x, y = planted_data(n_train, width, seed, classes=loss == "ce", outputs=outputs)
    model = deep_linear_mlp(depth + 1, width, seed, outputs=outputs, bias=bias)
    if init == "kaiming-relu":
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            for layer in model:
                if isinstance(layer, nn.Linear):
                    nn.init.kaiming_uniform_(layer.weight, nonlinearity="relu")
    loss_fn = LOSSES[loss]()
    curvature = {} if fisher == "empirical" else dict(
        fisher_type=fisher, loss_fn=loss_fn, loss_average="batch",
        generator=torch.Generator().manual_seed(seed + 2))
    kfac = KFAC(model, damping=1e-2, kl_clip=1e-3, factor_update_steps=10,
                inv_update_steps=100, skip_modules=[nn.BatchNorm1d], **curvature)
    precond = TwoLevel(kfac, coarse_damping=coarse_damping) if two_level else kfac
    opt = PreconditionedOptimizer(
        torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=1e-3), precond)
    gen = torch.Generator().manual_seed(seed + 1)
    losses = []
    for _ in range(epochs):
        for idx in torch.randperm(n_train, generator=gen).split(batch):
            opt.zero_grad()
            if fisher == "empirical":
                loss_fn(model(x[idx]), y[idx]).backward()
            else:
                precond.backward(model(x[idx]), y[idx])
            opt.step()
        losses.append(training_loss(model, x, y, loss_fn))
    return losses


def training_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss_fn) -> float:
    """The objective being minimised, on the whole training set: the network in training mode
    (batch-norm statistics of the data it is applied to), its running statistics left as they
    were. Evaluation mode would use the running statistics instead, which lag behind the
    weights: in a 64-layer batch-normalised network that alone produced losses of up to 1e12
    after steps with large updates, although the loss being trained was small."""
    buffers = {k: v.clone() for k, v in model.state_dict().items()
               if "running_" in k or "num_batches_tracked" in k}
    with torch.no_grad():
        loss = float(loss_fn(model(x), y))
    model.load_state_dict(buffers, strict=False)
    return loss


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--depth", type=int, default=64, help="hidden layers")
    parser.add_argument("--width", type=int, default=10)
    parser.add_argument("--outputs", type=int, default=1)
    parser.add_argument("--bias", action="store_true", help="linear layers with biases")
    parser.add_argument("--loss", choices=tuple(LOSSES), default="bce",
                        help="binary cross-entropy on the logits, mean-squared error on the 0/1 "
                             "targets, or cross-entropy on the teacher's argmax class")
    parser.add_argument("--fisher", choices=("mc", "empirical", "type-2"), default="mc")
    parser.add_argument("--init", choices=("kaiming-relu", "default"), default="kaiming-relu")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--train", type=int, default=25000)
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--coarse-damping", type=float, default=None,
                        help="lambda of the coarse inverse (default: K-FAC's damping, 1e-2)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    settings = dict(depth=args.depth, width=args.width, outputs=args.outputs, bias=args.bias,
                    loss=args.loss, fisher=args.fisher, n_train=args.train, batch=args.batch,
                    epochs=args.epochs, lr=args.lr, init=args.init,
                    coarse_damping=args.coarse_damping)
    results = []
    for seed in args.seeds:
        curves = {name: train(two, seed=seed, **settings)
                  for name, two in (("one-level", False), ("two-level", True))}
        one, two = curves["one-level"], curves["two-level"]
        print(f"seed {seed}: training loss per epoch\n  one-level "
              + " ".join(f"{v:.4f}" for v in one) + "\n  two-level "
              + " ".join(f"{v:.4f}" for v in two)
              + f"\n  -> {'two-level' if two[-1] < one[-1] else 'one-level'} ahead after "
              f"{args.epochs} epochs", flush=True)
        results.append({"seed": seed, **curves})
    if args.json:
        Path(args.json).write_text(json.dumps({"settings": vars(args), "runs": results},
                                              indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
