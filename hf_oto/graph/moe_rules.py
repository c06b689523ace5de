"""Mixture of experts: routers' top-k, expert products, and the groups they make.

Transformers 5.x keeps the experts of a layer in 3-D tensors (``gate_up_proj [experts, 2*ffn,
hidden]``, ``down_proj``). The default ``grouped_mm`` implementation sorts the token/expert pairs
the router's ``topk`` picked by expert and runs ``aten._grouped_mm`` with offsets from a histogram
of those ids; ``batched_mm`` gathers each pair's expert weights (``gate_up_proj[ids]``) into a
batched product. Both read one expert's weights per row, so:

* an **expert neuron** (row j of the gate and of the up projection of expert e, column j of its
  down projection) is a group: zero rows give ``act(0) * 0 = 0`` into a zero column, and no other
  expert's rows read them. Experts then keep different numbers of neurons; the 3-D tensors stay 3-D
  (the grouped kernels need one width), each expert's kept neurons first and the narrower experts
  padded with zero neurons up to the widest, which is exact for the same reason.
* a **whole expert** (its slice of every expert tensor, and its router row) is a group when
  ``GroupConfig.prune_experts`` is on. Removing an expert from the router is not exact in general:
  a zeroed router row still gives the expert a logit of 0, which enters the softmax's denominator
  (routers without renormalisation, Qwen2-MoE and OLMoE by default) and can win a top-k slot that
  another expert would get without it (all routers, Mixtral's included). Top-k over fewer experts
  gives the same outputs only when the removed expert is never among the top k for any input *and*
  the weights are renormalised over the top k: a property of the data, not of the weights. So the
  compressed model keeps the router as it is (its rows of removed experts stay, zero: E x hidden
  entries per layer) and remaps the routing at the experts module's input: a kept expert's id goes
  to its new position, a removed expert's slot gets weight 0 (its output was exactly zero). Routing
  is then identical for every router (softmax or sigmoid, renormalised or not, grouped top-k).

The ids and offsets that tie a router to its experts are integer data, which the channel labels do
not follow: :class:`RoutingTracker` follows them during the trace (a dispatch mode tagging the
top-k ids and what is computed from them), and the rules here read the tags.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import Any, Callable

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from ..group_edits import AttributeBinding, ExpertRouting
from ..groups import GroupSlice, ZeroInvariantGroup, ZeroInvariantGroups, segment_layout
from .atoms import ALIGNED, STRUCTURE, UNPRUNABLE, common_module_prefix
from .compute_rules import contract, unsupported
from .shape_rules import index as plain_index
from .trace import OpContext

aten = torch.ops.aten

#: Flag: the expert dim of an expert tensor (positions are whole experts).
EXPERT = "expert"
#: Flag: a dim of an expert tensor that a product reads per expert (one expert's weights per row).
EXPERT_LOCAL = "expert_local"

# Ops that keep the values of an integer tensor (expert ids stay expert ids).
_KEEPS_VALUES = {
    "view", "_unsafe_view", "reshape", "_reshape_alias", "clone", "_to_copy", "contiguous", "expand",
    "permute", "transpose", "t", "squeeze", "unsqueeze", "select", "slice", "alias", "detach",
    "clamp", "clamp_min", "clamp_max", "lift_fresh", "lift_fresh_copy", "flatten", "sort", "index",
    "masked_fill", "gather", "view_copy", "expand_copy", "permute_copy", "squeeze_copy",
    "unsqueeze_copy", "select_copy", "slice_copy",
}
# Ops that turn expert ids into a per-expert axis (a histogram: position e counts expert e).
_IDS_TO_AXIS = {"histc", "bincount"}
# Ops that keep a per-expert axis (offsets are the cumulative counts).
_KEEPS_AXIS = _KEEPS_VALUES | {"cumsum"}
# Attribute names that count a module's experts (not the experts per token, nor the shared ones).
_EXPERT_COUNT = re.compile(r"experts$", re.I)
_NOT_EXPERT_COUNT = re.compile(r"shared|per_tok|top|group|active", re.I)


@dataclass
class RouterSite:
    """A top-k over a labelled dim; a router when its ids reach an expert product."""

    module: str
    labels: np.ndarray  # atoms of the dim the top-k chose from (the router's rows)
    where: str
    experts: np.ndarray | None = None  # expert-dim atoms of the first expert product it routed


@dataclass
class _Tag:
    kind: str  # "ids": values are expert ids; "axis": position e along dim 0 is about expert e
    site: int  # index into RoutingTracker.sites, -1 when the ids came from elsewhere


class RoutingTracker(TorchDispatchMode):
    """Follows expert ids from routers' top-k to the expert products during the trace."""

    def __init__(self, tracer: Any) -> None:
        super().__init__()
        self.tracer = tracer
        self.tags: dict[int, tuple[torch.Tensor, _Tag]] = {}
        self.sites: list[RouterSite] = []
        self.by_offsets: dict[int, tuple[torch.Tensor, np.ndarray]] = {}
        self.expert_labels: list[np.ndarray] = []
        #: module receiving routed ids -> (ids argument, weights argument or None, site)
        self.receivers: dict[str, tuple[int | str, int | str | None, int]] = {}
        #: module running expert products -> (site, expert-dim atoms)
        self.products: dict[str, tuple[int, np.ndarray]] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        first = args[0] if args else None
        entry = self.tags.get(id(first)) if isinstance(first, torch.Tensor) else None
        if entry is not None and entry[0] is first:
            name = func.overloadpacket.__name__.rstrip("_")
            tag = entry[1]
            if tag.kind == "ids" and name in _IDS_TO_AXIS:
                self._tag(out, _Tag("axis", tag.site))
            elif name in (_KEEPS_VALUES if tag.kind == "ids" else _KEEPS_AXIS):
                self._tag(out[0] if isinstance(out, (tuple, list)) else out, tag)
        return out

    def _tag(self, t: Any, tag: _Tag) -> None:
        if isinstance(t, torch.Tensor):
            self.tags[id(t)] = (t, tag)

    def tag_of(self, t: Any) -> _Tag | None:
        entry = self.tags.get(id(t)) if isinstance(t, torch.Tensor) else None
        return entry[1] if entry is not None and entry[0] is t else None

    def run(self, call: Callable[[], Any]) -> Any:
        """Run ``call`` with the tracker on, noting which modules receive routed ids."""
        names = {id(m): n for n, m in self.tracer.model.named_modules()}

        # Global hooks see positional arguments only; Transformers' experts modules take
        # (hidden_states, ids, weights) positionally.
        def pre_hook(module, args):
            found = [(k, v) for k, v in enumerate(args) if (t := self.tag_of(v)) is not None and t.kind == "ids"]
            if not found:
                return
            key, ids = found[0]
            weights = [k for k, v in enumerate(args)
                       if isinstance(v, torch.Tensor) and v.is_floating_point() and v.shape == ids.shape]
            self.receivers.setdefault(names.get(id(module), ""),
                                      (key, weights[0] if weights else None, self.tag_of(ids).site))

        handle = torch.nn.modules.module.register_module_forward_pre_hook(pre_hook)
        try:
            with self:
                return call()
        finally:
            handle.remove()

    # -- called by the rules ---------------------------------------------------------------------
    def expert_product(self, ctx: OpContext, experts: np.ndarray | None, tag: _Tag | None, key: Any) -> None:
        """``experts`` (an expert tensor's expert dim) is read one expert per row."""
        if experts is None:
            return
        ctx.mark(experts, EXPERT)
        ctx.mark(experts, STRUCTURE)
        self.expert_labels.append(experts)
        site = tag.site if tag is not None else -1
        anchor = None
        if site >= 0:
            router = self.sites[site]
            if router.experts is None:
                router.experts = experts
            anchor = router.experts
        elif key is not None:
            anchor = self.by_offsets.setdefault(id(key), (key, experts))[1]
        # Weights routed by the same ids (or offsets) belong to the same experts.
        if anchor is not None and anchor.shape == experts.shape:
            ctx.atoms.union(anchor, experts)
        self.products.setdefault(ctx.module, (site, experts))

    def finish_trace(self) -> None:
        """Top-k that routed no experts is an order statistic: removing a position changes it. A
        router's rows stay in the compressed model, so they are no structure of their own."""
        for site in self.sites:
            reason = (f"order statistic over a prunable dimension ({site.where})" if site.experts is None
                      else f"router row: it goes with its expert (GroupConfig.prune_experts) ({site.where})")
            self.tracer.atoms.flag(site.labels, UNPRUNABLE, reason)


