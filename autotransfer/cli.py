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
from autotransfer.defaults import DEFAULT_MAX_EPOCHS
from autotransfer.errors import AutotransferError, ConfigError
from autotransfer.precision import add_precision_argument, parse_precisions

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
_TRAINING_STACK = {"torch", "torchvision", "optuna", "onnx", "onnxscript", "pandas", "sklearn", "tqdm"}


class _Parser(argparse.ArgumentParser):
    """Usage mistakes print one line that names the fix (the usage is one `--help` away), exit code 2."""

    def error(self, message: str):
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


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


def _size(name: str):
    def parse(text: str) -> int:
        from autotransfer.features import parse_size

        try:
            return parse_size(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(f"{name}: {e}") from None

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
        parser.add_argument("--max-epochs", type=_positive_int("--max-epochs"), default=DEFAULT_MAX_EPOCHS,
                            help=f"most epochs of a fine-tuning trial (default: {DEFAULT_MAX_EPOCHS})")
        parser.add_argument("--workers", type=_positive_int("--workers"), default=1,
                            help="worker processes on this machine, sharing the CPU threads (default: 1)")
        parser.add_argument("--heartbeat", type=_positive_int("--heartbeat"), default=None,
                            help="seconds between a running trial's heartbeats; a trial silent for 3 of them "
                                 "(its process died) is failed and run again (default: 10)")
        _add_data_arguments(parser)
        add_precision_argument(parser)

    def run(self, args: argparse.Namespace) -> int:
        from autotransfer.storage import DEFAULT_HEARTBEAT
        from autotransfer.study import StudyConfig, default_storage
        from autotransfer.workers import sigterm_as_interrupt

        precision = parse_precisions(args.precision)  # before any work: a typo must not cost a search
        backbone, cache, out, created = _prepare(args)
        name = args.study_name or cache.data.name
        config = StudyConfig(study_name=name, storage=args.storage or default_storage(out), out=out,
                             budget=args.budget, seed=args.seed, max_epochs=args.max_epochs, timeout=args.timeout,
                             device=args.device, heartbeat=args.heartbeat or DEFAULT_HEARTBEAT)
        shared = args.storage is not None and not args.storage.startswith("sqlite")  # other machines may join
        source = dict(data=args.data, image_size=cache.data.image_size, seed=args.seed, backbone=backbone.name,
                      weights=args.weights, group_names=backbone.group_names)
        try:
            with sigterm_as_interrupt():
                return _run_search(config, backbone, cache, workers=args.workers, reseed=shared, source=source,
                                   precision=precision)
        except AutotransferError:
            if created and not any(out.glob("checkpoints/*")):
                shutil.rmtree(out, ignore_errors=True)
            raise


def _add_data_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags shared by the commands that read data through a backbone (search, recommend)."""
    parser.add_argument("--image-size", type=_positive_int("--image-size"), default=None,
                        help="input size in pixels (default: per data set, 64 for digits)")
    parser.add_argument("--cache-memory", type=_size("--cache-memory"), default="4G",
                        help="memory for cached activations; beyond it float16, then memory-mapped disk "
                             "(default: 4G)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="where trials train; cuda uses bf16 autocast (default: auto)")


def _prepare(args: argparse.Namespace):
    """Load data and backbone, make the output folder, open the activation cache persisted in it."""
    from autotransfer.backbones import get_backbone
    from autotransfer.data import load_data
    from autotransfer.device import configure_threads, pick_device
    from autotransfer.features import ActivationCache

    pick_device(args.device)  # fail early on --device cuda without a GPU
    configure_threads()
    data = load_data(args.data, image_size=args.image_size, seed=args.seed)
    backbone = get_backbone(args.backbone, args.weights)
    out = args.out or Path("studies") / (getattr(args, "study_name", None) or data.name)
    created = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"Output folder {str(out)!r} is not writable ({e.strerror}); pass --out with a "
                          "folder you can write to.") from None
    return backbone, ActivationCache(backbone, data, folder=out / "cache", memory_limit=args.cache_memory), out, created


def trial_line(trial, backbone, best=None) -> str:
    """One line per finished trial: number, state, accuracy (and the best so far), seconds, strategy, why it failed."""
    from autotransfer.strategy import Strategy

    described = Strategy.from_dict(trial.user_attrs["strategy"]).describe(backbone.group_names) \
        if "strategy" in trial.user_attrs else ""
    value = f"{trial.value:.4f}" if trial.value is not None else "  -   "
    best_text = f" (best {best.value:.4f})" if best is not None else ""
    reason = trial.user_attrs.get("fail_reason")
    return (f"trial {trial.number:3d} {trial.state.name.lower():8s} val {value}{best_text}  "
            f"{trial.user_attrs.get('seconds', 0):6.1f}s  {described}{f'  [{reason}]' if reason else ''}")


def _run_search(config, backbone, cache, *, workers: int = 1, reseed: bool = False,
                source: dict | None = None, precision: tuple[str, ...] = ("fp32",)) -> int:
    import optuna
    from tqdm.auto import tqdm

    from autotransfer.device import threads_per_worker
    from autotransfer.pipeline import finish_study
    from autotransfer.report import leaderboard, to_markdown, write_leaderboard
    from autotransfer.studies import record_source
    from autotransfer.study import (
        FINISHED,
        best_trial,
        default_storage,
        finished_trials,
        open_study,
        run_study,
        search_space,
    )
    from autotransfer.workers import diversify_sampler, run_workers

    study = open_study(config, backbone=backbone, data_fingerprint=cache.data.fingerprint)
    if source is not None:  # lets `export` rebuild the inputs of any trial and `report` name the groups
        record_source(study, **source)
    data = cache.data
    print(f"autotransfer {__version__}: {data.name} ({len(data.labels)} images, {len(data.classes)} classes, "
          f"{data.image_size}px; train/val/test {len(data.split['train'])}/{len(data.split['val'])}/"
          f"{len(data.split['test'])}), backbone {backbone.name} ({backbone.num_groups} groups)")
    print(f"study {config.study_name!r} in {config.storage}")
    space = search_space(study, config, cache)
    cache.boundary(1)  # load (or compute and persist) now: the line below reports it, and workers load it
    prior = study.user_attrs.get("prior", {})
    low, high = space.tap_range
    print(f"activations: {cache.storage} cache{' loaded from ' + str(cache.folder) if cache.loaded_from_disk else ''}"
          f" ({cache.nbytes / 2**20:.0f} MiB{f', forward pass {cache.seconds:.1f}s' if cache.seconds else ''})")
    names = backbone.group_names
    print(f"prior: {prior.get('quadrant', '?')}; taps {names[low - 1]}..{names[high - 1]}, fine-tune at most "
          f"{space.trainable_range} group(s) under the tap")
    bar = tqdm(total=config.budget, initial=min(config.budget, finished_trials(study)), unit="trial",
               dynamic_ncols=True, file=sys.stdout, disable=True if workers > 1 else None)  # None: only on a tty

    def on_trial(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        if trial.state in FINISHED:
            bar.update(1)
        best = best_trial(study)
        bar.write(trial_line(trial, backbone, best))
        if best is not None:
            bar.set_postfix_str(f"best {best.value:.4f} (trial {best.number})")

    try:
        if workers == 1:
            if reseed:
                diversify_sampler(study)
            study = run_study(config, backbone, cache, study=study, on_trial=on_trial)
        else:
            print(f"{workers} worker processes, {threads_per_worker(workers)} CPU thread(s) each")
            run_workers(config, backbone, data, workers=workers, reseed=reseed, cache_folder=cache.folder,
                        cache_memory=cache.memory_limit)
    except KeyboardInterrupt:
        bar.close()
        write_leaderboard(leaderboard(study), config.out)
        print(f"\nInterrupted: the running trial(s) are marked failed ('interrupted') and queued to run again. "
              f"{finished_trials(study)} of {config.budget} trials finished and are stored in {config.storage}; "
              "run the same command again to continue.", file=sys.stderr)
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
    storage = "" if config.storage == default_storage(config.out) else f" --storage {config.storage}"
    print(f"plots and report.html: autotransfer report --study-name {config.study_name} --out {config.out}{storage}")
    return 0


class _Recommend(_Command):
    """Measure DATA against the backbone and print the size x similarity quadrant and what to try first.

    One forward pass caches the activations of every group (kept in --out for a later `search`); each
    group's pooled activations then get a LogME score and a ridge-probe validation accuracy.
    """

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("data", nargs="?", default="digits", help="folder, CSV or embedded name (default: digits)")
        parser.add_argument("--backbone", default="efficientnet_lite0", help="see `autotransfer backbones`")
        parser.add_argument("--weights", default=None, help="state dict for the backbone (default: bundled/cache)")
        parser.add_argument("--out", type=Path, default=None, help="output folder (default: studies/<data name>)")
        parser.add_argument("--seed", type=int, default=0, help="seed of the split (default: 0)")
        parser.add_argument("--max-epochs", type=_positive_int("--max-epochs"), default=DEFAULT_MAX_EPOCHS,
                            help=f"epochs of the recommended fine-tuning strategies (default: {DEFAULT_MAX_EPOCHS})")
        _add_data_arguments(parser)

    def run(self, args: argparse.Namespace) -> int:
        import pandas as pd

        from autotransfer.prior import SIMILAR_MARGIN, SMALL_PER_CLASS, build_prior

        backbone, cache, _, _ = _prepare(args)
        data = cache.data
        prior = build_prior(cache, max_epochs=args.max_epochs, seed=args.seed)
        table = pd.DataFrame([vars(s) for s in prior.scores]).rename(columns={"probe_accuracy": "probe_val_acc"})
        print(f"{data.name}: {len(data.labels)} images, {prior.num_classes} classes, {prior.images_per_class:.0f} "
              f"training images per class; backbone {backbone.name}")
        print(table.to_markdown(index=False, floatfmt=".4f"))
        print(f"\nquadrant: {prior.quadrant} (small: < {SMALL_PER_CLASS} training images per class; similar: final "
              f"features within {SIMILAR_MARGIN:.0%} of the best group's probe)")
        print(f"recommended: {prior.recommended.describe(backbone.group_names)}\nwhy: {prior.reason}")
        low, high = prior.space.tap_range
        print(f"search space: taps {backbone.group_names[low - 1]}..{backbone.group_names[high - 1]}, "
              f"fine-tune at most {prior.space.trainable_range} group(s) under the tap")
        print("the search tries first:")
        for i, s in enumerate(prior.first_strategies):
            print(f"  {i}. {s.describe(backbone.group_names)}")
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


def _add_study_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags that find an existing study, with `search`'s defaults (studies/<name>/study.db)."""
    parser.add_argument("--study-name", default=None,
                        help="default: the storage's only study, else 'digits' (search's default)")
    parser.add_argument("--storage", default=None, help="Optuna storage URL (default: SQLite in --out)")
    parser.add_argument("--out", type=Path, default=None, help="the study's output folder "
                        "(default: studies/<study-name>, as for search)")


def _writable(folder: Path) -> Path:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"Output folder {str(folder)!r} cannot be created ({e.strerror}); pass --out with a "
                          "folder you can write to.") from None
    return folder


