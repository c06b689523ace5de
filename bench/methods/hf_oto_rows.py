"""hf_oto's rows: HESSO, DHSPG and HSPG through the public optimizer factory, compressed by
:func:`hf_oto.compress` (exact: the compressed model computes what the trained sparse one does).

Each row names the group-selection criterion it runs with (issue 19: ``mixed``, the published mix
of magnitude, cosine and update-direction "Taylor" terms, and the loss-based default,
``taylor_abs``; ``--criteria`` adds others, such as ``fisher``). HESSO and DHSPG take the FLOPs
target itself (``target_kept_flops``); HSPG has no target, so its row runs with a group sparsity calibrated to the FLOPs target
(:meth:`FlopsTarget.uniform_sparsity`) as its upper bound, and the table marks it.
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any

from torch import nn

from hf_oto import compress, find_groups
from hf_oto.optim import create_oto_optimizer
from hf_oto.optim.factory import METHODS
from hf_oto.optim.selection import PRUNING_SCHEDULES, SelectionConfig

from .base import Method, RunContext, decay_parameter_groups
from .targets import FlopsTarget

#: The criteria names of ``oto_saliency`` / ``saliency=`` (issue 19): the published mix, and the
#: loss-based default (``taylor_abs``; ``fisher`` was the default before, see docs/selection.md).
OLD_SALIENCY = "mixed"
NEW_SALIENCY = "taylor_abs"


def accepts(method: str, option: str) -> bool:
    """Whether the optimizer factory or the optimizer of ``method`` takes ``option`` (the selection
    options reach HESSO and DHSPG through their ``selection`` argument)."""
    params = [inspect.signature(f).parameters for f in (create_oto_optimizer, METHODS[method].__init__)]
    if "selection" in params[1] and option in {f.name for f in dataclasses.fields(SelectionConfig)}:
        return True
    return any(option in p for p in params)


class HfOto(Method):
    """One hf_oto optimizer, with one selection criterion (``None``: the optimizer's own)."""

    family = "hf_oto"

    def __init__(self, method: str, saliency: str | None = None, **options: Any) -> None:
        self.method = method
        self.saliency = saliency
        if method != "hspg":
            # Every row states its schedule, so that a row's name means the same runs whatever the
            # library's default: the rows without a tag are linear, as published.
            options.setdefault("pruning_schedule", "linear")
        self.options = options
        label = {"hesso": "HESSO", "dhspg": "DHSPG", "hspg": "HSPG"}[method]
        tags = [saliency] if saliency else []
        if options.get("pruning_schedule", "linear") != "linear":
            tags.append(options["pruning_schedule"])
        if options.get("uniform_layers"):
            tags.append("uniform")
        if options.get("group_divisible", 1) > 1:
            tags.append(f"divisible {options['group_divisible']}")
        if options.get("width_multiple", 1) > 1:
            tags.append(f"width {options['width_multiple']}")
        self.name = f"hf_oto {label}" + (f" [{', '.join(tags)}]" if tags else "")

    def available(self) -> str | None:
        if self.saliency is not None and self.saliency != OLD_SALIENCY and not accepts(self.method, "saliency"):
            return "needs saliency= in the optimizer factory (select branch, issue 19), not merged here"
        missing = [o for o in self.options if not accepts(self.method, o)]
        return f"the optimizer factory does not take {', '.join(missing)}" if missing else None

    def start(self, model: nn.Module, ctx: RunContext) -> nn.Module:
        self.groups = find_groups(model, ctx.example_inputs)
        return model

    def optimizer(self, model: nn.Module, ctx: RunContext):
        budget = ctx.budget
        start, end = budget.window()
        kwargs: dict[str, Any] = dict(
            method=self.method, variant="adamw", lr=budget.learning_rate, weight_decay=budget.weight_decay,
            start_pruning_step=start, pruning_steps=end - start,
            param_groups=decay_parameter_groups(model, budget.weight_decay), **self.options)
        if self.method != "hspg":
            kwargs["pruning_periods"] = budget.pruning_periods
        if self.saliency is not None and accepts(self.method, "saliency"):
            kwargs["saliency"] = self.saliency
        if accepts(self.method, "target_kept_flops"):
            kwargs["target_kept_flops"] = ctx.target_kept_flops
            if accepts(self.method, "example_inputs"):
                kwargs["example_inputs"] = ctx.example_inputs
        else:
            # Calibrated stand-in until target_kept_flops exists: the table shows the real FLOPs.
            sparsity = FlopsTarget(model, self.groups, ctx.example_inputs).uniform_sparsity(ctx.target_kept_flops)
            kwargs["target_group_sparsity"] = sparsity
            ctx.notes.append(f"no FLOPs target: group sparsity {sparsity:.3f} (calibrated to it) is its upper bound; "
                             "its default lmbda decides how far it gets")
        self.opt = create_oto_optimizer(model, self.groups, **kwargs)
        return self.opt

    def finish(self, model: nn.Module, ctx: RunContext) -> nn.Module:
        return compress(model, self.groups)


def hf_oto_rows(criteria: tuple[str, ...] = (OLD_SALIENCY, NEW_SALIENCY),
                schedules: tuple[str, ...] = PRUNING_SCHEDULES) -> list[Method]:
    """HESSO and DHSPG with each criterion (``linear`` schedule, as published), HESSO with the default
    criterion and each other ``pruning_schedule`` (``cubic``: most of the target in the first
    periods), HESSO with the default criterion and layer-uniform selection (issue 15: what
    uniformity costs at equal FLOPs), HESSO with widths in multiples of 8 (what GPU-friendly shapes
    cost at equal FLOPs), HSPG (which has no selection step: its penalty and half-space test decide)
    once."""
    rows: list[Method] = []
    for method in ("hesso", "dhspg"):
        rows += [HfOto(method, saliency=c) for c in criteria]
    rows += [HfOto("hesso", saliency=NEW_SALIENCY, pruning_schedule=s) for s in schedules if s != "linear"]
    rows.append(HfOto("hesso", saliency=NEW_SALIENCY, uniform_layers=True))
    rows.append(HfOto("hesso", saliency=NEW_SALIENCY, width_multiple=8))  # GPU-aligned widths: what they cost
    rows.append(HfOto("hspg"))
    return rows
