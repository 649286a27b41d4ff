"""Seeded differential fuzzing of every op of the registry (tests/op_registry.py) on every kernel
backend present on CPU tensors (``cpu``; ``triton`` under ``TRITON_INTERPRET=1``) against the
eager reference, over random shapes, strides, dtypes, scales (1e-30 .. 1e30), one outlier entry
and NaN / inf placements.

The rule of the project: a backend errs against eager in float64 at most twice as much as eager
in the same dtype, and a non-finite input is confined as eager confines it (the same entries
non-finite, every other entry within the rule). The errors are measured

* normwise over the entries finite in both (``||out - ref|| / ||ref||``), for every output;
* entrywise for the factor accumulations (``symmetric_factor_update``, ``patch_covariance``,
  ``gradient_covariance``: ``decay F + alpha sum x x^T`` with positive ``decay`` and ``alpha``),
  relative to the same op on the magnitudes of the inputs: the sum of the magnitudes of each
  entry's terms, its own rounding scale, so that a small entry next to a huge outlier's
  entries still counts.

Where LAPACK in float64 is not the truth itself (a graded block, or an indefinite one with a
1e8 pair: ``torch.linalg.eigh`` in float64 erred by 3e-9 and 1.5e-8 against 50 digits, where
the Jacobi kernel erred by 5e-16), a decomposition case that breaks the rule against it is
judged again against mpmath's eigendecomposition at 40 digits (``_exact_decomposition``):
the rule then holds against that reference, for eager and the backend alike.

Both get a floor (``FLOOR_ULPS`` roundings of the dtype, plus the dtype's smallest normal number
relative to the norm): eager can be exact by chance, and below the normal range every summation
order errs by about that much. A case where eager in float64 raises is not compared (there is
nothing to confine). ``CASES`` cases per (op, backend); the case count and the time per op are in
the test's output (``-s``).

    TRITON_INTERPRET=1 python -m pytest -q --run-slow tests/test_fuzz.py
"""
from __future__ import annotations

import math
import time
import zlib

import mpmath
import pytest
import torch

from kfac_kernels import testing
from op_registry import OPS  # tests/ is on sys.path under pytest

pytestmark = pytest.mark.usefixtures("single_thread")

#: cases per (op, backend), and the largest ``size`` of a sample: the interpreted Triton kernels
#: are ~50x slower than the C++ ones, and its Jacobi sweeps slower still
CASES = {"cpu": 500, "triton": 24}
TRITON_SLOW = {"block_eigh": (4, 0.3), "block_damped_inverse": (6, 0.3),
               "singd_block_step": (10, 0.5)}
FLOOR_ULPS = 8
FLOOR_ULPS_F64 = 64
GRAM_OPS = ("symmetric_factor_update", "patch_covariance", "gradient_covariance")
LOW = (torch.float16, torch.bfloat16)
KINDS = ("plain", "outlier", "nan", "inf", "-inf")


def _draw(gen, n: int) -> int:
    return int(torch.randint(0, n, (), generator=gen))


def _symmetric(t: torch.Tensor) -> bool:
    """Symmetric up to the rounding of ``x @ x.T`` (an outlier then goes in both triangles)."""
    return t.dim() >= 2 and t.shape[-1] == t.shape[-2] and t.shape[-1] > 1 and bool(
        torch.allclose(t, t.mT, rtol=4 * torch.finfo(t.dtype).eps, atol=0.0))


def _perturb(sample: dict, gen, kind: str, exponent: int) -> tuple[dict, dict, str]:
    """Scale one floating input by ``10 ** exponent`` and, for ``kind != "plain"``, set one
    entry of one input (both mirror entries of a symmetric input) to an outlier (1e4 .. 1e8
    times its input's scale) or a non-finite value. Returns the sample, the same sample with
    that entry 0 instead (the entries the value does not reach are those of this one) and a
    description. The values are rounded to the dtype once, here: every backend and the
    float64 reference see the same numbers."""
    names = [k for k, v in sample.items() if isinstance(v, torch.Tensor) and v.is_floating_point()
             and v.numel() > 0]
    wide = {k: sample[k].to(torch.float64) for k in names}
    name = names[_draw(gen, len(names))]
    wide[name] = wide[name] * 10.0 ** exponent
    clean = dict(wide)
    where = f"{name} scaled by 1e{exponent}"
    if kind != "plain":
        target = names[_draw(gen, len(names))]
        t = wide[target].clone()
        idx = [int(i) for i in torch.unravel_index(torch.tensor(_draw(gen, t.numel())), t.shape)]
        value = {"outlier": 10.0 ** (4 + _draw(gen, 5)) * (10.0 ** exponent if target == name
                                                            else 1.0),
                 "nan": math.nan, "inf": math.inf, "-inf": -math.inf}[kind]
        mirror = _symmetric(sample[target])
        t[tuple(idx)] = value
        if mirror:
            t[(*idx[:-2], idx[-1], idx[-2])] = value
        wide[target] = t
        zeroed = t.clone()
        zeroed[tuple(idx)] = 0.0
        if mirror:
            zeroed[(*idx[:-2], idx[-1], idx[-2])] = 0.0
        clean[target] = zeroed
        where += f", {target}{tuple(idx)}{' and mirror' if mirror else ''} = {value:g}"
    cast = lambda d: {**sample, **{k: d[k].to(sample[k].dtype) for k in names}}  # noqa: E731
    return cast(wide), cast(clean), where


