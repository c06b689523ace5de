"""Configuration of the dependency analysis that finds zero-invariant groups."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..config_mixin import JsonConfigMixin

#: Structure kinds the analysis can report. ``hidden`` is the residual stream / embedding width.
GROUP_KINDS = ("head", "neuron", "channel", "hidden", "expert")


@dataclass
class GroupConfig(JsonConfigMixin):
    """Which structures :func:`hf_oto.find_groups` may offer for pruning.

    Every structure is still *found* and reported by :meth:`ZeroInvariantGroups.summary`; the
    switches only decide whether a kind is marked prunable.

    Args:
        prune_heads: attention heads (q/k/v rows with the output projection's columns).
        prune_neurons: feed-forward neurons (up/gate rows with the down projection's column).
        prune_channels: convolution output channels, tied across residual additions.
        prune_hidden: the residual-stream / embedding width, coupled across every layer. Off
            by default: every LayerNorm averages over this width, so the compressed model keeps
            it exact by running its norms on a zero-padded input (hooks recorded in the
            manifest), which costs a little at inference.
        prune_experts: whole experts of mixture-of-experts layers (the expert's slice of every
            expert tensor, with its router row). Off by default: the compressed model keeps the
            router's rows (zero) and remaps the routing, so that outputs stay exact. Each
            expert's FFN neurons are groups of kind ``neuron`` either way.
        exclude: regular expressions; a group whose layer name matches one is kept unprunable.
        dry_run: after the analysis, compress a meta-device copy of the model (no memory) with
            every prunable group removed and run it; groups whose removal breaks a shape become
            unprunable, with a warning naming the module and op (see
            :func:`hf_oto.compress.dry_run.demote_unremovable`).

    Example:
        >>> cfg = GroupConfig(prune_hidden=False, exclude=[r"encoder\\.layer\\.0\\."])
        >>> GroupConfig.from_json(cfg.to_json()) == cfg
        True
    """

    prune_heads: bool = True
    prune_neurons: bool = True
    prune_channels: bool = True
    prune_hidden: bool = False
    prune_experts: bool = False
    exclude: list[str] = field(default_factory=list)
    dry_run: bool = True

    config_label = "GroupConfig fields"

    def enabled(self, kind: str) -> bool:
        return {
            "head": self.prune_heads,
            "neuron": self.prune_neurons,
            "channel": self.prune_channels,
            "hidden": self.prune_hidden,
            "expert": self.prune_experts,
        }.get(kind, False)

