"""Dense, diagonal and block-diagonal factors: every product from the non-zeros."""
from __future__ import annotations

import torch

from ...ops._symmetric_matmul import symmetric_matmul
from .base import StructuredMatrix


class Dense(StructuredMatrix):
    """Unstructured factor (INGD): :math:`\\hat\\Pi(m) = m`."""

    name = "dense"
    projection_suffices = True

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

    def add_identity(self, alpha):
        m = self.data[0].clone()
        m.diagonal().add_(alpha)
        return self._like((m,))

    def compose(self, other):
        self._check_same(other)
        return self._like((self.data[0] @ other.data[0],))

    # The symmetric results below are computed by symmetric_matmul: the upper block triangle
    # only (about 0.6 of a full product's flops), mirrored, so they are exactly symmetric.
    def gram(self):
        m = self.data[0]
        return self._like((symmetric_matmul(m.mT, m),))

    def congruence(self, u):
        k = self.data[0]
        return self._like((symmetric_matmul(k.mT, u @ k),))

    def gram_of_rows(self, x):
        y = x @ self.data[0]
        return self._like((symmetric_matmul(y.mT, y),))

    def congruence_of_projection(self, p):
        self._check_same(p)
        return self.congruence(p.data[0])

    def trace(self):
        return torch.diagonal(self.data[0]).sum()


class Diagonal(StructuredMatrix):
    """Diagonal factor: :math:`\\hat\\Pi(m) = \\mathrm{Diag}(m)`."""

    name = "diagonal"
    projection_suffices = True

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

    def congruence_of_projection(self, p):
        self._check_same(p)
        return self._like((p.data[0] * self.data[0] ** 2,))

    def trace(self):
        return self.data[0].sum()


class BlockDiagonal(StructuredMatrix):
    """Block-diagonal factor with ``k x k`` blocks and a smaller last block of ``dim % k``:
    :math:`\\hat\\Pi(m)` keeps the diagonal blocks. Stored as ``(q, k, k)`` blocks plus the
    ``(r, r)`` remainder block."""

    name = "block-diagonal"
    takes_block_size = True
    projection_suffices = True

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
        y = (x[:, :q * k].reshape(x.shape[0], q, k).transpose(0, 1) @ b)  # (q, m, k)
        yl = x[:, q * k:] @ last
        return self._like((y.mT @ y, yl.mT @ yl))

    def congruence_of_projection(self, p):
        self._check_same(p)
        b, last = self.data
        return self._like((b.mT @ p.data[0] @ b, last.mT @ p.data[1] @ last))

    def trace(self):
        b, last = self.data
        return torch.diagonal(b, dim1=-2, dim2=-1).sum() + torch.diagonal(last).sum()
