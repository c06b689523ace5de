"""The protocol every row of the comparison implements, and what a run shares with its method.

The training loop (``loop.py``) is the same for every row: the task's batches in the same order,
the same loss, the same number of optimizer steps, the same learning-rate schedule (set on the
optimizer's param groups before every step), the same gradient clipping. A method only decides
which optimizer runs and what it removes, through the hooks below.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..tasks.base import Budget, Task


@dataclass
class RunContext:
    """What one run of one method knows: its task, budget, seed and kept-FLOPs target."""

    task: Task
    budget: Budget
    seed: int
    target_kept_flops: float | None         # fraction of the dense model's FLOPs; None: dense
    example_inputs: dict[str, torch.Tensor]
    dense_flops: int = 0
    notes: list[str] = field(default_factory=list)   # what the table's notes should say about this run
    extra_passes: int = 0                   # forward/backward passes beyond one per step (scoring)


class Method:
    """One row of the table. Subclasses override what they need."""

    #: Row label in the table and the plot.
    name: str = ""
    #: ``"hf_oto"``, ``"baseline"`` or ``"peer"`` (the plot's styles).
    family: str = "baseline"

    def available(self) -> str | None:
        """``None`` when the method can run here, else why not (the table says so)."""
        return None

    def start(self, model: nn.Module, ctx: RunContext) -> nn.Module:
        """Before the first step (find groups, build a pruner...). Returns the model to train."""
        return model

    def optimizer(self, model: nn.Module, ctx: RunContext) -> torch.optim.Optimizer:
        return adamw(model, ctx.budget)

    def before_step(self, step: int, model: nn.Module, optimizer: torch.optim.Optimizer,
                    batch: dict[str, torch.Tensor], ctx: RunContext
                    ) -> tuple[nn.Module, torch.optim.Optimizer] | None:
        """After the backward pass, before clipping and the optimizer step. A method that changes
        the model's shapes returns the new model and optimizer (with gradients for this step)."""
        return None

    def after_step(self, step: int, model: nn.Module, ctx: RunContext) -> None:
        return None

    def finish(self, model: nn.Module, ctx: RunContext) -> nn.Module:
        """The final, physically compressed model."""
        return model


def decay_parameter_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on weights, none on biases and norm parameters (what ``transformers.Trainer``
    does)."""
    no_decay_modules = {name for name, m in model.named_modules()
                        if isinstance(m, (nn.LayerNorm, nn.GroupNorm, nn.BatchNorm1d, nn.BatchNorm2d))
                        or "norm" in type(m).__name__.lower()}
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        module = name.rpartition(".")[0]
        (no_decay if name.endswith("bias") or module in no_decay_modules or p.dim() < 2 else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def adamw(model: nn.Module, budget: Budget) -> torch.optim.Optimizer:
    """The optimizer of the dense and baseline rows: AdamW as Trainer builds it."""
    return torch.optim.AdamW(decay_parameter_groups(model, budget.weight_decay), lr=budget.learning_rate,
                             betas=(0.9, 0.999), eps=1e-8, foreach=True)


class Dense(Method):
    """No compression: the reference row (same steps, same schedule)."""

    name = "dense"
    family = "dense"
