"""Flags and argument types shared by the commands: every bad value fails in one line that names the fix."""

from __future__ import annotations

import argparse
from pathlib import Path

from autotransfer.defaults import DEFAULT_REFITS, DEVICES, IMBALANCE_RATIO, METRICS


def int_at_least(name: str, example: int, minimum: int = 1):
    """An argparse type for a count of at least `minimum`; the error shows `example` as a sensible value."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be a whole number, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{name} must be at least {minimum}, got {value}; e.g. {name} {example}")
        return value

    return parse


def parse_size(text: str) -> int:
    """'4G', '512M', '1.5GB' or a plain number of bytes -> bytes."""
    t = text.strip().upper().removesuffix("B").removesuffix("I")
    scale = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}.get(t[-1:], 1)
    number = t[:-1] if scale > 1 else t
    try:
        value = float(number) * scale
    except ValueError:
        raise ValueError(f"not a size: {text!r} (use e.g. 4G or 512M)") from None
    if value <= 0:
        raise ValueError(f"size must be positive, got {text!r}")
    return int(value)


def size_argument(name: str):
    def parse(text: str) -> int:
        try:
            return parse_size(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(f"{name}: {e}") from None

    return parse


def add_data_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags shared by the commands that read data through a backbone (search, recommend)."""
    parser.add_argument("--image-size", type=int_at_least("--image-size", 64), default=None,
                        help="input size in pixels (default: per data set, 64 for digits)")
    parser.add_argument("--cache-memory", type=size_argument("--cache-memory"), default="4G",
                        help="memory for decoded images (at most half) and cached activations; beyond it float16, "
                             "then memory-mapped files in --out (default: 4G)")
    parser.add_argument("--cache-disk", type=size_argument("--cache-disk"), default="50G",
                        help="disk for the activation cache and images past --cache-memory; a search that needs "
                             "more stops before writing anything (default: 50G)")
    parser.add_argument("--device", choices=DEVICES, default="auto",
                        help="where trials train; cuda uses bf16 autocast (default: auto)")


def add_refit_argument(parser: argparse.ArgumentParser) -> None:
    """`--refit N`: how the exported model is trained (see `autotransfer.refit`)."""
    parser.add_argument("--refit", type=int_at_least("--refit", DEFAULT_REFITS, minimum=0), default=DEFAULT_REFITS,
                        metavar="N", help="train the chosen strategy N times on train+val (seeds seed..seed+N-1) and "
                                          "export the average of their probabilities; 0 exports the trial as "
                                          f"searched, trained on train only (default: {DEFAULT_REFITS})")
    parser.add_argument("--distill", action=argparse.BooleanOptionalAction, default=True,
                        help="with several refits, train one student from their ensemble and export it, unless it "
                             "loses more than half a point of test accuracy to the ensemble; --no-distill exports "
                             "the ensemble (default: on)")


def add_max_steps_argument(parser: argparse.ArgumentParser) -> None:
    """`--max-steps N`: a fine-tune's optimizer steps, instead of the data-derived ladder (see `fidelity.py`)."""
    parser.add_argument("--max-steps", type=int_at_least("--max-steps", 300), default=None, metavar="N",
                        help="optimizer steps of a fine-tuning trial (default: from the training set size: at "
                             "least 300 steps of 32 images and 3 epochs, at most 50 epochs)")


def add_study_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags that find an existing study, with `search`'s defaults (studies/<name>/study.db)."""
    parser.add_argument("--study-name", default=None,
                        help="default: the storage's only study, else 'digits' (search's default)")
    parser.add_argument("--storage", default=None, help="Optuna storage URL (default: SQLite in --out)")
    parser.add_argument("--out", type=Path, default=None, help="the study's output folder "
                        "(default: studies/<study-name>, as for search)")


def add_precision_argument(parser: argparse.ArgumentParser) -> None:
    """`--precision fp32|fp16|int8` (repeatable, comma-separated); parse the result with `parse_precisions`."""
    parser.add_argument("--precision", action="append", default=None, metavar="fp32|fp16|int8",
                        help="also write model.fp16.onnx / model.int8.onnx, each checked against fp32 on the test "
                             "split (repeat or comma-separate; default: fp32 only)")


def add_metric_argument(parser: argparse.ArgumentParser) -> None:
    """`--metric accuracy|balanced_accuracy|macro_f1`: the study's objective (see `autotransfer.metrics`)."""
    parser.add_argument("--metric", choices=METRICS, default=None,
                        help="validation metric the search maximises (default: balanced_accuracy when the largest "
                             f"train class has more than {IMBALANCE_RATIO:g}x the images of the smallest, else "
                             "accuracy; a resumed study keeps its metric)")


def artifacts_location(text: str) -> str:
    """argparse type of `--artifacts`: a folder or s3://bucket (see `autotransfer.artifacts.check_location`)."""
    from autotransfer.artifacts import check_location
    from autotransfer.errors import ConfigError

    try:
        return check_location(text)
    except ConfigError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def add_artifacts_argument(parser: argparse.ArgumentParser) -> None:
    """`--artifacts DIR|s3://bucket`: the artifact store of the study's checkpoints and exports."""
    parser.add_argument("--artifacts", type=artifacts_location, default=None, metavar="DIR|s3://BUCKET",
                        help="artifact store for the best trials' checkpoints and the exported ONNX files, so any "
                             "machine exports and reports without training again (default: as recorded in the study, "
                             "else <out>/artifacts for a SQLite study; a shared storage needs one all machines see)")
