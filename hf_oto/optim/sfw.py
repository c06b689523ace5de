"""Stochastic Frank-Wolfe (SFW): compression-aware training inside per-layer convex sets.

Train a dense model once so that it can later be pruned (smallest-norm groups removed) or
truncated to low rank at any ratio without retraining (Zimmer, Spiegel and Pokutta,
"Compression-aware training of neural networks using Frank-Wolfe", 2022; Pokutta, Spiegel and
Zimmer, "Deep neural network training with Frank-Wolfe", 2020).

Each step, for every convex set C (one per layer, or one per block of zero-invariant groups):

1. momentum ``m <- beta * m + (1 - beta) * grad`` (the first step takes ``m = grad``);
2. the linear minimisation oracle (LMO) ``v = argmin_{v in C} <m, v>``;
3. ``x <- x + eta * (v - x)`` with the gradient-norm rescaling
   ``eta = min(lr * ||m|| / ||v - x||, 1)``, computed per block.

``x`` stays a convex combination of points of C, so it never leaves it: no projection is needed.

Checked against the authors' public code (ZIB-IOL/compression-aware-SFW and
ZIB-IOL/StochasticFrankWolfe; read, not copied):

* radii come from the layer's norm: their ``mode='initialization'`` sets the L2 *diameter* to
  ``2 * value * (average norm at initialisation)``, i.e. atoms of L2 norm ``value * norm``
  (``value`` 10 in their debug config); a zero norm (zero-initialised biases) counts as 1. Here the
  norm is the layer's norm when the optimizer is built (a pretrained model's own weights, a fresh
  model's initial ones), times ``radius_factor``;
* the K-sparse polytope keeps that L2 diameter, so its entry bound is ``radius / sqrt(K)``;
* the gradient rescaling is ``||m|| / ||x - v||`` times ``lr``, clamped to ``[0, 1]``;
* ``k`` is a fraction of the layer's groups / entries / rank (at least 1), or an int count;
* the group-K-support LMO keeps the K groups with the largest momentum norms and normalises them
  to the radius; the spectral (K-support nuclear) LMO uses the top-K singular triplets scaled by
  ``radius / ||s_K||``;
* the momentum here is an exponential average (their earlier code), so ``||m||`` has the scale of
  a gradient and ``lr`` keeps its meaning across momentum values.

The convex sets and their linear minimisation oracles are in :mod:`hf_oto.optim.constraints`.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Iterable

import torch
from torch import Tensor, nn

from ..groups import ZeroInvariantGroups
from .constraints import (CONSTRAINTS, ConstraintSet, GroupKSupportBall, KSparsePolytope, KSupportNuclearBall,
                          L2Ball, _base_norm, check_k, k_support_norm, lmo_k_sparse, lmo_k_support_nuclear,
                          lmo_l2, resolve_k)

__all__ = [
    "SFW", "ConstraintSet", "L2Ball", "KSparsePolytope", "GroupKSupportBall", "KSupportNuclearBall",
    "lmo_l2", "lmo_k_sparse", "lmo_k_support_nuclear", "k_support_norm", "CONSTRAINTS",
    "STRUCTURES",
]

#: Model-wide recipes of :meth:`SFW.from_model`.
STRUCTURES = ("prune", "low_rank", "k_sparse", "l2")
_RESCALE = ("gradient", None)


# -- the optimizer ---------------------------------------------------------------------------

class SFW(torch.optim.Optimizer):
    """Stochastic Frank-Wolfe with momentum and gradient-norm learning-rate rescaling.

    Every parameter group names a ``constraint``; each of its tensors gets its own set (per layer),
    except ``"group_k_support"``, one set over the tensors of ``groups.param_names`` (in that
    order) split into per-layer blocks:

    ========================  ===================================================================
    ``"l2"``                  L2 ball of radius tau
    ``"k_sparse"``            K-sparse polytope; entries in [-tau/sqrt(K), tau/sqrt(K)]
    ``"group_k_support"``     per layer, at most K non-zero zero-invariant groups, L2 norm <= tau
    ``"k_support_nuclear"``   rank <= K matrices of Frobenius norm <= tau (trailing dims flattened)
    ========================  ===================================================================

    tau is ``radius_factor`` times the block's L2 norm when the optimizer is built (1 if zero), or
    ``radius`` if given. Parameters outside their set are scaled onto it by the first step (or
    :meth:`make_feasible_`). Radii are kept in the param groups (``"radii"``) so that
    ``state_dict`` round-trips them; loading a state dict never rescales parameters.

    Args:
        params: tensors or param-group dicts (which may override any keyword below).
        lr: step scale in (0, 1] before rescaling; the step is ``min(lr * ||m|| / ||v - x||, 1)``
            with ``rescale="gradient"`` (default), else ``lr`` itself.
        momentum: exponential-average factor beta in [0, 1).
        constraint: one of :data:`CONSTRAINTS`.
        k: int count or float fraction (of groups per block, entries, or rank).
        radius_factor: tau = radius_factor * initial norm.
        radius: a fixed tau instead (overrides ``radius_factor``).
        groups: required by ``"group_k_support"``.
        power_iterations: block power iterations per step for ``"k_support_nuclear"`` (warm start).
        oversample: extra columns of that iteration.
        seed: seed of the random sketches (a private generator: the global RNG is untouched).

    Example:
        >>> import torch
        >>> from hf_oto.optim.sfw import SFW
        >>> layer = torch.nn.Linear(8, 4)
        >>> opt = SFW(layer.parameters(), lr=0.5, constraint="l2", radius_factor=5.0)
        >>> layer(torch.randn(3, 8)).square().sum().backward()
        >>> opt.step()
        >>> opt.contains()
        True
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 0.1,
        *,
        momentum: float = 0.9,
        rescale: str | None = "gradient",
        constraint: str = "l2",
        k: float | int = 0.3,
        radius_factor: float = 10.0,
        radius: float | None = None,
        groups: ZeroInvariantGroups | None = None,
        power_iterations: int = 1,
        oversample: int = 8,
        seed: int = 0,
    ) -> None:
        self._zig = groups
        self._seed = int(seed)
        self._generators: dict[str, torch.Generator] = {}
        self._sets: list[list[tuple[ConstraintSet, list[int]]]] = []
        self.last_step_sizes: list[float] = []
        defaults = dict(lr=lr, momentum=momentum, rescale=rescale, constraint=constraint, k=k,
                        radius_factor=radius_factor, radius=radius, power_iterations=power_iterations,
                        oversample=oversample)
        _check_options(defaults)
        super().__init__(params, defaults)

    # -- construction ----------------------------------------------------------------------------
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        _check_options(group)
        self._sets.append(self._build_sets(group, initial="radii" not in group))

    def _generator(self, device: torch.device) -> torch.Generator:
        key = str(device)
        if key not in self._generators:
            self._generators[key] = torch.Generator(device=device).manual_seed(self._seed + len(self._generators))
        return self._generators[key]

    @torch.no_grad()
    def _build_sets(self, group: dict[str, Any], initial: bool) -> list[tuple[ConstraintSet, list[int]]]:
        params: list[Tensor] = group["params"]
        kind = group["constraint"]
        stored = group.get("radii")
        sets: list[tuple[ConstraintSet, list[int]]] = []
        if kind == "group_k_support":
            if self._zig is None:
                raise ValueError("constraint 'group_k_support' needs SFW(..., groups=find_groups(model, ...))")
            if initial:
                s: ConstraintSet = GroupKSupportBall.from_params(self._zig, params, group["k"], group["radius_factor"],
                                                                 group["radius"])
            else:
                s = GroupKSupportBall(self._zig, [p.shape for p in params], group["k"], stored[0])
            sets.append((s, list(range(len(params)))))
        else:
            for i, p in enumerate(params):
                if initial:
                    norm = float(torch.linalg.vector_norm(p.detach().double()))
                    tau = float(group["radius"]) if group["radius"] is not None else group["radius_factor"] * _base_norm(norm)
                else:
                    tau = float(stored[i][0])
                sets.append((self._tensor_set(kind, p, tau, group, initial), [i]))
        if initial:
            group["radii"] = [s.radii.tolist() for s, _ in sets]
            # Made feasible at the first step, not here: when resuming, the optimizer is built on
            # trained weights and must not touch them before load_state_dict restores the radii.
            group["feasible"] = False
        return sets

    @torch.no_grad()
    def make_feasible_(self) -> None:
        """Scale parameters that lie outside their set onto it (done by the first :meth:`step`)."""
        for group, sets in zip(self.param_groups, self._sets):
            if not group.get("feasible", True):
                for s, idx in sets:
                    s.shift_inside_([group["params"][i] for i in idx])
                group["feasible"] = True

    def _tensor_set(self, kind: str, p: Tensor, tau: float, group: dict[str, Any], initial: bool) -> ConstraintSet:
        if kind == "l2":
            return L2Ball(tau)
        if kind == "k_sparse":
            k = resolve_k(group["k"], p.numel())
            # tau is the L2 size of the polytope's vertices; the stored radius is the entry bound.
            return KSparsePolytope(tau / math.sqrt(k) if initial else tau, k)
        if kind == "k_support_nuclear":
            rank = 1 if p.dim() <= 1 else min(p.shape[0], p[0].numel())
            return KSupportNuclearBall(tau, resolve_k(group["k"], rank), iterations=group["power_iterations"],
                                       oversample=group["oversample"], generator=self._generator(p.device))
        raise ValueError(f"unknown constraint {kind!r}; choose from {CONSTRAINTS}")

    @classmethod
    def from_model(
        cls,
        model: nn.Module,
        groups: ZeroInvariantGroups | None = None,
        *,
        structure: str = "prune",
        lr: float = 0.1,
        momentum: float = 0.9,
        k: float | int = 0.3,
        radius_factor: float = 10.0,
        rescale: str | None = "gradient",
        power_iterations: int = 1,
        oversample: int = 8,
        seed: int = 0,
        example_inputs: Any = None,
    ) -> "SFW":
        """SFW over all trainable parameters of ``model`` with one of :data:`STRUCTURES`:

        * ``"prune"``: group-K-support balls over the zero-invariant groups (heads, neurons,
          channels; ``groups`` found with :func:`hf_oto.find_groups` when not given), L2 balls for
          every other tensor. Train, then ``compress(model, groups, ratio=r)``.
        * ``"low_rank"``: K-support nuclear balls on the weights :func:`decompose_low_rank` can
          factorise (Linear, 1x1 conv, GPT-2 ``Conv1D``; not tied ones), L2 balls elsewhere. Train,
          then ``decompose_low_rank(model, rank_ratio=r)``.
        * ``"k_sparse"``: K-sparse polytopes on every weight with 2+ dims (unstructured), L2 elsewhere.
        * ``"l2"``: L2 balls everywhere.

        Example:
            >>> opt = SFW.from_model(model, groups, structure="prune", lr=0.3, k=0.3)  # doctest: +SKIP
        """
        if structure not in STRUCTURES:
            raise ValueError(f"unknown structure {structure!r}; choose from {STRUCTURES}")
        trainable = [p for p in model.parameters() if p.requires_grad]
        param_groups: list[dict[str, Any]] = []
        special: list[Tensor] = []
        if structure == "prune":
            if groups is None:
                from ..graph import find_groups

                groups = find_groups(model, example_inputs)
            special = groups.parameters(model)
            frozen = [n for n, p in zip(groups.param_names, special) if not p.requires_grad]
            if frozen:
                raise ValueError(f"group_k_support updates every tensor the groups span; these are frozen: "
                                 f"{frozen[:3]} (unfreeze them or use structure='l2')")
            param_groups.append({"params": special, "constraint": "group_k_support"})
        elif structure == "low_rank":
            from ..compress.lowrank import low_rank_layers

            ids = {id(m.weight) for m in low_rank_layers(model).values()}
            special = [p for p in trainable if id(p) in ids]
            if special:
                param_groups.append({"params": special, "constraint": "k_support_nuclear"})
        elif structure == "k_sparse":
            special = [p for p in trainable if p.dim() >= 2]
            if special:
                param_groups.append({"params": special, "constraint": "k_sparse"})
        special_ids = {id(p) for p in special}
        rest = [p for p in trainable if id(p) not in special_ids]
        if rest:
            param_groups.append({"params": rest, "constraint": "l2"})
        return cls(param_groups, lr=lr, momentum=momentum, rescale=rescale, k=k, radius_factor=radius_factor,
                   groups=groups, power_iterations=power_iterations, oversample=oversample, seed=seed)

    # -- state -----------------------------------------------------------------------------------
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        # The radii come back in the param groups; rebuild the sets with them (never from the
        # current, trained, norms).
        self._sets = [self._build_sets(g, initial=False) for g in self.param_groups]

    # -- the step --------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.make_feasible_()
        sizes: list[float] = []
        for group, sets in zip(self.param_groups, self._sets):
            params: list[Tensor] = group["params"]
            beta = group["momentum"]
            for s, idx in sets:
                members = [params[i] for i in idx]
                if all(p.grad is None for p in members):
                    continue
                moms = []
                for p in members:
                    state = self.state[p]
                    buf = state.get("momentum_buffer")
                    if buf is None:
                        buf = p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p)
                        state["momentum_buffer"] = buf
                    elif p.grad is None:     # unused this step inside a multi-tensor set
                        buf.mul_(beta)
                    else:
                        buf.lerp_(p.grad, 1 - beta)
                    moms.append(buf)
                eta = s.update_(members, moms, group["lr"], group["rescale"], [self.state[p] for p in members])
                sizes.append(float(eta.mean()))
        self.last_step_sizes = sizes
        return loss

    # -- inspection ------------------------------------------------------------------------------
    def constraint_sets(self) -> list[tuple[ConstraintSet, list[Tensor]]]:
        """Every set with the tensors it constrains."""
        return [(s, [g["params"][i] for i in idx]) for g, sets in zip(self.param_groups, self._sets)
                for s, idx in sets]

    @torch.no_grad()
    def contains(self, rtol: float = 1e-5) -> bool:
        """Whether every parameter lies in its set (the Frank-Wolfe invariant)."""
        return all(s.contains(ts, rtol) for s, ts in self.constraint_sets())


