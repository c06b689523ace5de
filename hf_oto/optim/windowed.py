"""The pruning window HESSO and DHSPG share: warm-up, periods, and the choice of each period's groups.

Split from :mod:`hf_oto.optim.base` (the base step and group corrections): this file holds the
schedule (which step belongs to which period) and the selection that starts every period, fed by
the loss-based saliency accumulated from raw gradients (:mod:`hf_oto.optim.saliency`) and weighed
against each group's cost (:mod:`hf_oto.optim.selection`).
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from ..costs import GroupCosts
from ..graph.analysis import _unwrap as unwrap_model
from .base import GroupSparseOptimizer, check_int, check_number
from .saliency import LOSS_SALIENCIES, group_dots, loss_saliency
from .selection import (MAX_DEFAULT_SALIENCY_STEPS, GroupSelector, SelectionConfig, check_reachable,
                        schedule_fraction)

#: A method's own mix of criteria: candidates (bool over groups) -> importance (higher: keep).
Mix = Callable[[torch.Tensor], torch.Tensor]


class WindowedPruning(GroupSparseOptimizer):
    """The schedule HESSO and DHSPG share: ``start_pruning_step`` warm-up steps, then a window of
    ``pruning_steps`` steps split into ``pruning_periods`` periods, each removing an equal share of
    the target, then the base optimizer alone (all counted in optimizer steps).

    The target is ``target_group_sparsity`` (a share of the prunable groups), or, through
    ``selection`` (:class:`SelectionConfig`), a kept share of the FLOPs or parameters; with
    ``selection.pruning_schedule="cubic"`` the first periods remove more of it. At the first
    step of each period the groups are chosen by ``selection.saliency``; the loss-based criteria
    accumulate ``<x_g, grad_g>`` over the ``saliency_steps`` steps before each selection, and only
    then (outside those steps a step costs what it did before).
    """

    def _init_schedule(self, target_group_sparsity: float | None, start_pruning_step: int, pruning_steps: int | None,
                       pruning_periods: int, selection: SelectionConfig | dict[str, Any] | None = None) -> None:
        if isinstance(selection, SelectionConfig):
            self.selection = selection
        else:
            self.selection = SelectionConfig.from_options(selection)
        if self.selection.unit != "groups":
            if target_group_sparsity is not None:
                raise ValueError(f"set one target: target_group_sparsity={target_group_sparsity} and "
                                 f"target_kept_{self.selection.unit}={self.selection.target_kept} conflict")
            self.target_group_sparsity = None
        else:
            self.target_group_sparsity = check_number(
                "target_group_sparsity", 0.5 if target_group_sparsity is None else target_group_sparsity,
                low=0.0, high=1.0, high_open=True)
        self.start_pruning_step = check_int("start_pruning_step", start_pruning_step)
        if pruning_steps is None:
            raise ValueError("pruning_steps is required: the number of optimizer steps over which the "
                             "redundant groups are brought to zero")
        self.pruning_steps = check_int("pruning_steps", pruning_steps, low=1)
        self.pruning_periods = check_int("pruning_periods", pruning_periods, low=1)
        if self.pruning_periods > self.pruning_steps:
            raise ValueError(f"pruning_periods ({pruning_periods}) must be <= pruning_steps ({pruning_steps})")

    def _init_selection(self, model: nn.Module, example_inputs: Any = None) -> None:
        """After the base class: the groups' costs for a FLOPs or parameter target (measured on
        ``example_inputs``, default the ones ``find_groups`` traced), the selector, and the
        saliency accumulators (kept in the state, so a resumed run scores the same)."""
        unit = self.selection.unit
        costs = None
        if unit != "groups":
            costs = GroupCosts.measure(unwrap_model(model), self.groups, example_inputs, units=(unit,))
        self._selector = GroupSelector(self.groups, self.selection, costs)
        committed = self._oto["committed"].cpu()
        if unit != "groups":
            check_reachable(self._selector, committed, self._target_removed(),
                            f"target_kept_{unit}={self.selection.target_kept}")
        elif self.selection.bundled:
            check_reachable(self._selector, committed, self._target_removed(),
                            f"target_group_sparsity={self.target_group_sparsity}")
        n = len(self.groups)
        self._oto.update({
            "saliency_sum": torch.zeros(n, device=self.device),   # sum over batches of <x_g, grad_g>
            "saliency_sq": torch.zeros(n, device=self.device),    # ... and of its square
            "saliency_batches": 0,
            "selected_period": -1,                                # the last period chosen ...
            "period_target": 0,                                   # ... and its zero-group count
        })

    # -- targets -------------------------------------------------------------------------------
    @property
    def _plain_target(self) -> bool:
        """A group-count target without alignment: exactly ``floor(target * prunable)`` groups."""
        return self.selection.unit == "groups" and not self.selection.bundled

    @property
    def target_num_zero_groups(self) -> int:
        """Groups to zero: ``floor(target_group_sparsity * prunable)``; with a FLOPs or parameter
        target, the groups chosen so far (known in full once the last period has started)."""
        if self.selection.unit == "groups":
            return int(self.target_group_sparsity * self.num_prunable + 1e-9)
        return int(self._oto["period_target"]) if self._oto["selected_period"] >= 0 else 0

    def _target_removed(self) -> float:
        """What the whole window removes, in the target's unit, from the dense model."""
        if self.selection.unit == "groups":
            return float(int(self.target_group_sparsity * self.num_prunable + 1e-9))
        return self._selector.total() * (1.0 - self.selection.target_kept)

    def _period_budget(self, period: int) -> float:
        if self.selection.unit == "groups":
            return float(self._cumulative(int(self._target_removed()))[period])
        return self._target_removed() * schedule_fraction(self.selection.pruning_schedule, period,
                                                          self.pruning_periods)

    def _cumulative(self, total: int) -> list[int]:
        return cumulative_targets(total, self.pruning_periods, self.selection.pruning_schedule)

    def _period_target(self, period: int) -> int:
        """Zero groups to reach by the end of ``period`` (set by the period's selection)."""
        if self._oto["selected_period"] == period:
            return int(self._oto["period_target"])
        if self._plain_target:
            return self._cumulative(self.target_num_zero_groups)[period]
        return int(self._oto["committed"].sum())

    def _config(self) -> dict[str, Any]:
        out = {k: getattr(self, k) for k in (
            "target_group_sparsity", "start_pruning_step", "pruning_steps", "pruning_periods")}
        out["selection"] = self.selection.to_dict()
        return out

    def _set_config(self, config: dict[str, Any]) -> None:
        config = dict(config)
        saved = config.pop("selection", None)
        if saved is not None:
            saved = SelectionConfig.from_dict(saved)
            if saved.unit != self.selection.unit:
                raise ValueError(f"the state was saved with a {saved.unit} target, this optimizer has a "
                                 f"{self.selection.unit} target: build it with the saved selection {saved.to_dict()}")
            self.selection = self._selector.config = saved
        super()._set_config(config)

    def metrics(self) -> dict[str, float]:
        return {**super().metrics(), **self.selection_metrics()}

    def selection_metrics(self) -> dict[str, float]:
        """With a FLOPs or parameter target: the target and the kept share planned so far (the
        groups frozen or shrinking now all removed), as fractions of the dense model."""
        unit = self.selection.unit
        if unit == "groups":
            return {}
        planned = self._oto["committed"] | self._oto["active"]
        total = self._selector.total()
        return {f"target_kept_{unit}": float(self.selection.target_kept),
                f"planned_kept_{unit}": (total - self._selector.removed(planned)) / total}

    # -- schedule ------------------------------------------------------------------------------
    def phase(self) -> str:
        k = self.step_count
        if k < self.start_pruning_step:
            return "warmup"
        return "pruning" if k < self.start_pruning_step + self.pruning_steps else "finished"

    def _where(self) -> tuple[int, int, int] | None:
        """``(period, step in period, period length)`` of the next step, None outside the window."""
        return schedule_period(self.step_count, self.start_pruning_step, self.pruning_steps, self.pruning_periods)

    def _next_selection(self) -> int | None:
        """The step at which the next period starts (this one included), None after the last."""
        base = self.pruning_steps // self.pruning_periods
        j = self.step_count - self.start_pruning_step
        period = 0 if j <= 0 else -(-j // base)
        return None if period >= self.pruning_periods else self.start_pruning_step + period * base

    def _saliency_steps(self) -> int:
        if self.selection.saliency_steps is not None:
            return self.selection.saliency_steps
        return min(self.pruning_steps // self.pruning_periods, MAX_DEFAULT_SALIENCY_STEPS)

    def _before_step(self) -> None:
        """Accumulate the loss-based saliency from the raw gradients on the steps before a selection."""
        if self.selection.saliency not in LOSS_SALIENCIES:
            return
        upcoming = self._next_selection()
        if upcoming is None or upcoming - self.step_count >= self._saliency_steps():
            return
        dots = group_dots(self._index, self._local_params(), self._local_grads(),
                          absolute=self.selection.saliency == "taylor_abs")
        self._oto["saliency_sum"] += dots
        if self.selection.saliency == "fisher":  # the others read only the sum (the state keeps both)
            self._oto["saliency_sq"] += dots.square()
        self._oto["saliency_batches"] += 1

    # -- selection -----------------------------------------------------------------------------
    def _importance(self, candidates: torch.Tensor, mix: Mix | None, norms: torch.Tensor) -> torch.Tensor:
        """Importance of every group by ``selection.saliency`` (>= 0 on candidates; higher: keep)."""
        name = self.selection.saliency
        if name in LOSS_SALIENCIES:
            return loss_saliency(name, self._oto["saliency_sum"], self._oto["saliency_sq"])
        if name == "magnitude":
            return norms
        if mix is None:
            raise ValueError(f"{self.method} has no mixed criterion")
        value = mix(candidates).float()
        low = value[candidates].min() if candidates.any() else value.new_zeros(())
        # Cost weighting divides importance by cost: a mix that goes negative is shifted first.
        return value - low if low < 0 else value

    def _choose_redundant(self, period: int, mix: Mix | None = None, extra: int = 0) -> None:
        """Start ``period``: choose the groups to remove on top of the frozen ones so that the
        period's share of the target is reached (plus ``extra`` spare groups, for a plain group
        target), by saliency against cost; they become active. No layer is emptied."""
        committed = self._oto["committed"]
        candidates = self._prunable & ~committed
        budget = self._period_budget(period)
        chosen = torch.zeros_like(candidates)
        if candidates.any() and self._selector.removed(committed) < budget:
            if self._plain_target:
                budget += extra
            norms = self._index.sq_norms(self._local_params()).clamp_min(0).sqrt()
            importance = self._importance(candidates, mix, norms)
            blocked = torch.zeros_like(candidates)
            while True:
                chosen = self._selector.choose(budget, importance, norms, candidates & ~blocked, committed,
                                               None if self._plain_target else self._target_removed()
                                               ).to(self.device)
                feasible = self._feasible(chosen, importance)
                if torch.equal(feasible, chosen):
                    break
                blocked |= chosen & ~feasible  # never pick those again; the next-best fill their places
            self._oto["active"] = chosen
        self._oto["selected_period"] = period
        self._oto["period_target"] = (self._cumulative(self.target_num_zero_groups)[period]
                                      if self._plain_target else int((committed | chosen).sum()))
        self._oto["saliency_sum"].zero_()
        self._oto["saliency_sq"].zero_()
        self._oto["saliency_batches"] = 0


def schedule_period(step: int, start: int, steps: int, periods: int) -> tuple[int, int, int] | None:
    """Where ``step`` (0-based) falls in a pruning window of ``steps`` steps split into ``periods``.

    Returns ``(period, t, length)``: the period index, the step's index inside it and the period's
    length (the last period also takes the remainder of ``steps / periods``), or None outside the
    window.
    """
    j = step - start
    if j < 0 or j >= steps:
        return None
    base = steps // periods
    p = min(j // base, periods - 1)
    begin = p * base
    length = (steps - begin) if p == periods - 1 else base
    return p, j - begin, length


def cumulative_targets(total: int, periods: int, schedule: str = "linear") -> list[int]:
    """Zero groups to reach by the end of each period, spread by ``schedule``
    (:func:`~hf_oto.optim.selection.schedule_fraction`), the last one exactly ``total``."""
    if schedule == "linear":  # integer arithmetic: no rounding at exact multiples
        return [(total * (p + 1)) // periods for p in range(periods)]
    return [int(total * schedule_fraction(schedule, p, periods) + 1e-9) for p in range(periods - 1)] + [total]
