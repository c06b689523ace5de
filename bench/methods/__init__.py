"""The rows of ``bench/compare.py``: hf_oto's optimizers and the methods they are compared with."""

from __future__ import annotations

from hf_oto.optim.selection import PRUNING_SCHEDULES

from .authors_oto import AuthorsHESSO
from .base import Dense, Method, RunContext
from .hf_oto_rows import NEW_SALIENCY, OLD_SALIENCY, HfOto, hf_oto_rows
from .magnitude import GradualMagnitude, PruneThenFinetune
from .torch_pruning_rows import TorchPruning


def all_rows(criteria: tuple[str, ...] = (OLD_SALIENCY, NEW_SALIENCY),
             schedules: tuple[str, ...] = PRUNING_SCHEDULES) -> list[Method]:
    """Every row of the comparison, hf_oto's first."""
    return [*hf_oto_rows(criteria, schedules), PruneThenFinetune(), GradualMagnitude(), TorchPruning("taylor"),
            TorchPruning("magnitude"), AuthorsHESSO()]


__all__ = ["AuthorsHESSO", "Dense", "GradualMagnitude", "HfOto", "Method", "NEW_SALIENCY", "OLD_SALIENCY",
           "PruneThenFinetune", "RunContext", "TorchPruning", "all_rows", "hf_oto_rows"]
