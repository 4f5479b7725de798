"""What the commands print about an export: one summary line, a line per fp16/int8 variant, the model's path.

`print_export` is the whole block; `search` prints the same first line after "best: trial N" (its copy in
cli/search.py is to switch to this module).
"""

from __future__ import annotations

from pathlib import Path

from autotransfer.cli.common import describe_training, print_variants


def export_line(metrics: dict) -> str:
    """`val V  test T (onnxruntime, N images)  max |onnx - torch| D` and how the model was trained."""
    m = metrics
    return (f"val {m['val_accuracy']:.4f}  test {m['test_accuracy']:.4f} (onnxruntime, {m['test_images']} images)  "
            f"max |onnx - torch| {m['onnx_max_abs_diff']:.1e}{describe_training(m)}")


def print_export(label: str, metrics: dict, folder: Path) -> None:
    """`<label>: <export_line>`, then each variant (`print_variants`), then `model: <folder>/model.onnx`."""
    print(f"{label}: {export_line(metrics)}")
    print_variants(metrics)
    print(f"model: {folder / 'model.onnx'}")
