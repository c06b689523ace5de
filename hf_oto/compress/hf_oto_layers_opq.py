"""Layers that the OPQ method puts into a compressed model (see hf_oto_layers.py). torch only.

An OPQ layer stores its weight as integer codes into one codebook shared by every channel:

* ``codes``: the codes of the kept weights, ``bits`` bits each, bit-packed into ``uint8``
  (row-major order of the weight, pruned positions skipped);
* ``mask``: the pruning mask, one bit per weight packed into ``uint8`` (empty when the layer keeps
  every weight, so it costs nothing);
* ``codebook``: the ``2**bits`` values of the layer (float32), the same for every channel;
* ``scales``: one scale per output channel (float16 unless a scale does not fit), which maps each
  channel into the common range of the codebook (one scale for the whole layer when the method
  ran with ``channel_scales=False``);
* ``outlier_index`` / ``outlier_value``: the few weights far beyond the fitted law (int32 flat
  positions, float16 values), stored exactly instead of being clipped;
* the original bias, unquantized.

The dense weight is ``where(mask, codebook[code] * scale[channel], 0)`` with the outliers written
over it; it is rebuilt on first use and cached until a buffer changes. This file travels with Transformers' remote code, so it imports
only ``torch``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

_SCALE_DTYPES = {"float16": torch.float16, "float32": torch.float32}


def _numel(shape: list[int]) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def pack_bits(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack non-negative integers ``< 2**bits`` into a ``uint8`` stream, LSB first.

    ``len(result) == ceil(values.numel() * bits / 8)``: the bytes on disk are the real cost.

    Example:
        >>> pack_bits(torch.tensor([1, 2, 3]), 2)
        tensor([57], dtype=torch.uint8)
    """
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be in [1, 8], got {bits}")
    flat = values.reshape(-1).to(torch.uint8)
    if bits == 8:
        return flat.clone()
    shifts = torch.arange(bits, dtype=torch.uint8, device=flat.device)
    stream = ((flat[:, None] >> shifts) & 1).reshape(-1)
    pad = (-stream.numel()) % 8
    if pad:
        stream = torch.cat([stream, stream.new_zeros(pad)])
    weights = (1 << torch.arange(8, dtype=torch.int32, device=flat.device))
    return (stream.view(-1, 8).to(torch.int32) * weights).sum(1).to(torch.uint8)


