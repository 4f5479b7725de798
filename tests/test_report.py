"""Leaderboards, plots and report.html: columns, order, states, files, and what a new user runs."""

import json
import math
import subprocess
import sys
from pathlib import Path

import matplotlib
import numpy as np
import optuna
import pandas as pd
import pytest
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import TrialState, create_trial
from PIL import Image

import autotransfer
from autotransfer.cli import main
from autotransfer.export import cpu_session
from autotransfer.html_report import write_report
from autotransfer.refit import member_count
from autotransfer.report import COLUMNS, STRATEGY_COLUMNS, TABLE_FILES, leaderboard, trial_line, write_tables
from autotransfer.strategy import Strategy
from autotransfer.studies import record_source
from autotransfer.study import best_trial
from tests.conftest import TINY

matplotlib.use("Agg")
DISTRIBUTIONS = {"tap": IntDistribution(1, 3), "freeze": IntDistribution(0, 3),
                 "head": CategoricalDistribution(("linear", "svm", "mlp")),
                 "lr": FloatDistribution(1e-3, 0.3, log=True)}
PLOTS = ["history", "importances", "by_tap", "by_freeze", "by_head", "lr_ratio", "slice", "parallel"]


def _add(study, state, value=None, *, tap, freeze, head="linear", lr=0.01, steps=(), attrs=None):
    strategy = Strategy(tap=tap, freeze=freeze, head=head, mlp_hidden=128 if head == "mlp" else 0, lr=lr,
                        lr_ratio=0.1 if freeze < tap else 1.0, steps=30 if freeze < tap else 0)
    study.add_trial(create_trial(
        state=state, value=value, params={"tap": tap, "freeze": freeze, "head": head, "lr": lr},
        distributions=DISTRIBUTIONS, intermediate_values=dict(enumerate(steps)),
        user_attrs={"strategy": strategy.to_dict(), "seconds": 1.5, "steps_run": len(steps) or 30, **(attrs or {})}))


def _made_up(storage=None, name="made_up"):
    """A study with every state: complete (one tie), pruned, failed, running and waiting trials."""
    study = optuna.create_study(direction="maximize", study_name=name, storage=storage)
    _add(study, TrialState.COMPLETE, 0.80, tap=3, freeze=3)  # 0
    _add(study, TrialState.PRUNED, tap=2, freeze=0, steps=(0.3, 0.4), attrs={"steps_run": 2})  # 1
    _add(study, TrialState.COMPLETE, 0.90, tap=2, freeze=1, head="mlp", lr=0.05)  # 2
    _add(study, TrialState.FAIL, tap=1, freeze=0, attrs={"fail_reason": "RuntimeError: CUDA out of memory"})  # 3
    _add(study, TrialState.COMPLETE, 0.80, tap=2, freeze=2, head="svm", lr=0.002)  # 4: ties with trial 0
    running = study.ask()  # 5
    running.set_user_attr("strategy", Strategy(tap=1, freeze=1).to_dict())
    study.enqueue_trial({"tap": 3, "freeze": 3})  # 6: waiting, not a row
    return study


def test_the_validation_margin_breaks_ties_in_the_leaderboard_as_in_best_trial():
    study = optuna.create_study(direction="maximize")
    _add(study, TrialState.COMPLETE, 1.0, tap=3, freeze=3, attrs={"val_margin": 0.5, "val_margin_se": 0.1})  # 0
    _add(study, TrialState.COMPLETE, 1.0, tap=2, freeze=2, attrs={"val_margin": 0.9, "val_margin_se": 0.1})  # 1
    _add(study, TrialState.COMPLETE, 1.0, tap=1, freeze=1)  # 2: recorded without a margin
    _add(study, TrialState.COMPLETE, 0.95, tap=2, freeze=1, attrs={"val_margin": 5.0})  # 3: margin never beats score
    _add(study, TrialState.COMPLETE, 1.0, tap=3, freeze=2, attrs={"val_margin": 0.95, "val_margin_se": 0.1})  # 4
    board = leaderboard(study)
    # 4 has the best margin, but 1 is within its standard error (0.9 >= 0.95 - 0.1) and earlier: 1 wins the tie
    assert list(board.trial) == [1, 4, 0, 2, 3]
    assert best_trial(study).number == 1
    assert board.val_margin.iloc[0] == 0.9 and pd.isna(board.val_margin.iloc[3])


