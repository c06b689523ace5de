"""Turn a trained DSP model (hard filter-to-group assignments, zeroed blocks) into grouped layers.

For every layer: read which input channels each filter group still uses from the weights' zero
pattern, merge groups that read the same channels, permute the filters so that groups are
contiguous, and build a :class:`~hf_oto.compress.hf_oto_layers_dsp.DSPConv` /
:class:`~hf_oto.compress.hf_oto_layers_dsp.DSPLinear` reading only those channels.

The permutation is folded into the neighbouring layers when the zero-invariant groups show it is
exact: every output channel of the layer is its own prunable group, so the group's slices list
every tensor position that belongs to that channel (norm parameters and statistics, the
consumers' input columns, a flatten's block of columns, the other producers tied to it by a
residual add). Reordering those positions the same way computes the same function with
reordered channels. A channel set already reordered by another layer (a residual stream shared by
several pruned layers), channels tied in units (heads), and channels reaching the model output
cannot take a second order: those layers keep an output index. Because the analysis might miss a
construct, the converted model is checked on the example inputs and, if folding made a
difference, converted again without folding.
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ...compress.core import CompressionError, _run, max_relative_difference
from ...compress.hf_oto_layers_dsp import DSPConv, DSPLinear
from ...compress.manifest import update_manifest
from ...groups import ZeroInvariantGroups
from .structure import LOGITS, group_reads


@dataclass
class LayerPlan:
    """The groups of one layer: per group, its filters and the input channels it reads (sorted)."""

    path: str
    filters: list[torch.Tensor]
    channels: list[torch.Tensor]
    constant: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))
    folded: bool = False
    fold_note: str = ""

    @property
    def order(self) -> torch.Tensor:
        """Filters in execution order: group after group, then the filters that read nothing."""
        return torch.cat(self.filters + [self.constant])

    def remap_filters(self, perm: torch.Tensor) -> None:
        inv = _inverse(perm)
        self.filters = [inv[f].sort().values for f in self.filters]
        self.constant = inv[self.constant].sort().values
        self._sort_groups()

    def remap_channels(self, perm: torch.Tensor) -> None:
        inv = _inverse(perm)
        self.channels = [inv[c].sort().values for c in self.channels]

    def _sort_groups(self) -> None:
        order = sorted(range(len(self.filters)), key=lambda g: int(self.filters[g][0]))
        self.filters = [self.filters[g] for g in order]
        self.channels = [self.channels[g] for g in order]

    def summary(self) -> list[tuple[int, int]]:
        """(filters, input channels) of every group; filters reading nothing last, as (n, 0)."""
        groups = [(len(f), len(c)) for f, c in zip(self.filters, self.channels)]
        return groups + ([(len(self.constant), 0)] if len(self.constant) else [])


@dataclass
class ConversionEntry:
    """What ``convert`` did to one layer (see the ``report`` argument)."""

    path: str
    groups: list[tuple[int, int]]
    mode: str
    folded: bool
    out_index: bool
    note: str = ""
    macs_fraction: float = 1.0  # executed multiply-adds of the new layer / the dense layer's
    replaced: bool = True


def _inverse(perm: torch.Tensor) -> torch.Tensor:
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(perm.numel(), device=perm.device)
    return inv


def plan_layer(path: str, weight: torch.Tensor, assignment: torch.Tensor) -> LayerPlan:
    """Groups of a layer from its hard ``assignment`` (filter -> group id) and its zero pattern.

    A group reads the input channels where any of its filters has a non-zero weight; groups
    reading the same channels are merged (exact). Filters of groups that read nothing output only
    their bias: they become constant rows, at no multiply-add.
    """
    w = weight.detach().cpu()
    n, c = w.shape[:2]
    assignment = assignment.detach().cpu().long()
    if assignment.shape != (n,):
        raise ValueError(f"assignment of {path!r} must have one group id per filter ({n}), got {tuple(assignment.shape)}")
    _, label = torch.unique(assignment, return_inverse=True)
    _, reads = group_reads(w, label)                      # (G, C)
    groups = reads.shape[0]
    live = reads.any(1)
    constant = torch.zeros(0, dtype=torch.long)
    if not live.any():
        # Every filter is constant; one zero-weight group reading channel 0 keeps the layer a layer.
        reads = torch.zeros(1, c, dtype=torch.bool)
        reads[0, 0] = True
        label = torch.zeros(n, dtype=torch.long)
    else:
        constant = (~live[label]).nonzero().flatten()
        merged_rows, merged = torch.unique(reads[live], dim=0, return_inverse=True)
        to_merged = torch.full((groups,), -1, dtype=torch.long)
        to_merged[live.nonzero().flatten()] = merged
        label = to_merged[label]
        reads = merged_rows
    filters = [(label == g).nonzero().flatten() for g in range(reads.shape[0])]
    keep = [g for g, f in enumerate(filters) if f.numel()]
    plan = LayerPlan(path, [filters[g] for g in keep], [reads[g].nonzero().flatten() for g in keep], constant)
    plan._sort_groups()
    return plan


# -- folding permutations ------------------------------------------------------------------------

class _Tensors:
    """Name -> tensor for parameters and buffers, with the groups' alias names resolved."""

    def __init__(self, model: nn.Module, groups: ZeroInvariantGroups) -> None:
        self.tensors = dict(model.named_parameters(remove_duplicate=False))
        self.tensors.update(model.named_buffers(remove_duplicate=False))
        self.canonical = {}
        for canon, aliases in groups.tensor_aliases.items():
            for a in aliases:
                self.canonical[a] = canon
        self.slices = {(s.tensor, s.dim): s for s in groups.slices}

    def canon(self, name: str) -> str:
        return self.canonical.get(name, name)


