"""Label rules for ops that compute: pointwise maths, reductions, products, convolutions, norms."""

from __future__ import annotations

import numpy as np
import torch

from .atoms import CONV, EMBED, HEAD, STRUCTURE
from .signs import POSITIVE
from .trace import OpContext

aten = torch.ops.aten


def _tensors(args, kwargs) -> list[torch.Tensor]:
    found = [a for a in args if isinstance(a, torch.Tensor)]
    found += [v for v in kwargs.values() if isinstance(v, torch.Tensor)]
    return found


def broadcast(ctx: OpContext, tensors: list[torch.Tensor], out_shape, what: str):
    """Labels of a broadcasting elementwise op: every full-size operand dim shrinks together."""
    nd = len(out_shape)
    res: list[np.ndarray | None] = []
    for od in range(nd):
        n = out_shape[od]
        arrays = []
        if n > 1:
            for t in tensors:
                k = od - (nd - t.dim())
                if k >= 0 and t.shape[k] == n:
                    arrays.append(ctx.lab(t)[k])
        if any(a is not None for a in arrays):
            res.append(ctx.merge(arrays, what))
        else:
            res.append(None)
    return res


# Pointwise functions that blow up at zero: a zeroed channel would turn into inf/nan, unless the
# argument is provably positive (a statistic plus epsilon, see signs.py).
_SINGULAR_AT_ZERO = {"reciprocal", "rsqrt", "log", "log2", "log10", "digamma", "lgamma"}


def pointwise(ctx: OpContext, args, kwargs, out):
    tensors = _tensors(args, kwargs)
    name = ctx.func.overloadpacket.__name__.rstrip("_")
    if name in _SINGULAR_AT_ZERO:
        if ctx.tracer.sign(tensors[0]) != POSITIVE:
            for lab in ctx.lab(tensors[0]):
                ctx.unprunable(lab, f"{name} is singular at zero")
    elif name in ("div", "floor_divide", "remainder", "fmod") and len(tensors) > 1 and tensors[1] is args[1]:
        if name != "div" or ctx.tracer.sign(tensors[1]) != POSITIVE:
            for lab in ctx.lab(tensors[1]):
                ctx.unprunable(lab, "division by a prunable dimension")
    elif name == "pow" and isinstance(args[1], (int, float)) and args[1] < 0 and ctx.tracer.sign(args[0]) != POSITIVE:
        for lab in ctx.lab(tensors[0]):
            ctx.unprunable(lab, "negative power")
    if isinstance(out, torch.Tensor):
        return broadcast(ctx, tensors, out.shape, f"elementwise {name}")
    return [broadcast(ctx, tensors, o.shape, f"elementwise {name}") for o in out]


def copy_(ctx: OpContext, args, kwargs, out):
    return broadcast(ctx, [args[0], args[1]], args[0].shape, "copy")


# -- reductions --------------------------------------------------------------------------------

def _reduce(ctx: OpContext, x: torch.Tensor, dims, keepdim: bool, effect: str):
    lab = ctx.lab(x)
    if dims is None or (isinstance(dims, (list, tuple)) and len(dims) == 0):
        dims = list(range(x.dim()))
    elif isinstance(dims, int):
        dims = [dims]
    dims = {d % max(x.dim(), 1) for d in dims}
    for d in dims:
        if lab[d] is None:
            continue
        if effect == "mix":
            ctx.mixed(lab[d], "statistics over a prunable dimension")
        elif effect == "fixed":
            ctx.unprunable(lab[d], "order statistic over a prunable dimension")
    return [None if d in dims else l for d, l in enumerate(lab) if keepdim or d not in dims]


def _reduction(effect: str, dim_pos: int = 1, keep_pos: int = 2):
    def rule(ctx: OpContext, args, kwargs, out):
        x = args[0]
        dims = args[dim_pos] if len(args) > dim_pos else kwargs.get("dim")
        keep = args[keep_pos] if len(args) > keep_pos else kwargs.get("keepdim", False)
        labels = _reduce(ctx, x, dims, bool(keep), effect)
        if isinstance(out, (tuple, list)):
            return [labels for _ in out]
        return labels
    return rule


def full_reduction(effect: str):
    def rule(ctx: OpContext, args, kwargs, out):
        _reduce(ctx, args[0], None, False, effect)
        return None
    return rule


def softmax(ctx: OpContext, args, kwargs, out):
    x, dim = args[0], args[1] % max(args[0].dim(), 1)
    lab = ctx.lab(x)
    ctx.mixed(lab[dim], "softmax over a prunable dimension")
    return lab


