"""Where the integers in a model's code come from: module attributes and arithmetic on them.

During the trace every integer attribute of every module is replaced by a :class:`TracedInt`, an
``int`` that remembers the expression it came from (``self.num_heads // self.num_kv_heads + 2``).
A size written in the code then tells the analysis which attributes it depends on, instead of a
guess by value: the attribute to update when the dimension shrinks, and the sizes that must not
change when another attribute is updated.

Sizes read from tensors (``x.shape``, ``x.size(d)``) are traced too, as ``("size", k, value)``
where ``k`` numbers the labels of the dimension read: such a term follows the dimension when it
shrinks, so ``num_kv_heads * self.num_key_value_groups`` with the first factor read from a tensor
needs no attribute updated.

Integers of a model's config (``self.config.num_attention_heads``) are traced as
``("config", name, value)``: every layer shares the config, so such a size cannot follow the heads
kept in one layer, and the reason says so.

An expression is a tuple: ``("attr", (module_path, name))``, ``("const", value)``,
``("size", k, value)``, ``("config", name, value)``, or ``(op, left, right)`` /
``("neg", operand)`` with ``op`` one of ``+ - * // %``.
"""

from __future__ import annotations

import operator
from typing import Any, Callable, Iterator

import torch

Expr = tuple
AttrKey = tuple[str, str]

_OPS: dict[str, Callable[[int, int], int]] = {
    "+": operator.add, "-": operator.sub, "*": operator.mul, "//": operator.floordiv, "%": operator.mod,
}


class TracedInt(int):
    """An ``int`` that remembers the expression over module attributes that produced it."""

    expr: Expr

    def __new__(cls, value: int, expr: Expr) -> "TracedInt":
        obj = super().__new__(cls, value)
        obj.expr = expr
        return obj

    def __neg__(self):
        return TracedInt(-int(self), ("neg", self.expr))

    def __reduce__(self):  # copies and pickles are plain ints
        return (int, (int(self),))


def _binary(op: str, reflected: bool):
    fn = _OPS[op]

    def method(self, other):
        if isinstance(other, bool) or not isinstance(other, int):
            return fn(other, int(self)) if reflected else fn(int(self), other)
        left, right = (other, self) if reflected else (self, other)
        return TracedInt(fn(int(left), int(right)), (op, expr_of(left), expr_of(right)))

    return method


for _op, _name in (("+", "add"), ("-", "sub"), ("*", "mul"), ("//", "floordiv"), ("%", "mod")):
    setattr(TracedInt, f"__{_name}__", _binary(_op, False))
    setattr(TracedInt, f"__r{_name}__", _binary(_op, True))


def expr_of(x: int) -> Expr:
    return x.expr if isinstance(x, TracedInt) else ("const", int(x))


def depends_on(expr: Expr | None) -> set[AttrKey]:
    """The attributes an expression reads."""
    if expr is None:
        return set()
    kind = expr[0]
    if kind == "attr":
        return {expr[1]}
    if kind in ("const", "size", "config"):
        return set()
    out: set[AttrKey] = set()
    for part in expr[1:]:
        out |= depends_on(part)
    return out


def _leaves(expr: Expr | None, kind: str) -> set:
    if expr is None or expr[0] in ("attr", "const", "size", "config"):
        return {expr[1]} if expr is not None and expr[0] == kind else set()
    out: set = set()
    for part in expr[1:]:
        out |= _leaves(part, kind)
    return out


def sizes_in(expr: Expr | None) -> set[int]:
    """The tensor sizes (ids of their labels) an expression reads."""
    return _leaves(expr, "size")


def configs_in(expr: Expr | None) -> set[str]:
    """The config fields an expression reads."""
    return _leaves(expr, "config")


def evaluate(expr: Expr, env: dict[AttrKey, int], sizes: dict[int, int] | None = None) -> int | None:
    """The expression's value with attribute values from ``env`` and tensor sizes from ``sizes``
    (their traced values where missing); None if it divides by zero."""
    kind = expr[0]
    if kind == "attr":
        return env[expr[1]]
    if kind == "const":
        return expr[1]
    if kind == "size":
        return expr[2] if sizes is None else sizes.get(expr[1], expr[2])
    if kind == "config":
        return expr[2]
    if kind == "neg":
        inner = evaluate(expr[1], env, sizes)
        return None if inner is None else -inner
    left, right = evaluate(expr[1], env, sizes), evaluate(expr[2], env, sizes)
    if left is None or right is None or (kind in ("//", "%") and right == 0):
        return None
    return _OPS[kind](left, right)


class AttributeTracing:
    """Context manager: integer attributes of modules and of their configs become TracedInts,
    restored as plain ints after (an attribute reassigned during the forward keeps its new value).
    """

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self.values: dict[AttrKey, int] = {}
        self._wrapped: list[tuple[dict, str]] = []

    def __enter__(self) -> "AttributeTracing":
        configs: dict[int, Any] = {}
        for path, module in self.model.named_modules():
            state = module.__dict__
            for name, value in list(state.items()):
                if type(value) is int and not name.startswith("_"):
                    key = (path, name)
                    self.values[key] = value
                    self._wrap(state, name, ("attr", key))
            config = state.get("config")
            if config is not None and type(config).__name__.endswith("Config") and hasattr(config, "to_dict"):
                configs.setdefault(id(config), config)
        for config in configs.values():
            state = config.__dict__
            for name, value in list(state.items()):
                if type(value) is int and not name.startswith("_"):
                    self._wrap(state, name, ("config", name, value))
        return self

    def _wrap(self, state: dict, name: str, expr: Expr) -> None:
        state[name] = TracedInt(state[name], expr)
        self._wrapped.append((state, name))

    def __exit__(self, *exc: Any) -> None:
        for state, name in self._wrapped:
            value = state.get(name)
            if isinstance(value, TracedInt):
                state[name] = int(value)


def collect_ints(args: Any) -> Iterator[tuple[int, Expr | None]]:
    """Every integer in a call's arguments, in order, with its expression when it has one."""
    if isinstance(args, bool):
        return
    if isinstance(args, int):
        yield int(args), getattr(args, "expr", None)
    elif isinstance(args, slice):
        for part in (args.start, args.stop, args.step):
            yield from collect_ints(part)
    elif isinstance(args, (tuple, list)):
        for a in args:
            yield from collect_ints(a)
    elif isinstance(args, dict):
        for a in args.values():
            yield from collect_ints(a)
