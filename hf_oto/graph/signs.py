"""Which traced tensors are provably non-negative or strictly positive, whatever the weights.

A zeroed structure that reaches ``rsqrt``, ``reciprocal``, ``log`` or a division would turn into
inf or nan, so those ops normally make it unprunable. The usual argument of such an op in a norm is
a statistic plus a positive epsilon (``rsqrt(mean(x**2) + eps)``): bounded away from zero for any
``x``, zero included, so the op is finite and ``x * rsqrt(...)`` stays exactly zero where ``x`` is.
The facts below are derived from the ops alone (never from traced values, which training changes).
"""

from __future__ import annotations

import numbers
from typing import Any

import torch

NONNEG = 1
POSITIVE = 2

# Outputs that are >= 0 for any input (exp and sigmoid can underflow to 0: not positive).
_NONNEG_ANY = {"abs", "square", "exp", "exp2", "sigmoid", "relu", "relu6", "_softmax", "softmax",
               "_safe_softmax", "var", "std", "var_mean", "std_mean", "linalg_vector_norm", "norm",
               "cosh", "hardsigmoid"}
# Outputs with the sign of their first input: moves, copies, casts and order-free reductions.
_KEEP = {"_to_copy", "to", "clone", "contiguous", "view", "_unsafe_view", "reshape", "_reshape_alias",
         "expand", "permute", "transpose", "t", "unsqueeze", "squeeze", "detach", "alias", "lift_fresh",
         "slice", "select", "narrow", "index_select", "repeat", "flip", "expand_copy", "view_copy",
         "sum", "mean", "nansum", "nanmean", "amax", "amin", "sqrt",
         "repeat_interleave"}


def _sign_of_operand(x: Any, lookup) -> int:
    if isinstance(x, bool) or x is None:
        return 0
    if isinstance(x, numbers.Real):
        return POSITIVE if x > 0 else NONNEG if x == 0 else 0
    if isinstance(x, torch.Tensor):
        return lookup(x)
    return 0


def sign_of(func: Any, args: tuple, kwargs: dict, lookup) -> int:
    """NONNEG, POSITIVE or 0 (unknown) for the output of ``func`` given its operands' signs.

    ``lookup(tensor)`` gives the sign recorded for an earlier output.
    """
    name = func.overloadpacket.__name__.rstrip("_")
    if not args:
        return 0
    first = _sign_of_operand(args[0], lookup)
    if name in _NONNEG_ANY:
        return POSITIVE if name in ("exp", "exp2", "cosh") and first == POSITIVE else NONNEG
    if name in _KEEP:
        return first
    if name in ("rsqrt", "reciprocal"):
        return POSITIVE if first == POSITIVE else 0
    if name == "pow" and len(args) > 1:
        exponent = args[1]
        if isinstance(exponent, numbers.Real) and not isinstance(exponent, bool):
            if first == POSITIVE:
                return POSITIVE
            if float(exponent).is_integer() and int(exponent) % 2 == 0 and exponent > 0:
                return NONNEG
            if first == NONNEG and exponent > 0:
                return NONNEG
        return 0
    second = _sign_of_operand(args[1], lookup) if len(args) > 1 else 0
    if name == "mul":
        if len(args) > 1 and args[0] is args[1]:
            return NONNEG
        return min(first, second)
    if name == "add":
        alpha = args[2] if len(args) > 2 else kwargs.get("alpha", 1)
        if not (isinstance(alpha, numbers.Real) and alpha > 0) or not (first and second):
            return 0
        return max(first, second)
    if name == "div":
        return first if second == POSITIVE else 0
    if name in ("clamp", "clamp_min"):
        low = args[1] if len(args) > 1 else kwargs.get("min")
        low_sign = _sign_of_operand(low, lookup)
        return max(first, low_sign)
    return 0
