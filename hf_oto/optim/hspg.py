"""HSPG: half-space stochastic projected gradient (OTO, NeurIPS 2021) for group-lasso training."""

from __future__ import annotations

from typing import Any, Iterable

import torch
from torch import nn

from ..groups import ZeroInvariantGroups
from .base import GroupSparseOptimizer, StepPlan, check_int, check_number
from .halfspace import deepest, subgradient_trial

#: Default group-lasso weight per base variant (the authors' defaults).
LMBDA_DEFAULTS = {"sgd": 1e-3, "adam": 1e-2, "adamw": 1e-2}
#: Adaptive epsilon, as the authors' scripts do it: every ``adapt_epsilon_every`` half-space steps,
#: unless the group sparsity rose by more than ``_STALL`` since the last check, each bounded kind
#: still below its bound gets ``_EPSILON_STEP`` more epsilon (at most ``_EPSILON_MAX``); a kind at
#: its bound goes back to 0.
_EPSILON_STEP, _EPSILON_MAX, _STALL = 0.1, 0.999, 0.01
#: Adaptation period of the authors' BERT configurations, used when the stage has no set length.
_ADAPT_EVERY_DEFAULT = 200


class HSPG(GroupSparseOptimizer):
    """Half-Space Stochastic Projected Gradient for ``min f(x) + lmbda * sum_g ||x_g||``.

    The sum runs over the prunable groups. Schedule (optimizer steps):

    - ``[0, start_pruning_step)``: proximal stage (reported as phase ``"warmup"``): the base step
      ``z = x - lr*d``, then group soft-thresholding ``x_g <- max(0, 1 - lr*lmbda/||z_g||) z_g``.
      Zeros it creates are not frozen: a later gradient may revive them, as proximal SGD does.
    - then the half-space stage, for ``pruning_steps`` steps (None: for the rest of training).
      Every zero prunable group is frozen; each non-zero prunable group takes the subgradient step
      ``y_g = x_g - lr*d_g - lr*lmbda*x_g/||x_g||`` and is projected to exactly zero (and frozen)
      when it leaves the half-space of its current point, ``<y_g, x_g> < epsilon_k ||x_g||^2``
      (k: the group's kind, ``"head"``, ``"neuron"``, ...). The penalty acts on every non-zero
      group for the whole stage.
    - afterwards (phase ``"finished"``): the base optimizer alone; frozen groups stay zero.

    Upper bounds: ``target_group_sparsity`` bounds the zero fraction of every kind,
    ``upper_group_sparsity`` (``{kind: bound}``) sets it per kind (kinds it does not name keep
    ``target_group_sparsity``, or no bound). A kind at its bound gets no more projections (the
    deepest crossings go first when the bound binds; no projection empties a layer), but its
    groups keep the penalty. Once every kind is at its bound, ``pruning_finished`` is True: the
    zero set is final.

    Adaptive epsilon (``adapt_epsilon_every``): every that many half-space steps, if the group
    sparsity rose by at most 0.01 since the last check, each bounded kind below its bound gets
    0.1 more epsilon (up to 0.999), and a kind at its bound goes back to 0. None (default): every
    ``pruning_steps // 10`` steps (200 when the stage has no set length); 0: never. Kinds with no
    bound keep ``epsilon``.

    ``d`` is the base optimizer's direction (momentum / Adam scaling act on the loss gradient only;
    the penalty stays outside them, like decoupled weight decay). The penalty keeps shrinking the
    surviving groups after the bounds are met, as published: decay ``opt.lmbda`` yourself if you
    want it to stop (the authors' scripts divide it by 10 at set epochs).

    Checked against the authors' HSPG (tianyic/only_train_once, the 2021 ``optimizer/hspg.py``
    and ``train/run_bert_squad.py``): the same subgradient trial step and half-space test, zero
    groups held at zero, per-kind upper bounds, the epsilon adaptation (0.1 steps every N steps
    when the sparsity stalls, back to 0 at the bound; their BERT runs adapt the FFN kind every 200
    steps with a bound of 0.1-0.9), the penalty kept after the bound. Differences: their first
    stage is a subgradient step (no exact zeros), ours proximal (its zeros are frozen when the
    half-space stage starts); their SGD momentum also acts on the penalty, ours on the loss
    gradient only; they bound each layer at its kind's bound and, when too many groups cross,
    project a random subset whose size is the excess over the bound, where we bound each kind as
    a whole and project the deepest crossings up to the bound, deterministically (data-parallel
    replicas must agree); lambda decay is left to the user (their scripts divide it by 10 at set
    epochs).

    Example:
        >>> opt = HSPG(model, groups, variant="sgd", lr=0.1, lmbda=1e-3, start_pruning_step=1000,
        ...            target_group_sparsity=0.5)                        # doctest: +SKIP
    """

    method = "hspg"
    _stats_dd = False  # neither stage reads ||d_g||^2

    def __init__(self, model: nn.Module, groups: ZeroInvariantGroups, *, variant: str = "adamw", lr: float = 1e-3,
                 weight_decay: float = 0.0, momentum: float = 0.0, nesterov: bool = False,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 lmbda: float | None = None, epsilon: float = 0.0, target_group_sparsity: float | None = None,
                 upper_group_sparsity: dict[str, float] | None = None, adapt_epsilon_every: int | None = None,
                 start_pruning_step: int = 0, pruning_steps: int | None = None,
                 param_groups: Iterable[dict[str, Any]] | None = None) -> None:
        self.lmbda = check_number("lmbda", LMBDA_DEFAULTS.get(variant, 1e-3) if lmbda is None else lmbda, low=0.0)
        self.epsilon = check_number("epsilon", epsilon, low=0.0, high=1.0, high_open=True)
        self.target_group_sparsity = None if target_group_sparsity is None else check_number(
            "target_group_sparsity", target_group_sparsity, low=0.0, high=1.0, high_open=True)
        self.start_pruning_step = check_int("start_pruning_step", start_pruning_step)
        self.pruning_steps = None if pruning_steps is None else check_int("pruning_steps", pruning_steps, low=1)
        self.adapt_epsilon_every = None if adapt_epsilon_every is None else check_int(
            "adapt_epsilon_every", adapt_epsilon_every)
        self.upper_group_sparsity = _check_bounds(upper_group_sparsity, groups)
        super().__init__(model, groups, variant=variant, lr=lr, weight_decay=weight_decay, momentum=momentum,
                         nesterov=nesterov, betas=betas, eps=eps, param_groups=param_groups)
        self._kinds = sorted({g.kind for g in groups if g.prunable})
        kind_index = {k: i for i, k in enumerate(self._kinds)}
        self._kind_of = torch.tensor([kind_index.get(g.kind, -1) if g.prunable else -1 for g in groups],
                                     dtype=torch.long, device=self.device)
        self._refresh_bounds()
        self._oto.update({
            "halfspace_started": False,
            "epsilon": torch.full((len(self._kinds),), self.epsilon, dtype=torch.float64, device=self.device),
            "last_sparsity": 0.0,
            "num_halfspace": 0,     # projected by the half-space test
            "num_proximal": 0,      # zeroed by the proximal stage, frozen when the half-space stage began
        })

    # -- bounds ----------------------------------------------------------------------------------
    def _refresh_bounds(self) -> None:
        """Per kind: the most zero groups allowed (``_limits``) and whether it is bounded at all."""
        default = 1.0 if self.target_group_sparsity is None else self.target_group_sparsity
        bounds = torch.tensor([float(self.upper_group_sparsity.get(k, default)) for k in self._kinds],
                              dtype=torch.float64, device=self.device)
        counts = torch.bincount(self._kind_of[self._kind_of >= 0], minlength=len(self._kinds))
        self._limits = (bounds * counts + 1e-9).floor().long()
        self._bounded = bounds < 1.0

    def _set_config(self, config: dict[str, Any]) -> None:
        super()._set_config(config)
        self._refresh_bounds()

    def _zeros_per_kind(self, mask: torch.Tensor) -> torch.Tensor:
        kinds = self._kind_of[mask & (self._kind_of >= 0)]
        return torch.bincount(kinds, minlength=len(self._kinds))

    @property
    def target_num_zero_groups(self) -> int:
        """The upper bound on zero groups: the sum of the kinds' bounds."""
        return int(self._limits.sum())

    @property
    def pruning_finished(self) -> bool:
        """True after the half-space stage, or once every kind is at its bound."""
        if self.phase() == "finished":
            return True
        return bool((self._zeros_per_kind(self._oto["committed"]) >= self._limits).all())

    def _config(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in (
            "lmbda", "epsilon", "target_group_sparsity", "upper_group_sparsity", "adapt_epsilon_every",
            "start_pruning_step", "pruning_steps")}

    def metrics(self) -> dict[str, float]:
        out = super().metrics()
        out.update({"num_halfspace_projections": float(self._oto["num_halfspace"]),
                    "num_proximal_zeros": float(self._oto["num_proximal"])})
        for k, e in zip(self._kinds, self._oto["epsilon"].tolist()):
            out[f"epsilon_{k}"] = e
        return out

    def phase(self) -> str:
        k = self.step_count
        if k < self.start_pruning_step:
            return "warmup"
        if self.pruning_steps is not None and k >= self.start_pruning_step + self.pruning_steps:
            return "finished"
        return "pruning"

    # -- the step ----------------------------------------------------------------------------------
    def _wants_stats(self) -> str | None:
        phase = self.phase()
        if phase == "warmup":
            return "after"  # the proximal operator reads ||z_g|| only
        return "trial" if phase == "pruning" else None

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
        committed = self._oto["committed"]
        free = self._prunable & ~committed
        live = free & (s["xx"] > 0)
        zero = free & ~live  # zero groups are held at zero (frozen) for the whole stage
        if not self._oto["halfspace_started"]:
            self._oto["halfspace_started"] = True
            self._oto["num_proximal"] = int(zero.sum())
        epsilon = torch.where(self._kind_of >= 0, self._oto["epsilon"][self._kind_of.clamp_min(0)].float(),
                              torch.zeros((), device=self.device))
        coef, cross, depth = subgradient_trial(s, torch.full_like(s["xx"], self.lmbda), live, epsilon)
        room = self._limits - self._zeros_per_kind(committed | zero)
        capped = torch.zeros_like(cross)
        for k in range(len(self._kinds)):  # a few kinds, not a loop over groups
            capped |= deepest(cross & (self._kind_of == k), depth, int(room[k]))
        cross = self._feasible(capped, depth)  # keep a layer's shallowest crossing if all would go
        self._oto["num_halfspace"] += int(cross.sum())
        self._adapt_epsilon(committed | zero | cross)
        return StepPlan(penalty=coef, penalized=self._positions("live", live), project=cross | zero)

    def _adapt_epsilon(self, zero_after: torch.Tensor) -> None:
        every = self.adapt_epsilon_every
        if every is None:
            every = max(1, self.pruning_steps // 10) if self.pruning_steps is not None else _ADAPT_EVERY_DEFAULT
        if every == 0 or (self.step_count - self.start_pruning_step + 1) % every != 0:
            return
        sparsity = float(zero_after.sum()) / max(self.num_prunable, 1)
        stalled = sparsity <= self._oto["last_sparsity"] + _STALL
        self._oto["last_sparsity"] = sparsity
        if not stalled:
            return
        below = self._zeros_per_kind(zero_after) < self._limits
        eps = self._oto["epsilon"]
        raised = (eps + _EPSILON_STEP).clamp_max(_EPSILON_MAX)
        bounded = self._bounded
        self._oto["epsilon"] = torch.where(bounded & below, raised, torch.where(bounded, torch.zeros_like(eps), eps))


def _check_bounds(bounds: dict[str, float] | None, groups: ZeroInvariantGroups) -> dict[str, float]:
    if bounds is None:
        return {}
    if not isinstance(bounds, dict):
        raise ValueError(f"upper_group_sparsity must be a dict kind -> bound, got {bounds!r}")
    kinds = sorted({g.kind for g in groups if g.prunable})
    out = {}
    for k, v in bounds.items():
        if k not in kinds:
            raise ValueError(f"upper_group_sparsity names kind {k!r}, but the prunable groups are of kinds "
                             f"{', '.join(kinds) or '(none)'}")
        out[k] = check_number(f"upper_group_sparsity[{k!r}]", v, low=0.0, high=1.0)
    return out
