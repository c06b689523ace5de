"""Label rules for ops that only move data: views, permutations, slices, splits, concatenation."""

from __future__ import annotations

import sys

import numpy as np
import torch

from .atoms import COARSENED
from .trace import OpContext

aten = torch.ops.aten


def _blocks(in_shape: list[int], out_shape: list[int]) -> list[tuple[list[int], list[int]]]:
    """Pair minimal runs of input and output dims with equal products (size-1 dims left out)."""
    ins = [d for d, s in enumerate(in_shape) if s != 1]
    outs = [d for d, s in enumerate(out_shape) if s != 1]
    blocks = []
    i = j = 0
    while i < len(ins) and j < len(outs):
        bi, bo = [ins[i]], [outs[j]]
        pi, po = in_shape[ins[i]], out_shape[outs[j]]
        i += 1
        j += 1
        while pi != po:
            if pi < po:
                bi.append(ins[i])
                pi *= in_shape[ins[i]]
                i += 1
            else:
                bo.append(outs[j])
                po *= out_shape[outs[j]]
                j += 1
        blocks.append((bi, bo))
    return blocks


def reshape_labels(
    ctx: OpContext, x: torch.Tensor, out_shape: list[int], literal: list[int] | None
) -> list[np.ndarray | None]:
    """Labels after a reshape. A prunable dimension split into several keeps its labels on the
    outermost dimension that varies and fuses the rest into units: ``(h*d) -> (h, d)`` prunes
    whole heads, because models fix ``d`` (``head_dim``) and infer ``h``."""
    in_shape = list(x.shape)
    in_labels = ctx.lab(x)
    out: list[np.ndarray | None] = [None] * len(out_shape)
    coarsened: set[int] = set()
    if x.numel() == 0:
        return out
    for bi, bo in _blocks(in_shape, list(out_shape)):
        labeled = [d for d in bi if in_labels[d] is not None]
        if len(labeled) > 1:  # a broadcast dimension repeats the others: it adds no structure
            labeled = [d for d in labeled if not ctx.atoms.is_broadcast(in_labels[d])] or labeled[:1]
        if not labeled:
            continue
        if len(labeled) > 1:
            for d in labeled:
                ctx.unprunable(in_labels[d], "reshape merges two prunable dimensions")
            continue
        d = labeled[0]
        pos = bi.index(d)
        block_shape = [in_shape[k] for k in bi]
        view = in_labels[d].reshape([1] * pos + [-1] + [1] * (len(bi) - pos - 1))
        flat = np.broadcast_to(view, block_shape).reshape(-1)
        oshape = [out_shape[k] for k in bo]
        if len(bo) == 1:
            out[bo[0]] = flat.copy()
        else:
            grid = flat.reshape(oshape)
            varies = [not np.array_equal(grid, np.broadcast_to(grid.take([0], axis=k), grid.shape))
                      for k in range(len(bo))]
            k = varies.index(True) if any(varies) else 0
            rows = np.moveaxis(grid, k, 0).reshape(oshape[k], -1)
            if sum(varies) <= 1:
                out[bo[k]] = rows[:, 0].copy()
            else:
                valid = rows >= 0
                mixed = valid.any(1) & ~valid.all(1)
                if mixed.any():
                    ctx.unprunable(rows[mixed], "reshape groups prunable and fixed positions together")
                first = np.where(valid.any(1), rows[np.arange(rows.shape[0]), valid.argmax(1)], -1)
                ctx.atoms.union(rows.reshape(-1), np.repeat(first, rows.shape[1]))
                ctx.mark(first, COARSENED)
                out[bo[k]] = first
                coarsened.add(bo[k])
    if literal is not None:
        n = len(literal)
        for k, lab in enumerate(out[:n]):
            if lab is not None:
                ctx.site(int(literal[k]), lab, "reshape size", units=k in coarsened, position=k, length=n)
            else:
                ctx.fixed(int(literal[k]), "reshape size", position=k, length=n)
    return out


def view(ctx: OpContext, args, kwargs, out):
    size = args[1] if len(args) > 1 else kwargs.get("size")
    return reshape_labels(ctx, args[0], list(out.shape), list(size) if size is not None else None)


