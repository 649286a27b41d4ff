r"""Batched symmetric eigendecomposition of many blocks, and the damped block inverse (BD-KFAC).

.. math::

    A_b = Q_b \Lambda_b Q_b^\top, \qquad
    \text{block\_damped\_inverse}(A_b, \gamma_b)
        = Q_b \,(\max(\Lambda_b, 0) + \gamma_b I)^{-1} Q_b^\top

for every block ``A_b`` (Yu & Tatebe, Sec. 4.4). Eigenvalues are returned in ascending order, the
eigenvectors as the columns of ``Q_b`` (as ``torch.linalg.eigh``).

Input
-----
``blocks`` is a stacked ``(B, n, n)`` tensor or a list of square matrices of any mix of sizes
(same dtype and device). **Only the lower triangle of each block is read** (as
``torch.linalg.eigh(UPLO="L")``): the strict upper triangle is ignored, so a block that is not
exactly symmetric is treated as ``tril(A) + tril(A, -1)^T``. Stacked input gives stacked output,
a list gives lists in the same order. A list is bucketed by size; each bucket is one stacked
solve (one launch on the native and Triton backends).

Backends
--------
* ``"eager"``: ``torch.linalg.eigh`` on each bucket.
* ``"cpu"``: C++ cyclic Jacobi, OpenMP across blocks, fp32 and fp64, for ``n <= 8`` by
  default: the kernel solves any size, but batched LAPACK is faster from about ``n = 8`` on
  (measured, one thread: ``n = 4`` 1.9x faster than ``torch.linalg.eigh``, ``n = 8`` 0.8x,
  ``n = 16`` 0.4x; ``bench/results/block_eigh_cpu.json``). Raise ``MAX_N["cpu"]`` to use it
  further (tested up to 256).
* ``"cuda"``: batched parallel-order (round-robin) Jacobi, one thread block per matrix, the
  matrix in shared memory, fp32 and fp64, ``n <= 128``; the damped inverse is fused.
* ``"triton"``: batched parallel-order (round-robin) Jacobi, one program per block, the block in
  registers, fp32 only (``backend="triton"`` with fp64 blocks raises a ``TypeError``;
  ``"auto"`` sends them to the eager path), ``n <= 64``.

A bucket whose size exceeds the chosen backend's limit (``MAX_N``) is handed to
``torch.linalg.eigh`` (with a ``UserWarning`` the first time per backend when that backend was
asked for by name; ``"auto"`` makes this choice silently); its damped inverses are computed by a
batched Cholesky factorisation instead (:func:`damped_inverse_by_cholesky`, the same result for
PSD blocks at about a sixth of the work; blocks it cannot factorise take the eigendecomposition). ``"auto"`` picks as
every op does (``kfac_kernels._backend.resolve_backend``). The Jacobi kernels are deterministic.

Jacobi convergence
------------------
A sweep applies one rotation to every off-diagonal pair. The solver stops after the first sweep
that leaves ``off(A) = ||A - diag(A)||_F <= tol * ||A||_F`` and every pair small against its own
diagonal, ``|a_ij| <= tol * max(sqrt(r_i r_j), tol * ||A||_F)`` with ``r_i`` the larger of
``|a_ii|`` now and in the input (Demmel & Veselic's relative test), or after ``max_sweeps``
sweeps. The normwise test alone left the small eigenpairs of a graded block (one diagonal entry
1e8 times the others) with errors of ``eps ||A||``: in fp32 0 sweeps and a damped inverse 0.2-0.9
off on the Jacobi kernels; the pairwise test solves every pair to its own scale (errors near
``eps``; LAPACK's ``ssyevd`` errs by up to 0.3 there at ``n = 32``). The input's diagonal in
``r_i`` keeps rank-deficient and ill-conditioned blocks, whose small diagonal is rounding noise,
at the sweeps of the normwise test (+0-2 sweeps at ``n = 128``). In the first three sweeps a pair
is rotated only when ``|a_pq| >= 0.2 sum_{i>j} |a_ij| / n^2`` (threshold Jacobi): a huge
off-diagonal entry is eliminated by its own rotation before rotations of small pairs spread its
rounding into the small eigenpairs (an indefinite block with one 1e7 pair: damped inverse 0.08-0.2
off in fp32 without it, 2e-8 with it; 5e-16 in fp64 against 50 digits, where
``torch.linalg.eigh`` errs by 3e-9).
Both tests are relative to each block's own scale: the norms are summed without under- or
overflow (squares of the entries times a power of two near ``1 / max|a_ij|`` in the C++ and CUDA
kernels, fp64 squares of the fp32 entries in Triton), so a block of 1e-30 or 1e30 converges as
one of 1 (``tests/test_block_eigh_scale.py``).
Defaults: ``tol`` = the unit round-off of the compute dtype (``torch.finfo(dtype).eps``),
``max_sweeps = 30`` (Jacobi converges quadratically; well-conditioned and 1e10-conditioned blocks
alike need 5-10 sweeps for ``n <= 256``). With ``return_sweeps=True`` the number of sweeps per
block is returned as an ``int32`` tensor (a list of 0-d tensors for list input): ``>= 0`` for a
block solved by Jacobi (``0``: it was already diagonal), ``-1`` for a block solved by
``torch.linalg.eigh`` (backend ``"eager"`` or a bucket above the size limit) and for a
non-finite block (not solved).

Robustness
----------
A block whose lower triangle holds a NaN or inf gets all-NaN eigenvalues, eigenvectors and
damped inverse; every other block of the batch is solved as if it were alone. Zero, diagonal,
``1 x 1``, rank-deficient and repeated-eigenvalue blocks are fine.

Precision
---------
fp32 and fp64 blocks are rotated in their own precision; the Jacobi kernels compute the rotation
coefficients and accumulate the eigenvectors in fp64 for both (in fp32, each of the ``~n^2/2``
rotations per sweep would cost ``Q`` about one unit round-off of orthogonality:
``||Q^T Q - I||_2`` reached 3.7e-5 at ``n = 128``; with fp64 accumulation it stays below 1e-7).
fp16 and bf16 blocks are computed in fp32 and the results returned in the input dtype
(``sweeps`` stays ``int32``).

Damped inverse
--------------
``damping`` is a non-negative float or one value per block (a sequence or 1-D tensor of length
``B``, in input order). Eigenvalues are clamped at 0 before the damping is added, so round-off
negatives of a PSD block never make ``lambda + gamma`` small or negative. ``damping = 0`` is
allowed: then the formula is the pseudo-spectrum inverse and a singular block gives ``inf``
(or NaN) entries, exactly as the formula says. The result is exactly symmetric
(``out == out.mT`` bitwise): the native kernels form the lower triangle of
``sum_k s_k q_k q_k^T`` in fp64 while the block is in cache and mirror it; the eager and Triton
paths compute ``0.5 (X + X^T)`` of ``X = (Q s) Q^T``.
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import torch

from .._backend import BackendUnavailableError, native_has_op, resolve_backend
from ._cuda_auto import cuda_order
from ._library import check_same

_OP = "block_eigh"
_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
_LOW = (torch.float16, torch.bfloat16)

# Largest block each Jacobi backend solves itself; above it the bucket goes to torch.linalg.eigh.
# cuda and triton: the kernels' limits (shared memory, registers). cpu: the measured crossover
# with batched LAPACK (the kernel itself has no limit).
MAX_N = {"cpu": 8, "cuda": 128, "triton": 64}
DEFAULT_MAX_SWEEPS = 30

_warned: set[str] = set()


# ------------------------------------------------------------------------------------ checks

def _as_blocks(blocks, op: str) -> tuple[list[torch.Tensor], bool]:
    """(list of (n, n) or one (B, n, n) tensor, stacked?) after the argument checks."""
    if isinstance(blocks, torch.Tensor):
        if blocks.dim() != 3 or blocks.shape[-1] != blocks.shape[-2]:
            raise ValueError(
                f"{op}: blocks must be a (B, n, n) tensor of square matrices or a list of square "
                f"matrices, got a tensor of shape {tuple(blocks.shape)}")
        if blocks.dtype not in _DTYPES:
            raise TypeError(f"{op}: blocks must be floating point (float32, float64, float16 or "
                            f"bfloat16), got {blocks.dtype}")
        return [blocks], True
    if not isinstance(blocks, (list, tuple)):
        raise TypeError(f"{op}: blocks must be a torch.Tensor or a list of tensors, got "
                        f"{type(blocks).__name__}")
    if len(blocks) == 0:
        raise ValueError(f"{op}: blocks must not be an empty list")
    first = None
    for i, blk in enumerate(blocks):
        if not isinstance(blk, torch.Tensor):
            raise TypeError(f"{op}: blocks[{i}] must be a torch.Tensor, got {type(blk).__name__}")
        if blk.dim() != 2 or blk.shape[0] != blk.shape[1]:
            raise ValueError(f"{op}: blocks[{i}] must be a square (n, n) matrix, got shape "
                             f"{tuple(blk.shape)}")
        if blk.dtype not in _DTYPES:
            raise TypeError(f"{op}: blocks[{i}] must be floating point (float32, float64, "
                            f"float16 or bfloat16), got {blk.dtype}")
        if first is None:
            first = blk
        elif blk.dtype != first.dtype or blk.device != first.device:
            raise ValueError(
                f"{op}: all blocks must share one dtype and device, got blocks[0] {first.dtype} "
                f"on {first.device} and blocks[{i}] {blk.dtype} on {blk.device}")
    return list(blocks), False


def _check_sweeps_tol(max_sweeps, tol) -> None:
    if max_sweeps is not None and (isinstance(max_sweeps, bool) or not isinstance(max_sweeps, int)
                                   or max_sweeps < 1):
        raise ValueError(f"{_OP}: max_sweeps must be a positive int or None, got {max_sweeps!r}")
    if tol is not None and (isinstance(tol, bool) or not isinstance(tol, (int, float))
                            or not math.isfinite(tol) or tol < 0):
        raise ValueError(f"{_OP}: tol must be a non-negative finite float or None, got {tol!r}")


def _damping_values(damping, count: int, op: str = "block_damped_inverse"
                    ) -> list[float] | float | torch.Tensor:
    if isinstance(damping, bool):
        raise TypeError(f"{op}: damping must be a float or one value per block, got bool")
    if isinstance(damping, (int, float)):
        values = [float(damping)]
    elif isinstance(damping, torch.Tensor):
        if damping.dim() == 0:
            values = [float(damping)]
        elif damping.dim() == 1:
            if damping.numel() != count:
                raise ValueError(f"{op}: damping must have one value per block ({count}), got "
                                 f"{damping.numel()}")
            # Kept on its device: reading the values would synchronise with a GPU, so a 1-D
            # tensor's values are not checked on the host (a caller's responsibility).
            return damping.detach()
        else:
            raise ValueError(f"{op}: damping must be a float or a 1-D tensor of length {count}, "
                             f"got a tensor of shape {tuple(damping.shape)}")
    elif isinstance(damping, Sequence) and not isinstance(damping, (str, bytes)):
        values = [float(v) for v in damping]
        if len(values) != count:
            raise ValueError(f"{op}: damping must have one value per block ({count}), got "
                             f"{len(values)}")
    else:
        raise TypeError(f"{op}: damping must be a float or one value per block, got "
                        f"{type(damping).__name__}")
    for v in values:
        if not math.isfinite(v) or v < 0:
            raise ValueError(f"{op}: damping must be non-negative and finite, got {v}")
    if isinstance(damping, (int, float)) or (isinstance(damping, torch.Tensor)
                                              and damping.dim() == 0):
        return values[0]
    return values


# ------------------------------------------------------------------------------------ eager

def _finite_mask(stack: torch.Tensor) -> torch.Tensor:
    """Per block: whether its lower triangle (the part that is read) is all finite."""
    return torch.isfinite(stack.tril()).flatten(1).all(dim=1)


def block_eigh_eager(stack: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``torch.linalg.eigh`` of a ``(B, n, n)`` stack with non-finite blocks confined to NaN."""
    finite = _finite_mask(stack)
    sweeps = torch.full((stack.shape[0],), -1, dtype=torch.int32, device=stack.device)
    # Non-finite blocks are solved as the identity and their results replaced by NaN: no host
    # read of the mask (it would synchronise with a GPU).
    eye = torch.eye(stack.shape[-1], dtype=stack.dtype, device=stack.device)
    vals, vecs = torch.linalg.eigh(torch.where(finite[:, None, None], stack, eye))
    return (torch.where(finite[:, None], vals, math.nan),
            torch.where(finite[:, None, None], vecs, math.nan), sweeps)


