"""Storage URLs: search's default, where the commands look for it, and the one message for a URL that fails."""

import multiprocessing

import optuna
import pytest

import autotransfer.study
from autotransfer.errors import ConfigError
from autotransfer.storage import STUDY_FILE, default_storage, open_storage, sqlite_path, unopenable
from autotransfer.studies import list_studies, locate, study_names


def test_default_storage_is_an_absolute_sqlite_file_in_the_output_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    url = default_storage("run")
    assert url == f"sqlite:///{tmp_path / 'run' / STUDY_FILE}"
    assert autotransfer.study.default_storage(tmp_path / "run") == url, "search and the other commands agree"


def test_report_export_and_studies_look_where_search_writes(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    url = default_storage(tmp_path / "studies" / "pets")
    (tmp_path / "studies" / "pets").mkdir(parents=True)
    optuna.create_study(study_name="pets", storage=url)
    assert locate("pets") == ("pets", url, tmp_path.joinpath("studies", "pets").relative_to(tmp_path))
    assert list(list_studies().storage) == [url]
    with pytest.raises(ConfigError, match="No study database at 'run/study.db'"):
        study_names("sqlite+pysqlite:///run/study.db?timeout=5")
    assert not (tmp_path / "run").exists(), "looking must not create a database"


@pytest.mark.parametrize("url, path", [
    ("sqlite:///study.db", "study.db"), ("sqlite:////abs/study.db", "/abs/study.db"),
    ("sqlite+pysqlite:///run/study.db", "run/study.db"), ("sqlite:///run/study.db?timeout=5", "run/study.db"),
    ("sqlite:///:memory:", None), ("sqlite://", None), ("postgresql://u:p@host/db", None),
])
def test_sqlite_path_reads_the_database_file_of_any_sqlite_url(url, path):
    assert (None if sqlite_path(url) is None else str(sqlite_path(url))) == path


def test_unopenable_names_the_url_the_cause_and_the_fix():
    message = str(unopenable("notadb://x", RuntimeError("no such dialect\nsecond line")))
    assert message.startswith("Storage URL 'notadb://x' cannot be opened (RuntimeError: no such dialect); pass ")
    assert "second line" not in message and "sqlite:///study.db" in message
    assert "autotransfer[postgres]" in str(unopenable("postgresql://h/db", ImportError("no module psycopg")))
    assert "(KeyError: )" in str(unopenable("sqlite:///x.db", KeyError())), "a cause without a message"


def test_every_place_that_opens_a_url_says_the_same(tmp_path, monkeypatch):
    with pytest.raises(ConfigError) as opened:
        open_storage("notadb://x")
    with pytest.raises(ConfigError) as listed:
        study_names("notadb://x")
    assert str(opened.value) == str(listed.value)
    assert str(opened.value).startswith("Storage URL 'notadb://x' cannot be opened (")

    def fail(**kwargs):
        raise RuntimeError()

    optuna.create_study(storage=default_storage(tmp_path))
    monkeypatch.setattr(optuna.study, "get_all_study_names", fail)
    with pytest.raises(ConfigError, match=r"cannot be opened \(RuntimeError: \)"):
        study_names(default_storage(tmp_path))


def _claim_all(url: str, found) -> None:
    """Start queued trials until none is left, as a worker's `study.optimize` does; report their ids."""
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    study = optuna.load_study(study_name="race", storage=open_storage(url))
    claimed = []
    while (trial := study.ask()).number < QUEUED:
        claimed.append(trial.number)
    found.put(claimed)


QUEUED = 150


def test_processes_racing_for_the_queue_never_start_the_same_trial_twice(tmp_path):
    """Optuna reads WAITING, then writes RUNNING; on SQLite two processes both did it (the race lost to CI)."""
    url = default_storage(tmp_path)
    study = optuna.create_study(study_name="race", storage=open_storage(url))
    for i in range(QUEUED):
        study.enqueue_trial({"x": i}, skip_if_exists=False)
    found = multiprocessing.get_context("spawn").Queue()
    workers = [multiprocessing.get_context("spawn").Process(target=_claim_all, args=(url, found)) for _ in range(4)]
    for w in workers:
        w.start()
    claimed = [found.get(timeout=120) for _ in workers]
    for w in workers:
        w.join(30)
    numbers = sorted(sum(claimed, []))
    assert numbers == list(range(QUEUED)), "every queued trial started exactly once"
    assert sum(bool(c) for c in claimed) >= 2, "the processes really raced"
    assert all(t.datetime_start is not None for t in optuna.load_study(study_name="race", storage=url).trials)
