"""DSP's learnable structure: which layers take part, soft filter-to-group assignments, the
group-lasso penalty over (filter group, input channel) blocks, FLOPs accounting and the hardening
step that prunes blocks to a FLOPs target.

What we confirmed in the authors' public code (irishev/DSP, ``dsp_module.py`` / ``cifar_model.py``)
and what we do differently:

* Each pruned layer holds logits of shape (G, filters), initialised to zeros there, turned into a
  soft membership with ``gumbel_softmax(logits / temperature)`` over the G candidate groups
  (temperature 1 by default). We start from small random logits instead (without Gumbel noise a
  uniform start has no gradient that tells the groups apart) and anneal the temperature.
* Their penalty sums, per group and input channel, the L2 norm of the membership-weighted weights,
  scaled by a group-size term and a per-layer factor from the input size and kernel size; it is
  applied as an explicit decay step on the weights, ramped linearly over training, and the
  assignment is learned through a one-step look-ahead of the training loss. We instead add
  ``penalty(t) * R`` to the loss (the trainer's protocol) and let autograd reach both the weights
  and the logits; the look-ahead term is dropped, so the assignment minimises the penalty for the
  current weights. Our R weights block (g, c) by ``sqrt(n_g * a_l)`` (n_g: soft group size, a_l:
  multiply-adds per weight of layer l, relative to the mean over layers), a group-lasso weight
  proportional to the square root of the block's multiply-adds. With it R is concave in the soft
  assignment (a sum of geometric means of linear functions), so its minimum is a hard assignment,
  and merging two groups never lowers it (Cauchy-Schwarz), so groups do not collapse into one;
  filters are pulled toward the group whose strong input channels match theirs.
* Their pruning step (``PruneWrapper``) hardens assignments by argmax, ranks each group's input
  channels by their share of the layer's energy, removes channels whose cumulative share stays
  under a threshold beta shared by all layers, and bisects beta to hit the FLOPs target. That is
  our ``allocation="global"`` (blocks sorted by energy per filter); the default ``"layer"`` makes
  every layer lose the same fraction of its multiply-adds, which kept more accuracy in
  ``bench/dsp.py``. FLOPs are the model's real FLOPs (every op, from ``torch.utils.flop_counter``),
  so the target is a fraction of the whole model.
"""

from __future__ import annotations

import math
import re
import warnings
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ...measure import count_flops
from .config import DSPConfig

#: Name of the logits parameter DSP registers on every layer it trains.
LOGITS = "dsp_logits"
_EPS = 1e-12


# -- which layers --------------------------------------------------------------------------------

def ineligible_reason(module: nn.Module, config: DSPConfig) -> str | None:
    """Why DSP cannot (or by these settings will not) restructure ``module``; ``None`` if it can."""
    if isinstance(module, nn.modules.conv._ConvNd):
        if module.transposed:
            return "transposed convolution"
        if not isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            return f"unsupported convolution type {type(module).__name__}"
        if module.groups > 1:
            if module.groups == module.in_channels:
                return (f"depthwise convolution (groups={module.groups}): each filter already reads a single "
                        "input channel")
            return f"already a grouped convolution (groups={module.groups})"
        filters, inputs = module.out_channels, module.in_channels
    elif isinstance(module, nn.Linear):
        filters, inputs = module.out_features, module.in_features
    else:
        return f"{type(module).__name__} is not a convolution or linear layer"
    if filters < config.max_groups:
        return f"{filters} filters, fewer than max_groups={config.max_groups}"
    if inputs < config.min_in_channels:
        return f"{inputs} input channels, fewer than min_in_channels={config.min_in_channels}"
    return None


