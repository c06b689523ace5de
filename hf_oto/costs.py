"""What removing groups saves: parameters and FLOPs kept for any set of removed groups, per-group costs.

Both counts are sums of *multilinear* terms in the kept fraction of each pruned dimension:

- a parameter tensor keeps ``numel * prod_d kept_d / size_d`` over its sliced dims;
- a module's own FLOPs (as :func:`hf_oto.measure.count_flops` counts them for the example
  inputs: matmuls, convolutions, attention products) scale like the weights that drive them:
  its own weights (dim >= 2) when it has any (a Linear or conv computes ``numel(weight)``
  multiply-adds per output position), else the weights beneath it (the attention product of a
  self-attention module scales with the heads its q/k/v projections keep).

So the kept count of any removal set is exact, the same number ``count_flops`` and the parameter
count report for the compressed model, and a group's cost is the derivative of the kept count
with respect to its removal. Dimensions that several groups share (a conv's output channels and
the next conv's input channels) make the terms products, so costs are not simply additive;
:meth:`GroupCosts.kept_prefixes` evaluates every prefix of an ordering exactly in one pass.

Checked against ``count_flops`` of compressed models over the whole test zoo (BERT, RoBERTa,
DistilBERT, GPT-2, Llama with grouped KV, ViT, ResNet, ConvNeXt, VGG, DenseNet, UNet, MobileNet
blocks): equal to float rounding, with and without ``prune_hidden``. A module whose FLOPs follow
neither its own weights nor the head dims beneath it would be the approximation.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .groups import ZeroInvariantGroups
from .measure import count_flops, num_parameters

UNITS = ("params", "flops")


class GroupCosts:
    """Kept parameters and FLOPs as functions of the removed groups (bool masks over all groups).

    Build it with :meth:`measure`. Only prunable groups ever count as removed.

    Example:
        >>> import torch
        >>> from hf_oto import find_groups
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
        >>> groups = find_groups(model, (torch.randn(1, 4),))
        >>> costs = GroupCosts.measure(model, groups)
        >>> costs.total("params"), costs.total("flops")
        (58, 96)
        >>> remove = torch.zeros(len(groups), dtype=torch.bool)
        >>> remove[groups.prunable_mask.nonzero()[:4]] = True                # 4 of the 8 neurons
        >>> costs.kept(remove, "params"), costs.kept(remove, "flops")
        (30.0, 48.0)
    """

    def __init__(self, num_groups: int, prunable: torch.Tensor,
                 dims: list[tuple[int, torch.Tensor, torch.Tensor]],
                 terms: dict[str, dict[tuple[int, ...], float]], totals: dict[str, float]) -> None:
        self.num_groups = num_groups
        self.prunable = prunable.bool().cpu()
        #: Distinct pruned dimensions: (size, positions, group of each position).
        self.dims = dims
        #: Per unit: {dims of the term: dense count}; the term ``()`` never shrinks.
        self.terms = terms
        self.totals = totals

    # -- construction --------------------------------------------------------------------------
    @classmethod
    def measure(cls, model: nn.Module, groups: ZeroInvariantGroups, inputs: Any = None,
                units: tuple[str, ...] = UNITS) -> "GroupCosts":
        """Costs of ``groups`` in ``model``; FLOPs are those of one forward pass on ``inputs``
        (default: the example inputs ``find_groups`` traced)."""
        unknown = sorted(set(units) - set(UNITS))
        if unknown:
            raise ValueError(f"unknown cost units {unknown}; choose from {UNITS}")
        params_by_name = dict(model.named_parameters(remove_duplicate=False))
        dims, dims_of = _pruned_dims(groups, params_by_name)
        hidden = {d for d, (_, _, grp) in enumerate(dims) if all(groups[g].kind == "hidden" for g in grp.unique().tolist())}
        terms: dict[str, dict[tuple[int, ...], float]] = {}
        totals: dict[str, float] = {}
        if "params" in units:
            table: dict[tuple[int, ...], float] = {}
            seen: set[int] = set()
            for p in params_by_name.values():
                if id(p) in seen:
                    continue
                seen.add(id(p))
                key = dims_of.get(id(p), ())
                table[key] = table.get(key, 0.0) + float(p.numel())
            terms["params"] = table
            totals["params"] = float(num_parameters(model))
        if "flops" in units:
            if inputs is None:
                inputs = groups.example_inputs
            if inputs is None:
                raise ValueError("counting FLOPs needs example inputs: these groups carry none (loaded from a "
                                 "file?); pass example_inputs")
            total, subtree = count_flops(model, inputs, by_module=True)
            table = {}
            for module, flops in _own_flops(subtree).items():
                if flops:
                    for key, share in _flops_shares(model, module, dims_of, hidden):
                        table[key] = table.get(key, 0.0) + flops * share
            terms["flops"] = table
            totals["flops"] = float(total)
        return cls(len(groups), groups.prunable_mask, dims, terms, totals)

    # -- evaluation ----------------------------------------------------------------------------
    def total(self, unit: str) -> float | int:
        """The dense model's count (an int when it is one)."""
        value = self.totals[self._check(unit)]
        return int(value) if float(value).is_integer() else value

    def kept(self, removed: torch.Tensor, unit: str) -> float:
        """Parameters or FLOPs kept when the groups in ``removed`` are cut."""
        fractions = self._kept_fractions(removed.bool().cpu() & self.prunable)
        return float(self._combine(self._check(unit), [f.unsqueeze(0) for f in fractions])[0])

    def kept_prefixes(self, order: torch.Tensor, base: torch.Tensor, unit: str) -> torch.Tensor:
        """Kept counts after removing ``base`` plus the first k groups of ``order``, for every k in
        ``0 .. len(order)`` (float64, length ``len(order) + 1``), in one pass."""
        order = order.cpu()
        k = order.numel()
        rank = torch.full((self.num_groups,), k, dtype=torch.long)   # k: never removed
        rank[order] = torch.arange(k)
        rank[base.bool().cpu() & self.prunable] = -1
        rank[~self.prunable] = k
        fractions = []
        for size, pos, grp in self.dims:
            first = torch.full((size,), k, dtype=torch.long).scatter_reduce(0, pos, rank[grp], "amin")
            removed = torch.bincount(first + 1, minlength=k + 2)[: k + 1].cumsum(0)
            fractions.append(1.0 - removed.double() / size)
        return self._combine(self._check(unit), fractions)

    def marginal(self, removed: torch.Tensor, unit: str) -> torch.Tensor:
        """Per group (float64): how much the kept count drops if it is removed on top of
        ``removed`` (first order: exact where the group is alone on its dimensions, which is every
        head and neuron; channels read by a layer that loses channels too cost a little less)."""
        unit = self._check(unit)
        removed = removed.bool().cpu() & self.prunable
        fractions = [f.double() for f in self._kept_fractions(removed)]
        coef = torch.zeros(len(self.dims), dtype=torch.float64)
        for key, weight in self.terms[unit].items():
            for d in key:
                rest = 1.0
                for other in key:
                    if other != d:
                        rest *= float(fractions[other])
                coef[d] += weight * rest / self.dims[d][0]
        cost = torch.zeros(self.num_groups, dtype=torch.float64)
        for (size, pos, grp), c in zip(self.dims, coef.tolist()):
            if c:
                gone = torch.zeros(size, dtype=torch.bool)
                gone[pos[removed[grp]]] = True
                alive = ~gone[pos]
                cost.index_add_(0, grp[alive], torch.full((int(alive.sum()),), c, dtype=torch.float64))
        return torch.where(self.prunable, cost, torch.zeros_like(cost))

    # -- helpers -------------------------------------------------------------------------------
    def _check(self, unit: str) -> str:
        if unit not in self.terms:
            raise ValueError(f"these costs have no {unit!r} counts (measured: {sorted(self.terms)})")
        return unit

    def _kept_fractions(self, removed: torch.Tensor) -> list[torch.Tensor]:
        out = []
        for size, pos, grp in self.dims:
            gone = torch.zeros(size, dtype=torch.bool)
            gone[pos[removed[grp]]] = True
            out.append(1.0 - gone.sum().double() / size)
        return out

    def _combine(self, unit: str, fractions: list[torch.Tensor]) -> torch.Tensor:
        length = fractions[0].numel() if fractions else 1
        out = torch.zeros(length, dtype=torch.float64)
        for key, weight in self.terms[unit].items():
            term = torch.full((length,), weight, dtype=torch.float64)
            for d in key:
                term = term * fractions[d]
            out += term
        return out


