"""fp16 and int8 variants of an exported fp32 model, each checked on the test split against fp32.

fp16 halves the file and pays off on GPU providers; int8 (static, QDQ, calibrated on training images) is the
CPU deployment option. Both keep the fp32 model's input/output names, float32 I/O and metadata_props.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from autotransfer.errors import ConfigError
from autotransfer.progress import progress
from autotransfer.runtime import Rows, cpu_session, run_batched

logger = logging.getLogger(__name__)
PRECISIONS = ("fp32", "fp16", "int8")
MAX_ACCURACY_DROP = 0.01  # a variant losing more than 1 point of test accuracy is reported as degraded
CALIBRATION_IMAGES = 256  # training images used to calibrate int8 activation ranges
INT8_AGREEMENT_TARGET = 0.99  # top-1 agreement with fp32 on the check images that stops adding float convs
FLOAT_PREFIXES = (1, 3, 6, 9)  # first convs kept in float, tried in this order (see `_make_int8`)
BIAS_CORRECTION_IMAGES = 64  # training images whose per-channel output means the int8 biases are corrected to
_CALIBRATION_BATCH = 32


def variant_path(fp32_path: Path, precision: str) -> Path:
    """`model.onnx` -> `model.fp16.onnx` / `model.int8.onnx` (fp32 is the file itself)."""
    return fp32_path if precision == "fp32" else fp32_path.with_name(f"{fp32_path.stem}.{precision}.onnx")


def parse_precisions(values: Iterable[str] | None) -> tuple[str, ...]:
    """Flags like ["fp16,int8", "fp32"] -> ("fp32", "fp16", "int8"); fp32 is always exported first."""
    found = {"fp32"}
    for value in values or ():
        for item in str(value).split(","):
            item = item.strip().lower()
            if item and item not in PRECISIONS:
                raise ConfigError(f"Unknown precision {item!r}; choose from {', '.join(PRECISIONS)} "
                                  "(repeat --precision or separate with commas, e.g. --precision fp16,int8).")
            found.add(item or "fp32")
    return tuple(p for p in PRECISIONS if p in found)


class _Calibration:
    """onnxruntime CalibrationDataReader over a float32 array, in small batches."""

    def __init__(self, images: np.ndarray, input_name: str) -> None:
        self._batches = iter([images[i:i + _CALIBRATION_BATCH] for i in range(0, len(images), _CALIBRATION_BATCH)])
        self._name = input_name

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self._batches, None)
        return None if batch is None else {self._name: np.ascontiguousarray(batch, np.float32)}


def _make_fp16(fp32_path: Path, dest: Path) -> None:
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = convert_float_to_float16(onnx.load(str(fp32_path)), keep_io_types=True)
    onnx.save_model(model, str(dest))


def _make_int8(fp32_path: Path, dest: Path, calibration_images: np.ndarray,
               check_images: np.ndarray | Rows | None = None) -> dict[str, object]:
    """Static QDQ quantisation (per-channel int8 weights, uint8 activations, MinMax), mixed with float where it
    loses the fp32 model's predictions; returns what was kept in float and the agreement on `check_images`.

    Where the agreement goes (onnxruntime's qdq_loss_debug on Lite0/digits, signal-to-noise of each activation
    against fp32): it falls from 54 dB to 15-25 dB within the first blocks (per-tensor ranges of the early
    depthwise activations) and to 5 dB at the head's BatchNorm. So the head (everything after the last Conv) is
    always float, and a float prefix of the first convs grows along `FLOAT_PREFIXES` (at most half of the convs)
    until the top-1 agreement with fp32 on `check_images` (validation images, never the test split) reaches
    `INT8_AGREEMENT_TARGET`, else the prefix that agreed best is kept; without check images only the first conv
    is float. Each candidate's int8 biases are corrected (`correct_biases`) before it is checked.
    Quick Lite0 model, test agreement: 92.9 % before (reduce_range, first conv float); no reduce_range 95.9 %
    (this CPU has VNNI); + head in float 96.3 %; + 6 convs 99.6 %. Measured again 2026-12-03
    (benchmarks/onnx_latency.py): 9 convs chosen at 99.3 % on validation, 98.9 % on test; with the bias
    correction, see `correct_biases`.
    """
    import onnx
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if calibration_images is None or len(calibration_images) == 0:
        raise ConfigError("int8 needs calibration images (a few hundred training images, preprocessed).")
    pre = dest.with_name(f".{dest.stem}.pre.onnx")
    kept = dest.with_name(f".{dest.stem}.best.onnx")  # the best candidate so far, so it is never made twice
    root = logging.getLogger()
    level, root.level = root.level, logging.ERROR  # ORT warns on the root logger about 1-D (BatchNorm) weights
    try:
        # ONNX shape inference suffices for a CNN with static C/H/W; the symbolic pass (for transformers) needs
        # sympy and fails on the Concat of avgmax pooling.
        quant_pre_process(str(fp32_path), str(pre), skip_symbolic_shape=True)
        graph = onnx.load(str(pre), load_external_data=False).graph
        convs = [i for i, n in enumerate(graph.node) if n.op_type == "Conv"]
        head = [n.name for n in graph.node[convs[-1] + 1:]] if convs else []
        reference = None if check_images is None else _top1(pre, check_images)
        best: dict[str, object] = {}
        # at most half of the convs in float: an int8 variant that is mostly float would be no int8 variant
        prefixes = sorted({min(p, max(1, len(convs) // 2)) for p in FLOAT_PREFIXES})
        for prefix in prefixes if reference is not None else prefixes[:1]:
            excluded = [graph.node[i].name for i in convs[:prefix]] + head
            _quantize(pre, dest, calibration_images[:CALIBRATION_IMAGES], graph.input[0].name, excluded)
            correct_biases(pre, dest, calibration_images[:BIAS_CORRECTION_IMAGES])
            agreement = None if reference is None else float((_top1(dest, check_images) == reference).mean())
            found = {"float_convs": prefix, "float_nodes": len(excluded),
                     "check_agreement": agreement}
            if agreement is None or agreement >= INT8_AGREEMENT_TARGET:
                return found
            if not best or agreement > best["check_agreement"]:
                best = found
                shutil.copyfile(dest, kept)
        kept.replace(dest)
        return best
    finally:
        root.setLevel(level)
        pre.unlink(missing_ok=True)
        kept.unlink(missing_ok=True)


def _quantize(pre: Path, dest: Path, images: np.ndarray, input_name: str, excluded: list[str]) -> None:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    quantize_static(str(pre), str(dest), _Calibration(images, input_name), quant_format=QuantFormat.QDQ,
                    per_channel=True, reduce_range=not has_vnni(), activation_type=QuantType.QUInt8,
                    weight_type=QuantType.QInt8, calibrate_method=CalibrationMethod.MinMax,
                    nodes_to_exclude=excluded)


def correct_biases(fp32_path: Path, int8_path: Path, images: np.ndarray) -> int:
    """Empirical bias correction of the int8 model at `int8_path`, in place; returns how many convs it corrected.

    Rounding weights and activations shifts the mean of each conv's output channels, and the shifts add up
    along the network. Conv by conv, in graph order (so each sees the corrections before it), the int32 bias
    is moved by the difference between the fp32 and int8 per-channel output means over `images` (training
    images; Nagel et al. 2019, "Data-Free Quantization Through Weight Equalization and Bias Correction").
    It costs one int8 pass over `images` up to each quantised conv (Lite0 has 49 convs).
    Measured 2026-12-03 on quick models (Lite0 frozen, a linear head) of four data sets: top-1 agreement with fp32
    on the test split, without -> with the correction (float prefix chosen on validation, see `_make_int8`):
    digits 98.88 -> 100.00 % (6 float convs instead of 9), glyphs 86.15 -> 90.38 %, photo_patches
    96.00 -> 97.00 %, textures 100.00 -> 100.00 %.
    """
    import onnx
    from onnx import numpy_helper

    fp32, model = onnx.load(str(fp32_path)), onnx.load(str(int8_path))
    initializers = {t.name: t for t in model.graph.initializer}
    fp32_outputs = {n.name: n.output[0] for n in fp32.graph.node if n.op_type == "Conv"}
    # a quantised conv reads its bias from DequantizeLinear(<bias>_quantized, <bias>_quantized_scale)
    convs = [n for n in model.graph.node if n.op_type == "Conv" and len(n.input) > 2
             and f"{n.input[2]}_quantized" in initializers and n.name in fp32_outputs]
    if not convs:
        return 0
    targets = _channel_means(fp32, [fp32_outputs[n.name] for n in convs], images)
    info = np.iinfo(np.int32)
    with progress(len(convs), "export: int8 bias correction", "convs") as shown:
        for conv, target in zip(convs, targets, strict=True):
            (got,) = _channel_means(model, [conv.output[0]], images)
            bias = initializers[f"{conv.input[2]}_quantized"]
            scale = numpy_helper.to_array(initializers[f"{conv.input[2]}_quantized_scale"]).astype(np.float64)
            moved = numpy_helper.to_array(bias).astype(np.int64) + np.round((target - got) / scale).astype(np.int64)
            bias.CopyFrom(numpy_helper.from_array(np.clip(moved, info.min, info.max).astype(np.int32), bias.name))
            shown.update(1)
    onnx.save_model(model, str(int8_path))
    return len(convs)


def _channel_means(model, tensors: list[str], images: np.ndarray) -> list[np.ndarray]:
    """Per-channel means of `tensors` ([N, C, H, W] activations of the onnx `model`) over `images`."""
    import onnx
    import onnxruntime as ort

    # onnxruntime runs every node whatever is fetched: keep only the nodes the tensors depend on (the graph's
    # nodes are in topological order), which halves a bias correction's passes on average
    needed, nodes = set(tensors), []
    for node in reversed(model.graph.node):
        if needed.intersection(node.output):
            nodes.append(node)
            needed.update(node.input)
    graph = onnx.helper.make_graph(nodes[::-1], model.graph.name, list(model.graph.input),
                                   [onnx.helper.make_tensor_value_info(t, onnx.TensorProto.FLOAT, None)
                                    for t in tensors],
                                   [t for t in model.graph.initializer if t.name in needed])
    pruned = onnx.helper.make_model(graph, opset_imports=model.opset_import, ir_version=model.ir_version)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # keep every conv's output
    session = ort.InferenceSession(pruned.SerializeToString(), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    sums, counts = [0.0] * len(tensors), [0] * len(tensors)
    for start in range(0, len(images), _CALIBRATION_BATCH):
        batch = np.ascontiguousarray(images[start:start + _CALIBRATION_BATCH], np.float32)
        for i, out in enumerate(session.run(tensors, {name: batch})):
            sums[i] = sums[i] + out.astype(np.float64).sum(axis=(0, 2, 3))
            counts[i] += out.size // out.shape[1]
    return [s / n for s, n in zip(sums, counts, strict=True)]


def has_vnni(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    """Whether this CPU has VNNI (or AMX) int8 dot products, read from Linux's /proc/cpuinfo (else False).

    Without them onnxruntime's u8*s8 kernels can saturate their 16-bit sums, so weights are quantised to 7 bits
    (`reduce_range`), as its CPU guidance says. Measured on the tiny test CNN's int8 variant on an AVX2-only CPU:
    top-1 agreement with fp32 0.937 with 8-bit weights, at least 0.95 with 7-bit ones; with VNNI, 8-bit weights
    agreed better (quick Lite0 model: 95.9 % against 92.9 %). The agreement is checked on the machine that
    exports; an int8 file made with VNNI and run on a CPU without it may lose predictions.
    """
    try:
        flags = cpuinfo.read_text()
    except OSError:
        return False
    return any(f in flags.split() for f in ("avx512_vnni", "avx_vnni", "amx_int8"))


def _float32(x: np.ndarray | Rows) -> np.ndarray | Rows:
    """An array as contiguous float32; `preprocess.NormalisedImages` gives float32 rows by the slice already."""
    return np.ascontiguousarray(x, np.float32) if isinstance(x, np.ndarray) else x


def _top1(path: Path, images: np.ndarray | Rows) -> np.ndarray:
    return run_batched(cpu_session(path), _float32(images)).argmax(1)


def make_variant(fp32_path: Path, precision: str, calibration_images: np.ndarray | None = None,
                 check_images: np.ndarray | Rows | None = None) -> Path:
    """Write the `precision` variant of `fp32_path` beside it and return its path.

    `calibration_images`: preprocessed float32 [N,3,S,S] TRAIN images (int8 only; test images would leak).
    `check_images`: preprocessed validation images on which int8 must keep fp32's predictions (see `_make_int8`).
    """
    if precision not in PRECISIONS:
        raise ConfigError(f"Unknown precision {precision!r}; choose from {', '.join(PRECISIONS)}.")
    dest = variant_path(fp32_path, precision)
    if precision == "fp16":
        _make_fp16(fp32_path, dest)
    elif precision == "int8":
        mixed = _make_int8(fp32_path, dest, calibration_images, check_images)
        logger.info("int8 mixed precision of %s: %s", fp32_path.name, mixed)
    return dest


def check_variant(variant: Path, fp32_path: Path, x: np.ndarray | Rows, y: Sequence[int] | np.ndarray, *,
                  max_drop: float = MAX_ACCURACY_DROP) -> dict[str, object]:
    """Test-split accuracy of `variant` and its top-1 agreement with fp32, both through onnxruntime (CPU).

    `degraded` is True when it is more than `max_drop` (absolute) less accurate than fp32.
    """
    x = _float32(x)
    y = np.asarray(y)
    outputs = []
    for path in (fp32_path, variant):
        with progress(len(x), f"export: test split through {path.name}", "images") as shown:
            outputs.append(run_batched(cpu_session(path), x, on_batch=shown.update).argmax(1))
    ref, got = outputs
    accuracy, fp32_accuracy = float((got == y).mean()), float((ref == y).mean())
    drop = fp32_accuracy - accuracy
    if drop > max_drop:
        logger.warning("%s loses %.1f points of test accuracy against fp32", variant.name, 100 * drop)
    return {"file": variant.name, "test_accuracy": accuracy, "top1_agreement": float((got == ref).mean()),
            "accuracy_drop": drop, "degraded": bool(drop > max_drop), "size_bytes": variant.stat().st_size}
