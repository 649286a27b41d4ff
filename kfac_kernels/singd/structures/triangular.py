"""The triangular family of Table 1: lower-triangular, hierarchical, rank-k lower-triangular
and upper-triangular Toeplitz (non-zeros stored; products through the transient dense factor)."""
from __future__ import annotations

import torch

from .base import StructuredMatrix


class LowerTriangular(StructuredMatrix):
    """Lower-triangular factor: :math:`\\hat\\Pi(m)` keeps the diagonal and doubles the entries
    below it. Stored packed (``dim (dim + 1) / 2`` entries, row-major lower triangle)."""

    name = "lower-triangular"

    @classmethod
    def _extract(cls, mat, k):
        i, j = torch.tril_indices(mat.shape[0], mat.shape[0], device=mat.device)
        return (mat[i, j].clone(),)

    @classmethod
    def projection_weights(cls, dim, k=None, *, dtype=torch.float64, device=None):
        ones = torch.ones(dim, dim, dtype=dtype, device=device)
        return torch.tril(ones, -1) * 2 + torch.eye(dim, dtype=dtype, device=device)

    def to_dense(self):
        v = self.data[0]
        out = v.new_zeros(self.dim, self.dim)
        i, j = torch.tril_indices(self.dim, self.dim, device=v.device)
        out[i, j] = v
        return out


def _hierarchical_dims(dim: int, k: int) -> tuple[int, int, int]:
    """``(d2, d_diag, d3)``: leading dense block, diagonal middle, trailing dense block, with
    ``k = d2 + d3``; a matrix smaller than ``k`` fills the leading block first."""
    d2 = k - k // 2
    d3 = k // 2
    if dim <= d2:
        return dim, 0, 0
    if dim <= d2 + d3:
        return d2, 0, dim - d2
    return d2, dim - d2 - d3, d3


class Hierarchical(StructuredMatrix):
    """Hierarchical factor of Table 1 (``k = d2 + d3``)::

        [[A11, A12, A13],      A11: d2 x d2, A22: diagonal, A33: d3 x d3
         [0,   A22, 0  ],      projection: [[M11, 2 M12, 2 M13],
         [0,   A32, A33]]                   [0,   Diag(M22), 0],
                                            [0,   2 M32, M33]]

    Stored as the six blocks (``A22`` as its diagonal)."""

    name = "hierarchical"
    takes_block_size = True

    @classmethod
    def _extract(cls, mat, k):
        d2, dd, d3 = _hierarchical_dims(mat.shape[0], k)
        s1, s2 = slice(0, d2), slice(d2, d2 + dd)
        s3 = slice(d2 + dd, d2 + dd + d3)
        return (mat[s1, s1].clone(), mat[s1, s2].clone(), mat[s1, s3].clone(),
                torch.diagonal(mat[s2, s2]).clone(), mat[s3, s2].clone(), mat[s3, s3].clone())

    @classmethod
    def projection_weights(cls, dim, k=None, *, dtype=torch.float64, device=None):
        d2, dd, d3 = _hierarchical_dims(dim, k)
        w = torch.zeros(dim, dim, dtype=dtype, device=device)
        w[:d2, :d2] = 1
        w[:d2, d2:] = 2
        mid = torch.arange(d2, d2 + dd, device=device)
        w[mid, mid] = 1
        w[d2 + dd:, d2:d2 + dd] = 2
        w[d2 + dd:, d2 + dd:] = 1
        return w

    def to_dense(self):
        a11, a12, a13, a22, a32, a33 = self.data
        d2, dd = a11.shape[0], a22.shape[0]
        out = a11.new_zeros(self.dim, self.dim)
        out[:d2, :d2] = a11
        out[:d2, d2:d2 + dd] = a12
        out[:d2, d2 + dd:] = a13
        mid = torch.arange(d2, d2 + dd, device=a11.device)
        out[mid, mid] = a22
        out[d2 + dd:, d2:d2 + dd] = a32
        out[d2 + dd:, d2 + dd:] = a33
        return out


class RankKLowerTriangular(StructuredMatrix):
    """Rank-k lower-triangular factor of Table 1::

        [[A11, A12],    A11: k x k dense, D22: diagonal     projection: [[M11, 2 M12],
         [0,   D22]]                                                     [0, Diag(M22)]]

    Stored as ``A11``, ``A12`` and the diagonal of ``D22``; ``k`` is clipped to ``dim``."""

    name = "rank-k-lower-triangular"
    takes_block_size = True

    @classmethod
    def _extract(cls, mat, k):
        kk = min(k, mat.shape[0])
        return (mat[:kk, :kk].clone(), mat[:kk, kk:].clone(),
                torch.diagonal(mat[kk:, kk:]).clone())

    @classmethod
    def projection_weights(cls, dim, k=None, *, dtype=torch.float64, device=None):
        kk = min(k, dim)
        w = torch.zeros(dim, dim, dtype=dtype, device=device)
        w[:kk, :kk] = 1
        w[:kk, kk:] = 2
        tail = torch.arange(kk, dim, device=device)
        w[tail, tail] = 1
        return w

    def to_dense(self):
        a11, a12, d22 = self.data
        kk = a11.shape[0]
        out = a11.new_zeros(self.dim, self.dim)
        out[:kk, :kk] = a11
        out[:kk, kk:] = a12
        tail = torch.arange(kk, self.dim, device=a11.device)
        out[tail, tail] = d22
        return out


class UpperTriangularToeplitz(StructuredMatrix):
    """Upper-triangular Toeplitz factor ``T[i, j] = a[j - i]`` (``j >= i``): stored as the
    ``dim`` coefficients ``a``. Projection (Table 1): ``a_0 = b_0``, ``a_j = 2 b_j`` with
    ``b_j`` the mean of the ``j``-th superdiagonal of ``m``."""

    name = "upper-triangular-toeplitz"

    @staticmethod
    def _offsets(dim, device):
        idx = torch.arange(dim, device=device)
        return idx[None, :] - idx[:, None]  # j - i

    @classmethod
    def _extract(cls, mat, k):
        return (mat[0].clone(),)

    @classmethod
    def projection_weights(cls, dim, k=None, *, dtype=torch.float64, device=None):
        raise NotImplementedError("the Toeplitz projection averages diagonals; use project()")

    @classmethod
    def project(cls, sym, k=None):
        dim = sym.shape[-1]
        off = cls._offsets(dim, sym.device)
        upper = off >= 0
        sums = torch.zeros(dim, dtype=sym.dtype, device=sym.device).index_add_(
            0, off[upper], sym[upper])
        counts = torch.arange(dim, 0, -1, dtype=sym.dtype, device=sym.device)
        b = sums / counts
        factor = torch.full_like(b, 2.0)
        factor[0] = 1.0
        return cls(dim, (b * factor,), None)

    def to_dense(self):
        a = self.data[0]
        off = self._offsets(self.dim, a.device)
        return torch.where(off >= 0, a[off.clamp_min(0)], a.new_zeros(()))

    def compose(self, other):
        # Products of upper-triangular Toeplitz matrices: truncated causal convolution.
        self._check_same(other)
        # row 0 of T(a) T(b) is a @ T(b), and it determines the product.
        return self._like((self.data[0] @ other.to_dense(),))
