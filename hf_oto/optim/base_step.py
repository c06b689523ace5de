"""The base step of the group-sparsity optimizers: torch's SGD/Adam/AdamW arithmetic over every
parameter, group statistics gathered on the way, and the group corrections a method plans.

:class:`BaseStep` is the step half of :class:`hf_oto.optim.base.GroupSparseOptimizer` (the other
half, in ``base.py``, holds its construction, state, reporting and the choice of groups). A step:

1. **Base step** (``_prepare`` and ``_update``): plain SGD (momentum, Nesterov), Adam or AdamW over
   every parameter, vectorised with ``torch._foreach_*`` per param group, with the arithmetic of
   ``torch.optim.SGD/Adam/AdamW(foreach=True)``. Parameters in no group only ever get this step.
   On steps where the method needs them, the parameters that have prunable slices are instead
   updated chunk by chunk while per-group statistics (``||x_g||^2``, ``<x_g, d_g>``, ... with ``d``
   the base direction) are gathered in the same pass over memory.
2. **Group plan** (``_plan``, one per method): from those statistics the method decides per group a
   penalty, a shrink factor and projections to zero (vectors over groups: no loop per group).
   A method whose decisions need the statistics *before* the step is applied (the half-space
   methods: their trial point includes the penalty) asks for ``"trial"`` statistics: a read-only
   pass gathers them (and keeps Adam's divided direction), the plan is made, and the base step
   then runs with the group-lasso subgradient folded into its per-position multiplier.
3. **Group corrections** (``_correct``): multiplies on the positions of the groups concerned
   (one broadcast multiply per slice, or gather/scatter when few positions change) and
   ``index_fill_`` for exact zeros on the parameters and on their optimizer state.

Once projected, a group is *frozen*: at the start of every later step its gradient entries are set
to zero in place (``p.grad.index_fill_``), and its momentum / Adam first moment were zeroed when it
was projected (its Adam second moment set huge, see ``_frozen_exp_avg_sq``), so every base-step
variant leaves it at exactly zero with no extra pass over the weights.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ._index import (Positions, PrunableIndex, fill_positions_, scaled_step_,
                     update_with_rows_)
from ._sharding import like_param, local

#: Frozen entries keep a huge Adam second moment rather than zero. Their update stays exactly
#: zero (first moment and gradient are zero: 0 / huge = 0), and it keeps CPU kernels on their fast
#: path: on AVX-512 builds ``sqrt`` of exact zeros (and of subnormals, which a decaying moment
#: would become) runs 4-10x slower than on normal values. The value decays by beta2 every step,
#: so it is written again every ``_REFRESH_STEPS`` steps, long before it could become subnormal.
_REFRESH_STEPS = 10_000


def _frozen_exp_avg_sq(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).max / 4


@dataclass
class StepPlan:
    """What a method does to its groups in this step (vectors over all groups).

    ``penalty[g] = c`` is the group-lasso term on the positions ``penalized``, each tensor with its
    own lr, planned from ``"trial"`` statistics (before the base step): the *subgradient* step,
    with ``c = lambda_g / ||x_g||`` at the current point the step becomes
    ``keep*x_g - lr*d_g - lr*c*x_g`` (keep: AdamW's ``1 - lr*wd``, 1 otherwise), in the same pass
    as the base step. ``shrink`` multiplies the groups at ``shrunk`` after the base step (HSPG's
    proximal stage passes the proximal operator's factors there); ``project`` sets groups to
    exactly zero and freezes them.
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
    pos: list[int | None] | None = None   # index of each parameter in the grouped list, or None


class BaseStep:
    """The step mechanics (a mixin of :class:`GroupSparseOptimizer`, which provides ``param_groups``,
    ``state``, the grouped parameters ``_gparams`` and their index ``_index``, ``_oto`` and ``_positions``)."""

    #: Whether the plans use ``dd`` (||d_g||^2): a reduction over every grouped entry when they do.
    _stats_dd = True

    def _before_step(self) -> None:
        """Reads the raw gradients before the base step transforms them (frozen groups' entries
        already zero); the pruning window accumulates its saliency here."""
        return None

    def _wants_stats(self) -> str | None:
        """Whether this step's plan needs group statistics: None, ``"pre"`` (of the parameters and
        direction before the step, gathered while the step is applied), ``"post"`` (also of the
        parameters after it), ``"after"`` (only those after it: ``zz``, ``lr_zz``) or ``"trial"``
        (those before the step, gathered before it is applied, so that the plan's penalty enters
        the step itself). ``||d_g||^2`` is left out (0) when the class sets ``_stats_dd = False``."""
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
        self._follow_swaps()
        self._lp = self._local_params()  # this rank's rows of the grouped parameters (all, unsharded)
        committed = self._oto["committed"]
        if committed.any():
            # Frozen groups: masking the gradient keeps momentum and first moment at zero, so every
            # variant leaves these entries exactly zero (decoupled or L2 decay of zero is zero).
            frozen = self._positions("committed", committed)
            PrunableIndex.fill_(self._local_grads(), frozen)
            if self.variant != "sgd" and self._oto["step"] % _REFRESH_STEPS == 0:
                self._fill_frozen_exp_avg_sq(frozen)
        self._before_step()
        works = self._prepare()
        want = self._wants_stats()
        if want == "trial":
            plan = self._plan(self._statistics(works))
            penalty = plan is not None and plan.penalty is not None and plan.penalized
            self._trial_update(works, plan.penalty if penalty else None, plan.penalized if penalty else None)
        else:
            plan = self._plan(self._update(works, want))
            if plan is not None and plan.penalty is not None:
                raise RuntimeError("a penalty needs a plan made from 'trial' statistics")
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
            owners = params  # optimizer state is keyed by (and, when sharded, placed like) these
            if self._sharded:  # the arithmetic runs on this rank's rows
                params, grads = [local(p) for p in params], [local(g) for g in grads]
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
                    for j, (p, g) in enumerate(zip(owners, grads)):
                        st = self.state[p]
                        if "momentum_buffer" not in st:
                            st["momentum_buffer"] = like_param(torch.clone(g).detach(), p)
                        else:
                            old.append(j)
                        bufs.append(local(st["momentum_buffer"]))
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
                works.append(_Work(params, lr, 0.0, direction=list(direction), pos=pos))
                continue
            b1, b2 = group["betas"]
            exp_avgs, exp_avg_sqs, steps = [], [], []
            for p in owners:
                st = self.state[p]
                if "step" not in st:
                    st["step"] = torch.tensor(0.0)
                    st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                exp_avgs.append(local(st["exp_avg"]))
                exp_avg_sqs.append(local(st["exp_avg_sq"]))
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
                               step_size=[-(lr / b) for b in bc1], pos=pos))
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
        post, pre = want in ("post", "after"), want != "after"
        for w in works:
            plain = []
            for j, p in enumerate(w.params):
                i = w.pos[j]
                if i is None or i not in fused:
                    plain.append(j)
                    continue
                if w.direction is not None:
                    num, den, alpha = w.direction[j], None, -w.lr
                else:
                    num, den, alpha = w.exp_avgs[j], w.denom[j], w.step_size[j]
                for dim, r in update_with_rows_(p, num, den, 1 - w.lr * w.decay, alpha, fused[i], post, pre=pre,
                                                dd=self._stats_dd).items():
                    rows[(i, dim)] = r
            _foreach_step(w, plain)
        if not want:
            return None
        self._rows_of_unmoved(rows, fused, after=True)
        lr, ds = self._lr, self._dscale
        keep = 1 - lr * self._decay
        w = torch.zeros(7, len(self._gparams), 4, dtype=torch.float64)
        w[:3] = self._pre_weights()                          # xx, xd, dd
        w[3, :, 0], w[3, :, 1] = keep, -lr * ds              # T1 = <x_new, x>
        w[4, :, 0], w[4, :, 1] = lr * keep, -lr * lr * ds    # T2
        w[5, :, 3] = 1                                       # zz
        w[6, :, 3] = lr                                      # lr_zz
        out = self._index.combine(rows, w)
        return dict(zip(("xx", "xd", "dd", "T1", "T2", "zz", "lr_zz"), out))

    def _rows_of_unmoved(self, rows: dict[tuple[int, int], torch.Tensor], dims: dict[int, tuple], after: bool) -> None:
        """Add the per-position sums of grouped parameters that had no gradient (they do not move;
        with ``after``, their post-step sums equal the pre-step ones)."""
        for i, d in dims.items():
            if (i, d[0]) not in rows:
                for dim, r in update_with_rows_(self._lp[i], None, None, 1.0, 0.0, d, False).items():
                    if after:
                        r[3] = r[0]
                    rows[(i, dim)] = r

    def _pre_weights(self) -> torch.Tensor:
        """Weights of ``xx``, ``xd``, ``dd`` for :meth:`PrunableIndex.combine`."""
        ds = self._dscale
        w = torch.zeros(3, len(self._gparams), 4, dtype=torch.float64)
        w[0, :, 0] = 1
        w[1, :, 1] = ds
        w[2, :, 2] = ds * ds
        return w

    def _statistics(self, works: list[_Work]) -> dict[str, torch.Tensor]:
        """Group statistics of the step about to be taken, without taking it (``"trial"``).

        One read-only pass over the parameters with prunable slices (and their direction), the
        same chunked reductions as the fused update; Adam's direction ``exp_avg / denom`` is left
        in the ``denom`` temporaries, for :meth:`_trial_update`. Returns ``xx``, ``xd``, ``dd`` as in
        :meth:`_update`, ``T1`` = <z_g, x_g> for the base step's result z, and ``LX``: ||x_g||^2
        with each tensor weighted by its lr. A subgradient step ``y = z - lr*c*x`` then has
        ``<y_g, x_g> = T1 - c*LX``.
        """
        dims = self._index.slice_dims
        rows: dict[tuple[int, int], torch.Tensor] = {}
        for w in works:
            for j, p in enumerate(w.params):
                i = w.pos[j]
                if i is None or i not in dims:
                    continue
                num, den = (w.direction[j], None) if w.direction is not None else (w.exp_avgs[j], w.denom[j])
                for dim, r in update_with_rows_(p, num, den, 1.0, 0.0, dims[i], False, keep_quotient=True,
                                                dd=self._stats_dd).items():
                    rows[(i, dim)] = r
        self._rows_of_unmoved(rows, dims, after=False)
        lr, ds = self._lr, self._dscale
        w = torch.zeros(5, len(self._gparams), 4, dtype=torch.float64)
        w[:3] = self._pre_weights()
        w[3, :, 0], w[3, :, 1] = 1 - lr * self._decay, -lr * ds   # T1 = <z, x>
        w[4, :, 0] = lr                                            # LX
        out = self._index.combine(rows, w)
        return dict(zip(("xx", "xd", "dd", "T1", "LX"), out))

    def _trial_update(self, works: list[_Work], coef: torch.Tensor | None, where: Positions | None) -> None:
        """The base step after :meth:`_statistics`, with the planned subgradient penalty in it.

        A parameter with prunable slices becomes ``(keep - lr*c)*x - lr*d`` in one chunked pass
        (``c = lambda_g/||x_g||`` at its group's positions, 0 elsewhere; an entry in groups along
        two dims gets both terms, as the subgradient of the sum of their norms; ``keep`` is
        AdamW's ``1 - lr*wd``, 1 otherwise); the direction is already divided out. Other
        parameters take the plain ``torch._foreach_*`` step.
        """
        scales: dict[int, list[tuple[int, torch.Tensor]]] = {}
        if coef is not None and where:
            lrs = self._lr.tolist()
            for i, dim, idx, grp, size in where.slices:
                if lrs[i] == 0:
                    continue
                p = self._lp[i]
                v = torch.zeros(size, dtype=p.dtype, device=p.device)
                v.index_add_(0, idx, (lrs[i] * coef.to(p.device)[grp]).to(p.dtype))
                scales.setdefault(i, []).append((dim, v))
        dims = self._index.slice_dims
        for w in works:
            plain = []
            for j, p in enumerate(w.params):
                i = w.pos[j]
                if i is None or i not in dims:
                    plain.append(j)
                    continue
                d, alpha = (w.direction[j], -w.lr) if w.direction is not None else (w.denom[j], w.step_size[j])
                scaled_step_(p, d, 1 - w.lr * w.decay, alpha, scales.get(i, ()))
            _foreach_step(w, plain)

    def _correct(self, plan: StepPlan) -> None:
        """After the base step: the schedule's shrink, then the projections."""
        if plan.shrink is not None and plan.shrunk:
            PrunableIndex.scale_(self._lp, plan.shrunk, plan.shrink)
        if plan.project is not None and plan.project.any():
            self._project(plan.project)

    def _project(self, mask: torch.Tensor) -> None:
        """Set the groups in ``mask`` to exactly zero, with their optimizer state, and freeze them."""
        mask = mask & self._prunable  # only prunable groups may ever be projected
        where = self._index.positions(mask)
        PrunableIndex.fill_(self._lp, where)
        for key in ("momentum_buffer", "exp_avg"):
            PrunableIndex.fill_(self._state_list(key), where)
        self._fill_frozen_exp_avg_sq(where)
        self._oto["committed"] = self._oto["committed"] | mask
        self._oto["active"] = self._oto["active"] & ~mask

    def _state_list(self, key: str) -> list[torch.Tensor | None]:
        return [local(self.state[p].get(key)) if p in self.state else None for p in self._gparams]

    def _fill_frozen_exp_avg_sq(self, where: Positions) -> None:
        for i, dim, idx, _, _ in where.slices:
            p = self._gparams[i]
            v = local(self.state[p].get("exp_avg_sq")) if p in self.state else None
            if v is not None:
                fill_positions_(v, dim, idx, _frozen_exp_avg_sq(v.dtype))


def _foreach_step(w: _Work, keep: list[int]) -> None:
    """The plain base step (torch's arithmetic) on the parameters ``keep`` of ``w``."""
    if len(keep) < len(w.params):
        w = _Work([w.params[j] for j in keep], w.lr, w.decay,
                  direction=None if w.direction is None else [w.direction[j] for j in keep],
                  exp_avgs=None if w.exp_avgs is None else [w.exp_avgs[j] for j in keep],
                  denom=None if w.denom is None else [w.denom[j] for j in keep],
                  step_size=None if w.step_size is None else [w.step_size[j] for j in keep],
                  pos=None if w.pos is None else [w.pos[j] for j in keep])
    if not w.params:
        return
    if w.decay != 0:
        torch._foreach_mul_(w.params, 1 - w.lr * w.decay)
    if w.direction is not None:
        torch._foreach_add_(w.params, w.direction, alpha=-w.lr)
    else:
        torch._foreach_addcdiv_(w.params, w.exp_avgs, w.denom, w.step_size)
