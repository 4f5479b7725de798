"""The weights of the study's best trial so far, kept for export, and the model of any trial on demand."""

from __future__ import annotations

from pathlib import Path

import optuna
import torch

from autotransfer.atomic import replacing_file
from autotransfer.backbones import Backbone
from autotransfer.features import ActivationCache
from autotransfer.model import TransferModel, build_model
from autotransfer.strategy import Strategy
from autotransfer.trainer import TrialResult, train_trial

CHECKPOINTS = "checkpoints"


def checkpoint_path(out: Path, number: int) -> Path:
    return out / CHECKPOINTS / f"trial_{number}.pt"


def save_checkpoint(out: Path, number: int, result: TrialResult, strategy: Strategy) -> None:
    """Keep the weights of the best trial so far (and only those) for export."""
    with replacing_file(checkpoint_path(out, number)) as tmp:
        torch.save({"strategy": strategy.to_dict(), "state_dict": result.model.state_dict()}, tmp)
    for old in (out / CHECKPOINTS).glob("trial_*.pt"):
        if old.name != f"trial_{number}.pt":
            old.unlink(missing_ok=True)


def load_trial_model(study: optuna.Study, number: int, backbone: Backbone, cache: ActivationCache,
                     out: Path) -> tuple[TransferModel, bool]:
    """The trained model of trial `number`: from its checkpoint, or retrained from its stored strategy.

    Returns (model, retrained). Retraining is exact: same strategy, same seed, same cached inputs.
    """
    strategy = Strategy.from_dict(study.trials[number].user_attrs["strategy"])
    path = checkpoint_path(out, number)
    if path.is_file():
        model = build_model(strategy, backbone, len(cache.data.classes))
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True)["state_dict"])
        return model.eval(), False
    return train_trial(strategy, backbone, cache).model, True