@pytest.fixture()
def made_up():
    return _made_up()


def test_leaderboard_columns_order_and_every_state(made_up):
    board = leaderboard(made_up)
    assert list(board.columns) == COLUMNS
    assert COLUMNS[:8] == ["rank", "trial", "state", "val_score", "val_accuracy", "val_margin", "reverse_accuracy",
                           "reverse_margin"] \
        and COLUMNS[-4:] == ["steps_run", "pruned_at", "seconds", "note"] and COLUMNS[8:-4] == STRATEGY_COLUMNS
    assert board.reverse_accuracy.isna().all() and board.reverse_margin.isna().all(), \
        "no unlabelled images: no reverse validation"
    assert board.val_score.equals(board.val_accuracy), "a study without a metric was scored by accuracy"
    assert list(board.trial) == [2, 0, 4, 1, 3, 5], "complete by accuracy (tie: earlier trial), then the rest"
    assert list(board.state) == ["complete"] * 3 + ["pruned", "fail", "running"]
    assert list(board["rank"].iloc[:3]) == [1, 2, 3] and board["rank"].iloc[3:].isna().all()
    pruned = board.set_index("trial").loc[1]
    assert pruned.val_score == 0.4 and pruned.val_accuracy == 0.4 and pruned.pruned_at == 2 and pruned.steps_run == 2
    assert board.pruned_at.isna().sum() == 5, "only the pruned trial has a pruned_at"
    failed = board.set_index("trial").loc[3]
    assert math.isnan(failed.val_accuracy) and failed.note == "RuntimeError: CUDA out of memory"
    assert board.set_index("trial").loc[2, "head"] == "mlp" and board.set_index("trial").loc[2, "mlp_hidden"] == 128


def test_trial_line_says_state_value_best_time_strategy_and_why_it_failed(made_up):
    names = type("Named", (), {"group_names": ("g1", "g2", "g3")})()
    trials = made_up.trials
    best = trials[2]
    line = trial_line(trials[0], names, best)
    assert line.startswith("trial   0 complete val 0.8000 (best 0.9000")
    described = Strategy.from_dict(trials[0].user_attrs["strategy"]).describe(names.group_names)
    assert line.endswith(f"   1.5s  {described}") and "g3" in described
    failed = trial_line(trials[3], names)
    assert failed.startswith("trial   3 fail     val   -     ") and "(best" not in failed
    assert failed.endswith("  [RuntimeError: CUDA out of memory]")
    assert trial_line(trials[1], names).startswith("trial   1 pruned   val   -   ")
    assert "   0.0s  " in trial_line(trials[5], names), "a running trial has no time yet"


def test_leaderboard_by_name_finds_the_study_where_search_puts_it(tmp_path, monkeypatch, made_up):
    folder = tmp_path / "studies" / "pets"
    folder.mkdir(parents=True)
    url = f"sqlite:///{folder / 'study.db'}"
    _made_up(url, "pets")
    monkeypatch.chdir(tmp_path)
    by_name = autotransfer.leaderboard("pets")
    pd.testing.assert_frame_equal(by_name, autotransfer.leaderboard("pets", storage=url))
    pd.testing.assert_frame_equal(by_name, leaderboard(made_up))
    with pytest.raises(autotransfer.ConfigError, match="No study database"):
        autotransfer.leaderboard("cats")
    assert not (tmp_path / "studies" / "cats").exists(), "looking must not create a database"


