"""Classification metrics: accuracy and macro-averaged precision, recall and F1.

Macro averaging gives every class the same weight, whatever its size. A class never predicted has precision 0,
a class absent from the labels has recall 0, and F1 is 0 where precision + recall is 0 (the convention of
scikit-learn with ``zero_division=0``). Classes that occur neither in the labels nor in the predictions are left
out of the macro averages.
"""

from __future__ import annotations

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