def _tracker(ctx: OpContext) -> RoutingTracker | None:
    return getattr(ctx.tracer, "routing", None)


# -- rules ---------------------------------------------------------------------------------------

def topk(ctx: OpContext, args, kwargs, out):
    x = args[0]
    dim = (args[2] if len(args) > 2 else kwargs.get("dim", -1)) % max(x.dim(), 1)
    lab = list(ctx.lab(x))
    tracker = _tracker(ctx)
    if lab[dim] is not None:
        if tracker is None:
            ctx.unprunable(lab[dim], "order statistic over a prunable dimension")
        else:
            tracker.sites.append(RouterSite(ctx.module, lab[dim], ctx.where))
            tracker._tag(out[1], _Tag("ids", len(tracker.sites) - 1))
    lab[dim] = None
    return [lab, None]


def grouped_mm(ctx: OpContext, args, kwargs, out):
    """``out[s] = a[s] @ b[e(s)]``: rows of ``a`` run through the expert their offset range names."""
    a, b = args[0], args[1]
    offs = args[2] if len(args) > 2 else kwargs.get("offs")
    bias = args[3] if len(args) > 3 else kwargs.get("bias")
    tracker = _tracker(ctx)
    if a.dim() != 2 or b.dim() != 3 or tracker is None or bias is not None:
        return unsupported(ctx, args, kwargs, out)
    la, lb = ctx.lab(a), ctx.lab(b)
    contract(ctx, la[1], lb[1])
    for lab in (lb[1], lb[2]):
        ctx.mark(lab, STRUCTURE)
        ctx.mark(lab, EXPERT_LOCAL)
        # The kernel wants 16-byte aligned strides: a width shared by all experts (a hidden size,
        # an input projection's outputs) keeps a multiple of 8 positions (see feasible_removal);
        # per-expert widths are padded to one by ragged_width.
        ctx.mark(lab, ALIGNED)
    tracker.expert_product(ctx, lb[0], tracker.tag_of(offs), offs)
    return [None, lb[2]]


