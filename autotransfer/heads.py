"""Classifier heads and the pooling that feeds them; every head is a plain `nn.Module` that exports to ONNX.

All heads start with a BatchNorm1d, so features from any tap (ReLU6 outputs in 0..6, or unbounded
projections) reach the classifier on one scale; in eval mode it folds into an affine map.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

HeadKind = Literal["linear", "svm", "mlp"]
PoolKind = Literal["avg", "avgmax"]
HEADS: tuple[str, ...] = ("linear", "svm", "mlp")
POOLS: tuple[str, ...] = ("avg", "avgmax")


class GlobalPool(nn.Module):
    """[N,C,H,W] -> [N,C] (average) or [N,2C] (average and max concatenated, as fast.ai does)."""

    def __init__(self, kind: PoolKind) -> None:
        super().__init__()
        self.kind = kind

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        avg = x.mean(dim=(2, 3))
        return torch.cat([avg, x.amax(dim=(2, 3))], dim=1) if self.kind == "avgmax" else avg


def pooled_dim(channels: int, pool: PoolKind) -> int:
    return channels * 2 if pool == "avgmax" else channels


def build_head(kind: HeadKind, in_dim: int, num_classes: int, *, hidden: int = 0, dropout: float = 0.0) -> nn.Module:
    """linear/svm: BN -> dropout -> Linear. mlp: BN -> dropout -> Linear -> ReLU -> dropout -> Linear.

    The SVM is the linear head trained with a multi-class hinge loss (see `head_loss`), so it exports as
    the same `nn.Linear` graph.
    """
    if kind in ("linear", "svm"):
        return nn.Sequential(nn.BatchNorm1d(in_dim), nn.Dropout(dropout), nn.Linear(in_dim, num_classes))
    if kind == "mlp":
        if hidden < 1:
            raise ValueError(f"An mlp head needs a hidden width >= 1, but got {hidden=}.")
        return nn.Sequential(nn.BatchNorm1d(in_dim), nn.Dropout(dropout), nn.Linear(in_dim, hidden), nn.ReLU(),
                             nn.Dropout(dropout), nn.Linear(hidden, num_classes))
    raise ValueError(f"Unknown head {kind!r}; expected one of {HEADS}.")


def head_loss(kind: HeadKind, *, label_smoothing: float = 0.0, weight: torch.Tensor | None = None) -> nn.Module:
    """Cross-entropy for softmax heads; for the SVM the multi-class squared hinge (scikit-learn's LinearSVC
    default), which is smooth, so L-BFGS fits it to convergence. `weight`: one loss weight per class."""
    if kind == "svm":
        return nn.MultiMarginLoss(p=2, margin=1.0, weight=weight)
    return nn.CrossEntropyLoss(weight=weight, label_smoothing=label_smoothing)
