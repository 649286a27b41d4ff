"""Backward vectors for the Fisher/GGN of ``nn.CrossEntropyLoss``, ``nn.MSELoss`` and
``nn.BCEWithLogitsLoss``.

The user's loss is ``L = c * sum_i l_i`` over its elements ``i`` (positions of the output), with
``c = 1`` for ``reduction="sum"`` and ``c = 1/(number of averaged terms)`` for ``"mean"``. The
GGN of ``L`` w.r.t. the output is block diagonal over positions with blocks ``c * H_i``:

* cross-entropy: ``H_i = diag(p) - p p^T`` over the classes, factorised as ``S S^T`` with
  ``S = diag(sqrt(p)) - p sqrt(p)^T``;
* squared error ``(f - y)^2``: ``H_i = 2`` per element;
* binary cross-entropy on a logit ``f`` (``nn.BCEWithLogitsLoss``): ``H_i = p (1 - p)`` per
  element, ``p = sigmoid(f)``; the model's predictive distribution is ``Bernoulli(p)``.

``type-2`` backpropagates ``sqrt(c) * S[:, k]`` for each class ``k`` *and each position of a sample
separately* (batched over the examples), so the result is the sum of Eschenhagen et al. (2023), Eq.
7 without cross terms between positions. ``mc`` backpropagates ``sqrt(c) * grad l(f, y_sampled)``
with labels drawn from the model's predictive distribution (Eschenhagen et al. (2023), App. B.4, Eq.
56), one backward pass per sample; its expectation is the type-2 result.
"""
from __future__ import annotations

import math
from typing import Iterator

import torch
from torch import nn

SUPPORTED_LOSSES = (nn.CrossEntropyLoss, nn.MSELoss, nn.BCEWithLogitsLoss)


def check_loss_fn(loss_fn, loss_average, who: str) -> None:
    """Validate a loss module for curvature computations (and its agreement with loss_average)."""
    if not isinstance(loss_fn, SUPPORTED_LOSSES):
        raise TypeError(f"{who}: loss_fn must be an nn.CrossEntropyLoss, nn.MSELoss or "
                        f"nn.BCEWithLogitsLoss instance, got {type(loss_fn).__name__}")
    if loss_fn.reduction not in ("mean", "sum"):
        raise ValueError(f"{who}: loss_fn.reduction must be 'mean' or 'sum', got "
                         f"{loss_fn.reduction!r}")
    if isinstance(loss_fn, nn.CrossEntropyLoss) and loss_fn.weight is not None:
        raise ValueError(f"{who}: nn.CrossEntropyLoss with class weights is not supported")
    if isinstance(loss_fn, nn.BCEWithLogitsLoss) and (
            loss_fn.weight is not None or loss_fn.pos_weight is not None):
        raise ValueError(f"{who}: nn.BCEWithLogitsLoss with weight or pos_weight is not "
                         "supported")
    if loss_fn.reduction == "sum" and loss_average is not None:
        raise ValueError(f"{who}: loss_fn has reduction='sum', so loss_average must be None, got "
                         f"{loss_average!r}")
    if loss_fn.reduction == "mean" and loss_average is None:
        raise ValueError(f"{who}: loss_fn has reduction='mean', so loss_average must be 'batch' or "
                         "'batch+sequence', got None")


def _class_last(outputs: torch.Tensor) -> torch.Tensor:
    """Cross-entropy logits as ``(N, P, C)``: examples, positions, classes."""
    if outputs.dim() == 1:
        return outputs.reshape(1, 1, -1)
    n, c = outputs.shape[:2]
    return outputs.reshape(n, c, -1).transpose(1, 2)


