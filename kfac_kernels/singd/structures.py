r"""Structured Kronecker factors of SINGD (seed 002, Table 1 and Fig. 5).

A structure is a subspace of square matrices closed under addition, scaling and matrix
multiplication, so the factor update ``K <- K (I - beta1 m_K)`` stays in it. Each class stores
only the non-zeros of its matrices and provides

* ``project(sym)``: the subspace projection map :math:`\hat\Pi` of Table 1 applied to a dense
  symmetric matrix (entries of a triangular part that stand for two symmetric entries are
  doubled; the Toeplitz map averages diagonals);
* ``from_dense(mat)`` / ``to_dense()``: exact conversion for matrices already in the subspace;
* products with dense matrices from both sides and with the transpose
  (``matmul``: ``S X``, ``rmatmul``: ``X S``, ``t_matmul``: ``S^T X``, ``rmatmul_t``: ``X S^T``);
* ``compose(other)``: ``S other`` in the same structure;
* ``gram()``: :math:`\hat\Pi(S^T S)`, ``congruence(U)``: :math:`\hat\Pi(S^T U S)` for symmetric
  ``U``, ``gram_of_rows(x)``: :math:`\hat\Pi((x S)^T (x S))` without forming ``x^T x``;
* ``trace()``, ``add``, ``scale``, ``add_identity``, ``zeros``/``eye``, ``to(dtype)``.

The dense, diagonal and block-diagonal classes compute every product from their non-zeros. The
triangular family (lower-triangular, rank-k lower-triangular, hierarchical, upper-triangular
Toeplitz) stores only its non-zeros but forms the dense factor transiently inside a product
(``O(d^2)``, no larger than the dense operands those products take).
"""
from __future__ import annotations

import torch

Tensor = torch.Tensor


