"""SINGD, INGD and IKFAC (Lin et al., 2024): structured inverse-free natural-gradient optimizers."""
from .optimizer import SINGD
from .structures import STRUCTURES, StructuredMatrix, structure_class

__all__ = ["SINGD", "STRUCTURES", "StructuredMatrix", "structure_class"]
