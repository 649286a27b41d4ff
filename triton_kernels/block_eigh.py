r"""Triton kernel for ``block_eigh``: batched parallel-order Jacobi, one program per block.

Algorithm
---------
Each program holds one block, padded to ``NP = max(16, next_pow2(n))``, in registers as an
``NP x NP`` fp32 tile ``A`` (the symmetric matrix mirrored from the lower triangle; padding rows
and columns are zero), and the eigenvector tile ``V`` (identity at the start). A sweep is
``NP - 1`` rounds of the round-robin (circle) tournament: in round ``r`` index ``NP - 1`` meets
``r`` and every other ``i`` meets ``(2 r - i) mod (NP - 1)``, so the ``NP / 2`` pairs of a round
are disjoint and every pair meets exactly once per sweep. For every pair ``(p, q)``, ``p < q``,
the rotation that zeroes ``a_pq`` has

    theta = (a_qq - a_pp) / (2 a_pq),  t = sign(theta) / (|theta| + sqrt(theta^2 + 1)),
    c = 1 / sqrt(1 + t^2),  s = t c

(``c = 1, s = 0`` when ``a_pq = 0``, and in the first ``THRESHOLD_SWEEPS`` sweeps when
``|a_pq| < 0.2 sum_{i>j} |a_ij| / n^2``: threshold Jacobi, so that a huge off-diagonal entry is
eliminated by its own rotation before small rotations spread its rounding into the small
eigenpairs; see csrc/cpu/block_eigh.cpp). The round's rotations commute, so they form one orthogonal
``J`` with ``J_pp = J_qq = c``, ``J_pq = s``, ``J_qp = -s``, and the round is
``A <- J^T A J``, ``V <- V J`` as three ``tl.dot`` products (``input_precision="ieee"``: never
TF32). The rotated entries ``a_pq`` are then set to exactly 0, as the formula makes them.
A padding index only ever meets entries that are exactly zero, so it never mixes with the block.

Before every sweep the program compares ``off(A) = ||A - diag(A)||_F`` with
``tol * ||A||_F`` and checks every pair against its own diagonal,
``|a_ij| <= tol * max(sqrt(r_i r_j), tol * ||A||_F)`` with ``r_i`` the larger of ``|a_ii|`` now
and at the start (the pairwise test of the C++ kernels, which keeps the small eigenpairs of a
graded block accurate); it stops when both hold, or after ``max_sweeps`` sweeps. The squares and
products are formed in fp64, where those of every fp32 value are normal numbers: in fp32 they
underflow to 0 below ~1e-19 (a block of 1e-25 would look converged before its first sweep) and
overflow past ~1e19, so the test holds at every scale. At the end the
eigenvalues (the diagonal) are ranked (ties by index, so the order is deterministic) and every
eigenvalue and eigenvector column is stored at its rank: ascending output without a sort.

A block with a non-finite entry in its lower triangle is solved as a zero matrix and its outputs
are overwritten with NaN (``sweeps = -1``); other programs never see it.

Under ``TRITON_INTERPRET=1`` the kernel runs on CPU tensors (slowly: keep blocks small).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["block_eigh_triton", "launch_configs", "MAX_N"]

MAX_N = 64
#: sweeps of threshold Jacobi (the C++ and CUDA kernels' kThresholdSweeps)
THRESHOLD_SWEEPS = tl.constexpr(3)


@triton.jit
def _frobenius(a, eye, OFF_ONLY: tl.constexpr):
    """``||A - diag(A)||_F`` (``OFF_ONLY``) or ``||A||_F`` of the fp32 tile, in fp64."""
    a64 = a.to(tl.float64)
    sq = a64 * a64
    if OFF_ONLY:
        sq = tl.where(eye, 0.0, sq)
    return tl.sqrt(tl.sum(tl.sum(sq, axis=1), axis=0))


@triton.jit
def _pairs_left(a, eye, start, tol, floor):
    """Whether an off-diagonal entry is significant against its pair:
    ``|a_ij| > tol * max(sqrt(r_i r_j), floor)``, ``r_i = max(|a_ii|, start_i)``, in fp64."""
    a64 = a.to(tl.float64)
    root = tl.sqrt(tl.maximum(tl.abs(tl.sum(tl.where(eye, a64, 0.0), axis=1)), start))
    bound = tol * tl.maximum(root[:, None] * root[None, :], floor)
    return tl.sum(tl.where((~eye) & (tl.abs(a64) > bound), 1, 0)) > 0


@triton.jit
def _threshold(a, eye, n):
    """``0.2 sum_{i>j} |a_ij| / n^2`` in fp64 (both triangles summed, halved)."""
    off = tl.where(eye, 0.0, tl.abs(a.to(tl.float64)))
    return 0.1 * tl.sum(tl.sum(off, axis=1), axis=0) / (n * n)


@triton.jit
def _block_eigh_kernel(a_ptr, vals_ptr, vecs_ptr, sweeps_ptr, n, max_sweeps, tol,
                       NP: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    rows = tl.arange(0, NP)
    cols = tl.arange(0, NP)
    ri = rows[:, None]
    cj = cols[None, :]
    base = pid * n * n
    lower = (ri >= cj) & (ri < n) & (cj < n)
    raw = tl.load(a_ptr + base + ri * n + cj, mask=lower, other=0.0)
    # x - x is NaN exactly when x is NaN or +-inf
    bad = tl.sum(tl.where(lower & ((raw - raw) != 0.0), 1, 0))
    finite = bad == 0
    raw = tl.where(finite, raw, 0.0)
    eye = ri == cj
    # mirror the lower triangle: A = L + L^T - diag(L)
    a = raw + tl.trans(raw) - tl.where(eye, raw, 0.0)
    v = tl.where(eye, 1.0, 0.0).to(tl.float64)

    off = _frobenius(a, eye, True)
    target = tol * _frobenius(a, eye, False)
    start = tl.abs(tl.sum(tl.where(eye, a, 0.0), axis=1)).to(tl.float64)
    left = _pairs_left(a, eye, start, tol, target)
    sweep = 0
    while ((off > target) | left) & (sweep < max_sweeps):
        skip = tl.where(sweep < THRESHOLD_SWEEPS, _threshold(a, eye, n), 0.0)
        for r in range(NP - 1):
            # partner of every index in round r of the circle method
            m = NP - 1
            part = tl.where(rows == m, r, tl.where(rows == r, m, (2 * r - rows + m) % m))
            part_cols = tl.broadcast_to(part[None, :], (NP, NP))
            a_cols = tl.gather(a, part_cols, axis=1)               # a[i, partner(j)]
            a_ip = tl.sum(tl.where(eye, a_cols, 0.0), axis=1)      # a[i, partner(i)]
            diag = tl.sum(tl.where(eye, a, 0.0), axis=1)
            d_part = tl.gather(diag, part, axis=0)
            is_p = rows < part
            app = tl.where(is_p, diag, d_part).to(tl.float64)
            aqq = tl.where(is_p, d_part, diag).to(tl.float64)
            apq = a_ip.to(tl.float64)
            nonzero = (apq != 0.0) & (tl.abs(apq) >= skip)  # rotated pairs
            theta = (aqq - app) / (2.0 * tl.where(nonzero, apq, 1.0))
            at = tl.abs(theta)
            # theta^2 overflows past ~1e154: t = 1 / (2 theta) there (both branches are
            # evaluated, so each gets an argument that cannot overflow or divide by zero)
            at_small = tl.minimum(at, 1e100)
            t = tl.where(at > 1e100, 0.5 / tl.maximum(at, 1e100),
                         1.0 / (at_small + tl.sqrt(at_small * at_small + 1.0)))
            t = tl.where(theta < 0, -t, t)
            t = tl.where(nonzero, t, 0.0)
            c = 1.0 / tl.sqrt(1.0 + t * t)
            # coefficient of the partner's row/column: J[q, p] = -s for p, J[p, q] = s for q
            sc = tl.where(is_p, -t * c, t * c)
            c32 = c.to(tl.float32)
            sc32 = sc.to(tl.float32)
            # A J (columns), then J^T (A J) (rows); V J in fp64
            x = a * c32[None, :] + a_cols * sc32[None, :]
            x_rows = tl.gather(x, tl.broadcast_to(part[:, None], (NP, NP)), axis=0)
            a = x * c32[:, None] + x_rows * sc32[:, None]
            v = v * c[None, :] + tl.gather(v, part_cols, axis=1) * sc[None, :]
            # One value per pair for the next round (the products above round differently on
            # the two sides of the diagonal), the rotated entries exactly zero, and the
            # diagonal from the accurate a_pp - t a_pq, a_qq + t a_pq.
            new_diag = tl.where(is_p, app - t * apq, aqq + t * apq).to(tl.float32)
            a = (a + tl.trans(a)) * 0.5
            a = tl.where((cj == part[:, None]) & nonzero[:, None], 0.0, a)
            a = tl.where(eye, new_diag[:, None], a)
        sweep += 1
        off = _frobenius(a, eye, True)
        left = _pairs_left(a, eye, start, tol, target)

    # rank of every eigenvalue among the n real ones (ties by index): its output position
    lam_i = tl.sum(tl.where(eye, a, 0.0), axis=1)
    lam_j = tl.sum(tl.where(eye, a, 0.0), axis=0)
    before = ((lam_j[None, :] < lam_i[:, None]) |
              ((lam_j[None, :] == lam_i[:, None]) & (cj < ri))) & (cj < n)
    rank = tl.sum(tl.where(before, 1, 0), axis=1)              # indexed by i (row)
    rank_col = tl.sum(tl.where(before, 1, 0).trans(), axis=0)  # the same, indexed by column
    nan = float("nan")
    tl.store(vals_ptr + pid * n + rank, tl.where(finite, lam_i, nan), mask=rows < n)
    out_mask = (ri < n) & (cj < n)
    tl.store(vecs_ptr + base + ri * n + rank_col[None, :], tl.where(finite, v.to(tl.float32), nan),
             mask=out_mask)
    tl.store(sweeps_ptr + pid, tl.where(finite, sweep, -1))


def _padded(n: int) -> int:
    """The tile side ``NP`` for blocks of size ``n``."""
    return max(16, triton.next_power_of_2(n))


def _num_warps(np_: int) -> int:
    return 4 if np_ <= 32 else 8


def launch_configs():
    """Every configuration the launcher picks: one per tile side for ``n <= MAX_N``."""
    from ._aot import KernelConfig

    return [KernelConfig(_block_eigh_kernel, {"NP": np_}, num_warps=_num_warps(np_),
                         pointers={"a_ptr": "fp32", "vals_ptr": "fp32", "vecs_ptr": "fp32",
                                   "sweeps_ptr": "i32"},
                         scalars={"tol": "fp32"})
            for np_ in sorted({_padded(n) for n in range(1, MAX_N + 1)})]


def block_eigh_triton(blocks: torch.Tensor, max_sweeps: int, tol: float):
    """``(eigenvalues, eigenvectors, sweeps)`` of a contiguous fp32 ``(B, n, n)`` stack,
    ``n <= MAX_N``; only the lower triangles are read."""
    if blocks.dtype != torch.float32:
        raise TypeError(f"block_eigh_triton: blocks must be float32, got {blocks.dtype}")
    b, n = blocks.shape[0], blocks.shape[-1]
    if n > MAX_N:
        raise ValueError(f"block_eigh_triton: n must be <= {MAX_N}, got {n}")
    blocks = blocks.contiguous()
    vals = blocks.new_empty((b, n))
    vecs = blocks.new_empty((b, n, n))
    sweeps = torch.empty((b,), dtype=torch.int32, device=blocks.device)
    if b == 0:
        return vals, vecs, sweeps
    if n == 0:
        return vals, vecs, sweeps.zero_()
    np_ = _padded(n)
    _block_eigh_kernel[(b,)](blocks, vals, vecs, sweeps, n, int(max_sweeps), float(tol),
                             NP=np_, num_warps=_num_warps(np_))
    return vals, vecs, sweeps
