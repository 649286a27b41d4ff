"""kfac-kernels: Kronecker-factored second-order optimizers with fused kernels."""
from . import ops
from ._backend import BackendUnavailableError, available_backends
from .curvature import kronecker_factors
from .graph import graph_rows

from ._version import __version__  # noqa: F401

__all__ = ["BackendUnavailableError", "available_backends", "graph_rows", "kronecker_factors",
           "ops"]

try:  # the optimizer layer
    from .bdkfac import BDKFAC  # noqa: F401
    from .kfac import KFAC  # noqa: F401
    from .optim import PreconditionedOptimizer  # noqa: F401
    from .singd import SINGD  # noqa: F401
    from .twolevel import TwoLevel  # noqa: F401
    __all__ += ["BDKFAC", "KFAC", "PreconditionedOptimizer", "SINGD", "TwoLevel"]
except ImportError as _err:  # pragma: no cover - only while the package is partially installed
    if not any(f"kfac_kernels.{m}" in str(_err)
               for m in ("kfac", "optim", "bdkfac", "twolevel", "singd")):
        raise