def damped_inverse_from_eigh(vals: torch.Tensor, vecs: torch.Tensor,
                             damping: torch.Tensor) -> torch.Tensor:
    """``Q diag(1 / (max(lambda, 0) + gamma)) Q^T``, exactly symmetric; damping is (B,)."""
    scale = 1.0 / (vals.clamp_min(0) + damping[:, None])
    x = torch.matmul(vecs * scale[:, None, :], vecs.mT)
    return (x + x.mT) * 0.5


def _not_jacobi(stack: torch.Tensor) -> torch.Tensor:
    return torch.full((stack.shape[0],), -1, dtype=torch.int32, device=stack.device)


def _damped_cholesky_ex(stack: torch.Tensor, damping: torch.Tensor):
    """``torch.linalg.cholesky_ex`` of ``stack + diag(damping)`` per block. The factorisation
    reads the lower triangle only (LAPACK potrf, uplo "L"), so the damping goes onto a copy's
    diagonal and nothing is mirrored."""
    shifted = stack.clone()
    shifted.diagonal(dim1=-2, dim2=-1).add_(damping[:, None])
    return torch.linalg.cholesky_ex(shifted)


def _native_cholesky(stack: torch.Tensor) -> bool:
    """Whether ``block_damped_cholesky``'s CPU kernel takes ``stack`` (fp32/fp64 CPU)."""
    return (stack.device.type == "cpu" and stack.dtype in (torch.float32, torch.float64)
            and native_has_op("block_damped_cholesky"))


