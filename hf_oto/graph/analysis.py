"""From a labelled trace to :class:`~hf_oto.groups.ZeroInvariantGroups`."""

from __future__ import annotations

import re
import time
from typing import Any

import numpy as np
import torch

from ..group_edits import AttributeBinding, InputCut, NormPadding
from ..groups import ALIGNED_MULTIPLE, GroupSlice, ZeroInvariantGroup, ZeroInvariantGroups
from .atoms import ALIGNED, CONV, EMBED, HEAD, MIXED, STRUCTURE, UNPRUNABLE, common_module_prefix
from .compute_rules import RULES as COMPUTE_RULES
from .compute_rules import unsupported
from .config import GroupConfig
from .entries import resolve_entries
from .inputs import call_with, default_example_inputs
from .moe_rules import EXPERT, EXPERT_LOCAL, RoutingTracker, finish_groups
from .moe_rules import RULES as MOE_RULES
from .shape_rules import RULES as SHAPE_RULES
from .sizes import bind_sizes
from .trace import ChannelTracer, TraceResult

RULES = {**SHAPE_RULES, **COMPUTE_RULES, **MOE_RULES}


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


def _norm_paddings(trace: TraceResult, roots: np.ndarray) -> tuple[list[tuple[str, int, np.ndarray]], set[int], dict[int, int]]:
    """Modules whose statistics over a prunable dimension stay exact when they run on their input
    zero-padded back to full width (the removed positions were exactly zero in the sparse model).

    A site (an op computing statistics over the dimension) qualifies when, in the innermost module
    running it, the dimension is one of the module's first input and of its first output (so the
    padded positions can be dropped again on the way out), and no submodule holds a tensor of the
    same structures (it would be sliced while the module runs at full width). LayerNorm, RMSNorm,
    per-projection q/k norms and ConvNeXt V2's global response norm all have this form.

    Returns the paddings (module, dim from the end, atoms of the first input along it), the
    components normalised somewhere that cannot be padded (their removal is approximate), and for
    each normalised component the number of modules normalising it.
    """
    paddings: dict[str, tuple[str, int, np.ndarray]] = {}
    inexact: set[int] = set()
    sites_of: dict[int, set[str]] = {}
    for site in trace.norm_sites:
        comps = np.unique(roots[site.labels[site.labels >= 0]])
        for c in comps.tolist():
            sites_of.setdefault(c, set()).add(site.module)
        dim = _paddable_dim(trace, roots, site)
        if dim is None:
            inexact.update(comps.tolist())
        else:
            inputs = trace.module_inputs[site.module]
            paddings.setdefault(site.module, (site.module, dim, inputs[dim + len(inputs)]))
    return list(paddings.values()), inexact, {c: len(m) for c, m in sites_of.items()}


def _paddable_dim(trace: TraceResult, roots: np.ndarray, site) -> int | None:
    """The dimension (counted from the end) along which ``site``'s module can run padded, or None."""
    if site.module not in trace.modules:
        return None
    inputs = trace.module_inputs.get(site.module, [])
    outputs = trace.module_outputs.get(site.module, [])
    want = _lookup(roots, site.labels)
    for d, lab in enumerate(inputs):
        if lab is None or lab.shape != site.labels.shape or not np.array_equal(_lookup(roots, lab), want):
            continue
        back = d - len(inputs)
        out = outputs[back] if len(outputs) >= -back else None
        if out is None or out.shape != lab.shape or not np.array_equal(_lookup(roots, out), want):
            return None
        comps = np.unique(want[want >= 0])
        prefix = site.module + "." if site.module else ""
        for o in trace.atoms.owners:
            if o.tensor.startswith(prefix) and "." in o.tensor[len(prefix):] and np.isin(
                    roots[o.start:o.start + o.size], comps).any():
                return None
        return back
    return None


