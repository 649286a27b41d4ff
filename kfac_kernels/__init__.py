"""kfac-kernels: Kronecker-factored second-order optimizers with fused kernels."""
from . import ops
from ._backend import BackendUnavailableError, available_backends
from ._version import __version__
from .adaptive import AdaptiveKFAC
from .curvature import kronecker_factors
from .graph import graph_rows
from .kfac import BDKFAC, KFAC
from .optim import PreconditionedOptimizer
from .singd import SINGD
from .twolevel import TwoLevel

__all__ = ["AdaptiveKFAC", "BDKFAC", "BackendUnavailableError", "KFAC", "PreconditionedOptimizer", "SINGD",
           "TwoLevel", "__version__", "available_backends", "graph_rows", "kronecker_factors",
           "ops"]