def damped_inverse_by_cholesky(stack: torch.Tensor, damping: torch.Tensor,
                               fallback: bool = True) -> torch.Tensor:
    """``(A + gamma I)^{-1}`` by a batched Cholesky factorisation (about a sixth of an
    eigendecomposition's work): for a PSD block it equals ``Q (max(L, 0) + gamma I)^{-1} Q^T``
    up to round-off. Blocks whose factorisation fails (indefinite beyond ``-gamma`` from
    round-off, or non-finite) take the eigendecomposition, which clamps and confines NaN; with
    ``fallback=False`` they are NaN instead, and nothing is read on the host (finding the
    failed blocks would synchronise with a GPU): the caller checks and solves them again."""
    # cholesky_inverse returns an exactly symmetric matrix. (Mirroring the input and
    # symmetrising the result were two passes over transposed views: 2.3 s of a 17.9 s ResNet-18
    # K-FAC step at n = 4608 on one CPU thread.)
    if _native_cholesky(stack):
        # block_damped_cholesky's CPU kernel (1.2-1.8x faster than through cholesky_ex at
        # n = 16..1152 on one thread): a failed factorisation is an all-NaN block
        chol = torch.ops.kfac_kernels.block_damped_cholesky(stack, damping)
        bad = chol.diagonal(dim1=-2, dim2=-1).isnan().any(-1)
    else:
        chol, info = _damped_cholesky_ex(stack, damping)
        bad = info != 0
    inverse = torch.cholesky_inverse(chol)
    if not fallback:
        return inverse.masked_fill_(bad[:, None, None], math.nan)
    failed = bad.nonzero().flatten()
    if failed.numel():
        vals, vecs, _ = block_eigh_eager(stack[failed])
        inverse[failed] = damped_inverse_from_eigh(vals, vecs, damping[failed])
    return inverse


