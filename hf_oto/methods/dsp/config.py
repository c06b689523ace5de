"""Options of dynamic structure pruning, as a small JSON-serialisable dataclass."""

from __future__ import annotations

from dataclasses import dataclass, field

from ...config_mixin import JsonConfigMixin


@dataclass
class DSPConfig(JsonConfigMixin):
    """Settings of :class:`hf_oto.methods.dsp.DSP`.

    Attributes:
        max_groups: candidate filter groups per layer (G). The number a layer ends with is learned:
            groups that lose all their filters vanish and groups that keep the same input channels
            are merged when converting, so G is an upper bound, not a setting per layer.
        flops_reduction: fraction of the whole model's forward FLOPs (as counted by
            ``torch.utils.flop_counter``) to remove; ``None`` takes the trainer's
            ``target_group_sparsity``.
        penalty: weight (lambda) of the group-lasso penalty over (filter group, input channel) blocks.
        penalty_warmup: ramp the penalty linearly from 0 to ``penalty`` over the learning phase (the
            authors ramp it over training).
        temperature / final_temperature: softmax temperature of the soft assignment, annealed
            geometrically from the first to the second over the learning phase.
        gumbel: add Gumbel noise to the logits (a relaxed sample rather than the softmax).
        assignment_lr: learning rate of the assignment logits (they get their own parameter group,
            without weight decay, in the optimizer the method builds).
        harden_at: when assignments become hard and blocks are pruned to the FLOPs target: a fraction
            of the training steps if < 1, else a step number. ``None`` takes the trainer's
            ``pruning_end_step`` when it has one, else 0.6. Training after it fine-tunes with the
            pruned blocks held at exactly zero.
        total_steps: training steps, when no trainer tells the method (0: from the trainer).
        shrink: a window before ``harden_at`` (fraction of the steps if < 1, else steps) over which
            the chosen blocks shrink linearly to zero while the rest trains (HESSO-style), instead
            of being cut at once (0, the authors' one-shot pruning). Assignments become hard and
            the blocks are chosen when the window opens.
        allocation: how the FLOPs target is spread when hardening: ``"layer"`` (every layer
            loses the same fraction of its multiply-adds; the default, best in ``bench/dsp.py``),
            ``"global"`` (one threshold on each layer's cumulative energy share, the authors' rule)
            or ``"group"`` (every filter group keeps the same fraction of its input channels).
        include / exclude: regular expressions over module paths (``re.search``); ``include=None``
            takes every eligible layer. A layer named by an ``include`` pattern that is an exact
            path must be eligible, otherwise :class:`ValueError` says why.
        min_in_channels: layers reading fewer input channels are skipped (the image stem).
        mode: execution of the converted layers: ``"split"`` (one dense kernel per group, exact
            multiply-adds), ``"grouped"`` (one grouped kernel with padding to equal group sizes),
            or ``"auto"`` (grouped when padding adds at most ``grouped_padding`` of the layer's
            multiply-adds, else split).
        grouped_padding: see ``mode="auto"``.
        fold: fold each layer's filter permutation into its neighbours where the zero-invariant
            groups show that is exact; otherwise the converted layer keeps an output index.
        init_std: standard deviation of the random initial logits (breaks the symmetry of groups).
        seed: seed of the logits' initialisation and of the Gumbel noise.

    Example:
        >>> DSPConfig(max_groups=4, flops_reduction=0.5).to_dict()["max_groups"]
        4
    """

    max_groups: int = 4
    flops_reduction: float | None = None
    penalty: float = 1e-3
    penalty_warmup: bool = True
    temperature: float = 1.0
    final_temperature: float = 0.05
    gumbel: bool = True
    assignment_lr: float = 0.02
    harden_at: float | None = None
    shrink: float = 0.0
    allocation: str = "layer"
    total_steps: int = 0
    include: list[str] | None = None
    exclude: list[str] = field(default_factory=list)
    min_in_channels: int = 8
    mode: str = "split"
    grouped_padding: float = 0.1
    fold: bool = True
    init_std: float = 0.01
    seed: int = 0

    config_label = "DSP options"

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        if not isinstance(self.max_groups, int) or self.max_groups < 1:
            raise ValueError(f"max_groups must be an integer >= 1, got {self.max_groups!r}")
        if self.flops_reduction is not None and not 0.0 <= self.flops_reduction < 1.0:
            raise ValueError(f"flops_reduction must be in [0, 1), got {self.flops_reduction}")
        if self.penalty < 0:
            raise ValueError(f"penalty must be >= 0, got {self.penalty}")
        if not 0 < self.final_temperature <= self.temperature:
            raise ValueError("temperatures must satisfy 0 < final_temperature <= temperature, got "
                             f"{self.temperature} and {self.final_temperature}")
        if self.harden_at is not None and self.harden_at < 0:
            raise ValueError(f"harden_at must be >= 0, got {self.harden_at}")
        if self.shrink < 0:
            raise ValueError(f"shrink must be >= 0, got {self.shrink}")
        if self.allocation not in ("global", "layer", "group"):
            raise ValueError(f"allocation must be 'global', 'layer' or 'group', got {self.allocation!r}")
        if self.mode not in ("split", "grouped", "auto"):
            raise ValueError(f"mode must be 'split', 'grouped' or 'auto', got {self.mode!r}")
        if self.min_in_channels < 1:
            raise ValueError(f"min_in_channels must be >= 1, got {self.min_in_channels}")

