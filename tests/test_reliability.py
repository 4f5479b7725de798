"""Crash safety, parallel workers, several processes on PostgreSQL, and broken trials, tested for real.

The subprocess tests run the real CLI (`python -m tests.tiny_cli`, the tiny test backbone registered) and
read the study from its storage. AUTOTRANSFER_TEST_TRIAL_SECONDS makes each trial sleep first, so a signal
lands in the middle of a trial; OMP_NUM_THREADS=1 keeps several processes from fighting over 2 cores.
"""

import dataclasses
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import optuna
import pandas as pd
import pytest
import torch
from optuna.storages import RetryHeartbeatStaleTrialCallback
from optuna.trial import TrialState

import autotransfer.probe as probe_module
import autotransfer.study as study_module
import autotransfer.trainer as trainer_module
from autotransfer.budget import TWIN_REASON, count, earlier_twin, has_place, not_run
from autotransfer.report import leaderboard
from autotransfer.storage import LOST_REASON, open_storage
from autotransfer.study import StudyConfig, default_storage, finished_trials, run_study
from tests import postgres
from tests.conftest import TINY

ROOT = Path(__file__).resolve().parents[1]
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)


def _search(out: Path, budget: int, *extra: str) -> list[str]:
    return [sys.executable, "-m", "tests.tiny_cli", "search", "digits", "--backbone", TINY, "--image-size", "16",
            "--budget", str(budget), "--max-steps", "20", "--out", str(out), "--heartbeat", "1", *extra]


def _env(trial_seconds: float = 0.0) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1",
            "AUTOTRANSFER_TEST_TRIAL_SECONDS": str(trial_seconds)}


