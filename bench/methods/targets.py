"""Reaching a kept-FLOPs target with hf_oto's groups.

Every method must end at the same kept FLOPs. The baselines that remove hf_oto groups remove the
same share of every layer (the lowest-scoring groups of each (layer, kind) block) and take the
smallest share that meets the target, measured with :class:`hf_oto.measure.CompressionEstimator`:
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

    def _ranks(self, scores: torch.Tensor | None) -> torch.Tensor:
        """Rank of every prunable group inside its block: by ``scores`` (lowest first) or index."""
        rank = torch.zeros(len(self.groups), dtype=torch.long)
        for b in range(len(self.sizes)):
            members = (self.block == b).nonzero().flatten()
            if scores is not None:
                members = members[torch.argsort(scores[members], stable=True)]
            rank[members] = torch.arange(len(members))
        return rank

    def _share(self, share: float, rank: torch.Tensor) -> torch.Tensor:
        """The first ``ceil(share * n)`` groups by ``rank`` of every block of ``n`` groups."""
        cut = torch.ceil(share * self.sizes.float()).long()
        return self.groups.feasible_removal((self.block >= 0) & (rank < cut[self.block.clamp(min=0)]))

    def _smallest_share(self, target: float, rank: torch.Tensor) -> float:
        """Bisection: kept FLOPs only fall as the share grows."""
        lo, hi = 0.0, 0.99
        for _ in range(16):
            mid = (lo + hi) / 2
            if self.kept(self._share(mid, rank)) <= target:
                hi = mid
            else:
                lo = mid
        return hi

    def remove_by_score(self, scores: torch.Tensor, target: float, already: torch.Tensor | None = None) -> torch.Tensor:
        """The lowest-scoring groups of every block, the smallest equal share that meets
        ``target`` kept FLOPs. Groups in ``already`` stay removed (they rank first)."""
        scores = scores.float().clone()
        if already is not None:
            scores[already] = -float("inf")
        rank = self._ranks(scores)
        mask = self._share(self._smallest_share(target, rank), rank)
        return mask if already is None else mask | already

    def uniform_sparsity(self, target: float) -> float:
        """The group sparsity at which removing the same share of every block keeps ``target``
        of the FLOPs."""
        rank = self._ranks(None)
        mask = self._share(self._smallest_share(target, rank), rank)
        return math.floor(1000 * float(mask.sum()) / max(1, self.groups.num_prunable)) / 1000


def rms_magnitude(groups: ZeroInvariantGroups, params) -> torch.Tensor:
    """Per-group L2 norm divided by the square root of its entry count (the scale of one weight),
    so that groups of different sizes in one block compare fairly."""
    with torch.no_grad():
        return groups.norms(params).cpu() / groups.group_sizes.float().clamp_min(1).sqrt()
