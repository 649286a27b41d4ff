"""SINGD, INGD and IKFAC (seed 002): structured inverse-free natural-gradient optimizers."""
from .structures import STRUCTURES, StructuredMatrix, structure_class

__all__ = ["STRUCTURES", "StructuredMatrix", "structure_class"]