class _Report(_Command):
    """Write a study's leaderboards, plots and one self-contained report.html into <out>/report/.

    Leaderboard as CSV, Markdown, HTML, Parquet and JSON; PNG plots (optimization history, parameter
    importances, accuracy by tap, freeze depth, head and LR ratio, slice, parallel coordinates). Works on
    finished and running studies in any Optuna storage; the folder is replaced only when complete.
    """

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        _add_study_arguments(parser)
        parser.add_argument("--top", type=_positive_int("--top"), default=10,
                            help="trials shown in report.html and printed here (default: 10)")

    def run(self, args: argparse.Namespace) -> int:
        import matplotlib

        matplotlib.use("Agg")  # files only; never open a window
        from autotransfer.html_report import write_report
        from autotransfer.report import to_markdown
        from autotransfer.studies import locate, open_existing

        name, storage, out = locate(args.study_name, args.storage, args.out)
        study = open_existing(name, storage)
        _writable(out)
        report = write_report(study, out, storage=storage, top=args.top)
        board, best = report.board, report.best
        counts = ", ".join(f"{n} {s}" for s, n in board.state.value_counts().items())
        print(f"study {name!r} in {storage}: {len(board)} trials ({counts or 'none'})")
        if best is not None:
            print(f"best: trial {best['trial']}  val {best['val_accuracy']:.4f}  {best['description']}"
                  + (f"  test {best['test']['test_accuracy']:.4f}" if best["test"] else ""))
            cols = ["rank", "trial", "state", "val_accuracy", "tap", "freeze", "head", "lr", "lr_ratio",
                    "epochs_run", "pruned_at", "seconds"]
            print(to_markdown(board[cols].head(args.top)))
        for plot in report.plots:
            if plot.path is None:
                print(f"plot {plot.name} skipped: {plot.note}", file=sys.stderr)
        print(f"report: {report.folder / 'report.html'}\nfiles: {report.folder}/ (leaderboard.csv .md .html "
              f".parquet .json, {' '.join(p.path.name for p in report.plots if p.path)})")
        return 0


