"""A validation score that does not saturate: how clearly the validation images are classified.

On few-shot data dozens of strategies classify all 30-150 validation images correctly, and accuracy cannot
rank them. The margin of the right class over the strongest wrong one still can, measured in units of the
typical spread of the logits over the whole split: it does not change when the logits are scaled
(temperature, an SVM's hinge scale, label smoothing's shrinkage), a misclassified image counts negatively,
and it does not degenerate with two classes (where a margin per image over that image's own spread is a
constant).
"""

from __future__ import annotations

import torch


@torch.no_grad()
def validation_margin(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """mean(right-class logit - best wrong logit) / sqrt(mean over images of the variance of their logits)."""
    logits = logits.float()
    if len(logits) == 0:
        return 0.0
    right = logits.gather(1, labels.view(-1, 1)).squeeze(1)
    wrong = logits.scatter(1, labels.view(-1, 1), float("-inf")).amax(1)
    scale = logits.var(1, unbiased=False).mean().sqrt().clamp_min(1e-12)
    return float((right - wrong).mean() / scale)