def _pruned_dims(groups: ZeroInvariantGroups, params_by_name: dict[str, nn.Parameter]
                 ) -> tuple[list[tuple[int, torch.Tensor, torch.Tensor]], dict[int, tuple[int, ...]]]:
    """Distinct pruned dimensions (equal ones merged: q, k and v rows of a layer are one) and,
    per parameter object, the dimensions its slices prune.

    Norm modules that pad their input keep their full width (see :class:`hf_oto.group_edits.NormPadding`),
    so their tensors never shrink."""
    prunable = groups.prunable_mask
    padded = [p.module + "." for p in groups.norm_paddings]
    per_tensor: dict[tuple[str, int], list[tuple[torch.Tensor, torch.Tensor]]] = {}
    for s in groups.slices:
        if not s.is_param or any(s.tensor.startswith(m) and "." not in s.tensor[len(m):] for m in padded):
            continue
        keep = prunable[s.group]
        if keep.any():
            per_tensor.setdefault((s.tensor, s.dim), []).append((s.index[keep], s.group[keep]))
    dims: list[tuple[int, torch.Tensor, torch.Tensor]] = []
    known: dict[tuple, int] = {}
    dims_of: dict[int, tuple[int, ...]] = {}
    for (name, dim), parts in per_tensor.items():
        pos = torch.cat([p for p, _ in parts])
        grp = torch.cat([g for _, g in parts])
        order = torch.argsort(pos * (int(grp.max()) + 1) + grp)
        pos, grp = pos[order], grp[order]
        size = groups.tensor_shapes[name][dim]
        key = (size, pos.numpy().tobytes(), grp.numpy().tobytes())
        if key not in known:
            known[key] = len(dims)
            dims.append((size, pos, grp))
        param = params_by_name.get(name)
        if param is not None:
            dims_of[id(param)] = tuple(sorted(set(dims_of.get(id(param), ())) | {known[key]}))
    return dims, dims_of


