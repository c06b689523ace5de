"""Export fake-quantized layers to integer codes + codebooks, and measure the real compression."""

from __future__ import annotations

import copy
import json
import math
import os
import struct
from typing import Any

import torch
from torch import nn

from ...compress.hf_oto_layers_opq import OPQConv, OPQConv1D, OPQEmbedding, OPQLayer, OPQLinear, pack_bits
from ...compress.manifest import update_manifest
from .allocation import OPQAllocation, allocate
from .config import OPQConfig
from .quantizer import OPQQuantizer, attach_quantizers, quantized_modules

_CLASSES = {"linear": OPQLinear, "conv1d_hf": OPQConv1D, "conv": OPQConv, "embedding": OPQEmbedding}


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _exported_layer(module: nn.Module, q: OPQQuantizer) -> OPQLayer:
    weight = module.parametrizations.weight.original.detach()
    codes = q.codes(weight)
    kept = codes[q.mask]
    cls = _CLASSES[q.kind]
    kwargs: dict[str, Any] = dict(
        weight_shape=list(weight.shape), bits=q.bits, num_kept=int(kept.numel()), has_mask=q.has_mask,
        num_scales=int(q.scales.numel()), scale_dtype=_dtype_name(q.scales.dtype),
        has_bias=getattr(module, "bias", None) is not None, weight_dtype=_dtype_name(weight.dtype),
        num_outliers=int(q.outlier_index.numel()))
    if q.kind == "conv":
        kwargs.update(stride=list(module.stride), dilation=list(module.dilation), groups=module.groups,
                      padding=module.padding if isinstance(module.padding, str) else list(module.padding),
                      padding_mode=module.padding_mode,
                      reversed_padding=list(module._reversed_padding_repeated_twice))
    elif q.kind == "embedding":
        kwargs.update(padding_idx=module.padding_idx, scale_grad_by_freq=module.scale_grad_by_freq,
                      sparse=module.sparse)
    layer = cls(**kwargs).to(weight.device)
    with torch.no_grad():
        layer.codes.copy_(pack_bits(kept, q.bits))
        if q.has_mask:
            layer.mask.copy_(pack_bits(q.mask.reshape(-1).to(torch.uint8), 1))
        layer.codebook.copy_(q.codebook)
        layer.scales.copy_(q.scales)
        if q.outlier_index.numel():
            layer.outlier_index.copy_(q.outlier_index.to(torch.int32))
            layer.outlier_value.copy_(weight.reshape(-1)[q.outlier_index].half())
        if layer.bias is not None:
            layer.bias.copy_(module.bias.detach())
            layer.bias.requires_grad_(module.bias.requires_grad)
    return layer


def export(model: nn.Module, *, inplace: bool = False) -> nn.Module:
    """Replace every layer with an attached OPQ quantizer by its integer-code layer.

    The result computes exactly what the fake-quantized model computes (same float32 weights,
    same ops); it saves with ``save_pretrained`` / :func:`hf_oto.save_pretrained` as packed
    ``uint8`` codes and masks, float32 codebooks and float16 scales, recorded in the structure
    manifest so that ``from_pretrained`` rebuilds it.

    Example:
        >>> attach_quantizers(model, allocate(model, target_rate=8))   # doctest: +SKIP
        >>> ...fine-tune...                                             # doctest: +SKIP
        >>> small = export(model)                                       # doctest: +SKIP
        >>> small.save_pretrained("out/")                               # doctest: +SKIP
    """
    target = model if inplace else copy.deepcopy(model)
    found = quantized_modules(target)
    if not found:
        raise ValueError("the model has no OPQ quantizer attached: call attach_quantizers (or use quantize)")
    replaced = {}
    for name, module, q in found:
        layer = _exported_layer(module, q)
        target.set_submodule(name, layer)
        replaced[name] = layer
    update_manifest(target, modules=replaced)
    return target


def quantize(model: nn.Module, config: OPQConfig | None = None, *, allocation: OPQAllocation | None = None,
             inplace: bool = False, **kwargs: Any) -> nn.Module:
    """One-shot pruning-quantization: allocate, quantize and export, with no data and no training.

    Works on any model, including one already compressed by :func:`hf_oto.compress` (run it as a
    post-step of structured pruning). Options are :class:`OPQConfig` fields.

    Example:
        >>> small = quantize(model, target_rate=8, distribution="auto")   # doctest: +SKIP
        >>> compression_report(small)["compression_rate"]                 # doctest: +SKIP
        8.0
    """
    target = model if inplace else copy.deepcopy(model)
    if allocation is None:
        allocation = allocate(target, config, **kwargs)
    elif config is not None or kwargs:
        raise ValueError("pass either an allocation or allocation options, not both")
    attach_quantizers(target, allocation)
    return export(target, inplace=True)


def compression_report(model: nn.Module) -> dict[str, Any]:
    """The real compression of an exported model: per layer and in total.

    ``compression_rate = 32 * quantized weights / storage bits`` with the storage of
    :mod:`hf_oto.methods.opq.allocation` (mask + codes + scales + codebook + outliers), ``bytes`` the bytes
    of those tensors as saved (each packed tensor rounded up to whole bytes), and
    ``other_parameter_bytes`` what the rest of the model (biases, unquantized layers) stores.

    Example:
        >>> r = compression_report(small)                         # doctest: +SKIP
        >>> r["bits_per_weight"], r["compression_rate"]           # doctest: +SKIP
        (4.0, 8.0)
    """
    layers, numel, bits, nbytes, kept = [], 0, 0, 0, 0
    opq_tensors = set()
    for name, module in model.named_modules():
        if not isinstance(module, OPQLayer):
            continue
        n = math.prod(module.weight_shape)
        b = module.storage_bits()
        stored = (module.codes, module.mask, module.scales, module.codebook, module.outlier_index, module.outlier_value)
        by = sum(t.numel() * t.element_size() for t in stored)
        layers.append({"name": name, "bits": module.bits, "numel": n, "kept": module.num_kept,
                       "bits_per_weight": b / n, "bytes": by})
        numel, bits, nbytes, kept = numel + n, bits + b, nbytes + by, kept + module.num_kept
        opq_tensors.update(id(t) for t in stored)
    if not layers:
        raise ValueError("the model has no exported OPQ layer")
    others = {id(t): t for t in list(model.parameters()) + list(model.buffers()) if id(t) not in opq_tensors}
    return {"layers": layers, "quantized_weights": numel, "kept_weights": kept, "storage_bits": bits,
            "bits_per_weight": bits / numel, "compression_rate": 32.0 * numel / bits, "bytes": nbytes,
            "prune_ratio": 1.0 - kept / numel,
            "other_parameter_bytes": sum(t.numel() * t.element_size() for t in others.values())}


def safetensors_tensor_bytes(path: str | os.PathLike) -> dict[str, int]:
    """Bytes of every tensor in a ``.safetensors`` file (or in ``model.safetensors`` of a folder),
    read from the file header: what the tensors really occupy on disk.

    Example:
        >>> sizes = safetensors_tensor_bytes("out/")                          # doctest: +SKIP
        >>> sizes["bert.encoder.layer.0.attention.self.query.codes"]          # doctest: +SKIP
        73728
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        path = os.path.join(path, "model.safetensors")
    with open(path, "rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(size))
    return {k: v["data_offsets"][1] - v["data_offsets"][0] for k, v in header.items() if k != "__metadata__"}
