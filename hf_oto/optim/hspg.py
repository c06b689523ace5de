"""HSPG: half-space stochastic projected gradient (OTO, NeurIPS 2021) for group-lasso training."""

from __future__ import annotations

from typing import Any, Iterable

import torch
from torch import nn

from ..groups import ZeroInvariantGroups
from ._index import PrunableIndex
from .base import GroupSparseOptimizer, StepPlan, check_int, check_number

#: Default group-lasso weight per base variant (the authors' defaults).
LMBDA_DEFAULTS = {"sgd": 1e-3, "adam": 1e-2, "adamw": 1e-2}


class HSPG(GroupSparseOptimizer):
    """Half-Space Stochastic Projected Gradient for ``min f(x) + lmbda * sum_g ||x_g||``.

    The sum runs over the prunable groups. Schedule (optimizer steps):

    - ``[0, start_pruning_step)``: proximal stage (reported as phase ``"warmup"``): the base step,
      then group soft-thresholding ``x_g <- max(0, 1 - lr*lmbda/||x_g||) x_g``. Zeros it creates
      are not frozen: a later gradient may revive them, as proximal SGD does.
    - then the half-space stage, for ``pruning_steps`` steps (None: for the rest of training):
      every zero prunable group is frozen; each non-zero prunable group takes the trial step
      ``y_g = x_g - lr*(d_g + lmbda x_g/||x_g||)`` and is projected to exactly zero (and frozen)
      when ``<y_g, x_g> < epsilon ||x_g||^2``. If ``target_group_sparsity`` is given it is an upper
      bound: no projection beyond it (the deepest crossings go first), and the stage ends when it
      is reached. Projections never empty a layer.
    - afterwards (``pruning_finished``): the base optimizer alone; frozen groups stay zero.

    The penalty is applied beside the base direction ``d`` (momentum / Adam scaling act on the
    loss gradient only), like decoupled weight decay.

    Confirmed against the authors' public code (their ``HSPG`` optimizer, read, not copied): the
    subgradient ``x_g/||x_g||`` on non-zero groups, the half-space test ``<y_g, x_g> < eps
    ||x_g||^2``, zero groups held at zero in the half-space stage, and the optional upper bound on
    group sparsity (they choose the projected groups randomly when it binds; we choose the deepest
    crossings, deterministically). Their first stage is a plain subgradient step; we use the
    proximal step of the OTO paper. Their SGD momentum also acts on the penalty; ours does not.

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

    def _needs_direction(self) -> bool:
        return self.phase() == "pruning"

    def _plan(self, x, d) -> StepPlan | None:
        if self.phase() != "pruning":
            return None
        s = self._group_scalars(x, d)
        free = self._prunable & ~self._oto["committed"]
        zero = free & (s["xx"] == 0)
        if not self._oto["halfspace_started"]:
            # Entering the half-space stage: what the proximal stage zeroed is frozen from now on
            # (projected again after this step, whose gradient was not masked yet).
            self._oto["halfspace_started"] = True
        else:
            zero = torch.zeros_like(zero)
        nonzero = free & (s["xx"] > 0)
        coef = torch.where(nonzero, self.lmbda / s["xx"].clamp_min(1e-30).sqrt(), torch.zeros_like(s["xx"]))
        trial = s["trial"] - coef * s["lr_xx"]
        cross = nonzero & (trial < self.epsilon * s["xx"])
        ratio = torch.where(cross, trial / s["xx"].clamp_min(1e-30), torch.full_like(trial, float("inf")))
        room = self.target_num_zero_groups - int(self._oto["committed"].sum())
        if int(cross.sum()) > room:
            keep = torch.sort(ratio, stable=True).indices[:max(room, 0)]
            cross = torch.zeros_like(cross)
            cross[keep] = True
        cross = self._feasible(cross, ratio)  # keep a layer's shallowest crossing if all would go
        return StepPlan(penalty=coef, penalized=self._positions("free", free), project=cross | zero)

    def _after_step(self) -> None:
        if self.step_count - 1 >= self.start_pruning_step:
            return
        # Proximal stage: group soft-thresholding of the new iterate, with each group's step size
        # (the norm-weighted mean lr of its tensors: the lr when all share one).
        x = self._gparams
        lr = self._lr
        sums = self._index.sums(x, None, torch.stack([torch.ones_like(lr), lr]))
        norm = sums[0].sqrt()
        live = self._prunable & (norm > 0)
        lr_g = sums[1] / sums[0].clamp_min(1e-30)
        factor = torch.where(live, (1 - lr_g * self.lmbda / norm.clamp_min(1e-30)).clamp_min(0),
                             torch.ones_like(norm))
        PrunableIndex.scale_(x, self._positions("prunable", self._prunable), factor)
