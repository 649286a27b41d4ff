"""kfac-kernels: Kronecker-factored second-order optimizers with fused kernels."""
from . import ops
from ._backend import BackendUnavailableError, available_backends
from .curvature import kronecker_factors

__version__ = "0.1.0"

__all__ = ["BackendUnavailableError", "available_backends", "kronecker_factors", "ops"]

try:  # the optimizer layer
    from .kfac import KFAC  # noqa: F401
    from .optim import PreconditionedOptimizer  # noqa: F401
    from .singd import SINGD  # noqa: F401
    __all__ += ["KFAC", "PreconditionedOptimizer", "SINGD"]
except ImportError as _err:  # pragma: no cover - only while the package is partially installed
    if not any(m in str(_err) for m in ("kfac_kernels.kfac", "kfac_kernels.optim",
                                        "kfac_kernels.singd")):
        raise