class _Export(_Command):
    """Export one trial of a study to ONNX (default: the best), verified with onnxruntime on the test split.

    Search keeps only the best trial's weights; any other trial is retrained from its stored strategy with
    the same seed (it says so). Data and backbone are rebuilt from what search recorded in the study; the
    --data, --backbone, --weights, --image-size and --seed flags override that.
    """

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        _add_study_arguments(parser)
        parser.add_argument("--trial", type=int, default=None, help="trial number (default: the best trial)")
        parser.add_argument("--dest", type=Path, default=None, help="export folder (default: <out>/trial_<N>)")
        parser.add_argument("--data", default=None, help="data as given to search (default: recorded in the study)")
        parser.add_argument("--backbone", default=None, help="default: recorded in the study")
        parser.add_argument("--weights", default=None, help="default: recorded in the study")
        parser.add_argument("--image-size", type=_positive_int("--image-size"), default=None,
                            help="default: recorded in the study")
        parser.add_argument("--seed", type=int, default=None, help="seed of the split (default: recorded)")
        add_precision_argument(parser)

    def run(self, args: argparse.Namespace) -> int:
        from optuna.trial import TrialState

        from autotransfer.features import ActivationCache
        from autotransfer.pipeline import export_trial
        from autotransfer.studies import load_inputs, locate, open_existing
        from autotransfer.study import best_trial, checkpoint_path

        name, storage, out = locate(args.study_name, args.storage, args.out)
        study = open_existing(name, storage)
        complete = [t.number for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))]
        number = args.trial if args.trial is not None else (best_trial(study).number if complete else None)
        if number not in complete:
            state = next((t.state.name.lower() for t in study.get_trials(deepcopy=False) if t.number == number),
                         "not in the study")
            raise ConfigError(f"Trial {number} of study {name!r} is {state}; only complete trials can be exported "
                              f"(complete: {', '.join(map(str, complete)) or 'none'}).")
        backbone, data = load_inputs(study, data=args.data, backbone=args.backbone, weights=args.weights,
                                     image_size=args.image_size, seed=args.seed)
        dest = args.dest or out / f"trial_{number}"
        _writable(dest.parent)
        if not checkpoint_path(out, number).is_file():
            print(f"trial {number}: its weights were not kept (search keeps only the best trial's); retraining it "
                  "from its stored strategy and seed", file=sys.stderr)
        precision = parse_precisions(args.precision)
        result = export_trial(study, number, backbone, ActivationCache(backbone, data, folder=out / "cache"),
                              study_out=out, dest=dest, precision=precision)
        m = result.metrics
        print(f"trial {number}: val {m['val_accuracy']:.4f}  test {m['test_accuracy']:.4f} (onnxruntime, "
              f"{m['test_images']} images)  max |onnx - torch| {m['onnx_max_abs_diff']:.1e}"
              f"{'  (retrained from its strategy)' if result.retrained else ''}")
        print_variants(m)
        print(f"model: {result.folder / 'model.onnx'}")
        return 0


class _Studies(_Command):
    """List studies with their trial counts by state and best values.

    Without --storage, lists every studies/*/study.db (where search keeps its studies by default).
    """

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--storage", default=None, help="Optuna storage URL (default: studies/*/study.db)")
        parser.add_argument("--root", type=Path, default=Path("studies"),
                            help="folder searched without --storage (default: studies)")

    def run(self, args: argparse.Namespace) -> int:
        from autotransfer.report import to_markdown
        from autotransfer.studies import list_studies

        table = list_studies(args.storage, root=args.root)
        if table.empty:
            print(f"No studies in {args.storage or str(args.root / '*' / 'study.db')}; run `autotransfer search`.")
        else:
            print(to_markdown(table))
        return 0


_COMMANDS: dict[str, type[_Command]] = {
    "search": _Search, "recommend": _Recommend, "report": _Report, "export": _Export, "studies": _Studies,
    "predict": _Predict, "backbones": _Backbones, "datasets": _Datasets,
}


def build_parser() -> argparse.ArgumentParser:
    description = "Search how to transfer a pretrained CNN to your images; ship the winner as ONNX."
    parser = _Parser(prog="autotransfer", description=description)
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
