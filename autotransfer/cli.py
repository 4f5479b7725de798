"""Command line: `autotransfer <command>`; each command is a small class with its own help.

A user's mistake (AutotransferError) prints one line and exits with 2; `--debug` shows the traceback.
"""

from __future__ import annotations

import argparse
import inspect
import json
import logging
import shutil
import sys
from pathlib import Path

from autotransfer import __version__
from autotransfer.errors import AutotransferError, ConfigError
from autotransfer.precision import add_precision_argument, parse_precisions

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
_TRAINING_STACK = {"torch", "torchvision", "optuna", "onnx", "onnxscript", "pandas", "sklearn", "tqdm"}


class _Command:
    """Base: `add_arguments` declares flags, `run` does the work and returns an exit code."""

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        pass

    def run(self, args: argparse.Namespace) -> int:
        raise NotImplementedError


def _positive_int(name: str):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be a whole number, got {text!r}") from None
        if value < 1:
            raise argparse.ArgumentTypeError(f"{name} must be at least 1, got {value}; e.g. {name} 50")
        return value

    return parse


class _Search(_Command):
    """Search how to transfer a pretrained backbone to DATA; export the best model to ONNX.

    DATA is a folder of class folders (optionally split into train/ val/ test/), a CSV of path,label, or
    an embedded data set (`autotransfer datasets`). Rerunning the same command continues the study up to
    the budget.
    """

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("data", nargs="?", default="digits", help="folder, CSV or embedded name (default: digits)")
        parser.add_argument("--backbone", default="efficientnet_lite0", help="see `autotransfer backbones`")
        parser.add_argument("--weights", default=None, help="state dict for the backbone (default: bundled/cache)")
        parser.add_argument("--budget", type=_positive_int("--budget"), default=50,
                            help="finished trials in the study (default: 50)")
        parser.add_argument("--study-name", default=None, help="default: the data set's name")
        parser.add_argument("--storage", default=None, help="Optuna storage URL (default: SQLite in --out)")
        parser.add_argument("--out", type=Path, default=None, help="output folder (default: studies/<study-name>)")
        parser.add_argument("--timeout", type=float, default=None, help="stop starting trials after this many seconds")
        parser.add_argument("--seed", type=int, default=0, help="seed of split, sampler and training (default: 0)")
        parser.add_argument("--max-epochs", type=_positive_int("--max-epochs"), default=6,
                            help="most epochs of a fine-tuning trial (default: 6)")
        parser.add_argument("--image-size", type=_positive_int("--image-size"), default=None,
                            help="input size in pixels (default: per data set, 64 for digits)")
        add_precision_argument(parser)

    def run(self, args: argparse.Namespace) -> int:
        from autotransfer.backbones import get_backbone
        from autotransfer.data import load_data
        from autotransfer.features import ActivationCache
        from autotransfer.study import StudyConfig, default_storage

        precision = parse_precisions(args.precision)  # before any work: a typo must not cost a search
        data = load_data(args.data, image_size=args.image_size, seed=args.seed)
        backbone = get_backbone(args.backbone, args.weights)
        name = args.study_name or data.name
        out = args.out or Path("studies") / name
        created = not out.exists()
        try:
            out.mkdir(parents=True, exist_ok=True)
            probe = out / ".write-test"
            probe.write_text("")
            probe.unlink()
        except OSError as e:
            raise ConfigError(f"Output folder {str(out)!r} is not writable ({e.strerror}); pass --out with a "
                              "folder you can write to.") from None
        config = StudyConfig(study_name=name, storage=args.storage or default_storage(out), out=out,
                             budget=args.budget, seed=args.seed, max_epochs=args.max_epochs, timeout=args.timeout)
        try:
            return _run_search(config, backbone, ActivationCache(backbone, data), precision)
        except AutotransferError:
            if created and not any(out.glob("checkpoints/*")):
                shutil.rmtree(out, ignore_errors=True)
            raise