def _strided(sample: dict, gen) -> dict:
    """Some read-only inputs as non-contiguous views with the same values."""
    out = dict(sample)
    for k, v in sample.items():
        if isinstance(v, torch.Tensor) and v.dim() >= 1 and v.numel() > 1 and _draw(gen, 3) == 0:
            out[k] = testing.non_contiguous(v)
    return out


def _to64(sample: dict, magnitudes: bool = False) -> dict:
    """The sample in float64 (exactly its values), or their magnitudes."""
    out = {}
    for k, v in sample.items():
        if isinstance(v, torch.Tensor) and v.is_floating_point():
            v = v.to(torch.float64)
            v = v.abs() if magnitudes else v
        out[k] = v
    return out


def _floor(dtype, ref: torch.Tensor, what: str) -> float:
    """The least error the rule allows (see the module docstring). In float64 eager is the
    reference itself (its error is 0): a backend then gets the project's float64 parity
    tolerance normwise (``testing.RTOL``; eigensolvers and inverses amplify roundings by the
    condition number), and ``FLOOR_ULPS_F64`` roundings entrywise (sums of up to a few
    thousand terms in another order)."""
    info = torch.finfo(dtype)
    if dtype == torch.float64:
        base = testing.RTOL[dtype] if what == "normwise" else FLOOR_ULPS_F64 * info.eps
    else:
        base = FLOOR_ULPS * info.eps
    norm = float(ref.norm()) if ref.numel() else 0.0
    return base + (info.tiny * math.sqrt(max(ref.numel(), 1)) / norm if norm > 0 else 0.0)


def _normwise(out: torch.Tensor, ref: torch.Tensor, mask: torch.Tensor) -> float:
    diff = (out.to(torch.float64) - ref)[mask]
    norm = float(ref[mask].norm())
    return float(diff.norm()) / norm if norm > 0 else float(diff.norm() > 0)


def _entrywise(out: torch.Tensor, ref: torch.Tensor, scale: torch.Tensor,
               mask: torch.Tensor) -> float:
    keep = mask & torch.isfinite(scale) & (scale > 0)
    err = (out.to(torch.float64) - ref).abs()[keep] / scale[keep]
    return float(err.max()) if err.numel() else 0.0


def _within_rule(info, dtype, got, eager, ref, scales, masks) -> str | None:
    for k, (g, e, r, scale, mask) in enumerate(zip(got, eager, ref, scales, masks)):
        measures = [("normwise", lambda o: _normwise(o, r, mask))]
        if info.name in GRAM_OPS:
            measures.append(("entrywise", lambda o: _entrywise(o, r, scale, mask)))
        for what, measure in measures:
            err_g, err_e = measure(g), measure(e)
            if not err_g <= 2 * max(err_e, _floor(dtype, r[mask], what)):
                return f"output {k}: {what} error {err_g:.3g}, eager {err_e:.3g}"
    return None


def _run_all(info, backend, sample):
    """The backend's, eager's (same dtype) and the float64 definition's outputs, and the
    rounding scales (see the module docstring); None where eager refuses float64."""
    try:
        ref = info.run(_to64(sample), "eager")
    except (RuntimeError, ValueError):
        return None  # eager refuses the input in float64: nothing to compare
    scales = info.run(_to64(sample, magnitudes=True), "eager") if info.name in GRAM_OPS else ref
    return info.run(sample, backend), info.run(sample, "eager"), ref, scales


def check_case(info, backend: str, sample: dict, clean: dict, dtype) -> str | None:
    """None when the backend keeps the rule on this sample, else what it broke.

    Non-finite entries: the backend's must be non-finite where eager's and the float64
    definition's are, and finite where eager's are (where eager alone overflows, either is
    right). An entry the backend keeps finite where eager's is not (eager multiplies a NaN by
    the structural zeros of a block-diagonal matrix, say) must then be the entry of ``clean``,
    the sample without the non-finite value: the value did not reach it."""
    runs = _run_all(info, backend, sample)
    if runs is None:
        return None
    got, eager, ref, scales = runs
    masks, kept = [], []
    for k, (g, e, r) in enumerate(zip(got, eager, ref)):
        if g.shape != e.shape or g.dtype != e.dtype:
            return f"output {k}: {tuple(g.shape)} {g.dtype}, eager {tuple(e.shape)} {e.dtype}"
        fin_g, fin_e, fin_r = torch.isfinite(g), torch.isfinite(e), torch.isfinite(r)
        spread = fin_e & ~fin_g
        if spread.any():
            return (f"output {k}: {int(spread.sum())} of {g.numel()} entries non-finite where "
                    "eager's are finite")
        masks.append(fin_g & fin_e & fin_r)
        kept.append(~fin_e & ~fin_r & fin_g)
    what = _within_rule(info, dtype, got, eager, ref, scales, masks)
    if what is not None or not any(m.any() for m in kept) or clean is sample:
        return what
    runs = _run_all(info, backend, clean)
    if runs is None:
        return None
    _, eager_c, ref_c, scales_c = runs
    if not all(torch.isfinite(e[m]).all() for e, m in zip(eager_c, kept)):
        return "entries finite on the backend alone, not finite without the non-finite input"
    what = _within_rule(info, dtype, got, eager_c, ref_c, scales_c, kept)
    return None if what is None else f"{what} (entries finite on the backend alone)"


