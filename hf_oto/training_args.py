"""``OTOTrainingArguments``: ``TrainingArguments`` plus what Only-Train-Once needs."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from transformers import TrainingArguments

from .graph.config import GroupConfig
from .optim.selection import DEFAULT_PRUNING_SCHEDULE, DEFAULT_SALIENCY, SelectionConfig

#: Methods that choose groups by saliency and accept FLOPs/parameter targets and aligned counts.
_SELECTING_METHODS = ("hesso", "dhspg")


@dataclass
class OTOTrainingArguments(TrainingArguments):
    """Training arguments for :class:`hf_oto.OTOTrainer`.

    Every field works with ``HfArgumentParser`` (command line, JSON and YAML files); the
    defaults prune half of the heads and FFN neurons (and conv channels) with HESSO.

    Example:
        >>> args = OTOTrainingArguments(output_dir="out", oto_method="dhspg", target_group_sparsity=0.5)
        >>> args.group_config().prune_hidden
        False
        >>> args = OTOTrainingArguments(output_dir="out", target_kept_flops=0.5, oto_group_divisible=8)
        >>> args.selection().unit, args.target_group_sparsity
        ('flops', None)
        >>> OTOTrainingArguments(output_dir="out", oto_uniform_layers=True).selection().uniform_layers
        True
    """

    oto_method: str = field(
        default="hesso",
        metadata={"help": "Compression method: hesso, dhspg, hspg (group-sparsity optimizers), sfw, dsp, opq, "
                          "or magnitude (one-shot baseline)."},
    )
    target_group_sparsity: float | None = field(
        default=None,
        metadata={"help": "Fraction of the prunable groups to remove, in [0, 1) (default 0.5 unless "
                          "target_kept_flops or target_kept_params is set)."})
    target_kept_flops: float | None = field(
        default=None,
        metadata={"help": "hesso/dhspg: keep at most this fraction of the forward FLOPs (on the example inputs), "
                          "in (0, 1]; groups are weighed by what they cost."})
    target_kept_params: float | None = field(
        default=None, metadata={"help": "hesso/dhspg: keep at most this fraction of the parameters, in (0, 1]."})
    oto_saliency: str = field(
        default=DEFAULT_SALIENCY,
        metadata={"help": "hesso/dhspg: how each pruning period ranks the groups: taylor_abs, taylor, fisher "
                          "(loss-based, from the raw gradients), mixed (the method's published mix) or magnitude."})
    oto_group_divisible: int = field(
        default=1,
        metadata={"help": "hesso/dhspg: every layer keeps a multiple of this many heads, neurons or channels "
                          "(8 or 64 suit GPU matmul tiles)."})
    oto_width_multiple: int = field(
        default=1,
        metadata={"help": "hesso/dhspg: every layer keeps a width (a head counts its head_dim) that is a multiple "
                          "of this; 8 for bf16/fp16 GPU inference (unaligned widths run slower than the dense "
                          "model there), without constraining 64-wide heads."})
    oto_uniform_layers: bool = field(
        default=False,
        metadata={"help": "hesso/dhspg: every layer of a family (model.layers.*.mlp, ...) keeps the same number of "
                          "heads, KV heads, neurons and channels, so the compressed model is saved with a standard "
                          "config of its class and loads without remote code."})
    oto_pruning_schedule: str = field(
        default=DEFAULT_PRUNING_SCHEDULE,
        metadata={"help": "hesso/dhspg: how the target is spread over the pruning periods: linear (an equal share "
                          "each, as published) or cubic (most of it in the first periods: better on a from-scratch "
                          "ResNet, worse on a from-scratch ConvNeXt and when fine-tuning with a new head)."})
    oto_variant: str = field(
        default="adamw", metadata={"help": "Base optimizer of the group-sparsity methods: sgd, adam or adamw."})
    oto_pruning_start: float = field(
        default=0.1,
        metadata={"help": "When pruning starts: a fraction of the training steps if < 1, else a step number."})
    oto_pruning_end: float = field(
        default=0.6,
        metadata={"help": "When the redundant groups must be exactly zero: a fraction of the training steps if "
                          "< 1, else a step number. Training continues on the kept groups afterwards."})
    oto_pruning_periods: int = field(
        default=10, metadata={"help": "Number of periods over which the redundant set grows to the target."})
    oto_prune_heads: bool = field(default=True, metadata={"help": "Offer attention heads for pruning."})
    oto_prune_neurons: bool = field(default=True, metadata={"help": "Offer FFN neurons for pruning."})
    oto_prune_channels: bool = field(default=True, metadata={"help": "Offer conv channels for pruning."})
    oto_prune_hidden: bool = field(
        default=False, metadata={"help": "Offer the residual-stream width (approximate through LayerNorm)."})
    oto_exclude: list[str] = field(
        default_factory=list, metadata={"help": "Regular expressions of layer names never to prune."})
    oto_example_inputs: str = field(
        default="first_batch",
        metadata={"help": "Inputs for the dependency trace: 'first_batch' (of the training set) or the path of a "
                          "torch-saved dict of tensors."})
    oto_method_kwargs: dict | str | None = field(
        default=None, metadata={"help": "Extra options of the method, as a JSON object."})
    oto_post_quantize: dict | str | None = field(
        default=None,
        metadata={"help": "After compression, quantize with one-shot pruning-quantization (OPQ); a JSON object of "
                          "OPQConfig options such as {\"target_rate\": 8}."})
    oto_compressed_dir: str = field(
        default="compressed", metadata={"help": "Folder, under output_dir, for the compressed model and its card."})
    oto_check_compressed: bool = field(
        default=True,
        metadata={"help": "After training, evaluate the compressed model and check its metrics equal the sparse "
                          "model's (needs an eval_dataset)."})
    oto_measure_latency: bool = field(
        default=True, metadata={"help": "Measure CPU latency before and after compression for the model card."})

    _VALID_DICT_FIELDS = TrainingArguments._VALID_DICT_FIELDS + ["oto_method_kwargs", "oto_post_quantize"]

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.oto_method_kwargs is None:
            self.oto_method_kwargs = {}
        if not isinstance(self.oto_method_kwargs, dict):
            raise ValueError(f"oto_method_kwargs must be a JSON object, got {self.oto_method_kwargs!r}")
        if self.oto_post_quantize is not None:
            if not isinstance(self.oto_post_quantize, dict):
                raise ValueError(f"oto_post_quantize must be a JSON object, got {self.oto_post_quantize!r}")
            from .methods.opq import OPQConfig

            OPQConfig.from_dict(self.oto_post_quantize)  # unknown or invalid options fail here
        if self.oto_variant not in ("sgd", "adam", "adamw"):
            raise ValueError(f"oto_variant must be sgd, adam or adamw, got {self.oto_variant!r}")
        for name in ("oto_pruning_start", "oto_pruning_end"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.oto_pruning_periods < 1:
            raise ValueError(f"oto_pruning_periods must be >= 1, got {self.oto_pruning_periods}")
        from .methods import available_methods

        if self.oto_method not in available_methods():
            raise ValueError(f"unknown oto_method {self.oto_method!r}; choose from {available_methods()}")
        selection = self.selection()  # ValueError on bad values
        if selection.unit != "groups" or selection.bundled or selection.pruning_schedule != DEFAULT_PRUNING_SCHEDULE:
            option = (f"target_kept_{selection.unit}" if selection.unit != "groups" else
                      "oto_group_divisible" if selection.group_divisible > 1 else
                      "oto_width_multiple" if selection.width_multiple > 1 else
                      "oto_uniform_layers" if selection.uniform_layers else "oto_pruning_schedule")
            if self.oto_method not in _SELECTING_METHODS:
                raise ValueError(f"{option} applies to oto_method hesso or dhspg, not {self.oto_method!r}")
        if selection.unit != "groups":
            if self.target_group_sparsity is not None:
                raise ValueError(f"set one target: target_group_sparsity={self.target_group_sparsity} and "
                                 f"target_kept_{selection.unit}={selection.target_kept} conflict")
        elif self.target_group_sparsity is None:
            self.target_group_sparsity = 0.5
        if self.target_group_sparsity is not None and not 0.0 <= self.target_group_sparsity < 1.0:
            raise ValueError(f"target_group_sparsity must be in [0, 1), got {self.target_group_sparsity}")

    def group_config(self) -> GroupConfig:
        """The :class:`GroupConfig` these arguments describe."""
        return GroupConfig(prune_heads=self.oto_prune_heads, prune_neurons=self.oto_prune_neurons,
                           prune_channels=self.oto_prune_channels, prune_hidden=self.oto_prune_hidden,
                           exclude=list(self.oto_exclude))

    def pruning_steps(self, total_steps: int) -> tuple[int, int]:
        """``(start, end)`` optimizer steps of the pruning window for a run of ``total_steps``."""
        def resolve(value: float) -> int:
            return int(round(value * total_steps)) if value < 1 else int(value)

        start, end = resolve(self.oto_pruning_start), resolve(self.oto_pruning_end)
        if end <= start:
            raise ValueError(f"the pruning window is empty: starts at step {start} and ends at step {end} "
                             f"(of {total_steps}); check oto_pruning_start/oto_pruning_end")
        if total_steps and end > total_steps:
            raise ValueError(f"the pruning window ends at step {end}, after the last training step {total_steps}")
        return start, end

    def selection(self) -> SelectionConfig:
        """The :class:`~hf_oto.optim.selection.SelectionConfig` of hesso/dhspg these arguments describe."""
        return SelectionConfig(saliency=self.oto_saliency, target_kept_flops=self.target_kept_flops,
                               target_kept_params=self.target_kept_params, group_divisible=self.oto_group_divisible,
                               width_multiple=self.oto_width_multiple, uniform_layers=self.oto_uniform_layers,
                               pruning_schedule=self.oto_pruning_schedule)

    def oto_summary(self) -> dict[str, Any]:
        """The OTO settings, for checkpoints and the model card."""
        return {k: getattr(self, k) for k in self.__dataclass_fields__ if k.startswith(("oto_", "target_"))}