# ------------------------------------------------------------------------------------ dispatch

def _solve_bucket(stack: torch.Tensor, backend: str, max_sweeps: int, tol: float | None,
                  damping: torch.Tensor | None, explicit: bool = True, fallback: bool = True):
    """Eigen (or damped inverse) of one same-size stack on a concrete backend.

    Returns (vals, vecs, sweeps) or, with damping, (inverse, sweeps). A size above the
    backend's limit goes to ``torch.linalg.eigh``: silently when ``"auto"`` chose the backend
    (that is its choice of the faster solver), with a note once when the caller named it."""
    n = stack.shape[-1]
    if backend != "eager" and n > MAX_N[backend]:
        if explicit and backend not in _warned:
            _warned.add(backend)
            warnings.warn(
                f"{_OP}: blocks larger than the {backend!r} backend's limit ({MAX_N[backend]}) "
                f"are solved with torch.linalg.eigh (first seen: n = {n}); this is said once",
                stacklevel=4)
        if damping is not None:
            return damped_inverse_by_cholesky(stack, damping, fallback), _not_jacobi(stack)
        backend = "eager"
    if backend == "eager":
        vals, vecs, sweeps = block_eigh_eager(stack)
        if damping is None:
            return vals, vecs, sweeps
        return damped_inverse_from_eigh(vals, vecs, damping), sweeps
    eps = torch.finfo(stack.dtype).eps
    tol_value = float(eps if tol is None else tol)
    if backend == "triton":
        from kfac_kernels._triton.block_eigh import block_eigh_triton
        vals, vecs, sweeps = block_eigh_triton(stack, max_sweeps, tol_value)
        if damping is None:
            return vals, vecs, sweeps
        return damped_inverse_from_eigh(vals, vecs, damping), sweeps
    if damping is None:
        return torch.ops.kfac_kernels.block_eigh(stack, max_sweeps, tol_value)
    return torch.ops.kfac_kernels.block_damped_inverse(stack, damping, max_sweeps, tol_value)


