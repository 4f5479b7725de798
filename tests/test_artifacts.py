"""Models stored in the study (artifacts.py): search uploads the best trials' checkpoints and its export, and
`export` / `report` use them instead of training, also on a machine that did not run the trial.

The CLI runs for real in subprocesses (`python -m tests.tiny_cli`, the tiny test backbone registered).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import optuna
import pytest
import torch
from optuna.artifacts import get_all_artifact_meta

from autotransfer.artifacts import CHECKPOINT_ATTR, LOCATION_ATTR, check_location, export_key
from autotransfer.errors import ConfigError
from autotransfer.model import build_model
from autotransfer.storage import default_storage
from autotransfer.strategy import Strategy
from autotransfer.study import best_trial
from tests.conftest import TINY, tiny_backbone
from tests.test_reliability import postgres_url  # noqa: F401 - the throwaway PostgreSQL server fixture

ROOT = Path(__file__).resolve().parents[1]
# What a command prints when it trains (progress lines are on in these subprocesses).
TRAINING = ("training its strategy", "retraining it", "training the best strategy", "refit member", "head fit")


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "AUTOTRANSFER_PROGRESS": "1"}
    done = subprocess.run([sys.executable, "-m", "tests.tiny_cli", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def _search(out: Path, *extra: str) -> subprocess.CompletedProcess:
    return _cli("search", "digits", "--backbone", TINY, "--image-size", "16", "--budget", "3", "--max-steps", "20",
                "--out", str(out), *extra)


_X = np.random.default_rng(0).standard_normal((8, 3, 16, 16)).astype(np.float32)


def _onnx_logits(model: Path) -> np.ndarray:
    return ort.InferenceSession(str(model), providers=["CPUExecutionProvider"]).run(None, {"input": _X})[0]


def _checkpoint_logits(path: Path) -> np.ndarray:
    saved = torch.load(path, map_location="cpu", weights_only=True)
    model = build_model(Strategy.from_dict(saved["strategy"]), tiny_backbone(), 10)
    model.load_state_dict(saved["state_dict"])
    with torch.no_grad():
        return model.eval()(torch.from_numpy(_X)).numpy()


def test_check_location_takes_folders_and_bare_s3_buckets(tmp_path):
    assert check_location(str(tmp_path / "store")) == str((tmp_path / "store").resolve())
    assert check_location("s3://bucket/") == "s3://bucket"
    (tmp_path / "file").write_text("x")
    for bad, why in [("s3://bucket/prefix", "bare bucket"), ("s3://", "bare bucket"), ("gs://b", "expected a folder"),
                     ("", "expected a folder"), (str(tmp_path / "file"), "is a file")]:
        with pytest.raises(ConfigError, match=why):
            check_location(bad)


@pytest.mark.parametrize("command", ["search", "export", "report"])
def test_a_bad_artifacts_flag_is_one_line_and_exit_2(command, tmp_path):
    done = subprocess.run([sys.executable, "-m", "autotransfer", command, "--out", str(tmp_path), "--artifacts",
                           "s3://bucket/prefix"], cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "--artifacts 's3://bucket/prefix': an S3 store is a bare bucket" in done.stderr
    assert "Traceback" not in done.stderr and not (tmp_path / "study.db").exists()


def test_search_stores_checkpoint_and_export_and_the_commands_use_them(tmp_path):
    out = tmp_path / "run"
    _search(out)
    study = optuna.load_study(study_name="digits", storage=default_storage(out))
    assert study.metric_names == ["val_accuracy"], "optuna-dashboard shows the objective's name"
    assert study.user_attrs[LOCATION_ATTR] == str((out / "artifacts").resolve())
    best = best_trial(study)
    metas = get_all_artifact_meta(best, storage=optuna.storages.RDBStorage(default_storage(out)))
    assert [m.filename for m in metas] == [f"trial_{best.number}.pt"]
    assert metas[0].artifact_id == best.user_attrs[CHECKPOINT_ATTR]
    stored = study.user_attrs[export_key(best.number, 3)]
    assert sorted(stored["files"]) == ["classes.json", "metrics.json", "model.onnx", "preprocess.json",
                                       "strategy.json"]
    assert {m.filename for m in get_all_artifact_meta(study)} == {f"trial{best.number}_refit3_{f}" for f in
                                                                  stored["files"]}, "listed as study artifacts"
    shipped = (out / "best" / "model.onnx").read_bytes()
    assert (out / "artifacts" / stored["files"]["model.onnx"]).read_bytes() == shipped

    for local in (out / "best", out / "checkpoints"):  # as on a machine that has only the study and its store
        for f in local.iterdir():
            f.unlink()
    again = _cli("export", "--out", str(out))
    assert "is stored in the study's artifacts; using it, nothing is trained" in again.stderr
    assert not any(word in again.stderr for word in TRAINING), again.stderr
    assert (out / f"trial_{best.number}" / "model.onnx").read_bytes() == shipped

    own = _cli("export", "--out", str(out), "--refit", "0", "--dest", str(tmp_path / "own"))
    assert not any(word in own.stderr for word in TRAINING), "the checkpoint came from the store, not a retrain"
    assert json.loads((tmp_path / "own" / "metrics.json").read_text())["retrained"] is False

    (out / f"trial_{best.number}" / "metrics.json").unlink()
    _cli("report", "--out", str(out))
    test_accuracy = json.loads((out / "artifacts" / stored["files"]["metrics.json"]).read_text())["test_accuracy"]
    assert f"Test accuracy <b>{test_accuracy:.4f}</b>" in (out / "report" / "report.html").read_text()


@pytest.mark.postgres
def test_the_machine_that_did_not_train_the_best_trial_exports_it_without_training(tmp_path, postgres_url):  # noqa: F811
    shared = ["--storage", postgres_url, "--study-name", "models", "--artifacts", str(tmp_path / "shared")]
    _search(tmp_path / "machine_a", *shared)
    b = _search(tmp_path / "machine_b", *shared)  # the budget is spent: B only exports, from A's stored export
    assert not any(line.startswith("trial ") for line in b.stdout.splitlines()), "machine B ran no trial"
    assert not any(word in b.stdout + b.stderr for word in TRAINING), b.stdout[-2000:]
    assert (tmp_path / "machine_b" / "best" / "model.onnx").read_bytes() == \
        (tmp_path / "machine_a" / "best" / "model.onnx").read_bytes()

    # --refit 0 ships the trial's own weights: A kept them, B has none but loads them through the study (which
    # records the store, so no --artifacts flag) and exports exactly A's model.
    b_checkpoints = tmp_path / "machine_b" / "checkpoints"
    assert not b_checkpoints.exists() or not any(b_checkpoints.iterdir())
    own_b = _cli("export", "--out", str(tmp_path / "machine_b"), "--storage", postgres_url, "--study-name", "models",
                 "--refit", "0")
    assert not any(word in own_b.stderr for word in TRAINING), own_b.stderr
    number = best_trial(optuna.load_study(study_name="models", storage=postgres_url)).number
    exported = tmp_path / "machine_b" / f"trial_{number}"
    assert json.loads((exported / "metrics.json").read_text())["retrained"] is False
    np.testing.assert_allclose(_onnx_logits(exported / "model.onnx"),
                               _checkpoint_logits(tmp_path / "machine_a" / "checkpoints" / f"trial_{number}.pt"),
                               rtol=1e-4, atol=1e-4)
