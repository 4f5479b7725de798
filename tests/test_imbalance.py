"""Imbalanced classes through the prior, the trainer and the study: the metric, the class weights."""

import dataclasses
import json

import numpy as np
import optuna
import pytest
import torch
from sklearn.metrics import balanced_accuracy_score

from autotransfer.errors import ConfigError
from autotransfer.features import ActivationCache
from autotransfer.prior import build_prior
from autotransfer.report import leaderboard
from autotransfer.strategy import Strategy
from autotransfer.study import StudyConfig, default_storage, run_study
from autotransfer.trainer import train_trial

RARE = [5, 6, 7, 8, 9]


@pytest.fixture()
def imbalanced_cache(tiny, imbalanced16):
    return ActivationCache(tiny, imbalanced16)


def _val_predictions(result, cache):
    x, y = cache.pooled(len(result.model.groups), result.model.pool.kind, "val")  # a head-only trial
    with torch.no_grad():
        return result.model.head.eval()(x).argmax(1).numpy(), y.numpy()


def test_the_prior_adds_class_weights_only_on_imbalanced_data(imbalanced_cache, tiny_cache):
    prior = build_prior(imbalanced_cache, max_steps=20)
    assert prior.space.imbalanced
    assert prior.first_strategies[1] == dataclasses.replace(prior.recommended, class_weight="balanced")
    plain = build_prior(tiny_cache, max_steps=20)
    assert not plain.space.imbalanced and all(s.class_weight == "none" for s in plain.first_strategies)


def test_balanced_class_weights_find_more_of_the_rare_classes(imbalanced_cache):
    s = Strategy(tap=3, freeze=3, pool="avgmax", weight_decay=1e-3)
    results = {w: train_trial(dataclasses.replace(s, class_weight=w), imbalanced_cache.backbone, imbalanced_cache,
                              metric="balanced_accuracy") for w in ("none", "balanced")}
    rare_recall = {}
    for w, r in results.items():
        predicted, y = _val_predictions(r, imbalanced_cache)
        assert r.val_score == pytest.approx(balanced_accuracy_score(y, predicted)), "the objective is balanced accuracy"
        assert r.val_accuracy == pytest.approx(float((predicted == y).mean()))
        rare = np.isin(y, RARE)
        rare_recall[w] = float((predicted[rare] == y[rare]).mean())
    assert rare_recall["balanced"] > rare_recall["none"]
    assert results["balanced"].val_score > results["none"].val_score


def _config(tmp_path, budget, **kw):
    return StudyConfig(study_name="imb", storage=default_storage(tmp_path), out=tmp_path, budget=budget,
                       max_steps=20, **kw)


def test_an_imbalanced_study_maximises_balanced_accuracy_and_keeps_it(tmp_path, tiny, imbalanced_cache):
    study = run_study(_config(tmp_path, 3), tiny, imbalanced_cache)
    assert study.user_attrs["metric"] == "balanced_accuracy"
    first = study.trials[0]
    again = train_trial(Strategy.from_dict(first.user_attrs["strategy"]), tiny, imbalanced_cache)
    predicted, y = _val_predictions(again, imbalanced_cache)
    assert first.value == pytest.approx(balanced_accuracy_score(y, predicted))
    assert first.user_attrs["val_accuracy"] == pytest.approx(float((predicted == y).mean()))
    assert first.value != pytest.approx(first.user_attrs["val_accuracy"]), "the two differ on this data"
    board = leaderboard(study)
    complete = board[board.state == "complete"]
    assert list(complete.val_score) == sorted(complete.val_score, reverse=True), "ranked by the study's metric"
    by_number = {t.number: t for t in study.trials}
    assert all(row.val_accuracy == pytest.approx(by_number[row.trial].user_attrs["val_accuracy"])
               for row in complete.itertuples())
    with pytest.raises(ConfigError, match="--metric accuracy differs from this study's metric 'balanced_accuracy'"):
        run_study(_config(tmp_path, 4, metric="accuracy"), tiny, imbalanced_cache)
    resumed = run_study(_config(tmp_path, 4, metric="balanced_accuracy"), tiny, imbalanced_cache)
    assert len(resumed.get_trials(states=(optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED))) == 4


def test_a_balanced_study_keeps_accuracy_and_todays_space(tmp_path, tiny, tiny_cache):
    study = run_study(_config(tmp_path, 2), tiny, tiny_cache)
    assert study.user_attrs["metric"] == "accuracy" and not study.user_attrs["search_space"]["imbalanced"]
    assert all("class_weight" not in t.params for t in study.trials)
    assert all(t.value == t.user_attrs["val_accuracy"] for t in study.trials)


def _tiny_search(data, out, *extra):
    from autotransfer.cli import main
    from tests.conftest import TINY

    return main(["search", data, "--backbone", TINY, "--image-size", "16", "--budget", "3", "--max-steps", "20",
                 "--refit", "0", "--out", str(out), *extra])


def test_an_imbalanced_export_reports_per_class_recall(tmp_path, capsys, tiny):
    from autotransfer.data import load_data
    from autotransfer.preprocess import normalise
    from autotransfer.runtime import cpu_session, run_batched
    from tests.conftest import write_imbalanced_digits

    data, out = write_imbalanced_digits(tmp_path / "data"), tmp_path / "run"
    assert _tiny_search(data, out) == 0
    printed = capsys.readouterr().out
    assert "objective: validation balanced_accuracy (largest train class 5.2x the smallest (> 3x))" in printed
    metrics = json.loads((out / "best" / "metrics.json").read_text())
    assert metrics["metric"] == "balanced_accuracy"
    # the exported model, run again through onnxruntime on the test split, recall counted by hand
    d = load_data(data, image_size=16, seed=0)
    x, y = d.subset("test")
    session = cpu_session(out / "best" / "model.onnx")
    predicted = run_batched(session, normalise(x, tiny.mean, tiny.std).numpy()).argmax(1)
    y = y.numpy()
    expected = {c: float(np.mean(predicted[y == i] == i)) for i, c in enumerate(d.classes)}
    assert list(metrics["test_per_class_recall"]) == list(d.classes)
    assert metrics["test_per_class_recall"] == pytest.approx(expected)
    assert metrics["test_balanced_accuracy"] == pytest.approx(np.mean(list(expected.values())))
    assert metrics["test_accuracy"] == pytest.approx(float(np.mean(predicted == y)))
    lowest = min(expected, key=lambda c: (expected[c], c))
    assert f"lowest test recall (5 of 10): {lowest} {expected[lowest]:.3f}" in printed
    capsys.readouterr()
    assert _tiny_search(data, out, "--metric", "accuracy") == 2
    err = capsys.readouterr().err
    assert "--metric accuracy differs from this study's metric 'balanced_accuracy'" in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_an_unknown_metric_is_one_line_exit_2(capsys):
    from autotransfer.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["search", "--metric", "bogus"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert "--metric: invalid choice: 'bogus'" in err and "balanced_accuracy" in err
