import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from autotransfer.cli import main
from autotransfer.errors import ConfigError
from autotransfer.precision import check_variant, parse_precisions, variant_path
from autotransfer.predict import Predictor
from autotransfer.preprocess import normalise
from autotransfer.runtime import cpu_session, read_metadata
from tests.conftest import TINY


@pytest.fixture(scope="module")
def best(tmp_path_factory):
    """One tiny search exported in all three precisions (shared: a search is the slow part)."""
    out = tmp_path_factory.mktemp("precision") / "run"
    assert main(["search", "digits", "--backbone", TINY, "--image-size", "16", "--budget", "2", "--max-steps", "20",
                 "--out", str(out), "--precision", "fp16", "--precision", "int8"]) == 0
    return out / "best"


def test_parse_precisions_accepts_repeats_and_commas_and_always_keeps_fp32():
    assert parse_precisions(None) == ("fp32",)
    assert parse_precisions(["int8,fp16"]) == ("fp32", "fp16", "int8")
    assert parse_precisions(["FP16", "fp32", "fp16"]) == ("fp32", "fp16")
    with pytest.raises(ConfigError, match="Unknown precision 'bf16'"):
        parse_precisions(["fp16,bf16"])
    assert variant_path(Path("a/model.onnx"), "int8").name == "model.int8.onnx"


def test_unknown_precision_fails_before_the_search(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["search", "digits", "--backbone", TINY, "--out", str(out), "--precision", "int4"]) == 2
    err = capsys.readouterr().err
    assert "Unknown precision 'int4'" in err and len(err.strip().splitlines()) == 1 and not out.exists()


@pytest.fixture(scope="module")
def fp32_on_test(best, digits16):
    """(test images as the model takes them, labels, the fp32 model's predictions), all through `Predictor`."""
    fp32 = Predictor(best / "model.onnx", provider="cpu")
    x, y = digits16.subset("test")
    x = normalise(x, fp32.mean, fp32.std).numpy()
    return x, y.numpy(), fp32.logits(x).argmax(1)


def test_search_writes_each_variant_with_its_checks(best, fp32_on_test):
    """metrics.json's numbers are what the files do: measured again here through `Predictor`, not export's code."""
    metrics = json.loads((best / "metrics.json").read_text())
    assert metrics["precisions"] == ["fp32", "fp16", "int8"]
    assert set(metrics["variants"]) == {"fp16", "int8"}
    fp16, int8 = metrics["variants"]["fp16"], metrics["variants"]["int8"]
    assert fp16["file"] == "model.fp16.onnx" and int8["file"] == "model.int8.onnx"
    x, y, reference = fp32_on_test
    assert len(y) == metrics["test_images"]
    assert metrics["test_accuracy"] == pytest.approx(float((reference == y).mean()))
    for v in (fp16, int8):
        got = Predictor(best / v["file"], provider="cpu").logits(x).argmax(1)
        assert v["test_accuracy"] == pytest.approx(float((got == y).mean()))
        assert v["top1_agreement"] == pytest.approx(float((got == reference).mean()))
        assert v["accuracy_drop"] == pytest.approx(metrics["test_accuracy"] - float((got == y).mean()))
        assert v["size_bytes"] == (best / v["file"]).stat().st_size < (best / "model.onnx").stat().st_size
    assert fp16["top1_agreement"] >= 0.99 and int8["top1_agreement"] >= 0.95


