"""Shared machinery of the group-sparsity optimizers: base steps, group state, schedule, checks.

Every optimizer here is a ``torch.optim.Optimizer`` over all trainable parameters of a model. A step
has three parts:

1. **Base step** (``_prepare`` and ``_update``): plain SGD (momentum, Nesterov), Adam or AdamW over
   every parameter, vectorised with ``torch._foreach_*`` per param group, with the arithmetic of
   ``torch.optim.SGD/Adam/AdamW(foreach=True)``. Parameters in no group only ever get this step.
   On steps where the method needs them, the parameters that have prunable slices are instead
   updated chunk by chunk while per-group statistics (``||x_g||^2``, ``<x_g, d_g>``, ... with ``d``
   the base direction) are gathered in the same pass over memory.
2. **Group plan** (``_plan``, one per method): from those statistics the method decides per group a
   penalty, a shrink factor and projections to zero (vectors over groups: no loop per group).
3. **Group corrections** (``_correct``): multiplies on the positions of the groups concerned
   (one broadcast multiply per slice, or gather/scatter when few positions change) and
   ``index_fill_`` for exact zeros on the parameters and on their optimizer state.

Once projected, a group is *frozen*: at the start of every later step its gradient entries are set
to zero in place (``p.grad.index_fill_``), and its momentum / Adam first moment were zeroed when it
was projected (its Adam second moment set huge, see ``_frozen_exp_avg_sq``), so every base-step
variant leaves it at exactly zero with no extra pass over the weights.

Reference: the Only-Train-Once authors' public code (tianyic/only_train_once; the copies read
were microsoft/only_train_once and tianyic/only_train_once_personal_footprint, folder
``only_train_once/optimizer``). Each method's docstring says what was confirmed there and where
we differ; no code was copied.

Determinism: nothing is random and every reduction is a fixed-order segment sum, so data-parallel
replicas (DDP: replicated parameters, all-reduced gradients) take identical steps. Sharded
optimizers (DeepSpeed ZeRO, FSDP) are **not** supported: a group's norm would span ranks.
"""

from __future__ import annotations

import math
import numbers
import warnings
from dataclasses import dataclass
from typing import Any, ClassVar, Iterable

import torch
from torch import nn

from ..graph.analysis import _unwrap as unwrap_model  # the same unwrapping find_groups does
from ..groups import ZeroInvariantGroups
from ._index import Positions, PrunableIndex, scale_positions_, update_with_rows_

VARIANTS = ("sgd", "adam", "adamw")
#: Frozen entries keep a huge Adam second moment rather than zero. Their update stays exactly
#: zero (first moment and gradient are zero: 0 / huge = 0), and it keeps CPU kernels on their fast
#: path: on AVX-512 builds ``sqrt`` of exact zeros (and of subnormals, which a decaying moment
#: would become) runs 4-10x slower than on normal values. The value decays by beta2 every step,
#: so it is written again every ``_REFRESH_STEPS`` steps, long before it could become subnormal.
_REFRESH_STEPS = 10_000


def _frozen_exp_avg_sq(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).max / 4
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

@dataclass
class StepPlan:
    """What a method does to its groups after the base step (vectors over all groups).

    ``penalty[g] = c`` multiplies group g by ``max(0, 1 - lr * c)`` after the base step (each tensor
    with its own lr). With ``c = lambda_g / ||z_g||``, z the iterate after the base step, this is the
    proximal operator of ``lambda_g ||x_g||``: the group-lasso term in forward-backward form. It acts
    on the positions ``penalized``. ``shrink`` multiplies the groups at ``shrunk``; ``project`` sets
    groups to exactly zero and freezes them.
    """

    penalty: torch.Tensor | None = None
    penalized: Positions | None = None
    shrink: torch.Tensor | None = None
    shrunk: Positions | None = None
    project: torch.Tensor | None = None


@dataclass
class _Work:
    """One param group's base step, computed but not yet applied."""

    params: list[torch.Tensor]
    lr: float
    decay: float                       # decoupled (AdamW) weight decay, 0 otherwise
    direction: list[torch.Tensor] | None = None   # SGD: the update direction
    exp_avgs: list[torch.Tensor] | None = None     # Adam: numerator ...
    denom: list[torch.Tensor] | None = None        # ... and denominator of the update
    step_size: list[float] | None = None


