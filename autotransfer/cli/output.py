"""What the commands print about an export: one summary line, a line per fp16/int8 variant, the model's path.

`print_export` is the whole block; `search` prints `export_line` after "best: trial N", then `recall_line`.
"""

from __future__ import annotations

from pathlib import Path


def export_line(metrics: dict) -> str:
    """`val V  test T (onnxruntime, N images)  max |onnx - torch| D` and how the model was trained."""
    m = metrics
    metric = m.get("metric", "accuracy")
    score = "" if metric == "accuracy" else f" ({metric} {m['val_score']:.4f})"
    return (f"val {m['val_accuracy']:.4f}{score}  test {m['test_accuracy']:.4f} "
            f"(onnxruntime, {m['test_images']} images)  "
            f"max |onnx - torch| {m['onnx_max_abs_diff']:.1e}{describe_training(m)}")


def print_export(label: str, metrics: dict, folder: Path) -> None:
    """`<label>: <export_line>`, then each variant (`print_variants`), then `model: <folder>/model.onnx`."""
    print(f"{label}: {export_line(metrics)}")
    print_variants(metrics)
    if "test_per_class_recall" in metrics:
        from autotransfer.report import recall_line  # the predict-only image has no pandas or optuna

        print(recall_line(metrics))
    print(f"model: {folder / 'model.onnx'}")


def describe_training(metrics: dict) -> str:
    """How an exported model was trained, for the summary line."""
    refits = metrics.get("refits", 0)
    if metrics.get("refit_fallback"):
        return (f"\nrefit on train+val rejected ({metrics['refit_fallback']}); shipped the searched trial's own "
                "model, trained on train")
    distillation = metrics.get("distillation")
    if distillation and distillation["shipped"] == "student":
        return (f"  (one student distilled from {refits} refits on train+val: test "
                f"{distillation['student_test_accuracy']:.4f} against the ensemble's "
                f"{distillation['ensemble_test_accuracy']:.4f}, {distillation_choice(distillation)})")
    if distillation:
        return (f"  ({refits} refits on train+val, averaged)\nstudent refused, shipped the ensemble: "
                f"{distillation['why']}")
    if refits:
        return f"  ({refits} refit{'s' if refits > 1 else ''} on train+val)"
    return "  (retrained from its strategy)" if metrics.get("retrained") else ""


def distillation_choice(distillation: dict) -> str:
    mixup = ", inputs mixed" if distillation.get("mixup") else ""
    return f"T {distillation['temperature']:g}, alpha {distillation['alpha']:g}{mixup}, chosen on validation"


def print_variants(metrics: dict) -> None:
    """One line per fp16/int8 variant in an export's metrics; a degraded one says so."""
    for p, v in metrics.get("variants", {}).items():
        flag = f"  DEGRADED: loses {100 * v['accuracy_drop']:.1f} points (> 1)" if v["degraded"] else ""
        print(f"{p}: {v['file']}  test {v['test_accuracy']:.4f}  top-1 agreement with fp32 "
              f"{v['top1_agreement']:.4f}  {v['size_bytes'] / 1e6:.1f} MB{flag}")

