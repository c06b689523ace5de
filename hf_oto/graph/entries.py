"""Tensors that enter a module from outside and meet its attention heads: a per-head bias.

A relative-position bias computed once and passed to every layer (MPNet), or ALiBi slopes built
for every head of the config (BLOOM, MPT), would tie head ``h`` of every layer together, or make
the heads unprunable. Instead, each such argument gets fresh atoms on entry to the outermost module
it is passed to; after the analysis, where those atoms met the module's heads, the module keeps
only the positions of its kept heads when it runs (a hook recorded in the manifest, like the
padded norms), and the argument's source keeps its full width. Everywhere else the fresh atoms are
tied back to the source, so the analysis is what it would have been without them. A module that
hands the argument back to its caller (T5's layers return the bias they were given) keeps it tied.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .atoms import UNPRUNABLE, union_find


@dataclass
class EntryRecord:
    """One tensor argument of one module call, given fresh atoms for the call."""

    module: str
    position: int | None  # index among the positional arguments, or None for a keyword
    name: str | None  # the keyword, or the forward parameter it binds to
    source: list[np.ndarray | None]
    fresh: list[np.ndarray | None]
    aliased: bool = False  # the module returned the tensor itself


@dataclass
class InputCut:
    """A dimension of a module argument that the module reads only at its heads' positions."""

    module: str
    position: int | None
    name: str | None
    dim: int  # counted from the end
    labels: np.ndarray  # fresh atoms along the dimension (one entry per position)


class EntryTracker:
    """Module hooks that give tensor arguments fresh atoms for the duration of the call."""

    def __init__(self, tracer: Any, names: dict[int, str]) -> None:
        self.tracer = tracer
        self.names = names
        self.records: list[EntryRecord] = []
        self._open: dict[int, tuple[torch.Tensor, tuple | None]] = {}  # tensor id -> (tensor, saved labels)
        self._calls: list[list[tuple[EntryRecord, int]]] = []
        self._params: dict[type, list[str]] = {}

    def install(self, model: torch.nn.Module) -> list:
        handles = []
        for module in model.modules():
            if module is model:
                continue
            handles.append(module.register_forward_pre_hook(self._enter, with_kwargs=True))
            handles.append(module.register_forward_hook(self._leave, always_call=True))
        return handles

    def _parameter_names(self, module: torch.nn.Module) -> list[str]:
        cls = type(module)
        if cls not in self._params:
            try:
                params = inspect.signature(module.forward).parameters.values()
                self._params[cls] = [p.name for p in params
                                     if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
            except (TypeError, ValueError):
                self._params[cls] = []
        return self._params[cls]

    def _enter(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        opened: list[tuple[EntryRecord, int]] = []
        self._calls.append(opened)
        candidates = [(i, None, a) for i, a in enumerate(args)] + [(None, k, v) for k, v in kwargs.items()]
        candidates = [c for c in candidates if isinstance(c[2], torch.Tensor)]
        if len(candidates) < 2:
            return
        tracer = self.tracer
        params = self._parameter_names(module)
        for position, name, tensor in candidates[1:]:  # the first is the module's main input
            key = id(tensor)
            if (key in self._open or key in tracer._name_of or not tensor.is_floating_point()
                    or tensor.dim() == 0):
                continue
            fresh = [tracer.atoms.allocate_virtual(n, broadcast=True) if n > 1 else None for n in tensor.shape]
            if all(f is None for f in fresh):
                continue
            entry = tracer.labels.get(key)
            source = list(entry[1]) if entry is not None else [None] * tensor.dim()
            if name is None and position < len(params):
                name = params[position]
            record = EntryRecord(self.names.get(id(module), ""), position, name, source, fresh)
            self._open[key] = (tensor, entry)
            tracer.labels[key] = (tensor, fresh)
            opened.append((record, key))
            self.records.append(record)

    def _leave(self, module: torch.nn.Module, args: tuple, out: Any) -> None:
        opened = self._calls.pop() if self._calls else []
        if not opened:
            return
        returned = {id(t) for t in _tensors(out)}
        for record, key in opened:
            _, saved = self._open.pop(key)
            record.aliased = key in returned
            if saved is None:
                self.tracer.labels.pop(key, None)
            else:
                self.tracer.labels[key] = saved


def _tensors(x: Any) -> list[torch.Tensor]:
    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, dict):
        return [t for v in x.values() for t in _tensors(v)]
    if isinstance(x, (tuple, list)):
        return [t for v in x for t in _tensors(v)]
    return []


def resolve_entries(atoms, records: list[EntryRecord], roots: np.ndarray, heads: set[int]) -> tuple[np.ndarray, list[InputCut]]:
    """Keep the fresh atoms of arguments that met heads (returning the cuts), tie the rest back.

    ``heads`` holds the components flagged as attention heads. Returns the components after tying
    back (``roots`` with the extra unions applied) and the cuts to record in the groups.
    """
    by_key: dict[tuple, list[EntryRecord]] = {}
    for r in records:
        by_key.setdefault((r.module, r.position, r.name), []).append(r)
    cuts: list[InputCut] = []
    pairs_a, pairs_b = [], []
    for key, calls in by_key.items():
        first = calls[0]
        for d, fresh in enumerate(first.fresh):
            if fresh is None:
                continue
            keep = (not any(c.aliased for c in calls)
                    and all(c.fresh[d] is not None and c.fresh[d].shape == fresh.shape
                            and np.array_equal(roots[c.fresh[d]], roots[fresh]) for c in calls)
                    and bool(np.isin(roots[fresh], list(heads)).any()))
            if keep:
                cuts.append(InputCut(first.module, first.position, first.name, d - len(first.fresh), fresh))
                for c in calls:
                    if c.source[d] is not None:
                        atoms.flag(c.source[d], UNPRUNABLE, f"read by '{c.module}' and others, each keeping only the "
                                                            "positions of its own heads")
                continue
            for c in calls:
                if c.fresh[d] is None:
                    continue
                if c.source[d] is not None and c.source[d].shape == c.fresh[d].shape:
                    pairs_a.append(c.fresh[d])
                    pairs_b.append(c.source[d])
                else:
                    atoms.flag(c.fresh[d], UNPRUNABLE, f"enters module '{c.module}' from outside with a size that "
                                                       "cannot shrink")
    if pairs_a:
        roots = _merge(roots, np.concatenate(pairs_a), np.concatenate(pairs_b))
    return roots, cuts


def _merge(roots: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``roots`` with the components of ``a[i]`` and ``b[i]`` joined."""
    keep = (a >= 0) & (b >= 0)
    ra, rb = roots[a[keep]], roots[b[keep]]
    comps = np.unique(np.concatenate([ra, rb]))
    parent = union_find(comps.size, np.searchsorted(comps, ra), np.searchsorted(comps, rb))
    table = np.arange(roots.size, dtype=np.int64)
    table[comps] = comps[parent]
    return table[roots]