def cumulative(ctx: OpContext, args, kwargs, out):
    x, dim = args[0], args[1] % max(args[0].dim(), 1)
    lab = ctx.lab(x)
    ctx.unprunable(lab[dim], "cumulative op over a prunable dimension")
    return lab


# -- products ------------------------------------------------------------------------------------

def contract(ctx: OpContext, a: np.ndarray | None, b: np.ndarray | None) -> None:
    """A contracted pair: index i of one side multiplies index i of the other only."""
    if a is None and b is None:
        return
    ctx.merge([a, b], "contraction")


def _matrix_product(ctx: OpContext, a: torch.Tensor, b: torch.Tensor) -> list:
    """``a @ b`` as in a linear layer: the contracted pair and the output columns are channels."""
    la, lb = ctx.lab(a), ctx.lab(b)
    contract(ctx, la[1], lb[0])
    for lab in (la[1], lb[0], lb[1]):
        ctx.mark(lab, STRUCTURE)
    return [la[0], lb[1]]


def mm(ctx: OpContext, args, kwargs, out):
    return _matrix_product(ctx, args[0], args[1])


def addmm(ctx: OpContext, args, kwargs, out):
    return _add_bias(ctx, _matrix_product(ctx, args[1], args[2]), args[0], out.shape)


def _add_bias(ctx: OpContext, labels: list, bias, shape):
    res = []
    lbias = ctx.lab(bias) if isinstance(bias, torch.Tensor) else []
    nd = len(shape)
    for d, l in enumerate(labels):
        arrays = [l]
        if isinstance(bias, torch.Tensor):
            k = d - (nd - bias.dim())
            if k >= 0 and bias.shape[k] == shape[d] and shape[d] > 1:
                arrays.append(lbias[k])
        res.append(ctx.merge(arrays, "bias") if any(x is not None for x in arrays) else None)
    return res


def _bmm_labels(ctx: OpContext, a: torch.Tensor, b: torch.Tensor):
    la, lb = ctx.lab(a), ctx.lab(b)
    batch = ctx.merge([la[0], lb[0]], "batched product") if (la[0] is not None or lb[0] is not None) else None
    if batch is not None:
        ctx.mark(batch, HEAD)
        ctx.mark(batch, STRUCTURE)
    contract(ctx, la[2], lb[1])
    return [batch, la[1], lb[2]]


def bmm(ctx: OpContext, args, kwargs, out):
    return _bmm_labels(ctx, args[0], args[1])


def baddbmm(ctx: OpContext, args, kwargs, out):
    return _add_bias(ctx, _bmm_labels(ctx, args[1], args[2]), args[0], out.shape)


def mv(ctx: OpContext, args, kwargs, out):
    la, lv = ctx.lab(args[0]), ctx.lab(args[1])
    contract(ctx, la[1], lv[0])
    for lab in (la[0], la[1], lv[0]):
        ctx.mark(lab, STRUCTURE)
    return [la[0]]


def dot(ctx: OpContext, args, kwargs, out):
    contract(ctx, ctx.lab(args[0])[0], ctx.lab(args[1])[0])
    return []