def _lookup(table: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """``table[labels]`` where a label is set, -1 where it is not (labels use -1 for none)."""
    return np.where(labels >= 0, table[np.maximum(labels, 0)], -1)


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
    if trace.entries:
        roots, cuts = resolve_entries(atoms, trace.entries, roots, atoms.flagged_components(roots, HEAD))
    else:
        cuts = []
    early = atoms.component_flags(roots)
    structure = early.get(STRUCTURE, {})
    frozen = np.zeros(atoms.n, dtype=bool)
    frozen[np.fromiter(early.get(UNPRUNABLE, {}), dtype=np.int64)] = True
    param_atoms = np.zeros(atoms.n, dtype=bool)
    for o in atoms.owners:
        if o.is_param:
            param_atoms[o.start:o.start + o.size] = True
    has_param = np.zeros(atoms.n, dtype=bool)
    has_param[roots[param_atoms]] = True
    structural = has_param[roots] & np.isin(roots, np.fromiter(structure, dtype=np.int64))
    bound = bind_sizes(trace, structural, roots, frozen)
    paddings, inexact_comps, normalising_modules = _norm_paddings(trace, roots)
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
    mixed, heads, convs, embeds, experts, aligned = (flags.get(k, {}) for k in (MIXED, HEAD, CONV, EMBED, EXPERT,
                                                                                  ALIGNED))
    excluded = [re.compile(p) for p in config.exclude]
    groups: list[ZeroInvariantGroup] = []
    for g, comp in enumerate(candidates.tolist()):
        # Heads stay heads when a q/k norm or a shared bias table also touches them. The residual
        # stream is what the embeddings write, or what norms in several modules normalise; a
        # width normalised by one module only (a norm inside an MLP, ConvNeXt V2's GRN) keeps its
        # kind and is exact only where that module can run padded.
        if comp in experts:
            kind = "expert"  # its router rows stay, so the softmax over them changes nothing
        elif comp in heads:
            kind = "head"
        elif comp in embeds or normalising_modules.get(comp, 0) > 1:
            kind = "hidden"
        elif comp in convs:
            kind = "channel"
        else:
            kind = "neuron"
        layer = common_module_prefix(members[g])
        reason = blocked.get(comp, "")
        if not reason and kind != "hidden" and comp in inexact_comps:
            reason = (f"removal changes statistics the module cannot keep by running padded: "
                      f"{mixed.get(comp, 'normalised')}")
        if not reason and not config.enabled(kind):
            reason = f"{kind} pruning is off (GroupConfig.prune_{'hidden' if kind == 'hidden' else kind + 's'})"
        if not reason and any(p.search(layer) for p in excluded):
            reason = "excluded by GroupConfig.exclude"
        groups.append(ZeroInvariantGroup(g, kind, layer, not reason, reason, int(sizes[g]),
                                         exact=comp in experts or comp not in inexact_comps,
                                         kept_multiple=ALIGNED_MULTIPLE if comp in aligned else 1))

    bindings = []
    for b in bound:
        gids = _lookup(gid_of, _lookup(roots, b.labels))
        bindings.append(AttributeBinding(b.module, b.attribute, b.value, b.sign, torch.from_numpy(gids), b.divisor,
                                         b.offset))

    norm_paddings = []
    for module, dim, labels in paddings:
        gids = _lookup(gid_of, _lookup(roots, labels))
        if (gids >= 0).any():
            norm_paddings.append(NormPadding(module, dim, torch.from_numpy(gids)))

    input_cuts = []
    for cut in cuts:
        gids = _lookup(gid_of, _lookup(roots, cut.labels))
        if (gids >= 0).any():
            input_cuts.append(InputCut(cut.module, cut.position, cut.name, cut.dim, torch.from_numpy(gids)))

    shapes = {name: tuple(_shape_of(trace, name)) for name in trace.tensor_atoms}
    result = ZeroInvariantGroups(
        groups, slices, shapes, {k: v for k, v in trace.tensor_names.items()},
        config=config, bindings=bindings, unprunable_tensors=unprunable_tensors, norm_paddings=norm_paddings,
        input_cuts=input_cuts,
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