def unpack_bits(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: the first ``count`` values as ``int64``."""
    if bits == 8:
        return packed[:count].to(torch.int64)
    shifts = torch.arange(8, dtype=torch.uint8, device=packed.device)
    stream = ((packed[:, None] >> shifts) & 1).reshape(-1)[: count * bits]
    weights = (1 << torch.arange(bits, dtype=torch.int64, device=packed.device))
    return (stream.view(count, bits).to(torch.int64) * weights).sum(1)


def storage_bits(numel: int, num_kept: int, bits: int, has_mask: bool, scale_bits: int, num_outliers: int) -> int:
    """Bits of one quantized weight as the compression rate defines them: the mask (one bit per
    weight, if any), the codes of the kept weights, the scales (``scale_bits`` in all), the float32
    codebook of ``2 ** bits`` entries and 48 bits per outlier (index and fp16 value)."""
    return (numel if has_mask else 0) + num_kept * bits + scale_bits + 32 * 2 ** bits + 48 * num_outliers


def dequantize(codebook: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, channel_dim: int) -> torch.Tensor:
    """``codebook[codes] * scale`` of each weight's channel, in float32.

    Shared by the fine-tuning quantizer and the exported layers, so that both compute the very
    same float32 values (exported models then reproduce the fine-tuned outputs bit for bit).
    """
    return codebook[codes] * channel_scales(scales, codes.dim(), channel_dim)


def channel_scales(scales: torch.Tensor, ndim: int, channel_dim: int) -> torch.Tensor:
    """``scales`` in float32, shaped to broadcast along ``channel_dim`` of an ``ndim``-dim weight
    (one scale: a scalar for every channel)."""
    shape = [1] * ndim
    if scales.numel() > 1:
        shape[channel_dim] = scales.numel()
    return scales.to(torch.float32).reshape(shape)


class OPQLayer(nn.Module):
    """Base of the exported OPQ layers: packed codes, mask, codebook and scales (see module doc)."""

    #: Name in ``LAYER_TYPES`` and the manifest; set by subclasses.
    type_name = ""
    #: Dimension of the weight that indexes output channels.
    channel_dim = 0

    def __init__(self, weight_shape: list[int], bits: int, num_kept: int, has_mask: bool, num_scales: int,
                 scale_dtype: str = "float16", has_bias: bool = True, weight_dtype: str = "float32",
                 num_outliers: int = 0) -> None:
        super().__init__()
        if not 1 <= bits <= 8:
            raise ValueError(f"bits must be in [1, 8], got {bits}")
        numel = _numel(weight_shape)
        self.weight_shape = [int(s) for s in weight_shape]
        self.bits = int(bits)
        self.num_kept = int(num_kept)
        self.has_mask = bool(has_mask)
        self.weight_dtype = weight_dtype
        self.register_buffer("codes", torch.zeros(_ceil_div(self.num_kept * self.bits, 8), dtype=torch.uint8))
        self.register_buffer("mask", torch.zeros(_ceil_div(numel, 8) if has_mask else 0, dtype=torch.uint8))
        self.register_buffer("codebook", torch.zeros(2 ** self.bits, dtype=torch.float32))
        self.register_buffer("scales", torch.zeros(num_scales, dtype=_SCALE_DTYPES[scale_dtype]))
        self.register_buffer("outlier_index", torch.zeros(num_outliers, dtype=torch.int32))
        self.register_buffer("outlier_value", torch.zeros(num_outliers, dtype=torch.float16))
        out = self.weight_shape[self.channel_dim]
        self.bias = nn.Parameter(torch.zeros(out, dtype=getattr(torch, weight_dtype))) if has_bias else None
        self._cache: tuple[Any, torch.Tensor] | None = None

    # -- manifest ---------------------------------------------------------------------------------
    def manifest_spec(self) -> dict[str, Any]:
        return {
            "type": self.type_name,
            "weight_shape": list(self.weight_shape),
            "bits": self.bits,
            "num_kept": self.num_kept,
            "has_mask": self.has_mask,
            "num_scales": int(self.scales.numel()),
            "scale_dtype": str(self.scales.dtype).removeprefix("torch."),
            "has_bias": self.bias is not None,
            "weight_dtype": self.weight_dtype,
            "num_outliers": int(self.outlier_index.numel()),
            **self._op_spec(),
        }

    def _op_spec(self) -> dict[str, Any]:
        return {}

    @classmethod
    def from_manifest(cls, spec: dict[str, Any]) -> "OPQLayer":
        kwargs = {k: v for k, v in spec.items() if k != "type"}
        return cls(**kwargs)

    # -- weights ------------------------------------------------------------------------------------
    def kept_mask(self) -> torch.Tensor:
        """Boolean mask of the kept weights, in the weight's shape."""
        numel = _numel(self.weight_shape)
        if not self.has_mask:
            return torch.ones(self.weight_shape, dtype=torch.bool, device=self.codes.device)
        return unpack_bits(self.mask, 1, numel).bool().view(self.weight_shape)

    def code_tensor(self, mask: torch.Tensor | None = None) -> torch.Tensor:
        """The code of every weight (0 at pruned positions), ``int64`` in the weight's shape;
        ``mask`` is :meth:`kept_mask` when the caller already has it."""
        mask = self.kept_mask() if mask is None else mask
        codes = torch.zeros(mask.shape, dtype=torch.int64, device=self.codes.device)
        codes[mask] = unpack_bits(self.codes, self.bits, self.num_kept)
        return codes

    def dequantized_weight(self) -> torch.Tensor:
        """The dense weight the layer computes with (cached until a buffer changes)."""
        tensors = (self.codes, self.mask, self.codebook, self.scales, self.outlier_index, self.outlier_value)
        # The data pointer too: loading can swap a buffer's storage (``t.data = ...``) without a
        # new version, after something read ``.weight`` on the freshly built layer.
        key = (self.codes.device,) + tuple((id(t), t._version, t.data_ptr()) for t in tensors)
        if self._cache is not None and self._cache[0] == key:
            return self._cache[1]
        mask = self.kept_mask()
        values = dequantize(self.codebook, self.code_tensor(mask), self.scales, self.channel_dim)
        weight = torch.where(mask, values, torch.zeros((), dtype=values.dtype, device=values.device))
        weight = weight.to(getattr(torch, self.weight_dtype))
        if self.outlier_index.numel():
            weight = weight.reshape(-1).index_put((self.outlier_index.long(),), self.outlier_value.to(weight.dtype))
            weight = weight.view(self.weight_shape)
        self._cache = (key, weight)
        return weight

    @property
    def weight(self) -> torch.Tensor:
        """Read-only dense weight, for code that inspects ``module.weight`` (dtype, device, shape)."""
        return self.dequantized_weight()

    def _apply(self, fn, recurse=True):
        self._cache = None
        out = super()._apply(fn, recurse)
        # model.half() / .to(dtype) casts the bias and codebook: compute in the new dtype too.
        if self.bias is not None:
            self.weight_dtype = str(self.bias.dtype).removeprefix("torch.")
        elif self.codebook.dtype != torch.float32:
            self.weight_dtype = str(self.codebook.dtype).removeprefix("torch.")
        return out

    def __getstate__(self):
        state = super().__getstate__()
        state["_cache"] = None
        return state

    def storage_bits(self) -> int:
        """Bits of the quantized weight as defined by the compression rate: mask + codes + scales +
        codebook + outliers (the byte padding of each packed tensor excluded; the bias is not a
        weight)."""
        return storage_bits(_numel(self.weight_shape), self.num_kept, self.bits, self.has_mask,
                            self.scales.numel() * self.scales.element_size() * 8, self.outlier_index.numel())

    def extra_repr(self) -> str:
        numel = _numel(self.weight_shape)
        return (f"weight_shape={tuple(self.weight_shape)}, bits={self.bits}, "
                f"kept={self.num_kept}/{numel}, bits_per_weight={self.storage_bits() / numel:.3f}")


class OPQLinear(OPQLayer):
    """Quantized ``nn.Linear``: ``y = x W^T + b`` with ``W`` rebuilt from codes."""

    type_name = "OPQLinear"
    channel_dim = 0

    @property
    def in_features(self) -> int:
        return self.weight_shape[1]

    @property
    def out_features(self) -> int:
        return self.weight_shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dequantized_weight(), self.bias)


