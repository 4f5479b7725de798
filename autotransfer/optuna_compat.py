"""Every use of Optuna's private API (and of its messages) in autotransfer, in one module.

Optuna has no public way to do these things; each is pinned by tests/test_optuna_compat.py, which runs it
against the installed Optuna and fails, naming the function, when a release changes what it relies on.
Written against Optuna 5.0.0.

- `trial_by_number(study, number)`: one trial, read fresh from the storage (`Study` can only read all of
  them). Uses `Study._storage`, `Study._study_id`, `BaseStorage.get_trial_id_from_study_id_trial_number`.
- `stored_trial(study, trial)`: a live `Trial` as the storage holds it now, e.g. its user attributes as
  other processes see them. Uses `Trial._trial_id` and `Study._storage`.
- `queued_params(trial)`: the parameters `Study.enqueue_trial` fixed for a trial; a trial has no `params`
  until it suggests them. Uses the system attribute `fixed_params`.
- `StaleTrialHook`: an `RDBStorage` whose `before_failing_stale(trial_ids)` runs with the ids of trials
  whose heartbeat stopped, just before Optuna fails them (a failed trial accepts no more attributes).
  Overrides `RDBStorage._get_stale_trial_ids`, which `optuna.storages.fail_stale_trials` calls.
- `AtomicClaimStorage`: an `RDBStorage` where a queued (WAITING) trial starts in one conditional UPDATE, so
  two processes can never both run it. Optuna reads the state, then writes RUNNING; SQLite ignores the row
  lock it asks for, and several workers popping the queue at once started the same trial twice.
  Overrides `RDBStorage.set_trial_state_values` for the RUNNING state, with Optuna's `models.TrialModel`
  and `_create_scoped_session`.
- `finished_elsewhere(error)`: whether an error out of `Study.optimize` / `Study.tell` says that the trial
  was already finished (another process failed it as lost). Matches Optuna's ValueError "Cannot tell a
  <STATE> trial.", also where Optuna 5.0's `Study.optimize` masks it with AssertionError("Should not
  reach.") (an objective that returned normally for a trial failed elsewhere): there it is the context.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

import optuna
from optuna.storages import RDBStorage
from optuna.storages._rdb import models
from optuna.storages._rdb.storage import _create_scoped_session
from optuna.trial import FrozenTrial, TrialState

_FINISHED_MESSAGE = "Cannot tell a "  # optuna/study/_tell.py: f"Cannot tell a {state.name} trial."


def trial_by_number(study: optuna.Study, number: int) -> FrozenTrial:
    """Trial `number` of `study` as stored now (one read, not the whole study)."""
    storage = study._storage
    return storage.get_trial(storage.get_trial_id_from_study_id_trial_number(study._study_id, number))


def stored_trial(study: optuna.Study, trial: optuna.Trial) -> FrozenTrial:
    """The running `trial` as the storage holds it now (attributes other processes wrote included)."""
    return study._storage.get_trial(trial._trial_id)


def queued_params(trial: FrozenTrial) -> dict[str, Any] | None:
    """The parameters `enqueue_trial` fixed for `trial`; None for a trial that was not enqueued."""
    return trial.system_attrs.get("fixed_params")


class StaleTrialHook(RDBStorage):
    """RDBStorage that calls `before_failing_stale` with the ids of stale trials before Optuna fails them."""

    def before_failing_stale(self, trial_ids: list[int]) -> None:
        """Override: runs while the trials are still RUNNING (they still take user attributes)."""

    def _get_stale_trial_ids(self, study_id: int) -> list[int]:
        stale = super()._get_stale_trial_ids(study_id)
        if stale:
            self.before_failing_stale(stale)
        return stale


class AtomicClaimStorage(RDBStorage):
    """RDBStorage whose WAITING -> RUNNING transition is one compare-and-set UPDATE (safe on SQLite too)."""

    def set_trial_state_values(self, trial_id: int, state: TrialState, values: Sequence[float] | None = None) -> bool:
        if state != TrialState.RUNNING or values is not None:
            return super().set_trial_state_values(trial_id, state, values)
        with _create_scoped_session(self.scoped_session) as session:
            claimed = (session.query(models.TrialModel)
                       .filter(models.TrialModel.trial_id == trial_id, models.TrialModel.state == TrialState.WAITING)
                       .update({models.TrialModel.state: TrialState.RUNNING}, synchronize_session=False))
            if claimed:  # same transaction: the start time is written with the claim
                models.TrialModel.find_or_raise_by_id(trial_id, session).datetime_start = datetime.now()
        if claimed:
            return True
        self.check_trial_is_updatable(trial_id, self.get_trial(trial_id).state)  # raises for a finished trial
        return False


def finished_elsewhere(error: BaseException) -> bool:
    """Whether `error`, or an error it interrupted, is Optuna refusing to tell a trial that is no longer running."""
    seen: BaseException | None = error
    for _ in range(8):  # the refusal is `error` itself or its direct context; a short walk is enough
        if seen is None:
            return False
        if isinstance(seen, ValueError) and str(seen).startswith(_FINISHED_MESSAGE):
            return True
        seen = seen.__context__
    return False
