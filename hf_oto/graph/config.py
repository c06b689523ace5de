"""Configuration of the dependency analysis that finds zero-invariant groups."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields

#: Structure kinds the analysis can report. ``hidden`` is the residual stream / embedding width.
GROUP_KINDS = ("head", "neuron", "channel", "hidden")


@dataclass
class GroupConfig:
    """Which structures :func:`hf_oto.find_groups` may offer for pruning.

    Every structure is still *found* and reported by :meth:`ZeroInvariantGroups.summary`; the
    switches only decide whether a kind is marked prunable.

    Args:
        prune_heads: attention heads (q/k/v rows with the output projection's columns).
        prune_neurons: feed-forward neurons (up/gate rows with the down projection's column).
        prune_channels: convolution output channels, tied across residual additions.
        prune_hidden: the residual-stream / embedding width. Off by default because in
            Transformers every LayerNorm mixes this dimension, so removing it is only approximate.
        exclude: regular expressions; a group whose layer name matches one is kept unprunable.

    Example:
        >>> cfg = GroupConfig(prune_hidden=False, exclude=[r"encoder\\.layer\\.0\\."])
        >>> GroupConfig.from_json(cfg.to_json()) == cfg
        True
    """

    prune_heads: bool = True
    prune_neurons: bool = True
    prune_channels: bool = True
    prune_hidden: bool = False
    exclude: list[str] = field(default_factory=list)

    def enabled(self, kind: str) -> bool:
        return {
            "head": self.prune_heads,
            "neuron": self.prune_neurons,
            "channel": self.prune_channels,
            "hidden": self.prune_hidden,
        }.get(kind, False)

    def to_dict(self) -> dict:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict) -> "GroupConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown GroupConfig fields: {sorted(unknown)}")
        return cls(**data)

    @classmethod
    def from_json(cls, text: str) -> "GroupConfig":
        return cls.from_dict(json.loads(text))