def index(ctx: OpContext, args, kwargs, out):
    """``w[ids]`` with routed expert ids: each row holds one expert's weights (``batched_mm``)."""
    x, indices = args[0], list(args[1])
    tracker = _tracker(ctx)
    if tracker is not None and indices and all(i is None for i in indices[1:]):
        tag = tracker.tag_of(indices[0])
        lab = ctx.lab(x)
        if tag is not None and tag.kind == "ids" and lab and lab[0] is not None:
            for rest in lab[1:]:
                ctx.mark(rest, STRUCTURE)
                ctx.mark(rest, EXPERT_LOCAL)
            tracker.expert_product(ctx, lab[0], tag, None)
            return [None] * indices[0].dim() + list(lab[1:])
    return plain_index(ctx, args, kwargs, out)


def index_add(ctx: OpContext, args, kwargs, out):
    """``x.index_add_(dim, idx, src)``: rows of ``src`` land on rows ``idx`` of ``x`` along ``dim``
    (the eager experts loop accumulating each expert's tokens); the other dims add elementwise."""
    x, dim, src = args[0], args[1] % args[0].dim(), args[3]
    lx, ls = ctx.lab(x), ctx.lab(src)
    res: list[np.ndarray | None] = []
    for d in range(x.dim()):
        if d == dim:
            ctx.unprunable(lx[d], "index_add along a prunable dimension")
            ctx.unprunable(ls[d] if d < len(ls) else None, "index_add along a prunable dimension")
            res.append(None)
        elif x.shape[d] > 1 and (lx[d] is not None or ls[d] is not None):
            res.append(ctx.merge([lx[d], ls[d]], "index_add"))
        else:
            res.append(None)
    return res


