"""The ``"sfw"`` compression method: compression-aware training with Stochastic Frank-Wolfe.

Training keeps the model dense; :meth:`SFWMethod.finalize` then prunes the ``prune_ratio``
fraction of zero-invariant groups with the smallest norms and/or truncates Linear and 1x1 conv
layers to low rank (``rank_ratio``), without retraining. Because the removed groups are small but
not zero, the compressed model approximates the trained one (``exact = False``).

Options (``OTOTrainingArguments(oto_method="sfw", oto_method_kwargs={...})`` or
``SFWMethod(**options)``), all JSON-able:

=========================  ===========  =====================================================
option                     default      meaning
=========================  ===========  =====================================================
``structure``              ``"prune"``  constraint recipe: ``"prune"`` (group-K-support over
                                        heads / neurons / channels), ``"low_rank"`` (K-support
                                        nuclear balls), ``"k_sparse"`` or ``"l2"``; see
                                        :meth:`hf_oto.optim.sfw.SFW.from_model`
``lr``                     ``None``     SFW step scale; ``None`` takes the trainer's
                                        ``learning_rate`` (SFW wants ~0.05-3, not Adam's 5e-5)
``momentum``               ``0.9``      exponential-average momentum
``k``                      ``0.3``      groups (per layer) / rank fraction of the atoms
``radius_factor``          ``10.0``     radius = factor x the layer's norm when training starts
``rescale``                ``"gradient"`` gradient-norm step rescaling, or ``None``
``power_iterations``       ``1``        warm-started power iterations per step (low rank)
``oversample``             ``8``        extra columns of the subspace iteration
``seed``                   ``0``        seed of the random sketches
``prune_ratio``            ``None``     at the end, remove this fraction of prunable groups
                                        (smallest norms); ``None``: only all-zero groups
``prune_scope``            ``"global"`` ``"global"``: one ranking over the model
                                        (``compress(ratio=...)``); ``"layer"``: the fraction
                                        within each layer (``compress(..., scope="layer")``)
``rank_ratio``             ``None``     at the end, remove this fraction of each eligible
                                        layer's rank (:func:`decompose_low_rank`)
``low_rank_include``       ``None``     regexes: layers ``rank_ratio`` applies to
``low_rank_exclude``       ``None``     regexes: layers it skips
``keep_dense_if_larger``   ``True``     see :func:`decompose_low_rank`
=========================  ===========  =====================================================

The trainer's ``weight_decay`` is not used: the constraints regularise instead.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..config_mixin import JsonConfigMixin
from ..groups import ZeroInvariantGroups
from .base import CompressionMethod, TrainingSettings, register_method


@dataclass
class SFWOptions(JsonConfigMixin):
    """Options of :class:`SFWMethod` (see the module docstring)."""

    structure: str = "prune"
    lr: float | None = None
    momentum: float = 0.9
    k: float | int = 0.3
    radius_factor: float = 10.0
    rescale: str | None = "gradient"
    power_iterations: int = 1
    oversample: int = 8
    seed: int = 0
    prune_ratio: float | None = None
    prune_scope: str = "global"
    rank_ratio: float | None = None
    low_rank_include: list[str] | None = None
    low_rank_exclude: list[str] | None = None
    keep_dense_if_larger: bool = True

    config_label = "sfw options"

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        from ..optim.sfw import STRUCTURES

        if self.structure not in STRUCTURES:
            raise ValueError(f"unknown structure {self.structure!r}; choose from {STRUCTURES}")
        if self.prune_scope not in ("global", "layer"):
            raise ValueError(f"prune_scope must be 'global' or 'layer', got {self.prune_scope!r}")
        for name in ("prune_ratio", "rank_ratio"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                      or not 0.0 <= value < 1.0):
                raise ValueError(f"{name} must be in [0, 1) or None, got {value!r}")


@register_method
class SFWMethod(CompressionMethod):
    """Compression-aware training with :class:`hf_oto.optim.sfw.SFW`, compressed at the end.

    Example:
        >>> method = SFWMethod(structure="prune", lr=0.5, prune_ratio=0.5)        # doctest: +SKIP
        >>> opt = method.create_optimizer(model, groups, TrainingSettings(learning_rate=0.5))  # doctest: +SKIP
        >>> train(model, opt)                                                      # doctest: +SKIP
        >>> small = method.finalize(model, groups)                                 # doctest: +SKIP
    """

    name = "sfw"
    needs_groups = True
    exact = False

    def __init__(self, **options: Any) -> None:
        self.options = SFWOptions.from_dict(options)
        self.optimizer = None

    def create_optimizer(self, model: nn.Module, groups: ZeroInvariantGroups | None,
                         settings: TrainingSettings) -> torch.optim.Optimizer:
        from ..optim.sfw import SFW

        if settings.options:
            self.options = self.options.replace(**settings.options)
        opts = self.options
        lr = opts.lr if opts.lr is not None else settings.learning_rate
        if lr < 1e-3:
            warnings.warn(f"SFW lr={lr} is tiny: SFW's step is lr * ||momentum|| and stays inside the constraint "
                          "set; typical values are 0.05-3 (set oto_method_kwargs={'lr': ...})", stacklevel=2)
        self.optimizer = SFW.from_model(model, groups, structure=opts.structure, lr=lr, momentum=opts.momentum,
                                        k=opts.k, radius_factor=opts.radius_factor, rescale=opts.rescale,
                                        power_iterations=opts.power_iterations, oversample=opts.oversample,
                                        seed=opts.seed)
        return self.optimizer

    def metrics(self, model: nn.Module, groups: ZeroInvariantGroups | None) -> dict[str, float]:
        out: dict[str, float] = {}
        if self.optimizer is not None and self.optimizer.last_step_sizes:
            sizes = self.optimizer.last_step_sizes
            out["sfw_step_size"] = sum(sizes) / len(sizes)
        if groups is not None and self.options.structure == "prune":
            out["sfw_group_energy_kept"] = group_energy_kept(model, groups, self.options.prune_ratio or 0.5)
        return out

    def finalize(self, model: nn.Module, groups: ZeroInvariantGroups | None) -> nn.Module:
        from ..compress import compress, smallest_groups
        from ..compress.lowrank import decompose_low_rank

        opts = self.options
        result = model
        if groups is not None:
            if opts.prune_ratio:
                self.removed_groups = smallest_groups(groups, groups.parameters(model), opts.prune_ratio,
                                                      opts.prune_scope)
                result = compress(model, groups, remove=self.removed_groups)
            else:
                result = compress(model, groups)
        elif opts.prune_ratio:
            raise ValueError("prune_ratio needs the model's zero-invariant groups")
        if opts.rank_ratio:
            result = decompose_low_rank(result, opts.rank_ratio, include=opts.low_rank_include,
                                        exclude=opts.low_rank_exclude,
                                        keep_dense_if_larger=opts.keep_dense_if_larger, inplace=result is not model)
        return result

    def state_dict(self) -> dict[str, Any]:
        return {"options": self.options.to_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "options" in state:
            self.options = SFWOptions.from_dict(state["options"])


@torch.no_grad()
def group_energy_kept(model: nn.Module, groups: ZeroInvariantGroups, ratio: float) -> float:
    """Share of the prunable groups' squared norm that survives removing the ``ratio`` smallest."""
    norms = groups.sq_norms(groups.parameters(model)).cpu()[groups.prunable_mask]
    if norms.numel() == 0 or float(norms.sum()) == 0.0:
        return 1.0
    drop = int(ratio * norms.numel())
    return 1.0 - float(norms.sort().values[:drop].sum() / norms.sum())
