"""The Optuna study: storage, sampler, pruner, budget, and the glue from trial to trainer.

The budget counts finished (complete or pruned) trials of the *study*, not of this process, so rerunning
the same command resumes it and stops at the budget, and several processes or machines share it
(see `budget.py`; heartbeats and the retry of lost trials are in `storage.py`).
"""

from __future__ import annotations

import dataclasses
import logging
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import optuna
from optuna.trial import TrialState

from autotransfer.artifacts import open_store, upload_checkpoint
from autotransfer.backbones import Backbone
from autotransfer.budget import (
    FINISHED,
    NOT_RUN_REASON,
    TWIN_REASON,
    count,
    earlier_twin,
    has_place,
    not_run,
    wait_for_slot,
)
from autotransfer.checkpoints import (  # noqa: F401 - load_trial_model re-exported
    checkpoint_path,
    load_trial_model,
    save_checkpoint,
)
from autotransfer.defaults import DEFAULT_PATIENCE
from autotransfer.device import pick_device
from autotransfer.errors import ConfigError
from autotransfer.features import ActivationCache
from autotransfer.fidelity import REDUCTION, StepLadder
from autotransfer.metrics import choose_metric
from autotransfer.optuna_compat import finished_elsewhere, trial_by_number
from autotransfer.prior import build_prior
from autotransfer.ranking import ranked, ranks_above
from autotransfer.saturation import saturation_stop
from autotransfer.storage import (
    DEFAULT_HEARTBEAT,
    default_storage,  # noqa: F401 - re-exported: callers import it from here
    fail_lost_trials,
    open_storage,
    requeue,
    unopenable,
)
from autotransfer.strategy import SearchSpace, enqueue_params, suggest_strategy
from autotransfer.trainer import TrainingDiverged, train_trial

logger = logging.getLogger(__name__)
# Errors that fail one trial and let the study go on: out-of-memory, torch runtime errors, and any other
# exception raised inside a trial (its type and message land in `fail_reason` and the leaderboard). A bug
# that fails every trial still shows: the study gives up after `budget` failures and nothing is exported.
_TRIAL_ERRORS = (Exception,)


class _NotRun(Exception):
    """This trial lost the race for the last slot of the budget to another worker."""


@dataclass(frozen=True, kw_only=True)
class StudyConfig:
    study_name: str
    storage: str  # any Optuna storage URL
    out: Path  # output folder: checkpoints, leaderboards, best/
    budget: int = 50  # finished trials in the study
    seed: int = 0
    max_steps: int | None = None  # a fine-tune's optimizer steps; None: derived from the data (fidelity.py)
    timeout: float | None = None  # seconds for this process
    device: str = "cpu"  # "cpu", "cuda" or "auto"
    heartbeat: int = DEFAULT_HEARTBEAT  # seconds between heartbeats; a trial silent for 3 of them is retried
    metric: str | None = None  # the objective (metrics.METRICS); None: the study's, else chosen from the data
    artifacts: str | None = None  # artifact store of the best trials' checkpoints and the export (artifacts.py)
    patience: int = DEFAULT_PATIENCE  # finished trials without a new leader once validation saturated; 0: never stop