def _try_fold(plan: LayerPlan, groups: ZeroInvariantGroups, tensors: _Tensors, claimed: set[int],
              plans: dict[str, LayerPlan]) -> str:
    """Fold ``plan.order`` into the model's tensors; returns '' on success, else why not."""
    weight_name = tensors.canon(plan.path + ".weight")
    s0 = tensors.slices.get((weight_name, 0))
    n = plan.order.numel()
    if s0 is None:
        return "its output channels belong to no zero-invariant group"
    if s0.index.numel() != n or not torch.equal(s0.index.sort().values, torch.arange(n)) \
            or s0.group.unique().numel() != n:
        return "its output channels are tied in units (heads or channel blocks)"
    gid = torch.empty(n, dtype=torch.long)
    gid[s0.index] = s0.group
    for g in gid.tolist():
        info = groups[g]
        if not info.prunable or not info.exact:
            return f"its output channels are not freely removable ({info.reason or 'normalised dimension'})"
        if g in claimed:
            return "its output channels were already reordered for another layer (shared residual stream)"
    filter_of = torch.full((len(groups),), -1, dtype=torch.long)
    filter_of[gid] = torch.arange(n)
    order = plan.order
    perms: list[tuple[str, int, torch.Tensor]] = []
    for (name, dim), s in tensors.slices.items():
        hit = filter_of[s.group] >= 0
        if not hit.any():
            continue
        rank, pos = filter_of[s.group[hit]], s.index[hit]
        counts = torch.bincount(rank, minlength=n)
        if counts.min() != counts.max():
            return f"{name} (dim {dim}) does not hold every channel the same number of times"
        m = int(counts[0])
        key = rank * (int(pos.max()) + 1) + pos
        slots = pos[torch.argsort(key)].view(n, m)     # row i: positions of channel i, ascending
        size = groups.tensor_shapes[name][dim]
        perm = torch.arange(size)
        perm[slots.flatten()] = slots[order].flatten()
        perms.append((name, dim, perm))
    with torch.no_grad():
        for name, dim, perm in perms:
            t = tensors.tensors[name]
            t.data = t.data.index_select(dim, perm.to(t.device))
            for other in plans.values():
                if tensors.canon(other.path + ".weight") == name:
                    if dim == 0:
                        other.remap_filters(perm)
                    elif dim == 1:
                        other.remap_channels(perm)
    claimed.update(gid.tolist())
    return ""


# -- building layers -----------------------------------------------------------------------------