def _own_flops(subtree: dict[str, int]) -> dict[str, int]:
    """Per module, its FLOPs minus those of its nearest recorded descendants (containers such as
    ModuleList never run, so they have no entry of their own)."""
    own = dict(subtree)
    for name, total in subtree.items():
        parts = name.split(".") if name else []
        for cut in range(len(parts) - 1, -1, -1):
            parent = ".".join(parts[:cut])
            if parent in subtree and parent != name:
                own[parent] -= total
                break
    return own


def _flops_shares(model: nn.Module, module: str, dims_of: dict[int, tuple[int, ...]], hidden: set[int]
                  ) -> list[tuple[tuple[int, ...], float]]:
    """How a module's own FLOPs split over its weights' pruned dims: by weight size, over its own
    weights, else over the weights beneath it; ``[((), 1.0)]`` when it has none.

    A module computing without weights of its own (an attention product) contracts over the heads
    its projections produce, not over the residual width they read: its terms leave out the
    dimensions of hidden-width groups."""
    try:
        mod = model.get_submodule(module) if module else model
    except AttributeError:
        return [((), 1.0)]
    for recurse in (False, True):
        weights, seen = [], set()
        for p in mod.parameters(recurse=recurse):
            if p.dim() >= 2 and id(p) not in seen:
                seen.add(id(p))
                weights.append(p)
        if weights:
            total = float(sum(p.numel() for p in weights))
            return [(tuple(d for d in dims_of.get(id(p), ()) if recurse is False or d not in hidden),
                     p.numel() / total) for p in weights]
    return [((), 1.0)]