def expand(ctx: OpContext, args, kwargs, out):
    """A dimension expanded from size one gets fresh atoms: it holds the same values everywhere,
    so it shrinks with whatever it meets (a shared key/value head read by every query head)."""
    x, size = args[0], list(args[1])
    lab = ctx.lab(x)
    lead = out.dim() - x.dim()
    res: list[np.ndarray | None] = [None] * lead
    for d in range(x.dim()):
        labels, n, k = lab[d], out.shape[lead + d], lead + d
        if x.shape[d] == 1 and n > 1:
            labels = ctx.atoms.allocate_virtual(n, broadcast=True)
            ctx.site(int(size[k]), labels, "expand size", position=k, length=len(size))
            ctx.fixed(int(size[k]), "expand size", position=k, length=len(size), labels=labels, attributes_only=True)
        elif labels is not None:
            ctx.site(int(size[k]), labels, "expand size", position=k, length=len(size))
        else:
            ctx.fixed(int(size[k]), "expand size", position=k, length=len(size))
        res.append(labels)
    return res


def permute(ctx: OpContext, args, kwargs, out):
    lab = ctx.lab(args[0])
    return [lab[d % len(lab)] for d in args[1]]


def transpose(ctx: OpContext, args, kwargs, out):
    lab = list(ctx.lab(args[0]))
    if not lab:
        return lab
    d0, d1 = args[1] % len(lab), args[2] % len(lab)
    lab[d0], lab[d1] = lab[d1], lab[d0]
    return lab


def t(ctx: OpContext, args, kwargs, out):
    return list(reversed(ctx.lab(args[0])))


def unsqueeze(ctx: OpContext, args, kwargs, out):
    lab = list(ctx.lab(args[0]))
    lab.insert(args[1] % out.dim(), None)
    return lab


def squeeze(ctx: OpContext, args, kwargs, out):
    x = args[0]
    lab = ctx.lab(x)
    if len(args) > 1:
        dims = args[1] if isinstance(args[1], (list, tuple)) else [args[1]]
        dims = {d % max(x.dim(), 1) for d in dims}
    else:
        dims = set(range(x.dim()))
    return [l for d, l in enumerate(lab) if not (d in dims and x.shape[d] == 1)]


def identity(ctx: OpContext, args, kwargs, out):
    lab = ctx.lab(args[0])
    if isinstance(out, (tuple, list)):
        return [lab if isinstance(o, torch.Tensor) and o.shape == args[0].shape else None for o in out]
    if isinstance(out, torch.Tensor) and out.shape != args[0].shape:
        return None
    return lab


def _norm_bound(value: int | None, size: int, default: int) -> int:
    if value is None or value >= sys.maxsize // 2:
        return default
    if value < 0:
        value += size
    return max(0, min(size, value))


def slice_(ctx: OpContext, args, kwargs, out):
    x = args[0]
    dim = (args[1] if len(args) > 1 else kwargs.get("dim", 0)) % x.dim()
    start = args[2] if len(args) > 2 else kwargs.get("start")
    end = args[3] if len(args) > 3 else kwargs.get("end")
    step = args[4] if len(args) > 4 else kwargs.get("step", 1)
    lab = list(ctx.lab(x))
    labels = lab[dim]
    if labels is None:
        return lab
    size = x.shape[dim]
    s, e = _norm_bound(start, size, 0), _norm_bound(end, size, size)
    if step != 1:
        ctx.unprunable(labels, "strided slice of a prunable dimension")
        lab[dim] = None
        return lab
    for literal, bound in ((start, s), (end, e)):
        if literal is None or literal >= sys.maxsize // 2 or bound in (0, size) and literal >= 0:
            continue
        if literal < 0:
            ctx.site(int(literal), labels[bound:], "slice bound", sign=-1)
        else:
            ctx.site(int(literal), labels[:bound], "slice bound")
    lab[dim] = labels[s:e].copy() if e > s else None
    return lab


def narrow(ctx: OpContext, args, kwargs, out):
    x, dim, start, length = args[0], args[1], args[2], args[3]
    return slice_(ctx, (x, dim, start, start + length), {}, out)


def select(ctx: OpContext, args, kwargs, out):
    x, dim = args[0], args[1] % args[0].dim()
    lab = list(ctx.lab(x))
    ctx.unprunable(lab[dim], "a fixed index is selected along a prunable dimension")
    del lab[dim]
    return lab


def split(ctx: OpContext, args, kwargs, out):
    x = args[0]
    dim = (args[2] if len(args) > 2 else kwargs.get("dim", 0)) % x.dim()
    sizes = [o.shape[dim] for o in out]
    lab = ctx.lab(x)
    labels = lab[dim]
    results = []
    offset = 0
    parts = []
    for n in sizes:
        piece = list(lab)
        piece[dim] = labels[offset:offset + n].copy() if labels is not None else None
        results.append(piece)
        if labels is not None:
            parts.append(piece[dim])
        offset += n
    if labels is not None:
        literal = args[1]
        if isinstance(literal, int):
            # Equal chunks: every full chunk must keep the same size; the last may be shorter.
            full = [p for p, n in zip(parts, sizes) if n == literal]
            ctx.equal_shrink(full)
            for p in full:
                ctx.site(literal, p, "split size")
        else:
            for p, n in zip(parts, sizes):
                ctx.site(int(n), p, "split size")
    return results