def build_layer(module: nn.Module, plan: LayerPlan, mode: str = "split", grouped_padding: float = 0.1,
                ) -> tuple[nn.Module, str, float]:
    """The DSP layer computing ``module`` restricted to ``plan``; returns it, the mode used and the
    fraction of the dense layer's multiply-adds it executes."""
    w = module.weight.detach()
    n, c = w.shape[:2]
    sizes_out = [len(f) for f in plan.filters]
    sizes_in = [len(ch) for ch in plan.channels]
    groups = len(sizes_out)
    exact = sum(o * i for o, i in zip(sizes_out, sizes_in))
    padded = groups * max(sizes_out) * max(sizes_in)
    if mode == "auto":
        mode = "grouped" if padded <= (1 + grouped_padding) * exact and groups > 1 else "split"
    if mode not in ("split", "grouped"):
        raise ValueError(f"mode must be 'split', 'grouped' or 'auto', got {mode!r}")
    if groups == 1:
        mode = "split"
    rows_out = sizes_out if mode == "split" else [max(sizes_out)] * groups
    rows_in = sizes_in if mode == "split" else [max(sizes_in)] * groups
    # Row r of the output before out_index holds filter row_filter[r] (-1: padding); constant
    # filters come after the computed rows.
    const = plan.constant
    row_filter = torch.full((sum(rows_out) + len(const),), -1, dtype=torch.long)
    row_filter[sum(rows_out):] = const
    in_index = []
    start = 0
    for f, ch, rows, width in zip(plan.filters, plan.channels, rows_out, rows_in):
        row_filter[start:start + len(f)] = f
        start += rows
        in_index.append(torch.cat([ch, ch[:1].expand(width - len(ch))]))  # padding reads any channel
    in_index = torch.cat(in_index)
    needs_out_index = not torch.equal(row_filter, torch.arange(n))
    out_index = torch.empty(n, dtype=torch.long)
    real = row_filter >= 0
    out_index[row_filter[real]] = real.nonzero().flatten()
    common = dict(in_sizes=rows_in, out_sizes=rows_out, mode=mode, has_out_index=needs_out_index,
                  bias=module.bias is not None, const_rows=len(const), device=w.device, dtype=w.dtype)
    if isinstance(module, nn.Linear):
        layer: nn.Module = DSPLinear(in_features=c, out_features=n, **common)
    else:
        layer = DSPConv(ndim=w.dim() - 2, in_channels=c, out_channels=n, kernel_size=tuple(w.shape[2:]),
                        stride=module.stride, padding=module.padding, dilation=module.dilation,
                        padding_mode=module.padding_mode, **common)
    with torch.no_grad():
        layer.in_index.copy_(in_index)
        if needs_out_index:
            layer.out_index.copy_(out_index)
        if module.bias is not None:
            bias = torch.zeros(len(row_filter), dtype=w.dtype, device=w.device)
            bias[real.to(w.device)] = module.bias.detach()[row_filter[real].to(w.device)]
            layer.bias.copy_(bias)
        if mode == "split":
            for g, (f, ch) in enumerate(zip(plan.filters, plan.channels)):
                layer.weights[g].copy_(w[f.to(w.device)][:, ch.to(w.device)])
        else:
            width = max(sizes_in)
            rows = max(sizes_out)
            packed = torch.zeros(groups, rows, width, *w.shape[2:], dtype=w.dtype, device=w.device)
            for g, (f, ch) in enumerate(zip(plan.filters, plan.channels)):
                packed[g, :len(f), :len(ch)] = w[f.to(w.device)][:, ch.to(w.device)]
            layer.weight.copy_(packed if isinstance(module, nn.Linear) else packed.flatten(0, 1))
    executed = sum(o * i for o, i in zip(rows_out, rows_in))
    return layer, mode, executed / (n * c)


# -- the whole model -----------------------------------------------------------------------------

