"""All of a step's factor decompositions in as few batched calls as the sizes allow.

Blocks hand in :class:`Job` s -- an eigendecomposition, a damped inverse
``(F + gamma I)^{-1}`` of a PSD factor, or the Cholesky factor of ``F + gamma I`` -- and
:func:`run_jobs` stacks the jobs of the same kind, size, dtype and device into one call of
:func:`kfac_kernels.ops.block_eigh` / :func:`kfac_kernels.ops.block_damped_inverse` /
:func:`kfac_kernels.ops.block_damped_cholesky` (which pick the kernel). A solve that raises (an
fp32 eigendecomposition that failed to converge) is computed once more in fp64, only for the
jobs it held. Nothing is read on the host: each result comes with a health tensor (finite iff
the result is), which the caller checks without a device synchronisation
(:mod:`kfac_kernels._flags`) and answers with :func:`retry_in_float64` where needed.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import ops


@dataclass
class Job:
    kind: str                      # "eigh", "inverse" or "cholesky"
    matrix: torch.Tensor           # (groups, n, n), symmetric
    damping: torch.Tensor | None = None  # (groups,) for "inverse" and "cholesky"


def health(kind: str, result) -> torch.Tensor:
    """A 0-d tensor that is finite iff the result is: the eigenvalues (a vector per matrix; the
    eigenvectors of a non-finite solve are non-finite with them), or the trace of an inverse (a
    non-finite solve leaves NaN or inf on the diagonal; a failed Cholesky factor is NaN).
    Computed on the result's device."""
    if kind == "eigh":
        return result[0].sum()
    return torch.diagonal(result, dim1=-2, dim2=-1).sum()


def _solve(kind: str, stack: torch.Tensor, damping, backend: str, fallback: bool):
    if kind == "eigh":
        return ops.block_eigh(stack, backend=backend)
    if kind == "cholesky":
        return ops.block_damped_cholesky(stack, damping)
    return ops.block_damped_inverse(stack, damping, backend=backend, fallback=fallback)


def _run_batched(jobs: list[Job], backend: str, fallback: bool) -> list:
    buckets: dict[tuple, list[int]] = {}
    for i, job in enumerate(jobs):
        key = (job.kind, job.matrix.shape[-1], job.matrix.dtype, job.matrix.device)
        if job.kind == "cholesky" and job.matrix.device.type == "cpu":
            # LAPACK factorises a batch one matrix at a time: stacking would only add a copy
            # of every factor (0.3 s of an 11.5 s ResNet-18 step on one thread)
            key += (i,)
        buckets.setdefault(key, []).append(i)
    results: list = [None] * len(jobs)
    for (kind, *_), members in buckets.items():
        stack = (torch.cat([jobs[i].matrix for i in members]) if len(members) > 1
                 else jobs[members[0]].matrix)  # the ops never write their input
        damping = (torch.cat([jobs[i].damping.to(stack.dtype) for i in members])
                   if kind != "eigh" else None)
        try:
            out = _solve(kind, stack, damping, backend, fallback)
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
    inverse for ``"inverse"``, the lower Cholesky factor for ``"cholesky"``; a bucket whose
    solve raised is solved again in fp64 (cast back), ``None`` where that fails too."""
    if not jobs:
        return []
    # A failed Cholesky factorisation gives NaN (no host read): the health check retries it.
    results = _run_batched(jobs, backend, fallback=False)
    failed = [i for i, r in enumerate(results) if r is None]
    for i, res in zip(failed, retry_in_float64([jobs[i] for i in failed], backend)):
        results[i] = res
    return results


def retry_in_float64(jobs: list[Job], backend: str = "auto") -> list:
    """The jobs solved in fp64 and cast back to their dtype (``None`` where that fails)."""
    if not jobs:
        return []
    again = _run_batched([Job(j.kind, j.matrix.double(),
                              None if j.damping is None else j.damping.double()) for j in jobs],
                         backend, fallback=True)
    out = []
    for job, res in zip(jobs, again):
        dtype = job.matrix.dtype
        if res is None:
            out.append(None)
        elif job.kind == "eigh":
            out.append((res[0].to(dtype), res[1].to(dtype)))
        else:
            out.append(res.to(dtype))
    return out