def test_tables_round_trip_in_every_format(tmp_path, made_up):
    board = leaderboard(made_up)
    paths = write_tables(board, tmp_path)
    assert sorted(p.name for p in paths) == sorted(TABLE_FILES) and not list(tmp_path.glob(".*"))
    for frame in (pd.read_csv(tmp_path / "leaderboard.csv"), pd.read_parquet(tmp_path / "leaderboard.parquet"),
                  pd.read_json(tmp_path / "leaderboard.json", orient="records")):
        assert list(frame.columns) == COLUMNS
        assert list(frame.trial) == list(board.trial) and list(frame.state) == list(board.state)
        assert frame["rank"].iloc[:3].tolist() == [1, 2, 3] and frame["rank"].iloc[3:].isna().all()
    assert pd.read_parquet(tmp_path / "leaderboard.parquet")["rank"].dtype == "Int64"
    records = json.loads((tmp_path / "leaderboard.json").read_text())
    assert records[3]["state"] == "pruned" and records[3]["rank"] is None and records[3]["pruned_at"] == 2
    md = (tmp_path / "leaderboard.md").read_text().splitlines()
    assert len(md) == 2 + len(board) and "<NA>" not in "".join(md) and "nan" not in "".join(md)
    page = (tmp_path / "leaderboard.html").read_text()
    assert page.count("<tr") == 1 + len(board) and "CUDA out of memory" in page and "<NA>" not in page


