"""One-shot magnitude pruning: the baseline OTO is compared against.

Trains densely with the trainer's default optimizer, then removes the target fraction of
prunable groups with the smallest L2 norms. Unlike the OTO methods nothing drives those groups to
zero during training, so removing them changes the outputs (``exact = False``).
"""

from __future__ import annotations

import torch
from torch import nn

from ..compress import compress
from ..compress.core import smallest_groups
from ..groups import ZeroInvariantGroups
from .base import CompressionMethod, TrainingSettings, register_method


@register_method
class MagnitudePruning(CompressionMethod):
    """Remove the smallest-norm groups after dense training.

    Example:
        >>> from hf_oto import OTOTrainingArguments
        >>> args = OTOTrainingArguments(output_dir="out", oto_method="magnitude", target_group_sparsity=0.3)
    """

    name = "magnitude"
    exact = False

    def __init__(self) -> None:
        self.target = 0.5

    def create_optimizer(self, model: nn.Module, groups: ZeroInvariantGroups | None,
                         settings: TrainingSettings) -> torch.optim.Optimizer | None:
        self.target = settings.target_group_sparsity
        return None

    def finalize(self, model: nn.Module, groups: ZeroInvariantGroups | None) -> nn.Module:
        with torch.no_grad():
            self.removed_groups = smallest_groups(groups, groups.parameters(model), self.target)
        return compress(model, groups, remove=self.removed_groups)
