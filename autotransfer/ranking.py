"""The order of complete trials, best first: the one place `best_trial`, the leaderboard and the export agree on.

First the objective (the study's validation metric). Among equal scores, common on few-shot data where dozens
of trials classify every validation image correctly, the validation margin (`calibration.py`) decides, with the
one-standard-error rule: trials whose margin is within one standard error of the best margin are tied, and the
earliest of them wins (earlier trials are the prior's picks: the recommended strategy, the careful hand recipe).
A margin difference smaller than its own noise says nothing about the test set; on shapes (48 validation images,
all scored 1.000) the four linear-head trials' margins ranked their test accuracies exactly, but an MLP head
topped them all by 1 % of margin and was the worst of the five on test.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from itertools import groupby
from typing import TYPE_CHECKING

import optuna

if TYPE_CHECKING:  # the leaderboard reads rankings without torch
    from autotransfer.calibration import Margin


def _margin(trial: optuna.trial.FrozenTrial) -> float:
    return trial.user_attrs.get("val_margin", -math.inf)


def ranked(trials: Iterable[optuna.trial.FrozenTrial]) -> list[optuna.trial.FrozenTrial]:
    """Complete trials (any others are ignored) from best to worst; see the module docstring."""
    complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE and t.value is not None]
    order: list[optuna.trial.FrozenTrial] = []
    by_value = sorted(complete, key=lambda t: (-t.value, t.number))
    for _, group in groupby(by_value, key=lambda t: t.value):
        group = list(group)
        leader = max(group, key=lambda t: (_margin(t), -t.number))
        floor = _margin(leader) - leader.user_attrs.get("val_margin_se", 0.0)
        tied = [t for t in group if _margin(t) >= floor]  # in trial order
        rest = sorted((t for t in group if _margin(t) < floor), key=lambda t: (-_margin(t), t.number))
        order += tied + rest
    return order


def ranks_above(score: float, margin: Margin, best: optuna.trial.FrozenTrial | None) -> bool:
    """Whether a new result would rank above `best` (the rule of `ranked` for two trials: an equal score needs
    a margin better by more than its standard error, since the earlier trial wins a tie)."""
    if best is None or score != best.value:
        return best is None or score > best.value
    return margin.mean - margin.se > _margin(best)