def _run(blocks, backend, max_sweeps, tol, damping, op, fallback=True):
    items, stacked = _as_blocks(blocks, op)
    _check_sweeps_tol(max_sweeps, tol)
    ref = items[0]
    chosen = resolve_backend(backend, ref.device, _OP)
    in_dtype = ref.dtype
    compute_dtype = torch.float32 if in_dtype in _LOW else in_dtype
    if chosen == "triton" and compute_dtype == torch.float64 and backend == "auto":
        chosen = "eager"  # "auto" never picks a backend that cannot take the dtype
    if chosen == "triton" and compute_dtype == torch.float64:
        raise TypeError(f"{op}: the 'triton' backend computes in float32 only; use backend='cpu', "
                        "'cuda' or 'eager' for float64 blocks")
    sweeps_cap = DEFAULT_MAX_SWEEPS if max_sweeps is None else int(max_sweeps)
    count = ref.shape[0] if stacked else len(items)
    damp_list = None
    if damping is not None:
        values = _damping_values(damping, count)
        if isinstance(values, torch.Tensor):  # 1-D, on its device: no host round trip
            damp_list = values.to(ref.device, compute_dtype)
        else:
            if isinstance(values, float):
                values = [values] * count
            damp_list = torch.tensor(values, dtype=compute_dtype, device=ref.device)

    if stacked:
        groups = {ref.shape[-1]: None}
    else:
        groups = {}
        for i, blk in enumerate(items):
            groups.setdefault(blk.shape[-1], []).append(i)

    results: dict[int, tuple] = {}
    for n, idx in groups.items():
        if idx is None:
            stack = ref
        else:
            stack = torch.stack([items[i] for i in idx])
        stack = stack.to(compute_dtype).contiguous()
        damp = None
        if damp_list is not None:
            damp = damp_list if idx is None else damp_list[torch.tensor(idx, device=ref.device)]
        here = chosen
        if backend == "auto" and ref.device.type == "cuda":  # the fastest solver for this size
            here = resolve_backend(backend, ref.device, _OP,
                                   cuda_order(op, n=n, dtype=compute_dtype))
        results[n] = _solve_bucket(stack, here, sweeps_cap, tol, damp, backend != "auto",
                                   fallback)

    def cast(t):
        return t if t.dtype in (torch.int32, in_dtype) else t.to(in_dtype)

    if stacked:
        return tuple(cast(t) for t in results[ref.shape[-1]])
    nouts = len(next(iter(results.values())))
    outs = [[None] * len(items) for _ in range(nouts)]
    for n, idx in groups.items():
        for k in range(nouts):
            part = results[n][k]
            for j, i in enumerate(idx):
                outs[k][i] = cast(part[j])
    return tuple(outs)


