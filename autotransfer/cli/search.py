"""`autotransfer search`: run the study with a live best-so-far, then export the best trial."""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from autotransfer import __version__
from autotransfer.cli.arguments import (
    add_artifacts_argument,
    add_data_arguments,
    add_max_steps_argument,
    add_metric_argument,
    add_precision_argument,
    add_refit_argument,
    int_at_least,
)
from autotransfer.cli.common import Command, prepare
from autotransfer.cli.output import export_line, print_variants
from autotransfer.defaults import DEFAULT_PATIENCE, DEFAULT_REFITS
from autotransfer.errors import EXIT_INTERRUPTED, AutotransferError
from autotransfer.precision import parse_precisions


class Search(Command):
    """Search how to transfer a pretrained backbone to DATA; export the best model to ONNX.

    DATA is a folder of class folders (optionally split into train/ val/ test/), a CSV of path,label, or
    an embedded data set (`autotransfer datasets`). Rerunning the same command continues the study up to
    the budget.
    """

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("data", nargs="?", default="digits", help="folder, CSV or embedded name (default: digits)")
        parser.add_argument("--backbone", default="efficientnet_lite0", help="see `autotransfer backbones`")
        parser.add_argument("--weights", default=None, help="state dict for the backbone (default: bundled/cache)")
        parser.add_argument("--unlabeled", default=None, metavar="DIR|CSV",
                            help="images without labels from the setting the model will serve (a folder in any "
                                 "layout, or a CSV with a path column): the search also tries self-training on them "
                                 "and scores every trial by reverse validation on them too (default: none)")
        parser.add_argument("--val", default=None, metavar="DIR",
                            help="labelled images from the setting the model will serve, as class folders: the "
                                 "validation split (every trial is scored on them alone; DATA's images train)")
        parser.add_argument("--test", default=None, metavar="DIR",
                            help="labelled images from that setting, as class folders: the test split, never "
                                 "searched on (the exported model's test accuracy is measured there)")
        parser.add_argument("--budget", type=int_at_least("--budget", 50), default=50,
                            help="finished trials in the study (default: 50)")
        parser.add_argument("--study-name", default=None, help="default: the data set's name")
        parser.add_argument("--storage", default=None, help="Optuna storage URL (default: SQLite in --out)")
        parser.add_argument("--out", type=Path, default=None, help="output folder (default: studies/<study-name>)")
        parser.add_argument("--timeout", type=float, default=None, help="stop starting trials after this many seconds")
        parser.add_argument("--patience", type=int_at_least("--patience", DEFAULT_PATIENCE, minimum=0),
                            default=DEFAULT_PATIENCE,
                            help="once a trial scores the maximum on validation (every image right), stop when "
                                 "this many later trials did not displace it; 0 runs the whole budget (default: "
                                 f"{DEFAULT_PATIENCE})")
        parser.add_argument("--seed", type=int, default=0, help="seed of split, sampler and training (default: 0)")
        add_max_steps_argument(parser)
        add_metric_argument(parser)
        parser.add_argument("--workers", type=int_at_least("--workers", 2), default=1,
                            help="worker processes on this machine, sharing the CPU threads (default: 1)")
        parser.add_argument("--heartbeat", type=int_at_least("--heartbeat", 10), default=None,
                            help="seconds between a running trial's heartbeats; a trial silent for 3 of them "
                                 "(its process died) is failed and run again (default: 10)")
        add_data_arguments(parser)
        add_refit_argument(parser)
        add_precision_argument(parser)
        add_artifacts_argument(parser)

    def run(self, args: argparse.Namespace) -> int:
        from autotransfer.storage import DEFAULT_HEARTBEAT
        from autotransfer.study import StudyConfig, default_storage
        from autotransfer.workers import sigterm_as_interrupt

        precision = parse_precisions(args.precision)  # before any work: a typo must not cost a search
        backbone, cache, out, created = prepare(args)
        name = args.study_name or cache.data.name
        config = StudyConfig(study_name=name, storage=args.storage or default_storage(out), out=out,
                             budget=args.budget, seed=args.seed, max_steps=args.max_steps, timeout=args.timeout,
                             device=args.device, heartbeat=args.heartbeat or DEFAULT_HEARTBEAT,
                             metric=args.metric, artifacts=args.artifacts, patience=args.patience)
        shared = args.storage is not None and not args.storage.startswith("sqlite")  # other machines may join
        source = dict(data=args.data, image_size=cache.data.image_size, seed=args.seed, backbone=backbone.name,
                      weights=args.weights, group_names=backbone.group_names, unlabeled=args.unlabeled,
                      val=args.val, test=args.test)
        try:
            with sigterm_as_interrupt():
                return run_search(config, backbone, cache, workers=args.workers, reseed=shared, source=source,
                                   precision=precision, refits=args.refit, distill=args.distill)
        except AutotransferError:
            if created and not any(out.glob("checkpoints/*")):
                shutil.rmtree(out, ignore_errors=True)
            raise


