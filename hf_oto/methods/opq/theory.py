"""Closed-form errors of magnitude pruning and uniform quantization under a fitted weight law.

Everything here works in *normalized units*: a layer's weight ``w`` in output channel ``c`` is
``u = w / s_c`` with ``s_c`` the channel's fitted scale, and ``u`` follows a standard law:

* ``"laplace"``: density ``exp(-|u|) / 2`` (scale = mean |w|, the zero-mean maximum-likelihood
  estimate), so ``|u| ~ Exp(1)``;
* ``"gaussian"``: density ``phi(u)`` (scale = root mean square of w), so ``|u|`` is half-normal.

The layer's compressor (see :mod:`hf_oto.methods.opq.allocation`) prunes ``|u| < t`` and quantizes
each kept weight with a sign bit and a uniform magnitude quantizer of ``M = 2**(bits-1)`` levels
that starts at the threshold: bin ``j`` covers ``[t + j*step, t + (j+1)*step)`` and maps to its
centre ``t + (j + 1/2)*step``, the last bin extends to infinity (clipping). Starting at ``t``
wastes no level on the pruned dead zone.

Derived here (each is a finite sum of elementary functions, evaluated in float64):

* kept fraction ``k(t) = P(|u| >= t)``: ``exp(-t)`` (Laplace), ``erfc(t / sqrt 2)`` (Gaussian);
* pruning error per weight ``D_p(t) = E[u^2 ; |u| < t]``: ``2 - (t^2 + 2t + 2) exp(-t)`` (Laplace),
  ``erf(t / sqrt 2) - 2 t phi(t)`` (Gaussian);
* quantization error per weight ``D_q = sum_j int_bin_j (x - c_j)^2 g(x) dx`` with ``g`` the density
  of ``|u|`` and the primitives (zero at infinity)
  ``-((x-c)^2 + 2(x-c) + 2) exp(-x)`` (Laplace) and ``-(1+c^2) erfc(x/sqrt 2) - 2(x-2c) phi(x)``
  (Gaussian). These are exact expectations, not the high-resolution ``step^2/12`` approximation
  (which they approach for many levels), so they hold at 1 or 2 bits too;
* the best step for ``(bits, t)``: the minimiser of ``D_q`` (golden-section search on log step,
  done once per law and bit width, independent of any model). Because ``Exp(1)`` is memoryless,
  for the Laplace law the excess ``|u| - t`` of a kept weight is ``Exp(1)`` whatever ``t``: the
  best step and the error per *kept* weight ``q(bits)`` do not depend on ``t``.
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch

FAMILIES = ("laplace", "gaussian")
_SQRT2 = math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
#: Largest threshold tabulated for the Gaussian law (kept fraction 2e-4 at 3.7).
GAUSSIAN_T_MAX = 3.7
_GAUSSIAN_T_STEP = 0.005


def _check_family(family: str) -> None:
    if family not in FAMILIES:
        raise ValueError(f"unknown distribution {family!r}; choose from {FAMILIES}")


def _f64(x) -> torch.Tensor:
    return torch.as_tensor(x, dtype=torch.float64)


def _phi(x: torch.Tensor) -> torch.Tensor:
    return torch.exp(-0.5 * x * x) * _INV_SQRT_2PI


def kept_fraction(family: str, t) -> torch.Tensor:
    """``P(|u| >= t)``: the fraction of weights magnitude pruning at ``t`` keeps.

    Example:
        >>> float(kept_fraction("laplace", 0.0))
        1.0
    """
    _check_family(family)
    t = _f64(t)
    return torch.exp(-t) if family == "laplace" else torch.special.erfc(t / _SQRT2)


def magnitude_density(family: str, t) -> torch.Tensor:
    """Density of ``|u|`` at ``t``."""
    _check_family(family)
    t = _f64(t)
    return torch.exp(-t) if family == "laplace" else 2.0 * _phi(t)


def threshold_for_ratio(family: str, ratio) -> torch.Tensor:
    """The threshold ``t`` that prunes the fraction ``ratio`` of the weights (inverse of ``1 - k``)."""
    _check_family(family)
    r = _f64(ratio)
    return -torch.log1p(-r) if family == "laplace" else _SQRT2 * torch.special.erfinv(r)


def outlier_threshold(family: str, numel: int) -> float:
    """The magnitude ``|u|`` that ``numel`` weights drawn from the law exceed once on average
    (``P(|u| > x) = 1 / numel``): ``ln(numel)`` (Laplace), ``sqrt 2 * erfinv(1 - 1/numel)``
    (Gaussian). Real weights beyond it are outliers the law does not describe.

    Example:
        >>> round(outlier_threshold("laplace", 1000), 3)
        6.908
    """
    _check_family(family)
    n = max(int(numel), 2)
    if family == "laplace":
        return math.log(n)
    return float(_SQRT2 * torch.special.erfinv(_f64(1.0 - 1.0 / n)))


def pruning_error(family: str, t) -> torch.Tensor:
    """``E[u^2 ; |u| < t]``: mean squared error per weight of zeroing every ``|u| < t``.

    Example:
        >>> round(float(pruning_error("gaussian", float("inf"))), 6)   # the whole variance
        1.0
    """
    _check_family(family)
    t = _f64(t)
    if family == "laplace":
        tail = torch.where(torch.isinf(t), torch.zeros_like(t), (t * t + 2 * t + 2) * torch.exp(-t))
        return 2.0 - tail
    tail = torch.where(torch.isinf(t), torch.zeros_like(t), 2.0 * t * _phi(t))
    return torch.special.erf(t / _SQRT2) - tail


def _bin_integral(family: str, lo: torch.Tensor, hi: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """``int_lo^hi (x - c)^2 g(x) dx`` for the density ``g`` of ``|u|`` (``hi`` may be inf)."""
    finite = ~torch.isinf(hi)
    hi_f = torch.where(finite, hi, lo)
    if family == "laplace":
        # Factor exp(-lo) out so narrow bins far in the tail keep their precision.
        def h(y):
            return y * y + 2 * y + 2
        upper = torch.where(finite, h(hi_f - c) * torch.exp(-(hi_f - lo)), torch.zeros_like(lo))
        return torch.exp(-lo) * (h(lo - c) - upper)

    def prim(x):
        return -(1 + c * c) * torch.special.erfc(x / _SQRT2) - 2 * (x - 2 * c) * _phi(x)
    upper = torch.where(finite, prim(hi_f), torch.zeros_like(lo))
    return upper - prim(lo)


def quantization_error(family: str, t, step, bits: int) -> torch.Tensor:
    """Mean squared error per weight (pruned ones count as zero error) of quantizing the kept
    weights ``|u| >= t`` with a sign bit and ``2**(bits-1)`` magnitude levels of width ``step``
    starting at ``t`` (see the module doc). ``t`` and ``step`` broadcast.

    Example:
        >>> e = quantization_error("laplace", 0.0, 0.05, 12)  # fine steps, no clipping: step^2 / 12
        >>> abs(float(e) / (0.05 ** 2 / 12) - 1) < 0.001
        True
        >>> float(quantization_error("laplace", 0.0, 0.05, 8)) > 10 * 0.05 ** 2 / 12   # clipped at 6.4
        True
    """
    _check_family(family)
    if not 1 <= int(bits) <= 16:
        raise ValueError(f"bits must be in [1, 16], got {bits}")
    t, step = torch.broadcast_tensors(_f64(t), _f64(step))
    levels = 2 ** (int(bits) - 1)
    j = torch.arange(levels, dtype=torch.float64)
    t_, s_ = t[..., None], step[..., None]
    lo = t_ + j * s_
    hi = torch.where(j == levels - 1, torch.full_like(lo, math.inf), t_ + (j + 1) * s_)
    centre = t_ + (j + 0.5) * s_
    return _bin_integral(family, lo, hi, centre).sum(-1)


def _golden_minimise(fn, lo: torch.Tensor, hi: torch.Tensor, iters: int = 60) -> torch.Tensor:
    """Vectorised golden-section search of ``fn`` on ``[lo, hi]`` (each entry independently)."""
    ratio = (math.sqrt(5.0) - 1.0) / 2.0
    a, b = lo.clone(), hi.clone()
    c, d = b - ratio * (b - a), a + ratio * (b - a)
    fc, fd = fn(c), fn(d)
    for _ in range(iters):
        left = fc < fd
        b = torch.where(left, d, b)
        a = torch.where(left, a, c)
        c_new, d_new = b - ratio * (b - a), a + ratio * (b - a)
        # Reuse the surviving interior point; evaluate the new one.
        c, d = torch.where(left, c_new, d), torch.where(left, c, d_new)
        fc_keep, fd_keep = fc, fd
        f_new = fn(torch.where(left, c, d))
        fc = torch.where(left, f_new, fd_keep)
        fd = torch.where(left, fc_keep, f_new)
    return (a + b) / 2


def _optimal_log_step(family: str, t: torch.Tensor, bits: int) -> torch.Tensor:
    lo = torch.full_like(t, math.log(1e-4))
    hi = torch.full_like(t, math.log(20.0))
    return _golden_minimise(lambda ls: quantization_error(family, t, torch.exp(ls), bits), lo, hi)


@lru_cache(maxsize=None)
def _laplace_step(bits: int) -> float:
    return float(torch.exp(_optimal_log_step("laplace", _f64([0.0]), bits))[0])


@lru_cache(maxsize=None)
def _gaussian_table(bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Best step and error per kept weight on the grid ``t = 0, 0.005, ..., GAUSSIAN_T_MAX``.

    The best step varies slowly with ``t``: it is searched on a grid ten times coarser and
    interpolated; the error, flat in the step at its minimum, is then exact to second order.
    """
    grid = torch.arange(0.0, GAUSSIAN_T_MAX + 1e-9, _GAUSSIAN_T_STEP, dtype=torch.float64)
    coarse = grid[::10].contiguous()
    if coarse[-1] < grid[-1]:
        coarse = torch.cat([coarse, grid[-1:]])
    log_step = _optimal_log_step("gaussian", coarse, bits)
    pos = torch.searchsorted(coarse, grid).clamp(1, coarse.numel() - 1)
    frac = (grid - coarse[pos - 1]) / (coarse[pos] - coarse[pos - 1])
    step = torch.exp(log_step[pos - 1] * (1 - frac) + log_step[pos] * frac)
    per_kept = quantization_error("gaussian", grid, step, bits) / kept_fraction("gaussian", grid)
    return step, per_kept