def attention(ctx: OpContext, args, kwargs, out):
    """Fused scaled-dot-product attention, grouped-query aware: query head j reads kv head j // r.

    The mask is added to the scores ``[..., heads, L, S]``: a per-head bias (T5's relative
    attention bias, Swin's position bias) shrinks with the heads.
    """
    q, k, v = args[0], args[1], args[2]
    lq, lk, lv = ctx.lab(q), ctx.lab(k), ctx.lab(v)
    mask = kwargs.get("attn_mask", kwargs.get("attn_bias"))
    if mask is None and len(args) > 3 and isinstance(args[3], torch.Tensor):
        mask = args[3]
    lead = q.dim() - 3
    batch = [ctx.merge([lq[d], lk[d], lv[d]], "attention batch") if any(
        x is not None for x in (lq[d], lk[d], lv[d])) else None for d in range(lead)]
    hq, hkv = q.shape[lead], k.shape[lead]
    kv_heads = ctx.merge([lk[lead], lv[lead]], "key/value heads") if (
        lk[lead] is not None or lv[lead] is not None) else None
    rep = hq // hkv if hkv else 1
    expanded = np.repeat(kv_heads, rep) if kv_heads is not None else None
    if hkv == 1:
        heads = lq[lead]  # one key/value head broadcast to all (multi-query): query heads are free
    else:
        heads = ctx.merge([lq[lead], expanded], "query heads sharing a key/value head") if (
            lq[lead] is not None or expanded is not None) else None
    contract(ctx, lq[-1], lk[-1])
    keys = ctx.merge([lk[-2], lv[-2]], "key/value sequence") if (
        lk[-2] is not None or lv[-2] is not None) else None
    scores = batch + [heads, lq[-2], keys]
    if isinstance(mask, torch.Tensor):
        shape = list(q.shape[:lead + 2]) + [k.shape[-2]]
        scores = _merge_broadcast(ctx, scores, shape, mask, "attention mask")
    heads = scores[lead]
    for lab in (heads, kv_heads):
        ctx.mark(lab, HEAD)
        ctx.mark(lab, STRUCTURE)
    value_dim = lv[-1]
    if hkv == 1 and hq > 1:
        # Multi-query: one value head's rows feed a column of every query head; they stay whole.
        ctx.unprunable(value_dim, "value rows shared by every query head (multi-query attention)")
        value_dim = None
    result = scores[:lead] + [heads, scores[lead + 1], value_dim]
    if isinstance(out, (tuple, list)):
        rest = []
        for o in out[1:]:
            if isinstance(o, torch.Tensor) and o.dim() == lead + 2:  # logsumexp [.., H, L]
                rest.append(scores[:lead] + [heads, scores[lead + 1]])
            else:
                rest.append(None)
        return [result] + rest
    return result


def _merge_broadcast(ctx: OpContext, labels: list, shape: list[int], other: torch.Tensor, what: str) -> list:
    """Merge ``other``'s labels into dims of ``shape`` it is broadcast against (full-size dims)."""
    lo = ctx.lab(other)
    res = list(labels)
    nd = len(shape)
    for d in range(nd):
        kdim = d - (nd - other.dim())
        if kdim >= 0 and other.shape[kdim] == shape[d] and shape[d] > 1:
            if res[d] is not None or lo[kdim] is not None:
                res[d] = ctx.merge([res[d], lo[kdim]], what)
    return res


# -- convolution -----------------------------------------------------------------------------

def convolution(ctx: OpContext, args, kwargs, out):
    x, w, bias = args[0], args[1], args[2]
    transposed = bool(args[6]) if len(args) > 6 else False
    groups = int(args[8]) if len(args) > 8 else 1
    lx, lw = ctx.lab(x), ctx.lab(w)
    for lab in lw[2:]:
        ctx.unprunable(lab, "kernel spatial dimension")
    for lab in lx[2:]:
        ctx.unprunable(lab, "spatial dimension of a convolution")
    in_ch = lx[1] if x.dim() > 1 else None
    cin, cout = x.shape[1], out.shape[1]
    # Weight dims: the per-output rows (or, transposed, the per-input rows) and the dim shared
    # across the groups of a grouped convolution.
    w_in, w_out = (lw[0], lw[1]) if transposed else (lw[1], lw[0])
    if groups == 1:
        contract(ctx, in_ch, w_in)
        out_ch = w_out
    else:
        # A grouped convolution couples each group's inputs and outputs: whole groups are units.
        ig, og = cin // groups, cout // groups
        shared = w_out if transposed else w_in
        ctx.unprunable(shared if (og if transposed else ig) > 1 else None,
                       "channel inside a group of a grouped convolution")
        per_group = [in_ch, w_in if transposed else w_out]
        if any(p is None for p in per_group):
            for p in per_group:
                ctx.unprunable(p, "grouped convolution with a side that cannot shrink")
            out_ch = None
        else:
            width = ig if transposed else og
            units = np.concatenate([per_group[0].reshape(groups, ig), per_group[1].reshape(groups, width)], 1)
            valid = units >= 0
            first = np.where(valid.any(1), units[np.arange(groups), valid.argmax(1)], -1)
            ctx.atoms.union(units.reshape(-1), np.repeat(first, units.shape[1]))
            out_ch = np.repeat(first, og)
    if isinstance(bias, torch.Tensor):
        out_ch = ctx.merge([out_ch, ctx.lab(bias)[0]], "convolution bias") if (
            out_ch is not None or ctx.lab(bias)[0] is not None) else None
    for lab in (in_ch, out_ch, w_in, w_out):
        ctx.mark(lab, CONV)
        ctx.mark(lab, STRUCTURE)
    return [lx[0], out_ch] + [None] * (out.dim() - 2)


# -- normalisation ---------------------------------------------------------------------------