def find_dsp_layers(model: nn.Module, config: DSPConfig) -> tuple[dict[str, nn.Module], dict[str, str]]:
    """The layers DSP trains, and the convolution/linear layers it skips with the reason.

    Raises ``ValueError`` when an ``include`` pattern that is an exact module path names a layer
    that cannot take part, or when no layer is left.

    Example:
        >>> layers, skipped = find_dsp_layers(model, DSPConfig(max_groups=4))    # doctest: +SKIP
        >>> skipped["features.0.0"]                                               # doctest: +SKIP
        '3 input channels, fewer than min_in_channels=8'
    """
    include = [re.compile(p) for p in config.include] if config.include is not None else None
    exclude = [re.compile(p) for p in config.exclude]
    modules = dict(model.named_modules())
    if config.include is not None:
        for pattern in config.include:
            # An exact path of a leaf layer is a request for that layer: refuse it loudly.
            if pattern in modules and not any(True for _ in modules[pattern].children()):
                reason = ineligible_reason(modules[pattern], config)
                if reason:
                    raise ValueError(f"DSP cannot restructure layer {pattern!r}: {reason}")
    layers: dict[str, nn.Module] = {}
    skipped: dict[str, str] = {}
    for path, module in modules.items():
        if not isinstance(module, (nn.modules.conv._ConvNd, nn.Linear)):
            continue
        if include is not None and not any(p.search(path) for p in include):
            skipped[path] = "not matched by include"
            continue
        if any(p.search(path) for p in exclude):
            skipped[path] = "matched by exclude"
            continue
        reason = ineligible_reason(module, config)
        if reason:
            skipped[path] = reason
        else:
            layers[path] = module
    if not layers:
        detail = "; ".join(f"{k}: {v}" for k, v in list(skipped.items())[:6]) or "the model has none"
        raise ValueError(f"DSP found no layer to restructure ({detail})")
    return layers, skipped


# -- per-layer maths -----------------------------------------------------------------------------

def filter_channel_energy(weight: torch.Tensor) -> torch.Tensor:
    """``Q[f, c] = ||W[f, c, ...]||^2``: the energy filter f draws from input channel c."""
    return weight.reshape(weight.shape[0], weight.shape[1], -1).float().square().sum(-1)


def soft_assignment(logits: torch.Tensor, temperature: float, gumbel: bool = False,
                    generator: torch.Generator | None = None) -> torch.Tensor:
    """(G, filters) membership, each column summing to 1: ``softmax((logits + g) / T)`` over groups."""
    if gumbel:
        u = torch.rand(logits.shape, generator=generator, device=logits.device, dtype=logits.dtype)
        exponential = (-torch.log(u.clamp_min(1e-20))).clamp_min(1e-20)
        logits = logits - torch.log(exponential)  # + Gumbel(0, 1) noise
    return torch.softmax(logits / temperature, dim=0)


def block_penalty(energy: torch.Tensor, membership: torch.Tensor, layer_weight: float) -> torch.Tensor:
    """``sum_g sqrt(n_g * a) * sum_c ||W_(g,c)||`` with soft membership (see the module docstring).

    ``energy`` is ``Q`` (filters x inputs), ``membership`` is (G x filters).
    """
    blocks = membership @ energy                      # (G, C): soft energy of every block
    sizes = membership.sum(dim=1)                     # (G,): soft group sizes
    # eps inside both roots: a group emptied by a low temperature must not give an infinite gradient.
    return ((sizes * layer_weight + _EPS).sqrt() * (blocks + _EPS).sqrt().sum(dim=1)).sum()


def hard_assignment(logits: torch.Tensor) -> torch.Tensor:
    """Group index of every filter: the most likely group of its ``(groups, filters)`` logits."""
    return logits.argmax(dim=0)


@dataclass
class LayerCost:
    """FLOPs facts of one DSP layer, measured in one forward pass."""

    filters: int
    inputs: int
    unit_macs: int  # multiply-adds of one (filter, input channel) pair: kernel area x output positions

    @property
    def dense_macs(self) -> int:
        return self.filters * self.inputs * self.unit_macs


