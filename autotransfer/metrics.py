"""Classification metrics from predicted classes, and which one a study optimises.

Plain accuracy rewards a model that ignores a rare class: on 90 images of one class and 10 of another,
always answering the big class scores 0.90. Balanced accuracy (the mean per-class recall) scores it 0.50,
so a study on imbalanced data defaults to it. Everything here is one confusion count (`torch.bincount`,
O(images + classes^2) memory only for the confusion matrix itself), so 1,000 classes cost no Python loop.
"""

from __future__ import annotations

import math

import torch

from autotransfer.defaults import IMBALANCE_RATIO, METRICS
from autotransfer.errors import ConfigError


def _as_tensor(x) -> torch.Tensor:
    return torch.as_tensor(x).reshape(-1).long()


def confusion(predicted, labels, num_classes: int) -> torch.Tensor:
    """int64 [num_classes, num_classes]: row = true class, column = predicted class."""
    p, y = _as_tensor(predicted), _as_tensor(labels)
    return torch.bincount(y * num_classes + p, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def per_class_recall(predicted, labels, num_classes: int) -> list[float | None]:
    """Recall of each class in class order; None for a class with no true example (nothing to recall)."""
    c = confusion(predicted, labels, num_classes)
    support, hits = c.sum(1), c.diagonal()
    return [float(h) / int(n) if n > 0 else None for h, n in zip(hits.tolist(), support.tolist(), strict=True)]


def score(metric: str, predicted, labels, num_classes: int) -> float:
    """`metric` (one of METRICS) of predicted classes against true labels.

    Balanced accuracy averages recall over the classes present in `labels`; macro F1 averages F1 over the
    classes present in `labels` or in the predictions (both as scikit-learn does).
    """
    p, y = _as_tensor(predicted), _as_tensor(labels)
    if len(y) == 0:
        return 0.0
    if metric == "accuracy":
        return float((p == y).double().mean())
    c = confusion(p, y, num_classes).double()
    support, predicted_count, hits = c.sum(1), c.sum(0), c.diagonal()
    if metric == "balanced_accuracy":
        present = support > 0
        return float((hits[present] / support[present]).mean())
    if metric == "macro_f1":
        present = (support > 0) | (predicted_count > 0)
        f1 = 2 * hits[present] / (support[present] + predicted_count[present])
        return float(f1.mean())
    raise ConfigError(_unknown(metric))


def _unknown(metric: str) -> str:
    return f"Unknown metric {metric!r}; expected one of {', '.join(METRICS)} (--metric)."


def class_counts(labels, num_classes: int) -> torch.Tensor:
    return torch.bincount(_as_tensor(labels), minlength=num_classes)


def imbalance_ratio(labels, num_classes: int) -> float:
    """Largest class count / smallest (inf when a class has no example)."""
    counts = class_counts(labels, num_classes)
    smallest = int(counts.min())
    return math.inf if smallest == 0 else int(counts.max()) / smallest


def is_imbalanced(labels, num_classes: int) -> bool:
    return imbalance_ratio(labels, num_classes) > IMBALANCE_RATIO


def balanced_class_weights(labels, num_classes: int) -> torch.Tensor:
    """float32 weights n / (classes * count): every class weighs the same in the loss (scikit-learn's "balanced")."""
    counts = class_counts(labels, num_classes).double()
    weights = len(_as_tensor(labels)) / (num_classes * counts.clamp(min=1))
    return weights.float()


def choose_metric(given: str | None, stored: str | None, train_labels, num_classes: int, *,
                  has_trials: bool = False) -> tuple[str, str]:
    """(metric, why) for a study: the one it was started with, else `given`, else one from the train split.

    A study keeps its metric: its trials' values are only comparable under one. A study with trials but no
    stored metric predates `--metric`: its trials were scored by accuracy.
    """
    if given is not None and given not in METRICS:
        raise ConfigError(_unknown(given))
    if stored is None and has_trials:
        stored = "accuracy"
    if stored is not None:
        if given is not None and given != stored:
            raise ConfigError(f"--metric {given} differs from this study's metric {stored!r}; pass --metric {stored} "
                              "(or leave it out) to continue it, or a new --study-name.")
        return stored, "kept from the study"
    if given is not None:
        return given, "--metric"
    ratio = imbalance_ratio(train_labels, num_classes)
    if ratio > IMBALANCE_RATIO:
        return "balanced_accuracy", f"largest train class {ratio:.1f}x the smallest (> {IMBALANCE_RATIO:g}x)"
    return "accuracy", f"largest train class {ratio:.1f}x the smallest (<= {IMBALANCE_RATIO:g}x)"
