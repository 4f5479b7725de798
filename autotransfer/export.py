"""Trained model -> self-describing ONNX file, verified against PyTorch with onnxruntime.

Input `input`: float32 [batch, 3, S, S], RGB scaled to 0..1 then normalised with the `mean`/`std` in the
metadata. Output `logits`: float32 [batch, classes]; softmax is left to the caller.
"""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch

from autotransfer.atomic import replacing_file
from autotransfer.errors import ExportError
from autotransfer.metrics import per_class_recall, score
from autotransfer.progress import progress
from autotransfer.runtime import Rows, batch_slices, cpu_session, read_metadata, run_batched  # noqa: F401 - re-exported

logger = logging.getLogger(__name__)
# Export fails when any |onnxruntime - PyTorch| logit difference (fp32, CPU) exceeds ATOL + RTOL * max |logit|.
# Measured on Lite0/digits: 4.7e-5 for a trained linear head (logits up to ~20); float summation order makes
# the difference grow with the logits' scale (2.6e-4 .. 4.7e-4 for untrained heads with logits up to ~120) and
# with the depth run in fp32: a fine-tune of every group (AdaBN, DANN; digits pair of `benchmarks/adapt.py`,
# 2026-12-07) differed by 4.1e-4 at logits up to 19, 2e-5 of their scale, which RTOL 1e-5 rejected and failed
# the whole export. PyTorch's own fp32 forward differs from float64 by 1e-5 of the scale on that model, so two
# fp32 implementations disagreeing by a few times that is summation order, not a wrong graph. A wrong graph
# (a stale BatchNorm statistic, a missing layer) moves logits by 1e-2 and more.
PARITY_ATOL = 1e-4
PARITY_RTOL = 1e-4


def export_onnx(model: torch.nn.Module, path: Path, *, image_size: int, metadata: dict[str, Any]) -> Path:
    """Export with a dynamic batch axis; every metadata value is stored as JSON text in metadata_props."""
    model = model.cpu().eval()
    example = torch.zeros(2, 3, image_size, image_size)  # batch >= 2: torch.export specialises size-1 dims
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(model, (example,), input_names=["input"], output_names=["logits"],
                                    dynamic_shapes=({0: "batch"},), dynamo=True, verbose=False)
    proto = program.model_proto
    onnx.helper.set_model_props(proto, {k: json.dumps(v) for k, v in metadata.items()})
    proto.doc_string = "autotransfer model: input float32 [batch,3,H,W] normalised RGB; output logits."
    onnx.checker.check_model(proto)
    with replacing_file(path) as tmp:
        onnx.save_model(proto, str(tmp))
    return path


def verify(model: torch.nn.Module, path: Path, x: torch.Tensor | Rows, y: torch.Tensor, *,
           batch_size: int = 64, atol: float = PARITY_ATOL, rtol: float = PARITY_RTOL,
           class_names: tuple[str, ...] | None = None) -> dict[str, Any]:
    """Run `x` (normalised images, or `preprocess.NormalisedImages`) through PyTorch and onnxruntime in batches of
    two sizes; return diff and ORT accuracy, balanced accuracy, macro F1 and per-class recall (keyed by
    `class_names`, default "0", "1", ...; null: no example).

    Raises ExportError when any logit differs by more than `atol + rtol * max |logit|`.
    """
    model = model.cpu().eval()
    sizes = [batch_size, 1] if len(x) > batch_size else [max(1, len(x) - 1), 1]  # both a full and a 1-row batch
    with progress(len(x), "export: test split through onnxruntime", "images") as shown:
        got = run_batched(cpu_session(path), x, sizes=sizes, on_batch=shown.update)
    ref = []
    with torch.no_grad(), progress(len(x), "export: test split through PyTorch (parity)", "images") as shown:
        for rows in batch_slices(len(x), sizes):
            ref.append(model(x[rows]))
            shown.update(len(ref[-1]))
    ref = torch.cat(ref).numpy()
    max_diff, scale = float(np.abs(ref - got).max()), float(np.abs(ref).max())
    correct = int((got.argmax(1) == y.numpy()).sum())
    agree = int((got.argmax(1) == ref.argmax(1)).sum())
    tolerance = atol + rtol * scale
    if max_diff > tolerance:
        raise ExportError(f"ONNX model {str(path)!r} differs from PyTorch by {max_diff:.2e} (> {tolerance:.1e} = "
                          f"{atol:.0e} + {rtol:.0e} x max |logit| {scale:.1f}) in its logits; rerun with --debug and "
                          "report the backbone and strategy.")
    predicted, classes = got.argmax(1), got.shape[1]
    names = class_names or tuple(str(i) for i in range(classes))
    return {"onnx_max_abs_diff": max_diff, "onnx_parity_tolerance": tolerance, "test_accuracy": correct / len(x),
            "top1_agreement": agree / len(x),
            "test_balanced_accuracy": score("balanced_accuracy", predicted, y.numpy(), classes),
            "test_macro_f1": score("macro_f1", predicted, y.numpy(), classes),
            "test_per_class_recall": dict(zip(names, per_class_recall(predicted, y.numpy(), classes), strict=True))}
