"""The search stops early only once validation saturated and the leader held for `patience` trials."""

import optuna
from optuna.trial import TrialState, create_trial

from autotransfer.saturation import saturation_stop


def _study(values, *, margins=None, waiting_prior=False):
    study = optuna.create_study(direction="maximize")
    for i, value in enumerate(values):
        margin = 1.0 if margins is None else margins[i]
        study.add_trial(create_trial(state=TrialState.COMPLETE, value=value,
                                     user_attrs={"val_margin": margin, "val_margin_se": 0.05}))
    if waiting_prior:
        study.enqueue_trial({}, user_attrs={"enqueued": "prior"})
    return study


def test_a_saturated_leader_held_for_patience_trials_stops_the_search():
    study = _study([0.9, 1.0] + [1.0] * 3 + [0.95] * 7)  # trial 1 leads (the earliest of the tie), 10 after it
    assert saturation_stop(_study([0.9, 1.0] + [0.95] * 9), patience=10) is None  # only 9 after it
    line = saturation_stop(study, patience=10)
    assert line is not None and "after 12 trials: trial 1 scores 1.000" in line and "--patience 0" in line


def test_a_score_below_the_maximum_never_stops_it():
    assert saturation_stop(_study([0.99] + [0.9] * 40), patience=10) is None


def test_patience_zero_and_queued_prior_trials_keep_it_going():
    values = [1.0] + [0.9] * 12
    assert saturation_stop(_study(values), patience=10) is not None
    assert saturation_stop(_study(values), patience=0) is None
    assert saturation_stop(_study(values, waiting_prior=True), patience=10) is None


def test_a_later_trial_that_displaces_the_leader_by_margin_restarts_the_count():
    margins = [1.0] * 6 + [2.0] + [1.0] * 6  # trial 6: the same score, a margin clear of its noise
    study = _study([1.0] * 13, margins=margins)
    assert saturation_stop(study, patience=10) is None  # 6 trials after the new leader
    assert "trial 6" in saturation_stop(study, patience=6)