def open_study(config: StudyConfig, *, backbone: Backbone | None = None,
               data_fingerprint: str | None = None) -> optuna.Study:
    """Create or load the study; refuse to mix data sets or backbones under one name.

    Its pruner is set by `run_study`, from the step ladder stored with the search space.
    """
    with warnings.catch_warnings():  # multivariate/group/constant_liar are marked experimental
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        sampler = optuna.samplers.TPESampler(seed=config.seed, multivariate=True, group=True, constant_liar=True,
                                             n_startup_trials=max(5, config.budget // 5))
    storage = open_storage(config.storage, heartbeat=config.heartbeat)
    try:
        study = optuna.create_study(study_name=config.study_name, storage=storage, direction="maximize",
                                    sampler=sampler, load_if_exists=True)
    except Exception as e:  # noqa: BLE001 - SQLAlchemy, drivers and Optuna each raise their own types
        raise unopenable(config.storage, e) from None
    if backbone is not None and data_fingerprint is not None:
        identity = {"backbone": backbone.name, "weights": backbone.weights_id, "data": data_fingerprint}
        stored = {k: study.user_attrs.get(k) for k in identity}
        if all(v is None for v in stored.values()):
            for k, v in identity.items():
                study.set_user_attr(k, v)
        elif stored != identity:
            diff = ", ".join(f"{k} {stored[k]!r} (now {identity[k]!r})" for k in identity if stored[k] != identity[k])
            raise ConfigError(f"Study {config.study_name!r} was made with a different {diff}; pass a new "
                              "--study-name, or the same data, backbone and weights to continue it.")
    return study


def finished_trials(study: optuna.Study) -> int:
    return len(study.get_trials(deepcopy=False, states=FINISHED))


def best_trial(study: optuna.Study) -> optuna.trial.FrozenTrial | None:
    """The first complete trial in `ranking.ranked` order: the best score, ties broken by validation margin
    (Optuna's own `best_trial` has no tie-break and leaves the order of ties to the storage backend)."""
    order = ranked(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))
    return order[0] if order else None


def study_metric(study: optuna.Study, config: StudyConfig, cache: ActivationCache) -> tuple[str, str]:
    """(metric, why) of the study, stored in its user attrs on first use so a resumed study keeps it.

    A different `config.metric` for a study that has one is a ConfigError (see `metrics.choose_metric`).
    """
    data = cache.data
    stored = study.user_attrs.get("metric")
    metric, why = choose_metric(config.metric, stored, data.labels[data.split["train"]], len(data.classes),
                                has_trials=any(t.state in FINISHED for t in study.get_trials(deepcopy=False)))
    if stored is None:
        study.set_user_attr("metric", metric)
    if study.metric_names != [f"val_{metric}"]:  # optuna-dashboard and plots name it, not "Objective 0"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study.set_metric_names([f"val_{metric}"])
    return metric, why


def search_space(study: optuna.Study, config: StudyConfig, cache: ActivationCache) -> SearchSpace:
    """The study's search space: measured by the prior on its first run, then read back from the study.

    A new study also gets the prior's strategies enqueued as its first trials.
    """
    stored = study.user_attrs.get("search_space")
    if stored is not None:
        space = SearchSpace(**stored)
        cache.use_space(space)  # a resumed study's cache keeps only the boundaries its trials start from
        return space
    prior = build_prior(cache, max_steps=config.max_steps, seed=config.seed)
    if not study.trials:
        for s in prior.first_strategies[:config.budget]:  # no waiting trials left over past the budget
            study.enqueue_trial(enqueue_params(s, prior.space), user_attrs={"enqueued": "prior"}, skip_if_exists=True)
    study.set_user_attr("search_space", dataclasses.asdict(prior.space))
    study.set_user_attr("prior", {"quadrant": prior.quadrant, "reason": prior.reason,
                                  "recommended": prior.recommended.to_dict()})
    return prior.space


class _Objective:
    """One process's objective on a study: guards the shared budget, trains, keeps the best weights.

    It also counts this process's real failures (`failures`) and the trials Ctrl-C interrupted (`interrupted`),
    which `run_study` reads to stop and to requeue.
    """

    def __init__(self, study: optuna.Study, config: StudyConfig, space: SearchSpace, backbone: Backbone,
                 cache: ActivationCache) -> None:
        self.study, self.config, self.space, self.backbone, self.cache = study, config, space, backbone, cache
        self.metric = study_metric(study, config, cache)[0]
        self.ladder = StepLadder(space.max_steps)
        self.device = pick_device(config.device)
        self.store = open_store(config.artifacts)
        self.failures = 0
        self.interrupted: list[int] = []

    def __call__(self, trial: optuna.Trial) -> float:
        if not has_place(self.study, trial, self.config.budget):
            trial.set_user_attr("fail_reason", NOT_RUN_REASON)
            self.study.stop()
            raise _NotRun(NOT_RUN_REASON)
        twin = earlier_twin(self.study, trial)
        if twin is not None:
            trial.set_user_attr("fail_reason", TWIN_REASON.format(twin))
            raise _NotRun(TWIN_REASON.format(twin))
        started = time.perf_counter()
        try:
            return self._train(trial)
        except (_NotRun, optuna.TrialPruned):
            raise
        except _TRIAL_ERRORS as e:  # fails this trial alone (see `catch`)
            trial.set_user_attr("fail_reason", f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}")
            raise
        except KeyboardInterrupt:
            self.interrupted.append(trial.number)
            trial.set_user_attr("fail_reason", "interrupted")
            raise
        finally:
            trial.set_user_attr("seconds", round(time.perf_counter() - started, 3))

    def _train(self, trial: optuna.Trial) -> float:
        strategy = suggest_strategy(trial, self.space)
        trial.set_user_attr("strategy", strategy.to_dict())

        def report(step: int, value: float) -> None:  # Optuna's step: optimizer steps of the fine-tune
            trial.set_user_attr("steps_run", step)
            trial.report(value, step)
            if step < strategy.steps and trial.should_prune():  # the last step's result is complete: keep it
                raise optuna.TrialPruned(f"val {self.metric} {value:.4f} after {step} steps")

        try:
            result = train_trial(strategy, self.backbone, self.cache, report=report, report_at=self.ladder.rungs,
                                 device=self.device, metric=self.metric,
                                 description=f"trial {trial.number} fine-tune")
        except TrainingDiverged as e:
            trial.set_user_attr("fail_reason", str(e))
            raise optuna.TrialPruned(str(e)) from None
        trial.set_user_attr("steps_run", result.steps_run)
        trial.set_user_attr("train_accuracy", result.train_accuracy)
        trial.set_user_attr("val_accuracy", result.val_accuracy)
        scores = {"val_margin": result.val_margin.mean, "val_margin_se": result.val_margin.se}
        if result.reverse is not None:  # the objective averages it with the validation score, the margins too
            scores |= {"val_score": result.val_score, "reverse_accuracy": result.reverse.accuracy,
                       "reverse_margin": result.reverse.margin.mean, "reverse_margin_se": result.reverse.margin.se}
        for key, value in scores.items():
            trial.set_user_attr(key, value)
        # other workers' trials count too: keep only the study's best weights
        if ranks_above(trial.number, result.objective, {**scores, "strategy": strategy.to_dict()},
                       best_trial(self.study)):
            running = self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
            save_checkpoint(self.config.out, trial.number, result, strategy, keep=[t.number for t in running])
            if self.store is not None:  # other machines and later commands load it instead of training again
                upload_checkpoint(self.store, trial, checkpoint_path(self.config.out, trial.number))
        return result.objective


def run_study(config: StudyConfig, backbone: Backbone, cache: ActivationCache, *, study: optuna.Study | None = None,
              on_trial: Callable[[optuna.Study, optuna.trial.FrozenTrial], None] | None = None) -> optuna.Study:
    """Run trials until the study has `budget` finished trials (or `timeout` passes, or its validation score
    saturated: `saturation.py`).

    `study` is the already opened study of `config` (see `open_study`); `on_trial` runs after every trial.
    Other processes may work on the same study: the budget is shared, and this call returns when the study
    has its `budget` finished trials, waiting for theirs (and retrying trials whose process died).
    On Ctrl-C the running trial is marked failed ("interrupted") and queued to run first next time.
    """
    if study is None:
        study = open_study(config, backbone=backbone, data_fingerprint=cache.data.fingerprint)
    objective = _Objective(study, config, search_space(study, config, cache), backbone, cache)
    # Successive halving on the step ladder of fine-tuning (see `fidelity.py`): at each rung only the best third
    # of the trials that reached it go on. Head-only trials (an L-BFGS fit, about a second) report nothing.
    study.pruner = optuna.pruners.SuccessiveHalvingPruner(min_resource=objective.ladder.min_steps,
                                                          reduction_factor=REDUCTION)

    def after_trial(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        if trial.state == TrialState.FAIL and not not_run(trial):
            objective.failures += 1
        if on_trial is not None:
            on_trial(study, trial)
        fail_lost_trials(study)
        if (not count(study).slot_free(config.budget) or objective.failures >= config.budget
                or saturation_stop(study, config.patience)):
            study.stop()

    deadline = None if config.timeout is None else time.monotonic() + config.timeout
    try:
        while (objective.failures < config.budget and not saturation_stop(study, config.patience)
               and wait_for_slot(study, config.budget, deadline=deadline)):
            timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                study.optimize(objective, n_trials=None, timeout=timeout, callbacks=[after_trial],
                               catch=_TRIAL_ERRORS, gc_after_trial=False)
            except (ValueError, AssertionError) as e:  # another worker failed our trial as lost: it was retried
                if not finished_elsewhere(e):
                    raise
                logger.warning("A trial of this worker was taken over after a late heartbeat (%s); going on.", e)
            if deadline is not None and time.monotonic() >= deadline:
                break
    except KeyboardInterrupt:
        for number in objective.interrupted:
            requeue(study, trial_by_number(study, number))
        raise
    return study
