"""Low-rank decomposition: replace Linear and 1x1 conv layers by two thinner factors.

Meant for models trained with :class:`hf_oto.optim.SFW` (``structure="low_rank"``), whose weights
keep most of their energy in a few singular directions, so that the rank can be cut at any ratio
without retraining.
"""

from __future__ import annotations

import copy
import re
from dataclasses import asdict, dataclass
from typing import Sequence

import torch
from torch import nn

from .core import is_gpt2_conv1d
from .hf_oto_layers_lowrank import LowRankConv, LowRankLinear
from .manifest import update_manifest


@dataclass
class LowRankDecision:
    """What :func:`decompose_low_rank` did to one layer (JSON-able with ``asdict``)."""

    layer: str
    full_rank: int
    rank: int
    factorized: bool          # False: kept one dense layer holding the rank-``rank`` product

    def to_dict(self) -> dict:
        return asdict(self)


def _matrix(module: nn.Module) -> torch.Tensor:
    """The layer's weight as an (out, in) matrix."""
    w = module.weight.detach()
    if is_gpt2_conv1d(module):
        return w.t()
    return w.reshape(w.shape[0], -1)


def low_rank_layers(
    model: nn.Module,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
) -> dict[str, nn.Module]:
    """The layers :func:`decompose_low_rank` may factorise, by module path.

    ``nn.Linear``, ``nn.Conv1d/2d/3d`` with a 1x1 kernel and ``groups=1``, and GPT-2's ``Conv1D``,
    whose weight has both dimensions >= 2 and is not shared with another module (a tied output
    embedding). ``include``/``exclude`` are regular expressions searched in the module path.

    Example:
        >>> from torch import nn
        >>> model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Conv1d(16, 4, 1), nn.Conv1d(4, 4, 3))
        >>> list(low_rank_layers(model))
        ['0', '2']
    """
    users: dict[int, set[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        users.setdefault(id(p), set()).add(name.rpartition(".")[0])
    inc = [re.compile(p) for p in include or []]
    exc = [re.compile(p) for p in exclude or []]
    found: dict[str, nn.Module] = {}
    for path, module in model.named_modules():
        if not path:
            continue
        if isinstance(module, nn.Linear):
            pass
        elif isinstance(module, nn.modules.conv._ConvNd):
            if module.transposed or module.groups != 1 or any(k != 1 for k in module.kernel_size):
                continue
        elif not is_gpt2_conv1d(module):
            continue
        weight = getattr(module, "weight", None)
        if not isinstance(weight, nn.Parameter) or len(users.get(id(weight), ())) > 1:
            continue
        out_f, in_f = _matrix(module).shape
        if min(out_f, in_f) < 2:
            continue
        if inc and not any(p.search(path) for p in inc):
            continue
        if any(p.search(path) for p in exc):
            continue
        found[path] = module
    return found


def kept_rank(full_rank: int, rank_ratio: float) -> int:
    """Singular values kept when the ``rank_ratio`` fraction of ``full_rank`` is removed (>= 1)."""
    return max(1, full_rank - int(rank_ratio * full_rank))


@torch.no_grad()
def decompose_low_rank(
    model: nn.Module,
    rank_ratio: float,
    *,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    keep_dense_if_larger: bool = True,
    inplace: bool = False,
) -> nn.Module:
    """Truncate every Linear / 1x1 conv weight to low rank and store it as two factors.

    Each eligible layer (see :func:`low_rank_layers`) with weight ``W`` (out x in, full rank
    ``n = min(out, in)``) keeps its ``r = n - int(rank_ratio * n)`` largest singular values
    (at least 1): ``W_r = U_r S_r V_r^T``, stored as ``first.weight = S_r^(1/2) V_r^T`` and
    ``second.weight = U_r S_r^(1/2)`` (balanced factors) in a :class:`LowRankLinear` or
    :class:`LowRankConv`, which keeps the bias. The replaced layers are recorded in the structure
    manifest, so the result saves with ``save_pretrained`` / :func:`hf_oto.save_pretrained` and
    reloads with ``from_pretrained``.

    Args:
        model: a trained model (not modified unless ``inplace``).
        rank_ratio: fraction of each layer's rank to remove, in [0, 1) (like ``compress``'s
            ``ratio``: 0.3 keeps 70% of the singular values).
        include, exclude: regular expressions on module paths restricting the layers.
        keep_dense_if_larger: where two factors would hold at least as many parameters as the
            dense weight (``r * (out + in) >= out * in``), keep one dense layer holding ``W_r``:
            the function is the same rank-``r`` truncation, without growing the model. With
            ``False`` every such layer is factorised anyway.
        inplace: change ``model`` itself.

    The decisions per layer are in ``result.hf_oto_low_rank`` (a list of :class:`LowRankDecision`).

    Example:
        >>> small = decompose_low_rank(model, rank_ratio=0.5)          # doctest: +SKIP
        >>> small.save_pretrained("out/")                              # doctest: +SKIP
    """
    if isinstance(rank_ratio, bool) or not isinstance(rank_ratio, (int, float)) or not 0.0 <= rank_ratio < 1.0:
        raise ValueError(f"rank_ratio must be in [0, 1), got {rank_ratio!r}")
    target = model if inplace else copy.deepcopy(model)
    replaced: dict[str, nn.Module] = {}
    decisions: list[LowRankDecision] = []
    for path, layer in low_rank_layers(target, include, exclude).items():
        w = _matrix(layer)
        out_f, in_f = w.shape
        full = min(out_f, in_f)
        rank = kept_rank(full, float(rank_ratio))
        if rank >= full:
            decisions.append(LowRankDecision(path, full, full, False))
            continue
        u, s, vh = torch.linalg.svd(w.double(), full_matrices=False)
        root = s[:rank].sqrt()
        second = (u[:, :rank] * root).to(w.dtype)                       # (out, r)
        first = (root[:, None] * vh[:rank]).to(w.dtype)                  # (r, in)
        factorize = rank * (out_f + in_f) < out_f * in_f or not keep_dense_if_larger
        decisions.append(LowRankDecision(path, full, rank, factorize))
        if not factorize:
            dense = second @ first
            layer.weight.copy_(dense.t() if is_gpt2_conv1d(layer) else dense.reshape(layer.weight.shape))
            continue
        new = _factorized(layer, rank)
        new.first.weight.copy_(first.reshape(new.first.weight.shape))
        new.second.weight.copy_(second.reshape(new.second.weight.shape))
        if layer.bias is not None:
            new.second.bias.copy_(layer.bias)
        new = new.to(device=layer.weight.device, dtype=layer.weight.dtype)
        new.train(layer.training)
        new.requires_grad_(layer.weight.requires_grad)
        target.set_submodule(path, new)
        replaced[path] = new
    if replaced:
        update_manifest(target, modules=replaced)
    target.hf_oto_low_rank = decisions
    return target


def _factorized(layer: nn.Module, rank: int) -> nn.Module:
    has_bias = getattr(layer, "bias", None) is not None
    if isinstance(layer, nn.Linear):
        return LowRankLinear(layer.in_features, layer.out_features, rank, bias=has_bias)
    if is_gpt2_conv1d(layer):
        in_f, out_f = layer.weight.shape
        return LowRankLinear(in_f, out_f, rank, bias=has_bias)
    dims = len(layer.kernel_size)
    return LowRankConv(dims, layer.in_channels, layer.out_channels, rank, stride=layer.stride, padding=layer.padding,
                       dilation=layer.dilation, padding_mode=layer.padding_mode, bias=has_bias)


def rank_energy(model: nn.Module, rank_ratio: float, **layer_filters) -> float:
    """Fraction of the squared Frobenius norm of the eligible weights kept by a ``rank_ratio`` cut.

    A quick check of how compressible a trained model is (1.0: nothing lost).

    Example:
        >>> rank_energy(model, 0.5)            # share kept when half of every rank is cut  # doctest: +SKIP
        0.97
    """
    kept = total = 0.0
    for layer in low_rank_layers(model, **layer_filters).values():
        s = torch.linalg.svdvals(_matrix(layer).double())
        rank = kept_rank(s.numel(), rank_ratio)
        kept += float(s[:rank].square().sum())
        total += float(s.square().sum())
    return kept / total if total else 1.0
