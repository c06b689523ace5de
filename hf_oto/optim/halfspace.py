"""The half-space test of HSPG and DHSPG, on per-group statistics (vectors over groups).

A non-zero group x_g takes the published subgradient trial step
``y_g = x_g - lr*d_g - lr*lambda_g*x_g/||x_g||`` (d: the base optimizer's direction) and is
projected to exactly zero when the trial point leaves the half-space around x_g,
``<y_g, x_g> < epsilon * ||x_g||^2``. The penalty moves the trial point along -x_g, lowering
``<y_g, x_g>`` by ``lr*lambda_g*||x_g||``.

hf_oto used a proximal trial step before, ``y_g = z_g * max(0, 1 - lr*lambda_g/||z_g||)`` with
``z = x - lr*d``. It only rescales z, so lambda alone never makes ``<y_g, x_g>`` negative; yet on
pretrained MiniLM with AdamW (``bench/halfspace_evidence.py``, docs/optimizers.md) it projected
*more* groups through the test than the subgradient step, at the same quality: with Adam's noisy
direction z has a large component orthogonal to x, the proximal step shrinks the norm by exactly
``lr*lambda`` per step and the subgradient step by about ``lr*lambda*cos(z, x)``, so groups reach
the boundary later. With HSPG's upper bounds the proximal step also zeroed groups past the bound
(its operator zeroes a group outright, bound or not). It did not measure better, so it was
removed; the subgradient step is the authors'.
"""

from __future__ import annotations

import math

import torch

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


def deepest(cross: torch.Tensor, depth: torch.Tensor, room: int) -> torch.Tensor:
    """At most ``room`` of the groups in ``cross``: the deepest crossings (stable order)."""
    room = max(int(room), 0)
    if int(cross.sum()) <= room:
        return cross
    capped = torch.zeros_like(cross)
    order = torch.sort(torch.where(cross, depth, torch.full_like(depth, math.inf)), stable=True).indices
    capped[order[:room]] = True
    return capped
