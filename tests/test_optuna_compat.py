"""The Optuna internals autotransfer relies on (autotransfer/optuna_compat.py), run against the installed Optuna.

A failure here means an Optuna release changed one of them: fix the adapter function the test names, not
its callers.
"""

import time
import warnings

import optuna
import pytest
from optuna.storages import RDBStorage
from optuna.trial import TrialState

from autotransfer import optuna_compat


@pytest.fixture()
def url(tmp_path):
    return f"sqlite:///{tmp_path / 'compat.db'}"


@pytest.fixture()
def study(url):
    return optuna.create_study(study_name="compat", storage=url)


def _other_process(url, number):
    """(storage, trial id) of trial `number` as another process opens them (public storage API only)."""
    storage = RDBStorage(url)
    return storage, storage.get_trial_id_from_study_id_trial_number(storage.get_study_id_from_name("compat"), number)


def test_trial_by_number_reads_one_trial_fresh_from_the_storage(study, url):
    study.optimize(lambda t: t.suggest_float("x", 0, 5), n_trials=2)
    running = [study.ask() for _ in range(3)]  # numbers 2, 3, 4
    storage, trial_id = _other_process(url, 3)
    storage.set_trial_user_attr(trial_id, "seen", True)
    got = optuna_compat.trial_by_number(study, 3)
    assert got.number == 3 and got.state == TrialState.RUNNING and got.user_attrs == {"seen": True}
    assert optuna_compat.trial_by_number(study, 0).params == study.trials[0].params
    assert [optuna_compat.trial_by_number(study, t.number).number for t in running] == [2, 3, 4]


def test_stored_trial_sees_what_another_process_wrote(study, url):
    trial = study.ask()
    storage, trial_id = _other_process(url, trial.number)
    storage.set_trial_user_attr(trial_id, "enqueued", "prior")
    got = optuna_compat.stored_trial(study, trial)
    assert got.number == trial.number and got.state == TrialState.RUNNING and got.user_attrs == {"enqueued": "prior"}


def test_queued_params_are_there_before_the_trial_suggests_them(study):
    study.enqueue_trial({"x": 1.5, "head": "svm"})
    queued, free = study.ask(), study.ask()
    stored = optuna_compat.stored_trial(study, queued)
    assert stored.params == {} and optuna_compat.queued_params(stored) == {"x": 1.5, "head": "svm"}
    assert optuna_compat.queued_params(optuna_compat.stored_trial(study, free)) is None


def test_stale_trial_hook_runs_before_optuna_fails_the_trial(tmp_path):
    seen = []

    class Hooked(optuna_compat.StaleTrialHook):
        def before_failing_stale(self, trial_ids):
            for trial_id in trial_ids:
                seen.append(self.get_trial(trial_id).state)
                self.set_trial_user_attr(trial_id, "why", "lost")

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        warnings.filterwarnings("ignore", "Heartbeat of storage is supposed to be used with Study.optimize")
        storage = Hooked(f"sqlite:///{tmp_path / 'hb.db'}", heartbeat_interval=1, grace_period=1)
        study = optuna.create_study(study_name="hb", storage=storage)
        trial = study.ask()
        storage.record_heartbeat(storage.get_trial_id_from_study_id_trial_number(
            storage.get_study_id_from_name("hb"), trial.number))
        live = study.ask()  # no heartbeat yet: never stale
        time.sleep(2.2)
        optuna.storages.fail_stale_trials(study)
    assert seen == [TrialState.RUNNING], "the hook ran once, while the trial could still take attributes"
    lost = study.trials[trial.number]
    assert lost.state == TrialState.FAIL and lost.user_attrs == {"why": "lost"}
    assert study.trials[live.number].state == TrialState.RUNNING
    assert isinstance(storage, RDBStorage)


def _failed_elsewhere(url, trial):
    storage, trial_id = _other_process(url, trial.number)
    storage.set_trial_state_values(trial_id, state=TrialState.FAIL)  # as a process that found it lost does


def test_finished_elsewhere_recognises_optuna_refusing_a_late_tell(study, url):
    trial = study.ask()
    _failed_elsewhere(url, trial)
    with pytest.raises(ValueError) as told:
        study.tell(trial, 1.0)
    assert optuna_compat.finished_elsewhere(told.value), repr(told.value)

    def returns(trial):  # the trial finished normally, but another process had failed it meanwhile
        _failed_elsewhere(url, trial)
        return 1.0

    def raises(trial):
        _failed_elsewhere(url, trial)
        raise RuntimeError("CUDA out of memory")

    for objective in (returns, raises):
        # Optuna 5.0 raises AssertionError("Should not reach.") for `returns`, with the refusal as its context.
        with pytest.raises((ValueError, AssertionError)) as raised:
            study.optimize(objective, n_trials=1, catch=(RuntimeError,))
        assert optuna_compat.finished_elsewhere(raised.value), f"{objective.__name__}: {raised.value!r}"
    assert not optuna_compat.finished_elsewhere(ValueError("The value nan is not acceptable"))
    assert not optuna_compat.finished_elsewhere(AssertionError("Should not reach."))


def test_atomic_claim_starts_a_queued_trial_once_and_refuses_a_finished_one(url):
    storage = optuna_compat.AtomicClaimStorage(url)
    study = optuna.create_study(study_name="compat", storage=storage)
    study.enqueue_trial({"x": 1.0})
    trial_id = study.trials[0]._trial_id
    assert storage.set_trial_state_values(trial_id, TrialState.RUNNING) is True
    started = storage.get_trial(trial_id)
    assert started.state == TrialState.RUNNING and started.datetime_start is not None
    assert storage.set_trial_state_values(trial_id, TrialState.RUNNING) is False, "a second claim loses"
    assert storage.set_trial_state_values(trial_id, TrialState.COMPLETE, [0.5]) is True
    with pytest.raises(optuna.exceptions.UpdateFinishedTrialError):
        storage.set_trial_state_values(trial_id, TrialState.RUNNING)
    assert storage.get_trial(trial_id).value == 0.5
