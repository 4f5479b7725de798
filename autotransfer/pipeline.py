"""The end-to-end job: data + backbone -> study -> leaderboard -> verified ONNX of the best trial."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna

from autotransfer import __version__
from autotransfer.backbones import Backbone
from autotransfer.data import ImageData
from autotransfer.errors import AutotransferError
from autotransfer.export import export_onnx, verify
from autotransfer.features import ActivationCache, normalise
from autotransfer.report import leaderboard, write_leaderboard
from autotransfer.strategy import Strategy
from autotransfer.study import StudyConfig, best_trial, load_trial_model


@dataclass(frozen=True)
class ExportResult:
    folder: Path
    metrics: dict[str, Any]
    retrained: bool  # True when the trial's weights were not kept and it was trained again


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n")


def export_trial(study: optuna.Study, number: int, backbone: Backbone, cache: ActivationCache, *,
                 study_out: Path, dest: Path) -> ExportResult:
    """Export trial `number` to `dest/` (model.onnx + json files), verified on the test split.

    Everything is written into a temporary sibling folder that replaces `dest` only when complete.
    """
    data: ImageData = cache.data
    trial = study.trials[number]
    if "strategy" not in trial.user_attrs:
        raise AutotransferError(f"Trial {number} of study {study.study_name!r} has no stored strategy to export.")
    model, retrained = load_trial_model(study, number, backbone, cache, study_out)
    strategy = Strategy.from_dict(trial.user_attrs["strategy"])
    preprocess = {"image_size": data.image_size, "resize": "shorter side to image_size, bilinear",
                  "crop": "center", "color": "RGB", "scale": "0..1", "mean": list(backbone.mean),
                  "std": list(backbone.std), "layout": "NCHW"}
    metadata = {"class_names": list(data.classes), "input_size": [3, data.image_size, data.image_size],
                "mean": list(backbone.mean), "std": list(backbone.std), "input_range": "0-1 RGB",
                "backbone": backbone.name, "weights": backbone.weights_id, "strategy": strategy.to_dict(),
                "optuna_study": study.study_name, "optuna_trial_number": number,
                "val_accuracy": trial.value, "autotransfer_version": __version__}

    tmp = dest.with_name(f".{dest.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        export_onnx(model, tmp / "model.onnx", image_size=data.image_size, metadata=metadata)
        x_test, y_test = data.subset("test")
        checks = verify(model, tmp / "model.onnx", normalise(x_test, backbone.mean, backbone.std), y_test)
        metrics = {"trial": number, "val_accuracy": trial.value, **checks, "test_images": len(y_test),
                   "retrained": retrained, "backbone": backbone.name, "data": data.name}
        _write_json(tmp / "metrics.json", metrics)
        _write_json(tmp / "strategy.json", {**strategy.to_dict(), "backbone": backbone.name,
                                            "description": strategy.describe(backbone.group_names)})
        _write_json(tmp / "classes.json", list(data.classes))
        _write_json(tmp / "preprocess.json", preprocess)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # never leave a half-written export behind
        raise
    shutil.rmtree(dest, ignore_errors=True)
    tmp.replace(dest)
    return ExportResult(dest, metrics, retrained)


def finish_study(study: optuna.Study, config: StudyConfig, backbone: Backbone, cache: ActivationCache) -> ExportResult:
    """Write the leaderboard and export the best trial to `out/best/`."""
    write_leaderboard(leaderboard(study), config.out)
    best = best_trial(study)
    if best is None:
        raise AutotransferError(f"Study {study.study_name!r} has no complete trial to export; see "
                                f"{config.out / 'leaderboard.md'} for why trials failed.")
    return export_trial(study, best.number, backbone, cache, study_out=config.out,
                        dest=config.out / "best")
