"""Atoms: one per index of every dimension of every parameter and floating buffer.

The tracer labels each dimension of each intermediate tensor with the atoms it is made of. Ops that
force two dimensions to shrink together (an elementwise add, the contracted dimension of a matmul,
a head dimension shared by q and k) union their atoms; ops that make a dimension impossible to
shrink flag them. After the trace, each connected component of atoms that holds at least one
parameter slice is a candidate zero-invariant group.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

#: Label of a tensor dimension: the atom id of each index along it (-1: not prunable structure),
#: or ``None`` when no index of the dimension belongs to a parameter's structure.
Labels = "np.ndarray | None"

# Flags a component can carry. UNPRUNABLE carries a reason; the others classify the structure.
UNPRUNABLE = "unprunable"
MIXED = "mixed"  # normalised or softmaxed along the dimension: removal changes the statistics
HEAD = "head"  # batch dimension of an attention product
CONV = "conv"  # channel of a convolution
EMBED = "embed"  # width of an embedding table
COARSENED = "coarsened"  # several indices fused into one unit by a reshape (heads, norm groups)
# A channel role: contracted with a weight, produced by a weight, normalised per channel. Dims that
# never take one (kernel taps, table rows, sequence positions) are not structures.
STRUCTURE = "structure"
# A width a kernel reads as a stride that must stay 16-byte aligned (``aten._grouped_mm``).
ALIGNED = "aligned"


@dataclass
class AtomOwner:
    """The atoms allocated for one dimension of one parameter or buffer."""

    tensor: str  # canonical name (first name in named_parameters / named_buffers)
    is_param: bool
    dim: int
    start: int
    size: int


class AtomTable:
    """Allocates atoms, records unions and flags, and resolves components at the end."""

    def __init__(self) -> None:
        self.n = 0
        self.owners: list[AtomOwner] = []
        self._union_a: list[np.ndarray] = []
        self._union_b: list[np.ndarray] = []
        self._flags: list[tuple[np.ndarray, str, str]] = []
        self._broadcast: list[tuple[int, int]] = []  # atom ranges of broadcast dimensions

    def allocate(self, tensor: str, is_param: bool, dim: int, size: int) -> np.ndarray:
        start = self.n
        self.n += size
        self.owners.append(AtomOwner(tensor, is_param, dim, start, size))
        return np.arange(start, start + size, dtype=np.int64)

    def allocate_virtual(self, size: int, broadcast: bool = False) -> np.ndarray:
        """Atoms for a tensor the model creates with a literal size (``torch.zeros(1, h, s, s)``),
        or, with ``broadcast``, for a dimension expanded from size one (every position holds the
        same values, so it can shrink to whatever it meets)."""
        start = self.n
        self.n += size
        if broadcast:
            self._broadcast.append((start, start + size))
        return np.arange(start, start + size, dtype=np.int64)

    def is_broadcast(self, atoms: np.ndarray) -> bool:
        """Whether every atom in ``atoms`` was allocated for a broadcast dimension."""
        atoms = atoms[atoms >= 0]
        if not self._broadcast or atoms.size == 0:
            return False
        starts = np.fromiter((s for s, _ in self._broadcast), dtype=np.int64)
        ends = np.fromiter((e for _, e in self._broadcast), dtype=np.int64)
        k = np.searchsorted(starts, atoms, side="right") - 1
        return bool(((k >= 0) & (atoms < ends[np.maximum(k, 0)])).all())

    def union(self, a: np.ndarray, b: np.ndarray) -> None:
        """Union position-wise; positions where either side is -1 are skipped."""
        keep = (a >= 0) & (b >= 0) & (a != b)
        if keep.any():
            self._union_a.append(a[keep])
            self._union_b.append(b[keep])

    def union_all(self, atoms: np.ndarray) -> int:
        """Fuse every valid atom in ``atoms`` into one unit; returns its representative (or -1)."""
        valid = atoms[atoms >= 0]
        if valid.size == 0:
            return -1
        rep = int(valid[0])
        if valid.size > 1:
            self._union_a.append(valid[1:])
            self._union_b.append(np.full(valid.size - 1, rep, dtype=np.int64))
        return rep

    def flag(self, atoms: np.ndarray, kind: str, reason: str = "") -> None:
        atoms = np.asarray(atoms, dtype=np.int64).reshape(-1)
        atoms = atoms[atoms >= 0]
        if atoms.size:
            self._flags.append((atoms, kind, reason))

    def components(self) -> np.ndarray:
        """Root atom (the smallest in its component) of every atom."""
        if not self._union_a:
            return np.arange(self.n, dtype=np.int64)
        return union_find(self.n, np.concatenate(self._union_a), np.concatenate(self._union_b))

    def flagged_components(self, roots: np.ndarray, kind: str) -> set[int]:
        """Components carrying a flag of ``kind``."""
        found = [roots[atoms] for atoms, k, _ in self._flags if k == kind]
        return set(np.unique(np.concatenate(found)).tolist()) if found else set()

    def component_flags(self, roots: np.ndarray) -> dict[str, dict[int, str]]:
        """For each flag kind, the components carrying it with the first reason recorded."""
        by_kind: dict[str, tuple[list[np.ndarray], list[np.ndarray], list[str]]] = {}
        for atoms, kind, reason in self._flags:
            comps, reason_ids, reasons = by_kind.setdefault(kind, ([], [], []))
            comps.append(roots[atoms])
            reason_ids.append(np.full(atoms.size, len(reasons), dtype=np.int64))
            reasons.append(reason)
        out: dict[str, dict[int, str]] = {}
        for kind, (comps, reason_ids, reasons) in by_kind.items():
            all_comps = np.concatenate(comps)
            all_ids = np.concatenate(reason_ids)
            # np.unique's return_index picks the first occurrence: the earliest reason recorded.
            uniq, first = np.unique(all_comps, return_index=True)
            out[kind] = {int(c): reasons[int(i)] for c, i in zip(uniq, all_ids[first])}
        return out


def union_find(n: int, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Smallest member of the component of each of ``n`` items joined pairwise by ``a[i]``, ``b[i]``
    (vectorised hooking with pointer jumping)."""
    parent = np.arange(n, dtype=np.int64)
    while True:
        ra, rb = parent[a], parent[b]
        differ = ra != rb
        if not differ.any():
            return parent
        ra, rb = ra[differ], rb[differ]
        low = np.minimum(ra, rb)
        np.minimum.at(parent, ra, low)
        np.minimum.at(parent, rb, low)
        while True:
            grand = parent[parent]
            if np.array_equal(grand, parent):
                break
            parent = grand


def common_module_prefix(names: list[str]) -> str:
    """The longest dotted module path that every name starts with (``""`` if none): the layer a
    group spanning several modules belongs to."""
    parts = [n.split(".") for n in names]
    prefix = []
    for tokens in zip(*parts):
        if all(t == tokens[0] for t in tokens):
            prefix.append(tokens[0])
        else:
            break
    return ".".join(prefix)
