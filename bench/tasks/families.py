"""How the peers are set up for the two model families of the comparison (BERT encoders and conv
nets), following their own documentation. Kept with the tasks: it is usage of the peers, not part
of hf_oto (which needs no per-family setting).
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from .base import AuthorsOTOSpec, TorchPruningSpec


def _attention_modules(model: nn.Module) -> list[nn.Module]:
    """Self-attention blocks of a BERT-style encoder: modules holding query/key/value Linears."""
    return [m for m in model.modules()
            if all(isinstance(getattr(m, n, None), nn.Linear) for n in ("query", "key", "value"))
            and hasattr(m, "num_attention_heads")]


def bert_torch_pruning(model: nn.Module, output_transform: Callable[[Any], torch.Tensor]) -> TorchPruningSpec:
    """Torch-Pruning on a Hugging Face BERT as its ``examples/transformers/prune_hf_bert.py`` does:
    its own dependency graph, ``num_heads`` for q/k/v so that whole heads go (``prune_num_heads``),
    embeddings and the task head ignored. Like hf_oto's default groups (heads and FFN neurons), the
    hidden width stays: the layers writing the residual stream (attention output and FFN output
    projections) are ignored, the "bottleneck" setting of its ViT example."""
    attention = _attention_modules(model)
    num_heads = {}
    for m in attention:
        for name in ("query", "key", "value"):
            num_heads[getattr(m, name)] = m.num_attention_heads
    ignored: list[nn.Module] = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Embedding):
            ignored.append(module)
        elif isinstance(module, nn.Linear) and not name.endswith((".query", ".key", ".value", "intermediate.dense")):
            ignored.append(module)  # output projections, pooler, task head

    def fix_heads(pruned: nn.Module, pruner: Any) -> None:
        for m in _attention_modules(pruned):
            m.num_attention_heads = pruner.num_heads[m.query]
            m.all_head_size = m.query.out_features
            m.attention_head_size = m.all_head_size // max(1, m.num_attention_heads)

    return TorchPruningSpec(output_transform=output_transform, ignored_layers=ignored, num_heads=num_heads,
                            after_pruning=fix_heads)


def vision_torch_pruning(model: nn.Module) -> TorchPruningSpec:
    """Torch-Pruning on an image classifier as its README does: every conv channel, the classifier
    ignored."""
    head = getattr(model, "classifier", None)
    ignored = [m for m in head.modules() if isinstance(m, nn.Linear)] if head is not None else []
    return TorchPruningSpec(output_transform=lambda out: out.logits.sum(), ignored_layers=ignored)


def bert_authors_oto(model: nn.Module, example: dict[str, torch.Tensor]) -> AuthorsOTOSpec:
    """The authors' package on a BERT encoder: traced with eager attention (their ONNX-based tracer
    has no symbolic for ``scaled_dot_product_attention``), the hidden-width group kept (hf_oto's
    default prunes heads and FFN neurons only)."""
    embeddings = [n for n, m in model.named_modules() if isinstance(m, nn.Embedding)]
    inputs = tuple(example[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in example)
    return AuthorsOTOSpec(dummy_input=inputs, unprunable_params=[f"{n}.weight" for n in embeddings],
                          eager_attention=True)


def vision_authors_oto(example: dict[str, torch.Tensor]) -> AuthorsOTOSpec:
    return AuthorsOTOSpec(dummy_input=example["pixel_values"])