def _default_sigint() -> None:
    """A test run started in the background (`pytest &`) inherits an ignored SIGINT; the search must get Ctrl-C."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _start(cmd: list[str], trial_seconds: float = 0.0) -> subprocess.Popen:
    return subprocess.Popen(cmd, cwd=ROOT, env=_env(trial_seconds), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, preexec_fn=_default_sigint)


def _run(cmd: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=240)


def _load(url: str, name: str = "digits") -> optuna.Study:
    return optuna.load_study(study_name=name, storage=url)


def _wait_mid_trial(proc: subprocess.Popen, url: str, finished: int, timeout: float = 120) -> optuna.trial.FrozenTrial:
    """Poll the study until `finished` trials are done and another one is running with its strategy drawn."""
    for line in proc.stdout:  # the study exists once the search names it (no racing its table creation)
        if line.startswith("study "):
            break
    storage = optuna.storages.RDBStorage(url)
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        assert proc.poll() is None, f"search ended early: {proc.communicate()}"
        trials = optuna.load_study(study_name="digits", storage=storage).get_trials(deepcopy=False)
        running = [t for t in trials if t.state == TrialState.RUNNING and "strategy" in t.user_attrs]
        if sum(t.state in FINISHED for t in trials) >= finished and running:
            return running[0]
        time.sleep(0.1)
    proc.kill()
    pytest.fail(f"no trial was running after {finished} finished trials: {proc.communicate()}")


def _retry_of(trial: optuna.trial.FrozenTrial) -> int | None:
    """The number of the failed trial that `trial` retries (Optuna's public, experimental accessor)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return RetryHeartbeatStaleTrialCallback.retried_trial_number(trial)


def _assert_clean_exit(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr


def test_kill_9_mid_trial_then_the_same_command_retries_it_and_ends_at_the_budget(tmp_path):
    out = tmp_path / "run"
    url = default_storage(out)
    proc = _start(_search(out, 4), trial_seconds=2.0)
    victim = _wait_mid_trial(proc, url, finished=2)
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    zombie = _load(url).trials[victim.number]
    assert zombie.state == TrialState.RUNNING, "a killed process leaves its trial running"

    _assert_clean_exit(_run(_search(out, 4)))
    study = _load(url)
    states = [t.state for t in study.trials]
    assert sum(s in FINISHED for s in states) == 4, "exactly the budget finishes"
    assert TrialState.RUNNING not in states and TrialState.WAITING not in states
    lost = study.trials[victim.number]
    assert lost.state == TrialState.FAIL and lost.user_attrs["fail_reason"] == LOST_REASON
    retries = [t for t in study.trials if _retry_of(t) == victim.number]
    assert len(retries) == 1 and retries[0].state in FINISHED
    # Compared with the trial as stored after the kill: a read taken mid-trial may miss its last parameter.
    assert retries[0].params == lost.params and lost.params, "the retry runs the same strategy"
    assert "fail_reason" not in retries[0].user_attrs
    board = pd.read_csv(out / "leaderboard.csv")
    assert sorted(board.trial) == list(range(len(study.trials))), "each trial once on the leaderboard"
    row = board[board.trial == victim.number].iloc[0]
    assert row.state == "fail" and row.note.startswith("lost:")
    assert (out / "best" / "model.onnx").is_file()


def test_ctrl_c_marks_the_running_trial_writes_the_leaderboard_and_the_rerun_resumes(tmp_path):
    out = tmp_path / "run"
    url = default_storage(out)
    proc = _start(_search(out, 3), trial_seconds=3.0)
    victim = _wait_mid_trial(proc, url, finished=1)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr
    assert "Interrupted" in stderr and "run the same command again to continue" in stderr
    study = _load(url)
    stopped = study.trials[victim.number]
    assert stopped.state == TrialState.FAIL and stopped.user_attrs["fail_reason"] == "interrupted"
    queued = [t for t in study.trials if _retry_of(t) == victim.number]
    assert len(queued) == 1 and queued[0].state == TrialState.WAITING and queued[0].params == stopped.params
    assert TrialState.RUNNING not in [t.state for t in study.trials]
    board = pd.read_csv(out / "leaderboard.csv")
    assert board.set_index("trial").loc[victim.number, "note"] == "interrupted"
    assert not (out / "best").exists()

    _assert_clean_exit(_run(_search(out, 3)))
    study = _load(url)
    assert finished_trials(study) == 3
    assert study.trials[queued[0].number].state in FINISHED, "the interrupted strategy runs first on resume"


def test_workers_share_one_study_and_finish_exactly_the_budget(tmp_path):
    out = tmp_path / "run"
    proc = _start(_search(out, 6, "--workers", "3", "--heartbeat", "5"), trial_seconds=0.5)
    stdout, stderr = proc.communicate(timeout=240)
    assert proc.returncode == 0, stderr[-3000:]
    assert f"3 worker processes, {max(1, len(os.sched_getaffinity(0)) // 3)} CPU thread(s) each" in stdout
    study = _load(default_storage(out))
    assert finished_trials(study) == 6
    assert all(t.state in FINISHED or not_run(t) for t in study.trials)
    lines = [line for line in stdout.splitlines() if line.startswith("[worker ")]
    numbers = [int(line.split("trial")[1].split()[0]) for line in lines]
    assert len(numbers) == len(set(numbers)) == len(study.trials), "every trial ran once, in one worker"
    assert len({line.split("]")[0] for line in lines}) >= 2, "the trials were shared between workers"
    assert (out / "best" / "model.onnx").is_file()


@pytest.fixture(scope="session")
def postgres_url():
    bindir = postgres.find_bin()
    if bindir is None:
        if os.environ.get("AUTOTRANSFER_REQUIRE_POSTGRES"):
            pytest.fail("PostgreSQL is required here but initdb was not found (apt-get install postgresql)")
        pytest.skip("PostgreSQL is not installed (apt-get install postgresql)")
    with postgres.server(bindir) as url:
        yield url


@pytest.mark.postgres
def test_three_processes_on_postgresql_share_one_budget(tmp_path, postgres_url):
    cmds = [_search(tmp_path / f"machine{i}", 6, "--storage", postgres_url, "--study-name", "shared",
                    "--heartbeat", "5") for i in range(3)]
    procs = [_start(cmd, trial_seconds=0.5) for cmd in cmds]
    outputs = [p.communicate(timeout=300) for p in procs]
    for p, (_, stderr) in zip(procs, outputs, strict=True):
        assert p.returncode == 0, stderr[-3000:]
    study = _load(postgres_url, "shared")
    assert finished_trials(study) == 6, "the budget counts the study's trials, not each process's"
    assert TrialState.RUNNING not in [t.state for t in study.trials]
    ran = [int(line.split()[1]) for stdout, _ in outputs for line in stdout.splitlines()
           if line.startswith("trial ") and line.split()[2] in ("complete", "pruned")]
    finished = [t.number for t in study.trials if t.state in FINISHED]
    assert sorted(ran) == sorted(set(ran)) == finished, "every finished trial ran once, and no trial ran twice"
    others = [t for t in study.trials if t.state not in FINISHED]
    assert all(not_run(t) or t.state == TrialState.WAITING for t in others), \
        "the only extra trials lost the race for a slot, or are copies of the prior's strategies never needed"
    prior_params = [t.params for t in study.trials if t.state in FINISHED and t.user_attrs.get("enqueued") == "prior"]
    assert len(prior_params) == len({tuple(sorted(p.items())) for p in prior_params}), "no prior strategy ran twice"
    assert sum(any(line.startswith("trial ") for line in o.splitlines()) for o, _ in outputs) >= 2
    for i in range(3):
        assert (tmp_path / f"machine{i}" / "best" / "model.onnx").is_file()


@pytest.mark.postgres
def test_machines_racing_to_create_a_fresh_database_schema_all_open_it(postgres_url):
    """Several machines pointed at an empty database at once: the ones that lose the table-creation race
    must open the schema the winner made, not fail with "relation already exists"."""
    import threading

    import sqlalchemy

    admin = sqlalchemy.create_engine(postgres_url.replace("postgresql://", "postgresql+psycopg://"),
                                     isolation_level="AUTOCOMMIT")
    for round_ in range(3):
        name = f"race{round_}"
        with admin.connect() as conn:
            conn.execute(sqlalchemy.text(f"CREATE DATABASE {name}"))
        url = postgres_url.rsplit("/", 1)[0] + "/" + name
        start, errors = threading.Barrier(6), []

        def open_it(url=url, start=start, errors=errors):
            start.wait()
            try:
                open_storage(url).get_all_studies()
            except Exception as e:  # noqa: BLE001 - collected and reported below
                errors.append(e)

        threads = [threading.Thread(target=open_it) for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert errors == [], errors[0]
    admin.dispose()


def test_a_broken_trial_stays_alone(tmp_path, tiny, tiny_cache, monkeypatch):
    real_train, real_loss = study_module.train_trial, trainer_module.head_loss

    def scaled_loss(factor: float):
        def head_loss(head, **kwargs):
            loss = real_loss(head, **kwargs)
            return lambda logits, y: loss(logits, y) * factor
        return head_loss

    def nan_loss(strategy, *args, **kwargs):
        with monkeypatch.context() as m:
            for module in (trainer_module, probe_module):  # fine-tunes and L-BFGS head fits
                m.setattr(module, "head_loss", scaled_loss(float("nan")))
            return real_train(strategy, *args, **kwargs)

    def inf_loss(strategy, *args, **kwargs):
        with monkeypatch.context() as m:
            for module in (trainer_module, probe_module):  # fine-tunes and L-BFGS head fits
                m.setattr(module, "head_loss", scaled_loss(float("inf")))
            return real_train(strategy, *args, **kwargs)

    def diverges(strategy, *args, **kwargs):
        return real_train(dataclasses.replace(strategy, lr=1e12), *args, **kwargs)

    def raises(error: BaseException):
        def train(*args, **kwargs):
            raise error
        return train

    injected = [nan_loss, inf_loss, diverges,
                raises(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected)")),
                raises(MemoryError("cannot allocate 8 GiB (injected)")),
                raises(KeyError("head_weights"))]
    calls = []

    def train_trial(*args, **kwargs):
        calls.append(1)
        return (injected[len(calls) - 1] if len(calls) <= len(injected) else real_train)(*args, **kwargs)

    monkeypatch.setattr(study_module, "train_trial", train_trial)
    config = StudyConfig(study_name="t", storage=default_storage(tmp_path), out=tmp_path, budget=5, max_steps=20)
    study = run_study(config, tiny, tiny_cache)
    trials = study.trials
    assert [t.state for t in trials] == [TrialState.PRUNED] * 3 + [TrialState.FAIL] * 3 + [TrialState.COMPLETE] * 2
    reasons = [t.user_attrs["fail_reason"] for t in trials[:6]]
    assert reasons[0].startswith("loss became nan") and reasons[1].startswith("loss became inf")
    assert reasons[2].startswith("loss became")
    assert reasons[3].startswith("OutOfMemoryError: CUDA out of memory")
    assert reasons[4] == "MemoryError: cannot allocate 8 GiB (injected)"
    assert reasons[5] == "KeyError: 'head_weights'"
    assert finished_trials(study) == 5
    notes = leaderboard(study).set_index("trial")["note"]
    assert [notes[i] for i in range(6)] == [r[:120] for r in reasons]


@pytest.mark.filterwarnings("ignore:Heartbeat of storage is supposed to be used with Study.optimize")
def test_a_trial_past_the_shared_budget_is_not_run(tmp_path):
    """The race two workers can have for the last slot: the later-numbered trial gives way."""
    study = optuna.create_study(storage=open_storage(default_storage(tmp_path)), study_name="race")
    study.add_trial(optuna.create_trial(value=0.5))
    first, second = study.ask(), study.ask()
    assert has_place(study, first, budget=2) and not has_place(study, second, budget=2)
    study.tell(first, state=TrialState.FAIL)
    assert has_place(study, second, budget=2), "a failed trial frees its slot"
    study.enqueue_trial({})
    assert not has_place(study, study.ask(), budget=2), "trials 0 and 2 hold the budget"


def test_a_prior_strategy_queued_twice_runs_once_and_is_not_counted_as_a_failure(tmp_path):
    """Processes opening a new study together can each queue the prior's strategies; the later copy gives way."""
    study = optuna.create_study(storage=open_storage(default_storage(tmp_path)), study_name="twins")
    for _ in range(2):
        study.enqueue_trial({"x": 1.0}, user_attrs={"enqueued": "prior"})
    study.enqueue_trial({"x": 2.0}, user_attrs={"enqueued": "prior"})
    first, second, third = study.ask(), study.ask(), study.ask()
    # The objective checks before it suggests anything, while the twin may not have suggested either.
    assert earlier_twin(study, first) is None and earlier_twin(study, third) is None
    assert earlier_twin(study, second) == first.number
    for trial in (first, second, third):
        trial.suggest_float("x", 0, 3)
    assert earlier_twin(study, third) is None and earlier_twin(study, second) == first.number
    second.set_user_attr("fail_reason", TWIN_REASON.format(first.number))
    study.tell(second, state=TrialState.FAIL)
    study.tell(third, state=TrialState.FAIL)
    assert count(study).failed == 1, "the twin that gave way is not a failure; trial 2 is"
    assert not_run(study.trials[1]) and not not_run(study.trials[2])
    study.enqueue_trial({"x": 2.0}, user_attrs={"enqueued": "prior"})  # e.g. the retry of a lost trial
    retry = study.ask()
    assert earlier_twin(study, retry) is None, "a failed earlier copy does not run the strategy: the retry must"