def _class_back(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    if like.dim() == 1:
        return t.reshape(like.shape)
    n, c = like.shape[:2]
    return t.transpose(1, 2).reshape(n, c, *like.shape[2:])


def _ce_mask(loss_fn: nn.CrossEntropyLoss, outputs, targets) -> torch.Tensor | None:
    """``(N, P, 1)`` weights: 0 at positions whose class-index target is ``ignore_index``."""
    if targets.is_floating_point():
        return None
    t = targets.reshape(1, -1) if outputs.dim() == 1 else targets.reshape(outputs.shape[0], -1)
    return (t != loss_fn.ignore_index).unsqueeze(-1).to(outputs.dtype)


def loss_coefficient(loss_fn, outputs: torch.Tensor,
                     targets: torch.Tensor) -> float | torch.Tensor:
    """``c`` in ``L = c * sum_i l_i`` for the loss as ``loss_fn`` computes it: a float, or a 0-d
    tensor where the count depends on the targets (``ignore_index``), so that it is not read on
    the host (a device synchronisation on a GPU)."""
    if loss_fn.reduction == "sum":
        return 1.0
    if isinstance(loss_fn, (nn.MSELoss, nn.BCEWithLogitsLoss)):
        return 1.0 / outputs.numel()
    mask = _ce_mask(loss_fn, outputs, targets)
    if mask is None:
        count = _class_last(outputs).shape[0] * _class_last(outputs).shape[1]
        return 1.0 / count if count > 0 else 0.0
    return inverse_coefficient(mask.sum())


def inverse_coefficient(c: float | torch.Tensor) -> float | torch.Tensor:
    """``1 / c``, and 0 for ``c = 0`` (a loss over no element); on the device for a tensor."""
    if isinstance(c, torch.Tensor):
        return torch.where(c > 0, 1.0 / c.clamp_min(torch.finfo(c.dtype).tiny), 0.0)
    return 1.0 / c if c > 0 else 0.0


def _sqrt(c: float | torch.Tensor) -> float | torch.Tensor:
    return c.sqrt() if isinstance(c, torch.Tensor) else math.sqrt(c)


def type2_grad_outputs(loss_fn, outputs: torch.Tensor,
                       targets: torch.Tensor) -> Iterator[torch.Tensor]:
    """Columns ``v`` of a factorisation ``sum_v v v^T`` of the Hessian of the loss w.r.t.
    ``outputs``, each a tensor shaped like ``outputs``, one per (position, class) of a sample."""
    c = loss_coefficient(loss_fn, outputs, targets)
    outputs = outputs.detach()
    if isinstance(loss_fn, nn.MSELoss):
        n = outputs.shape[0] if outputs.dim() > 0 else 1
        flat = outputs.reshape(n, -1)
        value = _sqrt(2.0 * c)
        for e in range(flat.shape[1]):
            col = torch.zeros_like(flat)
            col[:, e] = value
            yield col.reshape(outputs.shape)
        return
    if isinstance(loss_fn, nn.BCEWithLogitsLoss):
        n = outputs.shape[0] if outputs.dim() > 0 else 1
        p = torch.sigmoid(outputs.reshape(n, -1))
        root = (p * (1.0 - p)).mul_(c).sqrt_()
        for e in range(root.shape[1]):
            col = torch.zeros_like(root)
            col[:, e] = root[:, e]
            yield col.reshape(outputs.shape)
        return
    logits = _class_last(outputs)
    p = torch.softmax(logits, dim=-1)
    sqrt_p = p.sqrt()
    mask = _ce_mask(loss_fn, outputs, targets)
    scale = _sqrt(c)
    n, positions, classes = p.shape
    for j in range(positions):
        for k in range(classes):
            col = torch.zeros_like(p)
            col[:, j, :] = -p[:, j, :] * sqrt_p[:, j, k:k + 1]
            col[:, j, k] += sqrt_p[:, j, k]
            col.mul_(scale)
            if mask is not None:
                col.mul_(mask)
            yield _class_back(col, outputs)


def _samplable(p: torch.Tensor, fill: float) -> torch.Tensor:
    """``p`` as the samplers take it: half precision in float64, and non-finite probabilities
    replaced by ``fill``, so that sampling never raises (nor trips a device-side assert) on the
    outputs of a diverged model. The backward vector is still computed from the original
    ``p``: it stays non-finite there, and the optimizer's finiteness check skips the step and
    says so, instead of a sampler error. No host read."""
    if p.dtype in (torch.float16, torch.bfloat16):
        p = p.to(torch.float64)
    return torch.where(p.isfinite(), p, fill)


def mc_grad_output(loss_fn, outputs: torch.Tensor, targets: torch.Tensor,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """One Monte-Carlo backward vector (shaped like ``outputs``) with labels sampled from the
    model's predictive distribution; ``E[v v^T]`` is the Hessian of the loss per position."""
    c = loss_coefficient(loss_fn, outputs, targets)
    outputs = outputs.detach()
    if isinstance(loss_fn, nn.MSELoss):
        # (f - y)^2 is the negative log-likelihood of N(f, 1/2) up to a constant: y = f + e/sqrt(2)
        # gives the gradient 2 (f - y) = -sqrt(2) e, whose second moment is 2 = the Hessian.
        eps = torch.randn(outputs.shape, generator=generator, device=outputs.device,
                          dtype=outputs.dtype)
        return eps.mul_(_sqrt(2.0 * c))
    if isinstance(loss_fn, nn.BCEWithLogitsLoss):
        # y ~ Bernoulli(p): l's gradient at the sampled label is p - y, E[(p - y)^2] = p (1 - p).
        p = torch.sigmoid(outputs)
        y = torch.bernoulli(_samplable(p, 0.5), generator=generator).to(p.dtype)
        return (p - y).mul_(_sqrt(c))
    logits = _class_last(outputs)
    p = torch.softmax(logits, dim=-1)
    flat = p.reshape(-1, p.shape[-1])
    labels = torch.multinomial(_samplable(flat, 1.0 / flat.shape[-1]), 1,
                               generator=generator).squeeze(-1)
    grad = flat.clone()
    grad[torch.arange(flat.shape[0], device=flat.device), labels] -= 1.0
    grad = grad.reshape(p.shape).mul_(_sqrt(c))
    mask = _ce_mask(loss_fn, outputs, targets)
    if mask is not None:
        grad.mul_(mask)
    return _class_back(grad, outputs)
