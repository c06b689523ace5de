"""Layers that the DSP method puts into a compressed model (see hf_oto_layers.py). torch only.

Dynamic structure pruning (DSP) leaves each layer with a few *filter groups*; group ``g`` owns some
output channels (filters, or output rows of a linear) and reads only the input channels it kept.
The converted layer computes, for every group, a dense convolution (or linear) over the gathered
input channels of that group, which is what a grouped convolution / block-diagonal linear does.

Two execution modes hold the same function:

* ``"split"``: one dense kernel per group over ``x.index_select(channel_dim, kept_g)``, outputs
  concatenated. It runs exactly the kept multiply-adds and its output rows come out in group order,
  so when the model could fold the filter permutation into the neighbouring layers no output index
  is needed.
* ``"grouped"``: one gather of all groups' inputs and a single grouped convolution (``groups=G``) or
  batched matmul. Groups of unequal sizes are padded to the largest with zero weights (the padding
  multiply-adds are executed and counted), and padding rows are dropped by an output index.

Filters that kept no input channel at all output their bias (or zero): they are ``const_rows``
appended after the computed rows, at no multiply-add.

Where the permutation could not be folded (outputs feeding a residual add shared with other pruned
layers, or the model output), ``out_index`` puts rows back into the original channel order: an
``index_select`` over the output, whose cost the benchmark reports.

Every index is a persistent buffer, so it loads from the state dict; ``manifest_spec`` records
only sizes. The file imports nothing but torch: Transformers copies it with the remote code.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

_MODES = ("split", "grouped")


def _offsets(sizes: list[int]) -> list[int]:
    out = [0]
    for s in sizes:
        out.append(out[-1] + s)
    return out


class _DSPLayer(nn.Module):
    """Shared bookkeeping: group sizes, the input/output index buffers and the bias."""

    def _setup(self, in_features: int, out_features: int, in_sizes: list[int], out_sizes: list[int],
               mode: str, has_out_index: bool, bias: bool, const_rows: int = 0, device=None, dtype=None) -> None:
        if mode not in _MODES:
            raise ValueError(f"mode must be one of {_MODES}, got {mode!r}")
        if len(in_sizes) != len(out_sizes) or not in_sizes:
            raise ValueError("in_sizes and out_sizes must list the same, non-zero number of groups")
        if any(s < 1 for s in in_sizes) or any(s < 1 for s in out_sizes):
            raise ValueError(f"every group needs at least one input and one output, got {in_sizes}, {out_sizes}")
        if mode == "grouped" and (len(set(in_sizes)) > 1 or len(set(out_sizes)) > 1):
            raise ValueError("grouped mode needs groups of equal (padded) sizes")
        self.out_features_total = out_features
        self.in_sizes = [int(s) for s in in_sizes]
        self.out_sizes = [int(s) for s in out_sizes]
        self.mode = mode
        self.num_groups = len(in_sizes)
        self.const_rows = int(const_rows)
        self.computed_rows = sum(self.out_sizes)
        self.rows = self.computed_rows + self.const_rows
        self._in_off = _offsets(self.in_sizes)
        self._out_off = _offsets(self.out_sizes)
        # A group reading every input channel in order needs no gather (indices are kept sorted).
        self._full_input = [s == in_features for s in self.in_sizes]
        if not has_out_index and self.rows != out_features:
            raise ValueError(f"without an output index the groups must produce exactly {out_features} rows, "
                             f"got {self.rows}")
        self.register_buffer("in_index", torch.zeros(sum(self.in_sizes), dtype=torch.long, device=device))
        if has_out_index:
            self.register_buffer("out_index", torch.arange(out_features, dtype=torch.long, device=device))
        else:
            self.out_index = None
        # The bias is stored per computed row (group order, padding rows included) so that each
        # kernel adds its own slice and the output index moves it along with the row.
        self.bias = nn.Parameter(torch.zeros(self.rows, device=device, dtype=dtype)) if bias else None

    @classmethod
    def from_manifest(cls, spec: dict[str, Any]) -> "_DSPLayer":
        return cls(**{k: v for k, v in spec.items() if k != "type"})

    def _common_spec(self) -> dict[str, Any]:
        return {"in_sizes": list(self.in_sizes), "out_sizes": list(self.out_sizes), "mode": self.mode,
                "has_out_index": self.out_index is not None, "bias": self.bias is not None,
                "const_rows": self.const_rows}

    def _finish(self, y: torch.Tensor, dim: int) -> torch.Tensor:
        if self.const_rows:
            shape = list(y.shape)
            shape[dim] = self.const_rows
            if self.bias is None:
                const = y.new_zeros(shape)
            else:
                view = [1] * y.dim()
                view[dim] = self.const_rows
                const = self.bias[self.computed_rows:].view(view).expand(shape)
            y = torch.cat([y, const], dim)
        if self.out_index is not None:
            y = y.index_select(dim, self.out_index)
        return y

    def _gather(self, x: torch.Tensor, dim: int, g: int) -> torch.Tensor:
        if self._full_input[g]:
            return x
        return x.index_select(dim, self.in_index[self._in_off[g]:self._in_off[g + 1]])

    def _bias_slice(self, g: int) -> torch.Tensor | None:
        return None if self.bias is None else self.bias[self._out_off[g]:self._out_off[g + 1]]

    def group_structure(self) -> list[dict[str, list[int]]]:
        """Per group: the original input channels it reads and the output positions it produces
        (after ``out_index``; padding rows are left out).

        Example:
            >>> layer.group_structure()[0]["inputs"][:3]          # doctest: +SKIP
            [0, 4, 5]
        """
        inv = torch.full((self.rows,), -1, dtype=torch.long)
        order = (self.out_index.cpu() if self.out_index is not None
                 else torch.arange(self.out_features_total))
        inv[order] = torch.arange(order.numel())
        out = []
        for g in range(self.num_groups):
            ins = self.in_index[self._in_off[g]:self._in_off[g + 1]].cpu()
            outs = inv[self._out_off[g]:self._out_off[g + 1]]
            out.append({"inputs": sorted(set(ins.tolist())), "outputs": sorted(o for o in outs.tolist() if o >= 0)})
        if self.const_rows:
            out.append({"inputs": [], "outputs": sorted(inv[self.computed_rows:].tolist())})
        return out


class DSPConv(_DSPLayer):
    """A convolution split into filter groups, each reading only its kept input channels.

    Built by :func:`hf_oto.methods.dsp.convert` from a trained DSP model; ``from_manifest``
    rebuilds an empty one for loading. Supports 1-3 spatial dimensions, stride, padding (numbers,
    ``"same"``/``"valid"`` or any ``padding_mode``), dilation and bias.

    Example:
        >>> layer = DSPConv(ndim=2, in_channels=8, out_channels=6, kernel_size=(3, 3),
        ...                 in_sizes=[3, 5], out_sizes=[2, 4], padding=(1, 1))
        >>> layer(torch.randn(1, 8, 5, 5)).shape
        torch.Size([1, 6, 5, 5])
    """

    def __init__(self, *, ndim: int, in_channels: int, out_channels: int, kernel_size: list[int] | tuple[int, ...],
                 in_sizes: list[int], out_sizes: list[int], stride: Any = 1, padding: Any = 0, dilation: Any = 1,
                 padding_mode: str = "zeros", mode: str = "split", has_out_index: bool = False, bias: bool = False,
                 const_rows: int = 0, device=None, dtype=None) -> None:
        super().__init__()
        if ndim not in (1, 2, 3):
            raise ValueError(f"ndim must be 1, 2 or 3, got {ndim}")
        self.ndim = ndim
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = tuple(int(k) for k in kernel_size)
        self.stride = _tuple(stride, ndim)
        self.dilation = _tuple(dilation, ndim)
        self.padding = padding if isinstance(padding, str) else _tuple(padding, ndim)
        self.padding_mode = padding_mode
        self._setup(in_channels, out_channels, in_sizes, out_sizes, mode, has_out_index, bias, const_rows,
                    device, dtype)
        self._conv = (F.conv1d, F.conv2d, F.conv3d)[ndim - 1]
        if padding_mode != "zeros":
            if isinstance(self.padding, str):
                raise ValueError("string padding with a padding_mode other than 'zeros' is not supported")
            # The same explicit padding torch's _ConvNd applies before a zero-padded kernel.
            self._pad = [p for p in reversed(self.padding) for _ in range(2)]
        if mode == "split":
            self.weights = nn.ParameterList([
                nn.Parameter(torch.zeros(o, i, *self.kernel_size, device=device, dtype=dtype))
                for i, o in zip(self.in_sizes, self.out_sizes)])
        else:
            self.weight = nn.Parameter(torch.zeros(self.computed_rows, self.in_sizes[0], *self.kernel_size,
                                                   device=device, dtype=dtype))

    def manifest_spec(self) -> dict[str, Any]:
        return {"type": "DSPConv", "ndim": self.ndim, "in_channels": self.in_channels,
                "out_channels": self.out_channels, "kernel_size": list(self.kernel_size),
                "stride": list(self.stride), "dilation": list(self.dilation),
                "padding": self.padding if isinstance(self.padding, str) else list(self.padding),
                "padding_mode": self.padding_mode, **self._common_spec()}

    def _run(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, groups: int) -> torch.Tensor:
        if self.padding_mode != "zeros":
            return self._conv(F.pad(x, self._pad, mode=self.padding_mode), w, b, self.stride, 0, self.dilation, groups)
        return self._conv(x, w, b, self.stride, self.padding, self.dilation, groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dim = x.dim() - self.ndim - 1  # channel dim; works for unbatched inputs too
        if self.mode == "split":
            ys = [self._run(self._gather(x, dim, g), w, self._bias_slice(g), 1) for g, w in enumerate(self.weights)]
            y = ys[0] if len(ys) == 1 else torch.cat(ys, dim)
        else:
            xs = x if self._full_input[0] and self.num_groups == 1 else x.index_select(dim, self.in_index)
            bias = None if self.bias is None else self.bias[:self.computed_rows]
            y = self._run(xs, self.weight, bias, self.num_groups)
        return self._finish(y, dim)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"mode={self.mode}, groups(in x out)={list(zip(self.in_sizes, self.out_sizes))}, "
                f"const_rows={self.const_rows}, out_index={self.out_index is not None}")


class DSPLinear(_DSPLayer):
    """A block-diagonal linear over gathered inputs: group ``g``'s output rows read only its kept
    input features. Works on any leading shape (``(..., in_features)``).

    Example:
        >>> layer = DSPLinear(in_features=8, out_features=6, in_sizes=[3, 5], out_sizes=[2, 4], bias=True)
        >>> layer(torch.randn(2, 7, 8)).shape
        torch.Size([2, 7, 6])
    """

    def __init__(self, *, in_features: int, out_features: int, in_sizes: list[int], out_sizes: list[int],
                 mode: str = "split", has_out_index: bool = False, bias: bool = True, const_rows: int = 0,
                 device=None, dtype=None) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self._setup(in_features, out_features, in_sizes, out_sizes, mode, has_out_index, bias, const_rows,
                    device, dtype)
        if mode == "split":
            self.weights = nn.ParameterList([nn.Parameter(torch.zeros(o, i, device=device, dtype=dtype))
                                             for i, o in zip(self.in_sizes, self.out_sizes)])
        else:
            # (groups, rows per group, inputs per group): one batched matmul.
            self.weight = nn.Parameter(torch.zeros(self.num_groups, self.out_sizes[0], self.in_sizes[0],
                                                   device=device, dtype=dtype))

    def manifest_spec(self) -> dict[str, Any]:
        return {"type": "DSPLinear", "in_features": self.in_features, "out_features": self.out_features,
                **self._common_spec()}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "split":
            ys = [F.linear(self._gather(x, -1, g), w, self._bias_slice(g)) for g, w in enumerate(self.weights)]
            y = ys[0] if len(ys) == 1 else torch.cat(ys, -1)
        else:
            lead = x.shape[:-1]
            xs = x.index_select(-1, self.in_index).reshape(-1, self.num_groups, self.in_sizes[0])
            y = torch.bmm(xs.transpose(0, 1), self.weight.transpose(1, 2)).transpose(0, 1)
            y = y.reshape(*lead, self.computed_rows)
            if self.bias is not None:
                y = y + self.bias[:self.computed_rows]
        return self._finish(y, -1)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, mode={self.mode}, "
                f"groups(in x out)={list(zip(self.in_sizes, self.out_sizes))}, out_index={self.out_index is not None}")


def _tuple(value: Any, n: int) -> tuple[int, ...]:
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise ValueError(f"expected {n} values, got {value}")
        return tuple(int(v) for v in value)
    return (int(value),) * n


LAYER_TYPES: dict[str, type] = {"DSPConv": DSPConv, "DSPLinear": DSPLinear}
