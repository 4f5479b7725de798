import dataclasses

import optuna
import pytest

from autotransfer.checkpoints import save_checkpoint
from autotransfer.data import load_data
from autotransfer.errors import ConfigError
from autotransfer.features import ActivationCache
from autotransfer.prior import build_prior
from autotransfer.report import COLUMNS, leaderboard
from autotransfer.strategy import Strategy
from autotransfer.study import StudyConfig, best_trial, default_storage, finished_trials, open_study, run_study
from autotransfer.trainer import train_trial


def _config(tmp_path, budget, **kw):
    return StudyConfig(study_name="t", storage=default_storage(tmp_path), out=tmp_path, budget=budget,
                       max_steps=20, **kw)


def test_study_runs_exactly_the_budget_then_resumes(tmp_path, tiny, tiny_cache):
    study = run_study(_config(tmp_path, 5), tiny, tiny_cache)
    assert finished_trials(study) == 5
    prior = build_prior(tiny_cache, max_steps=20)
    first = [Strategy.from_dict(t.user_attrs["strategy"]) for t in study.trials[:len(prior.first_strategies)]]
    assert first == prior.first_strategies[:5], "the prior's strategies are the first trials"
    for t in study.trials:
        fine_tune = Strategy.from_dict(t.user_attrs["strategy"]).trains_backbone
        assert bool(t.intermediate_values) == fine_tune, "only fine-tuning trials report at the rungs"
        if fine_tune:
            assert list(t.intermediate_values) in ([2, 7, 20], [2]), "the ladder of 20 steps: rungs 2, 7, then 20"

    again = run_study(_config(tmp_path, 5), tiny, tiny_cache)
    assert len(again.trials) == 5, "a finished study runs nothing more"
    more = run_study(_config(tmp_path, 7), tiny, tiny_cache)
    assert finished_trials(more) == 7 and [t.number for t in more.trials] == list(range(7))
    assert list((tmp_path / "checkpoints").glob("*.pt")) == [tmp_path / "checkpoints" /
                                                            f"trial_{best_trial(more).number}.pt"]


def test_same_name_with_other_data_is_refused(tmp_path, tiny, tiny_cache):
    run_study(_config(tmp_path, 1), tiny, tiny_cache)
    other = ActivationCache(tiny, load_data("digits", image_size=16, seed=3))
    with pytest.raises(ConfigError, match="different data"):
        run_study(_config(tmp_path, 2), tiny, other)


def test_bad_storage_url_is_a_config_error(tmp_path):
    config = StudyConfig(study_name="t", storage="notadb://x", out=tmp_path)
    with pytest.raises(ConfigError, match="cannot be opened"):
        open_study(config)


def test_a_failing_trial_does_not_stop_the_study(tmp_path, tiny, tiny_cache, monkeypatch):
    import autotransfer.study as study_module

    real = study_module.train_trial
    calls = []

    def flaky(strategy, *args, **kwargs):
        calls.append(strategy)
        if len(calls) == 2:
            raise RuntimeError("CUDA out of memory (injected)")
        return real(strategy, *args, **kwargs)

    monkeypatch.setattr(study_module, "train_trial", flaky)
    study = run_study(_config(tmp_path, 3), tiny, tiny_cache)
    states = [t.state for t in study.trials]
    assert states.count(optuna.trial.TrialState.FAIL) == 1 and finished_trials(study) == 3
    board = leaderboard(study)
    assert list(board.columns) == COLUMNS
    failed = board[board.state == "fail"]
    assert len(failed) == 1 and "out of memory" in failed.iloc[0]["note"]


def test_leaderboard_is_sorted_and_ranks_only_complete_trials(tmp_path, tiny, tiny_cache):
    study = run_study(_config(tmp_path, 6), tiny, tiny_cache)
    board = leaderboard(study)
    assert len(board) == 6 and list(board.columns) == COLUMNS
    complete = board[board.state == "complete"]
    assert complete.val_accuracy.is_monotonic_decreasing
    assert list(complete["rank"]) == list(range(1, len(complete) + 1))
    assert board[board.state != "complete"]["rank"].isna().all()
    assert board.iloc[0].trial == best_trial(study).number


def test_a_hopeless_fine_tuning_trial_stops_at_the_first_rung(tmp_path, tiny, tiny_cache, monkeypatch):
    from autotransfer import study as study_module

    good = Strategy(tap=3, freeze=2, lr=0.005, steps=20)
    hopeless = Strategy(tap=3, freeze=2, lr=0.1, steps=20, weight_decay=5.0, optimizer="adamw")  # weights shrink
    prior = build_prior(tiny_cache, max_steps=20)
    monkeypatch.setattr(study_module, "build_prior",
                        lambda *a, **k: dataclasses.replace(prior, first_strategies=[good, hopeless]))
    study = run_study(_config(tmp_path, 2), tiny, tiny_cache)
    first, second = study.trials
    assert first.state == optuna.trial.TrialState.COMPLETE and list(first.intermediate_values) == [2, 7, 20]
    assert second.state == optuna.trial.TrialState.PRUNED and list(second.intermediate_values) == [2]
    assert second.user_attrs["steps_run"] == 2 and second.intermediate_values[2] < first.intermediate_values[2]
    assert 0 < first.user_attrs["train_accuracy"] <= 1, "kept for the refit's check"


def test_a_new_best_checkpoint_leaves_the_files_of_trials_still_running(tmp_path, tiny, tiny_cache):
    """Another worker's running trial may be between saving and uploading its file: deleting it failed that trial."""
    strategy = build_prior(tiny_cache, max_steps=20).first_strategies[0]
    result = train_trial(strategy, tiny, tiny_cache)
    save_checkpoint(tmp_path, 1, result, strategy)
    save_checkpoint(tmp_path, 2, result, strategy, keep=[1, 2])
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("*.pt")) == ["trial_1.pt", "trial_2.pt"]
    save_checkpoint(tmp_path, 3, result, strategy, keep=[3])
    assert [p.name for p in (tmp_path / "checkpoints").glob("*.pt")] == ["trial_3.pt"]


def test_a_saturated_study_stops_early_and_patience_zero_runs_the_whole_budget(tmp_path, tiny, tiny_cache,
                                                                                 monkeypatch):
    import dataclasses

    import autotransfer.study as study_module
    from autotransfer.saturation import saturation_stop

    real = study_module.train_trial

    def perfect(strategy, *args, **kwargs):  # the real trial, scored as if every validation image were right
        return dataclasses.replace(real(strategy, *args, **kwargs), val_score=1.0)

    monkeypatch.setattr(study_module, "train_trial", perfect)
    study = run_study(_config(tmp_path, 30, patience=3), tiny, tiny_cache)
    finished = finished_trials(study)
    prior = sum(t.user_attrs.get("enqueued") == "prior" for t in study.trials)
    leader = best_trial(study)
    assert prior <= finished < 30 and leader.value == 1.0
    assert sum(t.number > leader.number for t in study.trials) >= 3
    assert saturation_stop(study, 3) is not None
    assert not any(t.state == optuna.trial.TrialState.WAITING for t in study.trials)
    assert finished_trials(run_study(_config(tmp_path, 30, patience=3), tiny, tiny_cache)) == finished  # resumed
    assert finished_trials(run_study(_config(tmp_path, 30, patience=0), tiny, tiny_cache)) == 30
