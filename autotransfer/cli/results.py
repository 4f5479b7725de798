"""Commands on the results of a study: `report` (tables, plots, report.html), `export` (a trial to ONNX) and
`studies` (the studies in a storage, with their counts and best values)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from autotransfer.cli.arguments import (
    add_artifacts_argument,
    add_precision_argument,
    add_refit_argument,
    add_study_arguments,
    int_at_least,
)
from autotransfer.cli.common import Command, writable
from autotransfer.cli.output import print_export
from autotransfer.defaults import DEVICES
from autotransfer.errors import ConfigError
from autotransfer.precision import parse_precisions


class WriteReport(Command):
    """Write a study's leaderboards, plots and one self-contained report.html into <out>/report/.

    Leaderboard as CSV, Markdown, HTML, Parquet and JSON; PNG plots (optimization history, parameter
    importances, accuracy by tap, freeze depth, head and LR ratio, slice, parallel coordinates). Works on
    finished and running studies in any Optuna storage; the folder is replaced only when complete.
    """

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        add_study_arguments(parser)
        parser.add_argument("--top", type=int_at_least("--top", 10), default=10,
                            help="trials shown in report.html and printed here (default: 10)")
        add_artifacts_argument(parser)

    def run(self, args: argparse.Namespace) -> int:
        import matplotlib

        matplotlib.use("Agg")  # files only; never open a window
        from autotransfer.artifacts import open_store, resolve_location
        from autotransfer.html_report import write_report
        from autotransfer.report import to_markdown
        from autotransfer.studies import locate, open_existing

        name, storage, out = locate(args.study_name, args.storage, args.out)
        study = open_existing(name, storage)
        writable(out)
        report = write_report(study, out, storage=storage, top=args.top,
                              store=open_store(resolve_location(study, args.artifacts, out, storage)))
        board, best = report.board, report.best
        counts = ", ".join(f"{n} {s}" for s, n in board.state.value_counts().items())
        print(f"study {name!r} in {storage}: {len(board)} trials ({counts or 'none'})")
        if best is not None:
            print(f"best: trial {best['trial']}  val {best['val_accuracy']:.4f}  {best['description']}"
                  + (f"  test {best['test']['test_accuracy']:.4f}" if best["test"] else ""))
            cols = ["rank", "trial", "state", "val_accuracy", "tap", "freeze", "head", "lr", "lr_ratio",
                    "steps_run", "pruned_at", "seconds"]
            print(to_markdown(board[cols].head(args.top)))
        for plot in report.plots:
            if plot.path is None:
                print(f"plot {plot.name} skipped: {plot.note}", file=sys.stderr)
        print(f"report: {report.folder / 'report.html'}\nfiles: {report.folder}/ (leaderboard.csv .md .html "
              f".parquet .json, {' '.join(p.path.name for p in report.plots if p.path)})")
        return 0


class Export(Command):
    """Export one trial of a study to ONNX (default: the best), verified with onnxruntime on the test split.

    As in search, the trial's strategy is trained again on train+val (--refit N times, averaged); the same
    study and flags give the same model as search exported. With --refit 0 the trial's own model is exported:
    search keeps only the best trial's weights, so any other trial is retrained from its stored strategy with
    the same seed (it says so). Data and backbone are rebuilt from what search recorded in the study; the
    --data, --backbone, --weights, --image-size and --seed flags override that.
    """

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        add_study_arguments(parser)
        parser.add_argument("--trial", type=int, default=None, help="trial number (default: the best trial)")
        parser.add_argument("--dest", type=Path, default=None, help="export folder (default: <out>/trial_<N>)")
        parser.add_argument("--data", default=None, help="data as given to search (default: recorded in the study)")
        parser.add_argument("--backbone", default=None, help="default: recorded in the study")
        parser.add_argument("--weights", default=None, help="default: recorded in the study")
        parser.add_argument("--image-size", type=int_at_least("--image-size", 64), default=None,
                            help="default: recorded in the study")
        parser.add_argument("--seed", type=int, default=None, help="seed of the split (default: recorded)")
        parser.add_argument("--device", choices=DEVICES, default="auto",
                            help="where the refits train (default: auto)")
        add_refit_argument(parser)
        add_precision_argument(parser)
        add_artifacts_argument(parser)

    def run(self, args: argparse.Namespace) -> int:
        from optuna.trial import TrialState

        from autotransfer.artifacts import open_store, resolve_location
        from autotransfer.features import DEFAULT_MEMORY_LIMIT, ActivationCache
        from autotransfer.pipeline import export_trial
        from autotransfer.studies import load_inputs, locate, open_existing
        from autotransfer.study import best_trial

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
                                     image_size=args.image_size, seed=args.seed, memory_limit=DEFAULT_MEMORY_LIMIT,
                                     spill=out / "cache")
        dest = args.dest or out / f"trial_{number}"
        writable(dest.parent)
        precision = parse_precisions(args.precision)
        store = open_store(resolve_location(study, args.artifacts, out, storage))
        _say_what_trains(study, number, args.refit, args.distill, precision, out, store)
        result = export_trial(study, number, backbone, ActivationCache(backbone, data, folder=out / "cache"),
                              study_out=out, dest=dest, precision=precision, refits=args.refit, device=args.device,
                              store=store, distill=args.distill)
        print_export(f"trial {number}", result.metrics, result.folder)
        return 0


def _say_what_trains(study, number: int, refits: int, distill: bool, precision: tuple[str, ...], out: Path,
                     store) -> None:
    """One line on stderr: the export comes from the study's artifacts, or what is trained for it."""
    from autotransfer.artifacts import export_available
    from autotransfer.checkpoints import has_weights
    from autotransfer.refit import distils, member_count
    from autotransfer.strategy import Strategy

    strategy = Strategy.from_dict(study.trials[number].user_attrs["strategy"])
    distill = distils(strategy, refits, distill)
    if export_available(store, study, number, refits, precision, distill=distill):
        print(f"trial {number}: its export (--refit {refits}, {', '.join(precision)}) is stored in the study's "
              "artifacts; using it, nothing is trained", file=sys.stderr)
    elif refits:
        student = ", then one student distilled from them (--no-distill: the ensemble)" if distill else ""
        print(f"trial {number}: training its strategy {member_count(strategy, refits)} time(s) on train+val{student} "
              "(--refit 0 exports the trial as searched)", file=sys.stderr)
    elif not has_weights(study, number, out, store):
        print(f"trial {number}: its weights were not kept (search keeps only the best trial's); retraining it "
              "from its stored strategy and seed", file=sys.stderr)


class Studies(Command):
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
