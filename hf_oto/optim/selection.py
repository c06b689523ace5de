"""Which groups a pruning period removes: saliency against cost, hardware-aligned counts, exact targets.

HESSO and DHSPG start each pruning period by choosing the groups to remove. :class:`SelectionConfig`
says how: by which saliency (:mod:`hf_oto.optim.saliency`), toward which target (a share of the
prunable groups, of the FLOPs or of the parameters) and with which alignment of the kept counts.
:class:`GroupSelector` does the choosing, vectorised over groups:

1. **Cost.** Each candidate's cost is what its removal saves in the target's unit (1 per group;
   parameters or FLOPs from :class:`hf_oto.costs.GroupCosts`, first order at the current state).
2. **Bundles.** With ``group_divisible = N`` every layer (the groups of one kind that one module
   produces) keeps a multiple of N groups: its candidates, least salient first, are cut into
   bundles that each bring the layer's kept count to the next multiple of N below, and a layer
   never goes under N. A layer whose full count is not a multiple of N keeps it, or goes to a
   multiple of N; one with fewer than N groups is left whole. ``width_multiple = W`` aligns the
   kept *width* instead, in positions of the layer's output (a head counts its head_dim rows): a
   layer of groups w positions wide keeps a multiple of W / gcd(W, w) groups, so FFN neurons and
   conv channels go in eights for W = 8 while 64-wide heads go one by one (their widths are
   aligned whatever their count). Without alignment every group is its own bundle. With
   ``uniform_layers`` a bundle spans a whole *family* (the layers of one kind whose module
   names differ only in the layer index, ``model.layers.*.mlp.gate_proj``): the
   i-th least salient group (or N groups) of every layer of the family, so that every layer of the
   family keeps the same count, which a standard config can describe.
3. **Greedy by saliency per unit of cost.** Bundles are ranked by summed saliency over summed cost
   (a layer's later bundles never before its earlier ones), ties by magnitude. Walking that order,
   a bundle is taken when its cost fits in what is still to remove; when none fits, the cheapest
   bundle left closes the gap. In a period before the last, a bundle costing more than the whole
   of what the period removes is taken in its turn instead (the period overshoots; the next ones
   absorb it), or it would never be taken at all. Kept counts come from exact evaluations of every
   prefix (:meth:`GroupCosts.kept_prefixes`), never from summed per-group costs.

So a group target is met exactly (``floor(target * prunable)`` groups, or with alignment, at most
one bundle more), and a FLOPs or parameter target is met from below: the compressed model keeps at
most the target, less by at most the cost of one bundle (one FFN neuron or conv channel, or N of
them; a head when only heads are left to remove; with ``uniform_layers``, that much in every layer
of a family).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch

from ..config_mixin import JsonConfigMixin
from ..costs import GroupCosts
from ..groups import ZeroInvariantGroups
from .saliency import SALIENCIES

#: The criterion HESSO and DHSPG use unless told otherwise (best measured, see docs/selection.md).
DEFAULT_SALIENCY = "taylor_abs"
#: Batches accumulated before each selection when ``saliency_steps`` is not set: the period's
#: length, at most this many (older gradients belong to weights that have moved on).
MAX_DEFAULT_SALIENCY_STEPS = 64
#: How the target is spread over the pruning periods (see :func:`schedule_fraction`).
PRUNING_SCHEDULES = ("linear", "cubic")
#: The schedule HESSO and DHSPG use unless told otherwise: ``linear``, as published. ``cubic`` is
#: ahead on the from-scratch ResNet at high sparsity, behind on the from-scratch ConvNeXt and when
#: fine-tuning a pretrained model with a new head (docs/selection.md measures each).
DEFAULT_PRUNING_SCHEDULE = "linear"
#: Rounds of the greedy fill (each one vectorised) before the closing bundle.
_FILL_ROUNDS = 32


@dataclass
class SelectionConfig(JsonConfigMixin):
    """How HESSO and DHSPG choose the groups each pruning period removes.

    Args:
        saliency: ``"taylor_abs"`` (default), ``"taylor"``, ``"fisher"``, ``"mixed"`` (the method's
            published mix on the update direction) or ``"magnitude"``; see :mod:`hf_oto.optim.saliency`.
        saliency_steps: batches whose gradients the loss-based scores accumulate before each
            selection (default: the period's length, at most 64; before the first period, the
            end of the warm-up).
        target_kept_flops: keep at most this fraction of the forward FLOPs (on the example
            inputs), in (0, 1]; replaces ``target_group_sparsity``.
        target_kept_params: keep at most this fraction of the parameters, in (0, 1].
        group_divisible: every layer keeps a multiple of this many heads, neurons or channels
            (a head count divisible by a tensor-parallel degree, say).
        width_multiple: every layer keeps a width (in positions: a head counts its head_dim)
            that is a multiple of this; 8 gives bf16/fp16 GPU kernels the 16-byte aligned shapes
            of their fast paths without constraining 64-wide heads. Experts are not widths.
        uniform_layers: every layer of a family (same module name but for the layer index, same
            kind and size) keeps the same number of groups, so that the compressed model fits its
            class's standard config (a GQA head group removes a KV head with its query heads, so
            the query heads per KV head stay equal too).
        pruning_schedule: how much of the target the periods remove: ``"linear"`` (default, as
            published: an equal share each) or ``"cubic"`` (Zhu and Gupta's gradual schedule:
            most of it in the first periods, so that the kept groups train longer without the
            removed ones); see :func:`schedule_fraction` and docs/selection.md for when each wins.

    Example:
        >>> SelectionConfig(target_kept_flops=0.5, group_divisible=8).unit
        'flops'
        >>> SelectionConfig(uniform_layers=True).bundled
        True
        >>> SelectionConfig(width_multiple=8).bundled
        True
        >>> SelectionConfig(target_kept_flops=0.5, target_kept_params=0.5)
        Traceback (most recent call last):
        ValueError: set one target: target_kept_flops=0.5 and target_kept_params=0.5 conflict
    """

    saliency: str = DEFAULT_SALIENCY
    saliency_steps: int | None = None
    target_kept_flops: float | None = None
    target_kept_params: float | None = None
    group_divisible: int = 1
    width_multiple: int = 1
    uniform_layers: bool = False
    pruning_schedule: str = DEFAULT_PRUNING_SCHEDULE

    config_label = "selection options"

    def __post_init__(self) -> None:
        from .base import check_int, check_number

        if self.saliency not in SALIENCIES:
            raise ValueError(f"unknown saliency {self.saliency!r}; choose from {', '.join(SALIENCIES)}")
        if self.saliency_steps is not None:
            self.saliency_steps = check_int("saliency_steps", self.saliency_steps, low=1)
        for name in ("target_kept_flops", "target_kept_params"):
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, check_number(name, value, low=0.0, high=1.0, low_open=True))
        if self.target_kept_flops is not None and self.target_kept_params is not None:
            raise ValueError(f"set one target: target_kept_flops={self.target_kept_flops} and "
                             f"target_kept_params={self.target_kept_params} conflict")
        for name in ("group_divisible", "width_multiple"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if not isinstance(self.uniform_layers, bool):
            raise ValueError(f"uniform_layers must be True or False, got {self.uniform_layers!r}")
        check_schedule(self.pruning_schedule)

    @property
    def bundled(self) -> bool:
        """Whether groups are removed in bundles (aligned counts or uniform layers), not one by one."""
        return self.group_divisible > 1 or self.width_multiple > 1 or self.uniform_layers

    @property
    def alignment(self) -> str:
        """The alignment options set, as the user wrote them (for messages)."""
        parts = [f"{name}={getattr(self, name)}" for name in ("group_divisible", "width_multiple")
                 if getattr(self, name) > 1]
        return ", ".join(parts + (["uniform_layers"] if self.uniform_layers else []))

    @property
    def unit(self) -> str:
        """What the target counts: ``"groups"``, ``"flops"`` or ``"params"``."""
        if self.target_kept_flops is not None:
            return "flops"
        return "params" if self.target_kept_params is not None else "groups"

    @property
    def target_kept(self) -> float | None:
        """The kept fraction asked for in FLOPs or parameters (None for a group target)."""
        return self.target_kept_flops if self.target_kept_flops is not None else self.target_kept_params


class GroupSelector:
    """Chooses groups to remove toward a target (see the module docstring). Works on CPU tensors
    over all groups; a selection runs once per pruning period.

    Args:
        groups: the model's zero-invariant groups.
        config: the selection settings.
        costs: parameter/FLOPs costs (needed for a FLOPs or parameter target).
    """

    def __init__(self, groups: ZeroInvariantGroups, config: SelectionConfig, costs: GroupCosts | None = None) -> None:
        if config.unit != "groups" and costs is None:
            raise ValueError(f"a {config.unit} target needs the groups' costs")
        self.config = config
        self.costs = costs
        self.groups = groups
        self.prunable = groups.prunable_mask
        self.num_groups = len(groups)
        self.block, self.block_total = _blocks(groups)
        # The unit bundles are cut across: one layer, or with uniform_layers one family of layers.
        self.unit_of = _families(groups, self.block_total) if config.uniform_layers \
            else torch.arange(self.block_total.numel())
        self.unit_layers = torch.bincount(self.unit_of)
        # A cost target is met from below by at most a bundle: there the widths a kernel reads as
        # aligned strides (kept_multiple, the experts' grouped_mm) are planned for too, where
        # compress would otherwise keep zero groups beyond the plan and land above the target.
        self.block_multiple = _block_multiples(groups, self.block, self.block_total.numel(), config,
                                               kernel_alignment=config.unit != "groups")
        self.bundled = config.bundled or bool((self.block_multiple > 1).any())

    @property
    def unit(self) -> str:
        return self.config.unit

    # -- amounts in the target's unit ----------------------------------------------------------
    def total(self) -> float:
        """The dense model's amount: prunable groups, parameters or FLOPs."""
        if self.unit == "groups":
            return float(int(self.prunable.sum()))
        return float(self.costs.total(self.unit))

    def removed(self, mask: torch.Tensor) -> float:
        """How much removing ``mask`` saves, in the target's unit."""
        mask = mask.cpu() & self.prunable
        if self.unit == "groups":
            return float(int(mask.sum()))
        return self.total() - self.costs.kept(mask, self.unit)

    def _removed_prefixes(self, order: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
        if self.unit == "groups":
            return float(int((base & self.prunable).sum())) + torch.arange(order.numel() + 1, dtype=torch.float64)
        return self.total() - self.costs.kept_prefixes(order, base, self.unit)

    def unit_costs(self, removed: torch.Tensor) -> torch.Tensor:
        """Per group, what its removal saves on top of ``removed`` (first order; float64)."""
        if self.unit == "groups":
            return self.prunable.double()
        return self.costs.marginal(removed.cpu(), self.unit)

    def reachable(self, candidates: torch.Tensor, committed: torch.Tensor) -> float:
        """The most this selection could remove: every alignment-allowed candidate (each layer
        still keeping one group, or N)."""
        importance = torch.zeros(self.num_groups, dtype=torch.float64)
        order, _, _ = self._bundles(importance, importance, self.unit_costs(committed), candidates.cpu(),
                                    committed.cpu())
        mask = committed.cpu().clone()
        mask[order] = True
        return self.removed(self.groups.feasible_removal(mask))

    # -- the choice ------------------------------------------------------------------------------
    def choose(self, budget: float, importance: torch.Tensor, tie: torch.Tensor, candidates: torch.Tensor,
               committed: torch.Tensor, limit: float | None = None) -> torch.Tensor:
        """Groups among ``candidates`` to remove on top of ``committed`` so that the removed amount
        (in the target's unit, from the dense model) reaches ``budget``: bool over all groups.

        ``importance`` (>= 0, higher: keep) is weighed against each group's cost; ``tie`` (the
        groups' magnitudes) orders equal ratios, so that all-zero scores still choose sensibly.
        ``limit``: the most any selection may remove (the whole window's target), given for the
        periods before the last. A bundle costing more than what this period still has to remove
        can never fit a period's share; when it comes in its turn, before the share is filled, it is
        taken (with the bundles ranked above it) and the period overshoots its share, which the
        next periods absorb, as long as the total stays within ``limit``. Without ``limit`` such a
        bundle is passed over for cheaper, more salient ones until the last period.
        """
        importance, tie = importance.detach().double().cpu(), tie.detach().double().cpu()
        candidates, committed = candidates.cpu() & self.prunable, committed.cpu() & self.prunable
        chosen = torch.zeros(self.num_groups, dtype=torch.bool)
        cost = self.unit_costs(committed)
        order, ends, bundle_cost = self._bundles(importance, tie, cost, candidates, committed)
        if order.numel() == 0:
            return chosen
        starts = torch.cat([ends.new_zeros(1), ends[:-1]])
        alive = torch.ones(ends.numel(), dtype=torch.bool)
        slack = 1e-9 * max(self.total(), 1.0)
        deficit = budget - self.removed(committed)
        if limit is not None and limit > budget + slack and deficit > slack:
            in_turn = self._oversized_in_turn(order, starts, ends, bundle_cost, committed, budget, deficit, limit,
                                              slack)
            if in_turn is not None:
                return in_turn
        for _ in range(_FILL_ROUNDS):
            if deficit <= slack:
                return chosen
            fit = (alive & (bundle_cost <= deficit + slack)).nonzero().flatten()
            if fit.numel() == 0:
                break
            groups_in, bounds, removed, take = self._fill(order, starts, ends, fit, committed | chosen, budget,
                                                          slack)
            if take == 0:  # the first fitting bundle overshoots after all (shared dimensions)
                alive[fit[0]] = False
                continue
            chosen[groups_in[:bounds[take - 1]]] = True
            alive[fit[:take]] = False
            deficit = budget - float(removed[take - 1])
        while deficit > slack and alive.any():  # close the gap with the cheapest bundle left
            left = alive.nonzero().flatten()
            b = int(left[torch.argmin(bundle_cost[left])])  # first minimum: the most expendable of the cheapest
            chosen[order[starts[b]:ends[b]]] = True
            alive[b] = False
            deficit = budget - self.removed(committed | chosen)
        return chosen

    def _members(self, order: torch.Tensor, starts: torch.Tensor, ends: torch.Tensor, bundles: torch.Tensor
                 ) -> torch.Tensor:
        """The groups of ``bundles`` (positions in the removal order), in that order."""
        if not self.bundled:
            return order[bundles]
        return torch.cat([order[starts[b]:ends[b]] for b in bundles.tolist()])

    def _fill(self, order: torch.Tensor, starts: torch.Tensor, ends: torch.Tensor, fit: torch.Tensor,
              base: torch.Tensor, budget: float, slack: float
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
        """One round of the exact fill over the fitting bundles ``fit`` on top of ``base``: their
        groups in order, the prefix end of each bundle, the removed amount after each, and how many
        of them stay within ``budget``."""
        groups_in = self._members(order, starts, ends, fit)
        bounds = (ends[fit] - starts[fit]).cumsum(0)
        removed = self._removed_prefixes(groups_in, base)[bounds]
        return groups_in, bounds, removed, int((removed <= budget + slack).sum())  # removed grows along the prefix

    def _oversized_in_turn(self, order: torch.Tensor, starts: torch.Tensor, ends: torch.Tensor,
                           bundle_cost: torch.Tensor, committed: torch.Tensor, budget: float, deficit: float,
                           limit: float, slack: float) -> torch.Tensor | None:
        """The choice when a bundle costlier than what is left to remove comes, in the order of
        saliency per cost, before the fitting bundles fill the share: those ranked above it, then
        it. None when no such bundle comes in time, or when taking it would pass ``limit``.

        Why: with a share per period smaller than the costliest groups (the stem's channels of a
        small CNN, several percent of its FLOPs each), the exact fill never takes them however low
        they rank, and period after period removes the cheaper groups that rank above them instead
        (a ResNet ends with its blocks' inner convolutions at half the width other methods keep;
        docs/selection.md).
        """
        over = bundle_cost > deficit + slack
        if not bool(over.any()):
            return None
        fit = (~over).nonzero().flatten()
        filled_at = ends.numel()  # position of the first fitting bundle the exact fill leaves out
        if fit.numel():
            taken = self._fill(order, starts, ends, fit, committed, budget, slack)[3]
            if taken < fit.numel():
                filled_at = int(fit[taken])
        first = int(over.nonzero().flatten()[0])
        if first >= filled_at:
            return None
        chosen = torch.zeros(self.num_groups, dtype=torch.bool)
        chosen[self._members(order, starts, ends, torch.cat([fit[fit < first], torch.tensor([first])]))] = True
        if self.removed(committed | chosen) > limit + slack:
            return None
        return chosen

    def _bundles(self, importance: torch.Tensor, tie: torch.Tensor, cost: torch.Tensor, candidates: torch.Tensor,
                 committed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Candidates in removal order, cut into bundles: ``(order, bundle ends, bundle costs)``."""
        cand = candidates.nonzero().flatten()
        ratio = importance / cost.clamp_min(1e-12 * max(float(cost.max()), 1e-30))
        if not self.bundled:
            order = cand[_lexsort(ratio[cand], tie[cand])]
            return order, torch.arange(1, order.numel() + 1), cost[order]
        blk = self.block[cand]
        inside = cand[_lexsort(blk.double(), ratio[cand], tie[cand])]  # by layer, then ratio, then magnitude
        blk = self.block[inside]
        n = self.block_multiple[blk]                                          # each layer's own multiple
        first_of = torch.zeros(int(self.block.max()) + 2, dtype=torch.long)
        seg_start = torch.ones(inside.numel(), dtype=torch.bool)
        seg_start[1:] = blk[1:] != blk[:-1]
        first_of[blk[seg_start]] = seg_start.nonzero().flatten()
        rank = torch.arange(inside.numel()) - first_of[blk]
        committed_per_block = torch.bincount(self.block[committed & (self.block >= 0)],
                                             minlength=self.block_total.numel())
        kept = (self.block_total - committed_per_block)[blk]                 # the layer's kept count now
        first = kept - torch.div(kept - 1, n, rounding_mode="floor") * n     # down to the next multiple of n
        index = torch.where(rank < first, torch.zeros_like(rank), 1 + torch.div(rank - first, n, rounding_mode="floor"))
        size = torch.where(index == 0, first, n)
        allowed = rank < kept - n                                             # the layer keeps at least n
        # A bundle needs all its groups among the candidates (unprunable members stay), and with
        # uniform layers the same rank in every layer of the family.
        unit = self.unit_of[blk]
        bundle_key = unit * (inside.numel() + 1) + index
        keys, inverse, counts = torch.unique(bundle_key, return_inverse=True, return_counts=True)
        complete = counts[inverse] == size * self.unit_layers[unit]
        ok = allowed & complete
        inside, bundle_key, index = inside[ok], bundle_key[ok], index[ok]
        if inside.numel() == 0:
            return inside, inside, torch.zeros(0, dtype=torch.float64)
        keys, inverse = torch.unique(bundle_key, return_inverse=True)
        num = keys.numel()
        imp = torch.zeros(num, dtype=torch.float64).index_add_(0, inverse, importance[inside])
        cst = torch.zeros(num, dtype=torch.float64).index_add_(0, inverse, cost[inside])
        tie_b = torch.zeros(num, dtype=torch.float64).index_add_(0, inverse, tie[inside])
        ratio_b = imp / cst.clamp_min(1e-12 * max(float(cst.max()), 1e-30))
        # A layer's (family's) later bundle never goes before its earlier ones: running maximum
        # per layer (keys are sorted by layer, then bundle index).
        layer_of = torch.div(keys, inside.numel() + 1, rounding_mode="floor")
        for layer in layer_of.unique().tolist():
            at = (layer_of == layer).nonzero().flatten()
            ratio_b[at] = torch.cummax(ratio_b[at], 0).values
        bundle_order = _lexsort(ratio_b, tie_b)
        position = torch.empty(num, dtype=torch.long)
        position[bundle_order] = torch.arange(num)
        order = inside[torch.sort(position[inverse] * (inside.numel() + 1)
                                  + torch.arange(inside.numel()), stable=True).indices]
        sizes = torch.bincount(inverse, minlength=num)[bundle_order]
        return order, sizes.cumsum(0), cst[bundle_order]


def check_schedule(schedule: str) -> None:
    """ValueError naming the choices when ``schedule`` is not a pruning schedule."""
    if schedule not in PRUNING_SCHEDULES:
        raise ValueError(f"unknown pruning_schedule {schedule!r}; choose from {', '.join(PRUNING_SCHEDULES)}")


def schedule_fraction(schedule: str, period: int, periods: int) -> float:
    """Share of the whole target removed by the end of ``period`` (0-based) of ``periods``.

    ``"linear"``: ``(p + 1) / P``. ``"cubic"``: ``1 - (1 - (p + 1) / P)^3`` (Zhu and Gupta, 2017),
    which front-loads the removal: with 10 periods, 27% of the target in the first one, 78% by
    the fourth. Both reach 1 at the last period.

    Example:
        >>> [round(schedule_fraction("cubic", p, 4), 3) for p in range(4)]
        [0.578, 0.875, 0.984, 1.0]
    """
    check_schedule(schedule)
    done = (period + 1) / periods
    return done if schedule == "linear" else 1.0 - (1.0 - done) ** 3


def _lexsort(*keys: torch.Tensor) -> torch.Tensor:
    """Indices sorting by the first key, then the next ones (stable: the rest by position)."""
    perm = torch.arange(keys[0].numel())
    for key in reversed(keys):
        perm = perm[torch.sort(key[perm], stable=True).indices]
    return perm


def _blocks(groups: ZeroInvariantGroups) -> tuple[torch.Tensor, torch.Tensor]:
    """Layer of every prunable group (-1 for the others) and each layer's total group count.

    A layer is the groups of one kind that one module produces along one dim of its tensor
    (:meth:`producing_positions`), its unprunable groups included: those count toward what the
    layer keeps (a first conv's image channels, along the other dim, do not)."""
    keys: dict[tuple[str, int, str], int] = {}
    layer = []
    for g, (module, dim) in zip(groups, groups.producing_positions()):
        layer.append(keys.setdefault((module, dim, g.kind), len(keys)))
    layer_t = torch.tensor(layer, dtype=torch.long)
    total = torch.bincount(layer_t, minlength=len(keys))
    return torch.where(groups.prunable_mask, layer_t, torch.full_like(layer_t, -1)), total


def _block_multiples(groups: ZeroInvariantGroups, block: torch.Tensor, num_blocks: int,
                     config: SelectionConfig, kernel_alignment: bool = False) -> torch.Tensor:
    """Per layer (block of :func:`_blocks`), the multiple of groups it keeps: ``group_divisible``;
    for ``width_multiple = W``, W / gcd(W, width of its groups) (experts: 1); with
    ``kernel_alignment``, likewise for the groups' own ``kept_multiple`` (in positions)."""
    multiple = torch.full((num_blocks,), config.group_divisible, dtype=torch.long)
    prunable = block >= 0
    kept = torch.tensor([g.kept_multiple for g in groups], dtype=torch.long)
    needs_kernel = kernel_alignment and bool((kept[prunable] > 1).any())
    if (config.width_multiple == 1 and not needs_kernel) or num_blocks == 0:
        return multiple
    widths = groups.group_widths()
    width = torch.zeros(num_blocks, dtype=torch.long).scatter_reduce_(
        0, block[prunable], widths[prunable], reduce="amax", include_self=False)
    kernel = torch.ones(num_blocks, dtype=torch.long).scatter_reduce_(
        0, block[prunable], kept[prunable], reduce="amax", include_self=True)
    is_expert = torch.zeros(num_blocks, dtype=torch.bool)
    is_expert[block[prunable]] = torch.tensor([g.kind == "expert" for g in groups], dtype=torch.bool)[prunable]
    for b in range(num_blocks):
        wanted = [int(kernel[b])] if needs_kernel else []
        if not is_expert[b]:
            wanted.append(config.width_multiple)
        for positions in wanted:
            multiple[b] = math.lcm(int(multiple[b]), positions // math.gcd(positions, int(width[b])))
    return multiple


def _families(groups: ZeroInvariantGroups, block_total: torch.Tensor) -> torch.Tensor:
    """Per layer (block of :func:`_blocks`), its family: the layers of the same kind and size whose
    producing module names differ only in numeric path parts (``model.layers.3.mlp.up_proj``)."""
    keys: dict[tuple[str, int, str], int] = {}
    for g, (module, dim) in zip(groups, groups.producing_positions()):
        keys.setdefault((module, dim, g.kind), len(keys))
    families: dict[tuple[str, int, str, int], int] = {}
    family = [families.setdefault((re.sub(r"(^|\.)\d+(?=\.|$)", r"\1*", module), dim, kind, int(block_total[i])),
                                  len(families))
              for (module, dim, kind), i in keys.items()]
    return torch.tensor(family, dtype=torch.long)


def check_reachable(selector: GroupSelector, committed: torch.Tensor, target_removed: float, what: str) -> None:
    """ValueError when even removing every allowed group cannot reach ``target_removed``."""
    most = selector.reachable(selector.prunable & ~committed, committed)
    if most + 1e-9 * max(selector.total(), 1.0) < target_removed:
        total = selector.total()
        raise ValueError(f"{what} cannot be met: removing every prunable group the layers can give up keeps "
                         f"{(total - most) / total:.4f} of the {selector.unit} (the rest is in layers without "
                         f"prunable structure, or kept by {selector.config.alignment or 'nothing else'})")

