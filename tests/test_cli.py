import json

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from autotransfer.cli import main
from tests.conftest import TINY
from tests.test_data import _write_images


def _search(tmp_path, *extra):
    return main(["search", "digits", "--backbone", TINY, "--image-size", "16", "--budget", "4", "--max-steps", "20",
                 "--out", str(tmp_path / "run"), *extra])


def test_search_writes_leaderboards_and_a_verified_model(tmp_path, capsys):
    assert _search(tmp_path) == 0
    out = tmp_path / "run"
    board = pd.read_csv(out / "leaderboard.csv")
    assert len(board) == 4 and {"rank", "trial", "state", "val_accuracy", "tap", "freeze", "head", "lr_ratio",
                                "steps_run", "seconds"} <= set(board.columns)
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
def test_bad_input_is_one_line_exit_2_and_leaves_nothing(tmp_path, monkeypatch, capsys, argv, match):
    monkeypatch.chdir(tmp_path)  # what a command writes by default (studies/, files of its own) lands here
    code = main([*argv, "--out", str(tmp_path / "out")] if argv[0] == "search" else argv)
    out, err = capsys.readouterr()
    assert code == 2
    assert match in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert out == "", "no partial output before the error"
    assert list(tmp_path.rglob("*")) == [], "neither --out nor anything in the working folder is left"


def _classes(root, **counts):
    for name, n in counts.items():
        _write_images(root / name, n)
    return root


def _empty(root):
    root.mkdir()
    return root


def _file(path, content: bytes):
    path.write_bytes(content)
    return path


def _corrupt_class(root):
    _classes(root, a=5)
    (root / "b").mkdir()
    for name in ("x.png", "y.jpg"):
        (root / "b" / name).write_bytes(b"not an image")
    return root


def _only_non_images(root):
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        (root / c / "notes.txt").write_text("not an image")
    return root


def _csv(root, text):
    root.mkdir()
    (root / "labels.csv").write_text(text)
    return root / "labels.csv"


def _state_dict_file(path, state_dict):
    torch.save(state_dict, path)
    return str(path)


_TINY_ARGS = ["--backbone", TINY, "--image-size", "16"]


@pytest.mark.parametrize("make_argv, match", [
    (lambda p: [str(_empty(p / "d")), *_TINY_ARGS], "No images found"),
    (lambda p: [str(_classes(p / "d", only=5)), *_TINY_ARGS], "need at least 2"),
    (lambda p: [str(_classes(p / "d", a=5, b=2)), *_TINY_ARGS], "Class 'b' has 2 image(s); a train/val/test split"),
    (lambda p: [str(_corrupt_class(p / "d")), *_TINY_ARGS], "Class 'b' in"),
    (lambda p: [str(_only_non_images(p / "d")), *_TINY_ARGS], "No images found"),
    (lambda p: [str(_csv(p / "d", "file,y\nx.png,1\n")), *_TINY_ARGS], "columns 'path' and 'label'"),
    (lambda p: [str(_csv(p / "d", "path,label\nmissing.png,1\n")), *_TINY_ARGS], "image 'missing.png' not found"),
    (lambda p: [str(_file(p / "labels.txt", b"path,label")), *_TINY_ARGS], "is not a .csv"),
    (lambda p: ["digits", "--image-size", "16", "--backbone", "resnet18", "--weights",
                _state_dict_file(p / "tiny.pth", {"0.0.weight": torch.zeros(8, 3, 3, 3)})],
     "does not match backbone 'resnet18'"),
    (lambda p: ["digits", "--backbone", "resnet18", "--weights", str(_file(p / "w.pth", b"garbage"))],
     "could not be read"),
    (lambda p: ["digits", *_TINY_ARGS, "--storage", "study.db"], "has no scheme"),
    (lambda p: ["digits", *_TINY_ARGS, "--unlabeled", str(_empty(p / "u"))], "No images found in --unlabeled"),
    (lambda p: ["digits", *_TINY_ARGS, "--unlabeled", str(_corrupt_class(p / "u") / "b")], "could be decoded"),
    (lambda p: [str(_classes(p / "d", a=5, b=5)), *_TINY_ARGS, "--unlabeled", str(p / "d")],
     "holds 10 of the labelled images"),
    (lambda p: ["digits", *_TINY_ARGS, "--val", str(_file(p / "v.png", b"x"))], "--val"),
    (lambda p: ["digits", *_TINY_ARGS, "--test", str(_classes(p / "t", cat=3, dog=3))], "has class 'cat'"),
    (lambda p: ["digits", *_TINY_ARGS, "--val", str(_empty(p / "v"))], "No images found in --val"),
], ids=["empty-folder", "one-class", "too-few-images", "class-all-corrupt", "only-non-images", "csv-columns",
        "csv-unknown-path", "not-a-csv", "weights-of-another-backbone", "weights-unreadable", "storage-no-scheme",
        "unlabeled-empty", "unlabeled-unreadable", "unlabeled-is-the-data", "val-not-a-folder", "test-unknown-class",
        "val-empty"])
