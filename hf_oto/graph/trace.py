"""Run one eager forward pass and propagate atom labels through every ATen op.

Why a dispatch mode rather than torch.fx or torch.export: the model runs exactly as it does in
training (data-dependent branches, caches, Transformers' attention dispatch), the op set is the
small canonical ATen set, and it costs one forward pass on the example inputs.

A :class:`torch.overrides.TorchFunctionMode` runs alongside to tell apart sizes written in the
model's code (``x.view(b, s, self.num_heads, d)``) from sizes a library function derived from its
input (``torch.flatten``): only the former need a module attribute updated when the dimension
shrinks.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from .atoms import MIXED, UNPRUNABLE, AtomTable
from .entries import EntryRecord, EntryTracker
from .provenance import AttributeTracing, Expr, TracedInt, collect_ints, depends_on, sizes_in
from .signs import sign_of

# Torch functions whose integer arguments come from the model's own code. Inside any other torch
# function (F.linear, torch.flatten, F.scaled_dot_product_attention, ...) sizes are derived.
_EXPLICIT_SHAPE_FUNCTIONS = {
    torch.Tensor.view,
    torch.Tensor.reshape,
    torch.reshape,
    torch.Tensor.expand,
    torch.Tensor.split,
    torch.split,
    torch.Tensor.split_with_sizes,
    torch.Tensor.__getitem__,
    torch.Tensor.narrow,
    torch.narrow,
    torch.Tensor.unflatten,
    torch.unflatten,
    torch.Tensor.new_zeros,
    torch.Tensor.new_ones,
    torch.Tensor.new_empty,
    torch.Tensor.new_full,
    torch.Tensor.repeat,
    torch.Tensor.__setitem__,
    torch.zeros,
    torch.ones,
    torch.full,
    torch.empty,
    torch.rand,
    torch.randn,
}

# ATen factories: a tensor made with literal sizes can shrink with what it meets, if an attribute
# holds the size.
_FACTORIES = {"zeros", "ones", "full", "empty", "rand", "randn", "new_zeros", "new_ones",
              "new_full", "new_empty"}

_SIZE_READERS = {torch.Tensor.size, torch.Tensor.shape.__get__}


@dataclass
class SizeSite:
    """An integer in the model's code that must change when a prunable dimension shrinks.

    ``labels`` are the atoms whose kept count gives the new value (positions labelled -1 always
    stay). ``sign`` is -1 for slice bounds written as negative offsets.
    """

    module: str
    op: str
    value: int
    labels: np.ndarray
    sign: int = 1
    units: bool = False  # the dimension counts whole units (heads) made by a reshape
    expr: Expr | None = None  # how the code computed the value from module attributes, if it did


@dataclass
class FixedSize:
    """A size the code computes from module attributes for a dimension that never shrinks (the
    width inside a head, the number of query heads per key/value head): it must keep its value
    when an attribute it reads is updated."""

    module: str
    op: str
    value: int
    expr: Expr
    labels: np.ndarray | None = None  # a broadcast dimension: fixed unless it meets a structure


@dataclass
class EqualShrink:
    """Label arrays that must keep the same number of positions (chunks of one ``split``)."""

    parts: list[np.ndarray]
    module: str
    op: str


@dataclass
class NormSite:
    """An op that computes statistics over a prunable dimension (LayerNorm, RMSNorm, softmax)."""

    module: str
    labels: np.ndarray


@dataclass
class TraceResult:
    atoms: AtomTable
    tensor_names: dict[str, list[str]]  # canonical name -> every name (tied weights)
    tensor_is_param: dict[str, bool]
    tensor_atoms: dict[str, list[np.ndarray | None]]
    used: set[str]
    sites: list[SizeSite]
    equal_shrink: list[EqualShrink]
    unsupported: list[str]
    output_labels: list[np.ndarray]
    modules: dict[str, torch.nn.Module] = field(default_factory=dict)
    norm_sites: list[NormSite] = field(default_factory=list)
    module_inputs: dict[str, list[np.ndarray | None]] = field(default_factory=dict)  # first call's first input
    module_outputs: dict[str, list[np.ndarray | None]] = field(default_factory=dict)  # and its first output
    fixed_sizes: list[FixedSize] = field(default_factory=list)
    size_labels: list[np.ndarray] = field(default_factory=list)  # labels of each ("size", k) term
    entries: list[EntryRecord] = field(default_factory=list)  # arguments given fresh atoms on entry
    attribute_values: dict[tuple[str, str], int] = field(default_factory=dict)  # integer attributes


class OpContext:
    """What an op rule sees: the labels of tensors and the tools to union, flag and record."""

    def __init__(self, tracer: "ChannelTracer", func: Any) -> None:
        self.tracer = tracer
        self.func = func
        self.atoms = tracer.atoms
        self.module = tracer.module_stack[-1]

    @property
    def where(self) -> str:
        return f"{self.func} in module '{self.module or '<root>'}'"

    def lab(self, t: Any) -> list[np.ndarray | None]:
        if not isinstance(t, torch.Tensor):
            return []
        entry = self.tracer.labels.get(id(t))
        if entry is None:
            return [None] * t.dim()
        return entry[1]

    def has(self, t: Any) -> bool:
        return isinstance(t, torch.Tensor) and any(x is not None for x in self.lab(t))

    def unprunable(self, atoms: np.ndarray | None, reason: str) -> None:
        if atoms is not None:
            self.atoms.flag(atoms, UNPRUNABLE, f"{reason} ({self.where})")

    def mark(self, atoms: np.ndarray | None, kind: str, reason: str = "") -> None:
        if atoms is not None:
            self.atoms.flag(atoms, kind, f"{reason} ({self.where})" if reason else "")

    def mixed(self, atoms: np.ndarray | None, reason: str) -> None:
        """Statistics over a prunable dimension: removing positions changes them, unless the
        module computing them can be padded back to full width (see the norm paddings)."""
        if atoms is not None:
            self.mark(atoms, MIXED, reason)
            self.tracer.norm_sites.append(NormSite(self.module, atoms))

    def merge(self, arrays: list[np.ndarray | None], what: str) -> np.ndarray | None:
        """Union dimensions that must shrink together; ``None`` is a partner that cannot shrink."""
        labeled = [a for a in arrays if a is not None]
        if not labeled:
            return None
        out = labeled[0].copy()
        for a in labeled[1:]:
            self.atoms.union(out, a)
            out = np.where(out >= 0, out, a)
        if len(labeled) < len(arrays):
            self.unprunable(out, f"{what} with a dimension that cannot shrink (a model input or a "
                                 "tensor built with a fixed size)")
        else:
            for a in labeled:
                bad = (a < 0) & (out >= 0)
                if bad.any():
                    self.unprunable(out[bad], f"{what} with positions that cannot shrink")
        return out

    def expr_for(self, value: int, position: int | None = None, length: int | None = None) -> Expr | None:
        """The expression over module attributes that an integer argument of the current call came
        from: by position when the call's integers line up with the op's size list, else by value
        (None when several integers of that value came from different places)."""
        ints = self.tracer.call_ints
        if position is not None and len(ints) == length and ints[position][0] == value:
            return ints[position][1]
        exprs = {e for v, e in ints if v == value}
        return exprs.pop() if len(exprs) == 1 else None

    def site(self, value: int, labels: np.ndarray, what: str, sign: int = 1, units: bool = False,
             position: int | None = None, length: int | None = None) -> None:
        """Record a literal size for a labelled dimension, unless it came from the tensor itself."""
        if not self.tracer.explicit_sizes or value == -1:
            return
        if (labels >= 0).sum() == 0:
            return
        expr = self.expr_for(int(value), position, length)
        if expr is None:
            for seen in self.tracer.size_reads.get(int(value), ()):  # read via x.size()/x.shape
                if seen.shape == labels.shape and np.array_equal(seen, labels):
                    return
        self.tracer.sites.append(SizeSite(self.module, f"{what} ({self.func})", int(value), labels, sign, units,
                                          expr))

    def fixed(self, value: int, what: str, position: int | None = None, length: int | None = None,
              labels: np.ndarray | None = None, attributes_only: bool = False) -> None:
        """Record a size computed from module attributes for a dimension that cannot shrink (or,
        given its broadcast ``labels``, that shrinks only if it meets a structure). With
        ``attributes_only``, a size read off tensors is taken to follow them."""
        if not self.tracer.explicit_sizes or value == -1:
            return
        expr = self.expr_for(int(value), position, length)
        if sizes_in(expr) and attributes_only:
            return
        if depends_on(expr) or sizes_in(expr):
            self.tracer.fixed_sizes.append(FixedSize(self.module, f"{what} ({self.func})", int(value), expr, labels))

    def equal_shrink(self, parts: list[np.ndarray]) -> None:
        if len(parts) > 1:
            self.tracer.equal_shrink.append(EqualShrink(parts, self.module, str(self.func)))


Rule = Callable[[OpContext, tuple, dict, Any], Any]


class _FunctionLevel(TorchFunctionMode):
    def __init__(self, tracer: "ChannelTracer") -> None:
        super().__init__()
        self.tracer = tracer

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tracer = self.tracer
        if func in _SIZE_READERS:
            out = func(*args, **kwargs)
            return tracer.note_size_read(args[0], out, args[1:] + tuple(kwargs.values()))
        previous, previous_ints = tracer.explicit_sizes, tracer.call_ints
        tracer.explicit_sizes = func in _EXPLICIT_SHAPE_FUNCTIONS
        tracer.call_ints = list(collect_ints((args, kwargs))) if tracer.explicit_sizes else []
        try:
            return func(*args, **kwargs)
        finally:
            tracer.explicit_sizes, tracer.call_ints = previous, previous_ints


class _DispatchLevel(TorchDispatchMode):
    def __init__(self, tracer: "ChannelTracer") -> None:
        super().__init__()
        self.tracer = tracer

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        self.tracer.record(func, args, kwargs, out)
        return out


class ChannelTracer:
    """Labels every dimension of every tensor computed in one forward pass of ``model``."""

    def __init__(self, model: torch.nn.Module, rules: dict[Any, Rule], fallback: Rule) -> None:
        self.model = model
        self.rules = rules
        self.fallback = fallback
        self.atoms = AtomTable()
        self.labels: dict[int, tuple[torch.Tensor, list[np.ndarray | None]]] = {}
        self.module_stack: list[str] = [""]
        self.explicit_sizes = False
        self.call_ints: list[tuple[int, Expr | None]] = []  # integers of the current explicit call
        self.fixed_sizes: list[FixedSize] = []
        self.size_labels: list[np.ndarray] = []  # labels of every size read, by term id
        self.size_reads: dict[int, list[np.ndarray]] = {}
        self.sites: list[SizeSite] = []
        self.equal_shrink: list[EqualShrink] = []
        self.unsupported: list[str] = []
        self.norm_sites: list[NormSite] = []
        self.module_inputs: dict[str, list[np.ndarray | None]] = {}
        self.module_outputs: dict[str, list[np.ndarray | None]] = {}
        self.used: set[str] = set()
        # Labelled outputs known to be >= 0 or > 0 (see signs.py); the tensor is kept so its id stays.
        self.signs: dict[int, tuple[torch.Tensor, int]] = {}
        self.tensor_names: dict[str, list[str]] = {}
        self.tensor_is_param: dict[str, bool] = {}
        self.tensor_atoms: dict[str, list[np.ndarray | None]] = {}
        self._name_of: dict[int, str] = {}
        self._register_tensors()

    # -- setup -------------------------------------------------------------------------------
    def _register_tensors(self) -> None:
        named: list[tuple[str, torch.Tensor, bool]] = [
            (n, p, True) for n, p in self.model.named_parameters(remove_duplicate=False)
        ]
        named += [(n, b, False) for n, b in self.model.named_buffers(remove_duplicate=False)]
        for name, tensor, is_param in named:
            key = id(tensor)
            if key in self._name_of:
                self.tensor_names[self._name_of[key]].append(name)
                continue
            if not (tensor.is_floating_point() or tensor.is_complex()):
                continue
            self._name_of[key] = name
            self.tensor_names[name] = [name]
            self.tensor_is_param[name] = is_param
            labels = [
                self.atoms.allocate(name, is_param, d, s) if s > 1 else None
                for d, s in enumerate(tensor.shape)
            ]
            self.tensor_atoms[name] = labels
            self.labels[key] = (tensor, labels)

    # -- hooks -------------------------------------------------------------------------------
    def note_size_read(self, tensor: Any, out: Any, extra: tuple) -> Any:
        """Remember sizes read from labelled dimensions; return them as TracedInts."""
        entry = self.labels.get(id(tensor)) if isinstance(tensor, torch.Tensor) else None
        if entry is None:
            return out
        labels = entry[1]
        if isinstance(out, int):
            d = extra[0] % tensor.dim() if extra else None
            return out if d is None else self._size_term(int(out), labels[d])
        if not isinstance(out, torch.Size) or len(out) != len(labels):
            return out
        return torch.Size([self._size_term(int(n), lab) for n, lab in zip(out, labels)])

    def _size_term(self, value: int, labels: np.ndarray | None) -> int:
        if labels is None:
            return value
        self.size_reads.setdefault(value, []).append(labels)
        self.size_labels.append(labels)
        return TracedInt(value, ("size", len(self.size_labels) - 1, value))

    def record(self, func: Any, args: tuple, kwargs: dict, out: Any) -> None:
        if self.explicit_sizes and func.overloadpacket.__name__ in _FACTORIES and isinstance(out, torch.Tensor):
            self._label_factory(func, out)
            return
        flat, _ = tree_flatten((args, kwargs))
        labeled = False
        for t in flat:
            if isinstance(t, torch.Tensor):
                key = id(t)
                name = self._name_of.get(key)
                if name is not None:
                    self.used.add(name)
                entry = self.labels.get(key)
                if entry is not None and any(x is not None for x in entry[1]):
                    labeled = True
        if not labeled and func.overloadpacket is not torch.ops.aten.expand:
            # In-place ops on a labelled tensor with unlabelled operands still keep its labels.
            return
        rule = self.rules.get(func) or self.rules.get(func.overloadpacket)
        if rule is None and torch.Tag.pointwise in func.tags:
            rule = self.rules["pointwise"]
        ctx = OpContext(self, func)
        if rule is None:
            if not self._holds_structure(flat):
                self._assign(out, None)  # only broadcast dimensions: nothing to lose
                return
            rule = self.fallback
            note = f"{func} in module '{ctx.module or '<root>'}'"
            if note not in self.unsupported:
                self.unsupported.append(note)
                warnings.warn(
                    f"hf_oto: the dependency analysis does not understand {note}; the structures "
                    "flowing through it are marked unprunable.",
                    stacklevel=2,
                )
        result = rule(ctx, args, kwargs, out)
        self._assign(out, result)
        if isinstance(out, torch.Tensor) and id(out) in self.labels:
            sign = sign_of(func, args, kwargs, self.sign)
            if sign:
                self.signs[id(out)] = (out, sign)

    def _holds_structure(self, flat: list) -> bool:
        for t in flat:
            entry = self.labels.get(id(t)) if isinstance(t, torch.Tensor) else None
            if entry is not None and any(x is not None and not self.atoms.is_broadcast(x) for x in entry[1]):
                return True
        return False

    def sign(self, t: torch.Tensor) -> int:
        """Recorded sign of a labelled tensor (signs.NONNEG, signs.POSITIVE) or 0 if unknown."""
        entry = self.signs.get(id(t))
        return entry[1] if entry is not None and entry[0] is t else 0

    def _label_factory(self, func: Any, out: torch.Tensor) -> None:
        ctx = OpContext(self, func)
        labels: list[np.ndarray | None] = []
        for size in out.shape:
            if size > 1:
                lab = self.atoms.allocate_virtual(size)
                ctx.site(size, lab, "tensor size")
                labels.append(lab)
            else:
                labels.append(None)
        self._assign(out, labels)

    def _assign(self, out: Any, result: Any) -> None:
        if isinstance(out, torch.Tensor):
            if result is not None and any(x is not None for x in result):
                if len(result) != out.dim():
                    raise RuntimeError(f"internal error: {len(result)} labels for a {out.dim()}-d tensor")
                self.labels[id(out)] = (out, list(result))
            else:
                self.labels.pop(id(out), None)
        elif isinstance(out, (tuple, list)):
            results = result if isinstance(result, (tuple, list)) else [None] * len(out)
            for o, r in zip(out, results):
                self._assign(o, r)

    # -- run ---------------------------------------------------------------------------------
    def run(self, call: Callable[[], Any]) -> TraceResult:
        names = {id(m): n for n, m in self.model.named_modules()}
        stack = self.module_stack

        module_inputs, module_outputs = self.module_inputs, self.module_outputs

        def pre_hook(module, args):
            name = names.get(id(module), stack[-1])
            stack.append(name)
            first = next((a for a in args if isinstance(a, torch.Tensor)), None)
            if first is not None and name not in module_inputs:
                entry = self.labels.get(id(first))
                module_inputs[name] = list(entry[1]) if entry is not None else [None] * first.dim()

        def post_hook(module, _args, out):
            name = stack.pop() if len(stack) > 1 else stack[-1]
            first = out if isinstance(out, torch.Tensor) else next(
                (o for o in out if isinstance(o, torch.Tensor)), None) if isinstance(out, (tuple, list)) else None
            if first is not None and name not in module_outputs:
                entry = self.labels.get(id(first))
                module_outputs[name] = list(entry[1]) if entry is not None else [None] * first.dim()

        handles = [
            torch.nn.modules.module.register_module_forward_pre_hook(pre_hook),
            torch.nn.modules.module.register_module_forward_hook(post_hook, always_call=True),
        ]
        entries = EntryTracker(self, names)
        handles += entries.install(self.model)
        attributes = AttributeTracing(self.model)
        try:
            with attributes, _FunctionLevel(self), _DispatchLevel(self):
                output = call()
        finally:
            for h in handles:
                h.remove()
        output_labels = []
        for t in _output_tensors(output):
            entry = self.labels.get(id(t))
            if entry is not None:
                output_labels.extend(x for x in entry[1] if x is not None)
        return TraceResult(
            atoms=self.atoms,
            tensor_names=self.tensor_names,
            tensor_is_param=self.tensor_is_param,
            tensor_atoms=self.tensor_atoms,
            used=self.used,
            sites=self.sites,
            equal_shrink=self.equal_shrink,
            unsupported=self.unsupported,
            output_labels=output_labels,
            modules=dict(self.model.named_modules()),
            norm_sites=self.norm_sites,
            module_inputs=self.module_inputs,
            module_outputs=self.module_outputs,
            fixed_sizes=self.fixed_sizes,
            size_labels=self.size_labels,
            entries=entries.records,
            attribute_values=attributes.values,
        )


def _output_tensors(output: Any) -> list[torch.Tensor]:
    """Tensors a caller receives (ModelOutput, tuples, dicts); caches are not outputs to keep."""
    found: list[torch.Tensor] = []

    def walk(x: Any) -> None:
        if isinstance(x, torch.Tensor):
            found.append(x)
        elif isinstance(x, dict):  # ModelOutput is an OrderedDict
            for v in x.values():
                walk(v)
        elif isinstance(x, (tuple, list)):
            for v in x:
                walk(v)

    walk(output)
    return found
