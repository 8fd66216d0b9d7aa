"""Classification metrics (accuracy and macro-averaged precision, recall and F1) and extractive-span metrics (SQuAD's
exact match and token F1, ``span_metrics``).

Macro averaging gives every class the same weight, whatever its size. A class never predicted has precision 0,
a class absent from the labels has recall 0, and F1 is 0 where precision + recall is 0 (the convention of
scikit-learn with ``zero_division=0``). Classes that occur neither in the labels nor in the predictions are left
out of the macro averages.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Sequence

import numpy as np


def confusion_matrix(labels: Sequence[int], predictions: Sequence[int], num_classes: int) -> np.ndarray:
    """counts[true, predicted]."""
    counts = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(counts, (np.asarray(labels, dtype=np.int64), np.asarray(predictions, dtype=np.int64)), 1)
    return counts


def classification_metrics(labels: Sequence[int], predictions: Sequence[int], num_classes: int) -> dict:
    if len(labels) == 0:
        return {"accuracy": 0.0, "precision": 0.0, "recall": 0.0, "f1": 0.0, "examples": 0}
    counts = confusion_matrix(labels, predictions, num_classes)
    tp = np.diag(counts).astype(float)
    predicted = counts.sum(axis=0).astype(float)
    actual = counts.sum(axis=1).astype(float)
    present = (predicted + actual) > 0
    precision = np.divide(tp, predicted, out=np.zeros_like(tp), where=predicted > 0)
    recall = np.divide(tp, actual, out=np.zeros_like(tp), where=actual > 0)
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(tp), where=denom > 0)
    return {
        "accuracy": float(tp.sum() / counts.sum()),
        "precision": float(precision[present].mean()),
        "recall": float(recall[present].mean()),
        "f1": float(f1[present].mean()),
        "examples": int(counts.sum()),
    }


# --- extractive spans (SQuAD's exact match and token F1) --------------------------------------------------------

_PUNCTUATION = set(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalise_answer(text: str) -> str:
    """SQuAD's normal form: lower case, punctuation dropped, the articles a / an / the dropped, whitespace single."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, gold: str) -> float:
    return float(normalise_answer(prediction) == normalise_answer(gold))


def token_f1(prediction: str, gold: str) -> float:
    """F1 of the normalised tokens shared (as a multiset); two empty answers agree (1), one empty scores 0."""
    predicted, wanted = normalise_answer(prediction).split(), normalise_answer(gold).split()
    if not predicted or not wanted:
        return float(predicted == wanted)
    shared = sum((Counter(predicted) & Counter(wanted)).values())
    if shared == 0:
        return 0.0
    precision, recall = shared / len(predicted), shared / len(wanted)
    return 2 * precision * recall / (precision + recall)


def span_metrics(predictions: Sequence[str], golds: Sequence[Sequence[str]]) -> dict:
    """Exact match and token F1 of each prediction against its best gold answer, averaged over examples. A gold list
    that is empty means "no answer": only the empty prediction is right there (SQuAD v2). Also the scores on the
    answerable examples alone and the share of unanswerable ones answered with nothing."""
    exact, f1, has, none = [], [], [], []
    for prediction, answers in zip(predictions, golds, strict=True):
        references = list(answers) or [""]
        e = max(exact_match(prediction, g) for g in references)
        f = max(token_f1(prediction, g) for g in references)
        exact.append(e)
        f1.append(f)
        (has if answers else none).append((e, f, prediction == ""))

    def mean(values) -> float:
        values = list(values)
        return sum(values) / len(values) if values else 0.0

    return {
        "exact": mean(exact),
        "f1": mean(f1),
        "has_answer_exact": mean(e for e, _, _ in has),
        "has_answer_f1": mean(f for _, f, _ in has),
        "no_answer_accuracy": mean(empty for _, _, empty in none),
        "has_answer": len(has),
        "no_answer": len(none),
        "examples": len(exact),
    }
