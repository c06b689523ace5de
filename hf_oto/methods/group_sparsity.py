"""The group-sparsity optimizers (HESSO, DHSPG, HSPG) as OTOTrainer methods.

Training drives the redundant groups to exactly zero with the optimizer; ``finalize`` removes
them with :func:`hf_oto.compress`, so the compressed model's outputs equal the trained model's.
Method options (``oto_method_kwargs``) go to :func:`hf_oto.optim.create_oto_optimizer`, e.g.
``{"importance_criteria": {...}}`` for HESSO or ``{"epsilon": 0.05}`` for DHSPG.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..compress import compress
from ..groups import ZeroInvariantGroups
from ..optim.base import PHASES
from .base import CompressionMethod, TrainingSettings, register_method


class GroupSparsityMethod(CompressionMethod):
    """Shared adapter: build the optimizer from the trainer's settings, report its metrics."""

    exact = True
    uses_pruning_window = True

    def __init__(self, **options: Any) -> None:
        self.options = options
        self.optimizer = None

    def create_optimizer(self, model: nn.Module, groups: ZeroInvariantGroups | None,
                         settings: TrainingSettings) -> torch.optim.Optimizer:
        from ..optim import create_oto_optimizer

        kwargs: dict[str, Any] = dict(
            method=self.name, variant=settings.variant, lr=settings.learning_rate,
            weight_decay=settings.weight_decay, betas=(settings.adam_beta1, settings.adam_beta2),
            eps=settings.adam_epsilon, target_group_sparsity=settings.target_group_sparsity,
            start_pruning_step=settings.pruning_start_step,
            pruning_steps=settings.pruning_end_step - settings.pruning_start_step,
            param_groups=_decay_groups(model, settings))
        if self.name != "hspg":
            kwargs["pruning_periods"] = settings.pruning_periods
            kwargs.update(settings.selection)
            if settings.example_inputs is not None:
                kwargs["example_inputs"] = settings.example_inputs
        kwargs.update(self.options)
        self.optimizer = create_oto_optimizer(model, groups, **kwargs)
        return self.optimizer

    def metrics(self, model: nn.Module, groups: ZeroInvariantGroups | None) -> dict[str, float]:
        # The trainer adds group_sparsity and num_zero_groups from zero_groups(), computed once per log.
        if self.optimizer is None:
            return {}
        out = {"target_group_sparsity": float(self.optimizer.target_group_sparsity or 0.0),
               "phase": PHASES[self.optimizer.phase()]}
        out.update(getattr(self.optimizer, "selection_metrics", dict)())
        return out

    def zero_groups(self, model: nn.Module, groups: ZeroInvariantGroups) -> torch.Tensor:
        # The optimizer's index sums over prunable groups only: the same mask, far cheaper than
        # norms over every group (the hidden width spans the embeddings).
        if self.optimizer is None:
            return super().zero_groups(model, groups)
        return self.optimizer.prunable_zero_groups()

    def finalize(self, model: nn.Module, groups: ZeroInvariantGroups | None) -> nn.Module:
        return compress(model, groups)


def _decay_groups(model: nn.Module, settings: TrainingSettings) -> list[dict[str, Any]]:
    """Weight decay on the parameters the trainer decays (Trainer skips biases and norms)."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    decay = set(settings.decay_parameter_names) if settings.decay_parameter_names is not None else {n for n, _ in named}
    return [{"params": [p for n, p in named if n in decay], "weight_decay": settings.weight_decay},
            {"params": [p for n, p in named if n not in decay], "weight_decay": 0.0}]


@register_method
class HESSOMethod(GroupSparsityMethod):
    """HESSO (OTOv3): redundant groups shrink linearly to zero over the pruning periods."""

    name = "hesso"


@register_method
class DHSPGMethod(GroupSparsityMethod):
    """DHSPG (OTOv2): dual half-space projection toward a target group sparsity."""

    name = "dhspg"


@register_method
class HSPGMethod(GroupSparsityMethod):
    """HSPG (OTO): group lasso with half-space projection; ``lmbda`` sets the sparsity."""

    name = "hspg"
