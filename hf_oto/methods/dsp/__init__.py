"""Dynamic structure pruning (DSP): learned intra-channel groups that become grouped convolutions
and block-diagonal linears.

Channel pruning removes whole filters. DSP splits each layer's filters into groups and lets every
group drop its own input channels, which keeps more accuracy at the same FLOPs and still runs as
dense kernels. Importing this module registers the method as ``"dsp"``.

Example:
    >>> from hf_oto.methods.dsp import DSP
    >>> DSP(max_groups=4, flops_reduction=0.5).config.max_groups
    4
"""

from .config import DSPConfig
from .convert import ConversionEntry, LayerPlan, build_layer, convert, plan_layer
from .method import DSP, describe
from .structure import (
    LOGITS,
    block_penalty,
    choose_blocks,
    filter_channel_energy,
    find_dsp_layers,
    hard_assignment,
    ineligible_reason,
    profile,
    soft_assignment,
    structure_macs,
)

__all__ = [
    "DSP",
    "DSPConfig",
    "convert",
    "describe",
    "plan_layer",
    "build_layer",
    "LayerPlan",
    "ConversionEntry",
    "find_dsp_layers",
    "ineligible_reason",
    "profile",
    "soft_assignment",
    "hard_assignment",
    "block_penalty",
    "filter_channel_energy",
    "choose_blocks",
    "structure_macs",
    "LOGITS",
]
