"""From a labelled trace to :class:`~hf_oto.groups.ZeroInvariantGroups`."""

from __future__ import annotations

import re
import time
from typing import Any

import numpy as np
import torch

from ..groups import AttributeBinding, GroupSlice, NormPadding, ZeroInvariantGroup, ZeroInvariantGroups
from .atoms import CONV, EMBED, HEAD, MIXED, STRUCTURE, UNPRUNABLE
from .compute_rules import RULES as COMPUTE_RULES
from .compute_rules import unsupported
from .config import GroupConfig
from .inputs import call_with, default_example_inputs
from .moe_rules import EXPERT, EXPERT_LOCAL, RoutingTracker, finish_groups
from .moe_rules import RULES as MOE_RULES
from .shape_rules import RULES as SHAPE_RULES
from .trace import ChannelTracer, SizeSite, TraceResult

RULES = {**SHAPE_RULES, **COMPUTE_RULES, **MOE_RULES}

# Attribute names that look like sizes win over other integer attributes of the same value.
_SIZE_NAME = re.compile(r"head|size|dim|num|split|width|channel|feature|hidden|embed|inner|group", re.I)
_NORM_MODULE = re.compile(r"norm", re.I)
_NEVER_A_SIZE = re.compile(r"^(layer_idx|layer_id|idx|index|id|seed|step|version|rank|world_size)$")


def find_groups(
    model: torch.nn.Module,
    example_inputs: Any = None,
    config: GroupConfig | None = None,
) -> ZeroInvariantGroups:
    """Find the zero-invariant groups of ``model`` from its dependency graph.

    The model runs once (in eval mode, without gradients) on ``example_inputs``; every ATen op is
    followed to learn which parameter slices must be removed together. Nothing is looked up by
    module name: heads, neurons and channels are recognised from how tensors flow.

    Args:
        model: any ``torch.nn.Module``; Transformers models need no example inputs.
        example_inputs: a dict of keyword arguments, a tuple of positional arguments or a tensor.
        config: which kinds of structure may be pruned (see :class:`GroupConfig`).

    Example:
        >>> from transformers import BertConfig, BertForQuestionAnswering
        >>> from hf_oto import find_groups
        >>> model = BertForQuestionAnswering(BertConfig(hidden_size=32, num_hidden_layers=2,
        ...     num_attention_heads=4, intermediate_size=64, vocab_size=100))
        >>> groups = find_groups(model)
        >>> groups.counts()["head"]
        {'total': 8, 'prunable': 8}
    """
    config = config or GroupConfig()
    model = _unwrap(model)
    inputs = example_inputs if example_inputs is not None else default_example_inputs(model)
    start = time.perf_counter()
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            tracer = ChannelTracer(model, RULES, unsupported)
            tracer.routing = RoutingTracker(tracer)
            trace = tracer.run(lambda: tracer.routing.run(lambda: call_with(model, inputs)))
            tracer.routing.finish_trace()
            trace.routing = tracer.routing
    finally:
        model.train(was_training)
    groups = build_groups(trace, config, type(model).__name__)
    groups.example_inputs = inputs
    if config.dry_run:
        from ..compress.dry_run import demote_unremovable  # compress builds on the groups: import late

        groups = demote_unremovable(model, groups, inputs)
    groups.analysis_seconds = time.perf_counter() - start
    return groups


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    while True:
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if isinstance(inner, torch.nn.Module):
            model = inner
        else:
            return model


def _unit_size(labels: np.ndarray) -> int:
    """How many positions each atom holds along a dimension, when that is uniform.

    After ``(h, d) -> h*d`` each head's atom fills ``d`` positions; after ``(b, h) -> b*h`` it
    fills ``b``. A literal size there is the number of units times this multiplicity.
    """
    _, counts = np.unique(labels[labels >= 0], return_counts=True)
    return int(counts[0]) if counts.size and (counts == counts[0]).all() else 1


_COUNT_NAME = re.compile(r"head|num_|^n_|count", re.I)
_NOT_A_COUNT = re.compile(r"dim|size", re.I)