RULES = {aten.topk: topk, aten._grouped_mm: grouped_mm, aten.index: index, aten._unsafe_index: index,
         aten.index_add: index_add, aten.index_add_: index_add}


# -- groups --------------------------------------------------------------------------------------

def _owner_of(trace, labels: np.ndarray) -> tuple[str, int] | None:
    """The (tensor, dim) whose atoms ``labels`` are, in order; None for anything else."""
    valid = labels[labels >= 0]
    if valid.size != labels.size or valid.size == 0:
        return None
    starts = trace.atoms_starts
    k = int(np.searchsorted(starts, valid[0], side="right")) - 1
    o = trace.atoms.owners[k]
    if o.size == labels.size and np.array_equal(labels, np.arange(o.start, o.start + o.size)):
        return o.tensor, o.dim
    return None


def finish_groups(groups: ZeroInvariantGroups, trace, tracker: RoutingTracker, roots: np.ndarray,
                  gid_of: np.ndarray, local: set[int]) -> ZeroInvariantGroups:
    """Attach router rows to their experts, split expert neurons per expert, and record what
    compress needs to remove whole experts (the expert count attribute, the routing remap).

    ``local`` holds the groups whose component an expert product read one expert per row.
    """
    if not tracker.products:
        return groups
    trace.atoms_starts = np.array([o.start for o in trace.atoms.owners], dtype=np.int64)
    expert_dims: dict[str, int] = {}
    for labels in tracker.expert_labels:
        owner = _owner_of(trace, labels)
        if owner is not None:
            expert_dims[owner[0]] = owner[1]
    edit = _GroupEdit(groups)
    routings: list[ExpertRouting] = []
    bindings: list[AttributeBinding] = []
    for module, (site, experts) in tracker.products.items():
        expert_groups = gid_of[roots[experts]]
        if (expert_groups < 0).any():
            continue
        receiver = _receiver(tracker, module)
        if site >= 0 and tracker.sites[site].experts is not None:
            _attach_router_rows(edit, trace, tracker.sites[site], roots, gid_of, expert_groups)
        if receiver is None or receiver[1] is None:
            edit.block(expert_groups, f"the experts module '{module}' receives no routing weights to zero "
                                      "for removed experts")
            continue
        path, (index_arg, weight_arg, _) = receiver
        routings.append(ExpertRouting(path, torch.from_numpy(expert_groups.copy()), index_arg, weight_arg))
        bindings += _count_bindings(trace, path, expert_groups)
    _split_expert_neurons(edit, expert_dims, local)
    return edit.result(routings, bindings)


def _receiver(tracker: RoutingTracker, module: str):
    """The deepest module around ``module`` (or itself) that received routed ids."""
    best = None
    for path, spec in tracker.receivers.items():
        if module == path or module.startswith(path + ".") or not path:
            if best is None or len(path) > len(best[0]):
                best = (path, spec)
    return best


def _count_bindings(trace, path: str, expert_groups: np.ndarray) -> list[AttributeBinding]:
    module = trace.modules.get(path)
    if module is None:
        return []
    n = len(expert_groups)
    return [AttributeBinding(path, attr, n, 1, torch.from_numpy(expert_groups.copy()))
            for attr, value in vars(module).items()
            if type(value) is int and value == n and _EXPERT_COUNT.search(attr) and not _NOT_EXPERT_COUNT.search(attr)
            and not attr.startswith("_")]