def layer_norm(ctx: OpContext, args, kwargs, out):
    x, shape, weight, bias = args[0], args[1], args[2], args[3] if len(args) > 3 else None
    k = len(shape)
    params = [t for t in (weight, bias) if isinstance(t, torch.Tensor)]
    labels = broadcast(ctx, [x] + params, x.shape, "layer norm")
    for lab in labels[x.dim() - k:]:
        ctx.mixed(lab, "normalised by a layer norm")
        ctx.mark(lab, STRUCTURE)
    stats = labels[: x.dim() - k] + [None] * k
    if isinstance(out, (tuple, list)):
        return [labels] + [stats if isinstance(o, torch.Tensor) and o.dim() == x.dim() else None
                           for o in out[1:]]
    return labels


def rms_norm(ctx: OpContext, args, kwargs, out):
    x, shape = args[0], args[1]
    weight = args[2] if len(args) > 2 else kwargs.get("weight")
    return layer_norm(ctx, (x, shape, weight, None), {}, out)


def _channel_norm(ctx: OpContext, x, tensors) -> list:
    lx = list(ctx.lab(x))
    arrays = [lx[1]] + [ctx.lab(t)[0] for t in tensors if isinstance(t, torch.Tensor)]
    lx[1] = ctx.merge(arrays, "batch norm") if any(a is not None for a in arrays) else None
    ctx.mark(lx[1], STRUCTURE)
    return lx


def batch_norm(ctx: OpContext, args, kwargs, out):
    x = args[0]
    labels = _channel_norm(ctx, x, args[1:5])
    return [labels] + [None] * (len(out) - 1) if isinstance(out, (tuple, list)) else labels


def batch_norm_no_stats(ctx: OpContext, args, kwargs, out):
    labels = _channel_norm(ctx, args[0], args[1:3])
    return [labels] + [None] * (len(out) - 1) if isinstance(out, (tuple, list)) else labels