def block_eigh(blocks, *, backend: str = "auto", max_sweeps: int | None = None,
               tol: float | None = None, return_sweeps: bool = False):
    """Eigenvalues (ascending) and eigenvectors of every block; see the module docstring.

    Args:
        blocks: ``(B, n, n)`` tensor or list of ``(n_i, n_i)`` tensors (one dtype and device);
            only the lower triangle is read.
        backend: ``"auto"``, ``"eager"``, ``"cpu"``, ``"cuda"`` or ``"triton"``.
        max_sweeps: Jacobi sweep cap (default 30); ignored by ``torch.linalg.eigh``.
        tol: stop when ``off(A) <= tol * ||A||_F`` and every pair is small against its
            diagonal (see "Jacobi convergence"; default: eps of the compute dtype).
        return_sweeps: also return the sweeps per block (``int32``; -1: not solved by Jacobi).

    Returns:
        ``(eigenvalues, eigenvectors)`` — ``(B, n)`` and ``(B, n, n)`` for stacked input, lists of
        ``(n_i,)`` and ``(n_i, n_i)`` for list input — plus ``sweeps`` with ``return_sweeps``.
    """
    vals, vecs, sweeps = _run(blocks, backend, max_sweeps, tol, None, _OP)
    return (vals, vecs, sweeps) if return_sweeps else (vals, vecs)


def block_damped_inverse(blocks, damping, *, backend: str = "auto", fallback: bool = True):
    """``Q (max(Lambda, 0) + gamma I)^{-1} Q^T`` per block; see the module docstring.

    Args:
        blocks: ``(B, n, n)`` tensor or list of ``(n_i, n_i)`` tensors; only the lower triangle
            is read.
        damping: non-negative float, or one value per block (sequence or 1-D tensor of length B).
        backend: ``"auto"``, ``"eager"``, ``"cpu"``, ``"cuda"`` or ``"triton"``.
        fallback: blocks above the Jacobi kernel's size limit are inverted by a Cholesky
            factorisation; where it fails (an indefinite or non-finite block) the
            eigendecomposition solves the block, which needs a host read of the failures.
            ``False``: such blocks are NaN instead and nothing is read on the host (for callers
            that check the result on the device and solve again).

    Returns:
        The damped inverses, ``(B, n, n)`` for stacked input or a list for list input; exactly
        symmetric.
    """
    inverse, _ = _run(blocks, backend, None, None, damping, "block_damped_inverse", fallback)
    return inverse


