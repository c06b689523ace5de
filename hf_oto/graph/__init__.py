"""Tracing and dependency analysis: from a model to its zero-invariant groups."""

from .analysis import find_groups
from .config import GroupConfig

__all__ = ["find_groups", "GroupConfig"]