def _attach_router_rows(edit: "_GroupEdit", trace, site: RouterSite, roots, gid_of, expert_groups) -> None:
    """Router row e joins expert e's group as a kept slice, when each row is a group of its own
    that holds nothing but position e of tensors as long as the expert dim."""
    rows = gid_of[roots[site.labels]]
    n = rows.size
    if site.labels.shape != expert_groups.shape or (rows < 0).any() or np.unique(rows).size != n:
        return
    position = torch.full((len(edit.groups),), -1, dtype=torch.long)
    position[torch.from_numpy(rows)] = torch.arange(n)
    for s in edit.groups.slices:
        at = position[s.group]
        hit = at >= 0
        if hit.any() and (s.outer is not None or edit.groups.tensor_shapes[s.tensor][s.dim] != n
                          or not torch.equal(s.index[hit], at[hit])):
            return
    edit.merge_kept(dict(zip(rows.tolist(), expert_groups.tolist())))


class _GroupEdit:
    """Edits of a ZeroInvariantGroups (merges, splits, blocks) applied with one renumbering."""

    def __init__(self, groups: ZeroInvariantGroups) -> None:
        self.groups = groups
        self.merged: dict[int, int] = {}  # router row group -> expert group
        self.split: dict[int, int] = {}  # group -> number of experts
        self.blocked: dict[int, str] = {}
        self.outer: dict[tuple[str, int], int] = {}  # (tensor, dim) of split slices -> expert dim

    def block(self, gids: np.ndarray, reason: str) -> None:
        for g in np.unique(gids).tolist():
            self.blocked.setdefault(g, reason)

    def merge_kept(self, pairs: dict[int, int]) -> None:
        self.merged.update(pairs)

    def result(self, routings: list[ExpertRouting], bindings: list[AttributeBinding]) -> ZeroInvariantGroups:
        old = self.groups
        n_old = len(old)
        merged_into = torch.full((n_old,), -1, dtype=torch.long)
        for r, x in self.merged.items():
            merged_into[r] = x
        copies = torch.ones(n_old, dtype=torch.long)
        for g, n in self.split.items():
            copies[g] = n
        # Per expert group: its own entries plus its router row's, and the router's module.
        extra = torch.zeros(n_old, dtype=torch.long)
        router_module: dict[int, str] = {}
        for r, x in self.merged.items():
            extra[x] += old[r].num_params
        if self.merged:
            for s in old.slices:
                for x in merged_into[s.group].unique().tolist():
                    if x >= 0:
                        router_module.setdefault(x, s.tensor.rpartition(".")[0])
        new_id = torch.full((n_old,), -1, dtype=torch.long)
        groups: list[ZeroInvariantGroup] = []
        for g in old:
            if merged_into[g.index] >= 0:
                continue
            new_id[g.index] = len(groups)
            n = int(copies[g.index])
            reason = g.reason or self.blocked.get(g.index, "")
            layer = g.layer if g.index not in router_module else common_module_prefix([g.layer, router_module[g.index]])
            for _ in range(n):
                groups.append(replace(g, index=len(groups), prunable=not reason, reason=reason, layer=layer,
                                      num_params=(g.num_params + int(extra[g.index])) // n,
                                      exact=True if g.kind == "expert" else g.exact,
                                      kept_multiple=1 if n > 1 else g.kept_multiple))
        merged = merged_into >= 0
        new_id[merged] = new_id[merged_into[merged]]
        slices: list[GroupSlice] = []
        for s in old.slices:
            gid = new_id[s.group]
            split = copies[s.group] > 1
            kept = merged[s.group]
            plain = ~split & ~kept
            if plain.all():
                slices.append(replace(s, group=gid))
                continue
            if plain.any():
                slices.append(replace(s, index=s.index[plain], group=gid[plain]))
            if kept.any():
                slices.append(replace(s, index=s.index[kept], group=gid[kept], kept=True))
            if split.any():
                outer_dim = self.outer[(s.tensor, s.dim)]
                experts = old.tensor_shapes[s.tensor][outer_dim]
                idx = s.index[split]
                outer = torch.arange(experts).repeat_interleave(idx.numel())
                slices.append(GroupSlice(s.tensor, s.is_param, s.dim, idx.repeat(experts),
                                         gid[split].repeat(experts) + outer, outer_dim, outer))

        # Sizes that count router rows (``view(-1, n_group, self.num_experts // n_group)``) stay:
        # the rows are kept, so for attributes and paddings they are positions that never go.
        kept_id = new_id.clone()
        kept_id[merged] = -1

        def remap(vec: torch.Tensor, ids: torch.Tensor = kept_id) -> torch.Tensor:
            return torch.where(vec >= 0, ids[vec.clamp(min=0)], vec)

        return ZeroInvariantGroups(
            groups, slices, old.tensor_shapes, old.tensor_aliases, config=old.config,
            bindings=[replace(b, group=remap(b.group)) for b in old.bindings + bindings],
            unprunable_tensors=old.unprunable_tensors, unsupported_ops=old.unsupported_ops,
            norm_paddings=[replace(p, group=remap(p.group)) for p in old.norm_paddings],
            input_cuts=[replace(c, group=remap(c.group)) for c in old.input_cuts],
            expert_routings=[replace(r, group=remap(r.group, new_id)) for r in routings],
            notes=old.notes, model_class=old.model_class)