def unbind(ctx: OpContext, args, kwargs, out):
    x = args[0]
    dim = (args[1] if len(args) > 1 else kwargs.get("dim", 0)) % x.dim()
    lab = list(ctx.lab(x))
    ctx.unprunable(lab[dim], "unbind along a prunable dimension")
    del lab[dim]
    return [list(lab) for _ in out]


def cat(ctx: OpContext, args, kwargs, out):
    # Legacy callers pass empty 1-d tensors to cat; they contribute nothing.
    tensors = [t for t in args[0] if t.dim() == out.dim()]
    dim = (args[1] if len(args) > 1 else kwargs.get("dim", 0)) % out.dim()
    res: list[np.ndarray | None] = []
    for d in range(out.dim()):
        if d == dim:
            pieces = [ctx.lab(t)[d] if ctx.lab(t)[d] is not None else np.full(t.shape[d], -1, np.int64)
                      for t in tensors]
            joined = np.concatenate(pieces) if pieces else None
            res.append(joined if joined is not None and (joined >= 0).any() else None)
        else:
            arrays = [ctx.lab(t)[d] for t in tensors]
            res.append(ctx.merge(arrays, "concatenation") if out.shape[d] > 1 else None)
    return res


def stack(ctx: OpContext, args, kwargs, out):
    tensors = list(args[0])
    dim = (args[1] if len(args) > 1 else kwargs.get("dim", 0)) % out.dim()
    base = tensors[0].dim()
    res: list[np.ndarray | None] = []
    for d in range(base):
        arrays = [ctx.lab(t)[d] for t in tensors]
        res.append(ctx.merge(arrays, "stack") if tensors[0].shape[d] > 1 else None)
    res.insert(dim, None)
    return res


def repeat(ctx: OpContext, args, kwargs, out):
    x, reps = args[0], list(args[1])
    lab = ctx.lab(x)
    lead = len(reps) - x.dim()
    res: list[np.ndarray | None] = [None] * lead
    for d, labels in enumerate(lab):
        res.append(np.tile(labels, reps[lead + d]) if labels is not None else None)
    return res


def repeat_interleave(ctx: OpContext, args, kwargs, out):
    x, repeats = args[0], args[1]
    dim = args[2] if len(args) > 2 else kwargs.get("dim")
    lab = list(ctx.lab(x))
    if dim is None or not isinstance(repeats, int):
        for labels in lab:
            ctx.unprunable(labels, "repeat_interleave")
        return None
    dim %= x.dim()
    if lab[dim] is not None:
        lab[dim] = np.repeat(lab[dim], repeats)
    return lab


def flip(ctx: OpContext, args, kwargs, out):
    lab = list(ctx.lab(args[0]))
    for d in args[1]:
        d %= len(lab)
        if lab[d] is not None:
            lab[d] = lab[d][::-1].copy()
    return lab


def index_select(ctx: OpContext, args, kwargs, out):
    x, dim = args[0], args[1] % args[0].dim()
    lab = list(ctx.lab(x))
    ctx.unprunable(lab[dim], "index_select along a prunable dimension")
    lab[dim] = None
    return lab


def gather(ctx: OpContext, args, kwargs, out):
    """Position i of every other dimension reads position i of the input: those shrink together
    with the index's (an index expanded over heads follows the heads)."""
    x, dim, index = args[0], args[1] % args[0].dim(), args[2]
    lab, lidx = ctx.lab(x), ctx.lab(index)
    ctx.unprunable(lab[dim], "gather along a prunable dimension")
    res: list[np.ndarray | None] = []
    for d in range(x.dim()):
        if d == dim or index.shape[d] != x.shape[d] or x.shape[d] == 1:
            res.append(None)
        elif lab[d] is None and lidx[d] is None:
            res.append(None)
        else:
            res.append(ctx.merge([lab[d], lidx[d]], "gather"))
    return res


