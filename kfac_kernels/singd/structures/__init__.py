r"""Structured Kronecker factors of SINGD (Lin et al. (2024), Table 1 and Fig. 5).

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

from .base import StructuredMatrix
from .simple import BlockDiagonal, Dense, Diagonal
from .triangular import (Hierarchical, LowerTriangular, RankKLowerTriangular,
                         UpperTriangularToeplitz)

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