def profile(model: nn.Module, inputs: Any, paths: list[str]) -> tuple[int, dict[str, LayerCost]]:
    """Total forward FLOPs of ``model`` on ``inputs`` and the cost of every layer in ``paths``."""
    modules = {p: model.get_submodule(p) for p in paths}
    positions: dict[str, int] = {}

    def hook(path):
        def fn(module, args, output):
            # Output positions per filter (batch included); a layer called twice counts twice.
            positions[path] = positions.get(path, 0) + output.numel() // module.weight.shape[0]
        return fn

    handles = [m.register_forward_hook(hook(p)) for p, m in modules.items()]
    try:
        total = count_flops(model, inputs)  # the trainer's count, fused attention included
    finally:
        for h in handles:
            h.remove()
    costs = {}
    for p, m in modules.items():
        if p not in positions:
            raise ValueError(f"layer {p!r} did not run on the example inputs; exclude it from DSP")
        kernel = math.prod(m.weight.shape[2:]) if m.weight.dim() > 2 else 1
        costs[p] = LayerCost(filters=m.weight.shape[0], inputs=m.weight.shape[1], unit_macs=kernel * positions[p])
    return int(total), costs


def group_reads(weight: torch.Tensor, label: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The one-hot ``(groups, filters)`` matrix of ``label`` (a group id per filter) and the
    ``(groups, input channels)`` mask of the channels in which any of a group's filters is non-zero."""
    n, c = weight.shape[:2]
    nonzero = weight.detach().reshape(n, c, -1).ne(0).any(-1).float()
    onehot = torch.zeros(int(label.max()) + 1, n, device=weight.device)
    onehot[label, torch.arange(n, device=weight.device)] = 1.0
    return onehot, (onehot @ nonzero) > 0


def structure_macs(weight: torch.Tensor, assignment: torch.Tensor, cost: LayerCost) -> int:
    """Multiply-adds of the layer once converted: each group's filters times the input channels in
    which any of them has a non-zero weight."""
    onehot, kept = group_reads(weight, assignment)
    return int((onehot.sum(1) * kept.sum(1)).sum().item()) * cost.unit_macs


# -- hardening to a FLOPs target -----------------------------------------------------------------

ALLOCATIONS = ("global", "layer", "group")


@dataclass
class _Ranked:
    """One layer's blocks in pruning order with a non-decreasing key in [0, 1]: the blocks whose
    key is at most the knob are pruned (the last block always stays)."""

    key: torch.Tensor
    sizes: torch.Tensor   # filters in each block's group (same order)
    groups: torch.Tensor  # block -> group
    channels: torch.Tensor
    unit: int


def _rank(energy: torch.Tensor, assignment: torch.Tensor, groups: int, cost: LayerCost,
          allocation: str = "global") -> _Ranked:
    n, c = energy.shape
    blocks = torch.zeros(groups, c, dtype=torch.float64).index_add_(0, assignment, energy.double())
    sizes = torch.bincount(assignment, minlength=groups)
    present = (sizes > 0).nonzero().flatten()
    g_idx = present.repeat_interleave(c)
    c_idx = torch.arange(c).repeat(present.numel())
    e = blocks[g_idx, c_idx]
    density = e / sizes[g_idx].double()
    if allocation == "group":
        # Every group keeps the same fraction of its input channels, its strongest ones.
        within = torch.argsort(torch.argsort(blocks[present], dim=1, stable=True), dim=1).flatten()
        frac = (within.double() + 1) / c
        order = torch.argsort(frac + density / (density.max() + 1) / c, stable=True)  # ties: weaker first
        key = frac[order]
    else:
        order = torch.argsort(density, stable=True)
        if allocation == "layer":
            # Every layer loses the same fraction of its multiply-adds, weakest blocks first.
            key = sizes[g_idx[order]].double().cumsum(0) / (n * c)
        else:
            # One threshold on the cumulative share of each layer's energy (the authors' rule).
            total = float(e.sum())
            key = e[order].cumsum(0) / total if total > 0 else torch.zeros_like(e)
    g_idx, c_idx = g_idx[order], c_idx[order]
    return _Ranked(key=key, sizes=sizes[g_idx], groups=g_idx, channels=c_idx, unit=cost.unit_macs)


def _pruned_count(r: _Ranked, knob: float) -> int:
    return min(int(torch.searchsorted(r.key, torch.tensor(knob, dtype=r.key.dtype), right=True)),
               r.key.numel() - 1)


def _kept_macs(r: _Ranked, count: int) -> int:
    return int(r.sizes[count:].sum()) * r.unit


def choose_blocks(energies: dict[str, torch.Tensor], assignments: dict[str, torch.Tensor], groups: int,
                  costs: dict[str, LayerCost], total_flops: int, flops_reduction: float,
                  allocation: str = "layer") -> tuple[dict[str, torch.Tensor], float, float]:
    """Masks (filters x inputs, bool) that keep the blocks reaching ``flops_reduction`` of the
    model's FLOPs, the knob found, and the reduction reached.

    One knob in [0, 1] is bisected, the smallest meeting the target wins (so the reduction is the
    target rounded up to the next block). ``allocation`` says what the knob is:

    * ``"global"``: every layer drops its weakest blocks (energy per filter) while their cumulative
      share of the layer's energy is at most the knob (the authors' shared threshold);
    * ``"layer"``: every layer drops the same fraction of its multiply-adds, weakest blocks first;
    * ``"group"``: every group drops the same fraction of its input channels, weakest first.
    """
    if allocation not in ALLOCATIONS:
        raise ValueError(f"allocation must be one of {ALLOCATIONS}, got {allocation!r}")
    ranked = {p: _rank(energies[p].cpu(), assignments[p].cpu(), groups, costs[p], allocation) for p in energies}
    dense = sum(c.dense_macs for p, c in costs.items() if p in energies)

    def reduction(knob: float) -> float:
        kept = sum(_kept_macs(r, _pruned_count(r, knob)) for r in ranked.values())
        return 2 * (dense - kept) / total_flops

    lo, hi = 0.0, 1.0
    if reduction(hi) < flops_reduction:
        warnings.warn(f"DSP can remove at most {reduction(hi):.1%} of the FLOPs with these layers; the target "
                      f"{flops_reduction:.1%} is out of reach, pruning all but one block per layer", stacklevel=3)
        knob = hi
    elif reduction(lo) >= flops_reduction:
        knob = lo
    else:
        for _ in range(60):
            mid = (lo + hi) / 2
            if reduction(mid) >= flops_reduction:
                hi = mid
            else:
                lo = mid
        knob = hi
    masks = {}
    for p, r in ranked.items():
        count = _pruned_count(r, knob)
        keep_block = torch.ones(groups, energies[p].shape[1], dtype=torch.bool)
        keep_block[r.groups[:count], r.channels[:count]] = False
        masks[p] = keep_block[assignments[p].cpu()].to(energies[p].device)
    return masks, knob, reduction(knob)


def max_reduction(costs: dict[str, LayerCost], total_flops: int) -> float:
    """The largest FLOPs reduction DSP can reach on these layers (one input channel per layer left)."""
    removable = sum(c.dense_macs - c.filters * c.unit_macs for c in costs.values())
    return 2 * removable / total_flops if total_flops else 0.0


def apply_masks(modules: dict[str, nn.Module], masks: dict[str, torch.Tensor], fill: float = 0.0) -> None:
    """Multiply the pruned (filter, input channel) blocks by ``fill`` (0: zero them) in place."""
    with torch.no_grad():
        for p, m in modules.items():
            mask = masks.get(p)
            if mask is None:
                continue
            w = m.weight
            scale = mask.to(w.dtype) if fill == 0.0 else torch.where(mask, 1.0, fill).to(w.dtype)
            w.mul_(scale.view(*mask.shape, *([1] * (w.dim() - 2))))