def _run_search(config, backbone, cache, precision=("fp32",)) -> int:
    import optuna
    from tqdm.auto import tqdm

    from autotransfer.pipeline import finish_study
    from autotransfer.report import leaderboard, to_markdown, write_leaderboard
    from autotransfer.strategy import Strategy
    from autotransfer.study import FINISHED, best_trial, finished_trials, open_study, run_study

    study = open_study(config, backbone=backbone, data_fingerprint=cache.data.fingerprint)
    data = cache.data
    print(f"autotransfer {__version__}: {data.name} ({len(data.labels)} images, {len(data.classes)} classes, "
          f"{data.image_size}px; train/val/test {len(data.split['train'])}/{len(data.split['val'])}/"
          f"{len(data.split['test'])}), backbone {backbone.name} ({backbone.num_groups} groups)")
    print(f"study {config.study_name!r} in {config.storage}")
    bar = tqdm(total=config.budget, initial=min(config.budget, finished_trials(study)), unit="trial",
               dynamic_ncols=True, file=sys.stdout)

    def on_trial(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        if trial.state in FINISHED:
            bar.update(1)
        described = Strategy.from_dict(trial.user_attrs["strategy"]).describe(backbone.group_names) \
            if "strategy" in trial.user_attrs else ""
        value = f"{trial.value:.4f}" if trial.value is not None else "  -   "
        reason = trial.user_attrs.get("fail_reason")
        bar.write(f"trial {trial.number:3d} {trial.state.name.lower():8s} val {value}  "
                  f"{trial.user_attrs.get('seconds', 0):6.1f}s  {described}{f'  [{reason}]' if reason else ''}")
        best = best_trial(study)
        if best is not None:
            bar.set_postfix_str(f"best {best.value:.4f} (trial {best.number})")

    try:
        study = run_study(config, backbone, cache, study=study, on_trial=on_trial)
    except KeyboardInterrupt:
        bar.close()
        write_leaderboard(leaderboard(study), config.out)
        print(f"\nInterrupted. {finished_trials(study)} of {config.budget} trials finished and are stored in "
              f"{config.storage}; run the same command again to continue.", file=sys.stderr)
        return EXIT_INTERRUPTED
    bar.close()
    result = finish_study(study, config, backbone, cache, precision=precision)
    board = leaderboard(study)
    cols = ["rank", "trial", "state", "val_accuracy", "tap", "freeze", "pool", "head", "optimizer", "lr",
            "lr_ratio", "epochs_run", "seconds"]
    print("\nTop 10 strategies:")
    print(to_markdown(board[cols].head(10)))
    m = result.metrics
    print(f"\nbest: trial {m['trial']}  val {m['val_accuracy']:.4f}  test {m['test_accuracy']:.4f} (onnxruntime, "
          f"{m['test_images']} images)  max |onnx - torch| {m['onnx_max_abs_diff']:.1e}"
          f"{'  (retrained from its strategy)' if result.retrained else ''}")
    print_variants(m)
    print(f"model: {result.folder / 'model.onnx'}\nleaderboard: {config.out / 'leaderboard.md'} "
          f"(and .csv)\nfiles: {result.folder}/ (metrics.json, strategy.json, classes.json, preprocess.json)")
    return 0


def print_variants(metrics: dict) -> None:
    """One line per fp16/int8 variant in an export's metrics; a degraded one says so."""
    for p, v in metrics.get("variants", {}).items():
        flag = f"  DEGRADED: loses {100 * v['accuracy_drop']:.1f} points (> 1)" if v["degraded"] else ""
        print(f"{p}: {v['file']}  test {v['test_accuracy']:.4f}  top-1 agreement with fp32 "
              f"{v['top1_agreement']:.4f}  {v['size_bytes'] / 1e6:.1f} MB{flag}")


class _Predict(_Command):
    """Classify images with an exported model.onnx (preprocessing is read from the model).

    Runs on TensorRT, CUDA or the CPU (--provider auto tries them in that order), in batches of --batch-size.
    Imports no torch: a `pip install --no-deps autotransfer onnxruntime-gpu numpy pillow` install is enough.
    """

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        from autotransfer.runtime import PROVIDER_CHOICES

        parser.add_argument("model", type=Path, help="an exported model.onnx (or model.fp16.onnx / model.int8.onnx)")
        parser.add_argument("images", nargs="+", help="image files")
        parser.add_argument("--format", choices=("table", "csv", "json"), default="table")
        parser.add_argument("--batch-size", type=_positive_int("--batch-size"), default=64)
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


class _Backbones(_Command):
    """List the backbones, their number of layer groups and where their weights come from."""

    def run(self, args: argparse.Namespace) -> int:
        from autotransfer.backbones import list_backbones

        for name, (groups, source) in list_backbones().items():
            print(f"{name:20s} {groups:3d} groups   weights: {source}")
        return 0


class _Datasets(_Command):
    """List the embedded data sets (usable as DATA without any files)."""

    def run(self, args: argparse.Namespace) -> int:
        from autotransfer.data import EMBEDDED

        for name, (_, size, description) in EMBEDDED.items():
            print(f"{name:10s} {size}px  {description}")
        return 0


_COMMANDS: dict[str, type[_Command]] = {
    "search": _Search, "predict": _Predict, "backbones": _Backbones, "datasets": _Datasets,
}


def build_parser() -> argparse.ArgumentParser:
    description = "Search how to transfer a pretrained CNN to your images; ship the winner as ONNX."
    parser = argparse.ArgumentParser(prog="autotransfer", description=description)
    parser.add_argument("--version", action="version", version=f"autotransfer {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, command_type in _COMMANDS.items():
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
        if debug or e.name not in _TRAINING_STACK:
            raise
        print(f"autotransfer: error: `{args.command}` needs {e.name}, which this install lacks (an inference-only "
              "install such as the Docker image runs only `predict`); `pip install autotransfer` for everything.",
              file=sys.stderr)
        return EXIT_USAGE
