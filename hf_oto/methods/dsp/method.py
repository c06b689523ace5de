"""The DSP compression method as the trainer drives it (see :mod:`hf_oto.methods.base`)."""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn

from ...graph.inputs import default_example_inputs
from ...groups import ZeroInvariantGroups
from ..base import CompressionMethod, TrainingSettings, register_method
from .config import DSPConfig
from .convert import ConversionEntry, convert
from .structure import (
    LOGITS,
    apply_masks,
    block_penalty,
    choose_blocks,
    filter_channel_energy,
    find_dsp_layers,
    hard_assignment,
    max_reduction,
    profile,
    soft_assignment,
    structure_macs,
)

# Options that change which layers train or how their logits start: changing them rebuilds the logits.
_STRUCTURAL = ("max_groups", "include", "exclude", "min_in_channels", "init_std", "seed")


@register_method
class DSP(CompressionMethod):
    """Dynamic structure pruning: learned intra-channel groups that become grouped convolutions and
    block-diagonal linears.

    Every eligible convolution / linear gets logits over ``max_groups`` candidate groups for each
    filter (output row). During the learning phase the loss gets a group-lasso penalty over
    (filter group, input channel) blocks weighted by the soft membership, with the temperature
    annealed toward hard assignments. At ``harden_at`` the assignments become hard, the weakest
    blocks are zeroed to reach ``flops_reduction`` of the model's FLOPs, and training continues
    with them held at zero. :meth:`finalize` converts every layer into
    :class:`~hf_oto.compress.hf_oto_layers_dsp.DSPConv` / ``DSPLinear`` with identical outputs.

    Options come from the constructor and, through the trainer, from ``oto_method_kwargs``
    (see :class:`DSPConfig`).

    Example:
        >>> method = DSP(max_groups=4, flops_reduction=0.5, total_steps=1000)     # doctest: +SKIP
        >>> model = method.prepare(model, groups)                                  # doctest: +SKIP
        >>> optimizer = method.create_optimizer(model, groups, TrainingSettings(1e-3))  # doctest: +SKIP
        >>> for step, batch in enumerate(loader, 1):                               # doctest: +SKIP
        ...     loss = loss_fn(model(batch)) + method.regularizer(model)
        ...     loss.backward(); optimizer.step(); optimizer.zero_grad()
        ...     method.on_step_end(model, step)
        >>> small = method.finalize(model, groups)                                 # doctest: +SKIP

    With the trainer: ``OTOTrainingArguments(oto_method="dsp", target_group_sparsity=0.5,
    oto_method_kwargs={"max_groups": 4})`` (the target is read as the FLOPs reduction).
    """

    name = "dsp"
    needs_groups = True  # to fold permutations into neighbours; DSP also works with groups=None
    exact = True

    def __init__(self, config: DSPConfig | None = None, *, example_inputs: Any = None, **options: Any) -> None:
        self.config = DSPConfig.from_options(config, **options)
        self.example_inputs = example_inputs
        self.layers: dict[str, nn.Module] = {}
        self.skipped: dict[str, str] = {}
        self.costs: dict = {}
        self.total_flops = 0
        self.step = 0
        self.hardened = False
        self.selected = False
        self.assignments: dict[str, torch.Tensor] = {}
        self.masks: dict[str, torch.Tensor] = {}
        self.beta: float | None = None
        self.reached: float | None = None
        self.hardened_step: int | None = None
        self.report: list[ConversionEntry] = []
        self._trainer_total_steps = 0
        self._trainer_harden_step = 0
        self._trainer_target: float | None = None
        self._layer_weight: dict[str, float] = {}
        self._generator: torch.Generator | None = None
        self._pending: dict[str, Any] | None = None

    # -- protocol ----------------------------------------------------------------------------
    def prepare(self, model: nn.Module, groups: ZeroInvariantGroups | None, example_inputs: Any = None) -> nn.Module:
        """Find the layers, measure their FLOPs and register the assignment logits on them
        (parameter ``dsp_logits``, shape ``(max_groups, filters)``)."""
        if example_inputs is not None:
            self.example_inputs = example_inputs
        inputs = self._inputs(model, groups)
        self._detach(model)
        self.layers, self.skipped = find_dsp_layers(model, self.config)
        self.total_flops, self.costs = profile(model, inputs, list(self.layers))
        mean_unit = sum(c.unit_macs for c in self.costs.values()) / len(self.costs)
        self._layer_weight = {p: c.unit_macs / mean_unit for p, c in self.costs.items()}
        self._check_target()
        gen = torch.Generator().manual_seed(self.config.seed)
        for path, module in self.layers.items():
            existing = module._parameters.get(LOGITS)
            shape = (self.config.max_groups, module.weight.shape[0])
            if existing is not None and tuple(existing.shape) == shape:
                continue  # resuming: the logits come with the model's weights
            logits = torch.randn(shape, generator=gen) * self.config.init_std
            module.register_parameter(LOGITS, nn.Parameter(logits.to(module.weight.device)))
        if self._pending is not None:
            state, self._pending = self._pending, None
            self.load_state_dict(state)
        return model

    def create_optimizer(self, model: nn.Module, groups: ZeroInvariantGroups | None,
                         settings: TrainingSettings) -> torch.optim.Optimizer:
        """AdamW with the trainer's settings for the model's weights (no decay on biases and norm
        parameters) and a group of its own for the logits (``assignment_lr``, no decay)."""
        options = dict(settings.options or {})
        if options:
            merged = self.config.replace(**options)
            structural = any(getattr(merged, k) != getattr(self.config, k) for k in _STRUCTURAL)
            self.config = merged
            if structural or not self.layers:
                self.prepare(model, groups)
        self._trainer_total_steps = int(settings.total_steps or 0)
        self._trainer_harden_step = int(getattr(settings, "pruning_end_step", 0) or 0)
        target = getattr(settings, "target_group_sparsity", None)
        self._trainer_target = float(target) if target is not None else None
        self._check_target()
        logits = [m._parameters[LOGITS] for m in self.layers.values()]
        ids = {id(p) for p in logits}
        decay, no_decay = [], []
        for p in model.parameters():
            if p.requires_grad and id(p) not in ids:
                (decay if p.dim() >= 2 else no_decay).append(p)
        param_groups = [
            {"params": decay, "weight_decay": settings.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
            {"params": logits, "weight_decay": 0.0, "lr": self.config.assignment_lr},
        ]
        return torch.optim.AdamW([g for g in param_groups if g["params"]], lr=settings.learning_rate,
                                 betas=(settings.adam_beta1, settings.adam_beta2), eps=settings.adam_epsilon)

    def regularizer(self, model: nn.Module) -> torch.Tensor | None:
        """``penalty(t) * R``: the membership-weighted group lasso over (group, input channel)
        blocks, differentiable in the weights and the logits; ``None`` once the blocks are chosen."""
        self._require_prepared()
        if self.selected or self.config.penalty == 0:
            return None
        temperature, weight = self.temperature, self.penalty_weight
        total = None
        for path, module in self.layers.items():
            logits = module._parameters[LOGITS]
            membership = soft_assignment(logits, temperature, self.config.gumbel, self._noise(logits.device))
            term = block_penalty(filter_channel_energy(module.weight), membership, self._layer_weight[path])
            total = term if total is None else total + term
        return weight * total

    def on_step_end(self, model: nn.Module, step: int) -> None:
        """``step``: optimizer steps completed (the trainer's ``global_step``). Chooses the blocks
        at ``select_step``, shrinks them linearly to zero until ``harden_step`` (when ``shrink`` is
        set), then keeps them at exactly zero."""
        self._require_prepared()
        self.step = int(step)
        if self.hardened:
            apply_masks(self.layers, self.masks)
            return
        if not self.selected and self.step >= self.select_step:
            self.select(model)
        if self.selected:
            if self.step >= self.harden_step:
                self.harden(model)
            else:
                # x <- x * (1 - 1/remaining): the chosen blocks reach exactly zero at harden_step.
                remaining = self.harden_step - self.step + 1
                apply_masks(self.layers, self.masks, fill=1.0 - 1.0 / remaining)

    def metrics(self, model: nn.Module, groups: ZeroInvariantGroups | None = None) -> dict[str, float]:
        """Temperature, penalty weight, how hard the assignments are, groups in use per layer and
        the FLOPs reduction the current structure gives (after hardening: the pruned model's)."""
        if not self.layers:
            return {}
        used, confidence = [], []
        with torch.no_grad():
            for module in self.layers.values():
                logits = module._parameters[LOGITS]
                used.append(float(hard_assignment(logits).unique().numel()))
                confidence.append(float(torch.softmax(logits / self.temperature, 0).max(0).values.mean()))
        return {
            "dsp_temperature": self.temperature,
            "dsp_penalty_weight": 0.0 if self.selected else self.penalty_weight,
            "dsp_hardened": float(self.hardened),
            "dsp_selected": float(self.selected),
            "dsp_groups_used": sum(used) / len(used),
            "dsp_assignment_confidence": sum(confidence) / len(confidence),
            "dsp_flops_reduction": self.flops_reduction(model),
        }

    def finalize(self, model: nn.Module, groups: ZeroInvariantGroups | None) -> nn.Module:
        """The converted model (a new object; ``model`` keeps its layers), outputs equal to the
        trained model's. Hardens first (with a warning) if training never reached ``harden_at``."""
        self._require_prepared()
        if not self.hardened:
            warnings.warn(f"DSP finalize before the hardening step ({self.step} < {self.harden_step}): hardening "
                          "and pruning now, so the outputs differ from the model as trained", stacklevel=2)
            self.harden(model)
        apply_masks(self.layers, self.masks)
        self.report = []
        return convert(model, self.assignments, groups=groups, example_inputs=self.example_inputs, mode=self.config.mode,
                       grouped_padding=self.config.grouped_padding, fold=self.config.fold, report=self.report)

    def state_dict(self) -> dict[str, Any]:
        """JSON-able: schedule position, hard assignments and kept blocks, the noise generator."""
        blocks = {}
        for p, a in self.assignments.items():
            mask = self.masks[p].cpu()
            keep = torch.zeros(self.config.max_groups, mask.shape[1], dtype=torch.bool)
            keep[a.cpu()] = mask  # every filter of a group carries the group's row
            blocks[p] = keep.int().tolist()
        return {
            "config": self.config.to_dict(),
            "step": self.step,
            "hardened": self.hardened,
            "selected": self.selected,
            "assignments": {p: a.tolist() for p, a in self.assignments.items()},
            "blocks": blocks,
            "beta": self.beta,
            "reached": self.reached,
            "hardened_step": self.hardened_step,
            "generator": self._generator.get_state().tolist() if self._generator is not None else None,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not self.layers:
            self._pending = state
            return
        self.config = DSPConfig.from_dict(state["config"])
        self.step = int(state["step"])
        self.beta, self.reached = state.get("beta"), state.get("reached")
        self.hardened_step = state.get("hardened_step")
        if state.get("generator") is not None:
            device = next(iter(self.layers.values())).weight.device
            self._noise(device).set_state(torch.tensor(state["generator"], dtype=torch.uint8))
        self.hardened = bool(state["hardened"])
        self.selected = bool(state.get("selected", self.hardened))
        if self.selected:
            self.assignments, self.masks = {}, {}
            for p, a in state["assignments"].items():
                device = self.layers[p].weight.device
                self.assignments[p] = torch.tensor(a, dtype=torch.long, device=device)
                keep = torch.tensor(state["blocks"][p], dtype=torch.bool, device=device)
                self.masks[p] = keep[self.assignments[p]]
            for m in self.layers.values():
                m._parameters[LOGITS].requires_grad_(False)

    # -- schedule ----------------------------------------------------------------------------
    @property
    def target(self) -> float | None:
        """The FLOPs reduction aimed at (config, else the trainer's target)."""
        return self.config.flops_reduction if self.config.flops_reduction is not None else self._trainer_target

    @property
    def total_steps(self) -> int:
        return self.config.total_steps or self._trainer_total_steps

    @property
    def harden_step(self) -> int:
        """The optimizer step after which assignments are hard and blocks pruned."""
        at = self.config.harden_at
        if at is None and self._trainer_harden_step:
            return self._trainer_harden_step
        at = 0.6 if at is None else at
        if at >= 1:
            return int(at)
        if not self.total_steps:
            raise ValueError("DSP needs the number of training steps to place its hardening step: run it through "
                             "OTOTrainer, or set total_steps, or give harden_at as a step number (>= 1)")
        return max(1, int(round(at * self.total_steps)))

    @property
    def select_step(self) -> int:
        """The step after which assignments are hard and the pruned blocks chosen: ``harden_step``
        less the ``shrink`` window."""
        window = self.config.shrink
        if 0 < window < 1:
            if not self.total_steps:
                raise ValueError("a fractional shrink window needs the number of training steps (total_steps)")
            window = int(round(window * self.total_steps))
        return max(1, self.harden_step - int(window))

    @property
    def temperature(self) -> float:
        t0, t1 = self.config.temperature, self.config.final_temperature
        progress = min(1.0, self.step / max(1, self.select_step))
        return t0 * (t1 / t0) ** progress

    @property
    def penalty_weight(self) -> float:
        if not self.config.penalty_warmup:
            return self.config.penalty
        return self.config.penalty * min(1.0, (self.step + 1) / max(1, self.select_step))

    @property
    def dsp_flops_share(self) -> float:
        """Fraction of the model's FLOPs in the layers DSP trains."""
        return 2 * sum(c.dense_macs for c in self.costs.values()) / self.total_flops if self.total_flops else 0.0

    # -- steps -------------------------------------------------------------------------------
    def harden(self, model: nn.Module) -> None:
        """Choose the blocks if not done yet (:meth:`select`) and set them to exactly zero; from
        now on they stay zero."""
        if not self.selected:
            self.select(model)
        apply_masks(self.layers, self.masks)
        self.hardened = True
        self.hardened_step = self.step

    def select(self, model: nn.Module) -> None:
        """Fix every filter's group (argmax of its logits), choose the weakest (group, input
        channel) blocks that reach the FLOPs target, and stop training the logits."""
        self._require_prepared()
        target = self.target
        if target is None:
            raise ValueError("DSP has no FLOPs target: set flops_reduction (or the trainer's target_group_sparsity)")
        with torch.no_grad():
            self.assignments = {p: hard_assignment(m._parameters[LOGITS]) for p, m in self.layers.items()}
            energies = {p: filter_channel_energy(m.weight.detach()) for p, m in self.layers.items()}
        self.masks, self.beta, self.reached = choose_blocks(energies, self.assignments, self.config.max_groups,
                                                            self.costs, self.total_flops, target,
                                                            self.config.allocation)
        for m in self.layers.values():
            m._parameters[LOGITS].requires_grad_(False)
            m._parameters[LOGITS].grad = None
        self.selected = True

    def flops_reduction(self, model: nn.Module | None = None) -> float:
        """FLOPs reduction of the current structure: hard assignments (argmax before hardening)
        and the exactly-zero blocks of the weights."""
        if not self.layers or not self.total_flops:
            return 0.0
        removed = 0
        with torch.no_grad():
            for p, m in self.layers.items():
                a = self.assignments.get(p) if self.selected else hard_assignment(m._parameters[LOGITS])
                removed += self.costs[p].dense_macs - structure_macs(m.weight, a, self.costs[p])
        return 2 * removed / self.total_flops

    # -- helpers -----------------------------------------------------------------------------
    def _check_target(self) -> None:
        if self.target is not None and self.target > max_reduction(self.costs, self.total_flops):
            raise ValueError(f"flops_reduction={self.target:.2f} is out of reach: the layers DSP may restructure hold "
                             f"{self.dsp_flops_share:.1%} of the model's FLOPs (skipped: {self._skipped_text()})")

    def _inputs(self, model: nn.Module, groups: ZeroInvariantGroups | None) -> Any:
        inputs = self.example_inputs if self.example_inputs is not None else getattr(groups, "example_inputs", None)
        if inputs is None:
            try:
                inputs = default_example_inputs(model)
            except ValueError as e:
                raise ValueError("DSP needs example inputs to count FLOPs: pass example_inputs to DSP(...) or "
                                 f"prepare(...), or groups from find_groups ({e})") from None
        return inputs

    def _noise(self, device: torch.device) -> torch.Generator:
        if self._generator is None or self._generator.device != torch.device(device):
            self._generator = torch.Generator(device=device).manual_seed(self.config.seed + 1)
        return self._generator

    def _detach(self, model: nn.Module) -> None:
        for module in self.layers.values():
            module._parameters.pop(LOGITS, None)

    def _require_prepared(self) -> None:
        if not self.layers:
            raise RuntimeError("call DSP.prepare(model, groups) first")

    def _skipped_text(self) -> str:
        return ", ".join(f"{k} ({v})" for k, v in list(self.skipped.items())[:4]) or "none"


def describe(method: DSP) -> str:
    """A table of the trained layers, their FLOPs share and the groups conversion produced."""
    lines = [f"DSP: {len(method.layers)} layers, {method.dsp_flops_share:.1%} of the model's FLOPs"]
    if method.reached is not None:
        lines.append(f"hardened at step {method.hardened_step}: threshold={method.beta:.4f}, FLOPs reduction {method.reached:.1%}")
    for e in method.report:
        groups = " ".join(f"{o}x{i}" for o, i in e.groups)
        lines.append(f"  {e.path:<50} {e.mode:<8} folded={str(e.folded):<5} out_index={str(e.out_index):<5} "
                     f"macs={e.macs_fraction:.2f} groups(filters x inputs): {groups}"
                     + (f"  [{e.note}]" if e.note else ""))
    for p, why in method.skipped.items():
        lines.append(f"  skipped {p}: {why}")
    return "\n".join(lines)

