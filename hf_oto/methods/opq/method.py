"""OPQ as a :class:`hf_oto.methods.base.CompressionMethod` (``oto_method="opq"``)."""

from __future__ import annotations

from typing import Any

from torch import nn

from ...groups import ZeroInvariantGroups
from ..base import CompressionMethod, register_method
from .allocation import OPQAllocation, allocate
from .config import OPQConfig
from .export import export
from .quantizer import attach_quantizers, quantization_stats, quantized_modules


@register_method
class OPQMethod(CompressionMethod):
    """One-shot pruning-quantization with fine-tuning.

    ``prepare`` allocates bits and pruning ratios from the pretrained weights (or reuses a given or
    restored allocation) and attaches the fixed quantizers; the trainer then fine-tunes the float
    weights with its default optimizer (straight-through gradients, masks kept); ``finalize``
    exports integer codes + codebooks whose outputs equal the fine-tuned model's exactly. It needs
    no zero-invariant groups, so it runs on any model, including one that structured pruning
    already compressed.

    Args:
        config: an :class:`OPQConfig`; or its fields as keyword arguments.
        allocation: use this allocation instead of computing one.

    Example:
        >>> method = OPQMethod(target_rate=8)                    # doctest: +SKIP
        >>> model = method.prepare(model, None)                  # doctest: +SKIP
        >>> ...train model...                                    # doctest: +SKIP
        >>> small = method.finalize(model, None)                 # doctest: +SKIP
    """

    name = "opq"
    needs_groups = False
    exact = True

    def __init__(self, config: OPQConfig | dict[str, Any] | None = None, *,
                 allocation: OPQAllocation | None = None, **options: Any) -> None:
        self.config = OPQConfig.from_options(config, **options)
        self.allocation = allocation

    def prepare(self, model: nn.Module, groups: ZeroInvariantGroups | None) -> nn.Module:
        if quantized_modules(model):
            return model  # already prepared (e.g. resumed from a checkpoint that holds the quantizers)
        if self.allocation is None:
            self.allocation = allocate(model, self.config)
        return attach_quantizers(model, self.allocation)

    def metrics(self, model: nn.Module, groups: ZeroInvariantGroups | None) -> dict[str, float]:
        return quantization_stats(model)

    def finalize(self, model: nn.Module, groups: ZeroInvariantGroups | None) -> nn.Module:
        return export(model)

    def state_dict(self) -> dict[str, Any]:
        return {"config": self.config.to_dict(),
                "allocation": self.allocation.to_dict() if self.allocation is not None else None}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.config = OPQConfig.from_dict(state["config"])
        self.allocation = OPQAllocation.from_dict(state["allocation"]) if state.get("allocation") else None