def _literal_positions(ctx: OpContext, index: torch.Tensor, size: int) -> list[int] | None:
    """Positions picked by an index written as a list in the code (``qkv[..., [-2], :]``), or None.

    The list's integers reach the op as a tensor; they are recognised among the integers of the
    indexing call itself, so an index computed from data (a router's choice) never qualifies.
    """
    if index.dim() != 1 or index.dtype not in (torch.int64, torch.int32) or not ctx.tracer.call_ints:
        return None
    written = [v for v, _ in ctx.tracer.call_ints]
    n = index.numel()
    if index.device.type == "meta":
        values = written if len(written) == n else None
    else:
        values = index.tolist()
        if not any(written[i:i + n] == values for i in range(len(written) - n + 1)):
            values = None
    if values is None or not all(-size <= v < size for v in values):
        return None
    return values


def index(ctx: OpContext, args, kwargs, out):
    """Advanced indexing ``x[..., idx, ...]``: indexed dims cannot shrink, the others keep labels.

    An index written as a literal list picks fixed positions: those stay, and so do the positions
    between them and the end they are counted from (``[-2]`` still means the same row when only
    rows before it go); the rest of the dimension stays prunable.
    """
    x, indices = args[0], list(args[1])
    lab = ctx.lab(x)
    indexed = [d for d, i in enumerate(indices) if i is not None]
    for d in indexed:
        picked = _literal_positions(ctx, indices[d], x.shape[d]) if len(indexed) == 1 and lab[d] is not None else None
        if picked is None:
            ctx.unprunable(lab[d], "advanced indexing of a prunable dimension")
            continue
        for v in picked:
            pinned = lab[d][v:] if v < 0 else lab[d][:v + 1]
            ctx.unprunable(pinned, f"picked by the literal index {v}, or between it and the end it counts from")
    kept = [(d, lab[d]) for d in range(x.dim()) if d not in indexed]
    n_index_dims = out.dim() - len(kept)
    contiguous = indexed == list(range(indexed[0], indexed[-1] + 1)) if indexed else True
    res: list[np.ndarray | None] = []
    if contiguous and indexed:
        before = [l for d, l in kept if d < indexed[0]]
        after = [l for d, l in kept if d > indexed[-1]]
        res = before + [None] * n_index_dims + after
    else:
        res = [None] * n_index_dims + [l for _, l in kept]
    return res


def constant_pad(ctx: OpContext, args, kwargs, out):
    x, pad = args[0], list(args[1])
    lab = list(ctx.lab(x))
    for i in range(len(pad) // 2):
        d = x.dim() - 1 - i
        if (pad[2 * i] or pad[2 * i + 1]) and lab[d] is not None:
            ctx.unprunable(lab[d], "padding of a prunable dimension")
            lab[d] = None
    return lab


_TABLE = {
    "view": view,
    "_unsafe_view": view,
    "reshape": view,
    "_reshape_alias": view,
    "view_copy": view,
    "expand": expand,
    "expand_copy": expand,
    "permute": permute,
    "permute_copy": permute,
    "transpose": transpose,
    "transpose_copy": transpose,
    "t": t,
    "t_copy": t,
    "numpy_T": t,
    "unsqueeze": unsqueeze,
    "unsqueeze_copy": unsqueeze,
    "squeeze": squeeze,
    "squeeze_copy": squeeze,
    "slice": slice_,
    "slice_copy": slice_,
    "narrow": narrow,
    "select": select,
    "select_copy": select,
    "split": split,
    "split_with_sizes": split,
    "unsafe_split": split,
    "unsafe_split_with_sizes": split,
    "split_copy": split,
    "split_with_sizes_copy": split,
    "unbind": unbind,
    "cat": cat,
    "stack": stack,
    "repeat": repeat,
    "repeat_interleave": repeat_interleave,
    "flip": flip,
    "index_select": index_select,
    "gather": gather,
    "index": index,
    "_unsafe_index": index,
    "constant_pad_nd": constant_pad,
}

# Ops whose output is the input (or has its shape) with the same meaning per position.
for _name in (
    "clone", "alias", "detach", "lift_fresh", "lift_fresh_copy", "_to_copy", "to", "_conj",
    "resolve_conj", "resolve_neg", "contiguous", "native_dropout", "zeros_like", "ones_like",
    "empty_like", "full_like", "rand_like", "randn_like", "fill_", "zero_", "hardswish",
    "hardswish_", "gelu_", "silu_", "mish_", "hardsigmoid", "hardsigmoid_", "dropout",
    "alias_copy", "detach_copy", "_to_dense", "bernoulli_",
):
    _TABLE[_name] = identity

RULES = {getattr(aten, name): rule for name, rule in _TABLE.items() if hasattr(aten, name)}
