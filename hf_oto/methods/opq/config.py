"""Options of one-shot pruning-quantization (JSON-serialisable)."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from typing import Any

from ...config_mixin import JsonConfigMixin
from .theory import FAMILIES

LAYER_TYPES = ("linear", "conv", "embedding")
STRATEGIES = ("opq", "uniform")


@dataclass
class OPQConfig(JsonConfigMixin):
    """How :func:`hf_oto.methods.opq.allocate` compresses a model.

    Attributes:
        target_rate: requested compression rate of the quantized layers' weights,
            ``32 * weights / storage bits`` (see :mod:`hf_oto.methods.opq` for the exact storage
            count). 8.0 means 4 bits per weight on average, everything included.
        distribution: law fitted to each layer's channel-normalized weights: ``"laplace"`` (the
            paper's choice), ``"gaussian"``, or ``"auto"`` (per layer, the higher likelihood).
        min_bits, max_bits: range of bit widths per layer (1 to 8; equal values fix the width, so
            that only pruning ratios are allocated).
        prune: allow pruning (a one-bit-per-weight mask plus codes for the kept weights only);
            ``False`` quantizes every weight (integer bit widths cannot then meet every target
            exactly: the rate is the nearest achievable one at or above the target).
        max_prune: largest pruning ratio of any layer.
        channel_scales: one fp16 scale per output channel (maps channels into the common range of
            the layer's single codebook); ``False``: one scale per layer, no per-channel data.
        layer_types: which layers to quantize: ``"linear"`` (``nn.Linear`` and GPT-2's
            ``Conv1D``), ``"conv"`` (``nn.Conv1d/2d/3d``), ``"embedding"`` (``nn.Embedding``).
        outliers: store weights far beyond the fitted law exactly (int32 position + fp16 value,
            48 bits each, counted in the rate) instead of clipping them.
        exclude: regular expressions; modules whose name matches one (``re.search``) are skipped.
        strategy: ``"opq"`` (analytic allocation) or ``"uniform"`` (the same bit width and
            pruning ratio in every layer, the best such pair for the target: a baseline).

    Example:
        >>> OPQConfig(target_rate=10, exclude=("classifier",)).to_dict()["target_rate"]
        10
    """

    target_rate: float = 8.0
    distribution: str = "laplace"
    min_bits: int = 2
    max_bits: int = 8
    prune: bool = True
    max_prune: float = 0.95
    channel_scales: bool = True
    outliers: bool = True
    layer_types: tuple[str, ...] = ("linear", "conv")
    exclude: tuple[str, ...] = ()
    strategy: str = "opq"

    config_label = "OPQ options"

    def __post_init__(self) -> None:
        self.layer_types = tuple(self.layer_types)
        self.exclude = tuple(self.exclude)
        self.validate()

    def validate(self) -> None:
        if not isinstance(self.target_rate, (int, float)) or not self.target_rate > 1.0:
            raise ValueError(f"target_rate must be a number > 1 (32 bits / bits per weight), got {self.target_rate!r}")
        if self.distribution not in FAMILIES + ("auto",):
            raise ValueError(f"distribution must be one of {FAMILIES + ('auto',)}, got {self.distribution!r}")
        if not (isinstance(self.min_bits, int) and isinstance(self.max_bits, int)
                and 1 <= self.min_bits <= self.max_bits <= 8):
            raise ValueError(f"need integers 1 <= min_bits <= max_bits <= 8, got {self.min_bits}, {self.max_bits}")
        if not 0.0 <= self.max_prune <= 0.999:
            raise ValueError(f"max_prune must be in [0, 0.999], got {self.max_prune}")
        unknown = [t for t in self.layer_types if t not in LAYER_TYPES]
        if unknown or not self.layer_types:
            raise ValueError(f"layer_types must be a non-empty subset of {LAYER_TYPES}, got {self.layer_types}")
        if self.strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {STRATEGIES}, got {self.strategy!r}")
        for pattern in self.exclude:
            try:
                re.compile(pattern)
            except re.error as e:
                raise ValueError(f"exclude pattern {pattern!r} is not a regular expression: {e}") from e

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["layer_types"] = list(self.layer_types)
        d["exclude"] = list(self.exclude)
        return d
