"""Shared scaffolding of the group-sparsity optimizers: construction, group state, reporting and
checkpoint state.

Every optimizer here is a ``torch.optim.Optimizer`` over all trainable parameters of a model.
Its step (the base SGD/Adam/AdamW step, the group statistics, the corrections a method plans) is
:class:`hf_oto.optim.base_step.BaseStep`; this module holds the rest:
:class:`GroupSparseOptimizer` (arguments, state, metrics, ``state_dict``, ``_feasible``: never
emptying a layer). The pruning window that HESSO and DHSPG share is
:class:`hf_oto.optim.windowed.WindowedPruning`; the choice of groups, :mod:`hf_oto.optim.selection`.

Reference: the Only-Train-Once authors' public code, read, never copied: tianyic/only_train_once
(its history holds HSPG, 2021, and DHSPG, up to the HESSO rewrite of Dec 2023) and the
``only-train-once`` releases 2.0.16 (DHSPG) and 3.0.1 (HESSO). Each method's docstring says what
matches it and where we differ; ``tests/test_optim_parity.py`` runs HESSO and DHSPG next to them.

Determinism: nothing is random and every reduction is a fixed-order segment sum, so data-parallel
replicas (DDP: replicated parameters, all-reduced gradients) take identical steps. Parameters
sharded by rows (FSDP2 ``fully_shard``: DTensors placed ``Shard(0)``) are supported: each rank
computes its rows' share of every group statistic, one all-reduce per step adds them up
(:mod:`hf_oto.optim._sharding`), and every rank updates its own rows; the optimizer state is
sharded like the parameters. Flat-buffer sharding (DeepSpeed ZeRO, FSDP1) is **not** supported:
a shard there cuts through rows, so no rank could address a group's positions.
"""

from __future__ import annotations

import math
import numbers
import warnings
from typing import Any, ClassVar, Iterable

import torch
from torch import nn

from ..graph.analysis import _unwrap as unwrap_model  # the same unwrapping find_groups does
from ..groups import ZeroInvariantGroups
from ._index import Positions, PrunableIndex
from ._sharding import local
from .base_step import BaseStep, StepPlan  # noqa: F401 - StepPlan: the methods' interface

VARIANTS = ("sgd", "adam", "adamw")
#: Phases reported by ``metrics()["phase"]``.
PHASES = {"warmup": 0.0, "pruning": 1.0, "finished": 2.0}


# -- argument checks ------------------------------------------------------------------------------

