"""One budget shared by every process that works on a study: exactly `budget` trials finish.

Before asking for a trial, a worker checks that finished + running trials leave a slot. Two workers can
still see the same last slot at once, so each new trial also checks its place after Optuna has numbered it
(trial creation is serialised by the storage): it may run only if fewer than `budget` trials with lower
numbers are finished, running or queued. The loser of such a race is marked failed as "not run" and its
worker goes back to waiting, so the count of finished trials stays exact, also when trials fail or their
process dies.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import optuna
from optuna.trial import FrozenTrial, TrialState

from autotransfer.optuna_compat import queued_params, stored_trial
from autotransfer.storage import fail_lost_trials

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
NOT_RUN_REASON = "not run: other workers had already taken the whole budget"
TWIN_REASON = "not run: the prior's strategy was queued twice; trial {} runs it"


@dataclass(frozen=True)
class Counts:
    finished: int
    running: int
    waiting: int
    failed: int

    def slot_free(self, budget: int) -> bool:
        """Whether this worker may ask for another trial."""
        return self.finished + self.running < budget


def not_run(trial: FrozenTrial) -> bool:
    """A trial failed on purpose before it trained (lost the race for a slot, or a duplicate): not a failure."""
    return trial.state == TrialState.FAIL and str(trial.user_attrs.get("fail_reason", "")).startswith("not run")


def count(study: optuna.Study) -> Counts:
    trials = study.get_trials(deepcopy=False)
    by_state = [t.state for t in trials]
    return Counts(finished=sum(s in FINISHED for s in by_state), running=by_state.count(TrialState.RUNNING),
                  waiting=by_state.count(TrialState.WAITING),
                  failed=sum(t.state == TrialState.FAIL and not not_run(t) for t in trials))


def earlier_twin(study: optuna.Study, trial: optuna.Trial) -> int | None:
    """The number of a lower-numbered queued trial with the same parameters, when `trial` was queued by the prior.

    Processes that open a new study at the same moment each queue the prior's strategies (the check that the
    study is empty races), so a strategy can be queued twice; the copy with the higher number does not run.
    """
    mine = stored_trial(study, trial)
    if mine.user_attrs.get("enqueued") != "prior":
        return None
    # The queued parameters, not `params`: a trial has no `params` until it suggests them, and this check
    # runs before that, in this trial and possibly in its twin.
    queued = queued_params(mine)
    for other in study.get_trials(deepcopy=False):
        # A failed earlier copy (lost, interrupted) does not count: this copy is its retry.
        if (other.number < trial.number and other.user_attrs.get("enqueued") == "prior"
                and other.state != TrialState.FAIL and queued_params(other) == queued):
            return other.number
    return None


def has_place(study: optuna.Study, trial: optuna.Trial, budget: int) -> bool:
    """True when `trial` is within the budget: fewer than `budget` lower-numbered trials that are not failed."""
    ahead = sum(t.state != TrialState.FAIL and t.number < trial.number for t in study.get_trials(deepcopy=False))
    return ahead < budget


def wait_for_slot(study: optuna.Study, budget: int, *, deadline: float | None, poll: float = 1.0) -> bool:
    """Wait while other trials run and hold the rest of the budget; True when this worker should run a trial.

    Running trials of live workers finish (or fail, and their worker takes the slot again); a trial whose
    process died loses its heartbeat, is failed and queued again, and then this worker runs it. Returns False
    when the budget is complete, when trials keep failing (as many failures as the budget), or at `deadline`.
    """
    while True:
        fail_lost_trials(study)
        c = count(study)
        if c.finished >= budget or c.failed >= budget:
            return False
        if c.slot_free(budget):
            return True
        if deadline is not None and time.monotonic() >= deadline:
            return False
        time.sleep(poll)
