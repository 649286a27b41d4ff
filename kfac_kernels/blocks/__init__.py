"""Curvature blocks: one per layer and factor structure (see :mod:`.base`).

:data:`BLOCKS` maps the ``structure`` argument of :class:`kfac_kernels.KFAC` to the block class
that keeps that structure. Adding a structure means writing its block class (its
:meth:`~kfac_kernels.blocks.base.CurvatureBlock.layouts`, and whatever of the factor update,
decomposition and preconditioning differs from :class:`KroneckerBlock`) and one entry here.
"""
from __future__ import annotations

from .base import CurvatureBlock
from .decompositions import Job, run_jobs
from .kronecker import BlockDiagonalBlock, DiagonalBlock, KroneckerBlock, partition_sizes

BLOCKS: dict[str, type[KroneckerBlock]] = {
    KroneckerBlock.structure: KroneckerBlock,
    BlockDiagonalBlock.structure: BlockDiagonalBlock,
    DiagonalBlock.structure: DiagonalBlock,
}

__all__ = ["BLOCKS", "BlockDiagonalBlock", "CurvatureBlock", "DiagonalBlock", "Job",
           "KroneckerBlock", "partition_sizes", "run_jobs"]