def test_bad_data_and_options_are_one_line_exit_2_and_leave_nothing(tmp_path, capsys, make_argv, match):
    out = tmp_path / "out"
    code = main(["search", *make_argv(tmp_path), "--budget", "1", "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2, err
    assert match in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not out.exists()


def test_unwritable_output_folder(tmp_path, capsys):
    (tmp_path / "a-file").write_text("")
    out = tmp_path / "a-file" / "run"
    assert main(["search", "digits", *_TINY_ARGS, "--budget", "1", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "is not writable" in err and "pass --out" in err and len(err.strip().splitlines()) == 1
    assert (tmp_path / "a-file").is_file()


def test_same_study_name_with_other_data_or_backbone_is_refused_and_keeps_the_study(tmp_path, capsys):
    args = ["--budget", "1", "--max-steps", "20", "--out", str(tmp_path / "run"), "--study-name", "pets"]
    assert main(["search", "digits", *_TINY_ARGS, *args]) == 0
    before = sorted(p.relative_to(tmp_path) for p in (tmp_path / "run").rglob("*"))
    board = (tmp_path / "run" / "leaderboard.csv").read_text()
    capsys.readouterr()
    for other, match in ((["--seed", "3"], "different data"),
                         (["--backbone", "resnet18", "--weights", "random"], "different backbone 'tiny_test_cnn'")):
        assert main(["search", "digits", *_TINY_ARGS, *other, *args]) == 2
        err = capsys.readouterr().err
        assert match in err and "pass a new --study-name" in err and len(err.strip().splitlines()) == 1
    assert sorted(p.relative_to(tmp_path) for p in (tmp_path / "run").rglob("*")) == before
    assert (tmp_path / "run" / "leaderboard.csv").read_text() == board


def test_corrupt_and_non_image_files_are_skipped_with_a_warning(tmp_path, caplog):
    data = _classes(tmp_path / "d", a=8, b=8)
    (data / "b" / "broken.png").write_bytes(b"not a png")
    (data / "a" / "notes.txt").write_text("labelled by Ann")
    assert main(["search", str(data), *_TINY_ARGS, "--budget", "1", "--max-steps", "20",
                 "--out", str(tmp_path / "run")]) == 0
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]  # on stderr from the CLI
    assert any("Skipping unreadable image" in w and "broken.png" in w for w in warnings)
    assert any("Ignoring 1 non-image file(s)" in w and "notes.txt" in w for w in warnings)
    assert len(pd.read_csv(tmp_path / "run" / "leaderboard.csv")) == 1


@pytest.mark.parametrize("argv, hint", [(["search", "--budget", "0"], "e.g. --budget 50"),
                                        (["search", "--budget", "-3"], "e.g. --budget 50"),
                                        (["search", "--budget", "ten"], "whole number, got 'ten'"),
                                        (["search", "--workers", "0"], "e.g. --workers 2"),
                                        (["search", "--max-steps", "0"], "e.g. --max-steps 300"),
                                        (["search", "--patience", "-1"], "at least 0, got -1; e.g. --patience 10"),
                                        (["recommend", "--max-steps", "x"], "whole number, got 'x'")])
def test_bad_budget_is_rejected_by_the_parser(argv, hint, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    err = capsys.readouterr().err
    assert exc.value.code == 2 and argv[1] in err and hint in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1 and f"see `autotransfer {argv[0]} --help`" in err


def test_truncated_model_is_a_clear_error(tmp_path, capsys):
    bad = tmp_path / "model.onnx"
    bad.write_bytes(b"\x08\x07garbage")
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    assert main(["predict", str(bad), str(tmp_path / "a.png")]) == 2
    assert "not a readable ONNX model" in capsys.readouterr().err


def test_export_summary_block(capsys, tmp_path):
    from autotransfer.cli.output import print_export

    variant = {"file": "model.int8.onnx", "test_accuracy": 0.8, "top1_agreement": 0.9, "size_bytes": 1.5e6,
               "accuracy_drop": 0.075, "degraded": True}
    print_export("trial 4", {"val_accuracy": 0.9, "test_accuracy": 0.875, "test_images": 8, "onnx_max_abs_diff": 2.5e-5,
                             "refits": 3, "variants": {"int8": variant}}, tmp_path)
    assert capsys.readouterr().out.splitlines() == [
        "trial 4: val 0.9000  test 0.8750 (onnxruntime, 8 images)  max |onnx - torch| 2.5e-05  (3 refits on train+val)",
        "int8: model.int8.onnx  test 0.8000  top-1 agreement with fp32 0.9000  1.5 MB"
        "  DEGRADED: loses 7.5 points (> 1)",
        f"model: {tmp_path / 'model.onnx'}"]


def test_exit_codes_are_one_set():
    import autotransfer.cli.common as common
    import autotransfer.errors as errors

    # cli/common.py re-exports errors.py's pair: they must be the same objects, never a drifting copy.
    assert common.EXIT_USAGE is errors.EXIT_USAGE and common.EXIT_INTERRUPTED is errors.EXIT_INTERRUPTED
    assert (errors.EXIT_USAGE, errors.EXIT_INTERRUPTED) == (2, 130)


def test_listing_commands(capsys):
    assert main(["backbones"]) == 0
    listing = capsys.readouterr().out
    assert "efficientnet_lite0" in listing and "9 groups" in listing and "resnet50" in listing
    assert main(["datasets"]) == 0
    assert "digits" in capsys.readouterr().out


def test_small_images_are_tried_upscaled_and_the_choice_is_kept(tmp_path, capsys, monkeypatch):
    """Without --image-size, 16 px images (loaded at 32 px) are also probed at 64 and 96; the best probe's size is used
    (the smallest within a point), recorded in the output folder and not measured again on the next run."""
    import autotransfer.resolution as resolution

    assert resolution.candidate_sizes(16) == (16, 32, 48) and resolution.candidate_sizes(64) == (64,)
    folder = tmp_path / "data"
    rng = np.random.default_rng(0)
    for c in range(2):
        (folder / str(c)).mkdir(parents=True)
        for i in range(12):
            pixels = rng.integers(0, 80, (16, 16, 3)) + 150 * c  # class 1 is brighter
            Image.fromarray(pixels.astype(np.uint8)).save(folder / str(c) / f"{i}.png")
    args = ["recommend", str(folder), "--backbone", TINY, "--out", str(tmp_path / "run")]
    assert main(args) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("input size"))
    record = json.loads((tmp_path / "run" / "resolution.json").read_text())
    assert set(record["probe_accuracy"]) == {"32", "64", "96"} and f"input size {record['chosen']}px" in line
    top = max(record["probe_accuracy"].values())
    assert record["chosen"] == min(int(s) for s, a in record["probe_accuracy"].items() if a >= top - 0.01)
    monkeypatch.setattr(resolution, "best_probe", lambda cache: pytest.fail("measured again"))
    assert main(args) == 0


def test_a_search_logs_progress_lines_to_stderr_when_it_is_not_a_terminal(tmp_path):
    """The real CLI in a subprocess, stderr a pipe: each fine-tune's steps, each refit member and the export's
    phases are plain lines on stderr (every update, with the interval at 0); stdout keeps only the results."""
    import os
    import re
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1", "AUTOTRANSFER_PROGRESS": "1",
           "AUTOTRANSFER_PROGRESS_INTERVAL": "0"}
    cmd = [sys.executable, "-m", "tests.tiny_cli", "search", "digits", "--backbone", TINY, "--image-size", "16",
           "--budget", "4", "--max-steps", "20", "--out", str(tmp_path / "run"), "--precision", "fp16"]
    done = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    err = done.stderr
    board = pd.read_csv(tmp_path / "run" / "leaderboard.csv")
    fine_tunes = board[board.steps_run > 0]
    assert len(fine_tunes) >= 1, "the prior's first trials include a fine-tune"
    for trial, steps_run in zip(fine_tunes.trial, fine_tunes.steps_run, strict=True):
        shown = [int(k) for k, n in re.findall(rf"^trial {trial} fine-tune: (\d+)/(\d+) steps ", err, re.MULTILINE)
                 if n == "20"]
        assert shown == list(range(1, min(int(steps_run), 19) + 1)), trial  # no line for the last step
    members = json.loads((tmp_path / "run" / "best" / "metrics.json").read_text())["refits"]
    assert members in (1, 3), "3 refits, or 1 for a seed-independent head-only strategy"
    for k in range(1, members + 1):
        assert re.search(rf"^refit member {k}/{members}: (head fit \.\.\.|\d+/\d+ steps )", err, re.MULTILINE), k
    for line in ("export: ONNX export ...", "export: test split through onnxruntime: 64/269 images",
                 "export: test split through PyTorch (parity): 64/269 images", "export: fp16 variant ...",
                 "export: test split through model.fp16.onnx: 64/269 images"):
        assert line in err, line
    assert "\r" not in err, "no bar in a log"
    assert " steps (" not in done.stdout and "export:" not in done.stdout
