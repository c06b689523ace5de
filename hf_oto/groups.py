"""Zero-invariant groups: the data structure, vectorised group norms and projections.

A group is stored not as a list of tensors but as positions along dimensions: for every
(tensor, dim) that any group touches there is one :class:`GroupSlice` holding two index tensors,
the positions along ``dim`` and the group each position belongs to. Group norms are then one
reduction per slice followed by an ``index_add_`` into a vector over groups, and projecting groups
to zero is one multiply per slice, whatever the number of groups.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass
from typing import Any, Iterator, Sequence

import torch

from .graph.config import GroupConfig
from .group_edits import AttributeBinding, ExpertRouting, InputCut, NormPadding
from .group_slices import (GroupSlice, _outer_of, grid_view, per_position, ragged_width,  # noqa: F401
                           reduce_except, segment_layout)
from .group_summary import format_summary


#: Positions a width read as a 16-byte aligned stride keeps a multiple of (8: bfloat16/float16;
#: float32 needs 4). ``aten._grouped_mm`` refuses other strides on CPU and GPU.
ALIGNED_MULTIPLE = 8


@dataclass(frozen=True)
class ZeroInvariantGroup:
    """One removable structure: a head, an FFN neuron, a conv channel or a hidden dimension.

    Attributes:
        index: position in :class:`ZeroInvariantGroups`.
        kind: ``"head"``, ``"neuron"``, ``"channel"`` or ``"hidden"``.
        layer: the module that holds every parameter of the group (their common prefix).
        prunable: whether optimizers and :func:`hf_oto.compress` may remove it.
        reason: why it is not prunable (empty when it is).
        num_params: parameter entries the group covers.
        exact: removing the group (when all zero) leaves every output unchanged. False only for
            hidden dimensions normalised by a LayerNorm/RMSNorm, whose statistics change.
        kept_multiple: the dimensions holding the group keep a multiple of this many positions
            (:data:`ALIGNED_MULTIPLE` where a kernel reads the width as an aligned stride, such
            as the experts' ``grouped_mm``; else 1). :meth:`ZeroInvariantGroups.feasible_removal`
            keeps zero groups to reach it.
    """

    index: int
    kind: str
    layer: str
    prunable: bool
    reason: str
    num_params: int
    exact: bool = True
    kept_multiple: int = 1


def _slice_state(s: GroupSlice) -> dict[str, Any]:
    state = {"tensor": s.tensor, "is_param": s.is_param, "dim": s.dim, "index": s.index.tolist(),
             "group": s.group.tolist()}
    if s.outer is not None:
        state.update(outer_dim=s.outer_dim, outer=s.outer.tolist())
    if s.kept:
        state["kept"] = True
    return state


class ZeroInvariantGroups:
    """The zero-invariant groups of one model, as found by :func:`hf_oto.find_groups`.

    Vectorised helpers take a list of tensors aligned with :attr:`param_names` (the parameters,
    their gradients or any optimizer state of the same shapes).

    Example:
        >>> import torch
        >>> from hf_oto import find_groups
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
        >>> groups = find_groups(model, (torch.randn(1, 4),))
        >>> params = groups.parameters(model)
        >>> len(groups), groups.num_prunable                     # the 8 hidden neurons are prunable
        (14, 8)
        >>> norms = groups.norms(params)                         # one norm per group
        >>> smallest = norms.masked_fill(~groups.prunable_mask, float("inf")).argsort()[:3]
        >>> groups.zero_(params, torch.zeros(len(groups), dtype=torch.bool).index_fill(0, smallest, True))
        >>> int(groups.zero_mask(params).sum())
        3
    """

    def __init__(
        self,
        groups: list[ZeroInvariantGroup],
        slices: list[GroupSlice],
        tensor_shapes: dict[str, tuple[int, ...]],
        tensor_aliases: dict[str, list[str]],
        *,
        config: GroupConfig | None = None,
        bindings: list[AttributeBinding] | None = None,
        unprunable_tensors: dict[str, str] | None = None,
        unsupported_ops: list[str] | None = None,
        norm_paddings: list[NormPadding] | None = None,
        input_cuts: list[InputCut] | None = None,
        expert_routings: list[ExpertRouting] | None = None,
        notes: list[str] | None = None,
        model_class: str = "",
        example_inputs: Any = None,
        analysis_seconds: float = 0.0,
    ) -> None:
        self.groups = groups
        self.slices = slices
        self.tensor_shapes = {k: tuple(v) for k, v in tensor_shapes.items()}
        self.tensor_aliases = tensor_aliases
        self.config = config or GroupConfig()
        self.bindings = bindings or []
        self.unprunable_tensors = unprunable_tensors or {}
        self.unsupported_ops = unsupported_ops or []
        self.norm_paddings = norm_paddings or []
        self.input_cuts = input_cuts or []
        self.expert_routings = expert_routings or []
        #: What the analysis wants the reader to know (a dry run that could not run, ...).
        self.notes = notes or []
        self.model_class = model_class
        self.example_inputs = example_inputs
        self.analysis_seconds = analysis_seconds
        #: Seconds the meta-device dry run of compress took (0 when it did not run).
        self.dry_run_seconds = 0.0
        self._index()

    def _index(self) -> None:
        names: list[str] = []
        for s in self.slices:
            if s.is_param and s.tensor not in names:
                names.append(s.tensor)
        #: Canonical names of the parameters some group touches, in a fixed order.
        self.param_names: list[str] = names
        pos = {n: i for i, n in enumerate(names)}
        self._param_slices = [(pos[s.tensor], s) for s in self.slices if s.is_param]
        #: Slices whose positions cover their whole dimension: removing all their groups would
        #: leave that dimension empty.
        self.covering_slices = [s for s in self.slices if not s.kept and s.flat_index(
            self.tensor_shapes[s.tensor]).unique().numel() == s.grid_size(self.tensor_shapes[s.tensor])]
        self._device_cache: dict[torch.device, list[tuple[int, GroupSlice]]] = {}
        self._covering = None

    # -- container protocol ------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.groups)

    def __iter__(self) -> Iterator[ZeroInvariantGroup]:
        return iter(self.groups)

    def __getitem__(self, i: int) -> ZeroInvariantGroup:
        return self.groups[i]

    def __repr__(self) -> str:
        return (f"ZeroInvariantGroups({len(self)} groups, {int(self.prunable_mask.sum())} prunable, "
                f"model={self.model_class or '?'})")

    @property
    def prunable_mask(self) -> torch.Tensor:
        return torch.tensor([g.prunable for g in self.groups], dtype=torch.bool)

    @property
    def exact_mask(self) -> torch.Tensor:
        """Groups whose removal (when zero) leaves every output unchanged."""
        return torch.tensor([g.exact for g in self.groups], dtype=torch.bool)

    @property
    def num_prunable(self) -> int:
        return sum(g.prunable for g in self.groups)

    @property
    def group_sizes(self) -> torch.Tensor:
        return torch.tensor([g.num_params for g in self.groups], dtype=torch.long)

    def group_widths(self) -> torch.Tensor:
        """Per group, its width: the positions it holds along one parameter dimension (a head:
        its head_dim rows of a projection; a neuron, channel or hidden dimension: 1), the least
        count over the parameters it touches (a fused QKV tensor holds a head three times)."""
        none = torch.iinfo(torch.long).max
        width = torch.full((len(self),), none, dtype=torch.long)
        for _, s in self._param_slices:
            counts = torch.bincount(s.group[s.group >= 0], minlength=len(self))
            width = torch.where(counts > 0, torch.minimum(width, counts), width)
        return torch.where(width == none, torch.ones_like(width), width)

    # -- binding to a model --------------------------------------------------------------------
    def check_model(self, model: torch.nn.Module) -> None:
        """Raise ValueError unless ``model`` has every tensor the groups refer to, same shapes."""
        tensors = dict(model.named_parameters(remove_duplicate=False))
        tensors.update(model.named_buffers(remove_duplicate=False))
        missing, wrong = [], []
        for name, shape in self.tensor_shapes.items():
            t = tensors.get(name)
            if t is None:
                missing.append(name)
            elif tuple(t.shape) != shape:
                wrong.append(f"{name}: model has {tuple(t.shape)}, groups expect {shape}")
        if missing or wrong:
            detail = "; ".join(wrong[:3] + [f"missing {m}" for m in missing[:3]])
            raise ValueError(
                "these groups were built for another model (or the model changed since "
                f"find_groups): {detail}")

    def parameters(self, model: torch.nn.Module) -> list[torch.nn.Parameter]:
        """The model's parameters in :attr:`param_names` order (checked against the groups)."""
        self.check_model(model)
        params = dict(model.named_parameters(remove_duplicate=False))
        return [params[n] for n in self.param_names]

    def _slices_on(self, device: torch.device) -> list[tuple[int, GroupSlice]]:
        cached = self._device_cache.get(device)
        if cached is None:
            cached = [(i, GroupSlice(s.tensor, s.is_param, s.dim, s.flat_index(self.tensor_shapes[s.tensor]).to(device),
                                     s.group.to(device), s.outer_dim, None, s.kept))
                      for i, s in self._param_slices]
            self._device_cache[device] = cached
        return cached

    # -- vectorised maths ----------------------------------------------------------------------
    def sq_norms(self, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
        """Squared L2 norm of every group, gathered across all the tensors it spans."""
        device = tensors[0].device if tensors else torch.device("cpu")
        out = torch.zeros(len(self.groups), dtype=torch.float32, device=device)
        for i, s in self._slices_on(device):  # these slices hold flat positions over s.dims
            red = reduce_except(tensors[i].float(), s.dims, norm=True)
            out.index_add_(0, s.group, red.square()[s.index])
        return out

    def norms(self, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
        return self.sq_norms(tensors).sqrt()

    def dots(self, a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> torch.Tensor:
        """Per-group inner product <a_g, b_g>."""
        device = a[0].device if a else torch.device("cpu")
        out = torch.zeros(len(self.groups), dtype=torch.float32, device=device)
        for i, s in self._slices_on(device):
            red = reduce_except(a[i].float() * b[i].float(), s.dims)
            out.index_add_(0, s.group, red[s.index])
        return out

    def multipliers(self, factors: torch.Tensor) -> list[list[tuple[int, torch.Tensor]]]:
        """Per parameter, (dim, multiplier) pairs that scale each group by ``factors[g]``: a vector
        along ``dim``, or for per-expert slices a tensor already shaped to broadcast."""
        device = factors.device
        per_param: list[list[tuple[int, torch.Tensor]]] = [[] for _ in self.param_names]
        for i, s in self._slices_on(device):
            shape = self.tensor_shapes[s.tensor]
            vec = torch.ones(s.grid_size(shape), dtype=factors.dtype, device=device)
            vec[s.index] = factors[s.group]
            if s.outer_dim is not None:
                grid = vec.view([shape[d] for d in s.dims])
                view = [1] * len(shape)
                for d in s.dims:
                    view[d] = shape[d]
                vec = grid.permute([s.dims.index(d) for d in sorted(s.dims)]).reshape(view)
            per_param[i].append((s.dim, vec))
        return per_param

    @torch.no_grad()
    def scale_(self, tensors: Sequence[torch.Tensor], factors: torch.Tensor) -> None:
        """In place: multiply every entry of group g by ``factors[g]`` (overlaps get the product)."""
        for t, mults in zip(tensors, self.multipliers(factors.to(tensors[0].device))):
            for dim, vec in mults:
                if vec.dim() == 1:
                    shape = [1] * t.dim()
                    shape[dim] = -1
                    vec = vec.view(shape)
                t.mul_(vec.to(t.dtype))

    @torch.no_grad()
    def zero_(self, tensors: Sequence[torch.Tensor], mask: torch.Tensor) -> None:
        """In place: set every entry of the groups where ``mask`` is True to exactly zero."""
        mask = mask.to(tensors[0].device if tensors else "cpu")
        self.scale_(tensors, (~mask.bool()).float())

    def zero_mask(self, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
        """Groups whose every parameter entry is exactly zero."""
        return self.sq_norms(tensors) == 0

    # -- counting ----------------------------------------------------------------------------
    def feasible_removal(self, remove: torch.Tensor) -> torch.Tensor:
        """``remove`` minus the groups needed so that no dimension of any tensor becomes empty.

        Zero-width layers are not supported by torch (a conv with no output channel) nor by model
        code that infers a head count with ``-1``; keeping one all-zero group is exact.
        """
        remove = remove.bool().cpu().clone()
        if not self.covering_slices:
            return remove
        if self._covering is None:
            members = [s.group.unique() for s in self.covering_slices]
            multiple = torch.tensor([g.kept_multiple for g in self.groups] or [1], dtype=torch.long)
            self._covering = (members, torch.cat(members),
                              torch.arange(len(members)).repeat_interleave(torch.tensor([m.numel() for m in members])),
                              [int(multiple[m].max()) if m.numel() else 1 for m in members])
        members, flat, segment, multiples = self._covering
        # Only dims whose groups are all removed can empty; keeping a group never empties another.
        kept = torch.zeros(len(members), dtype=torch.long).index_add_(0, segment, (~remove[flat]).long())
        for i in (kept == 0).nonzero().flatten().tolist():
            if remove[members[i]].all():
                remove[self.covering_slices[i].group[0]] = False
        for i in [i for i, n in enumerate(multiples) if n > 1]:
            self._round_up_kept(remove, i, multiples[i])
        return remove

    def _round_up_kept(self, remove: torch.Tensor, i: int, multiple: int) -> None:
        """Keep removed groups of covering slice ``i`` until its kept positions are a multiple of
        ``multiple`` (or it keeps everything). Counted in positions: a group may hold several."""
        s = self.covering_slices[i]
        gone = remove[s.group]
        positions = int(s.group.numel())
        kept = positions - int(gone.sum())
        if kept % multiple == 0:
            return
        per_group = torch.bincount(s.group)
        for g in s.group[gone].unique().tolist():  # back in index order, one group at a time
            if kept % multiple == 0 or kept >= positions:
                break
            remove[g] = False
            kept += int(per_group[g])

    def padded_norms(self, remove: torch.Tensor) -> dict[str, tuple[int, int, torch.Tensor]]:
        """Norm modules that lose positions: module -> (dim, full size, kept positions)."""
        remove = remove.bool().cpu()
        out = {}
        for p in self.norm_paddings:
            gone = (p.group >= 0) & remove[p.group.clamp(min=0)]
            if gone.any():
                out[p.module] = (p.dim, p.group.numel(), (~gone).nonzero().flatten())
        return out

    def cut_inputs(self, remove: torch.Tensor) -> dict[str, list[dict[str, Any]]]:
        """Module arguments that lose positions: module -> specs for ``cut_input`` (argument
        position or name, dim, period of the pattern, kept positions within one period)."""
        remove = remove.bool().cpu()
        out: dict[str, list[dict[str, Any]]] = {}
        for c in self.input_cuts:
            gone = (c.group >= 0) & remove[c.group.clamp(min=0)]
            if not gone.any():
                continue
            n = c.group.numel()
            period = next(p for p in range(1, n + 1) if n % p == 0 and torch.equal(c.group, c.group[:p].repeat(n // p)))
            kept = (~gone[:period]).nonzero().flatten().tolist()
            out.setdefault(c.module, []).append(
                {"position": c.position, "name": c.name, "dim": c.dim, "period": period, "kept": kept})
        return out

    def removal_plan(self, remove: torch.Tensor) -> dict[str, dict[int, torch.Tensor]]:
        """For every tensor that shrinks: dim -> sorted positions to keep.

        The tensors of padded norm modules keep their full width (see :class:`NormPadding`), and
        ``kept`` slices (router rows) stay. A dim holding per-expert slices keeps a different set
        of positions per expert (:meth:`ragged_plan`), zero-padded to the widest expert: here it
        maps to ``arange(width)`` (see :func:`ragged_width`), which gives the right sizes and counts.
        """
        remove = remove.bool().cpu()
        padded = {m + "." for m in self.padded_norms(remove)}
        plan: dict[str, dict[int, torch.Tensor]] = {}
        for s in self.slices:
            if s.kept or s.outer is not None:
                continue
            if padded and any(s.tensor.startswith(m) and "." not in s.tensor[len(m):] for m in padded):
                continue
            drop = s.index[remove[s.group]]
            if drop.numel() == 0:
                continue
            n = self.tensor_shapes[s.tensor][s.dim]
            keep = torch.ones(n, dtype=torch.bool)
            keep[drop] = False
            dims = plan.setdefault(s.tensor, {})
            if s.dim in dims:
                prev = torch.zeros(n, dtype=torch.bool)
                prev[dims[s.dim]] = True
                keep &= prev
            dims[s.dim] = keep.nonzero().flatten()
        for name, (outer_dim, dim, per_outer) in self.ragged_plan(remove, plan).items():
            plan.setdefault(name, {})[dim] = torch.arange(ragged_width(per_outer, self.tensor_shapes[name][dim]))
        return plan

    def ragged_plan(self, remove: torch.Tensor, plan: dict[str, dict[int, torch.Tensor]] | None = None,
                    ) -> dict[str, tuple[int, int, list[torch.Tensor]]]:
        """Per-expert slices that lose positions: tensor -> (expert dim, dim, per kept expert an
        ``[n, k]`` matrix of positions along ``dim``: one row per kept neuron (in group order), one
        column per segment). A dim the model splits in ``k`` equal chunks (``gate_up.chunk(2)``)
        has ``k`` segments; each is cut and zero-padded on its own (see :func:`ragged_width`).
        Experts removed whole (``plan``) are left out."""
        remove = remove.bool().cpu()
        out: dict[str, tuple[int, int, list[torch.Tensor]]] = {}
        for s in self.slices:
            if s.outer is None or not remove[s.group].any():
                continue
            shape = self.tensor_shapes[s.tensor]
            layout = segment_layout(s.index, s.group, shape[s.dim])
            if layout is None:
                raise ValueError(f"per-expert slice of {s.tensor} (dim {s.dim}) has no segment layout")
            groups, positions = layout
            outer = _outer_of(s, groups)
            keep = ~remove[groups]
            out[s.tensor] = (s.outer_dim, s.dim, [positions[keep & (outer == e)] for e in range(shape[s.outer_dim])])
        if plan is None:
            plan = self.removal_plan(remove) if out else {}
        for name, (outer_dim, dim, per_outer) in out.items():
            experts = plan.get(name, {}).get(outer_dim)
            if experts is not None:
                out[name] = (outer_dim, dim, [per_outer[int(e)] for e in experts])
        return out

    def removed_param_count(self, remove: torch.Tensor) -> int:
        """Parameter entries that disappear when the groups in ``remove`` are cut."""
        plan = self.removal_plan(remove)
        removed = 0
        for name, dims in plan.items():
            if not self._is_param(name):
                continue
            shape = self.tensor_shapes[name]
            kept = math.prod(len(dims[d]) if d in dims else n for d, n in enumerate(shape))
            removed += math.prod(shape) - kept
        return removed

    def _is_param(self, name: str) -> bool:
        return any(s.tensor == name and s.is_param for s in self.slices)

    def producing_layers(self) -> list[str]:
        """Per group, the module of the tensor it touches on the lowest dim (first in order on ties).

        That is the layer producing the structure (the Linear or conv whose output rows it owns),
        so a chain of layers gets one entry each; ``ZeroInvariantGroup.layer`` (the common prefix
        of all modules involved) would merge a whole MLP or CNN into one.
        """
        return [layer for layer, _ in self.producing_positions()]

    def producing_positions(self) -> list[tuple[str, int]]:
        """Per group, its producing layer (:meth:`producing_layers`) and the dim of that layer's
        tensor the group lies along (-1 where no parameter holds it): a first conv's output
        channels (dim 0) and the image channels it reads (dim 1) are two different widths."""
        n = max(1, len(self.param_names))
        none = torch.iinfo(torch.long).max
        key = torch.full((len(self),), none, dtype=torch.long)
        for i, s in self._param_slices:
            key.scatter_reduce_(0, s.group, torch.full_like(s.group, s.dim * n + i), reduce="amin")
        return [(self.param_names[v % n].rpartition(".")[0], v // n) if v != none else (g.layer, -1)
                for v, g in zip(key.tolist(), self)]

    def layer_blocks(self) -> tuple[torch.Tensor, list[tuple[str, str]]]:
        """Prunable groups split into blocks, one per (producing layer, kind).

        Returns the block index of every group (-1 for unprunable ones) and the block keys, so
        per-layer rankings and per-layer constraint sets are segment operations over one tensor.
        """
        keys: dict[tuple[str, str], int] = {}
        block = torch.full((len(self),), -1, dtype=torch.long)
        for g, layer in zip(self, self.producing_layers()):
            if g.prunable:
                block[g.index] = keys.setdefault((layer, g.kind), len(keys))
        return block, list(keys)

    # -- reporting ---------------------------------------------------------------------------
    def summary(self) -> str:
        """Per layer, how many heads / neurons / experts / channels are prunable, and for the rest why not.

        Layers are the repeated blocks of the model (``model.layers.3``); consecutive blocks with
        the same counts share one row (``model.layers.0-31``), and every reason is printed once
        with the blocks it applies to, so a 32-layer model reads in a screen.
        """
        return format_summary(self)

    def counts(self) -> dict[str, dict[str, int]]:
        """``{kind: {"total": n, "prunable": m}}``."""
        out: dict[str, dict[str, int]] = {}
        for g in self.groups:
            c = out.setdefault(g.kind, {"total": 0, "prunable": 0})
            c["total"] += 1
            c["prunable"] += int(g.prunable)
        return out

    # -- serialisation -----------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "version": 1,
            "model_class": self.model_class,
            "config": self.config.to_dict(),
            "groups": [asdict(g) for g in self.groups],
            "slices": [_slice_state(s) for s in self.slices],
            "tensor_shapes": {k: list(v) for k, v in self.tensor_shapes.items()},
            "tensor_aliases": self.tensor_aliases,
            "bindings": [{"module": b.module, "attribute": b.attribute, "value": b.value,
                          "sign": b.sign, "group": b.group.tolist(), "divisor": b.divisor, "offset": b.offset}
                         for b in self.bindings],
            "unprunable_tensors": self.unprunable_tensors,
            "unsupported_ops": self.unsupported_ops,
            "norm_paddings": [{"module": p.module, "dim": p.dim, "group": p.group.tolist()}
                              for p in self.norm_paddings],
            "input_cuts": [{"module": c.module, "position": c.position, "name": c.name, "dim": c.dim,
                            "group": c.group.tolist()} for c in self.input_cuts],
            "expert_routings": [{"module": r.module, "group": r.group.tolist(), "index_arg": r.index_arg,
                                 "weight_arg": r.weight_arg} for r in self.expert_routings],
            "notes": self.notes,
        }

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> "ZeroInvariantGroups":
        if state.get("version") != 1:
            raise ValueError(f"unknown groups format version {state.get('version')!r}")
        long = lambda x: torch.tensor(x, dtype=torch.long)  # noqa: E731
        return cls(
            groups=[ZeroInvariantGroup(**g) for g in state["groups"]],
            slices=[GroupSlice(s["tensor"], s["is_param"], s["dim"], long(s["index"]), long(s["group"]),
                               s.get("outer_dim"), long(s["outer"]) if "outer" in s else None, s.get("kept", False))
                    for s in state["slices"]],
            tensor_shapes={k: tuple(v) for k, v in state["tensor_shapes"].items()},
            tensor_aliases=state["tensor_aliases"],
            config=GroupConfig.from_dict(state["config"]),
            bindings=[AttributeBinding(b["module"], b["attribute"], b["value"], b["sign"], long(b["group"]),
                                       b["divisor"], b.get("offset", 0)) for b in state["bindings"]],
            unprunable_tensors=state["unprunable_tensors"],
            unsupported_ops=state["unsupported_ops"],
            norm_paddings=[NormPadding(p["module"], p["dim"], long(p["group"]))
                           for p in state.get("norm_paddings", [])],
            input_cuts=[InputCut(c["module"], c["position"], c["name"], c["dim"], long(c["group"]))
                        for c in state.get("input_cuts", [])],
            expert_routings=[ExpertRouting(r["module"], long(r["group"]), r["index_arg"], r["weight_arg"])
                             for r in state.get("expert_routings", [])],
            notes=state.get("notes", []),
            model_class=state["model_class"],
        )

    def save(self, path: str | os.PathLike) -> None:
        with open(path, "w") as f:
            json.dump(self.state_dict(), f)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "ZeroInvariantGroups":
        with open(path) as f:
            return cls.from_state_dict(json.load(f))
