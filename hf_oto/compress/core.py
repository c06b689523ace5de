"""Build the physically smaller model: slice tensors, fix attributes, record the manifest."""

from __future__ import annotations

import contextlib
import copy
import warnings
from typing import Any, Sequence

import torch
from torch import nn

from ..graph.inputs import call_with
from ..groups import ZeroInvariantGroups, ragged_width
from .locate import run_located
from .manifest import update_manifest
from .modeling_hf_oto import cut_inputs, pad_norm, route_experts


class CompressionError(ValueError):
    """The compressed model cannot be built, or does not reproduce the sparse model.

    ``module`` names the module where it failed, when one is known.
    """

    def __init__(self, message: str, module: str = "") -> None:
        super().__init__(message)
        self.module = module


def compress(
    model: nn.Module,
    groups: ZeroInvariantGroups,
    *,
    remove: torch.Tensor | None = None,
    ratio: float | None = None,
    scope: str = "global",
    inplace: bool = False,
    verify: bool = True,
    rtol: float = 1e-5,
) -> nn.Module:
    """Remove every prunable group whose parameters are all zero and return the smaller model.

    The result is a model of the same class (for Transformers models, the ``HfOto<Base>``
    subclass that knows how to save and reload its new sizes) whose outputs equal ``model``'s.

    Args:
        model: the trained sparse model (it is not modified unless ``inplace=True``).
        groups: the groups :func:`hf_oto.find_groups` found for this model.
        remove: a boolean mask over groups to remove instead of the all-zero ones (use with
            care: groups that are not zero change the outputs, and ``verify`` is skipped).
        ratio: remove this fraction of the prunable groups, those with the smallest norms,
            whether or not they are zero (for models trained to be robust to pruning, such as
            with :class:`hf_oto.optim.SFW`); ``verify`` is skipped.
        scope: how ``ratio`` ranks groups: ``"global"`` (one ranking over the model) or
            ``"layer"`` (the same fraction of every layer, for networks whose layers have very
            different weight scales); see :func:`smallest_groups`.
        inplace: slice ``model`` itself instead of a copy.
        verify: run the groups' example inputs through both models and raise
            :class:`CompressionError` if the outputs differ by more than ``rtol`` times their scale.

    Example:
        >>> small = compress(model, groups)                  # doctest: +SKIP
        >>> small.save_pretrained("out/")                    # doctest: +SKIP
    """
    groups.check_model(model)
    params = groups.parameters(model)
    if ratio is not None:
        if remove is not None:
            raise ValueError("pass either remove or ratio, not both")
        remove = smallest_groups(groups, params, ratio, scope)
    elif scope != "global":
        raise ValueError("scope only applies with ratio")
    if remove is None:
        with torch.no_grad():
            remove = groups.zero_mask(params).cpu() & groups.prunable_mask
        check = verify
    else:
        remove = torch.as_tensor(remove, dtype=torch.bool).cpu()
        if remove.shape != (len(groups),):
            raise ValueError(f"remove must be a mask over {len(groups)} groups, got shape {tuple(remove.shape)}")
        blocked = remove & ~groups.prunable_mask
        if blocked.any():
            g = groups[int(blocked.nonzero()[0])]
            raise CompressionError(f"group {g.index} ({g.kind} in {g.layer}) is not prunable: {g.reason}")
        check = False
    inexact = int((remove & ~groups.exact_mask).sum())
    if inexact and check:
        warnings.warn(f"{inexact} removed groups are normalised by ops that cannot run padded (see "
                      "ZeroInvariantGroup.exact): outputs change slightly, so the exactness check is skipped",
                      stacklevel=2)
        check = False

    with one_thread():
        remove = groups.feasible_removal(remove)
        plan = groups.removal_plan(remove)
        ragged = groups.ragged_plan(remove, plan)
        routes = _expert_routes(groups, remove)
        paddings = groups.padded_norms(remove)
        cuts = groups.cut_inputs(remove)
        attribute_updates = _binding_updates(groups, remove)
    check = check and groups.example_inputs is not None
    if check:
        with exact_float32_matmuls():
            reference = _run(model, groups.example_inputs)

    target = model if inplace else copy.deepcopy(model)
    shapes = _slice_tensors(target, plan, groups, ragged)
    attribute_updates = _merge(attribute_updates, _standard_attributes(target, plan, groups))
    for path, attrs in attribute_updates.items():
        for attr, value in attrs.items():
            with _building(path, f"setting attribute '{attr}' to {value!r}"):
                setattr(target.get_submodule(path), attr, value)
    padding_specs = {}
    for path, (dim, size, kept) in paddings.items():
        with _building(path, "padding its norm"):
            pad_norm(target.get_submodule(path), dim, size, kept)
        padding_specs[path] = {"dim": dim, "size": size, "kept": kept.tolist()}
    for path, specs in cuts.items():
        with _building(path, "cutting its inputs to the kept heads"):
            cut_inputs(target.get_submodule(path), specs)
    for path, spec in routes.items():
        with _building(path, "remapping its routing"):
            route_experts(target.get_submodule(path), **spec)
    with _building("", "recording the structure manifest"):
        update_manifest(target, shapes=shapes, attributes=attribute_updates, paddings=padding_specs,
                        inputs=cuts, experts=routes)

    if check:
        with exact_float32_matmuls():
            result = _run_checked(target, groups.example_inputs)
        _verify(reference, result, rtol)
    return target


