"""The protocol through which :class:`hf_oto.OTOTrainer` drives a compression method.

A method is chosen by name (``OTOTrainingArguments(oto_method="dhspg")``). The trainer calls, in
order:

1. ``prepare(model, groups)`` once, before the optimizer exists (a method may wrap layers);
2. ``create_optimizer(model, groups, settings)`` for the optimizer (``None``: the trainer's
   default AdamW over all trainable parameters);
3. ``regularizer(model)`` each step, added to the loss when not ``None``;
4. ``on_step_end(model, step)`` after each optimizer step (schedules, projections);
5. ``metrics(model, groups)`` when logging (floats, e.g. ``group_sparsity``);
6. ``finalize(model, groups)`` after training: the compressed model, whose outputs must equal the
   trained model's (``exact = True``) or approximate them (``exact = False``).

``state_dict``/``load_state_dict`` keep whatever the method needs to resume bit for bit (the
optimizer's own state is saved by the trainer).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from ..groups import ZeroInvariantGroups


@dataclass
class TrainingSettings:
    """What the trainer knows that a method may need to build its optimizer or schedule."""

    learning_rate: float
    weight_decay: float = 0.0
    total_steps: int = 0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    options: dict[str, Any] = field(default_factory=dict)  # method-specific (oto_method_kwargs)
    target_group_sparsity: float | None = 0.5  # None when a FLOPs or parameter target replaces it
    variant: str = "adamw"  # base optimizer of the group-sparsity methods
    pruning_start_step: int = 0
    pruning_end_step: int = 0
    pruning_periods: int = 1
    # Parameters that get weight decay (Trainer excludes biases and norms); None: all of them.
    decay_parameter_names: list[str] | None = None
    # How hesso/dhspg choose groups: saliency, FLOPs/parameter target, alignment (SelectionConfig
    # fields; None: the optimizer's default), and the inputs FLOPs are counted on.
    selection: dict[str, Any] = field(default_factory=dict)
    example_inputs: Any = None


class CompressionMethod:
    """Base class: every hook is optional except :meth:`finalize`."""

    #: Name used in ``OTOTrainingArguments.oto_method``.
    name: ClassVar[str] = ""
    #: Whether the method needs zero-invariant groups (``find_groups`` runs first).
    needs_groups: ClassVar[bool] = True
    #: Whether ``finalize`` reproduces the trained model's outputs exactly.
    exact: ClassVar[bool] = True
    #: Whether training follows the trainer's pruning window (``oto_pruning_start``/``_end``): the
    #: window is then shaded in ``training.png``.
    uses_pruning_window: ClassVar[bool] = False
    #: Set by ``finalize`` when it removes groups that are not all zero (a bool mask over groups),
    #: so the model card lists what was really removed.
    removed_groups: torch.Tensor | None = None

    def prepare(self, model: nn.Module, groups: ZeroInvariantGroups | None) -> nn.Module:
        return model

    def create_optimizer(self, model: nn.Module, groups: ZeroInvariantGroups | None,
                         settings: TrainingSettings) -> torch.optim.Optimizer | None:
        return None

    def regularizer(self, model: nn.Module) -> torch.Tensor | None:
        return None

    def on_step_end(self, model: nn.Module, step: int) -> None:
        return None

    def metrics(self, model: nn.Module, groups: ZeroInvariantGroups | None) -> dict[str, float]:
        return {}

    def zero_groups(self, model: nn.Module, groups: ZeroInvariantGroups) -> torch.Tensor:
        """Bool mask over groups: prunable and exactly zero now (what ``compress`` would remove)."""
        with torch.no_grad():
            return groups.zero_mask(groups.parameters(model)).cpu() & groups.prunable_mask

    def finalize(self, model: nn.Module, groups: ZeroInvariantGroups | None) -> nn.Module:
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        return None


_REGISTRY: dict[str, type[CompressionMethod]] = {}


def register_method(cls: type[CompressionMethod]) -> type[CompressionMethod]:
    """Class decorator adding a method to the registry under ``cls.name``.

    Example:
        >>> @register_method                                     # doctest: +SKIP
        ... class MyMethod(CompressionMethod):
        ...     name = "mine"                                    # then oto_method="mine"
    """
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no name")
    _REGISTRY[cls.name] = cls
    return cls


def get_method(name: str) -> type[CompressionMethod]:
    """The method class registered as ``name`` (what ``oto_method`` names); ValueError if none.

    Example:
        >>> get_method("hesso").name
        'hesso'
    """
    from . import _load_builtin_methods

    _load_builtin_methods()
    if name not in _REGISTRY:
        raise ValueError(f"unknown oto_method {name!r}; choose from {sorted(_REGISTRY)}")
    return _REGISTRY[name]


def available_methods() -> list[str]:
    """Names accepted by ``OTOTrainingArguments(oto_method=...)``, sorted.

    Example:
        >>> "sfw" in available_methods()
        True
    """
    from . import _load_builtin_methods

    _load_builtin_methods()
    return sorted(_REGISTRY)