def convert(
    model: nn.Module,
    assignments: dict[str, torch.Tensor],
    *,
    groups: ZeroInvariantGroups | None = None,
    example_inputs: Any = None,
    mode: str = "split",
    grouped_padding: float = 0.1,
    fold: bool = True,
    verify: bool = True,
    rtol: float = 1e-5,
    report: list[ConversionEntry] | None = None,
) -> nn.Module:
    """Replace every layer in ``assignments`` by its grouped form; returns a new model.

    Args:
        model: the trained model whose pruned (filter group, input channel) blocks are exactly zero
            (it is not modified).
        assignments: module path -> hard group id of every filter / output row.
        groups: the model's zero-invariant groups (:func:`hf_oto.find_groups`); needed to fold the
            filter permutations into the neighbouring layers, and their example inputs verify.
        example_inputs: inputs for the check, when ``groups`` has none.
        mode: ``"split"``, ``"grouped"`` or ``"auto"`` (see :class:`DSPConfig`).
        fold: fold permutations where exact (needs ``groups``); otherwise layers keep an output index.
        verify: compare outputs with ``model`` and raise :class:`hf_oto.CompressionError` if they
            differ by more than ``rtol`` of their scale.
        report: a list that receives one :class:`ConversionEntry` per layer.

    Example:
        >>> small = convert(model, {"features.1.0": torch.tensor([0, 1] * 8)}, groups=groups)  # doctest: +SKIP
        >>> hf_oto.save_pretrained(small, "out/")                                             # doctest: +SKIP
    """
    inputs = example_inputs if example_inputs is not None else getattr(groups, "example_inputs", None)
    reference = _run(model, inputs) if verify and inputs is not None else None
    fold = fold and groups is not None
    result, entries = _convert(model, assignments, groups, mode, grouped_padding, fold)
    if reference is not None:
        diff = max_relative_difference(reference, _run(result, inputs))
        if diff > rtol and fold:
            warnings.warn(f"folding DSP permutations changed the outputs by {diff:.3g} of their scale; the "
                          "zero-invariant groups missed a construct, converting again with output indices",
                          stacklevel=2)
            result, entries = _convert(model, assignments, groups, mode, grouped_padding, False)
            diff = max_relative_difference(reference, _run(result, inputs))
        if diff > rtol:
            raise CompressionError(f"the DSP-converted model's outputs differ from the trained model's by {diff:.3g} "
                                   f"of their scale (> {rtol})")
    if report is not None:
        report.extend(entries)
    return result


def _convert(model: nn.Module, assignments: dict[str, torch.Tensor], groups: ZeroInvariantGroups | None,
             mode: str, grouped_padding: float, fold: bool) -> tuple[nn.Module, list[ConversionEntry]]:
    target = copy.deepcopy(model)
    modules = {p: target.get_submodule(p) for p in assignments}
    for p, m in modules.items():
        if not isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)) or getattr(m, "groups", 1) != 1:
            raise ValueError(f"layer {p!r} ({type(m).__name__}) cannot be converted by DSP")
    plans = {p: plan_layer(p, modules[p].weight, a) for p, a in assignments.items()}
    if fold:
        groups.check_model(target)
        tensors = _Tensors(target, groups)
        claimed: set[int] = set()
        for p, plan in plans.items():
            # A layer already in group order still claims its channels, so that no other layer
            # reorders them afterwards.
            in_order = torch.equal(plan.order, torch.arange(plan.order.numel()))
            note = _try_fold(plan, groups, tensors, claimed, plans)
            plan.folded, plan.fold_note = (not note) or in_order, note
    entries = []
    replaced = {}
    for p, plan in plans.items():
        module = modules[p]
        if LOGITS in module._parameters:
            del module._parameters[LOGITS]
        n, c = module.weight.shape[:2]
        if len(plan.filters) == 1 and len(plan.channels[0]) == c and not len(plan.constant):
            entries.append(ConversionEntry(p, plan.summary(), "dense", True, False, "one group reading every input",
                                           1.0, replaced=False))
            continue
        layer, used, fraction = build_layer(module, plan, mode, grouped_padding)
        target.set_submodule(p, layer)
        replaced[p] = layer
        entries.append(ConversionEntry(p, plan.summary(), used, plan.folded, layer.out_index is not None,
                                       plan.fold_note if not plan.folded else "", fraction))
    if replaced:
        update_manifest(target, modules=replaced)
    return target, entries
