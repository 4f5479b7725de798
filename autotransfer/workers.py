"""`--workers N`: N processes on one machine work on one study, each with its share of the CPU threads.

Each worker is a spawned process that opens the same study storage and runs `run_study`; the budget, the
heartbeats and the retry of lost trials work across processes exactly as across machines. The decoded images
(or, when they are memory-mapped, their file's name) and the backbone weights reach the workers through
shared memory (torch.multiprocessing); the parent computes
the activation cache once and persists it in the output folder, and each worker loads it from there.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import NoReturn

import torch

from autotransfer.backbones import Backbone
from autotransfer.data import ImageData
from autotransfer.device import configure_threads
from autotransfer.errors import EXIT_INTERRUPTED, EXIT_USAGE, AutotransferError
from autotransfer.features import DEFAULT_DISK_LIMIT, DEFAULT_MEMORY_LIMIT
from autotransfer.progress import enabled
from autotransfer.report import trial_line
from autotransfer.study import StudyConfig

STOP_SECONDS = 60  # how long an interrupted worker may take to mark its trial before it is killed


def _interrupt(signum: int, frame: object) -> NoReturn:
    raise KeyboardInterrupt


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Treat SIGTERM (a scheduler's or `kill`'s stop) like Ctrl-C: mark the running trial and stop.

    The previous handler comes back afterwards; off the main thread (where Python allows no handlers) it is a no-op.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def diversify_sampler(study) -> None:
    """Reseed this process's sampler so parallel workers do not draw the same random trials.

    Only the data split and training seeds must agree between workers; equal sampler seeds would make
    every worker suggest the same strategies.
    """
    study.sampler.reseed_rng()


def _worker(index: int, workers: int, config: StudyConfig, backbone: Backbone, data: ImageData,
            reseed: bool, cache_folder: Path | None, cache_memory: int, cache_disk: int) -> None:
    """Body of one worker process: its own threads, its own activation cache, the shared study."""
    import logging

    import optuna

    from autotransfer.features import ActivationCache
    from autotransfer.study import open_study, run_study

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    configure_threads(workers)
    if enabled():  # N bars on one terminal would overwrite each other: lines, each naming its trial
        os.environ["AUTOTRANSFER_PROGRESS"] = "lines"
    with sigterm_as_interrupt():  # the parent forwards Ctrl-C once, as SIGTERM (SIGINT is ignored here)
        try:
            study = open_study(config, backbone=backbone, data_fingerprint=data.fingerprint)
            if reseed or index > 0:
                diversify_sampler(study)

            def on_trial(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
                print(f"[worker {index}] {trial_line(trial, backbone)}", flush=True)

            cache = ActivationCache(backbone, data, folder=cache_folder, memory_limit=cache_memory,
                                    disk_limit=cache_disk)
            run_study(config, backbone, cache, study=study, on_trial=on_trial)
        except KeyboardInterrupt:
            sys.exit(EXIT_INTERRUPTED)
        except AutotransferError as e:
            print(f"autotransfer: error: [worker {index}] {e}", file=sys.stderr, flush=True)
            sys.exit(EXIT_USAGE)


def run_workers(config: StudyConfig, backbone: Backbone, data: ImageData, *, workers: int,
                reseed: bool = False, cache_folder: Path | None = None,
                cache_memory: int = DEFAULT_MEMORY_LIMIT, cache_disk: int = DEFAULT_DISK_LIMIT) -> None:
    """Run `workers` processes on the study of `config` and wait for all of them.

    Ctrl-C (or SIGTERM) here is passed on to every worker, which marks its running trial as interrupted
    and queues it again; then KeyboardInterrupt is raised. A worker that fails raises AutotransferError.
    """
    ctx = torch.multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_worker, args=(i, workers, config, backbone, data, reseed, cache_folder, cache_memory,
                                                              cache_disk),
                         name=f"autotransfer-worker-{i}") for i in range(workers)]
    ignore = signal.signal(signal.SIGINT, signal.SIG_IGN)  # inherited: workers never see a terminal's Ctrl-C
    try:
        for p in procs:
            p.start()
    finally:
        signal.signal(signal.SIGINT, ignore)
    try:
        for p in procs:
            p.join()
    except KeyboardInterrupt:
        for p in procs:
            if p.is_alive():
                p.terminate()  # SIGTERM: the worker marks its trial and exits
        for p in procs:
            p.join(STOP_SECONDS)
            if p.is_alive():
                p.kill()  # its trial is then failed and retried by heartbeat
                p.join()
        raise
    failed = [(i, p.exitcode) for i, p in enumerate(procs) if p.exitcode != 0]
    if any(code == EXIT_INTERRUPTED for _, code in failed):
        raise KeyboardInterrupt
    if failed:
        raise AutotransferError(f"{len(failed)} of {workers} workers stopped early (worker, exit code: {failed}); "
                                "see their messages above, fix the cause and run the same command again.")
