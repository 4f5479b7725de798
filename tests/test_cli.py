import json

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from autotransfer.cli import main
from tests.conftest import TINY


def _search(tmp_path, *extra):
    return main(["search", "digits", "--backbone", TINY, "--image-size", "16", "--budget", "4", "--max-epochs", "2",
                 "--out", str(tmp_path / "run"), *extra])


def test_search_writes_leaderboards_and_a_verified_model(tmp_path, capsys):
    assert _search(tmp_path) == 0
    out = tmp_path / "run"
    board = pd.read_csv(out / "leaderboard.csv")
    assert len(board) == 4 and {"rank", "trial", "state", "val_accuracy", "tap", "freeze", "head", "lr_ratio",
                                "epochs_run", "seconds"} <= set(board.columns)
    md = (out / "leaderboard.md").read_text().splitlines()
    assert md[0].split("|")[1].strip() == "rank" and len(md) == 2 + 4
    best = out / "best"
    metrics = json.loads((best / "metrics.json").read_text())
    assert {"trial", "val_accuracy", "test_accuracy", "onnx_max_abs_diff"} <= set(metrics)
    assert metrics["onnx_max_abs_diff"] < 1e-3 and metrics["val_accuracy"] == board.val_accuracy.max()
    assert json.loads((best / "classes.json").read_text()) == [str(i) for i in range(10)]
    assert json.loads((best / "preprocess.json").read_text())["image_size"] == 16
    assert json.loads((best / "strategy.json").read_text())["tap"] == int(board.iloc[0].tap)
    printed = capsys.readouterr().out
    assert "Top 10 strategies" in printed and str(best / "model.onnx") in printed


def test_predict_reads_preprocessing_from_the_model(tmp_path, capsys, digits16):
    assert _search(tmp_path) == 0
    capsys.readouterr()
    paths = []
    x, y = digits16.subset("test")
    for i in range(20):
        p = tmp_path / f"d{i}.png"
        Image.fromarray(x[i].permute(1, 2, 0).numpy()).save(p)
        paths.append(str(p))
    assert main(["predict", str(tmp_path / "run" / "best" / "model.onnx"), *paths, "--format", "json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["path"] for r in rows] == paths
    assert all(0 < r["probability"] <= 1 for r in rows)
    accuracy = np.mean([r["class"] == str(int(label)) for r, label in zip(rows, y[:20], strict=True)])
    test_accuracy = json.loads((tmp_path / "run" / "best" / "metrics.json").read_text())["test_accuracy"]
    assert accuracy >= test_accuracy - 0.25, "predict must see the images as training did"


@pytest.mark.parametrize("argv, match", [
    (["search", "/no/such/folder"], "neither a folder"),
    (["search", "digits", "--backbone", "resnt50"], "Unknown backbone 'resnt50'"),
    (["search", "digits", "--backbone", TINY, "--image-size", "16", "--storage", "notadb://x"], "cannot be opened"),
    (["predict", "/no/model.onnx", "x.png"], "does not exist"),
])
def test_bad_input_is_one_line_exit_2_and_leaves_nothing(tmp_path, capsys, argv, match):
    out = tmp_path / "out"
    code = main([*argv, "--out", str(out)] if argv[0] == "search" else argv)
    err = capsys.readouterr().err
    assert code == 2
    assert match in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not out.exists()


@pytest.mark.parametrize("budget", ["0", "-3", "ten"])
def test_bad_budget_is_rejected_by_the_parser(budget, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["search", "--budget", budget])
    assert exc.value.code == 2 and "--budget" in capsys.readouterr().err


def test_truncated_model_is_a_clear_error(tmp_path, capsys):
    bad = tmp_path / "model.onnx"
    bad.write_bytes(b"\x08\x07garbage")
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    assert main(["predict", str(bad), str(tmp_path / "a.png")]) == 2
    assert "not a readable ONNX model" in capsys.readouterr().err


def test_listing_commands(capsys):
    assert main(["backbones"]) == 0
    listing = capsys.readouterr().out
    assert "efficientnet_lite0" in listing and "9 groups" in listing and "resnet50" in listing
    assert main(["datasets"]) == 0
    assert "digits" in capsys.readouterr().out
