"""Loss-based saliency of zero-invariant groups: first-order Taylor and Fisher scores from raw gradients.

Removing group g sets its entries x_g to zero; expanding the loss around the current point,

    L(x with x_g = 0) - L(x) ~= -<x_g, grad_g L> + 1/2 x_g^T H x_g.

``<x_g, grad_g L>`` is also the derivative of the loss along a scaling of the group, so one
per-group sum per batch carries what each criterion needs:

- ``taylor_abs`` (the default): ``sum_t sum_{i in g} |x_i * grad_i L_t|`` over the batches t since
  the last selection: the first-order Taylor term of every entry, in absolute value, summed over
  the group (the form Torch-Pruning's ``TaylorImportance`` uses, accumulated batch by batch). It
  does not let the entries of a group cancel each other: the conv rows feeding a BatchNorm have
  ``<x, grad> = 0`` exactly (the loss is invariant to their scale) whatever their importance, and
  at a minimum the per-batch terms are noise of either sign that abs() turns into a measure of how
  much the loss reacts to each entry;
- ``taylor``: ``|sum_t <x_g, grad_g L_t>|``: the first-order change of the loss when the whole
  group goes (Molchanov et al., 2017, on whole groups);
- ``fisher``: ``sum_t <x_g, grad_g L_t>^2``: the empirical Fisher approximation of the
  second-order term (Theis et al., 2018; Molchanov et al., 2019). Its terms are squares, so the
  batches add up instead of cancelling.

Which is the default was measured (``bench/compare.py``, docs/compare.md; same steps and FLOPs
target for every row): ``taylor_abs`` was ahead of ``fisher`` on a from-scratch ResNet (98.1 / 97.7
against 97.3 / 96.5 accuracy at 0.5 / 0.35 kept FLOPs, 3 seeds) and on a pretrained MiniLM
compressed on real text (held-out cosine 0.855 against 0.843), and level with it on a ConvNeXt
within the seeds' spread. Two other candidates lost and were dropped: ``sqrt(fisher)`` (0.767 on
the text task) and an average of the ranks of ``fisher`` and of the magnitude (0.685).

All read ``p.grad`` as the optimizer receives it: the loss gradient, before momentum, Adam's
normalisation or weight decay transform it (the optimizer's update direction, which the
published HESSO/DHSPG criteria use, has lost the loss scale: Adam's step is about ``lr`` per entry
whatever the gradient).

Where the loss gradient is near zero (distilling a model into itself, a converged fine-tune) the
mean gradient is zero, so ``taylor`` is mostly noise. ``fisher`` and ``taylor_abs`` are not:
with dropout on during training (the Trainer's default), every batch's residual is a random probe
of the output, and their sums grow with how much the group moves the outputs (for ``fisher``,
``x_g^T G x_g``, G the Gauss-Newton matrix). Accumulating over a whole period lets later
selections see the damage earlier removals did. When every score is exactly zero (no dropout,
exactly at a minimum) the selection falls back to group magnitude, its tie-breaker.

The dot products are one chunked pass over the grouped parameters and their gradients followed by
one segment sum per parameter slice (:meth:`PrunableIndex.combine`): no loop over groups.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from ..groups import reduce_except
from ._index import _CHUNK, PrunableIndex

#: Criteria computed from the raw gradients accumulated before each selection.
LOSS_SALIENCIES = ("taylor_abs", "taylor", "fisher")
#: Every criterion HESSO and DHSPG accept: ``mixed`` is the method's published mix of magnitude,
#: cosine and Taylor-style terms on the optimizer's update direction; ``magnitude`` is ||x_g||.
SALIENCIES = LOSS_SALIENCIES + ("mixed", "magnitude")


def group_dots(index: PrunableIndex, params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor | None],
               absolute: bool = False) -> torch.Tensor:
    """``<x_g, grad_g>`` for every prunable group (float32 over all groups; 0 for the others); with
    ``absolute``, ``sum_{i in g} |x_i * grad_i|``.

    Example:
        >>> import torch
        >>> from hf_oto import find_groups
        >>> from hf_oto.optim._index import PrunableIndex
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
        >>> groups = find_groups(model, (torch.randn(1, 4),))
        >>> params = groups.parameters(model)
        >>> index = PrunableIndex(groups, params, torch.device("cpu"))
        >>> dots = group_dots(index, params, params)        # <x_g, x_g>: the squared norms
        >>> torch.allclose(dots, groups.sq_norms(params) * groups.prunable_mask)
        True
    """
    rows: dict[tuple[int, int], torch.Tensor] = {}
    for i, dims in index.slice_dims.items():
        if grads[i] is not None:
            for dim, r in _dot_rows(params[i], grads[i], dims, absolute).items():
                rows[(i, dim)] = r
    weights = torch.ones(1, len(params), 1)
    return index.combine(rows, weights)[0]


def _dot_rows(x: torch.Tensor, g: torch.Tensor, dims: Sequence[int], absolute: bool = False
              ) -> dict[int, torch.Tensor]:
    """Per position along each of ``dims``: the sum of ``x * g`` (``|x * g|`` with ``absolute``)
    over the other dims (``[1, size]``, float32). Chunked along dim 0 on CPU, as the optimizer's
    statistics pass, so the product stays in cache."""
    out = {dim: torch.zeros(1, math.prod(x.shape[d] for d in dim) if isinstance(dim, tuple) else x.shape[dim],
                            dtype=torch.float32, device=x.device) for dim in dims}
    n = x.shape[0]
    step = n if x.device.type != "cpu" else max(1, _CHUNK // max(x[0].numel(), 1))
    for start in range(0, n, step):
        xc, gc = x[start:start + step], g[start:start + step]
        prod = xc.float() * gc.float() if xc.dtype != torch.float32 or gc.dtype != torch.float32 else xc * gc
        if absolute:
            prod.abs_()
        for dim, o in out.items():
            if dim == 0:
                o[0, start:start + step] += prod.reshape(prod.shape[0], -1).sum(1)
            elif isinstance(dim, tuple):  # a per-expert grid, flattened in the order of ``dim``
                grid = o.view(1, *[-1 if k == 0 else xc.shape[k] for k in dim])
                if 0 in dim:
                    grid = grid.narrow(1 + dim.index(0), start, xc.shape[0])
                grid[0] += reduce_except(prod, dim).view([xc.shape[k] for k in dim])
            else:
                o[0] += prod.sum([k for k in range(prod.dim()) if k != dim])
    return out


def loss_saliency(name: str, dot_sum: torch.Tensor, dot_sq: torch.Tensor) -> torch.Tensor:
    """The ``taylor_abs``, ``taylor`` or ``fisher`` score (higher: keep) from the accumulated sums of
    the per-batch group sums (of ``|x * grad|`` for ``taylor_abs``, of ``x * grad`` otherwise) and
    of their squares."""
    if name == "taylor_abs":
        return dot_sum
    if name == "taylor":
        return dot_sum.abs()
    if name == "fisher":
        return dot_sq
    raise ValueError(f"{name!r} is not a loss-based saliency; choose from {LOSS_SALIENCIES}")
