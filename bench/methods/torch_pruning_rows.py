"""Torch-Pruning (``pip install torch-pruning``) as its documentation runs it, iterative over the
same window as OTO, then fine-tuning.

Set up per model family as its examples do (``bench/tasks/families.py``: its own dependency graph,
``num_heads`` with whole-head pruning for attention, embeddings and task head ignored) with global
ranking, and its ``TaylorImportance`` (first-order Taylor, gradients accumulated over the last
``taylor_batches`` training steps, as its examples accumulate a few batches) or
``MagnitudeImportance`` (group L2, mean-reduced, as in its BERT example). It reaches a FLOPs target
the way its benchmark script does: small pruning steps until the measured FLOPs are at the
target, here at the start of each of OTO's periods with the period's share of the target (the
same linear schedule as HESSO's). After each pruning the optimizer is rebuilt for the new
parameters (Torch-Pruning replaces them; AdamW's moments start again, as in its training scripts).

Extra compute, counted in the report: on each pruning step a Taylor row runs one more
forward/backward on the same batch (the gradients it accumulated scored the groups; the step
itself uses the batch's gradient on the pruned model).
"""

from __future__ import annotations

import importlib.util

import torch
from torch import nn

from hf_oto.measure import count_flops

from .base import Method, RunContext, adamw

FINE_STEPS = 200  # Torch-Pruning iterative steps over the full ratio: about 0.5% of the channels each


class TorchPruning(Method):
    family = "peer"

    def __init__(self, importance: str = "taylor", taylor_batches: int = 4, max_ratio: float = 0.95) -> None:
        if importance not in ("taylor", "magnitude"):
            raise ValueError(f"importance must be taylor or magnitude, got {importance!r}")
        self.importance = importance
        self.taylor_batches = taylor_batches
        self.max_ratio = max_ratio
        self.name = f"Torch-Pruning {'Taylor' if importance == 'taylor' else 'magnitude'}"

    def available(self) -> str | None:
        if importlib.util.find_spec("torch_pruning") is None:
            return "torch-pruning is not installed (pip install 'hf_oto[bench]')"
        return None

    def start(self, model: nn.Module, ctx: RunContext) -> nn.Module:
        import torch_pruning as tp

        spec = ctx.task.torch_pruning_spec(model, ctx.example_inputs)
        self.spec = spec
        imp = tp.importance.TaylorImportance() if self.importance == "taylor" else \
            tp.importance.MagnitudeImportance(p=2, group_reduction="mean")
        was_training = model.training
        model.eval()
        self.pruner = tp.pruner.MetaPruner(
            model, dict(ctx.example_inputs), importance=imp, global_pruning=True, iterative_steps=FINE_STEPS,
            pruning_ratio=self.max_ratio, max_pruning_ratio=self.max_ratio, ignored_layers=spec.ignored_layers,
            num_heads=spec.num_heads, prune_num_heads=bool(spec.num_heads), prune_head_dims=False,
            head_pruning_ratio=self.max_ratio if spec.num_heads else 0.0, output_transform=spec.output_transform)
        model.train(was_training)
        starts = ctx.budget.period_starts()
        removed = 1.0 - ctx.target_kept_flops
        self.schedule = {s: 1.0 - removed * (p + 1) / len(starts) for p, s in enumerate(starts)}
        self.accumulated: dict[nn.Parameter, torch.Tensor] = {}
        return model

    def _accumulating(self, step: int) -> int | None:
        """The pruning step this training step's gradient is accumulated for, if any."""
        for s in self.schedule:
            if s - self.taylor_batches < step <= s:
                return s
        return None

    def before_step(self, step, model, optimizer, batch, ctx):
        if self.importance == "taylor" and self._accumulating(step) is not None:
            for p in model.parameters():
                if p.grad is not None:
                    acc = self.accumulated.get(p)
                    self.accumulated[p] = p.grad.detach().clone() if acc is None else acc.add_(p.grad)
        if step not in self.schedule:
            return None
        if self.importance == "taylor":
            for p in model.parameters():
                if p in self.accumulated:
                    p.grad = self.accumulated[p]
        self._prune_to(model, self.schedule[step], ctx)
        self.accumulated = {}
        if self.importance == "taylor":  # the step's own gradient, on the pruned model
            model.zero_grad(set_to_none=True)
            ctx.task.loss(model, batch).backward()
            ctx.extra_passes += 1
        return model, adamw(model, ctx.budget)

    def _prune_to(self, model: nn.Module, target: float, ctx: RunContext) -> None:
        was_training = model.training
        model.eval()  # no dropout in the pruner's trace of the graph
        try:
            while count_flops(model, ctx.example_inputs) / ctx.dense_flops > target:
                if self.pruner.current_step >= self.pruner.iterative_steps:
                    ctx.notes.append("Torch-Pruning reached its maximum ratio before the FLOPs target")
                    break
                if self.spec.num_heads:
                    self.pruner.prune_num_heads = self._removes_a_head()
                self.pruner.step()
                if self.spec.after_pruning is not None:
                    self.spec.after_pruning(model, self.pruner)
        finally:
            model.train(was_training)

    def _removes_a_head(self) -> bool:
        """Whether the pruner's next step removes at least one head. Its global head ranking
        (torch-pruning 1.6.1) leaves its threshold unset on a step that removes no head and then fails
        (UnboundLocalError head_thres) in any attention layer whose channels that step prunes; on
        such steps heads are left out of the ranking, as the step would have removed none."""
        p = self.pruner
        if self.spec.heads_left is None:
            return True
        ratio = p.per_step_head_pruning_ratio[min(p.current_step + 1, len(p.per_step_head_pruning_ratio) - 1)]
        return self.spec.heads_left(p) - int(p.initial_total_heads * (1 - ratio)) > 0

    def finish(self, model: nn.Module, ctx: RunContext) -> nn.Module:
        for p in model.parameters():
            p.grad = None
        return model
