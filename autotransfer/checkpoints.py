"""The weights of the study's best trial so far, kept for export, and the model of any trial on demand."""

from __future__ import annotations

import tempfile
from collections.abc import Iterable
from pathlib import Path

import optuna
import torch

from autotransfer.artifacts import CHECKPOINT_ATTR, ArtifactStore, available, download_checkpoint
from autotransfer.atomic import replacing_file
from autotransfer.backbones import Backbone
from autotransfer.features import ActivationCache
from autotransfer.model import TransferModel, build_model
from autotransfer.strategy import Strategy
from autotransfer.trainer import TrialResult, train_trial

CHECKPOINTS = "checkpoints"


def checkpoint_path(out: Path, number: int) -> Path:
    return out / CHECKPOINTS / f"trial_{number}.pt"


def save_checkpoint(out: Path, number: int, result: TrialResult, strategy: Strategy, keep: Iterable[int] = ()) -> None:
    """Keep the weights of the best trial so far for export, and delete the others' but those in `keep`.

    `keep`: trials whose files another process may still need: the running ones (another worker may be
    saving or uploading its own right now). A best trial whose file is gone is retrained exactly at export.
    """
    with replacing_file(checkpoint_path(out, number)) as tmp:
        torch.save({"strategy": strategy.to_dict(), "state_dict": result.model.state_dict()}, tmp)
    kept = {checkpoint_path(out, n).name for n in (number, *keep)}
    for old in (out / CHECKPOINTS).glob("trial_*.pt"):
        if old.name not in kept:
            old.unlink(missing_ok=True)


def load_trial_model(study: optuna.Study, number: int, backbone: Backbone, cache: ActivationCache,
                     out: Path, store: ArtifactStore | None = None) -> tuple[TransferModel, bool]:
    """The trained model of trial `number`: from its checkpoint in `out`, else from the one stored in the study's
    artifact `store` (a trial another machine ran), else retrained from its stored strategy.

    Returns (model, retrained). Retraining is exact: same strategy, same seed, same cached inputs.
    """
    trial = study.trials[number]
    strategy = Strategy.from_dict(trial.user_attrs["strategy"])
    path = checkpoint_path(out, number)
    if path.is_file():
        return _load(path, strategy, backbone, len(cache.data.classes)), False
    with tempfile.TemporaryDirectory() as tmp:
        stored = download_checkpoint(store, trial, Path(tmp))
        if stored is not None:
            return _load(stored, strategy, backbone, len(cache.data.classes)), False
    return train_trial(strategy, backbone, cache).model, True


def has_weights(study: optuna.Study, number: int, out: Path, store: ArtifactStore | None) -> bool:
    """Whether `load_trial_model` finds trial `number`'s weights (kept here, or in the artifact store)."""
    stored = study.trials[number].user_attrs.get(CHECKPOINT_ATTR)
    return checkpoint_path(out, number).is_file() or available(store, stored)


def _load(path: Path, strategy: Strategy, backbone: Backbone, num_classes: int) -> TransferModel:
    model = build_model(strategy, backbone, num_classes)
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True)["state_dict"])
    return model.eval()
