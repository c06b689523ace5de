"""Sizes written in a model's code: which module attribute to update when a dimension shrinks.

A literal size of a prunable dimension (``x.view(b, s, self.num_heads, self.head_dim)``) must
follow the dimension. Where the trace knows the expression behind the literal (see
provenance.py), the attribute is the one of its operands that solves ``expression == kept size``
for every number of kept units; otherwise an attribute holding the value is looked up by value.
Sizes of dimensions that never shrink but are computed from attributes
(``self.num_heads // self.num_kv_heads + 2``) must keep their value: when an attribute they read is
updated, another one they read is updated with it (a derived binding), or the dimension whose
shrinking would change them is unprunable.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from .atoms import UNPRUNABLE
from .provenance import AttrKey, depends_on, evaluate, sizes_in
from .trace import FixedSize, SizeSite, TraceResult

# Attribute names that look like sizes win over other integer attributes of the same value.
_SIZE_NAME = re.compile(r"head|size|dim|num|split|width|channel|feature|hidden|embed|inner|group", re.I)
_NEVER_A_SIZE = re.compile(r"^(layer_idx|layer_id|idx|index|id|seed|step|version|rank|world_size)$")
_COUNT_NAME = re.compile(r"head|num_|^n_|count", re.I)
_NOT_A_COUNT = re.compile(r"dim|size", re.I)
# Values tried when solving a size for an attribute (a brute-force search over small integers).
_MAX_SEARCH = 1 << 16


@dataclass
class Bound:
    """An attribute whose new value is ``sign * kept // divisor`` (kept: positions along labels)."""

    module: str
    attribute: str
    divisor: int
    sign: int
    labels: np.ndarray
    value: int  # the attribute's value in the traced model
    op: str  # where the size was written


def bind_sizes(trace: TraceResult, structural: np.ndarray, roots: np.ndarray) -> list[Bound]:
    """Bind every literal size of a prunable dimension to an attribute, or flag the dimension."""
    fixed_alone = {next(iter(depends_on(f.expr))) for f in trace.fixed_sizes
                   if len(depends_on(f.expr)) == 1 and not sizes_in(f.expr)}
    bound: list[Bound] = []
    for site in trace.sites:
        atoms = site.labels[site.labels >= 0]
        if not structural[atoms].any():
            continue  # the dimension never meets a parameter's structure (a sequence length)
        deps = {k for k in depends_on(site.expr) if not _NEVER_A_SIZE.match(k[1])}
        if site.expr is not None and _follows(trace, site, roots):
            continue  # computed from the sizes of tensors that shrink with it
        found = _solve_site(trace, site, deps, roots, fixed_alone) if deps else _match_by_value(trace, site)
        if not found:
            source = (f"computes the size {site.value} of this dimension ({site.op}) from attributes "
                      f"{_names(deps)} that no kept size can satisfy") if deps else (
                      f"writes the size {site.value} of this dimension in its code ({site.op}) and holds "
                      "it in no attribute")
            trace.atoms.flag(site.labels, UNPRUNABLE, f"module '{site.module or '<root>'}' {source}")
            continue
        bound.extend(found)
    _check_consistency(trace, bound, roots)
    _keep_fixed_sizes(trace, bound, roots, structural)
    return bound


def _names(keys) -> str:
    return ", ".join(f"'{path + '.' if path else ''}{attr}'" for path, attr in sorted(keys))


def _preference(key: AttrKey, units: bool, fixed_alone: set[AttrKey]) -> tuple:
    name = key[1]
    fits = (_COUNT_NAME.search(name) and not _NOT_A_COUNT.search(name)) if units else _SIZE_NAME.search(name)
    return (key in fixed_alone, not fits, name)


