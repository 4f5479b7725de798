"""A validation score that does not saturate: how clearly the validation images are classified.

On few-shot data dozens of strategies classify all 30-150 validation images correctly, and accuracy cannot
rank them. The margin of the right class over the strongest wrong one still can, measured in units of the
typical spread of the logits over the whole split: it does not change when the logits are scaled
(temperature, an SVM's hinge scale, label smoothing's shrinkage), a misclassified image counts negatively,
and it does not degenerate with two classes (where a margin per image over that image's own spread is a
constant).
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class Margin(NamedTuple):
    mean: float  # the score
    se: float  # its standard error over the images: differences below it are noise (see `ranking.py`)


@torch.no_grad()
def validation_margin(logits: torch.Tensor, labels: torch.Tensor) -> Margin:
    """mean(right-class logit - best wrong logit) / sqrt(mean over images of the variance of their logits)."""
    logits = logits.float()
    if len(logits) == 0:
        return Margin(0.0, 0.0)
    right = logits.gather(1, labels.view(-1, 1)).squeeze(1)
    wrong = logits.scatter(1, labels.view(-1, 1), float("-inf")).amax(1)
    scale = logits.var(1, unbiased=False).mean().sqrt().clamp_min(1e-12)
    per_image = (right - wrong) / scale
    se = per_image.std() / len(per_image) ** 0.5 if len(per_image) > 1 else torch.tensor(0.0)
    return Margin(float(per_image.mean()), float(se))
