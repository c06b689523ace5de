"""DHSPG: dual half-space projected gradient (OTOv2), aiming at a target group sparsity."""

from __future__ import annotations

import math
from typing import Any, Iterable

import torch
from torch import nn

from ..groups import ZeroInvariantGroups
from .base import StepPlan, check_number
from .halfspace import deepest, subgradient_trial
from .selection import SelectionConfig
from .windowed import WindowedPruning

#: Per-variant defaults of the authors' code: base lambda, amplification, and the cap of the
#: adapted lambda as a multiple of the base one.
LAMBDA_DEFAULTS = {"sgd": (1e-3, 2.0, 10.0), "adam": (1e-2, 20.0, 1e3), "adamw": (1e-2, 20.0, 1e3)}


def redundancy_scores(s: dict[str, torch.Tensor], sizes: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """DHSPG saliency (higher: more redundant): cos(x_g, d_g) plus the inverse average magnitude,
    each divided by its L2 norm over the candidates and mixed half and half. A group whose descent
    step already points toward the origin (cos near 1) and whose entries are small is redundant."""
    norm = s["xx"].clamp_min(0).sqrt()
    cos = s["xd"] / (norm * s["dd"].clamp_min(0).sqrt()).clamp_min(1e-12)
    inv = 1.0 / (norm / sizes.to(norm).clamp_min(1) + 1e-6)
    zero = torch.zeros_like(norm)
    cos, inv = torch.where(candidates, cos, zero), torch.where(candidates, inv, zero)
    return 0.5 * cos / (torch.linalg.vector_norm(cos) + 1e-12) + 0.5 * inv / (torch.linalg.vector_norm(inv) + 1e-12)


def adaptive_lambdas(s: dict[str, torch.Tensor], lmbda: float, amplify: float, cap: float) -> torch.Tensor:
    """Per-group lambda of the dual half-space rule.

    For the direction ``s_g = d_g + lambda_g x_g/||x_g||`` (d: the base step direction) two things
    should hold: ``<s_g, x_g> > 0``, the step moves the group toward the origin, which needs
    ``lambda_g > -<d_g, x_g>/||x_g||`` (the lower bound, only active when ``<d_g, x_g> < 0``); and
    ``<s_g, d_g> > 0``, the step is still a descent direction of the loss, which needs
    ``lambda_g < -||d_g||^2 ||x_g|| / <d_g, x_g>`` (the upper bound). When ``<d_g, x_g> >= 0`` the
    base lambda already satisfies both. Otherwise lambda is ``amplify * lower`` clipped to
    ``[lmbda, cap * lmbda]``, and the midpoint of the bounds when that would break the upper one.
    """
    norm = s["xx"].clamp_min(0).sqrt()
    xd, dd = s["xd"], s["dd"]
    lam = torch.full_like(norm, lmbda)
    adjust = (xd < 0) & (norm > 0)
    safe = torch.where(adjust, xd, -torch.ones_like(xd))
    lower = -safe / norm.clamp_min(1e-30)
    upper = -dd * norm / safe
    adapted = (amplify * lower).clamp(min=lmbda, max=lmbda * cap)
    adapted = torch.where(adapted >= upper, (lower + upper) / 2, adapted)
    return torch.where(adjust, adapted, lam)


class DHSPG(WindowedPruning):
    """Dual Half-Space Projected Gradient (OTOv2): reaches a user-chosen group sparsity.

    Schedule (optimizer steps):

    - ``[0, start_pruning_step)``: plain base optimizer (warm-up);
    - the next ``pruning_steps`` steps, in ``pruning_periods`` periods (default 1: one partition,
      as in the authors' code). At the start of period p, the non-frozen prunable groups are scored
      by ``selection.saliency`` (as HESSO; ``"mixed"``: :func:`redundancy_scores`) and the least
      important form the redundant set R: as many as the period must zero, plus
      ``tolerance_group_sparsity * num_prunable`` spare ones (none under a FLOPs or parameter
      target or ``group_divisible``, where R is exactly the cost-weighted choice). Important
      groups get the plain base step. Each group of R takes the subgradient step
      ``y_g = x_g - lr*d_g - lr*lambda_g*x_g/||x_g||`` with the adaptive ``lambda_g`` of
      :func:`adaptive_lambdas` (d: the base direction), and the half-space test: if ``y_g`` leaves
      the half-space of ``x_g``, ``<y_g, x_g> < epsilon * ||x_g||^2``, the group is projected to
      exactly zero and frozen. Projections stop at the period's cumulative target
      ``floor(K * (p + 1) / P)`` (K = ``floor(target_group_sparsity * num_prunable)``; a cubic
      ``selection.pruning_schedule`` front-loads it); when more
      groups qualify, those deepest across the boundary (smallest ``<y_g, x_g>/||x_g||^2``) go first.
      Once the target is met, the rest of R returns to the important set.
    - At the last step of each period, if the half-space test has not zeroed enough groups, the
      groups of R with the smallest norm are projected to meet the target exactly (counted in
      ``metrics()["num_forced_projections"]``, the half-space ones in
      ``"num_halfspace_projections"``): the guarantee the trainer relies on. A run whose forced
      projections outnumber the half-space ones did magnitude pruning of R, not DHSPG: give it a
      longer window or a larger ``lmbda``.
    - Afterwards: the base optimizer; frozen groups stay exactly zero.

    Checked against the authors' DHSPG (``optimizer/dhspg.py`` and ``hyperparameter.py`` of
    tianyic/only_train_once before its HESSO rewrite, the same file as the ``only-train-once``
    2.0.16 release): the subgradient trial step on top of the base (SGD/Adam) direction and the
    half-space test; the lambda bounds and their clipping, amplification and midpoint rule; the
    per-variant defaults (sgd: lambda 1e-3, amplify 2, cap 10x; adam/adamw: 1e-2, 20, 1000x);
    epsilon 0; one partition; tolerance 0.05 extra groups in R; the saliency (cosine and inverse
    average norm, L2-normalised, half and half); the penalty stopping for all groups once the
    target is reached. Differences: they project every crossing group of R until the sparsity
    reaches the target, checked once per step, so a step can overshoot up to the size of R, and
    they have no window: the target is reached whenever the test gets there, or never; we cap the
    projections at the target (deepest first, deterministic) and force the rest at the end of each
    period. Their Adam moments start at ``g`` and ``g^2``; ours are torch's.

    Example:
        >>> opt = DHSPG(model, groups, variant="adamw", lr=3e-5, target_group_sparsity=0.5,
        ...             start_pruning_step=500, pruning_steps=3000)     # doctest: +SKIP
    """

    method = "dhspg"

    def __init__(self, model: nn.Module, groups: ZeroInvariantGroups, *, variant: str = "adamw", lr: float = 1e-3,
                 weight_decay: float = 0.0, momentum: float = 0.0, nesterov: bool = False,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 target_group_sparsity: float | None = None, start_pruning_step: int = 0,
                 pruning_steps: int | None = None, pruning_periods: int = 1, lmbda: float | None = None,
                 lmbda_amplify: float | None = None, hat_lmbda_coeff: float | None = None, epsilon: float = 0.0,
                 tolerance_group_sparsity: float = 0.05, param_groups: Iterable[dict[str, Any]] | None = None,
                 selection: SelectionConfig | dict[str, Any] | None = None, example_inputs: Any = None) -> None:
        self._init_schedule(target_group_sparsity, start_pruning_step, pruning_steps, pruning_periods, selection)
        d_lmbda, d_amp, d_cap = LAMBDA_DEFAULTS.get(variant, LAMBDA_DEFAULTS["sgd"])
        self.lmbda = check_number("lmbda", d_lmbda if lmbda is None else lmbda, low=0.0)
        self.lmbda_amplify = check_number("lmbda_amplify", d_amp if lmbda_amplify is None else lmbda_amplify, low=1.0)
        self.hat_lmbda_coeff = check_number("hat_lmbda_coeff", d_cap if hat_lmbda_coeff is None else hat_lmbda_coeff,
                                            low=1.0)
        self.epsilon = check_number("epsilon", epsilon, low=0.0, high=1.0, high_open=True)
        self.tolerance_group_sparsity = check_number("tolerance_group_sparsity", tolerance_group_sparsity,
                                                     low=0.0, high=1.0)
        super().__init__(model, groups, variant=variant, lr=lr, weight_decay=weight_decay, momentum=momentum,
                         nesterov=nesterov, betas=betas, eps=eps, param_groups=param_groups)
        self._sizes = groups.group_sizes.to(self.device)
        self._oto.update({
            "lambdas": torch.zeros(len(groups), device=self.device),  # last lambda used per group
            "num_halfspace": 0,
            "num_forced": 0,
        })
        self._init_selection(model, example_inputs)

    def _config(self) -> dict[str, Any]:
        return {**super()._config(), **{k: getattr(self, k) for k in (
            "lmbda", "lmbda_amplify", "hat_lmbda_coeff", "epsilon", "tolerance_group_sparsity")}}

    def metrics(self) -> dict[str, float]:
        out = super().metrics()
        active = self._oto["active"]
        lam = self._oto["lambdas"][active]
        out.update({"mean_lambda": float(lam.mean()) if lam.numel() else 0.0,
                    "num_halfspace_projections": float(self._oto["num_halfspace"]),
                    "num_forced_projections": float(self._oto["num_forced"])})
        return out

    def _wants_stats(self) -> str | None:
        where = self._where()
        return "trial" if where is not None and (where[1] == 0 or bool(self._oto["active"].any())) else None

    def _plan(self, s) -> StepPlan | None:
        where = self._where()
        if where is None:
            return None
        period, t, length = where
        if t == 0:
            self._start_period(period, s)
        target = self._period_target(period)
        active = self._oto["active"]
        if not active.any():
            return None
        room = target - int(self._oto["committed"].sum())
        nonzero = active & (s["xx"] > 0)
        project = active & ~nonzero  # already zero: freeze now
        room -= int(project.sum())
        lam = adaptive_lambdas(s, self.lmbda, self.lmbda_amplify, self.hat_lmbda_coeff)
        self._oto["lambdas"] = torch.where(nonzero, lam, torch.zeros_like(lam))
        coef, cross, depth = subgradient_trial(s, lam, nonzero, self.epsilon)
        cross = deepest(cross, depth, room)
        project |= cross
        crossed = int(cross.sum())
        room -= crossed
        self._oto["num_halfspace"] += crossed
        if t == length - 1 and room > 0:  # end of period: meet the target exactly
            left = nonzero & ~cross
            norm = torch.where(left, s["xx"], torch.full_like(s["xx"], math.inf))
            forced = torch.sort(norm, stable=True).indices[:room]
            forced = forced[torch.isfinite(norm[forced])]
            project[forced] = True
            self._oto["num_forced"] += int(forced.numel())
            room -= int(forced.numel())
        if room <= 0 or t == length - 1:
            # Target met (or period over): the spare redundant groups become important again.
            self._oto["active"] = torch.zeros_like(active)
            if not project.any():
                return None
            return StepPlan(project=project)
        return StepPlan(penalty=coef, penalized=self._positions("active", active), project=project)

    def _start_period(self, period: int, s: dict[str, torch.Tensor]) -> None:
        # The mixed criterion is a redundancy: its negation is the importance.
        self._choose_redundant(period, lambda candidates: -redundancy_scores(s, self._sizes, candidates),
                               extra=math.ceil(self.tolerance_group_sparsity * self.num_prunable))
