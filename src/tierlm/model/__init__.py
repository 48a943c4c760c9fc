"""Faithful PyTorch implementations of the tierlm model families (imports torch)."""

from .cache import Cache
from .loader import CheckpointError, load

__all__ = ["Cache", "CheckpointError", "load"]
