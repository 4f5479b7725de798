"""Learning from unlabelled images (`--unlabeled`): AdaBN, self-training on confident pseudo-labels, information
maximisation, and reverse validation, the score that lets the search see what unlabelled images buy. (DANN,
which trains against a domain classifier, is in `dann.py`.)

AdaBN (Li et al., 2016): BatchNorm statistics describe a domain. After training, the head's input BatchNorm takes
its statistics from the unlabelled images' features, and the exported model, which serves the unlabelled images'
setting, keeps them. The labelled validation split is scored before the swap, with its own domain's statistics.
Only the head's: re-estimating the fine-tuned groups' BatchNorm layers too lost up to 37 points of target accuracy
on the digits pair of `benchmarks/adapt.py` (0.625 -> 0.255 for a full fine-tune), while the head's alone gained
on all 12 strategies measured on two pairs (digits +2 to +21 points, photo patches +0.7 to +3.3). The frozen
backbone's own BatchNorm layers, re-estimated on the unlabelled images, lose too (linear probes on stage4,
stage6 and stage7, 2026-12-07): photo patches 0.83-0.86 against 0.91-0.95 for the head's alone, digits
0.15-0.25 against 0.41-0.60; re-estimated on the source images as well, 0.83-0.90 and 0.31-0.34.

Self-training: fit on the labelled images, label the unlabelled ones with the model's own predictions, keep the
most confident `pseudo_fraction` of each predicted class (a per-class quota, so one dominant class cannot take
every pseudo-label), fit again on both, `pseudo_rounds` times. On frozen features each fit is an L-BFGS fit of
the head on cached vectors (seconds); a fine-tune trains on the labelled images plus those its self-trained
linear probe labelled.

Information maximisation (SHOT, Liang et al., 2020): a fine-tune's unlabelled batches add the mean entropy of
the head's predictions minus the entropy of their mean, times `im_weight`. On the digits pair's prior full
fine-tune (AdaBN, DANN 0.1; 2026-12-07) weights 0.3 and 1.0 took target accuracy from 0.661 to 0.737 and
0.748, while reverse validation fell from 0.982 to 0.964 and 0.969: the objective does not reward it there, so it
is a searched choice, not a default.

Reverse validation (Zhong et al., 2010): a linear head is fitted on the unlabelled images' features with the
trial's predictions as labels, then scored on the labelled validation split. Each side is standardised by its
own statistics first (as the head under AdaBN does): on 20 strategies of the digits pair that ranked target
accuracy with Spearman 0.95 instead of 0.82, on 6 of the photo patches pair 0.91 instead of 0.75. A model whose
predictions on the unlabelled images are right, in features that mean the same on both sides, scores high; one
whose predictions there are noise scores near chance, however well it does on the labelled validation split.
Validation accuracy alone cannot see that, since the labelled validation images come from the labelled setting.
The reverse head's validation margin (`calibration.py`) goes with its accuracy: it still orders trials once the
accuracy is 1.000 (see `ranking.py`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import nn

from autotransfer.calibration import Margin, validation_margin
from autotransfer.heads import build_head
from autotransfer.probe import set_statistics

Fit = Callable[[torch.Tensor, torch.Tensor], None]  # (features, labels) -> fits the head in place
Predict = Callable[[torch.Tensor], torch.Tensor]  # features -> logits


def confident_rows(logits: torch.Tensor, fraction: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(row indices, pseudo-labels): per predicted class, its `fraction` most confident rows (at least one)."""
    probabilities = logits.float().softmax(1)
    confidence, predicted = probabilities.max(1)
    chosen = []
    for c in predicted.unique():
        rows = (predicted == c).nonzero(as_tuple=True)[0]
        keep = max(1, round(fraction * len(rows)))
        chosen.append(rows[confidence[rows].argsort(descending=True)[:keep]])
    idx = torch.cat(chosen).sort().values if chosen else torch.empty(0, dtype=torch.long)
    return idx, predicted[idx]


def self_train(fit: Fit, predict: Predict, x: torch.Tensor, y: torch.Tensor, x_unlabeled: torch.Tensor, *,
               fraction: float, rounds: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Fit on (x, y), then `rounds` times: pseudo-label `x_unlabeled` and fit on both. Returns the last round's
    (row indices into `x_unlabeled`, pseudo-labels)."""
    fit(x, y)
    idx, labels = torch.empty(0, dtype=torch.long), torch.empty(0, dtype=torch.long)
    for _ in range(rounds):
        with torch.no_grad():
            idx, labels = confident_rows(predict(x_unlabeled), fraction)
        fit(torch.cat([x, x_unlabeled[idx]]), torch.cat([y, labels.to(y.device)]))
    return idx, labels


def information_loss(logits: torch.Tensor) -> torch.Tensor:
    """Information maximisation on unlabelled rows (Krause et al., 2010; SHOT, Liang et al., 2020): the mean
    entropy of each row's prediction minus the entropy of the batch's mean prediction. Minimising it makes each
    prediction confident while the batch still spreads over the classes, so confidence cannot come from calling
    every image one class. Zero for uniform predictions; -log(classes) at best."""
    log_p = logits.log_softmax(dim=1)
    p = log_p.exp()
    mean = p.mean(dim=0)
    return -(p * log_p).sum(dim=1).mean() + (mean * mean.clamp_min(1e-12).log()).sum()


def adabn(norm: nn.BatchNorm1d, x_unlabeled: torch.Tensor) -> None:
    """AdaBN of a head: its input BatchNorm standardises with the unlabelled images' features (in place)."""
    set_statistics(norm, x_unlabeled)


def standardised(x: torch.Tensor) -> torch.Tensor:
    x = x.float()
    return (x - x.mean(0)) / x.std(0, unbiased=False).clamp_min(1e-6)


class Reverse(NamedTuple):
    accuracy: float  # half of the objective with unlabelled images (see `trainer.TrialResult.objective`)
    margin: Margin  # half of the margin that orders equal objectives (see `ranking.py`)


FitLinear = Callable[[nn.Sequential, torch.Tensor, torch.Tensor], None]  # (head, features, labels): fits in place


def reverse_validation(x_unlabeled: torch.Tensor, unlabeled_logits: torch.Tensor, x_val: torch.Tensor,
                       y_val: torch.Tensor, fit_linear: FitLinear, num_classes: int) -> Reverse:
    """Accuracy and margin on (x_val, y_val) of a linear head fitted on `x_unlabeled` labelled by
    `unlabeled_logits`, each side standardised by its own statistics."""
    if len(x_unlabeled) < 2 or len(x_val) == 0:
        return Reverse(0.0, Margin(0.0, 0.0))
    x_unlabeled, x_val = standardised(x_unlabeled), standardised(x_val)
    head = build_head("linear", x_unlabeled.shape[1], num_classes)
    fit_linear(head, x_unlabeled.float(), unlabeled_logits.argmax(1))
    with torch.no_grad():
        logits = head(x_val.float())
    return Reverse(float((logits.argmax(1) == y_val).float().mean()), validation_margin(logits, y_val))