def check_number(name: str, value: Any, *, low: float | None = None, high: float | None = None,
                 low_open: bool = False, high_open: bool = False) -> float:
    """``value`` as a float, or a ValueError naming ``name`` and the allowed range."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(float(value)):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    v = float(value)
    bad_low = low is not None and (v <= low if low_open else v < low)
    bad_high = high is not None and (v >= high if high_open else v > high)
    if bad_low or bad_high:
        lo = "" if low is None else f"{'(' if low_open else '['}{low}"
        hi = "" if high is None else f"{high}{')' if high_open else ']'}"
        rng = f"in {lo or '(-inf'}, {hi or 'inf)'}"
        raise ValueError(f"{name} must be {rng}, got {value!r}")
    return v


def check_int(name: str, value: Any, *, low: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be an integer number of optimizer steps, got {value!r}")
    if int(value) < low:
        raise ValueError(f"{name} must be >= {low}, got {value!r}")
    return int(value)


# -- the per-step plan a method returns ------------------------------------------------------------


class GroupSparseOptimizer(BaseStep, torch.optim.Optimizer):
    """Base class of :class:`HSPG`, :class:`DHSPG` and :class:`HESSO` (not used directly).

    Args:
        model: the model whose trainable parameters are optimized (DDP/compile wrappers are unwrapped).
        groups: its zero-invariant groups, from :func:`hf_oto.find_groups` on this model.
        variant: base optimizer, ``"sgd"``, ``"adam"`` or ``"adamw"``.
        lr, weight_decay: as in ``torch.optim``; weight decay is L2 (added to the gradient) for
            ``sgd``/``adam`` and decoupled for ``adamw``.
        momentum, nesterov: SGD only, as ``torch.optim.SGD``.
        betas, eps: Adam/AdamW only, as ``torch.optim.Adam``.
        param_groups: optional list of param group dicts over the model's parameters (for example
            no weight decay on biases and norms, as ``transformers.Trainer`` does); trainable
            parameters left out are added in one more group with the defaults.
    """

    method: ClassVar[str] = ""

    def __init__(self, model: nn.Module, groups: ZeroInvariantGroups, *, variant: str = "adamw",
                 lr: float = 1e-3, weight_decay: float = 0.0, momentum: float = 0.0, nesterov: bool = False,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 param_groups: Iterable[dict[str, Any]] | None = None) -> None:
        if not isinstance(model, nn.Module):
            raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if not isinstance(groups, ZeroInvariantGroups):
            raise ValueError(f"groups must be the ZeroInvariantGroups of the model (hf_oto.find_groups), "
                             f"got {type(groups).__name__}")
        if variant not in VARIANTS:
            raise ValueError(f"unknown variant {variant!r}; choose from {', '.join(VARIANTS)}")
        check_number("lr", lr, low=0.0)
        check_number("weight_decay", weight_decay, low=0.0)
        check_number("momentum", momentum, low=0.0, high=1.0, high_open=True)
        if variant != "sgd" and momentum:
            raise ValueError("momentum applies to variant='sgd' only; adam/adamw use betas")
        if nesterov and (variant != "sgd" or momentum <= 0):
            raise ValueError("nesterov needs variant='sgd' and momentum > 0")
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise ValueError(f"betas must be a pair of numbers, got {betas!r}")
        for i, b in enumerate(betas):
            check_number(f"betas[{i}]", b, low=0.0, high=1.0, high_open=True)
        check_number("eps", eps, low=0.0)

        model = unwrap_model(model)
        gparams = groups.parameters(model)  # ValueError: "these groups were built for another model ..."
        trainable = [p for p in model.parameters() if p.requires_grad]
        if not trainable:
            raise ValueError("the model has no trainable parameters")
        pgs = self._param_groups(model, trainable, param_groups)

        defaults = dict(lr=float(lr), weight_decay=float(weight_decay), momentum=float(momentum),
                        nesterov=bool(nesterov), betas=(float(betas[0]), float(betas[1])), eps=float(eps))
        super().__init__(pgs, defaults)
        for g in self.param_groups:
            check_number("lr (param group)", g["lr"], low=0.0)
            check_number("weight_decay (param group)", g["weight_decay"], low=0.0)

        self.variant = variant
        self.groups = groups
        self._gparams: list[torch.Tensor] = gparams
        self._positions_cache: dict[str, tuple[torch.Tensor, Positions]] = {}
        self.device = self._gparams[0].device if self._gparams else trainable[0].device
        # Where each grouped parameter sits in param_groups, to notice when a wrapper swaps it.
        where = {id(p): (gi, j) for gi, g in enumerate(self.param_groups) for j, p in enumerate(g["params"])}
        self._glocs = [where.get(id(p)) for p in self._gparams]
        self._bind()
        self._prunable = groups.prunable_mask.to(self.device)
        self.num_prunable = groups.num_prunable
        n = len(groups)
        #: Everything a resumed run needs beyond torch's per-parameter state (see ``state_dict``).
        self._oto: dict[str, Any] = {
            "step": 0,
            "committed": torch.zeros(n, dtype=torch.bool, device=self.device),  # frozen at zero
            "active": torch.zeros(n, dtype=torch.bool, device=self.device),     # redundant, in progress
        }
        self._positions_cache: dict[str, tuple[torch.Tensor, Positions]] = {}

    @staticmethod
    def _param_groups(model: nn.Module, trainable: list[torch.Tensor],
                      param_groups: Iterable[dict[str, Any]] | None) -> list[dict[str, Any]]:
        if param_groups is None:
            return [{"params": trainable}]
        known = {id(p) for p in model.parameters()}
        pgs, listed = [], set()
        for g in param_groups:
            if not isinstance(g, dict) or "params" not in g:
                raise ValueError("param_groups must be dicts with a 'params' entry")
            g = dict(g)
            g["params"] = [p for p in g["params"]]
            for p in g["params"]:
                if id(p) not in known:
                    raise ValueError("param_groups holds a parameter that is not the model's")
                listed.add(id(p))
            pgs.append(g)
        rest = [p for p in trainable if id(p) not in listed]
        if rest:
            pgs.append({"params": rest})
        return [g for g in pgs if g["params"]]

    # -- the schedule (methods override) -------------------------------------------------------
    @property
    def step_count(self) -> int:
        """Optimizer steps taken so far (the clock of the pruning schedule, not the lr)."""
        return self._oto["step"]

    def phase(self) -> str:
        """``"warmup"``, ``"pruning"`` or ``"finished"`` for the *next* step."""
        raise NotImplementedError

    @property
    def pruning_finished(self) -> bool:
        """True once no group will be projected any more (the zero set is final)."""
        return self.phase() == "finished"

    @property
    def target_num_zero_groups(self) -> int:
        raise NotImplementedError

    # -- reporting -----------------------------------------------------------------------------
    def _bind(self) -> None:
        """Index the grouped parameters (again, after they were swapped for their shards)."""
        self._gpos = {id(p): i for i, p in enumerate(self._gparams)}
        self._index = PrunableIndex(self.groups, self._gparams, self.device)
        #: FSDP2: the grouped parameters are DTensors; steps work on their local rows.
        self._sharded = self._index.process_group is not None
        self._zero_index: PrunableIndex | None = None  # over every group, for zero_groups() when sharded
        self._positions_cache.clear()

    def _follow_swaps(self) -> None:
        """accelerate's FSDP2 ``prepare`` shards a model after its optimizer was built and puts the
        sharded parameters (DTensors) into ``param_groups`` in place of the originals: bind to them."""
        swapped = False
        for i, (loc, p) in enumerate(zip(self._glocs, self._gparams)):
            if loc is not None:
                live = self.param_groups[loc[0]]["params"][loc[1]]
                if live is not p:
                    self._gparams[i] = live
                    swapped = True
        if swapped:
            self._bind()

    def _local_params(self) -> list[torch.Tensor]:
        """The grouped parameters as the tensors a step updates: this rank's rows when sharded."""
        return [local(p) for p in self._gparams] if self._sharded else self._gparams

    def _local_grads(self) -> list[torch.Tensor | None]:
        return [local(p.grad) for p in self._gparams] if self._sharded else [p.grad for p in self._gparams]

    def zero_groups(self) -> torch.Tensor:
        """Bool over all groups: every parameter entry of the group is exactly zero."""
        self._follow_swaps()
        with torch.no_grad():
            if not self._sharded:
                return self.groups.zero_mask(self._gparams).cpu()
            if self._zero_index is None:
                everything = torch.ones(len(self.groups), dtype=torch.bool)
                self._zero_index = PrunableIndex(self.groups, self._gparams, self.device, include=everything)
            return (self._zero_index.sq_norms(self._local_params()) == 0).cpu()

    def redundant_groups(self) -> torch.Tensor:
        """Bool over all groups: the groups chosen for removal so far (frozen or in progress)."""
        return (self._oto["committed"] | self._oto["active"]).cpu()

    def prunable_zero_groups(self) -> torch.Tensor:
        """Bool over all groups: prunable and exactly zero (sums over prunable slices only)."""
        self._follow_swaps()
        with torch.no_grad():
            return ((self._index.sq_norms(self._local_params()) == 0) & self._prunable).cpu()

    def group_sparsity(self) -> float:
        """Fraction of the prunable groups whose parameters are all exactly zero."""
        return float(self.prunable_zero_groups().sum()) / max(self.num_prunable, 1)

    def metrics(self) -> dict[str, float]:
        """Numbers worth logging: sparsity, counts, target and phase (0 warm-up, 1 pruning, 2 done)."""
        zero = int(self.prunable_zero_groups().sum())
        return {
            "group_sparsity": zero / max(self.num_prunable, 1),
            "num_zero_groups": float(zero),
            "num_prunable_groups": float(self.num_prunable),
            "target_group_sparsity": float(self.target_group_sparsity or 0.0),
            "target_num_zero_groups": float(self.target_num_zero_groups),
            "num_redundant_groups": float(self.redundant_groups().sum()),
            "phase": PHASES[self.phase()],
            "step": float(self.step_count),
        }

    # -- state ---------------------------------------------------------------------------------
    def _config(self) -> dict[str, Any]:
        """Schedule settings saved with the state (a resumed run must follow the same schedule)."""
        return {}

    def _set_config(self, config: dict[str, Any]) -> None:
        for k, v in config.items():
            setattr(self, k, v)

    def state_dict(self) -> dict[str, Any]:
        """torch's optimizer state plus an ``"oto"`` entry: step counter, frozen and redundant
        groups, method state (lambdas, counters) and the schedule. Plain tensors and numbers only,
        so ``torch.load(weights_only=True)`` (what ``transformers.Trainer`` uses) reads it."""
        sd = super().state_dict()
        sd["oto"] = self.oto_state_dict()
        return sd

    def oto_state_dict(self) -> dict[str, Any]:
        """The ``"oto"`` entry of :meth:`state_dict` alone (the same on every rank, CPU tensors)."""
        oto = {k: (v.detach().cpu().clone() if isinstance(v, torch.Tensor) else v) for k, v in self._oto.items()}
        return {"method": self.method, "variant": self.variant, "num_groups": len(self.groups),
                "config": self._config(), "state": oto}

    def expect_oto_state(self, oto: dict[str, Any]) -> None:
        """The next :meth:`load_state_dict` without an ``"oto"`` entry takes this one.

        Distributed checkpoints (``torch.distributed.checkpoint.state_dict``, which accelerate uses
        for FSDP) keep only torch's ``state`` and ``param_groups``: the caller saves
        :meth:`oto_state_dict` beside them and hands it back here before loading.
        """
        self._expected_oto = oto

    @torch.no_grad()
    def init_state(self) -> None:
        """Create every parameter's optimizer state (zeros, step 0) without taking a step.

        A distributed checkpoint loads *into* an existing state dict, so a resumed run calls this
        before ``torch.distributed.checkpoint.load``. Zero moments start exactly as the lazy ones
        would (torch's generic initialiser takes a zero-lr step instead, which would advance this
        optimizer's pruning schedule). Under FSDP2 the state is created sharded like the parameters.

        Example:
            >>> opt.init_state()                                            # doctest: +SKIP
            >>> state = {"model": model.state_dict(), "optim": opt.state_dict()}  # doctest: +SKIP
            >>> torch.distributed.checkpoint.load(state, checkpoint_id="ckpt")     # doctest: +SKIP
            >>> opt.load_state_dict(state["optim"])                        # doctest: +SKIP
        """
        for group in self.param_groups:
            for p in group["params"]:
                st = self.state[p]
                if self.variant == "sgd":
                    if group["momentum"] != 0 and "momentum_buffer" not in st:
                        st["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                elif "step" not in st:
                    st["step"] = torch.tensor(0.0)
                    st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        oto = state_dict.pop("oto", None)
        if oto is None:
            oto, self._expected_oto = getattr(self, "_expected_oto", None), None
        if oto is None:
            raise ValueError("this optimizer state has no 'oto' entry: it was not saved by an hf_oto optimizer")
        if oto["method"] != self.method or oto["variant"] != self.variant:
            raise ValueError(f"the state was saved by {oto['method']}/{oto['variant']}, "
                             f"this optimizer is {self.method}/{self.variant}")
        if oto["num_groups"] != len(self.groups):
            raise ValueError(f"the state has {oto['num_groups']} groups, these groups have {len(self.groups)}")
        super().load_state_dict(state_dict)
        if oto["config"] != self._config():
            warnings.warn(f"{self.method}: resuming with the saved schedule {oto['config']} instead of "
                          f"{self._config()}", stacklevel=2)
            self._set_config(oto["config"])
        for k, v in oto["state"].items():
            self._oto[k] = v.to(self.device) if isinstance(v, torch.Tensor) else v
        self._positions_cache.clear()

    # -- the step ------------------------------------------------------------------------------
    def _positions(self, key: str, mask: torch.Tensor) -> Positions:
        """Positions of ``mask``, cached while the mask is unchanged (masks change rarely)."""
        hit = self._positions_cache.get(key)
        if hit is not None and torch.equal(hit[0], mask):
            return hit[1]
        where = self._index.positions(mask)
        self._positions_cache[key] = (mask.clone(), where)
        return where


    def _feasible(self, mask: torch.Tensor, priority: torch.Tensor) -> torch.Tensor:
        """``mask`` minus, in every layer it would empty together with the frozen groups, its
        member of highest ``priority`` (repeated until no layer is emptied)."""
        mask = mask.clone()
        while True:
            emptied = self._index.emptied(mask | self._oto["committed"])
            if not emptied.any():
                return mask
            for k in emptied.nonzero().flatten().tolist():
                grp = self._index.full_dims[k]
                mine = grp[mask[grp]]
                if mine.numel() == 0:  # emptied by frozen groups alone: nothing left to give back
                    return mask
                if mine.numel() < grp.numel() and not (mask | self._oto["committed"])[grp].all():
                    continue  # a dimension of the same layer gave a group back already
                mask[mine[torch.argmax(priority[mine])]] = False


def __getattr__(name: str) -> Any:
    # The pruning window moved to windowed.py; code written against base keeps importing it from here.
    if name in ("WindowedPruning", "schedule_period", "cumulative_targets"):
        from . import windowed

        return getattr(windowed, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
