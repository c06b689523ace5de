"""Vectorised group maths restricted to the prunable groups, for the optimizers' hot path.

:class:`hf_oto.ZeroInvariantGroups` keeps one slice per (tensor, dim) for *every* group, including
the non-prunable ones (the hidden width of a Transformer touches nearly every weight). An optimizer
only ever reads or writes prunable groups, so :class:`PrunableIndex` keeps, per (parameter, dim),
only the positions of prunable groups. That halves the work of every reduction on a Transformer.

Everything here is one loop over parameter slices (a few dozen to a few hundred per model, whatever
the number of groups) with a few tensor ops each, plus, on CPU, a loop over cache-sized chunks of
each tensor in :func:`update_with_rows_`: no Python loop per group.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.distributed

from ..groups import ZeroInvariantGroups, grid_view, reduce_except
from ._sharding import layouts, localize


@dataclass
class _Slice:
    param: int            # index into ``groups.param_names``
    dim: int | tuple[int, int]  # a tuple for per-expert slices: positions index the flattened grid
    index: torch.Tensor   # positions along ``dim`` (on the parameter's device)
    group: torch.Tensor   # group of each position (on the parameter's device)
    size: int             # length of ``dim``
    # The same positions sorted by group, for segment sums: positions, then per distinct group
    # (ascending) its id and how many positions it has.
    sorted_index: torch.Tensor
    segment_groups: torch.Tensor
    segment_lengths: torch.Tensor
    # False for a replicated tensor on all ranks but the first: updated here, summed there only.
    counted: bool = True


@dataclass
class Positions:
    """The positions of a set of groups: per slice, the positions and the group of each."""

    slices: list[tuple[int, int, torch.Tensor, torch.Tensor, int]]  # (param, dim, positions, groups, dim size)

    def __bool__(self) -> bool:
        return bool(self.slices)


class PrunableIndex:
    """Per-group statistics, fills and scalings over the prunable groups of ``groups``.

    Tensors are passed as lists aligned with ``groups.param_names`` (None entries are skipped).
    Group vectors (results, masks, factors) are float32/bool tensors of length ``len(groups)`` on
    ``device``; entries of non-prunable groups are never touched.
    """

    def __init__(self, groups: ZeroInvariantGroups, params: Sequence[torch.Tensor], device: torch.device,
                 include: torch.Tensor | None = None) -> None:
        self.num_groups = len(groups)
        self.device = device
        prunable = groups.prunable_mask
        # Sharded parameters (FSDP2): positions are mapped to this rank's rows, and ``combine``
        # all-reduces the per-group sums over ``self.process_group`` (None: one process).
        self.layouts, self.process_group = layouts(params)
        self.slices: list[_Slice] = []
        for i, s in groups._param_slices:
            keep = (prunable if include is None else include)[s.group]
            if not keep.any():
                continue
            dev = params[i].device
            shape = groups.tensor_shapes[s.tensor]
            index, group = s.flat_index(shape)[keep], s.group[keep]
            dim = s.dim if s.outer_dim is None else s.dims
            size = s.grid_size(shape)
            if self.process_group is not None:
                if self.layouts[i].rows == 0:
                    continue  # a dimension smaller than the mesh: this rank holds none of the tensor
                on_rank, index, size = localize(index, dim, shape, self.layouts[i])
                group = group[on_rank]
                if index.numel() == 0:
                    continue
            order = torch.sort(group, stable=True).indices
            seg_groups, seg_lengths = torch.unique_consecutive(group[order], return_counts=True)
            self.slices.append(_Slice(i, dim, index.to(dev), group.to(dev), size,
                                      index[order].to(dev), seg_groups.to(device), seg_lengths.to(dev),
                                      self.layouts[i].counted))
        # A slice whose positions cover its whole dimension empties that dimension when all its
        # groups are removed; selections must avoid that (see ``emptied``). Non-prunable groups
        # can never be removed, so only fully prunable, fully covering slices matter.
        self.full_dims: list[torch.Tensor] = []
        for s in groups.covering_slices:
            if bool(prunable[s.group].all()):
                self.full_dims.append(s.group.unique().to(device))
        #: Per parameter (index into ``param_names``) with a prunable slice: its sliced dims.
        self.slice_dims: dict[int, tuple[int, ...]] = {}
        for s in self.slices:
            self.slice_dims[s.param] = self.slice_dims.get(s.param, ()) + (s.dim,)

    # -- reductions ------------------------------------------------------------------------------
    def sq_norms(self, tensors: Sequence[torch.Tensor | None]) -> torch.Tensor:
        """Squared norm of every prunable group (float32 over all groups; 0 for the others)."""
        rows: dict[tuple[int, int], torch.Tensor] = {}
        for i, dims in self.slice_dims.items():
            if tensors[i] is not None:
                for dim, r in update_with_rows_(tensors[i], None, None, 1.0, 0.0, dims, False).items():
                    rows[(i, dim)] = r
        weights = torch.zeros(1, len(tensors), 4)
        weights[0, :, 0] = 1
        return self.combine(rows, weights)[0]

    def combine(self, rows: dict[tuple[int, int], torch.Tensor], weights: torch.Tensor) -> torch.Tensor:
        """Per-group linear combinations of per-position statistics.

        ``rows[(param, dim)]`` is ``[R, size]``: R statistics for each position along ``dim`` of
        that parameter (from :func:`update_with_rows_`); ``weights[k, param, r]`` weights statistic
        r of that parameter in output k. Returns ``[K, G]``: for every group, the weighted sum over
        all its positions. Deterministic (segment sums).
        """
        weights = weights.to(self.device, torch.float32)
        out = torch.zeros(weights.shape[0], self.num_groups, dtype=torch.float32, device=self.device)
        for s in self.slices:
            r = rows.get((s.param, s.dim))
            if r is None or not s.counted:
                continue
            seg = torch.segment_reduce(r.t()[s.sorted_index], "sum", lengths=s.segment_lengths, axis=0)
            out[:, s.segment_groups] += weights[:, s.param, :r.shape[0]] @ seg.to(self.device).t()
        if self.process_group is not None:
            # Each rank summed its own rows: one all-reduce of all K statistics makes the group
            # vectors whole, and identical on every rank (so are the decisions made from them).
            torch.distributed.all_reduce(out, group=self.process_group)
        return out

    # -- selections ------------------------------------------------------------------------------
    def positions(self, mask: torch.Tensor) -> Positions:
        """The positions of the groups in ``mask`` (bool over all groups)."""
        out = []
        for s in self.slices:
            m = mask.to(s.group.device)[s.group]
            if m.any():
                out.append((s.param, s.dim, s.index[m], s.group[m], s.size))
        return Positions(out)

    def emptied(self, removed: torch.Tensor) -> torch.Tensor:
        """Bool over ``full_dims``: which dimensions removing the groups in ``removed`` would empty."""
        if not self.full_dims:
            return torch.zeros(0, dtype=torch.bool)
        return torch.stack([removed[g].all() for g in self.full_dims])

    # -- in-place updates ------------------------------------------------------------------------
    @staticmethod
    def fill_(tensors: Sequence[torch.Tensor | None], where: Positions, value: float = 0.0) -> None:
        """Set every entry at ``where`` to ``value`` (exact: no multiply)."""
        for i, dim, idx, _, _ in where.slices:
            t = tensors[i]
            if t is not None:
                fill_positions_(t, dim, idx, value)

    @staticmethod
    def scale_(tensors: Sequence[torch.Tensor | None], where: Positions, factors: torch.Tensor) -> None:
        """Multiply the entries at ``where`` by ``factors[group]`` (entries in two groups get both)."""
        for i, dim, idx, grp, size in where.slices:
            t = tensors[i]
            if t is not None:
                scale_positions_(t, dim, idx, factors.to(t.device)[grp], size)


def _grid_index(t: torch.Tensor, dims: tuple[int, int], idx: torch.Tensor):
    """A view of ``t`` with ``dims`` in front, and the (outer, inner) indices of flat positions."""
    inner = t.shape[dims[1]]
    return grid_view(t, dims), (idx // inner, idx % inner)


def fill_positions_(t: torch.Tensor, dim: int | tuple[int, int], idx: torch.Tensor, value: float) -> None:
    """Set ``t`` to ``value`` at positions ``idx`` along ``dim`` (or a per-expert grid)."""
    if isinstance(dim, tuple):
        grid, at = _grid_index(t, dim, idx)
        grid[at] = value
    else:
        t.index_fill_(dim, idx, value)


def scale_positions_(t: torch.Tensor, dim: int | tuple[int, int], idx: torch.Tensor, values: torch.Tensor,
                     size: int) -> None:
    """``t`` times ``values`` at positions ``idx`` along ``dim`` (or a per-expert grid).

    A broadcast multiply over the whole tensor when many positions change (one in-place pass),
    else gather-multiply-scatter on those positions only.
    """
    if isinstance(dim, tuple):
        grid, at = _grid_index(t, dim, idx)
        grid[at] = grid[at] * values.to(t.dtype).view([-1] + [1] * (t.dim() - 2))
        return
    shape = [1] * t.dim()
    shape[dim] = -1
    if 4 * idx.numel() > size:
        vec = torch.ones((size,), dtype=t.dtype, device=t.device)
        vec[idx] = values.to(t.dtype)
        t.mul_(vec.view(shape))
    else:
        t.index_copy_(dim, idx, t.index_select(dim, idx) * values.to(t.dtype).view(shape))


#: Elements per chunk of :func:`update_with_rows_` on CPU: quotient and products stay in cache
#: instead of full-size temporaries (measured: 2-3x faster than one vecdot over a BERT-base FFN
#: matrix; 64K beat 32K, 128K and 256K on a whole BERT-base step).
_CHUNK = 1 << 16


def update_with_rows_(x: torch.Tensor, num: torch.Tensor | None, den: torch.Tensor | None, keep: float,
                      alpha: float, dims: Sequence[int], post: bool, keep_quotient: bool = False,
                      pre: bool = True, dd: bool = True) -> dict[int, torch.Tensor]:
    """In place ``x <- keep * x + alpha * d`` (``d = num / den``, or ``num`` when ``den`` is None;
    ``num`` None, or ``keep == 1`` and ``alpha == 0``: no update) and, in the same pass,
    per-position statistics for each of ``dims``. With ``keep_quotient``, ``d`` is written over
    ``den`` (a temporary of the caller's), so that a later pass over ``x`` needs no division.

    Returns ``{dim: [4, size]}`` (float32): over the other dims, the sums of ``x*x``, ``x*d`` and
    ``d*d`` before the update (rows 0-2 only when ``pre``, row 2 only when ``dd``) and of ``x*x``
    after it (row 3 only when ``post``); the rows not asked for stay 0. The tensor is
    processed in cache-sized chunks of its leading dimension, so the direction and the products
    never exist at full size, and the update reads ``x``, ``num`` and ``den`` from memory once:
    the statistics cost arithmetic, not memory traffic.
    """
    out = {dim: torch.zeros(4, math.prod(x.shape[d] for d in dim) if isinstance(dim, tuple) else x.shape[dim],
                            dtype=torch.float32, device=x.device) for dim in dims}
    # On CPU, cache-sized chunks; on accelerators one chunk (fewer kernel launches matter more).
    step = x.shape[0] if x.device.type != "cpu" else max(1, _CHUNK // max(x[0].numel(), 1))
    n = x.shape[0]
    chunks = zip(x.split(step), num.split(step) if num is not None else [None] * n,
                 den.split(step) if den is not None else [None] * n)
    # Per-row outputs of dim 0, as views matching the chunks (norms; squared at the end).
    rows0 = out[0].split(step, dim=1) if 0 in out else None
    for c, (xc, nc, dc) in enumerate(chunks):
        if dc is None or nc is None:
            d = nc
        else:
            d = torch.div(nc, dc, out=dc) if keep_quotient else nc / dc
        views = None if rows0 is None else rows0[c]
        if pre:
            _accumulate(out, views, xc, d, 0, c * step, dd)
        if d is not None and (alpha != 0.0 or keep != 1.0):
            if keep != 1.0:
                xc.mul_(keep)
            xc.add_(d, alpha=alpha)
        if post:
            _accumulate(out, views, xc, None, 3, c * step)
    if 0 in out:  # dim 0 collected norms (no temporary): square them once
        out[0][[0, 2, 3]] = out[0][[0, 2, 3]].square()
    return out


def _accumulate(out: dict[int, torch.Tensor], rows0: torch.Tensor | None, xc: torch.Tensor,
                d: torch.Tensor | None, row: int, start: int = 0, dd: bool = True) -> None:
    """Add the statistics of chunk ``xc`` to ``out``: from row ``row`` on, x*x then, with ``d``, x*d
    and (with ``dd``) d*d. For dim 0 they go to ``rows0`` (the chunk's columns of ``out[0]``) as
    norms, not squares, until :func:`update_with_rows_` squares them (a norm along rows needs no temporary)."""
    xf = xc if xc.dtype == torch.float32 else xc.float()
    df = d if d is None or d.dtype == torch.float32 else d.float()
    for dim, o in out.items():
        if dim == 0:
            x2 = xf if xf.dim() == 2 else xf.reshape(xf.shape[0], -1)
            torch.linalg.vector_norm(x2, 2, dim=1, out=rows0[row])
            if df is not None:
                d2 = df if df.dim() == 2 else df.reshape(x2.shape[0], -1)
                torch.sum(x2 * d2, dim=1, out=rows0[row + 1])
                if dd:
                    torch.linalg.vector_norm(d2, 2, dim=1, out=rows0[row + 2])
        elif isinstance(dim, tuple):  # a per-expert grid; the chunk holds rows start.. of dim 0
            sizes = [xc.shape[k] for k in dim]
            grid = o.view(o.shape[0], *[-1 if k == 0 else xc.shape[k] for k in dim])
            if 0 in dim:
                grid = grid.narrow(1 + dim.index(0), start, xc.shape[0])
            grid[row] += reduce_except(xf * xf, dim).view(sizes)
            if df is not None:
                grid[row + 1] += reduce_except(xf * df, dim).view(sizes)
                if dd:
                    grid[row + 2] += reduce_except(df * df, dim).view(sizes)
        else:
            other = [k for k in range(xf.dim()) if k != dim]
            o[row] += (xf * xf).sum(other)
            if df is not None:
                o[row + 1] += (xf * df).sum(other)
                if dd:
                    o[row + 2] += (df * df).sum(other)


def _along(v: torch.Tensor, x: torch.Tensor, dim: int | tuple[int, int]) -> torch.Tensor:
    """``v`` (one value per position of ``dim``, or of a per-expert grid flattened outer-major) as
    a view that broadcasts over ``x``."""
    shape = [1] * x.dim()
    if not isinstance(dim, tuple):
        shape[dim] = -1
        return v.view(shape)
    outer, inner = dim
    shape[outer], shape[inner] = x.shape[outer], x.shape[inner]
    grid = v.view(x.shape[outer], x.shape[inner])
    return (grid if outer < inner else grid.t()).reshape(shape)


def scaled_step_(x: torch.Tensor, d: torch.Tensor | None, keep: float, alpha: float,
                 scales: Sequence[tuple[int, torch.Tensor]] = ()) -> None:
    """In place ``x <- (keep - s) * x + alpha * d``, ``s`` the sum of the vectors in ``scales``
    (``(dim, vector along dim)``, broadcast over the other dims; none: ``s = 0``), in cache-sized
    chunks of the leading dimension so that ``x`` is read and written once.
    """
    step = x.shape[0] if x.device.type != "cpu" else max(1, _CHUNK // max(x[0].numel(), 1))
    for r0 in range(0, x.shape[0], step):
        xc = x[r0:r0 + step]
        mult = None
        for dim, v in scales:
            part = _along(v, x, dim)
            if dim == 0 or (isinstance(dim, tuple) and 0 in dim):
                part = part[r0:r0 + step]
            mult = part if mult is None else mult + part
        if mult is not None:
            xc.mul_(keep - mult)
        elif keep != 1.0:
            xc.mul_(keep)
        if d is not None:
            xc.add_(d[r0:r0 + step], alpha=alpha)