def block_damped_cholesky(blocks: torch.Tensor, damping, *, backend: str = "auto") -> torch.Tensor:
    """The lower Cholesky factor ``L`` of ``A + gamma I`` per block, ``L L^T = A + gamma I``:
    the preferred form when the damped inverse is applied only once or twice (two triangular
    solves with the gradient cost what a product with the inverse costs, and forming the
    inverse, LAPACK ``potri``, is skipped).

    Backends: ``"eager"`` is ``torch.linalg.cholesky_ex`` (LAPACK / cuSOLVER), the only one for
    CUDA tensors and fp16/bf16 input; ``"cpu"`` (what ``"auto"`` runs on CPU tensors in fp32 and
    fp64) calls LAPACK's ``?potrf`` on a row-major copy as it lies: the copy that adds the
    damping also zeroes the upper triangle, where ``cholesky_ex`` copies to column-major and
    zeroes the other triangle in a further pass (at a ViT's factors of order 128-513 on one
    thread that pass was two thirds of the call).

    Args:
        blocks: ``(B, n, n)`` tensor; only the lower triangle is read.
        damping: non-negative float, or one value per block (sequence or 1-D tensor of length B).
        backend: ``"auto"``, ``"eager"`` or ``"cpu"`` (``"cuda"`` and ``"triton"`` raise
            :class:`~kfac_kernels.BackendUnavailableError`).

    Returns:
        ``(B, n, n)``, lower triangular, in the input dtype (fp16/bf16 are factorised in fp32).
        A block whose factorisation fails (indefinite beyond ``-gamma``, or a NaN pivot) is all
        NaN; another non-finite entry spreads as the factorisation carries it (``[[inf]]``
        gives ``[[inf]]``), alike on both backends; nothing is read on the host.
    """
    op = "block_damped_cholesky"
    if not isinstance(blocks, torch.Tensor) or blocks.dim() != 3 or (
            blocks.shape[-1] != blocks.shape[-2]):
        raise ValueError(f"{op}: blocks must be a (B, n, n) tensor, got "
                         f"{tuple(blocks.shape) if isinstance(blocks, torch.Tensor) else blocks!r}")
    if not blocks.is_floating_point():
        raise TypeError(f"{op}: blocks must be floating point, got {blocks.dtype}")
    if backend in ("cuda", "triton"):
        raise BackendUnavailableError(
            f"{op}: backend={backend!r} is unavailable: the op has no {backend} kernel; 'auto' "
            "and 'eager' run torch.linalg.cholesky_ex (cuSOLVER on CUDA tensors)")
    if backend != "auto":
        resolve_backend(backend, blocks.device, op)  # an unknown name, or 'cpu' where it cannot run
    compute = torch.float32 if blocks.dtype in _LOW else blocks.dtype
    values = _damping_values(damping, blocks.shape[0], op)
    if isinstance(values, torch.Tensor):  # 1-D, on its device: no host round trip
        gamma = values.to(blocks.device, compute)
    else:
        if isinstance(values, float):
            values = [values] * blocks.shape[0]
        gamma = torch.tensor(values, dtype=compute, device=blocks.device)
    if backend == "cpu" or (backend == "auto" and blocks.device.type == "cpu"
                            and native_has_op(op)):
        return torch.ops.kfac_kernels.block_damped_cholesky(blocks.to(compute), gamma).to(
            blocks.dtype)
    chol, info = _damped_cholesky_ex(blocks.to(compute), gamma)
    return chol.masked_fill_((info != 0)[:, None, None], math.nan).to(blocks.dtype)


def _register_fake() -> None:
    """Shape/dtype propagation and validation for torch.compile and FakeTensor, registered
    whether or not the native extension is built (the schema lives in ops/_library.py)."""

    def square_stack(blocks):
        torch._check(blocks.dim() == 3 and blocks.shape[-1] == blocks.shape[-2],
                     lambda: f"{_OP}: blocks must be (B, n, n), got {tuple(blocks.shape)}")

    @torch.library.register_fake("kfac_kernels::block_eigh")
    def _(blocks, max_sweeps, tol):
        square_stack(blocks)
        b, n = blocks.shape[0], blocks.shape[-1]
        return (blocks.new_empty((b, n)), blocks.new_empty((b, n, n)),
                blocks.new_empty((b,), dtype=torch.int32))

    @torch.library.register_fake("kfac_kernels::block_damped_inverse")
    def _(blocks, damping, max_sweeps, tol):
        square_stack(blocks)
        b = blocks.shape[0]
        check_same("block_damped_inverse", "damping", damping, (b,), blocks.dtype)
        return blocks.new_empty(blocks.shape), blocks.new_empty((b,), dtype=torch.int32)

    @torch.library.register_fake("kfac_kernels::block_damped_cholesky")
    def _(blocks, damping):
        square_stack(blocks)
        check_same("block_damped_cholesky", "damping", damping, (blocks.shape[0],),
                   blocks.dtype)
        return blocks.new_empty(blocks.shape)


_register_fake()
