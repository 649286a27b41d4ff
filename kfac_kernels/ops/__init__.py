"""Kernel-backed operations. Each module holds the eager reference, the dispatch and the formula."""
from .._backend import native_has_op as _native_has_op
from . import _library  # the op schemas, before any fake kernel registers
from .block_eigh import block_damped_cholesky, block_damped_inverse, block_eigh
from .gradient_covariance import gradient_covariance
from .patch_covariance import conv_geometry, padded_input, patch_covariance
from .patch_statistics import (patch_covariance_blocks, patch_covariance_diagonal, patch_mean,
                               patch_rows, patch_statistics_eager)
from .singd_block_factor_update import (singd_block_factor_update,
                                        singd_block_factor_update_eager)
from .singd_block_step import singd_block_step, singd_block_step_eager
from .singd_diagonal_factor_update import (singd_diagonal_factor_update,
                                           singd_diagonal_factor_update_eager)
from .singd_diagonal_step import (singd_diagonal_step, singd_diagonal_step_eager,
                                  singd_diagonal_step_foreach,
                                  singd_diagonal_step_foreach_eager)
from .symmetric_factor_update import symmetric_factor_update, symmetric_factor_update_eager

__all__ = ["block_damped_cholesky", "block_damped_inverse", "block_eigh", "conv_geometry", "gradient_covariance", "padded_input",
           "patch_covariance", "patch_covariance_blocks", "patch_covariance_diagonal", "patch_mean",
           "patch_rows", "patch_statistics_eager",
           "singd_block_factor_update", "singd_block_factor_update_eager",
           "singd_block_step", "singd_block_step_eager",
           "singd_diagonal_factor_update", "singd_diagonal_factor_update_eager",
           "singd_diagonal_step", "singd_diagonal_step_eager", "singd_diagonal_step_foreach",
           "singd_diagonal_step_foreach_eager", "symmetric_factor_update",
           "symmetric_factor_update_eager"]

# Ask once per op, at import, whether the extension has its kernel: torch.compile then reads a
# filled cache instead of tracing into the extension's import and the dispatcher's tables.
for _op in _library.SCHEMAS:
    _native_has_op(_op)
del _op
