import json
import os
import subprocess
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper
from PIL import Image

from autotransfer.cli import main
from autotransfer.errors import ConfigError, DataError, ExportError
from autotransfer.predict import Predictor
from autotransfer.runtime import (
    PROVIDERS,
    available_cpus,
    batch_slices,
    cpu_session,
    provider_list,
    run_batched,
    session_options,
)

META = {"class_names": ["r", "g", "b"], "input_size": [3, 8, 8], "mean": [0, 0, 0], "std": [1, 1, 1]}


def _colour_model(path, *, shape=("batch", 3, 8, 8), meta=META, nhwc=False):
    """Logits = mean of each channel: a model whose right answer is the dominant colour of the image."""
    nodes, x = [], "input"
    if nhwc:
        nodes.append(helper.make_node("Transpose", ["input"], ["nchw"], perm=[0, 3, 1, 2]))
        x = "nchw"
    nodes += [helper.make_node("GlobalAveragePool", [x], ["pooled"]),
              helper.make_node("Flatten", ["pooled"], ["logits"])]
    graph = helper.make_graph(nodes, "colour", [helper.make_tensor_value_info("input", TensorProto.FLOAT, shape)],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [shape[0], 3])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 10  # onnx 1.23 defaults to an IR version onnxruntime rejects
    helper.set_model_props(model, {k: json.dumps(v) for k, v in meta.items()})
    onnx.save_model(model, str(path))
    return path


def _images(folder, colours):
    paths = []
    for i, c in enumerate(colours):
        rgb = [0, 0, 0]
        rgb["rgb".index(c)] = 255
        paths.append(folder / f"{i}_{c}.png")
        Image.new("RGB", (20, 12), tuple(rgb)).save(paths[-1])
    return [str(p) for p in paths]


def test_batches_of_any_size_give_one_row_per_image_in_order(tmp_path):
    colours = list("rgbbgrrgbrg")
    paths = _images(tmp_path, colours)
    predictor = Predictor(_colour_model(tmp_path / "m.onnx"))
    assert predictor.provider == "CPUExecutionProvider" and predictor.image_size == 8
    for batch_size in (1, 4, 64):
        rows = predictor.predict(paths, batch_size=batch_size)
        assert [r["class"] for r in rows] == colours and [r["path"] for r in rows] == paths


def test_a_model_with_a_fixed_batch_is_fed_in_padded_chunks(tmp_path):
    colours = list("rgbgr")
    predictor = Predictor(_colour_model(tmp_path / "m.onnx", shape=(2, 3, 8, 8)))
    assert [r["class"] for r in predictor.predict(_images(tmp_path, colours), batch_size=3)] == colours


def test_cpu_count_follows_the_affinity_mask_and_is_shared_by_workers(monkeypatch):
    from autotransfer.device import threads_per_worker

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 2, 5, 7, 9}, raising=False)
    assert available_cpus() == 5
    assert [threads_per_worker(n) for n in (1, 2, 5, 8)] == [5, 2, 1, 1]
    monkeypatch.delattr(os, "sched_getaffinity")
    monkeypatch.setattr(os, "cpu_count", lambda: 3)
    assert available_cpus() == threads_per_worker(1) == 3
    monkeypatch.setattr(os, "cpu_count", lambda: None)
    assert available_cpus() == 1


def test_session_threads_are_explicit(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2}, raising=False)
    assert session_options().intra_op_num_threads == 3, "None: one per available CPU"
    assert session_options(threads=2).intra_op_num_threads == 2
    with pytest.raises(ConfigError, match="threads must be at least 1"):
        session_options(threads=0)


def test_batch_slices_cover_every_row_once_cycling_through_the_sizes():
    assert [(s.start, s.stop) for s in batch_slices(11, (4, 1))] == [(0, 4), (4, 5), (5, 9), (9, 10), (10, 11)]
    assert [(s.start, s.stop) for s in batch_slices(5, (64,))] == [(0, 5)]
    assert batch_slices(0) == [slice(0, 0)]
    with pytest.raises(ValueError, match="at least 1"):
        batch_slices(3, (2, 0))


def test_run_batched_returns_one_row_per_input_row_in_order(tmp_path):
    x = np.random.default_rng(0).random((7, 3, 8, 8), dtype=np.float32)
    expected = x.mean(axis=(2, 3))  # the colour model's logits: each channel's mean
    dynamic = cpu_session(_colour_model(tmp_path / "d.onnx"))
    for sizes in ((1,), (3,), (64,), (4, 1)):
        np.testing.assert_allclose(run_batched(dynamic, x, sizes=sizes), expected, rtol=1e-5)
    fixed = cpu_session(_colour_model(tmp_path / "f.onnx", shape=(3, 3, 8, 8)))
    np.testing.assert_allclose(run_batched(fixed, x, sizes=(3,), pad=True), expected, rtol=1e-5)
    assert run_batched(fixed, x[:0], sizes=(3,), pad=True).shape == (0, 3)