def run_search(config, backbone, cache, *, workers: int = 1, reseed: bool = False, source: dict | None = None,
               precision: tuple[str, ...] = ("fp32",), refits: int = DEFAULT_REFITS, distill: bool = True) -> int:
    import optuna
    from tqdm.auto import tqdm

    from autotransfer.device import threads_per_worker
    from autotransfer.pipeline import finish_study
    from autotransfer.report import leaderboard, trial_line, write_leaderboard
    from autotransfer.saturation import saturation_stop
    from autotransfer.studies import record_source
    from autotransfer.study import FINISHED, best_trial, finished_trials, open_study, run_study
    from autotransfer.workers import diversify_sampler, run_workers

    study = open_study(config, backbone=backbone, data_fingerprint=cache.data.fingerprint)
    config = _with_artifacts(study, config)
    if source is not None:  # lets `export` rebuild the inputs of any trial and `report` name the groups
        record_source(study, **source)
    data = cache.data
    _print_setting(study, config, backbone, cache)
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
                        cache_memory=cache.memory_limit, cache_disk=cache.disk_limit)
    except KeyboardInterrupt:
        bar.close()
        write_leaderboard(leaderboard(study), config.out)
        print(f"\nInterrupted: the running trial(s) are marked failed ('interrupted') and queued to run again. "
              f"{finished_trials(study)} of {config.budget} trials finished and are stored in {config.storage}; "
              "run the same command again to continue.", file=sys.stderr)
        return EXIT_INTERRUPTED
    bar.close()
    stopped = saturation_stop(study, config.patience)
    if stopped and finished_trials(study) < config.budget:  # a full budget did not stop early
        print(stopped, flush=True)
    best = best_trial(study)
    if refits and best is not None and not _export_stored(study, config, best.number, refits, precision, distill):
        from autotransfer.refit import distils, member_count
        from autotransfer.strategy import Strategy

        strategy = Strategy.from_dict(best.user_attrs["strategy"])
        student = ", then one student distilled from them" if distils(strategy, refits, distill) else ""
        print(f"training the best strategy (trial {best.number}) {member_count(strategy, refits)} time(s) on "
              f"train+val for the export{student}", flush=True)
    result = finish_study(study, config, backbone, cache, precision=precision, refits=refits, distill=distill)
    _print_summary(study, config, result)
    return 0


def _with_artifacts(study, config):
    """`config` with the study's artifact store (--artifacts, as recorded, or `<out>/artifacts` for SQLite),
    recorded in the study for the other machines and commands."""
    import dataclasses

    from autotransfer.artifacts import record_location, resolve_location

    location = resolve_location(study, config.artifacts, config.out, config.storage)
    record_location(study, location)
    if location is None:
        print("artifacts: none (a shared storage needs --artifacts DIR|s3://bucket for machines to share models)")
    return dataclasses.replace(config, artifacts=location)


def _export_stored(study, config, number: int, refits: int, precision: tuple[str, ...], distill: bool) -> bool:
    """Whether another machine already stored this export in the study (then nothing is trained for it)."""
    from autotransfer.artifacts import export_available, open_store
    from autotransfer.refit import distils
    from autotransfer.strategy import Strategy

    distill = distils(Strategy.from_dict(study.trials[number].user_attrs["strategy"]), refits, distill)
    return config.artifacts is not None and export_available(open_store(config.artifacts), study, number, refits,
                                                             precision, distill=distill)


def _print_setting(study, config, backbone, cache) -> None:
    """The data, the study, the activation cache and the prior's space, before the first trial."""
    from autotransfer.fidelity import BATCH_SIZE, StepLadder
    from autotransfer.study import search_space, study_metric

    data = cache.data
    metric, why = study_metric(study, config, cache)  # before any output: a conflicting --metric fails in one line
    labelled = len(data.labels) - data.unlabeled_count
    print(f"autotransfer {__version__}: {data.name} ({labelled} images, {len(data.classes)} classes, "
          f"{data.image_size}px; train/val/test {len(data.split['train'])}/{len(data.split['val'])}/"
          f"{len(data.split['test'])}{f', unlabelled {data.unlabeled_count}' if data.unlabeled_count else ''}), "
          f"backbone {backbone.name} ({backbone.num_groups} groups)")
    scored_by = ("; validation is --val, from the setting the model serves" if data.target_val else
                 "; with reverse validation on the unlabelled images" if data.unlabeled_count else "")
    print(f"study {config.study_name!r} in {config.storage}; objective: validation {metric} ({why}){scored_by}")
    space = search_space(study, config, cache)
    ladder = StepLadder(space.max_steps)
    cache.load()  # load (or compute and persist) now: the line below reports it, and workers load it
    prior = study.user_attrs.get("prior", {})
    low, high = space.tap_range
    print(f"activations: {cache.storage} cache{' loaded from ' + str(cache.folder) if cache.loaded_from_disk else ''}"
          f" ({cache.nbytes / 2**20:.0f} MiB{f', forward pass {cache.seconds:.1f}s' if cache.seconds else ''})")
    names = backbone.group_names
    print(f"prior: {prior.get('quadrant', '?')}; taps {names[low - 1]}..{names[high - 1]}; fine-tunes run "
          f"{space.max_steps} steps of {BATCH_SIZE} images, pruned at steps {', '.join(map(str, ladder.rungs[:-1]))}")


def _print_summary(study, config, result) -> None:
    """The top of the leaderboard, the exported model's figures, and where everything is."""
    from autotransfer.report import leaderboard, recall_line, to_markdown
    from autotransfer.study import default_storage

    board = leaderboard(study)
    cols = ["rank", "trial", "state", "val_score", "val_accuracy", "tap", "freeze", "pool", "head", "optimizer", "lr",
            "lr_ratio", "augment", "steps_run", "seconds"]
    print("\nTop 10 strategies:")
    print(to_markdown(board[cols].head(10)))
    m = result.metrics
    print(f"\nbest: trial {m['trial']}  {export_line(m)}")
    print_variants(m)
    print(recall_line(m))
    print(f"model: {result.folder / 'model.onnx'}\nleaderboard: {config.out / 'leaderboard.md'} "
          f"(and .csv)\nfiles: {result.folder}/ (metrics.json, strategy.json, classes.json, preprocess.json)")
    storage = "" if config.storage == default_storage(config.out) else f" --storage {config.storage}"
    print(f"plots and report.html: autotransfer report --study-name {config.study_name} --out {config.out}{storage}")
