"""Module edits that removing groups implies beyond slicing tensors: an attribute holding a width,
a norm run on zero-padded input, an argument cut to the kept heads, experts' routing remapped.

The graph analysis records them on :class:`hf_oto.groups.ZeroInvariantGroups`; :func:`hf_oto.compress`
applies them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class AttributeBinding:
    """A module attribute holding the size of a prunable dimension (``split_size``, ``num_heads``).

    Its new value is ``sign *`` the number of kept positions among ``group`` (-1: always kept),
    divided by ``divisor`` when the attribute counts units (heads) of ``divisor`` positions, plus
    ``offset`` when the code adds a constant (``self.num_heads + 2`` rows of a fused projection).
    """

    module: str
    attribute: str
    value: int
    sign: int
    group: torch.Tensor
    divisor: int = 1
    offset: int = 0


@dataclass
class NormPadding:
    """A norm module (LayerNorm, RMSNorm) whose normalised dimension holds prunable positions.

    When some of them are removed, the module keeps its full-width parameters and runs on its
    input zero-padded back to full width, so its statistics, and the outputs, stay exact.
    ``group`` gives the group of each position along ``dim`` (counted from the end) or -1.
    """

    module: str
    dim: int
    group: torch.Tensor


@dataclass
class InputCut:
    """A module argument computed outside the module for all heads (a relative-position bias,
    ALiBi slopes) that the module reads only at its own heads.

    When some of them are removed, the module keeps, on entry, the positions of its kept heads
    along ``dim`` (counted from the end) of the argument given at ``position`` or as ``name``.
    ``group`` gives the group of each position (-1: none); a dimension that folds a batch into
    the heads (``batch * heads``) repeats the pattern.
    """

    module: str
    position: int | None
    name: str | None
    dim: int
    group: torch.Tensor


@dataclass
class ExpertRouting:
    """An experts module whose experts can be removed whole, and where it receives its routing.

    When experts go, the compressed module keeps the router as it is (its rows of removed experts
    stay, zero), maps each routed expert id to the kept expert's new position, and gives the slots
    of removed experts a routing weight of zero: every token is routed as in the sparse model,
    whose removed experts output exactly zero.
    """

    module: str
    group: torch.Tensor  # group of each expert, by position along the expert dim (-1: none)
    index_arg: int | str  # the module's argument holding the routed expert ids (position or name)
    weight_arg: int | str | None  # its argument holding the routing weights (same shape)
