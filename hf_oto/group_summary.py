"""``ZeroInvariantGroups.summary()``: per layer, what is prunable, and for the rest why not."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .groups import ZeroInvariantGroups


def format_summary(groups: "ZeroInvariantGroups") -> str:
    """See :meth:`hf_oto.ZeroInvariantGroups.summary`."""
    kinds = [k for k in ("head", "neuron", "expert", "channel", "hidden") if any(g.kind == k for g in groups)]
    cells: dict[str, dict[str, list[int]]] = {}
    reasons: dict[tuple[str, str], dict[str, int]] = {}
    for g in groups.groups:
        block = _block_of(g.layer)
        count = cells.setdefault(block, {}).setdefault(g.kind, [0, 0])
        count[0] += 1
        count[1] += int(g.prunable)
        if not g.prunable or not g.exact:
            why = g.reason if not g.prunable else "prunable, approximate: normalised dimension"
            where = reasons.setdefault((g.kind, _generic(why, block)), {})
            where[block] = where.get(block, 0) + 1
    seconds = f"analysis {groups.analysis_seconds:.2f}s"
    if groups.dry_run_seconds:
        seconds += f", of which dry run {groups.dry_run_seconds:.2f}s"
    lines = [f"{groups.model_class or 'model'}: {len(groups)} zero-invariant groups, "
             f"{groups.num_prunable} prunable ({seconds})", "", "prunable / found, per layer:"]
    rows = [(block, [f"{c[1]}/{c[0]}" if (c := cells[block].get(k)) else "-" for k in kinds])
            for block in cells]
    width = max([len("layer")] + [len(b) for b in _collapse_rows(rows)])
    lines.append(f"  {'layer':<{width}}  " + "  ".join(f"{k:>13}" for k in kinds))
    for name, row in _collapse_rows(rows).items():
        lines.append(f"  {name:<{width}}  " + "  ".join(f"{c:>13}" for c in row))
    if reasons:
        lines += ["", "not prunable, and why:"]
        for (kind, why), where in sorted(reasons.items(), key=lambda kv: (kinds.index(kv[0][0]), kv[0][1])):
            total = sum(where.values())
            lines.append(f"  {total} {kind} in {_ranges(list(where))}: {why}")
    if groups.unprunable_tensors:
        lines += ["", "parameters with no prunable structure:"]
        by_why: dict[str, list[str]] = {}
        for name, why in groups.unprunable_tensors.items():
            block = _block_of(name)
            by_why.setdefault(f"{_generic(name, block)}: {_generic(why, block)}", []).append(block)
        lines += [f"  {text.replace('*', _ranges(blocks).rpartition('.')[2], 1) if '*' in text else text}"
                  for text, blocks in by_why.items()]
    if groups.unsupported_ops:
        lines += ["", "ops the analysis did not understand (their structures are unprunable):"]
        by_op: dict[str, list[str]] = {}
        for op in groups.unsupported_ops:
            block = _block_of(op.rpartition("'")[0].rpartition("'")[2])
            by_op.setdefault(_generic(op, block), []).append(block)
        lines += [f"  {text.replace('*', _ranges(blocks).rpartition('.')[2], 1) if '*' in text else text}"
                  for text, blocks in by_op.items()]
    if groups.notes:
        lines += ["", "notes:"] + [f"  {n}" for n in groups.notes]
    return "\n".join(lines)


_NUMBER = re.compile(r"^\d+$")


def _block_of(path: str) -> str:
    """The repeated block a module path lies in: up to its first numeric component
    (``model.layers.3.self_attn`` -> ``model.layers.3``), else the path itself."""
    parts = path.split(".") if path else []
    for i, part in enumerate(parts):
        if _NUMBER.match(part):
            return ".".join(parts[:i + 1])
    return path or "<model>"


def _generic(text: str, block: str) -> str:
    """``text`` with the block's index replaced by ``*``, so that layers with the same reason match."""
    prefix, _, index = block.rpartition(".")
    if not prefix or not _NUMBER.match(index):
        return text
    return re.sub(rf"(?<![\w.]){re.escape(prefix)}\.{index}(?=[.'\s)]|$)", f"{prefix}.*", text)


def _ranges(blocks: list[str]) -> str:
    """``model.layers.0``, ``model.layers.1``, ... as ``model.layers.0-1``, ranges per prefix."""
    by_prefix: dict[str, list[int]] = {}
    plain: list[str] = []
    for b in blocks:
        prefix, _, index = b.rpartition(".")
        if prefix and _NUMBER.match(index):
            by_prefix.setdefault(prefix, []).append(int(index))
        elif b not in plain:
            plain.append(b)
    parts = []
    for prefix, indices in by_prefix.items():
        indices = sorted(set(indices))
        runs, start = [], indices[0]
        for a, b in zip(indices, indices[1:] + [None]):
            if b != a + 1:
                runs.append(f"{start}" if start == a else f"{start}-{a}")
                start = b
        parts.append(f"{prefix}.{','.join(runs)}")
    return ", ".join(plain + parts)


def _collapse_rows(rows: list[tuple[str, list[str]]]) -> dict[str, list[str]]:
    """Consecutive blocks of one prefix with the same cells become one row (``model.layers.0-31``)."""
    out: dict[str, list[str]] = {}
    run: list[str] = []
    for i, (block, cells) in enumerate(rows):
        run.append(block)
        nxt = rows[i + 1] if i + 1 < len(rows) else None
        prefix, _, index = block.rpartition(".")
        same = (nxt is not None and nxt[1] == cells and prefix and _NUMBER.match(index)
                and nxt[0].rpartition(".")[0] == prefix and _NUMBER.match(nxt[0].rpartition(".")[2])
                and int(nxt[0].rpartition(".")[2]) == int(index) + 1)
        if not same:
            out[_ranges(run)] = cells
            run = []
    return out
