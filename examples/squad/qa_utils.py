"""Extractive QA helpers: SQuAD files, tokenisation with a stride, logits to answer spans."""

from __future__ import annotations

import collections
import json
import os
from typing import Any

import datasets
import numpy as np

REQUIRED_COLUMNS = ("id", "context", "question", "answers")


def read_squad_json(path: str) -> datasets.Dataset:
    """A SQuAD v1.1 JSON file as a flat dataset with the columns of the Hub's ``squad`` dataset."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no SQuAD file at {path!r}")
    with open(path) as f:
        raw = json.load(f)
    return squad_dataset(raw, path)


def squad_dataset(raw: Any, source: str = "the data") -> datasets.Dataset:
    """SQuAD v1.1 JSON (already parsed) as a flat dataset with the columns of the Hub's ``squad``."""
    if not isinstance(raw, dict) or "data" not in raw:
        raise ValueError(f"{source} is not in SQuAD format: expected a JSON object with a 'data' list")
    rows: dict[str, list[Any]] = {k: [] for k in ("id", "title", "context", "question", "answers")}
    for article in raw["data"]:
        for paragraph in article.get("paragraphs", []):
            for qa in paragraph.get("qas", []):
                rows["id"].append(qa["id"])
                rows["title"].append(article.get("title", ""))
                rows["context"].append(paragraph["context"])
                rows["question"].append(qa["question"])
                answers = qa.get("answers", [])
                rows["answers"].append({"text": [a["text"] for a in answers],
                                        "answer_start": [a["answer_start"] for a in answers]})
    if not rows["id"]:
        raise ValueError(f"{source} contains no questions")
    return datasets.Dataset.from_dict(rows)


def check_columns(dataset: datasets.Dataset, split: str) -> None:
    missing = [c for c in REQUIRED_COLUMNS if c not in dataset.column_names]
    if missing:
        raise ValueError(f"the {split} data has no column(s) {missing} (it has {dataset.column_names}); "
                         f"extractive QA needs {list(REQUIRED_COLUMNS)} as in SQuAD")


def _tokenize(tokenizer, examples, max_length: int, stride: int):
    pad_right = tokenizer.padding_side == "right"
    return tokenizer(
        [q.lstrip() for q in examples["question"]],
        examples["context"],
        truncation="only_second" if pad_right else "only_first",
        max_length=max_length,
        stride=stride,
        return_overflowing_tokens=True,
        return_offsets_mapping=True,
        padding="max_length",
    )


def prepare_train_features(examples, tokenizer, max_length: int, stride: int):
    """One feature per window of a long context; the answer's token span, or CLS when the window
    does not contain the answer."""
    enc = _tokenize(tokenizer, examples, max_length, stride)
    sample_of = enc.pop("overflow_to_sample_mapping")
    offsets_all = enc.pop("offset_mapping")
    starts, ends = [], []
    for i, offsets in enumerate(offsets_all):
        ids = enc["input_ids"][i]
        cls = ids.index(tokenizer.cls_token_id) if tokenizer.cls_token_id in ids else 0
        sequence = enc.sequence_ids(i)
        answers = examples["answers"][sample_of[i]]
        if not answers["answer_start"]:
            starts.append(cls)
            ends.append(cls)
            continue
        first_char = answers["answer_start"][0]
        last_char = first_char + len(answers["text"][0])
        context = [k for k, s in enumerate(sequence) if s == 1]
        lo, hi = context[0], context[-1]
        if not (offsets[lo][0] <= first_char and offsets[hi][1] >= last_char):
            starts.append(cls)
            ends.append(cls)
            continue
        start = lo
        while start <= hi and offsets[start][0] <= first_char:
            start += 1
        end = hi
        while end >= lo and offsets[end][1] >= last_char:
            end -= 1
        starts.append(start - 1)
        ends.append(end + 1)
    enc["start_positions"] = starts
    enc["end_positions"] = ends
    return enc


def prepare_eval_features(examples, tokenizer, max_length: int, stride: int):
    """Features that remember their example and the character offsets of context tokens only."""
    enc = _tokenize(tokenizer, examples, max_length, stride)
    sample_of = enc.pop("overflow_to_sample_mapping")
    enc["example_id"] = []
    for i in range(len(enc["input_ids"])):
        sequence = enc.sequence_ids(i)
        enc["example_id"].append(examples["id"][sample_of[i]])
        enc["offset_mapping"][i] = [o if sequence[k] == 1 else None for k, o in enumerate(enc["offset_mapping"][i])]
    return enc


def postprocess_predictions(examples: datasets.Dataset, features: datasets.Dataset, start_logits: np.ndarray,
                            end_logits: np.ndarray, n_best: int = 20, max_answer_length: int = 30) -> dict[str, str]:
    """The highest scoring valid span (start <= end, inside the context, not too long) per example,
    over all of its features; score = start logit + end logit."""
    if len(features) != len(start_logits):
        raise ValueError(f"{len(start_logits)} predictions for {len(features)} features")
    by_example = collections.defaultdict(list)
    for index, example_id in enumerate(features["example_id"]):
        by_example[example_id].append(index)
    offsets_all = features["offset_mapping"]
    predictions = {}
    for example in examples:
        best_text, best_score = "", -np.inf
        for index in by_example.get(example["id"], []):
            offsets = offsets_all[index]
            s_logits, e_logits = start_logits[index], end_logits[index]
            top_starts = np.argsort(s_logits)[::-1][:n_best]
            top_ends = np.argsort(e_logits)[::-1][:n_best]
            for s in top_starts:
                if s >= len(offsets) or offsets[s] is None:
                    continue
                for e in top_ends:
                    if e >= len(offsets) or offsets[e] is None or e < s or e - s + 1 > max_answer_length:
                        continue
                    score = s_logits[s] + e_logits[e]
                    if score > best_score:
                        best_score = score
                        best_text = example["context"][offsets[s][0]:offsets[e][1]]
        predictions[example["id"]] = best_text
    return predictions
