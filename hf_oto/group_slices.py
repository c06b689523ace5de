"""Where a group lives in a tensor: positions along one dim, or on an (expert, position) grid."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch


@dataclass
class GroupSlice:
    """Positions along ``dim`` of tensor ``tensor`` and the group each one belongs to.

    A per-expert slice (``outer_dim`` set) addresses a grid instead: position i is index
    ``outer[i]`` along ``outer_dim`` and ``index[i]`` along ``dim``, so that one expert's neuron in
    a 3-D tensor holding every expert (``gate_up_proj[e, j, :]``) is a group of its own. A
    ``kept`` slice belongs to its groups (norms, zeroing) but stays, zero, in the compressed model:
    a router's rows, whose removal would change which experts its top-k picks.
    """

    tensor: str
    is_param: bool
    dim: int
    index: torch.Tensor
    group: torch.Tensor
    outer_dim: int | None = None
    outer: torch.Tensor | None = None
    kept: bool = False

    @property
    def dims(self) -> tuple[int, ...]:
        """The dims the positions address: ``(dim,)`` or ``(outer_dim, dim)``."""
        return (self.dim,) if self.outer_dim is None else (self.outer_dim, self.dim)

    def grid_size(self, shape: Sequence[int]) -> int:
        """Number of positions along :attr:`dims` of a tensor of ``shape``."""
        return math.prod(shape[d] for d in self.dims)

    def flat_index(self, shape: Sequence[int]) -> torch.Tensor:
        """Positions as indices into the flattened :attr:`dims` (row-major, in that order)."""
        return self.index if self.outer is None else self.outer * shape[self.dim] + self.index


def grid_view(t: torch.Tensor, dims: int | tuple[int, ...]) -> torch.Tensor:
    """``t`` with ``dims`` moved to the front (a view), so ``[outer, index]`` addresses positions."""
    dims = (dims,) if isinstance(dims, int) else tuple(dims)
    return t.movedim(dims, tuple(range(len(dims))))


def per_position(reduced: torch.Tensor, dims: int | tuple[int, ...]) -> torch.Tensor:
    """Flatten a tensor reduced over every dim but ``dims`` (kept in ascending order) into one
    value per position, ``dims`` row-major in the given order."""
    dims = (dims,) if isinstance(dims, int) else tuple(dims)
    if len(dims) > 1:
        order = sorted(dims)
        reduced = reduced.permute([order.index(d) for d in dims])
    return reduced.reshape(-1)


def reduce_except(t: torch.Tensor, dims: int | tuple[int, ...], norm: bool = False) -> torch.Tensor:
    """Per position along ``dims``: the sum of ``t`` (or its L2 norm) over the other dims."""
    dims = (dims,) if isinstance(dims, int) else tuple(dims)
    other = [d for d in range(t.dim()) if d not in dims]
    if norm:
        red = torch.linalg.vector_norm(t, 2, dim=other) if other else t.abs()
    else:
        red = t.sum(other) if other else t
    return per_position(red, dims)


def segment_layout(index: torch.Tensor, group: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The groups along one dim and, per group, its position in each of ``k`` equal segments.

    Returns ``(groups, positions)`` with ``positions`` of shape ``[len(groups), k]``, or None when
    the groups do not all hold one position at the same offset of every segment (``gate_up_proj``
    holds neuron j at j and at ffn + j: two segments, which the model's ``chunk(2)`` keeps apart).
    """
    order = torch.argsort(group * size + index)
    group, index = group[order], index[order]
    groups, counts = torch.unique_consecutive(group, return_counts=True)
    k = int(counts[0]) if counts.numel() else 1
    if (counts != k).any() or size % k:
        return None
    positions = index.view(-1, k)
    if not torch.equal(positions - positions[:, :1], torch.arange(k).mul(size // k).expand_as(positions)):
        return None
    return groups, positions


def ragged_width(per_outer: Sequence[torch.Tensor], size: int) -> int:
    """Width of a per-expert dim of ``size``: per segment the widest expert's kept count, rounded
    up to a multiple of 8 (the grouped-matmul kernels want 16-byte aligned strides) but no wider
    than the segment was. At least one position stays: when every kept expert lost all its
    neurons (its whole-expert group kept, its neurons removed), zero-padded neurons compute the
    zeros the sparse model did, and the dim never becomes empty."""
    k = per_outer[0].shape[1] if per_outer else 1
    widest = max(max((p.shape[0] for p in per_outer), default=0), 1)
    return k * min(size // k, -(-widest // 8) * 8)


def _outer_of(s: GroupSlice, groups: torch.Tensor) -> torch.Tensor:
    """The outer index (expert) of each group of a per-expert slice."""
    table = torch.full((int(s.group.max()) + 1,), -1, dtype=torch.long)
    table[s.group] = s.outer
    return table[groups]
