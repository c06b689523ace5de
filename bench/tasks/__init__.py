"""The tasks of ``bench/compare.py``: each builds its model and data offline and scores a model."""

from __future__ import annotations

from .base import AuthorsOTOSpec, Budget, Task, TorchPruningSpec

__all__ = ["AuthorsOTOSpec", "Budget", "Task", "TorchPruningSpec", "make_task", "TASKS"]

#: Task names accepted by :func:`make_task` (``--tasks`` of compare.py).
TASKS = ("qa-hard", "embed-distill", "digits-resnet", "digits-convnext")


def make_task(name: str, **options) -> Task:
    """Build a task by name (imports only what that task needs)."""
    if name == "qa-hard":
        from .qa import QATask

        return QATask(**options)
    if name == "embed-distill":
        from .embed import EmbeddingDistillationTask

        return EmbeddingDistillationTask(**options)
    if name.startswith("digits-"):
        from .digits import DigitsTask

        return DigitsTask(name.removeprefix("digits-"), **options)
    raise ValueError(f"unknown task {name!r}; choose from {', '.join(TASKS)}")