def _split_expert_neurons(edit: _GroupEdit, expert_dims: dict[str, int], local: set[int]) -> None:
    """Give each expert its own copy of every neuron group that lives only in expert tensors.

    A group splits when all its slices are on expert tensors whose expert dims map position e to
    the same expert, no attribute or padded norm refers to it, and an expert product read it per
    expert. Every group on a split (tensor, dim) must split, so that a dim is either cut the same
    for all experts or per expert.
    """
    groups = edit.groups
    expert_of: dict[str, torch.Tensor] = {}
    for s in groups.slices:
        if s.tensor in expert_dims and s.dim == expert_dims[s.tensor] and s.outer is None:
            n = groups.tensor_shapes[s.tensor][s.dim]
            vec = torch.full((n,), -1, dtype=torch.long)
            vec[s.index] = s.group
            expert_of[s.tensor] = vec
    referenced = set()
    for vec in [b.group for b in groups.bindings] + [p.group for p in groups.norm_paddings]:
        referenced.update(vec[vec >= 0].tolist())
    owners: dict[int, list[GroupSlice]] = {}
    for s in groups.slices:
        for g in s.group.unique().tolist():
            owners.setdefault(g, []).append(s)
    candidates = set()
    for g in local:
        if groups[g].kind != "neuron" or g in referenced:
            continue
        slices = owners.get(g, [])
        vecs = [expert_of.get(s.tensor) for s in slices]
        if not slices or any(v is None or (v < 0).any() for v in vecs):
            continue
        if any(s.dim == expert_dims[s.tensor] for s in slices) or not all(torch.equal(vecs[0], v) for v in vecs):
            continue
        candidates.add(g)
    changed = True
    while changed:  # a (tensor, dim) splits whole, with a segment layout compress can pad, or not at all
        changed = False
        for s in groups.slices:
            members = set(s.group.unique().tolist())
            if members & candidates and (not members <= candidates or segment_layout(
                    s.index, s.group, groups.tensor_shapes[s.tensor][s.dim]) is None):
                candidates -= members
                changed = True
    for g in candidates:
        for s in owners[g]:
            edit.outer[(s.tensor, s.dim)] = expert_dims[s.tensor]
            edit.split[g] = groups.tensor_shapes[s.tensor][expert_dims[s.tensor]]

