"""HSPG: half-space stochastic projected gradient (OTO, NeurIPS 2021) for group-lasso training."""

from __future__ import annotations

from typing import Any, Iterable

import torch
from torch import nn

from ..groups import ZeroInvariantGroups
from .base import GroupSparseOptimizer, StepPlan, check_int, check_number

#: Default group-lasso weight per base variant (the authors' defaults).
LMBDA_DEFAULTS = {"sgd": 1e-3, "adam": 1e-2, "adamw": 1e-2}


class HSPG(GroupSparseOptimizer):
    """Half-Space Stochastic Projected Gradient for ``min f(x) + lmbda * sum_g ||x_g||``.

    The sum runs over the prunable groups. Schedule (optimizer steps):

    - ``[0, start_pruning_step)``: proximal stage (reported as phase ``"warmup"``): the base step
      ``z = x - lr*d``, then group soft-thresholding ``x_g <- max(0, 1 - lr*lmbda/||z_g||) z_g``.
      Zeros it creates are not frozen: a later gradient may revive them, as proximal SGD does.
    - then the half-space stage, for ``pruning_steps`` steps (None: for the rest of training):
      every zero prunable group is frozen; each non-zero prunable group takes the same proximal
      trial step ``y_g`` and is projected to exactly zero (and frozen) when it leaves the
      half-space of its current point, ``<y_g, x_g> < epsilon ||x_g||^2``. If
      ``target_group_sparsity`` is given it is an upper bound: no projection beyond it (the
      deepest crossings go first), and the stage ends when it is reached. Projections never
      empty a layer.
    - afterwards (``pruning_finished``): the base optimizer alone; frozen groups stay zero.

    ``d`` is the base optimizer's direction (momentum / Adam scaling act on the loss gradient only;
    the penalty stays outside them, like decoupled weight decay). The proximal form has the
    fixed points of ``f + lmbda * sum_g ||x_g||`` exactly (the test compares the objective with
    proximal gradient descent).

    Confirmed against the authors' public code (their original ``HSPG`` optimizer, see
    :mod:`hf_oto.optim.base`): the
    group-lasso term on non-zero groups, the half-space test ``<y_g, x_g> < eps ||x_g||^2``, zero
    groups held at zero in the half-space stage, and the optional upper bound on group sparsity
    (they choose the projected groups randomly when it binds; we choose the deepest crossings,
    deterministically). Differences: their trial step uses the subgradient ``x_g/||x_g||`` at the
    current point, ours the proximal operator after the base step (the OTO paper's first stage
    is proximal too); their SGD momentum also acts on the penalty.

    Example:
        >>> opt = HSPG(model, groups, variant="sgd", lr=0.1, momentum=0.9, lmbda=1e-3,
        ...            start_pruning_step=1000)                          # doctest: +SKIP
    """

    method = "hspg"

    def __init__(self, model: nn.Module, groups: ZeroInvariantGroups, *, variant: str = "adamw", lr: float = 1e-3,
                 weight_decay: float = 0.0, momentum: float = 0.0, nesterov: bool = False,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 lmbda: float | None = None, epsilon: float = 0.0, target_group_sparsity: float | None = None,
                 start_pruning_step: int = 0, pruning_steps: int | None = None,
                 param_groups: Iterable[dict[str, Any]] | None = None) -> None:
        self.lmbda = check_number("lmbda", LMBDA_DEFAULTS.get(variant, 1e-3) if lmbda is None else lmbda, low=0.0)
        self.epsilon = check_number("epsilon", epsilon, low=0.0, high=1.0, high_open=True)
        self.target_group_sparsity = None if target_group_sparsity is None else check_number(
            "target_group_sparsity", target_group_sparsity, low=0.0, high=1.0, high_open=True)
        self.start_pruning_step = check_int("start_pruning_step", start_pruning_step)
        self.pruning_steps = None if pruning_steps is None else check_int("pruning_steps", pruning_steps, low=1)
        super().__init__(model, groups, variant=variant, lr=lr, weight_decay=weight_decay, momentum=momentum,
                         nesterov=nesterov, betas=betas, eps=eps, param_groups=param_groups)
        self._oto["halfspace_started"] = False

    @property
    def target_num_zero_groups(self) -> int:
        """The upper bound on zero groups (all prunable groups when no target is set)."""
        if self.target_group_sparsity is None:
            return self.num_prunable
        return int(self.target_group_sparsity * self.num_prunable + 1e-9)

    def _config(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in (
            "lmbda", "epsilon", "target_group_sparsity", "start_pruning_step", "pruning_steps")}

    def phase(self) -> str:
        k = self.step_count
        if k < self.start_pruning_step:
            return "warmup"
        if self.pruning_steps is not None and k >= self.start_pruning_step + self.pruning_steps:
            return "finished"
        if self.target_group_sparsity is not None and \
                int(self._oto["committed"].sum()) >= self.target_num_zero_groups:
            return "finished"
        return "pruning"

    def _wants_stats(self) -> str | None:
        phase = self.phase()
        return "post" if phase in ("warmup", "pruning") else None

    def _plan(self, s) -> StepPlan | None:
        phase = self.phase()
        if phase == "warmup":
            # Proximal stage: group soft-thresholding of the new iterate, with each group's step
            # size (the norm-weighted mean lr of its tensors: the lr when all share one).
            norm = s["zz"].clamp_min(0).sqrt()
            lr_g = s["lr_zz"] / s["zz"].clamp_min(1e-30)
            live = self._prunable & (norm > 0)
            factor = torch.where(live, (1 - lr_g * self.lmbda / norm.clamp_min(1e-30)).clamp_min(0),
                                 torch.ones_like(norm))
            return StepPlan(shrink=factor, shrunk=self._positions("prunable", self._prunable))
        if phase != "pruning":
            return None
        free = self._prunable & ~self._oto["committed"]
        zero = free & (s["xx"] == 0)
        if not self._oto["halfspace_started"]:
            # Entering the half-space stage: what the proximal stage zeroed is frozen from now on
            # (projected again after this step, whose gradient was not masked yet).
            self._oto["halfspace_started"] = True
        else:
            zero = torch.zeros_like(zero)
        coef, cross, depth = self._halfspace(s, torch.full_like(s["xx"], self.lmbda), free, self.epsilon)
        cross = self._cap(cross, depth, self.target_num_zero_groups - int(self._oto["committed"].sum()))
        cross = self._feasible(cross, depth)  # keep a layer's shallowest crossing if all would go
        return StepPlan(penalty=coef, penalized=self._positions("free", free), project=cross | zero)