def _exact_decomposition(info, sample: dict) -> list[torch.Tensor] | None:
    """The outputs of ``block_eigh`` / ``block_damped_inverse`` (as the registry's run returns
    them) from mpmath's symmetric eigendecomposition at 40 digits, in float64; None for other
    ops and for non-finite blocks."""
    if info.name not in ("block_eigh", "block_damped_inverse"):
        return None
    blocks = sample["blocks"].to(torch.float64)
    if not torch.isfinite(blocks).all():
        return None
    mpmath.mp.dps = 40
    vals, recon, inv = [], [], []
    for b, a in enumerate(blocks):
        n = a.shape[-1]
        lam, q = mpmath.eigsy(mpmath.matrix(a.tolist())) if n else ([], None)
        as_tensor = lambda m: torch.tensor([[float(m[i, j]) for j in range(n)]  # noqa: E731
                                            for i in range(n)], dtype=torch.float64)
        vals.append(torch.tensor(sorted(float(x) for x in lam), dtype=torch.float64))
        recon.append(a.clone())
        if info.name == "block_damped_inverse" and n:
            gamma = sample["damping"][b]
            inv.append(as_tensor(q * mpmath.diag([1 / (max(x, 0) + gamma) for x in lam]) * q.T))
        else:
            inv.append(a.new_zeros(n, n))
    if info.name == "block_eigh":
        return [torch.stack(vals), torch.stack(recon)]
    return [torch.stack(inv)]


def _judged_exactly(info, backend: str, sample: dict, dtype) -> str | None:
    """``check_case``'s rule against the 40-digit reference (finite samples only)."""
    ref = _exact_decomposition(info, sample)
    got, eager = info.run(sample, backend), info.run(sample, "eager")
    masks = [torch.isfinite(g) & torch.isfinite(e) for g, e in zip(got, eager)]
    what = _within_rule(info, dtype, got, eager, ref, ref, masks)
    return None if what is None else f"{what} (against 40 digits)"


def _params():
    for info in OPS:
        for backend in testing.backends_for("cpu"):
            if backend != "eager" and info.has(backend):
                yield pytest.param(info, backend, id=f"{info.name}-{backend}")


@pytest.mark.parametrize("info,backend", list(_params()))
def test_fuzz_against_eager(info, backend):
    gen = torch.Generator().manual_seed(zlib.crc32(f"{info.name}-{backend}".encode()))
    dtypes = [d for d in (*info.dtypes, *LOW)
              if not (backend in info.float32_only and d == torch.float64)]
    cases, max_size = CASES[backend], 1.0
    if backend == "triton" and info.name in TRITON_SLOW:
        cases, max_size = TRITON_SLOW[info.name]
    failures, compared, start = [], 0, time.perf_counter()
    for case in range(cases):
        dtype = dtypes[_draw(gen, len(dtypes))]
        kind = KINDS[_draw(gen, len(KINDS))] if _draw(gen, 2) else "plain"
        exponent = 10 * (_draw(gen, 7) - 3) if _draw(gen, 2) else 0
        try:
            sample = info.make(gen, dtype, torch.device("cpu"), size=max_size * float(
                torch.rand((), generator=gen)))
            info.run(sample, "eager")
        except (TypeError, ValueError):
            continue  # the op does not take this dtype (its argument checks say so)
        sample, clean, where = _perturb(sample, gen, kind, exponent)
        if kind in ("plain", "outlier"):
            clean = sample
        try:
            what = check_case(info, backend, _strided(sample, gen), clean, dtype)
        except ValueError as err:
            if "contiguous" not in str(err):
                raise
            # a kernel takes its in-place arguments contiguous only, and says so
            what = check_case(info, backend, sample, clean, dtype)
        compared += 1
        if what is not None and _exact_decomposition(info, sample) is not None:
            what = _judged_exactly(info, backend, sample, dtype)
        if what is not None:
            failures.append(f"case {case} ({dtype}, {where}): {what}")
    print(f"\n{info.name} {backend}: {compared} cases compared in "
          f"{time.perf_counter() - start:.1f} s")
    assert compared > 0
    assert not failures, "\n".join(failures[:20]) + f"\n({len(failures)} of {compared} cases)"
