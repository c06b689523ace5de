"""Tiny datasets and models for the trainer tests (no downloads)."""

from __future__ import annotations

import datasets
import torch
from transformers import BertConfig, BertForQuestionAnswering, BertForSequenceClassification


def _config(**extra) -> BertConfig:
    return BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                      intermediate_size=64, max_position_embeddings=32, hidden_dropout_prob=0.0,
                      attention_probs_dropout_prob=0.0, **extra)


def classification_data(n: int = 64, length: int = 12, seed: int = 0) -> datasets.Dataset:
    """Label = whether the first token id is large: learnable in a few steps."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 100, (n, length), generator=g)
    return datasets.Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": [[1] * length] * n,
                                       "labels": (ids[:, 0] > 50).long().tolist()})


def qa_data(n: int = 64, length: int = 16, seed: int = 0) -> datasets.Dataset:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 100, (n, length), generator=g)
    start = torch.randint(1, length - 3, (n,), generator=g)
    return datasets.Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": [[1] * length] * n,
                                       "start_positions": start.tolist(), "end_positions": (start + 2).tolist()})


def classifier(seed: int = 0) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    return BertForSequenceClassification(_config(num_labels=2))


def qa_model(seed: int = 0) -> BertForQuestionAnswering:
    torch.manual_seed(seed)
    return BertForQuestionAnswering(_config())


def zero_groups(trainer) -> torch.Tensor:
    """Prunable groups of the trainer's model that are exactly zero, from the groups alone."""
    groups = trainer.oto_groups
    model = trainer.accelerator.unwrap_model(trainer.model)
    with torch.no_grad():
        return groups.zero_mask(groups.parameters(model)).cpu() & groups.prunable_mask