def group_norm(ctx: OpContext, args, kwargs, out):
    """Group norm normalises blocks of channels: whole blocks are the units that can go."""
    x, weight, bias, _n, c, _hw, groups = args[:7]
    labels = _channel_norm(ctx, x, [weight, bias])
    ch = labels[1]
    if ch is not None and c // groups > 1:
        rows = ch.reshape(groups, c // groups)
        valid = rows >= 0
        mixed = valid.any(1) & ~valid.all(1)
        if mixed.any():
            ctx.unprunable(rows[mixed], "group norm block with channels that cannot shrink")
        first = np.where(valid.any(1), rows[np.arange(groups), valid.argmax(1)], -1)
        ctx.atoms.union(rows.reshape(-1), np.repeat(first, rows.shape[1]))
    return [labels, None, None]


# -- lookups and spatial ops -------------------------------------------------------------------

def embedding(ctx: OpContext, args, kwargs, out):
    weight, indices = args[0], args[1]
    lw = ctx.lab(weight)
    ctx.unprunable(lw[0], "rows are looked up by index (vocabulary or position table)")
    ctx.mark(lw[1], EMBED)
    ctx.mark(lw[1], STRUCTURE)
    return list(ctx.lab(indices)) + [lw[1]]


def spatial(ctx: OpContext, args, kwargs, out):
    """Pooling, upsampling and padding over the trailing dims: batch and channel pass through."""
    x = args[0]
    lab = ctx.lab(x)
    lead = 2 if x.dim() >= 3 else 1
    for l in lab[lead:]:
        ctx.unprunable(l, "pooled or resampled along a prunable dimension")
    labels = list(lab[:lead]) + [None] * (x.dim() - lead)
    if isinstance(out, (tuple, list)):
        return [labels if isinstance(o, torch.Tensor) and o.dim() == x.dim() else None for o in out]
    return labels if out.dim() == x.dim() else None


def mixes_channels(ctx: OpContext, args, kwargs, out):
    for lab in ctx.lab(args[0]):
        ctx.unprunable(lab, "op mixes channels with spatial positions")
    return None


def loss(ctx: OpContext, args, kwargs, out):
    """A loss reads predictions against targets: the prediction dims are fixed by the targets."""
    for t in _tensors(args, kwargs):
        for lab in ctx.lab(t):
            ctx.unprunable(lab, "enters the loss")
    return None


def unsupported(ctx: OpContext, args, kwargs, out):
    for t in _tensors(args, kwargs):
        for lab in ctx.lab(t):
            ctx.unprunable(lab, "the analysis does not understand this op")
    return None


_TABLE = {
    "pointwise": pointwise,
    "copy_": copy_,
    "copy": copy_,
    "sum": _reduction("sum"),
    "nansum": _reduction("sum"),
    "mean": _reduction("mix"),
    "nanmean": _reduction("mix"),
    "var": _reduction("mix"),
    "std": _reduction("mix"),
    "var_mean": _reduction("mix"),
    "std_mean": _reduction("mix"),
    "logsumexp": _reduction("mix"),
    "linalg_vector_norm": _reduction("mix", dim_pos=2, keep_pos=3),
    "norm": _reduction("mix", dim_pos=2, keep_pos=3),
    "amax": _reduction("fixed"),
    "amin": _reduction("fixed"),
    "max": _reduction("fixed"),
    "min": _reduction("fixed"),
    "argmax": _reduction("fixed"),
    "argmin": _reduction("fixed"),
    "prod": _reduction("fixed"),
    "any": _reduction("sum"),
    "all": _reduction("sum"),
    "_softmax": softmax,
    "_log_softmax": softmax,
    "_safe_softmax": softmax,
    "softmax": softmax,
    "log_softmax": softmax,
    "cumsum": cumulative,
    "cumprod": cumulative,
    "mm": mm,
    "addmm": addmm,
    "bmm": bmm,
    "baddbmm": baddbmm,
    "mv": mv,
    "dot": dot,
    "vdot": dot,
    "_scaled_dot_product_flash_attention_for_cpu": attention,
    "_scaled_dot_product_flash_attention": attention,
    "_scaled_dot_product_efficient_attention": attention,
    "_scaled_dot_product_cudnn_attention": attention,
    "_scaled_dot_product_fused_attention_overrideable": attention,
    "_scaled_dot_product_attention_math": attention,
    "convolution": convolution,
    "_convolution": convolution,
    "native_layer_norm": layer_norm,
    "_fused_rms_norm": rms_norm,
    "native_batch_norm": batch_norm,
    "_native_batch_norm_legit_no_training": batch_norm,
    "_native_batch_norm_legit_functional": batch_norm,
    "native_group_norm": group_norm,
    "embedding": embedding,
    "pixel_shuffle": mixes_channels,
    "pixel_unshuffle": mixes_channels,
    "channel_shuffle": mixes_channels,
    "native_channel_shuffle": mixes_channels,
    "im2col": mixes_channels,
    "col2im": mixes_channels,
}

for _name in (
    "nll_loss_forward", "nll_loss2d_forward", "nll_loss", "nll_loss_nd", "mse_loss", "l1_loss",
    "smooth_l1_loss", "huber_loss", "binary_cross_entropy", "binary_cross_entropy_with_logits",
    "kl_div", "cross_entropy_loss", "soft_margin_loss", "multilabel_margin_loss_forward",
):
    _TABLE[_name] = loss

for _name in (
    "max_pool1d", "max_pool2d", "max_pool3d", "max_pool2d_with_indices", "max_pool3d_with_indices",
    "avg_pool1d", "avg_pool2d", "avg_pool3d", "adaptive_avg_pool1d", "adaptive_avg_pool2d",
    "adaptive_avg_pool3d", "_adaptive_avg_pool2d", "_adaptive_avg_pool3d", "adaptive_max_pool1d",
    "adaptive_max_pool2d", "adaptive_max_pool3d", "upsample_nearest1d", "upsample_nearest2d",
    "upsample_nearest3d", "upsample_linear1d", "upsample_bilinear2d", "upsample_bicubic2d",
    "upsample_trilinear3d", "_upsample_nearest_exact1d", "_upsample_nearest_exact2d",
    "_upsample_nearest_exact3d", "_upsample_bilinear2d_aa", "_upsample_bicubic2d_aa",
    "reflection_pad1d", "reflection_pad2d", "reflection_pad3d", "replication_pad1d",
    "replication_pad2d", "replication_pad3d", "lp_pool1d", "lp_pool2d", "fractional_max_pool2d",
):
    _TABLE[_name] = spatial

RULES = {getattr(aten, name) if name != "pointwise" else name: rule
         for name, rule in _TABLE.items() if name == "pointwise" or hasattr(aten, name)}


def batch_norm_legit(ctx: OpContext, args, kwargs, out):
    # _native_batch_norm_legit has an overload without running stats (args shift by two).
    if "no_stats" in str(ctx.func):
        return batch_norm_no_stats(ctx, args, kwargs, out)
    return batch_norm(ctx, args, kwargs, out)


RULES[aten._native_batch_norm_legit] = batch_norm_legit
