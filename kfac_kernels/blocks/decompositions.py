"""All of a step's factor decompositions in as few batched calls as the sizes allow.

Blocks hand in :class:`Job` s -- an eigendecomposition, or a damped inverse
``(F + gamma I)^{-1}`` of a PSD factor -- and :func:`run_jobs` stacks the jobs of the same kind,
size, dtype and device into one call of :func:`kfac_kernels.ops.block_eigh` /
:func:`kfac_kernels.ops.block_damped_inverse` (which pick the kernel). A result that is not
finite (an fp32 solve that failed to converge or overflowed) is computed once more in fp64, only
for the jobs that failed.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import ops


@dataclass
class Job:
    kind: str                      # "eigh" or "inverse"
    matrix: torch.Tensor           # (groups, n, n), symmetric
    damping: torch.Tensor | None = None  # (groups,) for "inverse"


def _health(kind: str, result) -> torch.Tensor:
    """A 0-d tensor that is finite iff the result is: eigenvalues (a vector per matrix), or the
    trace of an inverse (a non-finite solve leaves NaN or inf on the diagonal)."""
    if result is None:
        return torch.tensor(float("nan"))
    if kind == "eigh":
        return result[0].sum().cpu()
    return torch.diagonal(result, dim1=-2, dim2=-1).sum().cpu()


def _solve(kind: str, stack: torch.Tensor, damping, backend: str):
    if kind == "eigh":
        return ops.block_eigh(stack, backend=backend)
    return ops.block_damped_inverse(stack, damping, backend=backend)


def _run_batched(jobs: list[Job], backend: str) -> list:
    buckets: dict[tuple, list[int]] = {}
    for i, job in enumerate(jobs):
        key = (job.kind, job.matrix.shape[-1], job.matrix.dtype, job.matrix.device)
        buckets.setdefault(key, []).append(i)
    results: list = [None] * len(jobs)
    for (kind, *_), members in buckets.items():
        stack = torch.cat([jobs[i].matrix for i in members])
        damping = (torch.cat([jobs[i].damping.to(stack.dtype) for i in members])
                   if kind == "inverse" else None)
        try:
            out = _solve(kind, stack, damping, backend)
        except torch.linalg.LinAlgError:
            out = None
        at = 0
        for i in members:
            g = jobs[i].matrix.shape[0]
            if out is None:
                results[i] = None
            elif kind == "eigh":
                results[i] = (out[0][at:at + g], out[1][at:at + g])
            else:
                results[i] = out[at:at + g]
            at += g
    return results


def run_jobs(jobs: list[Job], backend: str = "auto") -> list:
    """Results in the order of ``jobs``: ``(eigenvalues, eigenvectors)`` for ``"eigh"``, the
    inverse for ``"inverse"``, or ``None`` where even fp64 failed."""
    if not jobs:
        return []
    results = _run_batched(jobs, backend)
    finite = torch.stack([_health(j.kind, r) for j, r in zip(jobs, results)]).isfinite().tolist()
    retry = [i for i, ok in enumerate(finite) if not ok]
    if retry:
        again = _run_batched([Job(jobs[i].kind, jobs[i].matrix.double(),
                                  None if jobs[i].damping is None else jobs[i].damping.double())
                              for i in retry], backend)
        for i, res in zip(retry, again):
            dtype = jobs[i].matrix.dtype
            ok = res is not None and bool(_health(jobs[i].kind, res).isfinite())
            if not ok:
                results[i] = None
            elif jobs[i].kind == "eigh":
                results[i] = (res[0].to(dtype), res[1].to(dtype))
            else:
                results[i] = res.to(dtype)
    return results
