"""The fixed quantizer of a layer during fine-tuning (straight-through), and its construction.

:class:`OPQQuantizer` is a ``torch.nn.utils.parametrize`` parametrization of a layer's ``weight``:
the module keeps its class and ``forward`` (any ``nn.Linear``, convolution, GPT-2 ``Conv1D`` or
embedding works the same), the float weight stays the trainable parameter
(``module.parametrizations.weight.original``), and ``module.weight`` becomes its quantized value:

    u = w / s_c;  j = sign bit * M + clamp(floor((|u| - t) / step), 0, M - 1)
    weight = where(mask, codebook[j] * s_c, 0);  weight[outliers] = fp16(w[outliers])

with the mask, outlier positions, scales, threshold, step and codebook fixed buffers. The gradient goes straight
through the rounding (``d weight / d w = mask``): pruned weights get no gradient and stay zero,
the allocation never changes, only the float weights move (and may change level).
"""

from __future__ import annotations

import torch
from torch import nn

from ...compress.hf_oto_layers_opq import dequantize, storage_bits
from . import theory
from .allocation import LayerAllocation, fit_scales, normalized_magnitudes, normalized_weight


class OPQQuantizer(nn.Module):
    """Fake quantization with a straight-through gradient (see the module doc).

    Example:
        >>> q = build_quantizer(layer.weight, allocation["fc1"])           # doctest: +SKIP
        >>> torch.nn.utils.parametrize.register_parametrization(layer, "weight", q)  # doctest: +SKIP
    """

    def __init__(self, *, mask: torch.Tensor, scales: torch.Tensor, codebook: torch.Tensor, threshold: float,
                 step: float, bits: int, channel_dim: int, kind: str, family: str, has_mask: bool,
                 outlier_index: torch.Tensor | None = None) -> None:
        super().__init__()
        self.register_buffer("mask", mask.bool())
        if outlier_index is None:
            outlier_index = torch.zeros(0, dtype=torch.int64, device=mask.device)
        self.register_buffer("outlier_index", outlier_index.long())
        self.register_buffer("scales", scales)
        self.register_buffer("codebook", codebook.float())
        self.register_buffer("threshold", torch.tensor(float(threshold), dtype=torch.float32))
        self.register_buffer("step", torch.tensor(float(step), dtype=torch.float32))
        self.bits = int(bits)
        self.channel_dim = int(channel_dim)
        self.kind = kind
        self.family = family
        self.has_mask = bool(has_mask)

    @property
    def num_kept(self) -> int:
        return int(self.mask.sum())

    @torch.no_grad()
    def codes(self, weight: torch.Tensor) -> torch.Tensor:
        """The codebook index of every weight (``int64``, weight shape; arbitrary where pruned)."""
        levels = 2 ** (self.bits - 1)
        u = normalized_weight(weight, self.channel_dim, self.scales)
        magnitude = torch.floor((u.abs() - self.threshold) / self.step).clamp(0, levels - 1).long()
        return magnitude + levels * (u < 0).long()

    def quantized(self, weight: torch.Tensor) -> torch.Tensor:
        """The quantized weight, without gradient (the exported layer's weight, bit for bit)."""
        with torch.no_grad():
            return self.forward(weight.detach())

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        values = dequantize(self.codebook, self.codes(weight), self.scales, self.channel_dim).to(weight.dtype)
        # ``values + (w - w.detach())`` equals ``values`` exactly (adding +0.0) with gradient 1 to w.
        straight = values + (weight - weight.detach())
        out = torch.where(self.mask, straight, torch.zeros((), dtype=values.dtype, device=values.device))
        if self.outlier_index.numel():
            w = weight.reshape(-1)[self.outlier_index]
            # Outliers are stored as fp16: train through the same rounding.
            exact = w.detach().half().to(weight.dtype) + (w - w.detach())
            out = out.reshape(-1).index_put((self.outlier_index,), exact).view(weight.shape)
        return out

    def extra_repr(self) -> str:
        return (f"bits={self.bits}, family={self.family}, kept={self.num_kept}/{self.mask.numel()}, "
                f"threshold={float(self.threshold):.4g}, step={float(self.step):.4g}")


def make_codebook(threshold: float, step: float, bits: int) -> torch.Tensor:
    """The ``2**bits`` levels ``+-(t + (m + 1/2) step)``: code ``m`` positive, ``m + M`` negative."""
    levels = 2 ** (bits - 1)
    m = torch.arange(levels, dtype=torch.float64)
    magnitude = threshold + (m + 0.5) * step
    return torch.cat([magnitude, -magnitude]).float()