#: The backends whose float32 precision torch lets a program lower (TF32, bf16); "" is the root.
_FP32_BACKENDS = ("", "cuda.matmul", "cudnn", "cudnn.conv", "cudnn.rnn", "mkldnn", "mkldnn.matmul", "mkldnn.conv",
                  "mkldnn.rnn")


@contextlib.contextmanager
def exact_float32_matmuls():
    """Full float32 matmuls and convolutions for the exactness check, whatever the caller chose
    for training: TF32 (on by default for cuDNN convolutions, and where a script enables it for
    matmuls) rounds inputs to 10 mantissa bits, and the two models, whose sliced matrices sum in
    different orders, then differ by about 1e-3 of the output scale (seen on an H200: 1.3e-3 for a
    MiniLM). That is rounding, not a missed construct, so the check runs without it. Only the
    per-backend ``fp32_precision`` settings are touched and restored as found: mixing them with
    the legacy ``allow_tf32`` flags makes torch refuse to report the precision afterwards."""
    saved = []
    for path in _FP32_BACKENDS:
        backend = torch.backends
        for part in filter(None, path.split(".")):
            backend = getattr(backend, part, None)
        if backend is not None and hasattr(backend, "fp32_precision"):
            saved.append((backend, backend.fp32_precision))
    for backend, _ in saved:
        backend.fp32_precision = "ieee"
    try:
        yield
    finally:
        for backend, value in reversed(saved):
            backend.fp32_precision = value


@contextlib.contextmanager
def one_thread():
    """Run small index bookkeeping on one thread: on a busy machine, every parallel region of
    torch's CPU kernels can wait a scheduler tick for a descheduled worker (seen: 1 s instead of
    25 ms for the removal plan of a 7B model with two threads on two loaded cores)."""
    threads = torch.get_num_threads()
    if threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@contextlib.contextmanager
def _building(module: str, what: str):
    """Anything that goes wrong while shrinking ``module`` is a CompressionError naming it."""
    try:
        yield
    except CompressionError:
        raise
    except Exception as exc:
        raise CompressionError(f"cannot shrink module '{module or '<model>'}' ({what}): "
                               f"{type(exc).__name__}: {exc}", module) from exc


def _run_checked(model: nn.Module, inputs: Any) -> list[torch.Tensor]:
    """The compressed model's outputs; a CompressionError naming the module and op if it fails."""
    result: list[list[torch.Tensor]] = []
    failure = run_located(model, lambda: result.append(_run(model, inputs)))
    if failure is not None:
        raise CompressionError(f"the compressed model does not run: {failure}. The analysis missed a "
                               "size this module depends on: please report it, and exclude the layer "
                               "with GroupConfig.exclude meanwhile", failure.module)
    return result[0]


@torch.no_grad()
def smallest_groups(groups: ZeroInvariantGroups, params: Sequence[torch.Tensor], ratio: float,
                    scope: str = "global") -> torch.Tensor:
    """Mask of the ``ratio`` fraction of prunable groups with the smallest L2 norms.

    ``scope="global"`` ranks all prunable groups together; ``scope="layer"`` takes
    ``int(ratio * n)`` of the ``n`` groups of every (producing layer, kind) block
    (:meth:`ZeroInvariantGroups.layer_blocks`), so layers on different scales (a BatchNorm
    network's convolutions) keep the same share.

    Example:
        >>> mask = smallest_groups(groups, groups.parameters(model), 0.5, scope="layer")  # doctest: +SKIP
        >>> small = compress(model, groups, remove=mask)                                   # doctest: +SKIP
    """
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0.0 <= ratio < 1.0:
        raise ValueError(f"ratio must be in [0, 1), got {ratio!r}")
    if scope not in ("global", "layer"):
        raise ValueError(f"scope must be 'global' or 'layer', got {scope!r}")
    if scope == "global":
        block = torch.where(groups.prunable_mask, 0, -1)
    else:
        block = groups.layer_blocks()[0]
    mask = torch.zeros(len(groups), dtype=torch.bool)
    members = (block >= 0).nonzero().flatten()
    if members.numel() == 0:
        return mask
    norms = groups.norms(params).detach().cpu()
    order = members[torch.argsort(norms[members], stable=True)]           # smallest first
    order = order[torch.argsort(block[order], stable=True)]               # then by block
    sizes = torch.bincount(block[members])
    start = torch.cat([torch.zeros(1, dtype=torch.long), sizes.cumsum(0)[:-1]])
    rank = torch.arange(order.numel()) - start[block[order]]
    cut = (sizes.double() * ratio).long()                                 # int(ratio * n) per block
    mask[order[rank < cut[block[order]]]] = True
    return mask


