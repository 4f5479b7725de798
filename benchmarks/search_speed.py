"""Wall time of autotransfer's search against a naive Optuna loop, side by side in one run.

Both run the same search: the same space (narrowed by the prior), the same seeded TPE sampler, the same
enqueued first trials and the same trainer. The naive loop has no activation cache (every batch goes
through the whole model from the images) and no pruner. Also times one forward pass over the data and,
unless --skip-budget50, a full `autotransfer search --budget 50` in a subprocess.

    python benchmarks/search_speed.py [--trials 20] [--skip-budget50]

Last line: ratio=<autotransfer/naive> best=<ours> naive_best=<theirs>
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import optuna
import torch

from autotransfer.backbones import get_backbone
from autotransfer.data import load_data
from autotransfer.device import configure_threads
from autotransfer.features import ActivationCache
from autotransfer.prior import build_prior
from autotransfer.strategy import enqueue_params, suggest_strategy
from autotransfer.study import StudyConfig, best_trial, default_storage, open_study, run_study
from autotransfer.trainer import TrainingDiverged, train_trial


def forward_pass_seconds(backbone, data) -> float:
    """One eval forward pass of the whole backbone over every image (no cache, nothing stored)."""
    cache = ActivationCache(backbone, data)
    x = cache.boundary(0)
    backbone.groups.eval()
    start = time.perf_counter()
    with torch.no_grad():
        for i in range(0, len(x), cache.batch_size):
            h = cache.as_input(x[i:i + cache.batch_size])
            for group in backbone.groups:
                h = group(h)
    return time.perf_counter() - start


def ours(trials: int, out: Path) -> tuple[float, float, optuna.Study]:
    start = time.perf_counter()
    out.mkdir(parents=True)
    backbone = get_backbone("efficientnet_lite0")
    data = load_data("digits")
    cache = ActivationCache(backbone, data, folder=out / "cache")
    config = StudyConfig(study_name="ours", storage=default_storage(out), out=out, budget=trials, patience=0)
    study = run_study(config, backbone, cache)
    return time.perf_counter() - start, best_trial(study).value, study


def naive(trials: int, out: Path, log) -> tuple[float, float]:
    """The same search with no cache and no pruning: a loop a user would write around the same trainer."""
    start = time.perf_counter()
    out.mkdir(parents=True)
    backbone = get_backbone("efficientnet_lite0")
    data = load_data("digits")
    images = ActivationCache(backbone, data)  # only boundary 0 (normalised images) is read: no forward pass
    prior_cache = ActivationCache(backbone, data)  # the space and first trials are the same as ours
    prior = build_prior(prior_cache)
    del prior_cache
    config = StudyConfig(study_name="naive", storage=default_storage(out), out=out, budget=trials, patience=0)
    study = open_study(config)
    study.pruner = optuna.pruners.NopPruner()
    for s in prior.first_strategies:
        study.enqueue_trial(enqueue_params(s))

    def objective(trial: optuna.Trial) -> float:
        t = time.perf_counter()
        strategy = suggest_strategy(trial, prior.space)
        try:
            value = train_trial(strategy, backbone, images, use_cache=False).val_accuracy
        except TrainingDiverged:
            raise optuna.TrialPruned() from None
        log(f"  naive trial {trial.number:2d}: val {value:.4f} {time.perf_counter() - t:6.1f}s  {strategy.describe()}")
        return value

    study.optimize(objective, n_trials=trials)
    return time.perf_counter() - start, study.best_value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--skip-budget50", action="store_true", help="do not time `autotransfer search --budget 50`")
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    threads = configure_threads()

    def log(text: str) -> None:
        print(text, flush=True)

    backbone, data = get_backbone("efficientnet_lite0"), load_data("digits")
    forward_pass_seconds(backbone, data)  # warm-up: first calls allocate
    forward = min(forward_pass_seconds(backbone, data) for _ in range(3))
    log(f"torch {torch.__version__}, {threads} threads; digits {len(data.labels)} images at {data.image_size}px")
    log(f"one forward pass over the data: {forward:.2f}s (best of 3)")

    with tempfile.TemporaryDirectory() as tmp:
        ours_s, ours_best, study = ours(args.trials, Path(tmp) / "ours")
        pruned = sum(t.state == optuna.trial.TrialState.PRUNED for t in study.trials)
        log(f"autotransfer: {args.trials} trials in {ours_s:.1f}s (forward pass and prior included; {pruned} "
            f"pruned), best val {ours_best:.4f}")
        naive_s, naive_best = naive(args.trials, Path(tmp) / "naive", log)
        log(f"naive loop:   {args.trials} trials in {naive_s:.1f}s, best val {naive_best:.4f}")

        if not args.skip_budget50:
            start = time.perf_counter()
            subprocess.run([sys.executable, "-m", "autotransfer", "search", "--budget", "50", "--out",
                            str(Path(tmp) / "b50")], check=True, stdout=subprocess.DEVNULL)
            b50 = time.perf_counter() - start
            log(f"autotransfer search --budget 50 (whole command, export included): {b50:.1f}s = "
                f"{b50 / forward:.1f}x one forward pass")
    print(f"ratio={ours_s / naive_s:.4f} best={ours_best:.4f} naive_best={naive_best:.4f}")


if __name__ == "__main__":
    main()