class GroupSparseOptimizer(torch.optim.Optimizer):
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
        self._gpos = {id(p): i for i, p in enumerate(self._gparams)}
        self.device = self._gparams[0].device if self._gparams else trainable[0].device
        self._index = PrunableIndex(groups, self._gparams, self.device)
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
    def zero_groups(self) -> torch.Tensor:
        """Bool over all groups: every parameter entry of the group is exactly zero."""
        with torch.no_grad():
            return self.groups.zero_mask(self._gparams).cpu()

    def redundant_groups(self) -> torch.Tensor:
        """Bool over all groups: the groups chosen for removal so far (frozen or in progress)."""
        return (self._oto["committed"] | self._oto["active"]).cpu()

    def prunable_zero_groups(self) -> torch.Tensor:
        """Bool over all groups: prunable and exactly zero (sums over prunable slices only)."""
        with torch.no_grad():
            return ((self._index.sq_norms(self._gparams) == 0) & self._prunable).cpu()

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
        oto = {k: (v.detach().cpu().clone() if isinstance(v, torch.Tensor) else v) for k, v in self._oto.items()}
        sd["oto"] = {"method": self.method, "variant": self.variant, "num_groups": len(self.groups),
                     "config": self._config(), "state": oto}
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        oto = state_dict.pop("oto", None)
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

    def _before_step(self) -> None:
        """Reads the raw gradients before the base step transforms them (frozen groups' entries
        already zero); the pruning window accumulates its saliency here."""
        return None

    def _wants_stats(self) -> str | None:
        """Whether this step's plan needs group statistics: None, ``"pre"`` (of the parameters and
        direction before the step) or ``"post"`` (also of the parameters after it)."""
        return None

    def _plan(self, s: dict[str, torch.Tensor] | None) -> StepPlan | None:
        """The method's decisions for this step, from the statistics of :meth:`_update`."""
        return None

    @torch.no_grad()
    def step(self, closure=None):  # noqa: D401 - torch signature
        """One optimizer step: base step on every parameter, plus the method's group updates."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        committed = self._oto["committed"]
        if committed.any():
            # Frozen groups: masking the gradient keeps momentum and first moment at zero, so every
            # variant leaves these entries exactly zero (decoupled or L2 decay of zero is zero).
            frozen = self._positions("committed", committed)
            PrunableIndex.fill_([p.grad for p in self._gparams], frozen)
            if self.variant != "sgd" and self._oto["step"] % _REFRESH_STEPS == 0:
                self._fill_frozen_exp_avg_sq(frozen)
        self._before_step()
        works = self._prepare()
        stats = self._update(works, self._wants_stats())
        plan = self._plan(stats)
        if plan is not None:
            self._correct(plan)
        self._oto["step"] += 1
        return loss

    def _prepare(self) -> list[_Work]:
        """Update momenta/moments of every parameter with a gradient; return the pending updates.

        Also records, per grouped parameter, this step's lr, decoupled decay and the scale of its
        direction (``self._lr``, ``self._decay``, ``self._dscale``): the true direction is
        ``dscale * num / den`` (Adam's ``1/(1 - beta1^t)`` stays out of the tensors, in the weights
        of the group sums). Parameters without a gradient get lr 0: they do not move.
        """
        n = len(self._gparams)
        lrs, decays, dscales = [0.0] * n, [0.0] * n, [1.0] * n
        works: list[_Work] = []
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            grads = [p.grad for p in params]
            if any(g.is_sparse for g in grads):
                raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
            lr, wd = group["lr"], group["weight_decay"]
            pos = [self._gpos.get(id(p)) for p in params]
            for i in pos:
                if i is not None:
                    lrs[i] = lr
                    decays[i] = wd if self.variant == "adamw" else 0.0
            if self.variant == "sgd":
                copied = wd != 0
                if copied:
                    grads = torch._foreach_add(grads, params, alpha=wd)
                mu = group["momentum"]
                if mu != 0:
                    bufs, old = [], []
                    for j, (p, g) in enumerate(zip(params, grads)):
                        st = self.state[p]
                        if "momentum_buffer" not in st:
                            st["momentum_buffer"] = torch.clone(g).detach()
                        else:
                            old.append(j)
                        bufs.append(st["momentum_buffer"])
                    if old:
                        ob = [bufs[j] for j in old]
                        torch._foreach_mul_(ob, mu)
                        torch._foreach_add_(ob, [grads[j] for j in old])
                    if group["nesterov"]:
                        if copied:  # our own copies: update in place, as torch does
                            torch._foreach_add_(grads, bufs, alpha=mu)
                            direction = grads
                        else:
                            direction = torch._foreach_add(grads, bufs, alpha=mu)
                    else:
                        direction = bufs
                else:
                    direction = grads
                works.append(_Work(params, lr, 0.0, direction=list(direction)))
                continue
            b1, b2 = group["betas"]
            exp_avgs, exp_avg_sqs, steps = [], [], []
            for p in params:
                st = self.state[p]
                if "step" not in st:
                    st["step"] = torch.tensor(0.0)
                    st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                exp_avgs.append(st["exp_avg"])
                exp_avg_sqs.append(st["exp_avg_sq"])
                steps.append(st["step"])
            torch._foreach_add_(steps, 1.0)
            decay = 0.0
            if wd != 0:
                if self.variant == "adamw":
                    decay = wd
                else:
                    grads = torch._foreach_add(grads, params, alpha=wd)
            torch._foreach_lerp_(exp_avgs, grads, 1 - b1)
            torch._foreach_mul_(exp_avg_sqs, b2)
            torch._foreach_addcmul_(exp_avg_sqs, grads, grads, 1 - b2)
            bc1 = [1 - b1 ** s.item() for s in steps]
            bc2_sqrt = [(1 - b2 ** s.item()) ** 0.5 for s in steps]
            denom = torch._foreach_sqrt(exp_avg_sqs)
            torch._foreach_div_(denom, bc2_sqrt)
            torch._foreach_add_(denom, group["eps"])
            works.append(_Work(params, lr, decay, exp_avgs=exp_avgs, denom=denom,
                               step_size=[-(lr / b) for b in bc1]))
            for j, i in enumerate(pos):
                if i is not None:
                    dscales[i] = 1.0 / bc1[j]
        self._lr = torch.tensor(lrs, dtype=torch.float64)
        self._decay = torch.tensor(decays, dtype=torch.float64)
        self._dscale = torch.tensor(dscales, dtype=torch.float64)
        return works

    def _update(self, works: list[_Work], want: str | None) -> dict[str, torch.Tensor] | None:
        """Apply the base step to every parameter; with ``want``, also return group statistics.

        Without statistics the step is ``torch._foreach_*`` throughout, with torch's arithmetic.
        With them, each parameter that has a prunable slice is updated by
        :func:`update_with_rows_`, which reads it, its direction and (Adam) denominator once per
        chunk and returns per-position sums on the way; :meth:`PrunableIndex.combine` turns them
        into per-group statistics (all float32 over all groups):

        ``xx`` ||x_g||^2, ``xd`` <x_g, d_g>, ``dd`` ||d_g||^2 (x before the step, d the true base
        direction); ``T1`` = <z_g, x_g> (z: after the base step) and ``T2`` the same with each
        tensor weighted by its lr (so a post-step shrink by ``1 - lr*c`` gives
        ``<y_g, x_g> = T1 - c*T2``); with ``"post"`` also ``zz`` ||z_g||^2 and ``lr_zz`` (each tensor
        weighted by its lr: ``lr_zz / zz`` is the group's step size when its tensors share one).
        """
        fused = self._index.slice_dims if want else {}
        rows: dict[tuple[int, int], torch.Tensor] = {}
        post = want == "post"
        for w in works:
            plain = []
            for j, p in enumerate(w.params):
                i = self._gpos.get(id(p))
                if i is None or i not in fused:
                    plain.append(j)
                    continue
                if w.direction is not None:
                    num, den, alpha = w.direction[j], None, -w.lr
                else:
                    num, den, alpha = w.exp_avgs[j], w.denom[j], w.step_size[j]
                for dim, r in update_with_rows_(p, num, den, 1 - w.lr * w.decay, alpha, fused[i], post).items():
                    rows[(i, dim)] = r
            if len(plain) < len(w.params):
                w = _Work([w.params[j] for j in plain], w.lr, w.decay,
                          direction=None if w.direction is None else [w.direction[j] for j in plain],
                          exp_avgs=None if w.exp_avgs is None else [w.exp_avgs[j] for j in plain],
                          denom=None if w.denom is None else [w.denom[j] for j in plain],
                          step_size=None if w.step_size is None else [w.step_size[j] for j in plain])
            if not w.params:
                continue
            if w.decay != 0:
                torch._foreach_mul_(w.params, 1 - w.lr * w.decay)
            if w.direction is not None:
                torch._foreach_add_(w.params, w.direction, alpha=-w.lr)
            else:
                torch._foreach_addcdiv_(w.params, w.exp_avgs, w.denom, w.step_size)
        if not want:
            return None
        for i, dims in fused.items():  # grouped parameters that did not move (no gradient)
            if (i, dims[0]) not in rows:
                for dim, r in update_with_rows_(self._gparams[i], None, None, 1.0, 0.0, dims, post).items():
                    r[3] = r[0]
                    rows[(i, dim)] = r
        lr, ds = self._lr, self._dscale
        keep = 1 - lr * self._decay
        w = torch.zeros(7, len(self._gparams), 4, dtype=torch.float64)
        w[0, :, 0] = 1                                       # xx
        w[1, :, 1] = ds                                      # xd
        w[2, :, 2] = ds * ds                                 # dd
        w[3, :, 0], w[3, :, 1] = keep, -lr * ds              # T1 = <x_new, x>
        w[4, :, 0], w[4, :, 1] = lr * keep, -lr * lr * ds    # T2
        w[5, :, 3] = 1                                       # zz
        w[6, :, 3] = lr                                      # lr_zz
        out = self._index.combine(rows, w)
        return dict(zip(("xx", "xd", "dd", "T1", "T2", "zz", "lr_zz"), out))

    def _correct(self, plan: StepPlan) -> None:
        """After the base step: the penalty shrink, the schedule's shrink, the projections."""
        if plan.penalty is not None and plan.penalized:
            lrs = self._lr.tolist()
            for i, dim, idx, grp, size in plan.penalized.slices:
                lr = lrs[i]
                if lr == 0:
                    continue
                p = self._gparams[i]
                scale_positions_(p, dim, idx, (1.0 - lr * plan.penalty.to(p.device)[grp]).clamp_min(0), size)
        if plan.shrink is not None and plan.shrunk:
            PrunableIndex.scale_(self._gparams, plan.shrunk, plan.shrink)
        if plan.project is not None and plan.project.any():
            self._project(plan.project)

    def _project(self, mask: torch.Tensor) -> None:
        """Set the groups in ``mask`` to exactly zero, with their optimizer state, and freeze them."""
        mask = mask & self._prunable  # only prunable groups may ever be projected
        where = self._index.positions(mask)
        PrunableIndex.fill_(self._gparams, where)
        for key in ("momentum_buffer", "exp_avg"):
            PrunableIndex.fill_(self._state_list(key), where)
        self._fill_frozen_exp_avg_sq(where)
        self._oto["committed"] = self._oto["committed"] | mask
        self._oto["active"] = self._oto["active"] & ~mask

    def _state_list(self, key: str) -> list[torch.Tensor | None]:
        return [self.state[p].get(key) if p in self.state else None for p in self._gparams]

    def _fill_frozen_exp_avg_sq(self, where: Positions) -> None:
        for i, dim, idx, _, _ in where.slices:
            p = self._gparams[i]
            v = self.state[p].get("exp_avg_sq") if p in self.state else None
            if v is not None:
                v.index_fill_(dim, idx, _frozen_exp_avg_sq(v.dtype))

    # -- helpers for the methods ---------------------------------------------------------------
    def _halfspace(self, s: dict[str, torch.Tensor], lambdas: torch.Tensor, free: torch.Tensor,
                   epsilon: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The proximal group-lasso step and the half-space test, for the groups in ``free``.

        The trial point is ``y_g = prox(z_g) = z_g * max(0, 1 - lr * lambda_g / ||z_g||)``, z the
        base step's result. Returns ``(coef, cross, depth)``: the penalty coefficients
        ``lambda_g / ||z_g||`` (for :class:`StepPlan`), the groups whose trial point leaves the
        half-space, ``<y_g, x_g> < epsilon * ||x_g||^2`` (or which the prox zeroes), and
        ``<y_g, x_g> / ||x_g||^2`` (how deep; +inf outside ``cross``).
        """
        live = free & (s["xx"] > 0)
        znorm = s["zz"].clamp_min(0).sqrt()
        coef = torch.where(live, lambdas / znorm.clamp_min(1e-30), torch.zeros_like(znorm))
        lr_g = s["lr_zz"] / s["zz"].clamp_min(1e-30)
        zeroed = live & ((1 - lr_g * coef) <= 0)
        trial = torch.where(zeroed, torch.zeros_like(znorm), s["T1"] - coef * s["T2"])
        cross = live & ((trial < epsilon * s["xx"]) | zeroed)
        depth = torch.where(cross, trial / s["xx"].clamp_min(1e-30), torch.full_like(trial, math.inf))
        return coef, cross, depth

    @staticmethod
    def _cap(cross: torch.Tensor, depth: torch.Tensor, room: int) -> torch.Tensor:
        """At most ``room`` of the groups in ``cross``: the deepest crossings (stable order)."""
        if int(cross.sum()) <= max(room, 0):
            return cross
        capped = torch.zeros_like(cross)
        capped[torch.sort(depth, stable=True).indices[:max(room, 0)]] = True
        return capped

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
                mask[mine[torch.argmax(priority[mine])]] = False


def __getattr__(name: str) -> Any:
    # The pruning window moved to windowed.py; code written against base keeps importing it from here.
    if name in ("WindowedPruning", "schedule_period", "cumulative_targets"):
        from . import windowed

        return getattr(windowed, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