def _check_options(opts: dict[str, Any]) -> None:
    lr = opts.get("lr")
    if not isinstance(lr, (int, float)) or isinstance(lr, bool) or not 0.0 < lr:
        raise ValueError(f"lr must be a positive number, got {lr!r}")
    if opts.get("rescale") not in _RESCALE:
        raise ValueError(f"rescale must be one of {_RESCALE}, got {opts.get('rescale')!r}")
    if opts.get("rescale") is None and lr > 1.0:
        raise ValueError(f"without rescaling the Frank-Wolfe step lr must be in (0, 1], got {lr}")
    beta = opts.get("momentum")
    if not isinstance(beta, (int, float)) or not 0.0 <= beta < 1.0:
        raise ValueError(f"momentum must be in [0, 1), got {beta!r}")
    if opts.get("constraint") not in CONSTRAINTS:
        raise ValueError(f"unknown constraint {opts.get('constraint')!r}; choose from {CONSTRAINTS}")
    check_k(opts.get("k"))
    factor = opts.get("radius_factor")
    if not isinstance(factor, (int, float)) or not 0.0 < factor < math.inf:
        raise ValueError(f"radius_factor must be a positive number, got {factor!r}")
    radius = opts.get("radius")
    if radius is not None and (not isinstance(radius, (int, float)) or not 0.0 < radius < math.inf):
        raise ValueError(f"radius must be a positive number or None, got {radius!r}")
    if int(opts.get("power_iterations", 1)) < 1:
        raise ValueError(f"power_iterations must be >= 1, got {opts.get('power_iterations')}")
    if int(opts.get("oversample", 0)) < 0:
        raise ValueError(f"oversample must be >= 0, got {opts.get('oversample')}")