def test_variants_keep_io_types_metadata_and_are_really_converted(best):
    fp32_meta = read_metadata(cpu_session(best / "model.onnx"))
    for name in ("model.fp16.onnx", "model.int8.onnx"):
        session = cpu_session(best / name)
        assert session.get_inputs()[0].type == "tensor(float)" and session.get_outputs()[0].name == "logits"
        meta = read_metadata(session)
        assert {k: meta[k] for k in ("class_names", "input_size", "mean", "std")} == \
               {k: fp32_meta[k] for k in ("class_names", "input_size", "mean", "std")}
    fp16 = onnx.load(str(best / "model.fp16.onnx"))
    assert any(t.data_type == onnx.TensorProto.FLOAT16 for t in fp16.graph.initializer)
    int8 = onnx.load(str(best / "model.int8.onnx"))
    ops = {n.op_type for n in int8.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    assert any(t.data_type == onnx.TensorProto.INT8 for t in int8.graph.initializer)


def test_predict_runs_every_variant(best, digits16, tmp_path):
    from PIL import Image

    x, _ = digits16.subset("test")
    paths = []
    for i in range(12):
        paths.append(tmp_path / f"{i}.png")
        Image.fromarray(x[i].permute(1, 2, 0).numpy()).save(paths[-1])
    results = {name: Predictor(best / name).predict(paths, batch_size=5)
               for name in ("model.onnx", "model.fp16.onnx", "model.int8.onnx")}
    classes = {name: [r["class"] for r in rows] for name, rows in results.items()}
    for variant in ("model.fp16.onnx", "model.int8.onnx"):  # a 2-epoch tiny model has some near-ties
        assert sum(a == b for a, b in zip(classes[variant], classes["model.onnx"], strict=True)) >= 10


def test_check_variant_reports_a_variant_that_loses_accuracy(best, fp32_on_test, tmp_path):
    broken = tmp_path / "model.broken.onnx"
    shutil.copy(best / "model.onnx", broken)
    model = onnx.load(str(broken))
    for gemm in (n for n in model.graph.node if n.op_type == "Gemm"):  # every member's head (refit ensemble)
        bias = next(t for t in model.graph.initializer if t.name == gemm.input[2])
        values = numpy_helper.to_array(bias).copy()
        values[0] += 1e3  # every image becomes class 0
        bias.CopyFrom(numpy_helper.from_array(values, bias.name))
    onnx.save_model(model, str(broken))
    x, y, reference = fp32_on_test
    out = check_variant(broken, best / "model.onnx", x, y)
    assert out["degraded"] is True and out["accuracy_drop"] > 0.5
    assert out["test_accuracy"] == pytest.approx(float(np.mean(y == 0)))
    assert out["top1_agreement"] == pytest.approx(float(np.mean(reference == 0)))
    drop = out["accuracy_drop"]
    assert check_variant(broken, best / "model.onnx", x, y, max_drop=drop)["degraded"] is False, "only a larger loss"
    assert check_variant(broken, best / "model.onnx", x, y, max_drop=drop - 0.01)["degraded"] is True


def test_an_identical_variant_loses_nothing(best, fp32_on_test, tmp_path):
    same = tmp_path / "model.same.onnx"
    shutil.copy(best / "model.onnx", same)
    x, y, reference = fp32_on_test
    out = check_variant(same, best / "model.onnx", x, y, max_drop=0.0)
    assert out == {"file": "model.same.onnx", "test_accuracy": pytest.approx(float((reference == y).mean())),
                   "top1_agreement": 1.0, "accuracy_drop": 0.0, "degraded": False, "size_bytes": same.stat().st_size}


def _float_convs(path: Path) -> int:
    """Convs of an int8 model that still run in float: their weights are not dequantized int8."""
    graph = onnx.load(str(path)).graph
    dequantized = {o for n in graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    return sum(n.input[1] not in dequantized for n in graph.node if n.op_type == "Conv")


def test_int8_keeps_convs_in_float_until_it_agrees_with_fp32_on_the_check_images(best, digits16, tmp_path,
                                                                                  monkeypatch):
    import autotransfer.precision as precision

    meta = read_metadata(cpu_session(best / "model.onnx"))
    prep = [normalise(digits16.subset(s)[0], tuple(meta["mean"]), tuple(meta["std"])).numpy() for s in ("train", "val")]
    fp32 = tmp_path / "model.onnx"
    shutil.copy(best / "model.onnx", fp32)
    dest = variant_path(fp32, "int8")

    plain = precision._make_int8(fp32, dest, prep[0])
    assert plain == {"float_convs": 1, "float_nodes": plain["float_nodes"], "check_agreement": None}
    assert _float_convs(dest) == 1, "without check images only the first conv (it sees raw pixels) stays float"
    graph = onnx.load(str(dest)).graph
    dequantized = {o for n in graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    head = [n for n in graph.node if n.op_type in ("Gemm", "MatMul")]
    assert head and not any(i in dequantized for n in head for i in n.input), "the head stays float"

    monkeypatch.setattr(precision, "INT8_AGREEMENT_TARGET", 0.0)
    assert precision._make_int8(fp32, dest, prep[0], prep[1])["float_convs"] == 1, "reached at once: stops"
    monkeypatch.setattr(precision, "INT8_AGREEMENT_TARGET", 1.01)  # never reached: every prefix, the best kept
    kept = precision._make_int8(fp32, dest, prep[0], prep[1])
    assert kept["float_convs"] == _float_convs(dest) and 0.5 < kept["check_agreement"] <= 1.0
    reference = cpu_session(fp32).run(["logits"], {"input": prep[1]})[0].argmax(1)
    got = cpu_session(dest).run(["logits"], {"input": prep[1]})[0].argmax(1)
    assert float((got == reference).mean()) == kept["check_agreement"], "the file is the one measured"


def test_weights_get_7_bits_unless_the_cpu_has_vnni(tmp_path):
    from autotransfer.precision import has_vnni

    flags = "flags\t\t: fpu sse2 avx2 fma"
    (tmp_path / "avx2").write_text(f"processor\t: 0\n{flags}\n")
    (tmp_path / "vnni").write_text(f"processor\t: 0\n{flags} avx512f avx512_vnni\n")
    assert not has_vnni(tmp_path / "avx2") and has_vnni(tmp_path / "vnni")
    assert not has_vnni(tmp_path / "missing"), "no /proc/cpuinfo (macOS, Windows): the safe 7-bit weights"


def test_bias_correction_moves_each_int8_conv_to_the_fp32_channel_means(best, digits16, tmp_path):
    """After `correct_biases`, each quantised conv's per-channel output mean over the correction images equals
    fp32's up to half a step of its int32 bias; on other images the gaps shrink too."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    import autotransfer.precision as precision

    meta = read_metadata(cpu_session(best / "model.onnx"))
    train, val = (normalise(digits16.subset(s)[0], tuple(meta["mean"]), tuple(meta["std"])).numpy()
                  for s in ("train", "val"))
    pre, dest = tmp_path / "pre.onnx", tmp_path / "model.int8.onnx"
    quant_pre_process(str(best / "model.onnx"), str(pre), skip_symbolic_shape=True)
    fp32 = onnx.load(str(pre))
    first_conv = next(n.name for n in fp32.graph.node if n.op_type == "Conv")
    precision._quantize(pre, dest, train[:256], "input", [first_conv])

    def gaps(images):
        model = onnx.load(str(dest))
        inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
        outputs = {n.name: n.output[0] for n in fp32.graph.node}
        convs = [n for n in model.graph.node if n.op_type == "Conv" and f"{n.input[2]}_quantized" in inits]
        want = precision._channel_means(fp32, [outputs[n.name] for n in convs], images)
        got = precision._channel_means(model, [n.output[0] for n in convs], images)
        steps = [inits[f"{n.input[2]}_quantized_scale"] for n in convs]
        return [np.abs(w - g) for w, g in zip(want, got, strict=True)], steps

    before, _ = gaps(val)
    corrected = precision.correct_biases(pre, dest, train[:64])
    after_same, steps = gaps(train[:64])
    after_other, _ = gaps(val)
    assert corrected == len(steps) >= 2  # the tiny CNN: every conv after the first
    assert all(np.all(gap <= step / 2 + 1e-5) for gap, step in zip(after_same, steps, strict=True))
    assert sum(g.mean() for g in after_other) < 0.7 * sum(g.mean() for g in before)
    kept = cpu_session(dest).get_modelmeta().custom_metadata_map.items()
    assert cpu_session(pre).get_modelmeta().custom_metadata_map.items() <= kept, "metadata survives the rewrite"
