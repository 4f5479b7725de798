"""The one-standard-error rule among equal scores: noise in the margin does not pick the winner."""

import optuna
from optuna.trial import TrialState, create_trial

from autotransfer.ranking import ranked, ranks_above


def _trial(number, value, margin=None, se=0.0, adapt="none", dann_weight=0.0, reverse=None):
    attrs = {} if margin is None else {"val_margin": margin, "val_margin_se": se}
    if reverse is not None:  # (reverse margin, its standard error)
        attrs |= {"reverse_accuracy": 1.0, "reverse_margin": reverse[0], "reverse_margin_se": reverse[1]}
    attrs["strategy"] = {"tap": 3, "freeze": 0, "adapt": adapt, "dann_weight": dann_weight}
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


def test_among_tied_trials_one_that_adapts_to_the_unlabelled_images_comes_first():
    # the photo patches pair, 2026-12-07: fine-tune 3.153 +- 0.027, the same with AdaBN 3.149 +- 0.020
    plain, adabn = _trial(5, 1.0, 3.153, 0.027), _trial(14, 1.0, 3.149, 0.020, adapt="adabn")
    dann = _trial(8, 1.0, 3.080, 0.039, adapt="adabn", dann_weight=0.1)  # outside the tie: the margin decides
    assert [t.number for t in ranked([plain, dann, adabn])] == [14, 5, 8]
    only_dann = _trial(3, 1.0, 3.150, 0.02, dann_weight=0.01)
    assert [t.number for t in ranked([plain, only_dann])] == [3, 5], "DANN alone adapts too"
    assert [t.number for t in ranked([_trial(1, 0.99, 9.0, 0.1, adapt="adabn"), plain])] == [5, 1], \
        "the score still comes first"


def test_with_reverse_validation_equal_scores_are_ordered_by_the_mean_of_both_margins():
    # validation margins alone would put 1 first (3.15 against 3.08); the reverse margins reverse that
    plain, dann = _trial(1, 1.0, 3.15, 0.02, reverse=(2.0, 0.02)), _trial(3, 1.0, 3.08, 0.02, reverse=(2.4, 0.02))
    assert [t.number for t in ranked([plain, dann])] == [3, 1]
    # the mean's standard error is hypot(0.02, 0.02) / 2 = 0.014: 2.71 is tied with 2.72, 2.69 is not
    assert [t.number for t in ranked([_trial(5, 1.0, 3.0, 0.02, reverse=(2.44, 0.02)), _trial(7, 1.0, 3.0, 0.02,
                                                                                            reverse=(2.42, 0.02))])] \
        == [5, 7]
    tied, apart = _trial(9, 1.0, 3.0, 0.02, reverse=(2.42, 0.02), adapt="adabn"), \
        _trial(9, 1.0, 3.0, 0.02, reverse=(2.38, 0.02), adapt="adabn")
    leader = _trial(5, 1.0, 3.0, 0.02, reverse=(2.44, 0.02))
    assert [t.number for t in ranked([leader, tied])] == [9, 5], "within the tie, the adapting trial first"
    assert [t.number for t in ranked([leader, apart])] == [5, 9]
    assert _ranks_above(tied, leader) and not _ranks_above(apart, leader)
    old = _trial(2, 1.0, 3.5, 0.02)  # a trial of a study from before the reverse margin: its validation margin
    assert [t.number for t in ranked([old, plain])] == [2, 1]


def _ranks_above(new, best):
    return ranks_above(new.number, new.value, new.user_attrs, best)


def test_ranks_above_is_rankeds_order_of_a_new_trial_and_the_best():
    best, adapted_best = _trial(5, 1.0, 3.0, 0.05), _trial(5, 1.0, 3.0, 0.05, adapt="adabn")
    cases = {  # (margin, adapt, number): whether the new trial ranks above `best`, and above `adapted_best`
        (3.1, "none", 9): (True, True), (3.02, "none", 9): (False, False), (2.97, "adabn", 9): (True, False),
        (2.9, "adabn", 9): (False, False), (3.2, "adabn", 9): (True, True), (0.5, "adabn", 9): (False, False),
        (3.02, "none", 2): (True, False),  # with parallel workers, an earlier trial that finishes later wins a tie
    }
    for (margin, adapt, number), expected in cases.items():
        new = _trial(number, 1.0, margin, 0.05, adapt=adapt)
        assert (_ranks_above(new, best), _ranks_above(new, adapted_best)) == expected, (margin, adapt, number)
        assert _ranks_above(new, best) == (ranked([best, new])[0] is new)
    assert not _ranks_above(_trial(9, 0.99, 9.0, 0.05, adapt="adabn"), best), "the score still comes first"
    assert _ranks_above(_trial(9, 0.5, 0.0, 0.0), None), "the first trial always keeps its weights"