def _interp(table: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    pos = (t.clamp(0.0, GAUSSIAN_T_MAX) / _GAUSSIAN_T_STEP)
    i = pos.floor().long().clamp(max=table.numel() - 2)
    frac = pos - i
    return table[i] * (1 - frac) + table[i + 1] * frac


def optimal_step(family: str, bits: int, t=0.0) -> torch.Tensor:
    """The step minimising :func:`quantization_error` for ``bits`` and threshold ``t``.

    For the Laplace law it does not depend on ``t`` (memoryless excess); for the Gaussian law it
    is read from a table over ``t`` (spacing 0.005, linear interpolation).

    Example:
        >>> round(float(optimal_step("laplace", 1)), 4)   # one level at the mean excess, 1
        2.0
    """
    _check_family(family)
    t = _f64(t)
    if family == "laplace":
        return torch.full_like(t, _laplace_step(int(bits)))
    return _interp(_gaussian_table(int(bits))[0], t)


def kept_error(family: str, bits: int, t=0.0) -> torch.Tensor:
    """``q(bits, t)``: quantization error per *kept* weight with the best step (normalized units)."""
    _check_family(family)
    t = _f64(t)
    if family == "laplace":
        step = _laplace_step(int(bits))
        q = float(quantization_error("laplace", 0.0, step, int(bits)))
        return torch.full_like(t, q)
    return _interp(_gaussian_table(int(bits))[1], t)


@lru_cache(maxsize=None)
def _gaussian_stationarity(bits: int) -> torch.Tensor:
    """``h(t) = t^2 - q + (k / g) dq/dt`` on the Gaussian grid, made non-decreasing."""
    _, q = _gaussian_table(bits)
    grid = torch.arange(q.numel(), dtype=torch.float64) * _GAUSSIAN_T_STEP
    dq = torch.empty_like(q)
    dq[1:-1] = (q[2:] - q[:-2]) / (2 * _GAUSSIAN_T_STEP)
    dq[0] = (q[1] - q[0]) / _GAUSSIAN_T_STEP
    dq[-1] = (q[-1] - q[-2]) / _GAUSSIAN_T_STEP
    h = grid * grid - q + kept_fraction("gaussian", grid) / magnitude_density("gaussian", grid) * dq
    return torch.cummax(h, 0).values


def stationary_threshold(family: str, bits: int, rhs) -> torch.Tensor:
    """The threshold ``t`` solving the pruning stationarity condition ``h(t) = rhs``.

    Minimising ``D_p(t) + k(t) q(bits, t) + mu * k(t) * bits`` over ``t`` (error plus multiplier
    times bits of the kept weights) gives, with ``g = -dk/dt``,
    ``t^2 - q(bits, t) + (k / g) dq/dt = mu * bits``: a weight at the threshold is worth keeping
    exactly when its pruning error ``t^2`` equals the quantization error it would have plus the
    price of its bits. For the Laplace law ``dq/dt = 0``, hence the closed form
    ``t = sqrt(q(bits) + mu * bits)``; for the Gaussian law ``h`` is tabulated and inverted by
    interpolation. ``rhs = mu * bits`` broadcasts.
    """
    _check_family(family)
    rhs = _f64(rhs)
    if family == "laplace":
        return torch.sqrt(kept_error("laplace", bits) + rhs.clamp(min=0))
    h = _gaussian_stationarity(int(bits))
    idx = torch.searchsorted(h, rhs.contiguous()).clamp(1, h.numel() - 1)
    h0, h1 = h[idx - 1], h[idx]
    frac = torch.where(h1 > h0, (rhs - h0) / (h1 - h0), torch.zeros_like(rhs)).clamp(0, 1)
    t = (idx - 1 + frac) * _GAUSSIAN_T_STEP
    return torch.where(rhs <= h[0], torch.zeros_like(t), t)
