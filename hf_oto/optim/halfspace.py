"""The half-space test of HSPG and DHSPG, on per-group statistics (vectors over groups).

A group x_g takes a trial step to y_g and is projected to exactly zero when the trial point leaves
the half-space around x_g, ``<y_g, x_g> < epsilon * ||x_g||^2``. What the trial step is matters:

- **subgradient** (published, the default): ``y_g = x_g - lr*d_g - lr*lambda_g*x_g/||x_g||``, d the
  base optimizer's direction. The penalty moves the trial point along -x_g, so it lowers
  ``<y_g, x_g>`` by ``lr*lambda_g*||x_g||``: a large enough lambda carries a group across.
- **proximal**: ``y_g = z_g * max(0, 1 - lr*lambda_g/||z_g||)`` with ``z = x - lr*d``. This only
  rescales z by a non-negative factor, so ``<y_g, x_g>`` keeps the sign of ``<z_g, x_g>``: lambda
  never carries a group across unless it zeroes ``z_g`` outright (``||z_g|| <= lr*lambda_g``), and
  far fewer groups are projected by the test itself.
"""

from __future__ import annotations

import math

import torch

#: Trial steps of the half-space test (see the module docstring).
TRIAL_STEPS = ("subgradient", "proximal")


def subgradient_trial(s: dict[str, torch.Tensor], lambdas: torch.Tensor, live: torch.Tensor,
                      epsilon: float | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The half-space test of the subgradient trial step, for the groups in ``live`` (non-zero).

    ``s`` holds ``"trial"`` statistics (see ``BaseStep._statistics``). Returns ``(coef, cross,
    depth)``: the penalty coefficients ``lambda_g / ||x_g||`` (for ``StepPlan.penalty``), the
    groups whose trial point leaves the half-space, and ``<y_g, x_g> / ||x_g||^2`` (how deep; +inf
    outside ``cross``). ``epsilon`` is a number or a vector over groups.
    """
    xx = s["xx"]
    norm = xx.clamp_min(0).sqrt()
    coef = torch.where(live, lambdas / norm.clamp_min(1e-30), torch.zeros_like(norm))
    inner = s["T1"] - coef * s["LX"]  # <y_g, x_g>
    cross = live & (inner < epsilon * xx)
    depth = torch.where(cross, inner / xx.clamp_min(1e-30), torch.full_like(inner, math.inf))
    return coef, cross, depth


def proximal_trial(s: dict[str, torch.Tensor], lambdas: torch.Tensor, live: torch.Tensor,
                   epsilon: float | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The half-space test of the proximal trial step (``"post"`` statistics), as
    :func:`subgradient_trial`; the coefficients are ``lambda_g / ||z_g||`` and a group the
    proximal operator zeroes counts as crossing."""
    xx = s["xx"]
    znorm = s["zz"].clamp_min(0).sqrt()
    coef = torch.where(live, lambdas / znorm.clamp_min(1e-30), torch.zeros_like(znorm))
    lr_g = s["lr_zz"] / s["zz"].clamp_min(1e-30)
    zeroed = live & ((1 - lr_g * coef) <= 0)
    inner = torch.where(zeroed, torch.zeros_like(znorm), s["T1"] - coef * s["T2"])
    cross = live & ((inner < epsilon * xx) | zeroed)
    depth = torch.where(cross, inner / xx.clamp_min(1e-30), torch.full_like(inner, math.inf))
    return coef, cross, depth


def deepest(cross: torch.Tensor, depth: torch.Tensor, room: int) -> torch.Tensor:
    """At most ``room`` of the groups in ``cross``: the deepest crossings (stable order)."""
    room = max(int(room), 0)
    if int(cross.sum()) <= room:
        return cross
    capped = torch.zeros_like(cross)
    order = torch.sort(torch.where(cross, depth, torch.full_like(depth, math.inf)), stable=True).indices
    capped[order[:room]] = True
    return capped
