"""Sizes written in a model's code: which module attribute to update when a dimension shrinks.

A literal size of a prunable dimension (``x.view(b, s, self.num_heads, self.head_dim)``) must
follow the dimension. Where the trace knows the expression behind the literal (see
provenance.py), a literal computed from the sizes of tensors that shrink with it needs nothing,
and otherwise the attribute is the operand that solves ``expression == kept size`` for every number
of kept structures; a literal of unknown origin is matched to an attribute holding its value.
Sizes of dimensions that never shrink but are computed from attributes
(``self.num_heads // self.num_kv_heads + 2``) must keep their value: when an attribute they read is
updated, another one they read is updated with it (a derived binding), or the dimension whose
shrinking would change them is unprunable.

New values are checked on scenarios: keeping the first ``j`` structures along the dimension for a
few ``j`` (structures already unprunable always stay).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from .atoms import UNPRUNABLE
from .provenance import AttrKey, configs_in, depends_on, evaluate, sizes_in
from .trace import FixedSize, SizeSite, TraceResult

# Attribute names that look like sizes win over other integer attributes of the same value.
_SIZE_NAME = re.compile(r"head|size|dim|num|split|width|channel|feature|hidden|embed|inner|group", re.I)
_NEVER_A_SIZE = re.compile(r"^(layer_idx|layer_id|idx|index|id|seed|step|version|rank|world_size)$")
_COUNT_NAME = re.compile(r"head|num_|^n_|count", re.I)
_NOT_A_COUNT = re.compile(r"dim|size", re.I)
# Largest value tried when searching the partner attribute of a fixed size.
_MAX_SEARCH = 1 << 16


@dataclass
class Bound:
    """An attribute whose new value is ``sign * kept // divisor + offset`` (kept: positions along
    ``labels`` whose structure stays)."""

    module: str
    attribute: str
    divisor: int
    sign: int
    labels: np.ndarray
    value: int  # the attribute's value in the traced model
    op: str  # where the size was written
    offset: int = 0


class _Dims:
    """Kept sizes of labelled dimensions under scenarios of kept structures."""

    def __init__(self, trace: TraceResult, roots: np.ndarray, frozen: np.ndarray) -> None:
        self.trace, self.roots, self.frozen = trace, roots, frozen
        self.env = trace.attribute_values

    def free(self, labels: np.ndarray) -> np.ndarray:
        """Structures along ``labels`` that may go."""
        comps = np.unique(self.roots[labels[labels >= 0]])
        return comps[~self.frozen[comps]]

    def kept(self, labels: np.ndarray, kept: np.ndarray) -> int:
        """Positions along ``labels`` left when, of the structures that may go, only ``kept`` stay."""
        valid = labels >= 0
        comps = self.roots[labels[valid]]
        return int((~valid).sum() + (self.frozen[comps] | np.isin(comps, kept)).sum())

    def scenarios(self, labels: np.ndarray, limit: int = 8) -> list[np.ndarray]:
        """Keep the first ``j`` structures that may go, for ``j`` from one (or none, when other
        positions keep the dimension alive) to all; a sample of ``j`` for long dimensions."""
        comps = self.free(labels)
        n = comps.size
        low = 0 if self.kept(labels, comps[:0]) else 1
        js = sorted(j for j in {1, 2, n // 2, n - 1, n, *range(min(n, limit) + 1)} if low <= j <= n)
        return [comps[:j] for j in js]

    def sizes(self, kept: np.ndarray) -> "_Sizes":
        return _Sizes(self, kept)

    def new_value(self, b: Bound, kept: np.ndarray) -> int:
        return b.sign * self.kept(b.labels, kept) // b.divisor + b.offset


class _Sizes(dict):
    """Tensor sizes read in the code, as they would be with only ``kept`` structures (lazy)."""

    def __init__(self, dims: _Dims, kept: np.ndarray) -> None:
        super().__init__()
        self.dims, self.kept_comps = dims, kept

    def get(self, k, default=None):
        if k not in self:
            self[k] = self.dims.kept(self.dims.trace.size_labels[k], self.kept_comps)
        return self[k]


def bind_sizes(trace: TraceResult, structural: np.ndarray, roots: np.ndarray, frozen: np.ndarray) -> list[Bound]:
    """Bind every literal size of a prunable dimension to an attribute, or flag the dimension.

    ``frozen[root]`` marks the structures already known to be unprunable: they never shrink.
    """
    dims = _Dims(trace, roots, frozen)
    fixed_alone = {next(iter(depends_on(f.expr))) for f in trace.fixed_sizes
                   if len(depends_on(f.expr)) == 1 and not sizes_in(f.expr)}
    bound: list[Bound] = []
    for site in trace.sites:
        atoms = site.labels[site.labels >= 0]
        if not structural[atoms].any() or dims.free(site.labels).size == 0:
            continue  # the dimension never shrinks (a sequence length, or structures that stay)
        deps = {k for k in depends_on(site.expr) if not _NEVER_A_SIZE.match(k[1])}
        if site.expr is not None and _follows(dims, site):
            continue  # computed from the sizes of tensors that shrink with it
        others = _separate_sizes(dims, site) if not deps else []
        if others:
            # The size of another dimension, which shrinks by structures of its own: no attribute
            # can carry it (``out.view(tokens, top_k, hidden_states.size(-1))`` shaping the
            # experts' output by their input's width). Both stay, or the view breaks.
            reason = f"module '{site.module or '<root>'}' sizes this dimension ({site.op}) by another one's size"
            for labels in [site.labels, *others]:
                trace.atoms.flag(labels, UNPRUNABLE, reason)
            continue
        found = _solve_site(dims, site, deps, fixed_alone) if deps else _match_by_value(trace, site)
        if not found:
            trace.atoms.flag(site.labels, UNPRUNABLE, f"module '{site.module or '<root>'}' {_unbound(site, deps)}")
            continue
        bound.extend(found)
    _check_consistency(dims, bound)
    _keep_fixed_sizes(dims, bound, structural)
    return bound


def _separate_sizes(dims: _Dims, site: SizeSite) -> list[np.ndarray]:
    """Labels of the tensor sizes ``site``'s literal reads that can shrink and share no structure
    with the dimension it sizes (empty when there is none)."""
    own = set(dims.free(site.labels).tolist())
    out = []
    for k in sizes_in(site.expr):
        labels = dims.trace.size_labels[k]
        free = set(dims.free(labels).tolist())
        if free and not free & own:
            out.append(labels)
    return out


def _unbound(site: SizeSite, deps: set[AttrKey]) -> str:
    """Why no attribute can carry a literal size."""
    fields = configs_in(site.expr)
    where = f"the size {site.value} of this dimension ({site.op})"
    if fields:
        shared = ", ".join(f"'{f}'" for f in sorted(fields))
        return (f"computes {where} from the config's {shared}, which every layer shares, so it cannot "
                "follow the structures kept in one layer")
    if deps:
        return f"computes {where} from {_names(deps)}, which no kept size can satisfy"
    return f"writes {where} in its code and holds it in no attribute"


def _names(keys) -> str:
    return ", ".join(f"'{path + '.' if path else ''}{attr}'" for path, attr in sorted(keys))


def _preference(key: AttrKey, units: bool) -> tuple:
    name = key[1]
    fits = (_COUNT_NAME.search(name) and not _NOT_A_COUNT.search(name)) if units else _SIZE_NAME.search(name)
    return (not fits, name)


def _with(env: dict[AttrKey, int], key: AttrKey, value: int) -> dict[AttrKey, int]:
    out = dict(env)
    out[key] = value
    return out


def _follows(dims: _Dims, site: SizeSite) -> bool:
    """Whether the literal takes the kept size by itself, computed from sizes read off tensors."""
    if not sizes_in(site.expr):
        return False
    return all(evaluate(site.expr, dims.env, dims.sizes(kept)) == site.sign * dims.kept(site.labels, kept)
               for kept in dims.scenarios(site.labels))


def _solve_linear(expr, env, sizes, key: AttrKey, target: int) -> int | None:
    """``x`` with ``expr(key=x) == target`` when the expression is linear in the attribute."""
    value = env[key]
    probe = value - 1 if value > 1 else value + 1
    at, other = evaluate(expr, env, sizes), evaluate(expr, _with(env, key, probe), sizes)
    if at is None or other is None or at == other:
        return None
    if (at - other) % (value - probe):
        return None
    slope = (at - other) // (value - probe)
    if (target - at) % slope:
        return None
    x = value + (target - at) // slope
    return x if x >= 0 and evaluate(expr, _with(env, key, x), sizes) == target else None


def _affine(kept_sizes: list[int], values: list[int]) -> tuple[int, int, int] | None:
    """(divisor, sign, offset) with ``value == sign * kept // divisor + offset`` for every pair."""
    pairs = sorted(set(zip(kept_sizes, values)))
    if len({k for k, _ in pairs}) < len(pairs):
        return None  # one kept size, two values
    if len(pairs) == 1:
        (kept, value), = pairs
        candidates = [(kept // value, 1, 0)] if value > 0 and kept % value == 0 else [(1, 1, value - kept)]
    else:
        (k0, v0), (k1, v1) = pairs[0], pairs[-1]
        if v0 == v1 or (k1 - k0) % (v1 - v0):
            return None
        step = (k1 - k0) // (v1 - v0)
        divisor, sign = abs(step), 1 if step > 0 else -1
        if k0 % divisor:
            return None
        candidates = [(divisor, sign, v0 - sign * k0 // divisor)]
    for divisor, sign, offset in candidates:
        if all(sign * k // divisor + offset == v and k % divisor == 0 for k, v in pairs):
            return divisor, sign, offset
    return None


def _solve_site(dims: _Dims, site: SizeSite, deps: set[AttrKey], fixed_alone: set[AttrKey]) -> list[Bound]:
    """The attribute (among those the literal reads) whose update keeps ``literal == kept size``.

    ``self.num_heads * self.head_dim`` over a dimension of whole heads: ``num_heads`` solves it
    for every number of kept heads. ``head_dim`` would too, arithmetically, but another size reads
    it alone for a dimension that never shrinks, so it is never the one updated.
    """
    scenarios = dims.scenarios(site.labels)
    kept_sizes = [dims.kept(site.labels, kept) for kept in scenarios]
    for key in sorted(deps - fixed_alone, key=lambda k: _preference(k, site.units)):
        values = [_solve_linear(site.expr, dims.env, dims.sizes(kept), key, site.sign * n)
                  for kept, n in zip(scenarios, kept_sizes)]
        if any(v is None for v in values):
            continue
        fit = _affine(kept_sizes, values)
        if fit is not None:
            return [Bound(key[0], key[1], fit[0], fit[1], site.labels, dims.env[key], site.op, fit[2])]
    return []


def _match_by_value(trace: TraceResult, site: SizeSite) -> list[Bound]:
    """Literals of unknown origin: the attribute holding the value, from the module upwards.

    A literal like ``config.num_heads * head_dim`` has no attribute of its own: when the dimension
    is made of equal units (heads), an attribute holding the number of units is bound with the unit
    size as divisor.
    """
    value = abs(site.value)
    unit = _unit_size(site.labels)
    path = site.module
    while True:
        module = trace.modules.get(path)
        found: list[tuple[str, int]] = []
        if module is not None:
            found = [(a, 1) for a in _attributes_equal_to(module, value, site.units)]
            if not found and unit > 1 and value % unit == 0:
                found = [(a, unit) for a in _attributes_equal_to(module, value // unit, True)]
        if found:
            return [Bound(path, attr, divisor, site.sign, site.labels, value // divisor, site.op)
                    for attr, divisor in found]
        if not path:
            return []
        path = path.rpartition(".")[0]


def _unit_size(labels: np.ndarray) -> int:
    """How many positions each atom holds along a dimension, when that is uniform.

    After ``(h, d) -> h*d`` each head's atom fills ``d`` positions; after ``(b, h) -> b*h`` it
    fills ``b``. A literal size there is the number of units times this multiplicity.
    """
    _, counts = np.unique(labels[labels >= 0], return_counts=True)
    return int(counts[0]) if counts.size and (counts == counts[0]).all() else 1


def _attributes_equal_to(module, value: int, counts_units: bool) -> list[str]:
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


def _shrinks(dims: _Dims, labels: np.ndarray, scale: float = 1.0) -> tuple[np.ndarray, np.ndarray, float]:
    """How a dimension shrinks: the structures that may go with their positions (times ``scale``),
    and the positions that always stay (times ``scale``)."""
    valid = labels >= 0
    comps = dims.roots[labels[valid]]
    free = ~dims.frozen[comps]
    uniq, counts = np.unique(comps[free], return_counts=True)
    return uniq, counts * scale, float((~valid).sum() + (~free).sum()) * scale


def _same_shrink(a, b) -> bool:
    return np.array_equal(a[0], b[0]) and np.allclose(a[1], b[1]) and np.isclose(a[2], b[2])


def _check_consistency(dims: _Dims, bound: list[Bound]) -> None:
    """Sizes that must stay equal (split chunks, one attribute used twice) must shrink alike."""
    trace = dims.trace
    for eq in trace.equal_shrink:
        first = _shrinks(dims, eq.parts[0])
        if any(not _same_shrink(first, _shrinks(dims, p)) for p in eq.parts[1:]):
            for p in eq.parts:
                trace.atoms.flag(p, UNPRUNABLE, f"chunks of {eq.op} in '{eq.module}' would shrink unequally")
    by_attr: dict[tuple[str, str], list[Bound]] = {}
    for b in bound:
        by_attr.setdefault((b.module, b.attribute), []).append(b)
    for (path, attr), uses in by_attr.items():
        shapes = []
        for u in uses:
            comps, counts, stay = _shrinks(dims, u.labels, u.sign / u.divisor)
            shapes.append((comps, counts, stay + u.offset))
        if any(not _same_shrink(shapes[0], s) for s in shapes[1:]):
            for u in uses:
                trace.atoms.flag(u.labels, UNPRUNABLE,
                                 f"attribute '{attr}' of '{path}' sizes dimensions that shrink differently")


def _keep_fixed_sizes(dims: _Dims, bound: list[Bound], structural: np.ndarray) -> None:
    """Sizes computed from updated attributes for dimensions that never shrink keep their value.

    Falcon views its fused projection as ``(kv_heads, num_heads // num_kv_heads + 2, head_dim)``:
    when ``num_heads`` follows the kept heads, ``num_kv_heads`` must follow the kept key/value
    heads for the middle size to stay. Such a partner is searched among the other attributes the
    size reads, as a count along the same dimension; without one, the dimension that would change
    the size is unprunable.
    """
    trace = dims.trace
    by_attr: dict[AttrKey, Bound] = {}
    for b in bound:
        by_attr.setdefault((b.module, b.attribute), b)
    for fixed in trace.fixed_sizes:
        if fixed.labels is not None and structural[fixed.labels].any():
            continue  # a broadcast dimension that met a structure: its size is a site instead
        deps = depends_on(fixed.expr)
        changed = [by_attr[k] for k in sorted(deps) if k in by_attr]
        read = [trace.size_labels[k] for k in sorted(sizes_in(fixed.expr))]
        read = [lab for lab in read if structural[lab[lab >= 0]].any() and dims.free(lab).size]
        if not changed and not read:
            continue
        scenarios = dims.scenarios(np.concatenate([b.labels for b in changed] + read))
        envs = [_updated(dims, changed, kept) for kept in scenarios]
        sizes = [dims.sizes(kept) for kept in scenarios]
        if all(evaluate(fixed.expr, e, z) == fixed.value for e, z in zip(envs, sizes)):
            continue
        partner = None
        if len(changed) == 1 and not read:
            partner = _partner(dims, fixed, deps - set(by_attr), envs, sizes, scenarios, changed[0])
        if partner is None:
            _flag_fixed(trace, fixed, changed, read)
            continue
        bound.append(partner)
        by_attr[(partner.module, partner.attribute)] = partner


def _updated(dims: _Dims, changed: list[Bound], kept: np.ndarray) -> dict[AttrKey, int]:
    """Attribute values when, of the structures that may go, only ``kept`` stay."""
    out = dict(dims.env)
    for b in changed:
        out[(b.module, b.attribute)] = dims.new_value(b, kept)
    return out


def _partner(dims: _Dims, fixed: FixedSize, free: set[AttrKey], envs, sizes, scenarios, base: Bound) -> Bound | None:
    kept_sizes = [dims.kept(base.labels, kept) for kept in scenarios]
    for key in sorted(k for k in free if not _NEVER_A_SIZE.match(k[1])):
        limit = min(max(dims.env[key], 1), _MAX_SEARCH)
        values = [next((x for x in range(1, limit + 1) if evaluate(fixed.expr, _with(e, key, x), z) == fixed.value),
                       None) for e, z in zip(envs, sizes)]
        if any(v is None for v in values):
            continue
        fit = _affine(kept_sizes, values)
        if fit is not None:
            return Bound(key[0], key[1], fit[0], fit[1], base.labels, dims.env[key], fixed.op, fit[2])
    return None


def _flag_fixed(trace: TraceResult, fixed: FixedSize, changed: list[Bound], read: list[np.ndarray]) -> None:
    what = " and ".join(filter(None, [_names({(b.module, b.attribute) for b in changed}),
                                      "the sizes of tensors it reads" if read else ""]))
    reason = (f"module '{fixed.module or '<root>'}' computes the size {fixed.value} ({fixed.op}) from {what}, "
              "which would change when this dimension shrinks, and no other attribute it reads can keep it")
    for labels in [b.labels for b in changed] + read:
        trace.atoms.flag(labels, UNPRUNABLE, reason)
