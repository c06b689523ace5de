"""HESSO: progressive projection of the redundant groups to zero (OTOv3), no lambda to tune."""

from __future__ import annotations

from typing import Any, Iterable

import torch
from torch import nn

from ..groups import ZeroInvariantGroups
from .base import StepPlan, check_number
from .selection import SelectionConfig
from .windowed import WindowedPruning

#: The importance criteria and the default mix (equal weights, as in the authors' code).
DEFAULT_IMPORTANCE = {"magnitude": 0.2, "avg_magnitude": 0.2, "cosine_similarity": 0.2,
                      "taylor_first_order": 0.2, "taylor_second_order": 0.2}


def importance_scores(criteria: dict[str, float], s: dict[str, torch.Tensor], sizes: torch.Tensor,
                      candidates: torch.Tensor) -> torch.Tensor:
    """Mixed importance of every group (higher: keep). Each criterion is divided by its L2 norm
    over the candidate groups so that the weights mix comparable numbers.

    ``s`` holds the group scalars ``xx`` (||x_g||^2), ``xd`` (<x_g, d_g>) and ``dd`` (||d_g||^2)
    where ``d`` is the base optimizer's update direction:

    - ``magnitude``: ||x_g||; ``avg_magnitude``: ||x_g|| / (entries of g);
    - ``cosine_similarity``: 1 - cos(x_g, d_g), 0 for a zero group. A group whose step already
      points toward the origin (cos near 1, the step ``-lr*d_g`` shrinks it) is *less* important.
      Why this reading: to first order, removing g changes the loss by ``-<grad_g, x_g>``, so a
      positive ``<d_g, x_g>`` says the loss itself is pushing the group to zero; the two Taylor
      criteria are built on the same product, and the authors' DHSPG saliency reads the cosine
      this way too (its redundant set is the groups with the *highest* cos). The authors' HESSO
      scores ``cos(x_g, d_g) + 1`` as importance, the opposite orientation, which keeps exactly
      the groups the loss is shrinking; we do not follow it (``tests/test_optim_parity.py``
      checks that this is the only difference in the scores).
    - ``taylor_first_order``: |<x_g, d_g>|; ``taylor_second_order``: <x_g, d_g>^2 / 2 (as in the
      authors' code: the square of the first-order term).
    """
    norm = s["xx"].clamp_min(0).sqrt()
    dnorm = s["dd"].clamp_min(0).sqrt()
    cos = s["xd"] / (norm * dnorm).clamp_min(1e-12)
    raw = {
        "magnitude": norm,
        "avg_magnitude": norm / sizes.to(norm).clamp_min(1),
        "cosine_similarity": torch.where(norm > 0, 1 - cos, torch.zeros_like(cos)),
        "taylor_first_order": s["xd"].abs(),
        "taylor_second_order": 0.5 * s["xd"].square(),
    }
    total = torch.zeros_like(norm)
    for name, weight in criteria.items():
        v = torch.where(candidates, raw[name], torch.zeros_like(norm))
        total += weight * v / (torch.linalg.vector_norm(v) + 1e-12)
    return total


def check_criteria(criteria: dict[str, float] | None) -> dict[str, float]:
    if criteria is None:
        return dict(DEFAULT_IMPORTANCE)
    if not isinstance(criteria, dict) or not criteria:
        raise ValueError(f"importance_criteria must be a non-empty dict name -> weight, got {criteria!r}")
    out = {}
    for k, v in criteria.items():
        if k not in DEFAULT_IMPORTANCE:
            raise ValueError(f"unknown importance criterion {k!r}; choose from {', '.join(DEFAULT_IMPORTANCE)}")
        out[k] = check_number(f"importance_criteria[{k!r}]", v, low=0.0)
    return out


