"""Shape-only compression on the meta device: groups compress cannot remove are not prunable.

The analysis sees one forward pass; a model can still break when it shrinks (a size written in
its code that no attribute holds, a width it asserts, a kernel that wants aligned strides). After
the analysis, :func:`demote_unremovable` copies the model onto the meta device (no weights in
memory), removes every prunable group with :func:`hf_oto.compress` (keeping one group per
dimension, as compress does), and runs the forward pass on meta inputs. Where it breaks, the
blocks of groups (one layer's heads, one layer's neurons, ...) involved in the failing module are
tried one at a time; those whose removal breaks a shape become unprunable, with a warning naming
the module and the op. The few models that do not run on the meta device (they read tensor
values: ``.tolist()``, an assert on a computed size) are dry-run on a real copy when small enough.
"""

from __future__ import annotations

import copy
import time
import warnings
from dataclasses import replace
from typing import Any

import torch
from torch.utils._pytree import tree_map

from ..graph.inputs import call_with
from ..groups import ZeroInvariantGroups
from .locate import Failure, LastOp, run_located

aten = torch.ops.aten


class _ShapesOnly(LastOp):
    """Meta kernels with the gaps a shape check needs filled.

    ``.item()`` has no value on the meta device: the model gets a neutral one (True, 1) so that
    data-dependent checks (is the mask all ones?) take their usual branch. ``_grouped_mm``'s meta
    kernel only takes bfloat16; its shape rule and the CPU kernel's checks are written out here.
    """

    def run_op(self, func, args, kwargs):
        if func is aten._local_scalar_dense.default and args[0].device.type == "meta":
            x = args[0]
            return True if x.dtype == torch.bool else (1.0 if x.is_floating_point() else 1)
        if func.overloadpacket is aten._grouped_mm and args[0].device.type == "meta":
            return _grouped_mm_shape(*args, **kwargs)
        return func(*args, **kwargs)


def _grouped_mm_shape(a: torch.Tensor, b: torch.Tensor, offs=None, bias=None, out_dtype=None) -> torch.Tensor:
    if a.dim() != 2 or b.dim() != 3:
        return aten._grouped_mm(a.to(torch.bfloat16), b.to(torch.bfloat16), offs, bias, out_dtype).to(a.dtype)
    if a.shape[1] != b.shape[1]:
        raise RuntimeError(f"contraction dimension of mat_a and mat_b must match ({a.shape[1]} vs {b.shape[1]})")
    for t in (a, b):
        if any(n > 1 and s != 1 and (s * t.element_size()) % 16 for n, s in zip(t.shape, t.stride())):
            raise RuntimeError(f"strides should be multiple of 16 bytes (shape {tuple(t.shape)}, strides {t.stride()})")
    return torch.empty(a.shape[0], b.shape[2], dtype=out_dtype or a.dtype, device="meta")


