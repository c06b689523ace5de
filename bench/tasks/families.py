"""How the peers are set up on a task's model, following their own documentation, and restricted to
the kinds of structure hf_oto's default removes, so that every row prunes the same things.

hf_oto's default prunes attention heads, FFN neurons and conv channels, but not a width that a
LayerNorm normalises over (a Transformer's residual stream, a ConvNeXt's channels), which changes
the function unless padded. Which output channels of which layer that leaves prunable is read
from hf_oto's own analysis of the model (:func:`prunable_outputs`), not from a per-model table:
Torch-Pruning ignores the layers whose outputs hf_oto may not remove, and the authors' library
marks the groups of the parameters hf_oto may not touch as unprunable. Kept with the tasks: it is
usage of the peers, not part of hf_oto.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from hf_oto import find_groups

from .base import AuthorsOTOSpec, TorchPruningSpec


def _prunable_dims(model: nn.Module, inputs: dict[str, torch.Tensor]) -> dict[str, set[int]]:
    """Parameter name -> the dims along which hf_oto's default groups may remove positions."""
    groups = find_groups(model, inputs)
    prunable = groups.prunable_mask
    dims: dict[str, set[int]] = {}
    for s in groups.slices:
        if s.is_param and prunable[s.group].any():
            dims.setdefault(s.tensor, set()).add(s.dim)
    return dims


def prunable_outputs(model: nn.Module, inputs: dict[str, torch.Tensor]) -> tuple[list[nn.Module], list[str]]:
    """``(layers whose outputs hf_oto may not prune, parameters hf_oto may not prune at all)``.

    A layer's outputs are dim 0 of a Linear/conv weight and dim 1 of an embedding table."""
    dims = _prunable_dims(model, inputs)
    fixed_layers = []
    for name, module in model.named_modules():
        out_dim = 1 if isinstance(module, nn.Embedding) else 0
        if isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Embedding)) and \
                out_dim not in dims.get(f"{name}.weight", set()):
            fixed_layers.append(module)
    fixed_params = [n for n, _ in model.named_parameters() if n not in dims]
    return fixed_layers, fixed_params


def _attention_modules(model: nn.Module) -> list[nn.Module]:
    """Self-attention blocks of a BERT-style encoder: modules holding query/key/value Linears."""
    return [m for m in model.modules()
            if all(isinstance(getattr(m, n, None), nn.Linear) for n in ("query", "key", "value"))
            and hasattr(m, "num_attention_heads")]


def bert_torch_pruning(model: nn.Module, inputs: dict[str, torch.Tensor],
                       output_transform: Callable[[Any], torch.Tensor]) -> TorchPruningSpec:
    """Torch-Pruning on a Hugging Face BERT as its ``examples/transformers/prune_hf_bert.py`` does:
    its own dependency graph, ``num_heads`` for q/k/v so that whole heads go (``prune_num_heads``),
    the attributes fixed after pruning; the layers writing the residual stream, the embeddings and
    the task head ignored (the "bottleneck" setting of its ViT example: heads and FFN neurons go,
    the hidden width stays, as in hf_oto's default)."""
    num_heads = {}
    attention = _attention_modules(model)
    for m in attention:
        for name in ("query", "key", "value"):
            num_heads[getattr(m, name)] = m.num_attention_heads

    def fix_heads(pruned: nn.Module, pruner: Any) -> None:
        for m in _attention_modules(pruned):
            m.num_attention_heads = pruner.num_heads[m.query]
            m.all_head_size = m.query.out_features
            m.attention_head_size = m.all_head_size // max(1, m.num_attention_heads)

    return TorchPruningSpec(output_transform=output_transform, ignored_layers=prunable_outputs(model, inputs)[0],
                            num_heads=num_heads, after_pruning=fix_heads,
                            heads_left=lambda pruner: sum(pruner.num_heads[m.query] for m in attention))


def vision_torch_pruning(model: nn.Module, inputs: dict[str, torch.Tensor]) -> TorchPruningSpec:
    """Torch-Pruning on an image classifier as its README does (the classifier ignored), on the
    channels hf_oto prunes: all of a ResNet's (BatchNorm), a ConvNeXt's MLP neurons (its residual
    channels are LayerNorm-normalised)."""
    return TorchPruningSpec(output_transform=lambda out: out.logits.sum(),
                            ignored_layers=prunable_outputs(model, inputs)[0])


def authors_oto(model: nn.Module, inputs: dict[str, torch.Tensor], keys: tuple[str, ...],
                eager_attention: bool = False) -> AuthorsOTOSpec:
    """The authors' package, tracing the model on ``inputs[k] for k in keys`` (positional, as their
    tracer calls it), with the groups of the parameters hf_oto may not prune marked unprunable.
    Their ONNX-based tracer has no symbolic for ``scaled_dot_product_attention``: attention models
    are traced with eager attention."""
    return AuthorsOTOSpec(dummy_input=tuple(inputs[k] for k in keys if k in inputs),
                          unprunable_params=prunable_outputs(model, inputs)[1], eager_attention=eager_attention)