@pytest.mark.parametrize("kwargs, match", [
    ({"nhwc": True, "shape": ("batch", 8, 8, 3)}, r"\[batch, 3, H, W\] \(NCHW\)"),
    ({"shape": ("batch", 1, 8, 8)}, r"\[batch, 3, H, W\]"),
    ({"shape": ("batch", 3, 16, 16)}, "16x16 images but its metadata says 8px"),
    ({"meta": {"class_names": ["r", "g", "b"]}}, r"lacks metadata \['input_size', 'mean', 'std'\]"),
])
def test_a_model_predict_cannot_feed_is_a_clear_export_error(tmp_path, kwargs, match):
    with pytest.raises(ExportError, match=match):
        Predictor(_colour_model(tmp_path / "m.onnx", **kwargs))


def test_zero_images_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match="No images given"):
        Predictor(_colour_model(tmp_path / "m.onnx")).predict([])


def _run_cli(capsys, argv):
    code = main(argv)
    err = capsys.readouterr().err
    return code, err.strip()


@pytest.mark.parametrize("case, match", [
    ("truncated", "is not a readable ONNX model"),
    ("no_metadata", "lacks metadata"),
    ("not_an_image", "cannot be decoded"),
    ("missing_image", "does not exist"),
])
def test_cli_input_errors_are_one_line_exit_2(tmp_path, capsys, case, match):
    model = _colour_model(tmp_path / "model.onnx", meta={} if case == "no_metadata" else META)
    if case == "truncated":
        model.write_bytes(model.read_bytes()[:40])
    image = _images(tmp_path, "r")[0]
    if case == "not_an_image":
        image = str(tmp_path / "notes.png")
        (tmp_path / "notes.png").write_text("not pixels")
    if case == "missing_image":
        image = str(tmp_path / "nope.png")
    code, err = _run_cli(capsys, ["predict", str(model), image])
    assert code == 2 and match in err and len(err.splitlines()) == 1 and "Traceback" not in err


TRT, CUDA, CPU = "TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"


@pytest.mark.parametrize("available, auto", [
    ([CPU, CUDA, "AzureExecutionProvider", TRT], [TRT, CUDA, CPU]),
    ([CUDA, CPU], [CUDA, CPU]),
    ([TRT, CPU], [TRT, CPU]),
    ([CPU], [CPU]),
])
def test_provider_auto_prefers_tensorrt_then_cuda_then_cpu(monkeypatch, available, auto):
    monkeypatch.setattr(ort, "get_available_providers", lambda: available)
    assert provider_list("auto") == auto
    assert provider_list("cpu") == [CPU]
    if CUDA in available:
        assert provider_list("cuda") == [CUDA, CPU], "CPU stays behind, for nodes CUDA cannot run"
    else:
        with pytest.raises(ConfigError, match="Provider 'cuda' is not available"):
            provider_list("cuda")
    with pytest.raises(ConfigError, match="Unknown provider 'gpu'"):
        provider_list("gpu")
    assert set(PROVIDERS) == {"tensorrt", "cuda", "cpu"}


@pytest.mark.skipif("CUDAExecutionProvider" in ort.get_available_providers(), reason="CUDA is available here")
def test_asking_for_cuda_without_it_says_how_to_get_it(tmp_path, capsys):
    model = _colour_model(tmp_path / "m.onnx")
    code, err = _run_cli(capsys, ["predict", str(model), *_images(tmp_path, "r"), "--provider", "cuda"])
    assert code == 2 and "Provider 'cuda' is not available" in err and "autotransfer[gpu]" in err


def test_cli_formats_and_provider_line(tmp_path, capsys):
    model, paths = _colour_model(tmp_path / "m.onnx"), _images(tmp_path, "gb")
    assert main(["predict", str(model), *paths, "--format", "csv", "--provider", "cpu"]) == 0
    out, err = capsys.readouterr()
    assert out.splitlines()[0] == "path,class,probability" and out.splitlines()[1].startswith(f"{paths[0]},g,")
    assert "3 classes, 8px, on CPUExecutionProvider" in err
    assert main(["predict", str(model), *paths]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split("|")[1:4] == [" path" + " " * (len(paths[0]) - 3), " class ", " probability "]
    assert len(table) == 2 + len(paths) and "| b     |" in table[-1]


def test_predict_never_imports_torch_onnx_or_optuna(tmp_path):
    """The GPU image installs no torch: the whole predict path must run without it."""
    model, paths = _colour_model(tmp_path / "m.onnx"), _images(tmp_path, "rg")
    code = ("import sys; from autotransfer.cli import main; rc = main(['predict', *sys.argv[1:], '--format', 'json']);"
            "heavy = [m for m in ('torch', 'onnx', 'optuna', 'pandas') if m in sys.modules];"
            "print(heavy, file=sys.stderr); sys.exit(rc or bool(heavy))")
    proc = subprocess.run([sys.executable, "-c", code, str(model), *paths], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert [r["class"] for r in json.loads(proc.stdout)] == ["r", "g"]
    assert np.isclose(json.loads(proc.stdout)[0]["probability"], np.exp(1) / (np.exp(1) + 2), atol=1e-3)