class HESSO(WindowedPruning):
    """Hybrid Efficient Structured Sparse Optimizer (OTOv3): the default and the most robust.

    Schedule (all in optimizer steps, the optimizer's own counter):

    - steps ``[0, start_pruning_step)``: the plain base optimizer (warm-up);
    - the next ``pruning_steps`` steps: the pruning window, split into ``pruning_periods`` equal
      periods (the last one takes the remainder). At the first step of each period the groups are
      scored by ``selection.saliency`` (:mod:`hf_oto.optim.selection`; default ``"taylor_abs"`` from the
      raw gradients, ``"mixed"`` the published mix of :func:`importance_scores`) and the least
      important of the remaining prunable groups become redundant, so that by the end of period p
      the cumulative count is ``floor(K * (p + 1) / P)``, K = ``floor(target_group_sparsity *
      num_prunable)`` (with ``pruning_schedule="cubic"``, ``floor(K * (1 - (1 - (p + 1)/P)^3))``).
      During a period of L steps a redundant group gets its base step and is then multiplied by
      ``(L - t - 2)/(L - t - 1)`` (t = 0, 1, ...: the step inside the period), so its size shrinks
      linearly to exactly zero at step ``t = L - 2`` (at once when L = 1), when it is frozen; the
      period's last step trains the remaining groups with the new zeros in place;
    - afterwards: the base optimizer on the remaining groups; the K frozen groups stay exactly zero.

    No selection empties a layer (``compress`` keeps one group per dimension anyway), so at the end
    of the window exactly K prunable groups are zero and :func:`hf_oto.compress` removes them all.

    ``selection`` (a :class:`~hf_oto.optim.selection.SelectionConfig` or its dict; the factory takes
    its fields as keywords) can replace the group target by a kept share of the FLOPs (counted on
    ``example_inputs``, default those ``find_groups`` traced) or parameters, each period removing an
    equal share of it with groups weighed by their cost, align every layer's kept count, and
    front-load the removal (``pruning_schedule="cubic"``; see docs/selection.md for when it helps).

    Checked against the authors' HESSO (``only_train_once/optimizer/hesso.py`` and
    ``importance_score/`` of the ``only-train-once`` 3.0.1 release and tianyic/only_train_once;
    ``tests/test_optim_parity.py`` runs it next to this class and compares weights step by step):

    - the same (with ``saliency="mixed"``): warm-up, one scoring per period on the parameters
      before the step and the base direction of the step, the five criteria each divided by its L2 norm over the groups and
      mixed 0.2 each, K = ``int(target * N)``, the shrink after the base step, and its span: their
      step counter starts at 1 inside a period, so their groups reach zero after L - 1 of the L
      steps, as ours do.
    - different on purpose: the cosine criterion's orientation (see :func:`importance_scores`);
      K spread as ``floor(K(p+1)/P)`` where they give ``K // P`` to each period and the remainder
      to the last; frozen groups are left out of the scores' normalisation and of the candidates,
      where they keep them in both and, after the first period, cut the candidates by group index
      rather than by score (``np.setdiff1d`` sorts); their Adam moments start at ``g`` and ``g^2``
      (bias-corrected as if they started at 0: smaller early steps) where ours are torch's; no
      selection empties a layer; the frozen groups' gradients and moments are masked; the
      default is 10 periods (theirs 1; configurations built on it use 5 to 10).
    - their groups are a layer's output rows (weight rows, bias, norm); ours also hold the
      consumer's input columns (see :mod:`hf_oto.groups`), which therefore shrink and count in
      the norms too.

    Example:
        >>> from hf_oto import find_groups
        >>> from hf_oto.optim import HESSO
        >>> groups = find_groups(model)                                  # doctest: +SKIP
        >>> opt = HESSO(model, groups, variant="adamw", lr=3e-5, target_group_sparsity=0.4,
        ...             start_pruning_step=500, pruning_steps=2000, pruning_periods=10)  # doctest: +SKIP
    """

    method = "hesso"

    def __init__(self, model: nn.Module, groups: ZeroInvariantGroups, *, variant: str = "adamw", lr: float = 1e-3,
                 weight_decay: float = 0.0, momentum: float = 0.0, nesterov: bool = False,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 target_group_sparsity: float | None = None, start_pruning_step: int = 0,
                 pruning_steps: int | None = None, pruning_periods: int = 10,
                 importance_criteria: dict[str, float] | None = None,
                 param_groups: Iterable[dict[str, Any]] | None = None,
                 selection: SelectionConfig | dict[str, Any] | None = None, example_inputs: Any = None) -> None:
        self._init_schedule(target_group_sparsity, start_pruning_step, pruning_steps, pruning_periods, selection)
        self.importance_criteria = check_criteria(importance_criteria)
        super().__init__(model, groups, variant=variant, lr=lr, weight_decay=weight_decay, momentum=momentum,
                         nesterov=nesterov, betas=betas, eps=eps, param_groups=param_groups)
        self._sizes = groups.group_sizes.to(self.device)
        self._init_selection(model, example_inputs)

    def _config(self) -> dict[str, Any]:
        return {**super()._config(), "importance_criteria": dict(self.importance_criteria)}

    def _wants_stats(self) -> str | None:
        where = self._where()
        # The mixed criterion scores the update direction at period starts; the others need no pass.
        return "pre" if where is not None and where[1] == 0 and self.selection.saliency == "mixed" else None

    def _plan(self, s) -> StepPlan | None:
        where = self._where()
        if where is None:
            return None
        period, t, length = where
        if t == 0:
            self._start_period(period, s)
        active = self._oto["active"]
        if not active.any():
            return None
        last = max(length - 2, 0)  # the step at which the period's groups reach zero
        if t >= last:
            return StepPlan(project=active.clone())
        factor = torch.where(active, torch.tensor((length - t - 2.0) / (length - t - 1.0), device=self.device),
                             torch.ones((), device=self.device))
        return StepPlan(shrink=factor, shrunk=self._positions("active", active))

    def _start_period(self, period: int, s: dict[str, torch.Tensor] | None) -> None:
        def mix(candidates: torch.Tensor) -> torch.Tensor:
            return importance_scores(self.importance_criteria, s, self._sizes, candidates)

        self._choose_redundant(period, mix)
