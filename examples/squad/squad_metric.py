"""SQuAD v1.1 exact match and F1, computed locally.

``evaluate.load("squad")`` fetches its script from the Hub and fails offline; the metric itself is
short. Answers are normalised as in the official v1.1 evaluation: lower case, punctuation removed,
the articles a/an/the removed, whitespace collapsed. Exact match is the best exact equality over
the gold answers, F1 the best token-overlap F1; both are reported in percent.
"""

from __future__ import annotations

import re
import string
from collections import Counter

_PUNCTUATION = set(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)


def normalize_answer(text: str) -> str:
    text = text.lower()
    text = "".join(ch for ch in text if ch not in _PUNCTUATION)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def exact_match(prediction: str, truth: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(truth))


def f1(prediction: str, truth: str) -> float:
    pred, gold = normalize_answer(prediction).split(), normalize_answer(truth).split()
    common = Counter(pred) & Counter(gold)
    overlap = sum(common.values())
    if overlap == 0:
        return 0.0
    precision, recall = overlap / len(pred), overlap / len(gold)
    return 2 * precision * recall / (precision + recall)


def squad_metrics(predictions: dict[str, str], references: dict[str, list[str]]) -> dict[str, float]:
    """``{"exact_match": .., "f1": ..}`` in percent over the references' question ids.

    A question without a prediction counts as wrong.

    Example:
        >>> squad_metrics({"q1": "The Eiffel Tower"}, {"q1": ["Eiffel tower", "the tower"]})
        {'exact_match': 100.0, 'f1': 100.0}
    """
    if not references:
        raise ValueError("no reference answers to score against")
    em = f1_total = 0.0
    for qid, answers in references.items():
        prediction = predictions.get(qid, "")
        em += max(exact_match(prediction, a) for a in answers)
        f1_total += max(f1(prediction, a) for a in answers)
    return {"exact_match": 100.0 * em / len(references), "f1": 100.0 * f1_total / len(references)}
