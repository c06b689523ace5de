"""``create_oto_optimizer`` and the ``transformers.Trainer`` hook ``OTOOptimizerFactory``."""

from __future__ import annotations

import inspect
from dataclasses import fields
from typing import Any, Iterable

from torch import nn

from ..groups import ZeroInvariantGroups
from .base import GroupSparseOptimizer
from .dhspg import DHSPG
from .hesso import HESSO
from .hspg import HSPG
from .selection import SelectionConfig

#: Optimizer classes by ``method`` name.
METHODS: dict[str, type[GroupSparseOptimizer]] = {"hesso": HESSO, "dhspg": DHSPG, "hspg": HSPG}


def create_oto_optimizer(
    model: nn.Module,
    groups: ZeroInvariantGroups | None = None,
    method: str = "hesso",
    variant: str = "adamw",
    lr: float = 1e-3,
    weight_decay: float = 0.0,
    momentum: float = 0.0,
    nesterov: bool = False,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    target_group_sparsity: float | None = None,
    start_pruning_step: int = 0,
    pruning_steps: int | None = None,
    pruning_periods: int | None = None,
    param_groups: Iterable[dict[str, Any]] | None = None,
    **method_kwargs: Any,
) -> GroupSparseOptimizer:
    """Build a group-sparsity optimizer over all trainable parameters of ``model``.

    Args:
        model: the model to train (DDP / ``torch.compile`` wrappers are unwrapped).
        groups: its zero-invariant groups; ``None`` runs ``hf_oto.find_groups(model)`` (enough for
            Transformers models, which need no example inputs).
        method: ``"hesso"`` (default: progressive projection, nothing to tune), ``"dhspg"`` (dual
            half-space with adaptive lambdas) or ``"hspg"`` (group lasso with a fixed ``lmbda``).
        variant: base optimizer: ``"sgd"``, ``"adam"`` or ``"adamw"`` (default).
        lr, weight_decay, momentum, nesterov, betas, eps: as in ``torch.optim``. ``momentum`` and
            ``nesterov`` apply to ``sgd``; ``betas`` and ``eps`` to ``adam``/``adamw``.
        target_group_sparsity: fraction of the prunable groups to zero, in ``[0, 1)``. Default 0.5
            for hesso/dhspg; for hspg an optional upper bound (default: none).
        start_pruning_step: optimizer steps before pruning starts (warm-up; for hspg the length of
            its proximal stage). Default 0.
        pruning_steps: length of the pruning window in optimizer steps; required for hesso/dhspg,
            optional for hspg (default: its half-space stage lasts to the end of training).
        pruning_periods: periods the window is split into, each zeroing a share of the target
            (equal, or as ``pruning_schedule`` says; hesso default 10, dhspg default 1; not used by hspg).
        param_groups: optional param group dicts (e.g. no weight decay on biases and norms).
        **method_kwargs: method options: ``importance_criteria`` (hesso); ``lmbda``,
            ``lmbda_amplify``, ``hat_lmbda_coeff``, ``epsilon``, ``tolerance_group_sparsity`` (dhspg);
            ``lmbda``, ``epsilon``, ``upper_group_sparsity``, ``adapt_epsilon_every`` (hspg). Selection
            options of hesso and dhspg (see :class:`~hf_oto.optim.selection.SelectionConfig`):
            ``saliency`` (``"taylor_abs"``, ``"taylor"``, ``"fisher"``, ``"mixed"``, ``"magnitude"``),
            ``saliency_steps``, ``target_kept_flops`` or ``target_kept_params`` (instead of
            ``target_group_sparsity``),
            ``group_divisible``, ``width_multiple`` (kept widths in multiples of N positions, for
            GPU kernels), ``uniform_layers`` (every layer of a family keeps the same count, so
            the compressed model has a standard config), ``pruning_schedule`` (``"linear"`` or
            ``"cubic"``: how the target is spread over the periods); and ``example_inputs`` for
            counting FLOPs (default: those ``find_groups`` traced).

    The schedule follows the optimizer's own step counter, so a learning-rate scheduler can change
    ``param_group["lr"]`` freely.

    Example:
        >>> from hf_oto import find_groups
        >>> from hf_oto.optim import create_oto_optimizer
        >>> groups = find_groups(model)                                      # doctest: +SKIP
        >>> opt = create_oto_optimizer(model, groups, method="dhspg", variant="adamw", lr=3e-5,
        ...                            target_group_sparsity=0.5, start_pruning_step=500,
        ...                            pruning_steps=3000)                   # doctest: +SKIP
    """
    if not isinstance(method, str) or method.lower() not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
    cls = METHODS[method.lower()]
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if groups is None:
        from ..graph import find_groups

        groups = find_groups(model)  # it unwraps DDP / compiled models itself
    kwargs: dict[str, Any] = dict(variant=variant, lr=lr, weight_decay=weight_decay, momentum=momentum,
                                  nesterov=nesterov, betas=betas, eps=eps, start_pruning_step=start_pruning_step,
                                  pruning_steps=pruning_steps, param_groups=param_groups)
    if target_group_sparsity is not None:
        kwargs["target_group_sparsity"] = target_group_sparsity
    if pruning_periods is not None:
        kwargs["pruning_periods"] = pruning_periods
    accepted = set(inspect.signature(cls.__init__).parameters) - {"self", "model", "groups"}
    picked = {k: method_kwargs.pop(k) for k in _SELECTION_OPTIONS if k in method_kwargs}
    if picked and "selection" in accepted:
        kwargs["selection"] = SelectionConfig.from_options(method_kwargs.pop("selection", None), **picked)
    else:
        kwargs.update(picked)  # hspg: reported as options it does not take, below
    kwargs.update(method_kwargs)
    unknown = sorted(set(kwargs) - accepted)
    if unknown:
        raise ValueError(f"{cls.method} does not take {', '.join(unknown)}; its options are {', '.join(sorted(accepted))}")
    return cls(model, groups, **kwargs)


#: Factory keywords that go into the ``selection`` of hesso and dhspg.
_SELECTION_OPTIONS = tuple(f.name for f in fields(SelectionConfig))


class OTOOptimizerFactory:
    """Use hf_oto optimizers with a plain ``transformers.Trainer``.

    ``TrainingArguments.optim`` accepts only Transformers' own names, but ``Trainer`` also takes
    ``optimizer_cls_and_kwargs``: given a class that is not a ``torch.optim.Optimizer`` it calls
    ``cls()(model, **kwargs)``. Keyword arguments are those of :func:`create_oto_optimizer`, which
    needs ``lr`` here: the Trainer does not pass its ``learning_rate`` to factories (its LR
    scheduler still scales the lr from this value).

    Example:
        >>> from transformers import Trainer, TrainingArguments
        >>> from hf_oto.optim import OTOOptimizerFactory
        >>> trainer = Trainer(model, TrainingArguments("out", max_steps=3000), train_dataset=ds,
        ...     optimizer_cls_and_kwargs=(OTOOptimizerFactory, {
        ...         "groups": groups, "method": "hesso", "lr": 3e-5, "target_group_sparsity": 0.4,
        ...         "start_pruning_step": 300, "pruning_steps": 1500}))   # doctest: +SKIP
        >>> trainer.train()                                                    # doctest: +SKIP

    Settings given to the constructor are defaults that the call's keyword arguments override.
    """

    def __init__(self, **defaults: Any) -> None:
        self.defaults = defaults

    def __call__(self, model: nn.Module, **kwargs: Any) -> GroupSparseOptimizer:
        return create_oto_optimizer(model, **{**self.defaults, **kwargs})
