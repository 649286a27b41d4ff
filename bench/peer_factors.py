"""The convolution input factor ``A`` as each peer library computes it, for the peer benchmark.

Every function takes the convolution input ``x`` (``N x C x H x W``), the kernel size, stride
and padding of a square ``nn.Conv2d`` without bias, and ``mode`` (``"expand"`` or ``"reduce"``),
and runs the code path the library's K-FAC uses for that factor (its own patch extraction and
its own product). It returns the factor as the library scales it; :data:`SCALE_TO_OURS` says by
what each result is multiplied to equal ``kfac_kernels.ops.patch_covariance`` (``1/(N R)
sum_{n,r} a a^T`` for expand, ``1/N sum_n abar abar^T`` for reduce; ``R`` output positions). A
library without a form has no entry for it in :data:`FORMS`.

The peers are not dependencies of kfac-kernels: install them into a scratch environment (see
``bench/bench_peers.py``). These functions import them lazily, so this module imports without
them. They are also the ``call`` targets of :mod:`bench.memory` (``"bench.peer_factors:<fn>"``).
"""
from __future__ import annotations

import torch
from torch import nn

from kfac_kernels import ops


def ours(x, kernel_size, stride, padding, mode):
    """``kfac_kernels.ops.patch_covariance`` (the backend ``auto`` picks)."""
    return ops.patch_covariance(x, kernel_size, stride, padding, mode=mode)


def curvlinops(x, kernel_size, stride, padding, mode):
    """The steps of ``curvlinops.KFACLinearOperator._hook_accumulate_input_covariance`` for a
    ``Conv2d``: ``extract_patches`` (unfold) or ``extract_averaged_patches`` (einconv index
    patterns), then ``einsum`` of the rows, divided by ``N_data * R`` (expand) or ``N_data``."""
    from curvlinops.kfac_utils import extract_averaged_patches, extract_patches
    from einops import einsum, rearrange, reduce

    n = x.shape[0]
    extract = extract_patches if mode == "expand" else extract_averaged_patches
    p = extract(x, kernel_size, stride, padding, 1, 1)
    if mode == "expand":
        scale = p.shape[1:-1].numel()
        p = rearrange(p, "batch ... d_in -> (batch ...) d_in")
    else:
        scale = 1.0
        p = reduce(p, "batch ... d_in -> batch d_in", "mean")
    return einsum(p, p, "b i,b j -> i j").div_(n * scale)


def _conv(x, kernel_size, stride, padding) -> nn.Conv2d:
    return nn.Conv2d(x.shape[1], x.shape[1], kernel_size, stride, padding, bias=False)


def kfac_pytorch(x, kernel_size, stride, padding, mode):
    """``kfac.layers.modules.Conv2dModuleHelper.get_a_factor`` (gpauloski/kfac-pytorch):
    ``Tensor.unfold`` patches divided by ``R``, then ``a^T a / (N R)`` symmetrised, i.e.
    ``1/(N R^3) sum a a^T``."""
    from kfac.layers.modules import Conv2dModuleHelper

    if mode != "expand":
        raise ValueError("kfac-pytorch has the expand form only")
    return Conv2dModuleHelper(_conv(x, kernel_size, stride, padding)).get_a_factor(x)


def asdl(x, kernel_size, stride, padding, mode):
    """ASDL's ``Conv2d.preprocess_in_data`` (``im2col_2d``) and ``Conv2d.cov_kron_A``
    (``M M^T / R``), times the ``1 / N`` its Fisher applies (``cov_scale``)."""
    from asdl.operations.conv import Conv2d

    if mode != "expand":
        raise ValueError("ASDL has the expand form only")
    conv = _conv(x, kernel_size, stride, padding)
    cols = Conv2d.preprocess_in_data(conv, x, None)
    return Conv2d.cov_kron_A(conv, cols).mul_(1.0 / x.shape[0])


def einconv(x, kernel_size, stride, padding, mode):
    """einconv's tensor-network expressions: ``convNd_kfc`` (expand) and
    ``convNd_kfac_reduce`` (reduce), simplified, contracted with ``torch.einsum``."""
    from einconv.expressions import convNd_kfac_reduce, convNd_kfc

    expr = convNd_kfc if mode == "expand" else convNd_kfac_reduce
    equation, operands, shape = expr.einsum_expression(x, kernel_size, stride=stride,
                                                       padding=padding)
    return torch.einsum(equation, *operands).reshape(shape)[0]


FORMS = {
    "ours": ("expand", "reduce"),
    "curvlinops": ("expand", "reduce"),
    "kfac-pytorch": ("expand",),
    "asdl": ("expand",),
    "einconv": ("expand", "reduce"),
}

FUNCTIONS = {"ours": ours, "curvlinops": curvlinops, "kfac-pytorch": kfac_pytorch,
             "asdl": asdl, "einconv": einconv}

#: library -> function of (mode, N, R) giving the factor that turns its result into ours
SCALE_TO_OURS = {
    "ours": lambda mode, n, r: 1.0,
    "curvlinops": lambda mode, n, r: 1.0,
    # the patches are divided by R before a^T a / (N R): ours / R^2
    "kfac-pytorch": lambda mode, n, r: float(r * r),
    "asdl": lambda mode, n, r: 1.0,
    # expand: sum over n, r divided by N only (einconv's kfc has no 1/R);
    # reduce: 1 / (N R^2) of the sums of patches, i.e. the means: as ours
    "einconv": lambda mode, n, r: 1.0 / r if mode == "expand" else 1.0,
}

#: importable module of each peer and its distribution name (for versions and messages)
PACKAGES = {"curvlinops": ("curvlinops", "curvlinops-for-pytorch"),
            "kfac-pytorch": ("kfac", "kfac-pytorch"),
            "asdl": ("asdl", "asdfghjkl"),
            "einconv": ("einconv", "einconv"),
            "singd": ("singd", "singd")}