def _attributes_equal_to(module: torch.nn.Module, value: int, counts_units: bool) -> list[str]:
    """Integer attributes of ``module`` equal to ``value``; among several, the names that fit the
    role win (a count of heads vs. a width), so ``num_heads == head_dim`` is not ambiguous."""
    matches = [k for k, v in vars(module).items()
               if type(v) is int and v == value and not _NEVER_A_SIZE.match(k) and not k.startswith("_")]
    if len(matches) <= 1:
        return matches
    if counts_units:
        preferred = [k for k in matches if _COUNT_NAME.search(k) and not _NOT_A_COUNT.search(k)]
    else:
        preferred = [k for k in matches if _SIZE_NAME.search(k)]
    return preferred or matches


def _bind_sites(trace: TraceResult, structural: np.ndarray) -> list[tuple[str, str, int, SizeSite]]:
    """Attach each literal size to the module attribute that holds it, or flag the dimension.

    A literal like ``self.num_heads * self.head_dim`` has no attribute of its own: when the
    dimension is made of equal units (heads), the attribute holding the number of units is bound
    with the unit size as divisor.
    """
    bound: list[tuple[str, str, int, SizeSite]] = []
    for site in trace.sites:
        atoms = site.labels[site.labels >= 0]
        if not structural[atoms].any():
            continue  # the dimension never meets a parameter's structure (a sequence length)
        value = abs(site.value)
        unit = _unit_size(site.labels)
        path = site.module
        found: list[tuple[str, int]] = []
        while True:
            module = trace.modules.get(path)
            if module is not None:
                found = [(a, 1) for a in _attributes_equal_to(module, value, site.units)]
                if not found and unit > 1 and value % unit == 0:
                    found = [(a, unit) for a in _attributes_equal_to(module, value // unit, True)]
            if found or not path:
                break
            path = path.rpartition(".")[0]
        if not found:
            trace.atoms.flag(site.labels, UNPRUNABLE,
                             f"module '{site.module or '<root>'}' writes the size {site.value} of this "
                             f"dimension in its code ({site.op}) and holds it in no attribute")
            continue
        bound.extend((path, attr, divisor, site) for attr, divisor in found)
    return bound


def _multiset(roots: np.ndarray, labels: np.ndarray, divisor: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Components along a dimension with their multiplicities (in units of ``divisor``)."""
    comps, counts = np.unique(roots[labels[labels >= 0]], return_counts=True)
    return comps, counts / divisor


def _same(a: tuple[np.ndarray, np.ndarray], b: tuple[np.ndarray, np.ndarray]) -> bool:
    return np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])


def _check_consistency(trace: TraceResult, bound, roots: np.ndarray) -> None:
    """Sizes that must stay equal (split chunks, one attribute used twice) must shrink alike."""
    for eq in trace.equal_shrink:
        first = _multiset(roots, eq.parts[0])
        if any(not _same(first, _multiset(roots, p)) for p in eq.parts[1:]):
            for p in eq.parts:
                trace.atoms.flag(p, UNPRUNABLE, f"chunks of {eq.op} in '{eq.module}' would shrink unequally")
    by_attr: dict[tuple[str, str], list[tuple[SizeSite, int]]] = {}
    for path, attr, divisor, site in bound:
        by_attr.setdefault((path, attr), []).append((site, divisor))
    for (path, attr), sites in by_attr.items():
        first = _multiset(roots, sites[0][0].labels, sites[0][1])
        if any(not _same(first, _multiset(roots, s.labels, d)) for s, d in sites[1:]):
            for s, _ in sites:
                trace.atoms.flag(s.labels, UNPRUNABLE,
                                 f"attribute '{attr}' of '{path}' sizes dimensions that shrink differently")


def _norm_paddings(trace: TraceResult, roots: np.ndarray) -> tuple[list[tuple[str, int, np.ndarray]], set[int]]:
    """Norm modules whose statistics can stay exact by zero-padding their input to full width.

    A site qualifies when it runs inside a module named like a norm and normalises a dimension of
    that module's first input. Returns the paddings (module, input dim, atoms) and the components
    normalised somewhere that cannot be padded (their removal stays approximate).
    """
    paddings: dict[str, tuple[str, int, np.ndarray]] = {}
    inexact: set[int] = set()
    for site in trace.norm_sites:
        comps = roots[site.labels[site.labels >= 0]]
        module = trace.modules.get(site.module)
        inputs = trace.module_inputs.get(site.module, [])
        dim = None
        if module is not None and _NORM_MODULE.search(type(module).__name__):
            for d, lab in enumerate(inputs):
                if lab is not None and lab.shape == site.labels.shape and np.array_equal(
                        _lookup(roots, lab), _lookup(roots, site.labels)):
                    dim = d - len(inputs)  # from the end: batch dims of later calls may differ
                    break
        if dim is None:
            inexact.update(np.unique(comps).tolist())
        else:
            paddings.setdefault(site.module, (site.module, dim, inputs[dim + len(inputs)]))
    return list(paddings.values()), inexact


def _lookup(table: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """``table[labels]`` where a label is set, -1 where it is not (labels use -1 for none)."""
    return np.where(labels >= 0, table[np.maximum(labels, 0)], -1)


def _common_prefix(names: list[str]) -> str:
    parts = [n.split(".") for n in names]
    prefix = []
    for tokens in zip(*parts):
        if all(t == tokens[0] for t in tokens):
            prefix.append(tokens[0])
        else:
            break
    return ".".join(prefix)


def build_groups(trace: TraceResult, config: GroupConfig, model_class: str = "") -> ZeroInvariantGroups:
    atoms = trace.atoms
    for lab in trace.output_labels:
        atoms.flag(lab, UNPRUNABLE, "dimension of the model output")
    for name, labels in trace.tensor_atoms.items():
        if trace.tensor_is_param[name] and name not in trace.used:
            for lab in labels:
                if lab is not None:
                    atoms.flag(lab, UNPRUNABLE, "parameter not used in the traced forward pass")
    roots = atoms.components()
    structure = atoms.component_flags(roots).get(STRUCTURE, {})
    param_atoms = np.zeros(atoms.n, dtype=bool)
    for o in atoms.owners:
        if o.is_param:
            param_atoms[o.start:o.start + o.size] = True
    has_param = np.zeros(atoms.n, dtype=bool)
    has_param[roots[param_atoms]] = True
    structural = has_param[roots] & np.isin(roots, np.fromiter(structure, dtype=np.int64))
    bound = _bind_sites(trace, structural)
    _check_consistency(trace, bound, roots)
    paddings, inexact_comps = _norm_paddings(trace, roots)
    flags = atoms.component_flags(roots)
    blocked = flags.get(UNPRUNABLE, {})

    # Groups: components with a parameter slice in a channel role.
    param_comps = [roots[o.start:o.start + o.size] for o in atoms.owners if o.is_param]
    candidates = np.unique(np.concatenate(param_comps)) if param_comps else np.zeros(0, np.int64)
    candidates = np.array([c for c in candidates.tolist() if c in structure], dtype=np.int64)
    gid_of = np.full(atoms.n, -1, dtype=np.int64)
    gid_of[candidates] = np.arange(candidates.size)

    slices: list[GroupSlice] = []
    members: list[list[str]] = [[] for _ in range(candidates.size)]
    counts_per_param: dict[str, list[tuple[int, np.ndarray, np.ndarray]]] = {}
    unprunable_tensors: dict[str, str] = {}
    for o in atoms.owners:
        comps = roots[o.start:o.start + o.size]
        gids = gid_of[comps]
        pos = np.nonzero(gids >= 0)[0]
        if pos.size:
            slices.append(GroupSlice(o.tensor, o.is_param, o.dim, torch.from_numpy(pos.copy()),
                                     torch.from_numpy(gids[pos].copy())))
            if o.is_param:
                module = o.tensor.rpartition(".")[0]
                for g in np.unique(gids[pos]).tolist():
                    members[g].append(module)
                counts_per_param.setdefault(o.tensor, []).append((o.dim, gids[pos], pos))
        elif o.is_param:
            reason = next((blocked[c] for c in np.unique(comps).tolist() if c in blocked),
                          "not a channel dimension")
            unprunable_tensors.setdefault(f"{o.tensor} (dim {o.dim})", reason)

    sizes = _group_sizes(counts_per_param, trace, candidates.size)
    mixed, heads, convs, embeds, experts = (flags.get(k, {}) for k in (MIXED, HEAD, CONV, EMBED, EXPERT))
    excluded = [re.compile(p) for p in config.exclude]
    groups: list[ZeroInvariantGroup] = []
    for g, comp in enumerate(candidates.tolist()):
        if comp in experts:
            kind = "expert"  # its router rows stay, so the softmax over them changes nothing
        elif comp in embeds or comp in mixed:
            kind = "hidden"
        elif comp in heads:
            kind = "head"
        elif comp in convs:
            kind = "channel"
        else:
            kind = "neuron"
        layer = _common_prefix(members[g])
        reason = blocked.get(comp, "")
        if not reason and not config.enabled(kind):
            reason = f"{kind} pruning is off (GroupConfig.prune_{'hidden' if kind == 'hidden' else kind + 's'})"
        if not reason and any(p.search(layer) for p in excluded):
            reason = "excluded by GroupConfig.exclude"
        groups.append(ZeroInvariantGroup(g, kind, layer, not reason, reason, int(sizes[g]),
                                         exact=comp in experts or comp not in inexact_comps))

    bindings = []
    for path, attr, divisor, site in bound:
        gids = _lookup(gid_of, _lookup(roots, site.labels))
        bindings.append(AttributeBinding(path, attr, site.value, site.sign, torch.from_numpy(gids),
                                         divisor))

    norm_paddings = []
    for module, dim, labels in paddings:
        gids = _lookup(gid_of, _lookup(roots, labels))
        if (gids >= 0).any():
            norm_paddings.append(NormPadding(module, dim, torch.from_numpy(gids)))

    shapes = {name: tuple(_shape_of(trace, name)) for name in trace.tensor_atoms}
    result = ZeroInvariantGroups(
        groups, slices, shapes, {k: v for k, v in trace.tensor_names.items()},
        config=config, bindings=bindings, unprunable_tensors=unprunable_tensors, norm_paddings=norm_paddings,
        unsupported_ops=list(trace.unsupported), model_class=model_class,
    )
    routing = getattr(trace, "routing", None)
    if routing is not None:
        local = flags.get(EXPERT_LOCAL, {})
        result = finish_groups(result, trace, routing, roots, gid_of,
                               {g for g, comp in enumerate(candidates.tolist()) if comp in local})
    return result


def _shape_of(trace: TraceResult, name: str) -> tuple[int, ...]:
    module_path, _, leaf = name.rpartition(".")
    module = trace.modules[module_path]
    return tuple(getattr(module, leaf).shape)


def _group_sizes(counts_per_param, trace: TraceResult, n_groups: int) -> np.ndarray:
    """Entries covered per group: numel - prod over dims of (size - positions in the group)."""
    sizes = np.zeros(n_groups, dtype=np.float64)
    for name, entries in counts_per_param.items():
        shape = _shape_of(trace, name)
        free = np.ones(n_groups, dtype=np.float64)
        touched = np.zeros(n_groups, dtype=bool)
        dims_done = set()
        for dim, gids, _pos in entries:
            counts = np.bincount(gids, minlength=n_groups).astype(np.float64)
            free *= shape[dim] - counts
            touched |= counts > 0
            dims_done.add(dim)
        for d, n in enumerate(shape):
            if d not in dims_done:
                free *= n
        numel = float(np.prod(shape))
        sizes += np.where(touched, numel - free, 0.0)
    return sizes
