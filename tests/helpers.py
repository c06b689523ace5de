"""Shared test helpers."""

from __future__ import annotations

import torch

from hf_oto import ZeroInvariantGroups
from hf_oto.compress.core import _run, max_relative_difference


def zero_random_groups(model, groups: ZeroInvariantGroups, fraction: float, seed: int = 0) -> torch.Tensor:
    """Zero a random ``fraction`` of the prunable groups in place; returns the mask."""
    gen = torch.Generator().manual_seed(seed)
    prunable = groups.prunable_mask.nonzero().flatten()
    chosen = prunable[torch.randperm(prunable.numel(), generator=gen)[: int(round(fraction * prunable.numel()))]]
    mask = torch.zeros(len(groups), dtype=torch.bool)
    mask[chosen] = True
    with torch.no_grad():
        groups.zero_(groups.parameters(model), mask)
    return mask


def outputs(model, inputs) -> list[torch.Tensor]:
    return _run(model, inputs)


def relative_difference(a, b) -> float:
    return max_relative_difference(a, b)


def num_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def group_element_mask(groups: ZeroInvariantGroups, name: str, t: torch.Tensor, g: int) -> torch.Tensor:
    """The entries of tensor ``name`` (shaped like ``t``) that group ``g`` covers, built naively."""
    mask = torch.zeros_like(t, dtype=torch.bool)
    for s in groups.slices:
        if s.tensor == name:
            sl = [slice(None)] * t.dim()
            sl[s.dim] = s.index[s.group == g]
            mask[tuple(sl)] = True
    return mask