class StructuredMatrix:
    """Base class: a ``dim x dim`` matrix stored as the tuple ``data`` of its non-zeros.

    ``k`` is the block size of the structures that have one (``None`` otherwise).
    """

    name = "abstract"
    takes_block_size = False

    def __init__(self, dim: int, data: tuple[Tensor, ...], k: int | None = None):
        self.dim = dim
        self.data = tuple(data)
        self.k = k

    # --- construction -----------------------------------------------------------------------
    @classmethod
    def _check_k(cls, k):
        if cls.takes_block_size:
            if isinstance(k, bool) or not isinstance(k, int) or k < 1:
                raise ValueError(f"{cls.name}: block size must be an int >= 1, got {k!r}")
        return k if cls.takes_block_size else None

    @classmethod
    def from_dense(cls, mat: Tensor, k: int | None = None) -> "StructuredMatrix":
        """The structured matrix equal to ``mat`` (entries outside the structure are ignored)."""
        if mat.dim() != 2 or mat.shape[0] != mat.shape[1]:
            raise ValueError(f"{cls.name}.from_dense: expected a square matrix, got shape "
                             f"{tuple(mat.shape)}")
        k = cls._check_k(k)
        return cls(mat.shape[0], cls._extract(mat, k), k)

    @classmethod
    def _extract(cls, mat: Tensor, k: int | None) -> tuple[Tensor, ...]:
        raise NotImplementedError

    @classmethod
    def projection_weights(cls, dim: int, k: int | None = None, *, dtype=torch.float64,
                           device=None) -> Tensor:
        """Dense ``W`` with ``project(m) = from_dense(W * m)`` (0 outside the structure, 2 where
        an entry stands for a symmetric pair, 1 elsewhere)."""
        raise NotImplementedError

    @classmethod
    def project(cls, sym: Tensor, k: int | None = None) -> "StructuredMatrix":
        r""":math:`\hat\Pi(m)` of Table 1 for a dense symmetric ``m``."""
        k = cls._check_k(k)
        w = cls.projection_weights(sym.shape[-1], k, dtype=sym.dtype, device=sym.device)
        return cls.from_dense(sym * w, k)

    @classmethod
    def zeros(cls, dim: int, k: int | None = None, *, dtype=None, device=None):
        return cls.from_dense(torch.zeros(dim, dim, dtype=dtype, device=device), k)

    @classmethod
    def eye(cls, dim: int, k: int | None = None, *, dtype=None, device=None):
        return cls.from_dense(torch.eye(dim, dtype=dtype, device=device), k)

    def _like(self, data) -> "StructuredMatrix":
        return type(self)(self.dim, tuple(data), self.k)

    def to_dense(self) -> Tensor:
        raise NotImplementedError

    # --- elementwise ------------------------------------------------------------------------
    @property
    def dtype(self) -> torch.dtype:
        return self.data[0].dtype

    @property
    def device(self) -> torch.device:
        return self.data[0].device

    def numel(self) -> int:
        """Number of stored entries."""
        return sum(t.numel() for t in self.data)

    def to(self, dtype: torch.dtype) -> "StructuredMatrix":
        if dtype == self.dtype:
            return self
        return self._like(t.to(dtype) for t in self.data)

    def clone(self) -> "StructuredMatrix":
        return self._like(t.clone() for t in self.data)

    def add(self, other: "StructuredMatrix", alpha: float = 1.0) -> "StructuredMatrix":
        """``self + alpha * other`` (same structure)."""
        self._check_same(other)
        return self._like(a + alpha * b for a, b in zip(self.data, other.data))

    def scale(self, alpha: float) -> "StructuredMatrix":
        return self._like(alpha * t for t in self.data)

    def add_identity(self, alpha: float) -> "StructuredMatrix":
        """``self + alpha * I``."""
        return self.add(type(self).eye(self.dim, self.k, dtype=self.dtype, device=self.device),
                        alpha)

    def _check_same(self, other: "StructuredMatrix") -> None:
        if type(other) is not type(self) or other.dim != self.dim or other.k != self.k:
            raise ValueError(f"{self.name}: cannot combine with {other!r}")

    def max_abs(self) -> torch.Tensor:
        """Largest absolute entry (every stored value is an entry of the matrix)."""
        return torch.stack([t.abs().max() if t.numel() else t.new_zeros(()) for t in self.data]).max()

    def all_finite(self) -> bool:
        return all(bool(torch.isfinite(t).all()) for t in self.data)

    # --- products (dense fallbacks; subclasses override with non-zero-only versions) --------
    def matmul(self, x: Tensor) -> Tensor:
        """``S @ x`` for ``x`` of shape ``(..., dim, n)``."""
        return self.to_dense() @ x

    def rmatmul(self, x: Tensor) -> Tensor:
        """``x @ S`` for ``x`` of shape ``(..., n, dim)``."""
        return x @ self.to_dense()

    def t_matmul(self, x: Tensor) -> Tensor:
        """``S^T @ x``."""
        return self.to_dense().mT @ x

    def rmatmul_t(self, x: Tensor) -> Tensor:
        """``x @ S^T``."""
        return x @ self.to_dense().mT

    def compose(self, other: "StructuredMatrix") -> "StructuredMatrix":
        """``S @ other``, in the structure (it is closed under products)."""
        self._check_same(other)
        return type(self).from_dense(self.to_dense() @ other.to_dense(), self.k)

    def gram(self) -> "StructuredMatrix":
        r""":math:`\hat\Pi(S^T S)`."""
        d = self.to_dense()
        return type(self).project(d.mT @ d, self.k)

    def congruence(self, u: Tensor) -> "StructuredMatrix":
        r""":math:`\hat\Pi(S^T U S)` for a dense symmetric ``U``."""
        return type(self).project(self.t_matmul(self.rmatmul(u)), self.k)

    def gram_of_rows(self, x: Tensor) -> "StructuredMatrix":
        r""":math:`\hat\Pi((x S)^T (x S))` for rows ``x`` of shape ``(m, dim)``."""
        y = self.rmatmul(x)
        return type(self).project(y.mT @ y, self.k)

    def trace(self) -> Tensor:
        return torch.diagonal(self.to_dense()).sum()

    def __repr__(self) -> str:
        k = "" if self.k is None else f", k={self.k}"
        return f"{type(self).__name__}(dim={self.dim}{k}, dtype={self.dtype})"


class Dense(StructuredMatrix):
    """Unstructured factor (INGD): :math:`\\hat\\Pi(m) = m`."""

    name = "dense"

    @classmethod
    def _extract(cls, mat, k):
        return (mat.clone(),)

    @classmethod
    def projection_weights(cls, dim, k=None, *, dtype=torch.float64, device=None):
        return torch.ones(dim, dim, dtype=dtype, device=device)

    @classmethod
    def project(cls, sym, k=None):
        return cls(sym.shape[-1], (sym.clone(),), None)

    def to_dense(self):
        return self.data[0]

    def compose(self, other):
        self._check_same(other)
        return self._like((self.data[0] @ other.data[0],))

    def gram(self):
        m = self.data[0]
        return self._like((m.mT @ m,))

    def gram_of_rows(self, x):
        y = x @ self.data[0]
        return self._like((y.mT @ y,))

    def trace(self):
        return torch.diagonal(self.data[0]).sum()


