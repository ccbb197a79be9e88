"""Task metrics as pure functions; every value is a fraction in [0, 1].

Computed locally (``evaluate.load`` fetches scripts from the hub and fails offline).
"""

from __future__ import annotations

import collections
import re
import string
from collections.abc import Sequence

from sklearn.metrics import f1_score

UNPARSEABLE = -1  # a generated answer that matches no label word: always wrong


def accuracy(predictions: Sequence[int], labels: Sequence[int]) -> float:
    if len(predictions) != len(labels):
        raise ValueError(f"{len(predictions)} predictions for {len(labels)} labels")
    if not labels:
        return 0.0
    return sum(int(p == g) for p, g in zip(predictions, labels)) / len(labels)


def macro_f1(predictions: Sequence[int], labels: Sequence[int], num_labels: int) -> float:
    """Macro-F1 over the task's classes; unparseable predictions (-1) count as wrong for their gold class."""
    return float(f1_score(list(labels), list(predictions), labels=list(range(num_labels)), average="macro",
                          zero_division=0))


def classification_metrics(predictions: Sequence[int], labels: Sequence[int], num_labels: int) -> dict[str, float]:
    return {
        "accuracy": accuracy(predictions, labels),
        "f1": macro_f1(predictions, labels, num_labels),
        "unparseable": sum(int(p == UNPARSEABLE) for p in predictions),
    }


def normalize_answer(text: str) -> str:
    """SQuAD normalisation: lower case, no punctuation, no English articles, single spaces."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def exact_match_score(prediction: str, gold: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(gold))


def f1_score_text(prediction: str, gold: str) -> float:
    pred_tokens, gold_tokens = normalize_answer(prediction).split(), normalize_answer(gold).split()
    if not pred_tokens or not gold_tokens:
        return float(pred_tokens == gold_tokens)
    common = collections.Counter(pred_tokens) & collections.Counter(gold_tokens)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred_tokens), same / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def qa_metrics(predictions: Sequence[str], golds: Sequence[Sequence[str]]) -> dict[str, float]:
    """SQuAD exact match and F1, each the maximum over all gold answers of a question, averaged."""
    if len(predictions) != len(golds):
        raise ValueError(f"{len(predictions)} predictions for {len(golds)} questions")
    if not golds:
        return {"exact_match": 0.0, "f1": 0.0}
    em = sum(max(exact_match_score(p, g) for g in gs) for p, gs in zip(predictions, golds)) / len(golds)
    f1 = sum(max(f1_score_text(p, g) for g in gs) for p, gs in zip(predictions, golds)) / len(golds)
    return {"exact_match": em, "f1": f1}
