"""The one-standard-error rule among equal scores: noise in the margin does not pick the winner."""

import optuna
from optuna.trial import TrialState, create_trial

from autotransfer.ranking import ranked


def _trial(number, value, margin=None, se=0.0):
    attrs = {} if margin is None else {"val_margin": margin, "val_margin_se": se}
    t = create_trial(state=TrialState.COMPLETE, value=value, user_attrs=attrs)
    t.number = number
    return t


def test_margins_within_one_standard_error_of_the_best_are_tied_and_the_earliest_wins():
    # shapes, 48 validation images all right: probe 1.81, hand fine-tune 2.40, MLP head 2.43 (se 0.1)
    trials = [_trial(0, 1.0, 1.81, 0.1), _trial(2, 1.0, 2.40, 0.1), _trial(9, 1.0, 2.43, 0.1)]
    assert [t.number for t in ranked(trials)] == [2, 9, 0]


def test_a_margin_clear_of_the_noise_wins_and_the_score_always_comes_first():
    trials = [_trial(0, 1.0, 1.0, 0.05), _trial(1, 1.0, 2.0, 0.05), _trial(2, 0.99, 9.0, 0.05)]
    assert [t.number for t in ranked(trials)] == [1, 0, 2]


def test_trials_without_a_margin_rank_last_among_their_score_and_others_are_ignored():
    pruned = create_trial(state=TrialState.PRUNED, value=None, intermediate_values={1: 0.99})
    trials = [_trial(0, 1.0), _trial(1, 1.0, 0.2, 0.01), pruned]
    assert [t.number for t in ranked(trials)] == [1, 0]
    assert optuna.trial.TrialState.PRUNED not in {t.state for t in ranked(trials)}
