"""Measuring models: parameters, FLOPs and CPU latency, and what a set of zero groups would save."""

from __future__ import annotations

import copy
import math
import statistics
import time
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from .graph.inputs import call_with
from .groups import ZeroInvariantGroups

aten = torch.ops.aten


def _attention_flops(query_shape, key_shape, value_shape, *args, **kwargs) -> int:
    """Two batched products (q k^T and p v), each a multiply-add per element."""
    *batch, heads, length, dim = query_shape
    keys, value_dim = key_shape[-2], value_shape[-1]
    batch_size = math.prod(batch) if batch else 1
    return 2 * batch_size * heads * length * keys * (dim + value_dim)


def _shapes_formula(fn):
    def formula(*args, out_shape=None, **kwargs):
        return fn(*[a.shape if isinstance(a, torch.Tensor) else a for a in args[:3]])
    return formula


# FlopCounterMode does not know every fused attention kernel; count them like their maths.
_CUSTOM_FLOPS = {
    getattr(aten, name): _shapes_formula(_attention_flops)
    for name in ("_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_efficient_attention",
                 "_scaled_dot_product_flash_attention", "_scaled_dot_product_cudnn_attention")
    if hasattr(aten, name)
}


def num_parameters(model: nn.Module) -> int:
    """Parameters, counting tied weights once."""
    return sum(p.numel() for p in model.parameters())


def count_flops(model: nn.Module, inputs: Any, by_module: bool = False) -> int | tuple[int, dict[str, int]]:
    """Forward FLOPs on ``inputs`` (a multiply-add counts 2), optionally per module (subtree).

    Example:
        >>> flops = count_flops(model, {"input_ids": ids})          # doctest: +SKIP
    """
    was_training = model.training
    model.eval()
    counter = FlopCounterMode(display=False, custom_mapping=_CUSTOM_FLOPS)
    try:
        with torch.no_grad(), counter:
            call_with(model, inputs)
    finally:
        model.train(was_training)
    total = counter.get_total_flops()
    if not by_module:
        return total
    root = type(model).__name__
    per_module: dict[str, int] = {}
    for name, ops in counter.get_flop_counts().items():
        if name == "Global":
            continue
        path = name[len(root) + 1:] if name.startswith(root + ".") else ("" if name == root else name)
        per_module[path] = int(sum(ops.values()))
    return total, per_module


def measure_latency(*models: nn.Module, inputs: Any, repeats: int = 20, warmup: int = 3,
                    number: int = 1) -> list[float]:
    """Median seconds per forward pass on CPU of each model, measured interleaved so that
    warm-up, caches and machine load affect all of them alike (models are copied to CPU if needed).
    Each of the ``repeats`` samples times ``number`` passes (more for models too fast to time once).

    Example:
        >>> dense_s, small_s = measure_latency(model, small, inputs=batch)    # doctest: +SKIP
    """
    prepared = []
    for model in models:
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        prepared.append((copy.deepcopy(model).to("cpu") if device.type != "cpu" else model, model.training))
    inputs = _to_cpu(inputs)
    times: list[list[float]] = [[] for _ in models]
    try:
        for model, _ in prepared:
            model.eval()
        with torch.no_grad():
            for i in range(warmup + repeats):
                for k, (model, _) in enumerate(prepared):
                    start = time.perf_counter()
                    for _ in range(number):
                        call_with(model, inputs)
                    if i >= warmup:
                        times[k].append((time.perf_counter() - start) / number)
    finally:
        for model, was_training in prepared:
            model.train(was_training)
    return [statistics.median(t) for t in times]


#: Widths that bf16 / fp16 GPU matrix kernels take on their fast paths: 16 bytes, 8 half-precision
#: numbers. Measured on an H200 (docs/gpu.md): BERT-base's shape at half the FLOPs ran 0.74x the
#: dense model's speed with unaligned widths and 1.50x with multiples of 8, at batch 32.
GPU_ALIGNMENT = 8

_WIDTH_ATTRIBUTES = ("in_features", "out_features", "in_channels", "out_channels", "nf", "nx")


def unaligned_widths(dense: nn.Module, small: nn.Module, multiple: int = GPU_ALIGNMENT) -> list[str]:
    """The widths that compression changed and left off a multiple of ``multiple`` (where the dense
    model had one), as ``"module.attribute=width"``: linear features, conv channels, GPT-2 ``Conv1D``.

    Example:
        >>> unaligned_widths(torch.nn.Linear(16, 16), torch.nn.Linear(16, 13))
        ['out_features=13']
    """
    dense_modules = dict(dense.named_modules())
    found = []
    for name, module in small.named_modules():
        before = dense_modules.get(name)
        if before is None:
            continue
        for attr in _WIDTH_ATTRIBUTES:
            old, new = getattr(before, attr, None), getattr(module, attr, None)
            if isinstance(old, int) and isinstance(new, int) and new != old and old % multiple == 0 \
                    and new % multiple:
                found.append(f"{name}.{attr}={new}" if name else f"{attr}={new}")
    return found


def _to_cpu(inputs: Any) -> Any:
    if isinstance(inputs, torch.Tensor):
        return inputs.cpu()
    if isinstance(inputs, Mapping):  # a BatchEncoding too
        return {k: _to_cpu(v) for k, v in inputs.items()}
    if isinstance(inputs, (tuple, list)):
        return type(inputs)(_to_cpu(v) for v in inputs)
    return inputs


class CompressionEstimator:
    """Parameters and FLOPs the model would keep if the given groups were removed, without
    building the compressed model: what the trainer logs while training.

    The counts come from :class:`hf_oto.costs.GroupCosts`, which the optimizers' FLOPs and
    parameter targets use too: they equal what :func:`num_parameters` and :func:`count_flops`
    report for the compressed model.
    """

    def __init__(self, model: nn.Module, groups: ZeroInvariantGroups, inputs: Any) -> None:
        from .costs import GroupCosts  # costs builds on this module's counters

        self.groups = groups
        self.costs = GroupCosts.measure(model, groups, inputs)
        self.total_flops = self.costs.total("flops")
        self.total_params = self.costs.total("params")

    def estimate(self, remove: torch.Tensor) -> tuple[int, int]:
        """``(kept parameters, kept FLOPs)`` if the groups in ``remove`` were removed."""
        remove = self.groups.feasible_removal(remove)
        return (int(round(self.costs.kept(remove, "params"))), int(round(self.costs.kept(remove, "flops"))))
