"""The order of complete trials, best first: the one place `best_trial`, the leaderboard and the export agree on.

First the objective (the study's validation metric). Among equal scores, common on few-shot data where dozens
of trials classify every validation image correctly, the validation margin (`calibration.py`) decides, with the
one-standard-error rule: trials whose margin is within one standard error of the best margin are tied, and the
earliest of them wins (earlier trials are the prior's picks: the recommended strategy, the careful hand recipe).
A margin difference smaller than its own noise says nothing about the test set; on shapes (48 validation images,
all scored 1.000) the four linear-head trials' margins ranked their test accuracies exactly, but an MLP head
topped them all by 1 % of margin and was the worst of the five on test.

With unlabelled images (`--unlabeled`) the objective is the mean of validation and reverse validation
(`adapt.py`), and the margin is the mean of theirs. The validation margin is measured on the labelled setting,
where adaptation shows nothing; reverse validation saturates as accuracy does (on the photo patches pair of
`benchmarks/adapt.py`, budget 50, 2026-12-07, four trials scored 1.000 on both), but its margin still measures
how well a head fitted to the trial's predictions on the unlabelled images separates the labelled ones. Of those
four, retrained and scored on the target test split, the validation margin put first a fine-tune scoring 0.920
there (Spearman 0.0 over the four); the mean of both margins a fine-tune with AdaBN and DANN scoring 0.987, the
best of them (Spearman 0.4). Among tied trials, one that uses the unlabelled images (AdaBN, self-training or
DANN) comes first: what it does on the other setting is the point, and neither margin sees all of it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from itertools import groupby
from typing import Any

import optuna


def _margin(trial: optuna.trial.FrozenTrial) -> tuple[float, float]:
    """(margin, its standard error): the validation margin, averaged with the reverse validation's when there is
    one (their errors taken as independent)."""
    attrs = trial.user_attrs
    if "reverse_margin" not in attrs:  # also trials of studies from before the reverse margin was recorded
        return attrs.get("val_margin", -math.inf), attrs.get("val_margin_se", 0.0)
    return (0.5 * (attrs["val_margin"] + attrs["reverse_margin"]),
            0.5 * math.hypot(attrs["val_margin_se"], attrs["reverse_margin_se"]))


def _adapts(trial: optuna.trial.FrozenTrial) -> bool:
    """Whether the trial's strategy learns from the unlabelled images (see `adapt.py`, `dann.py`)."""
    strategy = trial.user_attrs.get("strategy", {})
    return (strategy.get("adapt", "none") != "none" or strategy.get("dann_weight", 0.0) > 0
            or strategy.get("im_weight", 0.0) > 0)


def ranked(trials: Iterable[optuna.trial.FrozenTrial]) -> list[optuna.trial.FrozenTrial]:
    """Complete trials (any others are ignored) from best to worst; see the module docstring."""
    complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE and t.value is not None]
    order: list[optuna.trial.FrozenTrial] = []
    by_value = sorted(complete, key=lambda t: (-t.value, t.number))
    for _, group in groupby(by_value, key=lambda t: t.value):
        group = list(group)
        leader = max(group, key=lambda t: (_margin(t)[0], -t.number))
        mean, se = _margin(leader)
        floor = mean - se
        tied = sorted((t for t in group if _margin(t)[0] >= floor), key=lambda t: (not _adapts(t), t.number))
        rest = sorted((t for t in group if _margin(t)[0] < floor), key=lambda t: (-_margin(t)[0], t.number))
        order += tied + rest
    return order


def ranks_above(number: int, score: float, attrs: dict[str, Any], best: optuna.trial.FrozenTrial | None) -> bool:
    """Whether trial `number`, just scored (`score`, and the user attributes `attrs` it will have: its margins and
    `strategy`) and not yet stored as complete, ranks above `best`: `ranked` of the two, so the weights the search
    keeps are those the export picks (with parallel workers the new trial may be the earlier of the two)."""
    if best is None:
        return True
    new = optuna.trial.create_trial(value=score, user_attrs=attrs)
    new.number = number
    return ranked([best, new])[0] is new
