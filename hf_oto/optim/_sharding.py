"""Row-sharded parameters (FSDP2 ``fully_shard``: DTensors placed ``Shard(0)``) in the optimizers.

Under FSDP2 each rank holds a contiguous block of rows (dim 0) of every parameter, its gradient and
its optimizer state. A group's statistics are sums over its positions, so each rank sums over
the rows it holds and one all-reduce of the stacked per-group sums (see
:meth:`hf_oto.optim._index.PrunableIndex.combine`) gives every rank the same group vectors; the
decisions made from them (selections, projections) are then identical everywhere, and each rank
scales or zeroes its own rows. This module maps tensors and group positions to the local shard.

Replicated tensors (plain tensors beside DTensors, or ``Replicate()`` placements) are counted on
the first rank of the mesh only, so that the all-reduce does not add them once per rank.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

try:  # torch >= 2.4; DTensor is public from 2.5 on
    from torch.distributed.tensor import DTensor, Replicate, Shard
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
except ImportError:  # pragma: no cover - a torch without DTensor has no FSDP2 either
    DTensor = None  # type: ignore[assignment,misc]


@dataclass(frozen=True)
class ShardLayout:
    """Where a rank's local tensor sits in the global one: rows ``[offset, offset + rows)`` of dim 0
    (the whole tensor when not sharded), and whether this rank adds the tensor's statistics."""

    offset: int
    rows: int
    counted: bool = True


def is_dtensor(t: object) -> bool:
    return DTensor is not None and isinstance(t, DTensor)


def local(t: torch.Tensor | None) -> torch.Tensor | None:
    """The local shard of a DTensor (sharing its storage: in-place updates reach the DTensor)."""
    return t.to_local() if is_dtensor(t) else t


def like_param(value: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """A local tensor as a DTensor placed like ``param`` (optimizer state then stays sharded, as
    distributed checkpointing expects); ``value`` itself when ``param`` is a plain tensor."""
    if not is_dtensor(param):
        return value
    return DTensor.from_local(value, param.device_mesh, param.placements, run_check=False,
                              shape=param.shape, stride=param.stride())


def layouts(params: Sequence[torch.Tensor]) -> tuple[list[ShardLayout], object | None]:
    """Per parameter its :class:`ShardLayout`, and the process group to all-reduce over (None
    when no parameter is a DTensor: the single-process path).

    Raises ValueError for placements other than ``Shard(0)`` or ``Replicate()`` on a 1-D mesh:
    group norms would need other reductions (FSDP1 and DeepSpeed ZeRO shard flat buffers instead).
    """
    # Each fully_shard call without a mesh builds its own (equal) default one: compare by ranks.
    meshes = {(p.device_mesh.device_type, tuple(p.device_mesh.mesh.shape), tuple(p.device_mesh.mesh.flatten().tolist())):
              p.device_mesh for p in params if is_dtensor(p)}
    if not meshes:
        return [ShardLayout(0, p.shape[0] if p.dim() else 1) for p in params], None
    if len(meshes) > 1:
        raise ValueError("the grouped parameters are sharded over different device meshes; hf_oto's optimizers "
                         "need one 1-D mesh (fully_shard every module with the same mesh)")
    mesh = next(iter(meshes.values()))
    if mesh.ndim != 1:
        raise ValueError(f"hf_oto's optimizers support a 1-D device mesh (FSDP2), got a {mesh.ndim}-D mesh "
                         "(HSDP or tensor parallelism)")
    first = mesh.get_local_rank() == 0
    out = []
    for p in params:
        if not is_dtensor(p) or isinstance(p.placements[0], Replicate):
            out.append(ShardLayout(0, p.shape[0] if p.dim() else 1, counted=first))
            continue
        placement = p.placements[0]
        if not isinstance(placement, Shard) or placement.dim != 0:
            raise ValueError(f"hf_oto's optimizers support parameters sharded on dim 0 (FSDP2 fully_shard), "
                             f"got placement {placement}")
        shape, offset = compute_local_shape_and_global_offset(p.shape, mesh, p.placements)
        out.append(ShardLayout(int(offset[0]), int(shape[0])))
    return out, mesh.get_group()


def localize(index: torch.Tensor, dim: int | tuple[int, int], shape: Sequence[int],
             layout: ShardLayout) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Positions ``index`` along ``dim`` of a global tensor of ``shape`` (flat over the grid for a
    per-expert ``(outer, inner)`` pair) as positions of the local shard.

    Returns ``(keep, local_index, local_size)``: which positions are on this rank, their local
    indices, and the local length of ``dim`` (or grid).
    """
    lo, n = layout.offset, layout.rows
    if isinstance(dim, tuple):
        outer, inner = dim
        a, b = index // shape[inner], index % shape[inner]
        if outer == 0:
            keep = (a >= lo) & (a < lo + n)
            return keep, (a[keep] - lo) * shape[inner] + b[keep], n * shape[inner]
        if inner == 0:
            keep = (b >= lo) & (b < lo + n)
            return keep, a[keep] * n + (b[keep] - lo), shape[outer] * n
        return torch.ones_like(index, dtype=torch.bool), index, shape[outer] * shape[inner]
    if dim == 0:
        keep = (index >= lo) & (index < lo + n)
        return keep, index[keep] - lo, n
    return torch.ones_like(index, dtype=torch.bool), index, shape[dim]