def _meta_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``model`` whose parameters and buffers live on the meta device (no data copied)."""
    memo: dict[int, Any] = {}
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) in memo:
            continue
        meta = torch.empty_like(t, device="meta")
        memo[id(t)] = torch.nn.Parameter(meta, requires_grad=t.requires_grad) if isinstance(t, torch.nn.Parameter) else meta
    return copy.deepcopy(model, memo)


def _to_meta(inputs: Any) -> Any:
    return tree_map(lambda t: torch.empty_like(t, device="meta") if isinstance(t, torch.Tensor) else t, inputs)


class _CannotCopy(Exception):
    pass


#: A model that does not run on the meta device (``.tolist()`` of a tensor, an assert on values)
#: is dry-run on a real copy instead when its tensors take at most this many bytes.
REAL_COPY_LIMIT = 1 << 30


class _Trial:
    """Removes a set of groups from a fresh copy (meta, or real when ``real``) and runs it."""

    def __init__(self, model: torch.nn.Module, groups: ZeroInvariantGroups, inputs: Any, real: bool = False) -> None:
        self.model, self.groups, self.real = model, groups, real
        self.inputs = inputs if real else _to_meta(inputs)
        self.runs = 0

    def __call__(self, remove: torch.Tensor | None) -> Failure | None:
        from .core import compress

        self.runs += 1
        try:
            target = copy.deepcopy(self.model) if self.real else _meta_copy(self.model)
        except Exception as exc:  # hooks or handles that do not copy: nothing can be checked
            raise _CannotCopy(f"dry run skipped: the model cannot be copied ({type(exc).__name__}: {exc})") from exc
        target.eval()
        if remove is not None and remove.any():
            try:
                compress(target, self.groups, remove=remove, inplace=True, verify=False)
            except Exception as exc:  # a failure to build is a failure of these groups too
                return Failure(getattr(exc, "module", ""), "compress", " ".join(str(exc).split())[:300])
        with torch.no_grad(), torch.fx.experimental._config.patch(meta_nonzero_assume_all_nonzero=True):
            return run_located(target, lambda: call_with(target, self.inputs), _ShapesOnly())


def _demote_rebuilt_buffers(model: torch.nn.Module, groups: ZeroInvariantGroups) -> ZeroInvariantGroups:
    """Groups that slice a non-persistent buffer cannot be saved: the checkpoint does not hold the
    buffer, and a reloaded model rebuilds it at full size from its config (sinusoidal position
    tables, relative-coordinate tables)."""
    transient = set()
    for path, module in model.named_modules():
        transient.update(f"{path}.{name}" if path else name for name in module._non_persistent_buffers_set)
    reasons: dict[int, str] = {}
    for s in groups.slices:
        if not s.is_param and not s.kept and any(a in transient for a in groups.tensor_aliases.get(s.tensor, [s.tensor])):
            why = (f"compress cannot remove it: it slices the non-persistent buffer '{s.tensor}', which a "
                   "reloaded model rebuilds at full size")
            for g in s.group.unique().tolist():
                if groups[g].prunable:
                    reasons.setdefault(g, why)
    if not reasons:
        return groups
    new = [replace(g, prunable=False, reason=reasons[g.index]) if g.index in reasons else g for g in groups]
    warnings.warn(f"hf_oto: {len(reasons)} groups demoted to unprunable: they slice non-persistent buffers "
                  f"({sorted(set(reasons.values()))[0]})", stacklevel=3)
    return _rebuilt(groups, new)


def _rebuilt(groups: ZeroInvariantGroups, new: list) -> ZeroInvariantGroups:
    return ZeroInvariantGroups(
        new, groups.slices, groups.tensor_shapes, groups.tensor_aliases, config=groups.config,
        bindings=groups.bindings, unprunable_tensors=groups.unprunable_tensors,
        unsupported_ops=groups.unsupported_ops, norm_paddings=groups.norm_paddings,
        expert_routings=groups.expert_routings, notes=groups.notes, model_class=groups.model_class,
        example_inputs=groups.example_inputs, analysis_seconds=groups.analysis_seconds)


def _size_in_bytes(model: torch.nn.Module) -> int:
    tensors = {id(t): t for t in list(model.parameters()) + list(model.buffers())}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def _block_modules(groups: ZeroInvariantGroups, block: torch.Tensor, n_blocks: int) -> list[set[str]]:
    """Per block of prunable groups, the modules that change when it goes."""
    touched: list[set[str]] = [set() for _ in range(n_blocks)]

    def add(module: str, gids: torch.Tensor) -> None:
        for b in block[gids[gids >= 0]].unique().tolist():
            if b >= 0:
                touched[b].add(module)

    for s in groups.slices:
        add(s.tensor.rpartition(".")[0], s.group)
    for b in groups.bindings:
        add(b.module, b.group)
    for p in groups.norm_paddings:
        add(p.module, p.group)
    for r in groups.expert_routings:
        add(r.module, r.group)
    return touched


def _near(module: str, touched: set[str]) -> bool:
    """``touched`` has ``module``, a module inside it, or the module it belongs to."""
    return any(t == module or t.startswith(module + ".") or module.startswith(t + ".") for t in touched)


def demote_unremovable(model: torch.nn.Module, groups: ZeroInvariantGroups, inputs: Any) -> ZeroInvariantGroups:
    """Groups whose removal breaks the model's forward pass become unprunable (see module doc).

    Returns ``groups`` itself when nothing breaks, else a copy with the demoted groups' reasons.
    Runs in a second or two on a 7B-parameter model analysed on the meta device.

    Example:
        >>> groups = demote_unremovable(model, groups, groups.example_inputs)     # doctest: +SKIP
        >>> [g.reason for g in groups if "compress cannot remove" in g.reason]   # doctest: +SKIP
    """
    from .core import one_thread

    start = time.perf_counter()
    with one_thread():  # meta tensors compute nothing; threads would only wait on each other
        groups = _demote_rebuilt_buffers(model, groups)
        prunable = groups.prunable_mask
        if not prunable.any():
            return groups
        try:
            groups = _demote(model, groups, inputs, prunable)
        except _CannotCopy as exc:
            groups.notes.append(str(exc))
    groups.dry_run_seconds = time.perf_counter() - start
    return groups


def _demote(model: torch.nn.Module, groups: ZeroInvariantGroups, inputs: Any,
            prunable: torch.Tensor) -> ZeroInvariantGroups:
    trial = _Trial(model, groups, inputs)
    failure = trial(prunable)
    if failure is None:
        return groups
    baseline = trial(None)
    if baseline is not None:
        if _size_in_bytes(model) > REAL_COPY_LIMIT or any(p.is_meta for p in model.parameters()):
            groups.notes.append(f"dry run skipped: the model does not run on the meta device ({baseline})")
            return groups
        trial = _Trial(model, groups, inputs, real=True)
        failure = trial(prunable)
        if failure is None:
            return groups

    keys = groups.layer_blocks()
    block, n_blocks = keys[0], len(keys[1])
    touched = _block_modules(groups, block, n_blocks)
    sizes = torch.bincount(block[block >= 0], minlength=n_blocks)
    removed = set(range(n_blocks))
    demoted: dict[int, Failure] = {}

    def mask(blocks: set[int]) -> torch.Tensor:
        chosen = torch.zeros(n_blocks + 1, dtype=torch.bool)
        chosen[list(blocks)] = True
        return chosen[block] & prunable  # block -1 maps to the extra False entry

    while failure is not None:
        candidates = sorted((b for b in removed if _near(failure.module, touched[b])), key=lambda b: int(sizes[b]))
        if not candidates:
            candidates = _bisect(trial, removed, mask)
        fixed = None
        for b in candidates if len(candidates) > 1 else []:
            after = trial(mask(removed - {b}))
            if after is None or (after.module, after.op) != (failure.module, failure.op):  # moved on
                fixed, failure_after = b, after
                break
        if fixed is None:  # no single block: all of them go back
            for b in candidates:
                demoted[b] = failure
            removed -= set(candidates)
            failure = trial(mask(removed)) if removed else None
        else:
            demoted[fixed] = failure
            removed.discard(fixed)
            failure = failure_after
    return _demoted(groups, block, demoted)


def _bisect(trial: _Trial, removed: set[int], mask) -> list[int]:
    """One block whose removal, with the blocks before it, makes the failure appear."""
    order = sorted(removed)
    lo, hi = 0, len(order)  # removing order[:hi] fails, order[:lo] does not
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if trial(mask(set(order[:mid]))) is None:
            lo = mid
        else:
            hi = mid
    return [order[hi - 1]]


def _demoted(groups: ZeroInvariantGroups, block: torch.Tensor, demoted: dict[int, Failure]) -> ZeroInvariantGroups:
    by_failure: dict[Failure, list[int]] = {}
    for b, failure in demoted.items():
        by_failure.setdefault(failure, []).append(b)
    new = list(groups.groups)
    for failure, blocks in by_failure.items():
        members = torch.isin(block, torch.tensor(blocks)).nonzero().flatten().tolist()
        reason = f"compress cannot remove it: after removal, {failure}"
        for g in members:
            new[g] = replace(new[g], prunable=False, reason=reason)
        kinds = sorted({new[g].kind for g in members})
        warnings.warn(f"hf_oto: {len(members)} {'/'.join(kinds)} groups demoted to unprunable: removing them, "
                      f"{failure}", stacklevel=3)
    return _rebuilt(groups, new)
