"""What a practitioner does without OTO: magnitude pruning of hf_oto's groups, with fine-tuning.

- **prune-then-finetune**: dense training for the same warm-up OTO gets (``pruning_start``), then
  the lowest-magnitude groups removed at once down to the kept-FLOPs target, then fine-tuning for
  the rest of the budget.
- **gradual magnitude pruning** (Zhu & Gupta 2017): over the same window as OTO, at the start of
  each of its periods, remove the lowest-magnitude groups so that the removed share of FLOPs
  follows the cubic schedule ``s_p = s (1 - (1 - (p + 1)/P)^3)``; training continues throughout.

Groups are ranked by the RMS of their entries (see :func:`rms_magnitude`) and removed by holding
them at exactly zero (re-zeroed after every optimizer step, the usual masking); the final model
is built by :func:`hf_oto.compress`, so both rows get the same physical slicing as OTO's rows.
"""

from __future__ import annotations

import torch
from torch import nn

from hf_oto import compress, find_groups

from .base import Method, RunContext
from .targets import FlopsTarget, rms_magnitude


class _MaskedMagnitude(Method):
    family = "baseline"

    def start(self, model: nn.Module, ctx: RunContext) -> nn.Module:
        self.groups = find_groups(model, ctx.example_inputs)
        self.target = FlopsTarget(model, self.groups, ctx.example_inputs)
        self.removed = torch.zeros(len(self.groups), dtype=torch.bool)
        self.schedule = self.targets(ctx)
        return model

    def targets(self, ctx: RunContext) -> dict[int, float]:
        """Step -> kept-FLOPs target to prune down to after that step."""
        raise NotImplementedError

    def after_step(self, step: int, model: nn.Module, ctx: RunContext) -> None:
        params = self.groups.parameters(model)
        if step in self.schedule:
            scores = rms_magnitude(self.groups, params)
            self.removed = self.target.remove_by_score(scores, self.schedule[step], already=self.removed)
        if self.removed.any():
            self.groups.zero_(params, self.removed)

    def finish(self, model: nn.Module, ctx: RunContext) -> nn.Module:
        return compress(model, self.groups)


class PruneThenFinetune(_MaskedMagnitude):
    name = "prune-then-finetune (magnitude)"

    def targets(self, ctx: RunContext) -> dict[int, float]:
        return {ctx.budget.window()[0]: ctx.target_kept_flops}


class GradualMagnitude(_MaskedMagnitude):
    name = "gradual magnitude"

    def targets(self, ctx: RunContext) -> dict[int, float]:
        starts = ctx.budget.period_starts()
        removed = 1.0 - ctx.target_kept_flops
        periods = len(starts)
        return {s: 1.0 - removed * (1.0 - (1.0 - (p + 1) / periods) ** 3) for p, s in enumerate(starts)}