class Diagonal(StructuredMatrix):
    """Diagonal factor: :math:`\\hat\\Pi(m) = \\mathrm{Diag}(m)`."""

    name = "diagonal"

    @classmethod
    def _extract(cls, mat, k):
        return (torch.diagonal(mat).clone(),)

    @classmethod
    def projection_weights(cls, dim, k=None, *, dtype=torch.float64, device=None):
        return torch.eye(dim, dtype=dtype, device=device)

    @classmethod
    def project(cls, sym, k=None):
        return cls(sym.shape[-1], (torch.diagonal(sym).clone(),), None)

    @classmethod
    def eye(cls, dim, k=None, *, dtype=None, device=None):
        return cls(dim, (torch.ones(dim, dtype=dtype, device=device),), None)

    @classmethod
    def zeros(cls, dim, k=None, *, dtype=None, device=None):
        return cls(dim, (torch.zeros(dim, dtype=dtype, device=device),), None)

    def to_dense(self):
        return torch.diag(self.data[0])

    def add_identity(self, alpha):
        return self._like((self.data[0] + alpha,))

    def matmul(self, x):
        return self.data[0][:, None] * x

    t_matmul = matmul

    def rmatmul(self, x):
        return x * self.data[0]

    rmatmul_t = rmatmul

    def compose(self, other):
        self._check_same(other)
        return self._like((self.data[0] * other.data[0],))

    def gram(self):
        return self._like((self.data[0] ** 2,))

    def congruence(self, u):
        return self._like((torch.diagonal(u, dim1=-2, dim2=-1) * self.data[0] ** 2,))

    def gram_of_rows(self, x):
        return self._like(((x * x).sum(-2) * self.data[0] ** 2,))

    def trace(self):
        return self.data[0].sum()


class BlockDiagonal(StructuredMatrix):
    """Block-diagonal factor with ``k x k`` blocks and a smaller last block of ``dim % k``:
    :math:`\\hat\\Pi(m)` keeps the diagonal blocks. Stored as ``(q, k, k)`` blocks plus the
    ``(r, r)`` remainder block."""

    name = "block-diagonal"
    takes_block_size = True

    @staticmethod
    def _split(dim, k):
        q = dim // k
        return q, dim - q * k

    @classmethod
    def _extract(cls, mat, k):
        dim = mat.shape[0]
        q, r = cls._split(dim, k)
        full = mat[:q * k, :q * k].reshape(q, k, q, k).diagonal(dim1=0, dim2=2)
        return full.permute(2, 0, 1).clone(), mat[q * k:, q * k:].clone()

    @classmethod
    def projection_weights(cls, dim, k=None, *, dtype=torch.float64, device=None):
        idx = torch.arange(dim, device=device) // k
        return (idx[:, None] == idx[None, :]).to(dtype)

    @classmethod
    def project(cls, sym, k=None):
        k = cls._check_k(k)
        return cls(sym.shape[-1], cls._extract(sym, k), k)

    def to_dense(self):
        blocks, last = self.data
        return torch.block_diag(*blocks.unbind(0), last)

    def _apply(self, x, transpose):
        # x: (..., dim, n); block i acts on rows i*k:(i+1)*k
        blocks, last = self.data
        q, k = blocks.shape[0], self.k
        if transpose:
            blocks, last = blocks.mT, last.mT
        head = x[..., :q * k, :]
        head = (blocks @ head.reshape(*x.shape[:-2], q, k, x.shape[-1])).reshape(
            *x.shape[:-2], q * k, x.shape[-1])
        tail = last @ x[..., q * k:, :]
        return torch.cat([head, tail], dim=-2)

    def matmul(self, x):
        return self._apply(x, False)

    def t_matmul(self, x):
        return self._apply(x, True)

    def rmatmul(self, x):
        return self._apply(x.mT, True).mT

    def rmatmul_t(self, x):
        return self._apply(x.mT, False).mT

    def compose(self, other):
        self._check_same(other)
        return self._like((self.data[0] @ other.data[0], self.data[1] @ other.data[1]))

    def gram(self):
        b, last = self.data
        return self._like((b.mT @ b, last.mT @ last))

    def congruence(self, u):
        b, last = self.data
        ub, ul = self._extract(u, self.k)
        return self._like((b.mT @ ub @ b, last.mT @ ul @ last))

    def gram_of_rows(self, x):
        b, last = self.data
        q, k = b.shape[0], self.k
        y = (x[:, :q * k].reshape(-1, q, k).transpose(0, 1) @ b)  # (q, m, k)
        yl = x[:, q * k:] @ last
        return self._like((y.mT @ y, yl.mT @ yl))

    def trace(self):
        b, last = self.data
        return torch.diagonal(b, dim1=-2, dim2=-1).sum() + torch.diagonal(last).sum()


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
        d2, dd, d3 = a11.shape[0], a22.shape[0], a33.shape[0]
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


STRUCTURES: dict[str, type[StructuredMatrix]] = {
    cls.name: cls for cls in (Dense, Diagonal, BlockDiagonal, Hierarchical, LowerTriangular,
                              RankKLowerTriangular, UpperTriangularToeplitz)
}


def structure_class(name: str, who: str = "SINGD") -> type[StructuredMatrix]:
    """The class of a structure name, with an error listing the known names."""
    if name not in STRUCTURES:
        raise ValueError(f"{who}: unknown structure {name!r}; expected one of "
                         f"{', '.join(repr(n) for n in STRUCTURES)}")
    return STRUCTURES[name]


__all__ = ["STRUCTURES", "StructuredMatrix", "Dense", "Diagonal", "BlockDiagonal",
           "Hierarchical", "LowerTriangular", "RankKLowerTriangular",
           "UpperTriangularToeplitz", "structure_class"]
