"""Stopping a search early once its validation score has saturated (`--patience`).

On few-shot data dozens of trials classify every validation image correctly (and, with `--unlabeled`, score
1.000 by reverse validation too): no later trial can score higher, and only the tie-break (`ranking.py`: the
validation margin, and with unlabelled images whether a tied trial adapts) can still change the leader. Trials
after that point mostly cost time: on the suite's textures the exported trial was done 12 minutes into a
58-minute search. So the search stops when all of these hold:

- the leader scores the objective's maximum (1.0: every metric of `defaults.METRICS` is a fraction);
- every strategy the prior queued has run (they are the strongest candidates, and the earliest of a tie wins);
- the last `patience` finished trials after the leader did not displace it.

A score below the maximum never stops the search: there a later trial can still be better by what validation
measures. `patience=0` runs the whole budget; a rerun with a larger `--patience` continues the study.
"""

from __future__ import annotations

import optuna
from optuna.trial import TrialState

from autotransfer.budget import FINISHED
from autotransfer.ranking import ranked

_MAX_SCORE = 1.0 - 1e-9  # exact fractions; float rounding must not hide a perfect score


def saturation_stop(study: optuna.Study, patience: int) -> str | None:
    """Why the search should stop before its budget (one line for the user), or None to go on."""
    if patience <= 0:
        return None
    trials = study.get_trials(deepcopy=False)
    if any(t.state == TrialState.WAITING and t.user_attrs.get("enqueued") == "prior" for t in trials):
        return None
    order = ranked(trials)
    if not order or order[0].value < _MAX_SCORE:
        return None
    leader = order[0]
    after = sum(t.state in FINISHED and t.number > leader.number for t in trials)
    if after < patience:
        return None
    finished = sum(t.state in FINISHED for t in trials)
    return (f"stopped early after {finished} trials: trial {leader.number} scores {leader.value:.3f}, the maximum, "
            f"and the {after} trials after it did not displace it (--patience {patience}; --patience 0 runs the "
            "whole budget)")
