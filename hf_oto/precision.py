"""The model's own float32 forward pass while a trainer's mixed precision is on.

accelerate implements ``bf16=True`` / ``fp16=True`` by replacing ``model.forward`` on the instance
with an autocast wrapper (the bound original kept as ``model._original_forward``). Compressing
through that wrapper compares two reduced-precision forward passes whose roundings differ with the
shapes (0.7% of the output scale on MiniLM on CPU, 3% on an H200), so the exactness check fails on
a correct model; and a deep copy of the model would carry the wrapper into the compressed model.
Inside :func:`own_forward` neither happens.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import nn

_WRAPPER_ATTRIBUTES = ("forward", "_original_forward")


def has_mixed_precision_forward(model: nn.Module) -> bool:
    """Whether ``model.forward`` is accelerate's autocast wrapper."""
    return "_original_forward" in model.__dict__ and "forward" in model.__dict__


@contextlib.contextmanager
def own_forward(model: nn.Module) -> Iterator[nn.Module]:
    """Run ``model`` with its class's forward inside the block; the wrapper comes back after it.

    Example:
        >>> import torch
        >>> model = torch.nn.Linear(2, 2)
        >>> with own_forward(model):
        ...     y = model(torch.ones(1, 2))
    """
    if not has_mixed_precision_forward(model):
        yield model
        return
    saved = {name: model.__dict__.pop(name) for name in _WRAPPER_ATTRIBUTES}
    try:
        yield model
    finally:
        model.__dict__.update(saved)

