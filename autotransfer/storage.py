"""Study storage with heartbeats, so a trial whose process died is failed and run again.

A running trial writes a heartbeat every `heartbeat` seconds. When it has been silent for three
intervals, the next process that looks at the study (any worker, or the same command run again) marks it
failed with the reason in its user attributes and queues a copy with the same parameters, which Optuna's
`RetryHeartbeatStaleTrialCallback` does. Heartbeats need an SQL storage (SQLite, PostgreSQL, MySQL).

Also what every command says about storage URLs: `default_storage(out)` (search's SQLite file in its output
folder) and `unopenable(url, error)`, the one error message for a URL that cannot be opened.
"""

from __future__ import annotations

import copy
import time
import warnings
from pathlib import Path

import optuna
import sqlalchemy.engine
import sqlalchemy.exc
from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.trial import FrozenTrial

from autotransfer.errors import ConfigError
from autotransfer.optuna_compat import AtomicClaimStorage, StaleTrialHook

DEFAULT_HEARTBEAT = 10  # seconds between heartbeats of a running trial
GRACE_INTERVALS = 3  # a trial silent for this many heartbeat intervals is considered lost
SQLITE_TIMEOUT = 120  # seconds a worker waits for SQLite's write lock before giving up
SCHEMA_RACE_RETRIES = 5  # attempts after losing the race to create a fresh database's tables
LOST_REASON = "lost: its process stopped sending heartbeats (killed or crashed); retried as a new trial"
STUDY_FILE = "study.db"  # search's SQLite database, in its output folder
EXAMPLE_URLS = "sqlite:///study.db or postgresql://user:pass@host/db"
# Written by one attempt; a retried copy starts without them.
_ATTEMPT_ATTRS = ("fail_reason", "seconds", "steps_run", "train_accuracy")


class _RetryLostTrial(RetryHeartbeatStaleTrialCallback):
    """Queue a lost trial again with its parameters, without the failed attempt's reason and timings."""

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        fresh = copy.copy(trial)
        fresh.user_attrs = {k: v for k, v in trial.user_attrs.items() if k not in _ATTEMPT_ATTRS}
        super().__call__(study, fresh)


class _HeartbeatStorage(StaleTrialHook, AtomicClaimStorage):
    """RDBStorage that writes why a lost trial failed before Optuna marks it (a failed trial takes no attributes)."""

    def before_failing_stale(self, trial_ids: list[int]) -> None:
        for trial_id in trial_ids:
            try:
                self.set_trial_user_attr(trial_id, "fail_reason", LOST_REASON)
            except optuna.exceptions.UpdateFinishedTrialError:
                pass  # another process marked it first


def default_storage(out: Path) -> str:
    """The storage URL search uses without --storage: SQLite in `out/study.db`, as an absolute path."""
    return f"sqlite:///{(Path(out) / STUDY_FILE).resolve()}"


def sqlite_path(url: str) -> Path | None:
    """The database file of a SQLite URL (any driver, query ignored, as SQLAlchemy parses it); None for an
    in-memory database and for other URLs."""
    try:
        parsed = sqlalchemy.engine.make_url(url)
    except sqlalchemy.exc.ArgumentError:
        return None
    if parsed.get_backend_name() != "sqlite" or parsed.database in (None, "", ":memory:"):
        return None
    return Path(parsed.database)


def _driver_hint(url: str) -> str:
    if url.startswith(("postgresql", "postgres")):
        return " (install the driver: pip install 'autotransfer[postgres]')"
    if url.startswith("mysql"):
        return " (install a driver, e.g. pip install pymysql, and use mysql+pymysql://)"
    return ""


def unopenable(url: str, error: BaseException) -> ConfigError:
    """The error for a storage URL that cannot be opened: the URL, the cause's type and first line, a driver
    hint when the cause is a missing driver, and example URLs. Raise it `from None`."""
    detail = str(error).strip().splitlines()[0][:120] if str(error).strip() else ""
    hint = _driver_hint(url) if isinstance(error, ImportError) else ""
    return ConfigError(f"Storage URL {url!r} cannot be opened ({type(error).__name__}: {detail}){hint}; "
                       f"pass an Optuna storage URL such as {EXAMPLE_URLS}.")


def _sqlalchemy_url(url: str) -> str:
    """postgresql:// and postgres:// mean the psycopg 3 driver (the `postgres` extra), whatever SQLAlchemy's default."""
    for scheme in ("postgresql://", "postgres://"):
        if url.startswith(scheme):
            return "postgresql+psycopg://" + url[len(scheme):]
    return url


def open_storage(url: str, *, heartbeat: int = DEFAULT_HEARTBEAT) -> optuna.storages.BaseStorage:
    """An RDB storage with heartbeats and retry of lost trials for any SQLAlchemy URL; others as Optuna opens them.

    Raises ConfigError with the fix when the URL cannot be opened.
    """
    if heartbeat < 1:
        raise ConfigError(f"--heartbeat must be at least 1 second, got {heartbeat}.")
    if "://" not in url:
        raise ConfigError(f"Storage URL {url!r} has no scheme; pass an Optuna storage URL such as {EXAMPLE_URLS}.")
    try:
        return _open_rdb(url, heartbeat)
    except Exception as e:  # noqa: BLE001 - SQLAlchemy, drivers and Optuna each raise their own types
        raise unopenable(url, e) from None


def _open_rdb(url: str, heartbeat: int) -> RDBStorage:
    """Open the storage; when several machines create the schema of a fresh database at the same moment, the
    losers see "already exists" or a duplicate key, so they wait a moment and open the now complete schema."""
    engine_kwargs = {"connect_args": {"timeout": SQLITE_TIMEOUT}} if url.startswith("sqlite") else {}
    for attempt in range(SCHEMA_RACE_RETRIES + 1):
        try:
            with warnings.catch_warnings():  # heartbeats are marked experimental in Optuna
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                return _HeartbeatStorage(_sqlalchemy_url(url), engine_kwargs=engine_kwargs,
                                         heartbeat_interval=heartbeat, grace_period=GRACE_INTERVALS * heartbeat,
                                         heartbeat_stale_trial_callback=_RetryLostTrial())
        except (sqlalchemy.exc.ProgrammingError, sqlalchemy.exc.IntegrityError) as e:
            message = str(e).lower()
            racing = "already exists" in message or "duplicate" in message or "unique" in message
            if not racing or attempt == SCHEMA_RACE_RETRIES:
                raise
            time.sleep(0.2 * (attempt + 1))
    raise AssertionError("unreachable")


def fail_lost_trials(study: optuna.Study) -> None:
    """Mark running trials without a recent heartbeat as failed and queue their retry (Optuna does this too,
    before every trial; this call lets a waiting worker notice a lost trial without starting one)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)


def requeue(study: optuna.Study, trial: FrozenTrial) -> None:
    """Queue a copy of `trial` (same parameters) to run next, e.g. after Ctrl-C stopped it."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        _RetryLostTrial()(study, trial)
