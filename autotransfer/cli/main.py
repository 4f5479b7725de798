"""The `autotransfer` entry point: one sub-command per class, user mistakes as one line and exit code 2."""

from __future__ import annotations

import argparse
import inspect
import logging
import sys

from autotransfer import __version__
from autotransfer.cli.catalog import Backbones, Datasets
from autotransfer.cli.common import Command, Parser
from autotransfer.cli.predict import Predict
from autotransfer.cli.recommend import Recommend
from autotransfer.cli.results import Export, Studies, WriteReport
from autotransfer.cli.search import Search
from autotransfer.errors import EXIT_USAGE, AutotransferError

TRAINING_STACK = {"torch", "torchvision", "optuna", "onnx", "onnxscript", "pandas", "sklearn", "tqdm"}

COMMANDS: dict[str, type[Command]] = {
    "search": Search, "recommend": Recommend, "report": WriteReport, "export": Export, "studies": Studies,
    "predict": Predict, "backbones": Backbones, "datasets": Datasets,
}


def build_parser() -> argparse.ArgumentParser:
    description = "Search how to transfer a pretrained CNN to your images; ship the winner as ONNX."
    parser = Parser(prog="autotransfer", description=description)
    parser.add_argument("--version", action="version", version=f"autotransfer {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, command_type in COMMANDS.items():
        doc = inspect.getdoc(command_type) or ""
        p = sub.add_parser(name, help=doc.splitlines()[0], description=doc,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")
        command = command_type()
        command.add_arguments(p)
        p.set_defaults(handler=command)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    debug = getattr(args, "debug", False)
    logging.basicConfig(level=logging.DEBUG if debug else logging.WARNING, format="%(levelname)s: %(message)s")
    try:
        if args.command != "predict":  # predict also runs in the lean inference image, without optuna or torch
            import optuna

            # Our own per-trial lines say what failed and why; Optuna's warnings would repeat it with a traceback.
            optuna.logging.set_verbosity(optuna.logging.DEBUG if debug else optuna.logging.ERROR)
        return args.handler.run(args)
    except AutotransferError as e:
        if debug:
            raise
        print(f"autotransfer: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except ModuleNotFoundError as e:
        if debug or e.name not in TRAINING_STACK:
            raise
        print(f"autotransfer: error: `{args.command}` needs {e.name}, which this install lacks (an inference-only "
              "install such as the Docker image runs only `predict`); `pip install autotransfer` for everything.",
              file=sys.stderr)
        return EXIT_USAGE