def _binding_updates(groups: ZeroInvariantGroups, remove: torch.Tensor) -> dict[str, dict[str, Any]]:
    """New values of attributes holding prunable sizes; all uses of one attribute must agree."""
    wanted: dict[tuple[str, str], set[int]] = {}
    for b in groups.bindings:
        kept = int(((b.group < 0) | ~remove[b.group.clamp(min=0)]).sum())
        if kept % b.divisor:
            raise CompressionError(f"attribute '{b.attribute}' of '{b.module}' counts units of {b.divisor} "
                                   f"positions but {kept} positions remain", b.module)
        wanted.setdefault((b.module, b.attribute), set()).add(b.sign * kept // b.divisor + b.offset)
    updates: dict[str, dict[str, Any]] = {}
    for (module, attr), values in wanted.items():
        if len(values) > 1:
            raise CompressionError(f"attribute '{attr}' of module '{module}' would need the values "
                                   f"{sorted(values)} at once; remove groups consistently", module)
        updates.setdefault(module, {})[attr] = values.pop()
    return updates


def _expert_routes(groups: ZeroInvariantGroups, remove: torch.Tensor) -> dict[str, dict[str, Any]]:
    """Experts modules losing whole experts: the routing remap each needs (see ``route_experts``)."""
    routes = {}
    for r in groups.expert_routings:
        gone = (r.group >= 0) & remove[r.group.clamp(min=0)]
        if gone.any():
            routes[r.module] = {"kept": (~gone).nonzero().flatten().tolist(), "size": r.group.numel(),
                                "index_arg": r.index_arg, "weight_arg": r.weight_arg}
    return routes


def _ragged(data: torch.Tensor, outer_dim: int, dim: int, per_outer: list[torch.Tensor]) -> torch.Tensor:
    """Per expert and per segment of ``dim``: the kept positions first, then zeros up to the
    common width, so that every expert keeps one width (see ``ragged_width``)."""
    k = per_outer[0].shape[1] if per_outer else 1
    width = ragged_width(per_outer, data.shape[dim]) // k
    moved = data.movedim((outer_dim, dim), (0, 1))
    out = moved.new_zeros((moved.shape[0], k, width) + tuple(moved.shape[2:]))
    for e, positions in enumerate(per_outer):
        n = positions.shape[0]
        out[e, :, :n] = moved[e][positions.t().to(data.device)]
    out = out.flatten(1, 2)
    return out.movedim((0, 1), (outer_dim, dim))


def _slice_tensors(model: nn.Module, plan: dict[str, dict[int, torch.Tensor]],
                   groups: ZeroInvariantGroups, ragged=None) -> dict[str, list[int]]:
    shapes: dict[str, list[int]] = {}
    ragged = ragged or {}
    for name, dims in plan.items():
        with _building(name.rpartition(".")[0], f"slicing {name}"):
            shapes.update(_slice_tensor(model, name, dims, groups, ragged.get(name)))
    return shapes


def _slice_tensor(model: nn.Module, name: str, dims: dict[int, torch.Tensor], groups: ZeroInvariantGroups,
                  per_expert) -> dict[str, list[int]]:
    """Slice one tensor (and its tied aliases) to the kept positions; its new shape per name."""
    shapes: dict[str, list[int]] = {}
    module_path, _, leaf = name.rpartition(".")
    module = model.get_submodule(module_path)
    old = getattr(module, leaf)
    with torch.no_grad():
        data = old.detach()
        for dim, keep in sorted(dims.items()):
            if per_expert is None or dim != per_expert[1]:
                data = data.index_select(dim, keep.to(data.device))
        if per_expert is not None:
            data = _ragged(data, *per_expert)
        data = data.clone(memory_format=torch.contiguous_format)
    if isinstance(old, nn.Parameter):
        new: torch.Tensor = nn.Parameter(data, requires_grad=old.requires_grad)
    else:
        new = data
    for alias in groups.tensor_aliases.get(name, [name]):
        apath, _, aleaf = alias.rpartition(".")
        amodule = model.get_submodule(apath)
        if isinstance(new, nn.Parameter):
            setattr(amodule, aleaf, new)
        else:
            persistent = aleaf not in amodule._non_persistent_buffers_set
            amodule.register_buffer(aleaf, new, persistent=persistent)
        shapes[alias] = list(new.shape)
    return shapes


def _standard_attributes(model: nn.Module, plan, groups: ZeroInvariantGroups) -> dict[str, dict[str, Any]]:
    """Size attributes of the torch / Transformers layers whose tensors were resized."""
    touched = {name.rpartition(".")[0] for name in plan}
    for name in list(plan):
        touched.update(a.rpartition(".")[0] for a in groups.tensor_aliases.get(name, []))
    updates: dict[str, dict[str, Any]] = {}
    for path in touched:
        module = model.get_submodule(path)
        attrs = _layer_sizes(module)
        if attrs:
            updates[path] = attrs
    return updates


def _layer_sizes(module: nn.Module) -> dict[str, Any]:
    weight = getattr(module, "weight", None)
    if isinstance(module, nn.Linear):
        return {"in_features": weight.shape[1], "out_features": weight.shape[0]}
    if isinstance(module, nn.modules.conv._ConvNd):
        # Grouped convolutions lose whole groups (the analysis made them units); the per-group
        # widths stay, so the new group count follows from the new weight.
        groups = module.groups
        if module.transposed:
            if groups > 1:
                groups = weight.shape[0] // (module.in_channels // module.groups)
            return {"in_channels": weight.shape[0], "out_channels": weight.shape[1] * groups, "groups": groups}
        if groups > 1:
            groups = weight.shape[0] // (module.out_channels // module.groups)
        return {"out_channels": weight.shape[0], "in_channels": weight.shape[1] * groups, "groups": groups}
    if isinstance(module, nn.modules.batchnorm._NormBase):
        ref = weight if weight is not None else module.running_mean
        return {"num_features": ref.shape[0]}
    if isinstance(module, nn.GroupNorm):
        per_group = module.num_channels // module.num_groups
        return {"num_channels": weight.shape[0], "num_groups": weight.shape[0] // per_group}
    if isinstance(module, (nn.LayerNorm, nn.RMSNorm)) and weight is not None:
        return {"normalized_shape": tuple(weight.shape)}
    if isinstance(module, nn.Embedding):
        return {"embedding_dim": weight.shape[1]}
    if isinstance(module, nn.PReLU):
        return {"num_parameters": weight.shape[0]}
    if is_gpt2_conv1d(module):
        return {"nf": weight.shape[1], "nx": weight.shape[0]}
    return {}


def is_gpt2_conv1d(module: nn.Module) -> bool:
    """Transformers' GPT-2 style ``Conv1D``: ``y = x @ W + b`` with ``W`` of shape (in, out)."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def _merge(a: dict[str, dict[str, Any]], b: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    out = {k: dict(v) for k, v in a.items()}
    for k, v in b.items():
        out.setdefault(k, {}).update(v)
    return out


def _run(model: nn.Module, inputs: Any) -> list[torch.Tensor]:
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = call_with(model, inputs)
    finally:
        model.train(was_training)
    return _flatten(out)


def _flatten(out: Any) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out.detach()]
    if isinstance(out, dict):
        return [t for v in out.values() for t in _flatten(v)]
    if isinstance(out, (tuple, list)):
        return [t for v in out for t in _flatten(v)]
    return []


def max_relative_difference(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    """Largest |a - b| over all outputs, divided by the largest |a| (the output scale)."""
    if len(a) != len(b):
        raise CompressionError(f"the models return {len(a)} and {len(b)} tensors")
    worst = 0.0
    for x, y in zip(a, b):
        if x.shape != y.shape:
            raise CompressionError(f"output shapes differ: {tuple(x.shape)} vs {tuple(y.shape)}")
        if not x.is_floating_point():
            if not torch.equal(x, y):
                return float("inf")
            continue
        scale = float(x.abs().max()) if x.numel() else 0.0
        diff = float((x.double() - y.double()).abs().max()) if x.numel() else 0.0
        worst = max(worst, diff / scale if scale > 0 else (0.0 if diff == 0 else float("inf")))
    return worst


def _verify(reference: list[torch.Tensor], result: list[torch.Tensor], rtol: float) -> None:
    diff = max_relative_difference(reference, result)
    # A model held in float16 / bfloat16 rounds every op's output to its 8-11 mantissa bits: the
    # sliced and the full model then agree to a few of those units, not to float32's rtol.
    rtol = max([rtol] + [8 * torch.finfo(t.dtype).eps for t in reference if t.is_floating_point()])
    if diff > rtol:
        raise CompressionError(
            f"the compressed model's outputs differ from the sparse model's by {diff:.3g} of their "
            f"scale (> {rtol}); the model uses a construct the analysis did not capture. Please "
            "report it, and exclude the affected layers with GroupConfig.exclude meanwhile")