def _scenarios(roots: np.ndarray, labels: np.ndarray, limit: int = 8) -> list[np.ndarray]:
    """Kept structures to check a size on: the first j components along ``labels`` for a few j
    from one to all (none too, when positions outside any structure keep the dimension alive)."""
    comps = np.unique(roots[labels[labels >= 0]])
    n = comps.size
    js = sorted(j for j in {1, 2, n // 2, n - 1, n, *range(1, min(n, limit) + 1)} if 1 <= j <= n)
    if (labels < 0).any():
        js.insert(0, 0)
    return [comps[:j] for j in js]


def _kept(roots: np.ndarray, labels: np.ndarray, kept: np.ndarray) -> int:
    """Positions along ``labels`` left when only the components in ``kept`` stay."""
    return int((labels < 0).sum() + np.isin(roots[np.maximum(labels, 0)], kept)[labels >= 0].sum())


class _Sizes(dict):
    """Tensor sizes read in the code, as they would be with only ``kept`` components (lazy)."""

    def __init__(self, trace: TraceResult, roots: np.ndarray, kept: np.ndarray) -> None:
        super().__init__()
        self.trace, self.roots, self.kept = trace, roots, kept

    def get(self, k, default=None):
        if k not in self:
            self[k] = _kept(self.roots, self.trace.size_labels[k], self.kept)
        return self[k]


def _follows(trace: TraceResult, site: SizeSite, roots: np.ndarray) -> bool:
    """Whether the literal takes the kept size by itself, computed from sizes read off tensors."""
    if not sizes_in(site.expr):
        return False
    env = trace.attribute_values
    return all(evaluate(site.expr, env, _Sizes(trace, roots, kept)) == site.sign * _kept(roots, site.labels, kept)
               for kept in _scenarios(roots, site.labels))


def _with(env: dict[AttrKey, int], key: AttrKey, value: int) -> dict[AttrKey, int]:
    out = dict(env)
    out[key] = value
    return out


def _solve_linear(expr, env, sizes, key: AttrKey, target: int) -> int | None:
    """``x`` with ``expr(key=x) == target`` when the expression is linear in the attribute."""
    value = env[key]
    probe = value - 1 if value > 1 else value + 1
    at, other = evaluate(expr, env, sizes), evaluate(expr, _with(env, key, probe), sizes)
    if at is None or other is None or at == other:
        return None
    slope = (at - other) // (value - probe)
    if (at - other) % (value - probe) or (target - at) % slope:
        return None
    x = value + (target - at) // slope
    return x if x > 0 and evaluate(expr, _with(env, key, x), sizes) == target else None


def _ratio(kept_sizes: list[int], values: list[int]) -> tuple[int, int] | None:
    """(divisor, sign) with ``value == sign * kept // divisor`` for every pair, if there is one."""
    if any(v == 0 or kept % v for kept, v in zip(kept_sizes, values)):
        return None
    signs = {1 if v > 0 else -1 for v in values}
    ratios = {kept // abs(v) for kept, v in zip(kept_sizes, values)}
    if len(signs) == 1 and len(ratios) == 1:
        return ratios.pop(), signs.pop()
    return None


def _solve_site(trace: TraceResult, site: SizeSite, deps: set[AttrKey], roots: np.ndarray,
                fixed_alone: set[AttrKey]) -> list[Bound]:
    """The attribute (among those the literal reads) whose update keeps ``literal == kept size``.

    ``self.num_heads * self.head_dim`` over a dimension of whole heads: ``num_heads`` solves it
    for every number of kept heads (``head_dim`` would too, arithmetically, but another size
    reads it alone and must not change, so it comes last).
    """
    env = trace.attribute_values
    scenarios = _scenarios(roots, site.labels)
    kept_sizes = [_kept(roots, site.labels, kept) for kept in scenarios]
    for key in sorted(deps, key=lambda k: _preference(k, site.units, fixed_alone)):
        values = [_solve_linear(site.expr, env, _Sizes(trace, roots, kept), key, site.sign * n)
                  for kept, n in zip(scenarios, kept_sizes)]
        if any(v is None for v in values):
            continue
        ratio = _ratio(kept_sizes, values)
        if ratio is not None:
            return [Bound(key[0], key[1], ratio[0], ratio[1], site.labels, env[key], site.op)]
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


def _multiset(roots: np.ndarray, labels: np.ndarray, divisor: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Components along a dimension with their multiplicities (in units of ``divisor``)."""
    comps, counts = np.unique(roots[labels[labels >= 0]], return_counts=True)
    return comps, counts / divisor


def _same(a: tuple[np.ndarray, np.ndarray], b: tuple[np.ndarray, np.ndarray]) -> bool:
    return np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])


def _check_consistency(trace: TraceResult, bound: list[Bound], roots: np.ndarray) -> None:
    """Sizes that must stay equal (split chunks, one attribute used twice) must shrink alike."""
    for eq in trace.equal_shrink:
        first = _multiset(roots, eq.parts[0])
        if any(not _same(first, _multiset(roots, p)) for p in eq.parts[1:]):
            for p in eq.parts:
                trace.atoms.flag(p, UNPRUNABLE, f"chunks of {eq.op} in '{eq.module}' would shrink unequally")
    by_attr: dict[tuple[str, str], list[Bound]] = {}
    for b in bound:
        by_attr.setdefault((b.module, b.attribute), []).append(b)
    for (path, attr), uses in by_attr.items():
        first = _multiset(roots, uses[0].labels, uses[0].divisor)
        if any(not _same(first, _multiset(roots, u.labels, u.divisor)) for u in uses[1:]):
            for u in uses:
                trace.atoms.flag(u.labels, UNPRUNABLE,
                                 f"attribute '{attr}' of '{path}' sizes dimensions that shrink differently")


def _keep_fixed_sizes(trace: TraceResult, bound: list[Bound], roots: np.ndarray, structural: np.ndarray) -> None:
    """Sizes computed from updated attributes for dimensions that never shrink keep their value.

    Falcon views its fused projection as ``(kv_heads, num_heads // num_kv_heads + 2, head_dim)``:
    when ``num_heads`` follows the kept heads, ``num_kv_heads`` must follow the kept key/value
    heads for the middle size to stay. Such a partner is searched among the other attributes the
    size reads, as a count along the same dimension (``kept // divisor``); without one, the
    dimension that would change the size is unprunable.
    """
    env = trace.attribute_values
    by_attr: dict[AttrKey, Bound] = {}
    for b in bound:
        by_attr.setdefault((b.module, b.attribute), b)
    for fixed in trace.fixed_sizes:
        deps = depends_on(fixed.expr)
        changed = [by_attr[k] for k in sorted(deps) if k in by_attr]
        read = [trace.size_labels[k] for k in sorted(sizes_in(fixed.expr))]
        read = [lab for lab in read if structural[lab[lab >= 0]].any()]
        if not changed and not read:
            continue
        dims = [b.labels for b in changed] + read
        comps = np.unique(np.concatenate([roots[lab[lab >= 0]] for lab in dims]))
        scenarios = _scenarios(roots, np.concatenate(dims))
        envs = [_updated(env, changed, roots, kept) for kept in scenarios]
        sizes = [_Sizes(trace, roots, kept) for kept in scenarios]
        if all(evaluate(fixed.expr, e, z) == fixed.value for e, z in zip(envs, sizes)):
            continue
        partner = None
        if len(changed) == 1 and np.array_equal(np.unique(roots[changed[0].labels[changed[0].labels >= 0]]), comps):
            partner = _partner(fixed, deps - set(by_attr), env, envs, sizes, scenarios, roots, changed[0])
        if partner is None:
            _flag_fixed(trace, fixed, changed, read)
            continue
        bound.append(partner)
        by_attr[(partner.module, partner.attribute)] = partner


def _updated(env: dict[AttrKey, int], changed: list[Bound], roots: np.ndarray, kept: np.ndarray) -> dict[AttrKey, int]:
    """Attribute values when only the components in ``kept`` stay."""
    out = dict(env)
    for b in changed:
        out[(b.module, b.attribute)] = b.sign * _kept(roots, b.labels, kept) // b.divisor
    return out


def _partner(fixed: FixedSize, free: set[AttrKey], env, envs, sizes, scenarios, roots: np.ndarray,
             base: Bound) -> Bound | None:
    kept_sizes = [_kept(roots, base.labels, kept) for kept in scenarios]
    for key in sorted(k for k in free if not _NEVER_A_SIZE.match(k[1])):
        limit = min(max(env[key], 1), _MAX_SEARCH)
        values = []
        for e, z in zip(envs, sizes):
            values.append(next((x for x in range(1, limit + 1)
                                if evaluate(fixed.expr, _with(e, key, x), z) == fixed.value), None))
        if any(v is None for v in values):
            continue
        ratio = _ratio(kept_sizes, values)
        if ratio is not None:
            return Bound(key[0], key[1], ratio[0], ratio[1], base.labels, env[key], fixed.op)
    return None


def _flag_fixed(trace: TraceResult, fixed: FixedSize, changed: list[Bound], read: list[np.ndarray]) -> None:
    what = " and ".join(filter(None, [_names({(b.module, b.attribute) for b in changed}),
                                      "the sizes of tensors it reads" if read else ""]))
    reason = (f"module '{fixed.module or '<root>'}' computes the size {fixed.value} ({fixed.op}) from {what}, "
              "which would change when this dimension shrinks, and no other attribute it reads can keep it")
    for labels in [b.labels for b in changed] + read:
        trace.atoms.flag(labels, UNPRUNABLE, reason)
