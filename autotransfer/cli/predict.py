"""`autotransfer predict`: classify images with an exported model; imports no torch."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from autotransfer.cli.arguments import int_at_least
from autotransfer.cli.common import Command


class Predict(Command):
    """Classify images with an exported model.onnx (preprocessing is read from the model).

    Runs on TensorRT, CUDA or the CPU (--provider auto tries them in that order), in batches of --batch-size.
    Imports no torch: a `pip install --no-deps autotransfer onnxruntime-gpu numpy pillow` install is enough.
    """

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        from autotransfer.runtime import PROVIDER_CHOICES

        parser.add_argument("model", type=Path, help="an exported model.onnx (or model.fp16.onnx / model.int8.onnx)")
        parser.add_argument("images", nargs="+", help="image files")
        parser.add_argument("--format", choices=("table", "csv", "json"), default="table")
        parser.add_argument("--batch-size", type=int_at_least("--batch-size", 64), default=64)
        parser.add_argument("--provider", choices=PROVIDER_CHOICES, default="auto",
                            help="onnxruntime execution provider (default: auto = tensorrt > cuda > cpu)")

    def run(self, args: argparse.Namespace) -> int:
        import csv

        from autotransfer.predict import Predictor

        predictor = Predictor(args.model, provider=args.provider)
        rows = predictor.predict(args.images, batch_size=args.batch_size)
        print(f"{args.model}: {len(predictor.classes)} classes, {predictor.image_size}px, on "
              f"{predictor.provider}", file=sys.stderr)
        if args.format == "json":
            print(json.dumps(rows, indent=2))
        elif args.format == "csv":
            writer = csv.DictWriter(sys.stdout, fieldnames=["path", "class", "probability"], lineterminator="\n")
            writer.writeheader()
            writer.writerows(rows)
        else:
            width = max(len("path"), *(len(r["path"]) for r in rows))
            print(f"| {'path':{width}} | class | probability |")
            print(f"|{'-' * (width + 2)}|-------|-------------|")
            for r in rows:
                print(f"| {r['path']:{width}} | {r['class']:5} | {r['probability']:11.4f} |")
        return 0
