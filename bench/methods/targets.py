"""Reaching a kept-FLOPs target with hf_oto's groups.

Every method must end at the same kept FLOPs. The baselines that remove hf_oto groups remove about
the same share of every layer (the lowest-scoring groups of each (layer, kind) block, one group at
a time across blocks) and stop as soon as the target is met, measured with
:class:`hf_oto.measure.CompressionEstimator`:
one global ranking by magnitude would first empty the layers with small weights and keep the
costly ones (a small ResNet's 7x7 stem holds half of its FLOPs and its largest weights), which
is not how practitioners prune. Methods that only take a number of groups (hf_oto's optimizers
before ``target_kept_flops``, the authors' HESSO) get the group sparsity at which removing the
same share of every layer meets the target: their real kept FLOPs then depend on which groups
they choose, and the table shows them.
"""

from __future__ import annotations

import math

import torch

from hf_oto.groups import ZeroInvariantGroups
from hf_oto.measure import CompressionEstimator


class FlopsTarget:
    """Kept FLOPs of removal masks over ``groups``, and removals that meet a target."""

    def __init__(self, model: torch.nn.Module, groups: ZeroInvariantGroups, inputs) -> None:
        self.groups = groups
        self.estimator = CompressionEstimator(model, groups, inputs)
        self.dense = self.estimator.total_flops
        self.block, _ = groups.layer_blocks()
        self.sizes = torch.bincount(self.block[self.block >= 0])

    def kept(self, remove: torch.Tensor) -> float:
        """Kept FLOPs as a fraction of the dense model's."""
        return self.estimator.estimate(remove)[1] / self.dense

    def _order(self, scores: torch.Tensor | None) -> torch.Tensor:
        """Prunable groups in removal order: by their position inside their block (lowest score
        first, or by index), as a fraction of the block's size, so that taking the first k of
        them removes about the same share of every block, one group at a time."""
        position = torch.zeros(len(self.groups))
        for b in range(len(self.sizes)):
            members = (self.block == b).nonzero().flatten()
            if scores is not None:
                members = members[torch.argsort(scores[members], stable=True)]
            position[members] = (torch.arange(len(members)) + 1.0) / len(members)
        prunable = (self.block >= 0).nonzero().flatten()
        return prunable[torch.argsort(position[prunable], stable=True)]

    def _first(self, order: torch.Tensor, k: int) -> torch.Tensor:
        mask = torch.zeros(len(self.groups), dtype=torch.bool)
        mask[order[:k]] = True
        return self.groups.feasible_removal(mask)

    def _fewest(self, order: torch.Tensor, target: float) -> torch.Tensor:
        """The shortest prefix of ``order`` that meets ``target`` (kept FLOPs only fall as it grows)."""
        lo, hi = 0, len(order)
        while lo < hi:
            mid = (lo + hi) // 2
            if self.kept(self._first(order, mid)) <= target:
                hi = mid
            else:
                lo = mid + 1
        return self._first(order, lo)

    def remove_by_score(self, scores: torch.Tensor, target: float, already: torch.Tensor | None = None) -> torch.Tensor:
        """The lowest-scoring groups of every block, about the same share of each, as few as meet
        ``target`` kept FLOPs. Groups in ``already`` stay removed (they come first)."""
        scores = scores.float().clone()
        if already is not None:
            scores[already] = -float("inf")
        mask = self._fewest(self._order(scores), target)
        return mask if already is None else mask | already

    def uniform_sparsity(self, target: float) -> float:
        """The group sparsity at which removing about the same share of every block keeps
        ``target`` of the FLOPs."""
        mask = self._fewest(self._order(None), target)
        return math.floor(1000 * float(mask.sum()) / max(1, self.groups.num_prunable)) / 1000


def rms_magnitude(groups: ZeroInvariantGroups, params) -> torch.Tensor:
    """Per-group L2 norm divided by the square root of its entry count (the scale of one weight),
    so that groups of different sizes in one block compare fairly."""
    with torch.no_grad():
        return groups.norms(params).cpu() / groups.group_sizes.float().clamp_min(1).sqrt()
