"""The base class of SINGD's structured factors (see the package docstring)."""
from __future__ import annotations

import torch

from ..._flags import largest_magnitude
from ...ops._symmetric_matmul import symmetric_matmul

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
        if isinstance(alpha, torch.Tensor):  # a trace: no Python number for torch.add
            return self._like(a + alpha * b for a, b in zip(self.data, other.data))
        return self._like(torch.add(a, b, alpha=alpha) for a, b in zip(self.data, other.data))

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
        return torch.stack([largest_magnitude(t) for t in self.data]).max()

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

    # The symmetric products are computed by symmetric_matmul (upper block triangle, mirrored).
    def gram(self) -> "StructuredMatrix":
        r""":math:`\hat\Pi(S^T S)`."""
        d = self.to_dense()
        return type(self).project(symmetric_matmul(d.mT, d), self.k)

    def congruence(self, u: Tensor) -> "StructuredMatrix":
        r""":math:`\hat\Pi(S^T U S)` for a dense symmetric ``U``."""
        return type(self).project(symmetric_matmul(self.to_dense().mT, self.rmatmul(u)), self.k)

    def gram_of_rows(self, x: Tensor) -> "StructuredMatrix":
        r""":math:`\hat\Pi((x S)^T (x S))` for rows ``x`` of shape ``(m, dim)``."""
        y = self.rmatmul(x)
        return type(self).project(symmetric_matmul(y.mT, y), self.k)

    # --- statistics kept in the structure ------------------------------------------------------
    #: ``True`` where :math:`\hat\Pi(S^T U S)` depends on ``U`` only through
    #: :math:`\hat\Pi(U)` (diagonal, block-diagonal, dense), so only :math:`\hat\Pi(U)` has to
    #: be accumulated from the layer's rows.
    projection_suffices = False

    def congruence_of_projection(self, p: "StructuredMatrix") -> "StructuredMatrix":
        r""":math:`\hat\Pi(S^T U S)` from :math:`p = \hat\Pi(U)` alone (only where
        ``projection_suffices``)."""
        if not self.projection_suffices:
            raise NotImplementedError(f"{self.name}: Pi(S^T U S) needs all of U, not Pi(U)")
        self._check_same(p)
        return self.congruence(p.to_dense())

    def trace(self) -> Tensor:
        return torch.diagonal(self.to_dense()).sum()

    def __repr__(self) -> str:
        k = "" if self.k is None else f", k={self.k}"
        return f"{type(self).__name__}(dim={self.dim}{k}, dtype={self.dtype})"
