"""Layers that low-rank decomposition puts into a compressed model (see hf_oto_layers.py). torch only.

``W ~ B @ A`` with ``A`` (rank x in) and ``B`` (out x rank): the layer runs two smaller layers,
``first`` (no bias) then ``second`` (with the original bias). Their parameters save under
``<path>.first.weight``, ``<path>.second.weight`` and ``<path>.second.bias``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


class LowRankLinear(nn.Module):
    """A Linear layer of rank ``rank``: ``second(first(x))``.

    Also stands in for GPT-2's ``Conv1D`` (the same map with a transposed weight).

    Example:
        >>> layer = LowRankLinear(16, 8, rank=3)
        >>> layer(torch.randn(2, 16)).shape
        torch.Size([2, 8])
    """

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.rank = rank
        self.first = nn.Linear(in_features, rank, bias=False)
        self.second = nn.Linear(rank, out_features, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(self.first(x))

    @property
    def weight(self) -> torch.Tensor:
        """The dense ``(out, in)`` product, computed on access (for code that reads dtype/device)."""
        return self.second.weight @ self.first.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.second.bias

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"

    def manifest_spec(self) -> dict[str, Any]:
        return {"type": "LowRankLinear", "in_features": self.in_features, "out_features": self.out_features,
                "rank": self.rank, "bias": self.second.bias is not None}

    @classmethod
    def from_manifest(cls, spec: dict[str, Any]) -> "LowRankLinear":
        return cls(int(spec["in_features"]), int(spec["out_features"]), int(spec["rank"]), bool(spec["bias"]))


_CONVS = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}


def _tuple(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value


class LowRankConv(nn.Module):
    """A 1x1 convolution (1, 2 or 3 spatial dims) of rank ``rank``: two 1x1 convolutions.

    ``first`` carries the stride, padding and padding mode (a 1x1 kernel mixes channels only, so
    padding before the first factor equals padding before the original layer); ``second`` the
    bias.

    Example:
        >>> layer = LowRankConv(2, 16, 8, rank=3)
        >>> layer(torch.randn(1, 16, 5, 5)).shape
        torch.Size([1, 8, 5, 5])
    """

    def __init__(self, dims: int, in_channels: int, out_channels: int, rank: int, stride: Any = 1, padding: Any = 0,
                 dilation: Any = 1, padding_mode: str = "zeros", bias: bool = True) -> None:
        super().__init__()
        if dims not in _CONVS:
            raise ValueError(f"LowRankConv supports 1, 2 or 3 spatial dims, got {dims}")
        conv = _CONVS[dims]
        self.dims = dims
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.rank = rank
        self.first = conv(in_channels, rank, 1, stride=_tuple(stride), padding=_tuple(padding),
                          dilation=_tuple(dilation), padding_mode=padding_mode, bias=False)
        self.second = conv(rank, out_channels, 1, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(self.first(x))

    @property
    def weight(self) -> torch.Tensor:
        """The dense ``(out, in, 1, ...)`` product, computed on access."""
        w = self.second.weight.flatten(1) @ self.first.weight.flatten(1)
        return w.reshape(self.out_channels, self.in_channels, *([1] * self.dims))

    @property
    def bias(self) -> torch.Tensor | None:
        return self.second.bias

    def extra_repr(self) -> str:
        return f"dims={self.dims}, in_channels={self.in_channels}, out_channels={self.out_channels}, rank={self.rank}"

    def manifest_spec(self) -> dict[str, Any]:
        def plain(value: Any) -> Any:
            return list(value) if isinstance(value, tuple) else value

        return {"type": "LowRankConv", "dims": self.dims, "in_channels": self.in_channels,
                "out_channels": self.out_channels, "rank": self.rank, "stride": plain(self.first.stride),
                "padding": plain(self.first.padding), "dilation": plain(self.first.dilation),
                "padding_mode": self.first.padding_mode, "bias": self.second.bias is not None}

    @classmethod
    def from_manifest(cls, spec: dict[str, Any]) -> "LowRankConv":
        return cls(int(spec["dims"]), int(spec["in_channels"]), int(spec["out_channels"]), int(spec["rank"]),
                   stride=spec["stride"], padding=spec["padding"], dilation=spec["dilation"],
                   padding_mode=spec["padding_mode"], bias=bool(spec["bias"]))


LAYER_TYPES: dict[str, type] = {"LowRankLinear": LowRankLinear, "LowRankConv": LowRankConv}
