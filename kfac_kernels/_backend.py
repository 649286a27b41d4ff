"""Backend selection shared by every op.

Every op takes ``backend`` in ``{"auto", "eager", "triton", "cuda", "cpu"}``. ``"auto"`` picks,
for CUDA tensors: the CUDA extension when built, else Triton, else eager; for CPU tensors: the C++
CPU kernel when built, else eager. Asking for a backend that cannot run raises a
:class:`BackendUnavailableError` that says why and how to get it; nothing falls back silently.
"""
from __future__ import annotations

import importlib
import os
from functools import lru_cache

import torch

BACKENDS = ("auto", "eager", "triton", "cuda", "cpu")


class BackendUnavailableError(RuntimeError):
    """A backend was requested that is not available on this machine or for these tensors."""


@lru_cache(maxsize=None)
def _load_native():
    """Import ``kfac_kernels._C`` once. Returns the module or the import error (never raises)."""
    if os.environ.get("KFAC_KERNELS_DISABLE_NATIVE", "0") == "1":
        return ImportError("KFAC_KERNELS_DISABLE_NATIVE=1 is set")
    try:
        return importlib.import_module("kfac_kernels._C")
    except ImportError as err:  # never hard-fail: the eager paths work without _C
        return err


def native_module():
    """The compiled extension module, or ``None`` when it is not built."""
    mod = _load_native()
    return None if isinstance(mod, BaseException) else mod


# The availability checks are constants of the process: telling torch.compile so keeps Dynamo
# from tracing into the lazy import of _C when an op is compiled with backend="auto"/"cpu".
@torch.compiler.assume_constant_result
def has_native_cpu() -> bool:
    return native_module() is not None


@torch.compiler.assume_constant_result
def has_native_cuda() -> bool:
    mod = native_module()
    return mod is not None and bool(mod.built_with_cuda())


@torch.compiler.assume_constant_result
@lru_cache(maxsize=None)
def has_triton() -> bool:
    try:
        importlib.import_module("triton")
    except ImportError:
        return False
    return True


@torch.compiler.assume_constant_result
def triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# Filled eagerly (each op module asks at import), so torch.compile sees a plain dict lookup.
_NATIVE_OPS: dict[str, bool] = {}


def native_has_op(op: str) -> bool:
    """Whether the built extension registers ``torch.ops.kfac_kernels.<op>`` (an extension built
    from older sources may lack a newer op)."""
    if op in _NATIVE_OPS:
        return _NATIVE_OPS[op]
    found = has_native_cpu()
    if found:
        # The schemas (and fake kernels) exist without the extension: ask the dispatcher
        # whether loading it registered a real kernel.
        from .ops._library import has_kernel
        found = has_kernel(op, "CPU")
    _NATIVE_OPS[op] = found
    return found


def _native_hint() -> str:
    mod = _load_native()
    why = f" ({mod})" if isinstance(mod, BaseException) else ""
    return (
        f"the compiled extension kfac_kernels._C is not available{why}; build it with "
        "`pip install --no-build-isolation -e .` (see README, 'Building')"
    )


def available_backends(device: torch.device | str | None = None) -> list[str]:
    """The concrete backends that can run on ``device`` (default: CPU) on this machine."""
    device = torch.device(device if device is not None else "cpu")
    out = ["eager"]
    if device.type == "cuda":
        if has_native_cuda():
            out.append("cuda")
        if has_triton():
            out.append("triton")
    elif device.type == "cpu":
        if has_native_cpu():
            out.append("cpu")
        if has_triton() and triton_interpret():
            out.append("triton")
    return out


def resolve_backend(backend: str, device: torch.device, op: str,
                    prefer: tuple[str, ...] | None = None) -> str:
    """Turn ``backend`` into the concrete backend that runs ``op`` on ``device`` or raise.

    ``prefer``: for ``"auto"`` on CUDA tensors, the backends in the order measured fastest for
    this call (``ops/_cuda_auto.py``); the first one present runs, eager when none is."""
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"{op}: backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        if device.type == "cuda":
            for candidate in prefer or ("cuda", "triton", "eager"):
                if candidate == "cuda" and has_native_cuda() and native_has_op(op):
                    return "cuda"
                if candidate == "triton" and has_triton():
                    return "triton"
                if candidate == "eager":
                    return "eager"
            return "eager"
        if device.type == "cpu" and has_native_cpu() and native_has_op(op):
            return "cpu"
        return "eager"
    if backend == "eager":
        return backend
    if backend == "cpu":
        if device.type != "cpu":
            raise BackendUnavailableError(
                f"{op}: backend='cpu' needs CPU tensors, got tensors on {device}")
        if not has_native_cpu():
            raise BackendUnavailableError(f"{op}: backend='cpu' is unavailable: {_native_hint()}")
        if not native_has_op(op):
            raise BackendUnavailableError(
                f"{op}: backend='cpu' is unavailable: the built kfac_kernels._C predates this op; "
                "rebuild it with `pip install --no-build-isolation -e .`")
        return backend
    if backend == "cuda":
        if device.type != "cuda":
            raise BackendUnavailableError(
                f"{op}: backend='cuda' needs CUDA tensors, got tensors on {device}")
        if not has_native_cuda():
            if has_native_cpu():
                hint = ("kfac_kernels._C was built without CUDA; rebuild with a CUDA-enabled "
                        "torch and nvcc on PATH (or KFAC_KERNELS_FORCE_CUDA=1)")
            else:
                hint = _native_hint()
            raise BackendUnavailableError(f"{op}: backend='cuda' is unavailable: {hint}")
        if not native_has_op(op):
            raise BackendUnavailableError(
                f"{op}: backend='cuda' is unavailable: the built kfac_kernels._C predates this op; "
                "rebuild it with `pip install --no-build-isolation -e .`")
        return backend
    # triton
    if not has_triton():
        raise BackendUnavailableError(
            f"{op}: backend='triton' is unavailable: the triton package is not installed "
            "(`pip install triton`)")
    if device.type == "cpu" and not triton_interpret():
        raise BackendUnavailableError(
            f"{op}: backend='triton' on CPU tensors needs the Triton interpreter: set "
            "TRITON_INTERPRET=1 before importing triton")
    if device.type not in ("cpu", "cuda"):
        raise BackendUnavailableError(f"{op}: backend='triton' does not support device {device}")
    return backend
