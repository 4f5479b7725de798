"""The product as a user runs it: the real CLI, real EfficientNet-Lite0 weights, digits, onnxruntime."""

import json
import subprocess
import sys

import optuna
import pandas as pd
import pytest

from autotransfer.data import _digits, load_data

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def search_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("e2e") / "digits"
    # 60-step fine-tunes (the default ladder gives digits 300): the real weights and CLI, at a CI-sized cost
    proc = subprocess.run([sys.executable, "-m", "autotransfer", "search", "--budget", "10", "--max-steps", "60",
                           "--out", str(out)], capture_output=True, text=True, timeout=2400)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return out, proc.stdout


def test_default_search_exports_a_model_above_97_percent(search_run):
    out, stdout = search_run
    metrics = json.loads((out / "best" / "metrics.json").read_text())
    assert metrics["test_accuracy"] >= 0.97, metrics
    assert metrics["onnx_max_abs_diff"] <= 1e-3
    board = pd.read_csv(out / "leaderboard.csv")
    assert len(board[board.state.isin(["complete", "pruned"])]) == 10
    assert "Top 10 strategies" in stdout and f"best: trial {metrics['trial']} " in stdout


def test_the_export_is_the_best_trial_and_trial_0_the_prior_s_pick(search_run):
    out, _ = search_run
    check_export_and_first_trial(out)


def check_export_and_first_trial(out):
    """best/ holds the leaderboard's best complete trial, and the study opened with the prior's recommendation."""
    metrics = json.loads((out / "best" / "metrics.json").read_text())
    board = pd.read_csv(out / "leaderboard.csv")
    top = board.iloc[0]
    assert top.state == "complete" and top["rank"] == 1
    assert board[board.state == "complete"].val_accuracy.max() == top.val_accuracy
    assert metrics["trial"] == top.trial and metrics["val_accuracy"] == top.val_accuracy
    strategy = json.loads((out / "best" / "strategy.json").read_text())
    assert {k: strategy[k] for k in ("tap", "freeze", "head", "pool")} == {k: top[k] for k in ("tap", "freeze", "head",
                                                                                              "pool")}
    storage = f"sqlite:///{out / 'study.db'}"
    (name,) = optuna.get_all_study_names(storage)
    study = optuna.load_study(study_name=name, storage=storage)
    first = study.trials[0]
    assert first.user_attrs.get("enqueued") == "prior"
    assert first.user_attrs["strategy"] == study.user_attrs["prior"]["recommended"], "trial 0 runs the recommendation"


def test_rerun_continues_the_study_to_the_new_budget(search_run):
    out, _ = search_run
    proc = subprocess.run([sys.executable, "-m", "autotransfer", "search", "--budget", "11", "--max-steps", "60",
                           "--out", str(out)],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    board = pd.read_csv(out / "leaderboard.csv")
    assert sorted(board.trial) == list(range(len(board))) and len(board[board.state != "fail"]) == 11
    assert f"loaded from {out / 'cache'}" in proc.stdout, "the resumed study reuses the persisted activations"


def test_recommend_places_digits_small_and_different(search_run):
    out, _ = search_run
    proc = subprocess.run([sys.executable, "-m", "autotransfer", "recommend", "--out", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "quadrant: small & different" in proc.stdout
    rows = [line.split("|") for line in proc.stdout.splitlines() if line.startswith("|") and "---" not in line]
    table = pd.DataFrame([[c.strip() for c in r[1:-1]] for r in rows[1:]], columns=[c.strip() for c in rows[0][1:-1]])
    probe = table.probe_val_acc.astype(float)
    assert probe.iloc[-1] < probe.max() - 0.01, "an earlier group beats the final features on digits"
    assert f"recommended: linear head on {table.name[probe.idxmax()]}" in proc.stdout


def test_predict_cli_on_exported_model(search_run, tmp_path):
    out, _ = search_run
    images, labels = _digits()  # the raw 8x8 digits: predict must upscale them as training did
    data = load_data("digits")
    test = data.source_index[data.split["test"][:30]].tolist()  # rows are in split order: back to the source's
    paths, y = [], [labels[i] for i in test]
    for i in test:
        p = tmp_path / f"{i}.png"
        images[i].save(p)
        paths.append(str(p))
    proc = subprocess.run([sys.executable, "-m", "autotransfer", "predict", str(out / "best" / "model.onnx"),
                           *paths, "--format", "csv"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    rows = pd.read_csv(__import__("io").StringIO(proc.stdout))
    hits = (rows["class"].astype(str).values == y).mean()
    assert hits >= 0.9


def test_a_converged_probe_on_lite0_scores_the_same_whatever_its_seed():
    """Head-only trials rank strategies, not SGD noise: 3 seeds of one strategy within one validation image."""
    import dataclasses

    from autotransfer.backbones import get_backbone
    from autotransfer.features import ActivationCache
    from autotransfer.strategy import Strategy
    from autotransfer.trainer import train_trial

    data = load_data("digits")
    backbone = get_backbone("efficientnet_lite0")
    cache = ActivationCache(backbone, data)
    for strategy in (Strategy(tap=6, freeze=6, pool="avgmax"), Strategy(tap=9, freeze=9, head="svm", weight_decay=0.1)):
        scores = [train_trial(dataclasses.replace(strategy, seed=s), backbone, cache).val_accuracy for s in (0, 1, 2)]
        assert max(scores) - min(scores) <= 1 / len(data.split["val"]), scores
        assert min(scores) > 0.9