class OPQConv1D(OPQLayer):
    """Quantized ``transformers.pytorch_utils.Conv1D`` (GPT-2): weight ``(nx, nf)``, ``y = x W + b``."""

    type_name = "OPQConv1D"
    channel_dim = 1

    @property
    def nx(self) -> int:
        return self.weight_shape[0]

    @property
    def nf(self) -> int:
        return self.weight_shape[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The same ops as transformers' Conv1D, so that outputs match it exactly.
        size_out = x.size()[:-1] + (self.nf,)
        x = torch.addmm(self.bias, x.view(-1, x.size(-1)), self.dequantized_weight())
        return x.view(size_out)


class OPQConv(OPQLayer):
    """Quantized ``nn.Conv1d`` / ``nn.Conv2d`` / ``nn.Conv3d`` (not transposed)."""

    type_name = "OPQConv"
    channel_dim = 0

    def __init__(self, *args: Any, stride: list[int], padding: list[int] | str, dilation: list[int],
                 groups: int, padding_mode: str = "zeros", reversed_padding: list[int] | None = None,
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.stride = tuple(stride)
        self.padding = padding if isinstance(padding, str) else tuple(padding)
        self.dilation = tuple(dilation)
        self.groups = int(groups)
        self.padding_mode = padding_mode
        self.reversed_padding = list(reversed_padding or [])

    def _op_spec(self) -> dict[str, Any]:
        return {"stride": list(self.stride), "dilation": list(self.dilation), "groups": self.groups,
                "padding": self.padding if isinstance(self.padding, str) else list(self.padding),
                "padding_mode": self.padding_mode, "reversed_padding": list(self.reversed_padding)}

    @property
    def out_channels(self) -> int:
        return self.weight_shape[0]

    @property
    def in_channels(self) -> int:
        return self.weight_shape[1] * self.groups

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        conv = (F.conv1d, F.conv2d, F.conv3d)[len(self.weight_shape) - 3]
        weight = self.dequantized_weight()
        # Mirrors torch's _ConvNd: non-zero padding modes pad explicitly and convolve without padding.
        if self.padding_mode != "zeros":
            x = F.pad(x, self.reversed_padding, mode=self.padding_mode)
            return conv(x, weight, self.bias, self.stride, 0, self.dilation, self.groups)
        return conv(x, weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


class OPQEmbedding(OPQLayer):
    """Quantized ``nn.Embedding``; every row (token vector) is a channel with its own scale."""

    type_name = "OPQEmbedding"
    channel_dim = 0

    def __init__(self, *args: Any, padding_idx: int | None = None, scale_grad_by_freq: bool = False,
                 sparse: bool = False, **kwargs: Any) -> None:
        kwargs["has_bias"] = False
        super().__init__(*args, **kwargs)
        self.padding_idx = padding_idx
        self.scale_grad_by_freq = scale_grad_by_freq
        self.sparse = sparse

    def _op_spec(self) -> dict[str, Any]:
        return {"padding_idx": self.padding_idx, "scale_grad_by_freq": self.scale_grad_by_freq,
                "sparse": self.sparse}

    @property
    def num_embeddings(self) -> int:
        return self.weight_shape[0]

    @property
    def embedding_dim(self) -> int:
        return self.weight_shape[1]

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.dequantized_weight(), self.padding_idx, None, 2.0,
                           self.scale_grad_by_freq, self.sparse)


LAYER_TYPES: dict[str, type] = {cls.type_name: cls for cls in (OPQLinear, OPQConv1D, OPQConv, OPQEmbedding)}