def test_report_skips_plots_a_small_study_cannot_support(tmp_path):
    study = optuna.create_study(direction="maximize")
    _add(study, TrialState.COMPLETE, 0.7, tap=3, freeze=3)
    _add(study, TrialState.PRUNED, tap=2, freeze=0, steps=(0.2,))
    report = write_report(study, tmp_path)
    written = {p.name for p in report.plots if p.path}
    skipped = {p.name: p.note for p in report.plots if p.path is None}
    assert written == {"history", "by_tap", "by_freeze", "by_head", "slice"}
    assert set(skipped) == {"importances", "parallel", "lr_ratio"}
    assert "needs 3 complete" in skipped["importances"] and "fine-tune" in skipped["lr_ratio"]
    page = (tmp_path / "report" / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 5 and page.count("skipped (") == 3
    assert "not measured yet" in page and "autotransfer export --trial 0" in page


@pytest.fixture(scope="module")
def searched(tmp_path_factory):
    """A real `autotransfer search` with the tiny backbone: 4 trials in a few seconds."""
    out = tmp_path_factory.mktemp("search") / "run"
    assert main(["search", "digits", "--backbone", TINY, "--image-size", "16", "--budget", "4",
                 "--max-steps", "20", "--out", str(out)]) == 0
    return out


def _open(out):
    return optuna.load_study(study_name="digits", storage=f"sqlite:///{out / 'study.db'}")


def test_report_after_search_writes_every_file(searched, capsys):
    capsys.readouterr()
    assert main(["report", "--out", str(searched), "--top", "3"]) == 0
    printed = capsys.readouterr().out
    folder = searched / "report"
    assert {p.name for p in folder.iterdir()} == {*TABLE_FILES, "report.html", *(f"{p}.png" for p in PLOTS)}
    for name in PLOTS:
        with Image.open(folder / f"{name}.png") as img:
            assert img.format == "PNG" and img.width > 300 and img.height > 200
    study = _open(searched)
    board = pd.read_parquet(folder / "leaderboard.parquet")
    pd.testing.assert_frame_equal(board, leaderboard(study), check_dtype=False)
    best = study.trials[int(board.trial.iloc[0])]
    assert best.value == max(t.value for t in study.trials if t.value is not None)
    page = (folder / "report.html").read_text()
    assert page.count("data:image/png;base64,") == len(PLOTS) and "src='http" not in page
    metrics = json.loads((searched / "best" / "metrics.json").read_text())
    assert f"Trial {best.number}</b>" in page and f"{metrics['test_accuracy']:.4f}" in page
    strategy = Strategy.from_dict(best.user_attrs["strategy"])
    assert metrics["refits"] == member_count(strategy, 3)
    assert ("the strategy refit once on train+val" if strategy.seed_independent
            else "the strategy refit 3 times on train+val, averaged") in page
    assert "linear head on" in page or "svm head on" in page or "mlp head on" in page
    assert page.count("<tr") == 1 + 3, "--top 3 rows in the page"
    assert f"best: trial {best.number}" in printed and str(folder / "report.html") in printed
    groups = study.user_attrs["source"]["group_names"]
    assert groups == ["g1", "g2", "g3"] and study.user_attrs["source"]["image_size"] == 16


def test_report_replaces_the_folder_whole(searched):
    (searched / "report").mkdir(exist_ok=True)
    (searched / "report" / "stale.txt").write_text("old")
    assert main(["report", "--out", str(searched)]) == 0
    assert not (searched / "report" / "stale.txt").exists() and (searched / "report" / "report.html").is_file()
    assert not [p for p in searched.iterdir() if p.name.startswith(".report")]


@pytest.mark.parametrize("argv, match", [
    (["report"], "No study database"),
    (["report", "--storage", "notadb://x"], "cannot be opened"),
    (["export", "--trial", "1"], "No study database"),
])
def test_report_and_export_without_a_study_fail_in_one_line(tmp_path, monkeypatch, capsys, argv, match):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert match in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert list(tmp_path.iterdir()) == [], "nothing is created"


def test_export_refit_0_retrains_a_trial_whose_weights_were_not_kept(searched, capsys, tmp_path):
    study = _open(searched)
    complete = sorted(study.get_trials(states=(TrialState.COMPLETE,)), key=lambda t: (-t.value, t.number))
    other = min(complete[1:], key=lambda t: t.user_attrs["seconds"]).number  # the quickest to retrain
    capsys.readouterr()
    no_store = ["--artifacts", str(tmp_path / "empty")]  # an earlier best trial's weights are in the study's store
    assert main(["export", "--out", str(searched), "--trial", str(other), "--refit", "0", *no_store]) == 0
    captured = capsys.readouterr()
    assert f"trial {other}: its weights were not kept" in captured.err and "retrained" in captured.out
    metrics = json.loads((searched / f"trial_{other}" / "metrics.json").read_text())
    assert metrics["trial"] == other and metrics["retrained"] is True and metrics["onnx_max_abs_diff"] < 1e-3
    assert metrics["trained_on"] == "train"
    assert json.loads((searched / "best" / "metrics.json").read_text())["trial"] == complete[0].number

    assert main(["export", "--out", str(searched), "--refit", "0"]) == 0, "the best trial, from its checkpoint"
    captured = capsys.readouterr()
    assert "not kept" not in captured.err and "retrained" not in captured.out
    best = json.loads((searched / f"trial_{complete[0].number}" / "metrics.json").read_text())
    assert best["retrained"] is False and best["trained_on"] == "train"


def test_export_by_default_reproduces_the_model_search_exported(searched, capsys):
    best = json.loads((searched / "best" / "metrics.json").read_text())
    capsys.readouterr()
    assert main(["export", "--out", str(searched), "--dest", str(searched / "again"),
                 "--artifacts", str(searched.parent / "empty")]) == 0, "the stored export is not used: trains again"
    members = member_count(Strategy.from_dict(_open(searched).trials[best["trial"]].user_attrs["strategy"]), 3)
    assert f"training its strategy {members} time(s) on train+val" in capsys.readouterr().err
    again = json.loads((searched / "again" / "metrics.json").read_text())
    assert best["refits"] == again["refits"] == members and again["trial"] == best["trial"]
    x = np.random.default_rng(0).standard_normal((5, 3, 16, 16)).astype(np.float32)
    outputs = [cpu_session(folder / "model.onnx").run(["logits"], {"input": x})[0] for folder in
               (searched / "best", searched / "again")]
    np.testing.assert_allclose(outputs[0], outputs[1], atol=1e-5)
    assert again["test_accuracy"] == best["test_accuracy"]


def test_export_refuses_trials_that_are_not_complete(searched, capsys):
    study = _open(searched)
    assert main(["export", "--out", str(searched), "--trial", str(len(study.trials) + 5)]) == 2
    assert "not in the study; only complete trials" in capsys.readouterr().err


def test_export_refuses_other_data_than_the_study_was_made_with(searched, capsys):
    assert main(["export", "--out", str(searched), "--seed", "7"]) == 2
    assert "differ from what it was made with" in capsys.readouterr().err


def test_studies_lists_counts_and_best(searched, tmp_path, capsys):
    other = tmp_path / "studies" / "cats"
    other.mkdir(parents=True)
    _made_up(f"sqlite:///{other / 'study.db'}", "cats")
    capsys.readouterr()
    assert main(["studies", "--root", str(tmp_path / "studies")]) == 0
    lines = capsys.readouterr().out.splitlines()
    cats = [cell.strip() for cell in lines[2].split("|")[1:-1]]
    assert lines[0].split("|")[1].strip() == "study" and cats[:8] == ["cats", "6", "3", "1", "1", "1", "0.9", "2"]
    assert main(["studies", "--storage", f"sqlite:///{searched / 'study.db'}"]) == 0
    row = [cell.strip() for cell in capsys.readouterr().out.splitlines()[2].split("|")[1:-1]]
    study = _open(searched)
    assert row[0] == "digits" and int(row[1]) == len(study.trials) and row[8] == "digits" and row[9] == TINY


def test_record_source_stores_absolute_paths(tmp_path, made_up, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "photos").mkdir()
    record_source(made_up, data="photos", image_size=32, seed=1, backbone="resnet18", weights=None,
                  group_names=("stem", "layer1"))
    assert made_up.user_attrs["source"] == {"data": str(tmp_path / "photos"), "image_size": 32, "seed": 1,
                                            "backbone": "resnet18", "weights": None, "group_names": ["stem", "layer1"]}


def _optuna_cli(*args):
    """The `optuna` command installed with optuna, beside this interpreter."""
    exe = Path(sys.executable).with_name("optuna")
    if not exe.is_file():
        pytest.skip(f"no optuna executable beside {sys.executable}")
    proc = subprocess.run([str(exe), *args], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_optuna_cli_reads_our_study_with_readable_names(searched):
    storage = f"sqlite:///{searched / 'study.db'}"
    trials = _optuna_cli("trials", "--study-name", "digits", "--storage", storage, "-f", "json")
    study = _open(searched)
    assert [t["number"] for t in trials] == [t.number for t in study.trials]
    first = trials[0]
    assert {"tap", "trainable_groups", "head", "pool", "probe_l2"} <= set(first["params"]), "trial 0: a head-only fit"
    tuned = next(t for t in trials if "optimizer" in t["params"])
    assert f"ft_lr_{tuned['params']['optimizer']}" in tuned["params"], "the LR is named per optimizer"
    assert first["user_attrs"]["strategy"]["tap"] == first["params"]["tap"] and "seconds" in first["user_attrs"]
    assert study.metric_names == ["val_accuracy"], "the objective is named, so Optuna's tools show its name"
    assert first["state"] == "COMPLETE" and first["value"] == {"val_accuracy": study.trials[0].value}
    best = _optuna_cli("best-trial", "--study-name", "digits", "--storage", storage, "-f", "json")
    board = leaderboard(study)
    assert best["value"] == {"val_accuracy": board.val_accuracy.iloc[0]}
    assert best["number"] in set(board[board.val_accuracy == best["value"]["val_accuracy"]].trial)
    assert best["params"]["head"] == board.set_index("trial").loc[best["number"], "head"]


def test_leaderboard_ranks_by_the_studys_metric_and_keeps_accuracy_apart():
    study = optuna.create_study(direction="maximize")
    study.set_user_attr("metric", "balanced_accuracy")
    _add(study, TrialState.COMPLETE, 0.60, tap=3, freeze=3, attrs={"val_accuracy": 0.95})  # 0: ignores a rare class
    _add(study, TrialState.COMPLETE, 0.85, tap=2, freeze=2, attrs={"val_accuracy": 0.90})  # 1
    _add(study, TrialState.PRUNED, tap=2, freeze=0, steps=(0.3, 0.5))  # 2: no accuracy recorded
    board = leaderboard(study).set_index("trial")
    assert list(board.index) == [1, 0, 2], "ranked by balanced accuracy, not accuracy"
    assert list(board.val_score) == [0.85, 0.60, 0.5] and list(board.val_accuracy[:2]) == [0.90, 0.95]
    assert math.isnan(board.loc[2, "val_accuracy"]), "a pruned trial's last report is its score, not its accuracy"
