"""Domain-adversarial training (DANN, Ganin et al., 2016) for fine-tunes with unlabelled images.

A domain classifier learns to tell labelled from unlabelled images by the pooled features the head reads; behind a
gradient-reversal layer, the fine-tuned groups learn to make that impossible, so the head's features mean the same
on both sides. The classifier is training-only: the exported model is the same network as without it.

The reversal weight follows Ganin's ramp, `weight * (2 / (1 + exp(-10 p)) - 1)` over the fine-tune's progress
`p`, so the first steps (a head fitted on source features) are not jolted; or stays at `weight` throughout.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F


class _ReverseGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: float) -> torch.Tensor:
        ctx.weight = weight
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return -ctx.weight * grad, None


def reverse_gradient(x: torch.Tensor, weight: float) -> torch.Tensor:
    """Identity forward; the gradient flowing back is multiplied by `-weight`."""
    return _ReverseGradient.apply(x, weight)


def reversal_weight(weight: float, schedule: str, progress: float) -> float:
    """The reversal weight at `progress` (0..1 of the fine-tune's steps)."""
    return weight * (2.0 / (1.0 + math.exp(-10.0 * progress)) - 1.0) if schedule == "ramp" else weight


class DomainClassifier(nn.Module):
    """Pooled features -> one logit: labelled (0) or unlabelled (1). Its input is standardised over the mixed
    batch (pooled features from different taps differ in scale by orders of magnitude, like the head's)."""

    def __init__(self, in_dim: int, hidden: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.BatchNorm1d(in_dim, affine=False), nn.Linear(in_dim, hidden), nn.ReLU(),
                                 nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 1))

    def loss(self, features: torch.Tensor, labelled: int, weight: float) -> torch.Tensor:
        """Binary cross-entropy of telling the first `labelled` rows of `features` from the rest, through a
        gradient reversal of `weight` (so minimising it trains this classifier and confuses the features)."""
        logits = self.net(reverse_gradient(features.float(), weight)).squeeze(1)
        target = torch.ones_like(logits)
        target[:labelled] = 0.0
        return F.binary_cross_entropy_with_logits(logits, target)