def build_quantizer(weight: torch.Tensor, layer: LayerAllocation, channel_scales: bool = True) -> OPQQuantizer:
    """The fixed quantizer that realises ``layer``'s allocation on ``weight``.

    The mask prunes exactly ``numel - num_kept`` weights, those of smallest normalized magnitude
    ``|w| / s_c`` (so storage is what the allocation counted); levels start at the smallest kept
    magnitude and use the step that minimises the closed-form error for the fitted law there.
    """
    cdim = layer.channel_dim
    if list(weight.shape) != list(layer.shape):
        raise ValueError(f"{layer.name}: weight shape {list(weight.shape)} differs from the allocation's {layer.shape}")
    scales = fit_scales(weight, cdim, layer.family, channel_scales)
    if scales.numel() != layer.num_scales:
        raise ValueError(f"{layer.name}: {scales.numel()} scales but the allocation has {layer.num_scales} "
                         "(channel_scales differs?)")
    flat = normalized_magnitudes(weight, cdim, scales).reshape(-1)
    mask = torch.ones(flat.numel(), dtype=torch.bool, device=weight.device)
    threshold = 0.0
    if layer.has_mask:
        pruned = flat.numel() - layer.num_kept
        order = torch.argsort(flat, stable=True)
        mask[order[:pruned]] = False
        if layer.num_kept:
            threshold = float(flat[order[pruned]])
    outliers = torch.topk(flat, layer.num_outliers).indices.sort().values if layer.num_outliers else None
    if outliers is not None and not bool(mask[outliers].all()):
        raise ValueError(f"{layer.name}: the allocation prunes some of its own outliers")
    step = float(theory.optimal_step(layer.family, layer.bits, min(threshold, theory.GAUSSIAN_T_MAX)))
    return OPQQuantizer(mask=mask.view(weight.shape), scales=scales.to(weight.device),
                        codebook=make_codebook(threshold, step, layer.bits).to(weight.device),
                        threshold=threshold, step=step, bits=layer.bits, channel_dim=cdim, kind=layer.kind,
                        family=layer.family, has_mask=layer.has_mask, outlier_index=outliers)


def opq_quantizer(module: nn.Module) -> OPQQuantizer | None:
    """The :class:`OPQQuantizer` attached to ``module.weight``, if any."""
    plist = getattr(getattr(module, "parametrizations", None), "weight", None)
    if plist is None:
        return None
    found = [p for p in plist if isinstance(p, OPQQuantizer)]
    return found[0] if found else None


def quantized_modules(model: nn.Module) -> list[tuple[str, nn.Module, OPQQuantizer]]:
    """``(name, module, quantizer)`` of every module with an attached OPQ quantizer."""
    out = []
    for name, module in model.named_modules():
        q = opq_quantizer(module)
        if q is not None:
            out.append((name, module, q))
    return out


def attach_quantizers(model: nn.Module, allocation) -> nn.Module:
    """Attach each layer's fixed quantizer (in place) and zero its pruned weights.

    After this, the model trains as usual: every forward uses the quantized weights, gradients go
    straight through to the float weights, masks and codebooks stay fixed.

    Example:
        >>> attach_quantizers(model, allocate(model, target_rate=8))   # doctest: +SKIP
    """
    from torch.nn.utils import parametrize

    for layer in allocation:
        module = model.get_submodule(layer.name)
        if opq_quantizer(module) is not None:
            raise ValueError(f"{layer.name} already has an OPQ quantizer")
        if list(module.weight.shape) != list(layer.shape):
            raise ValueError(f"{layer.name}: weight shape {list(module.weight.shape)} differs from the "
                             f"allocation's {layer.shape}")
        quantizer = build_quantizer(module.weight, layer, allocation.config.channel_scales)
        with torch.no_grad():
            module.weight.mul_(quantizer.mask)
        parametrize.register_parametrization(module, "weight", quantizer)
    return model


def quantization_stats(model: nn.Module) -> dict[str, float]:
    """Bits per weight, compression rate and pruning ratio of the attached quantizers (what the
    exported model will store; the ``metrics`` of :class:`OPQMethod`).

    Example:
        >>> quantization_stats(attach_quantizers(model, alloc))["opq_compression_rate"]  # doctest: +SKIP
        8.0
    """
    numel = bits = kept = 0
    for _, module, q in quantized_modules(model):
        n = q.mask.numel()
        k = q.num_kept
        numel += n
        kept += k
        bits += storage_bits(n, k, q.bits, q.has_mask, q.scales.numel() * q.scales.element_size() * 8,
                             q.outlier_index.numel())
    if not numel:
        return {}
    return {"opq_bits_per_weight": bits / numel, "opq_compression_rate": 32.0 * numel / bits,
            "opq_prune_ratio": 1.0 - kept / numel}

