"""The end-to-end job: data + backbone -> study -> leaderboard -> verified ONNX of the best trial."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import optuna
from torch import nn

from autotransfer import __version__
from autotransfer.artifacts import ArtifactStore, download_export, open_store, stored_export, upload_export
from autotransfer.atomic import replacing_folder
from autotransfer.backbones import Backbone
from autotransfer.checkpoints import load_trial_model
from autotransfer.data import ImageData
from autotransfer.defaults import DEFAULT_REFITS
from autotransfer.device import pick_device
from autotransfer.distill import TOLERANCE, Recipe, distil, held_out_accuracy
from autotransfer.errors import AutotransferError
from autotransfer.export import export_onnx, verify
from autotransfer.features import TRAIN_AND_VAL, ActivationCache
from autotransfer.precision import CALIBRATION_IMAGES, check_variant, make_variant, parse_precisions
from autotransfer.preprocess import NormalisedImages, normalise
from autotransfer.progress import phase
from autotransfer.refit import distils, refit
from autotransfer.report import leaderboard, write_leaderboard
from autotransfer.strategy import Strategy
from autotransfer.study import StudyConfig, best_trial


@dataclass(frozen=True)
class ExportResult:
    folder: Path
    metrics: dict[str, Any]
    retrained: bool  # refits == 0 and the trial's weights were not kept, so it was trained again
    stored: bool = False  # the files came from the export stored in the study's artifacts: nothing was trained


class _Incomplete(Exception):
    """A stored export lacks a file in its artifact store."""


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n")


def export_trial(study: optuna.Study, number: int, backbone: Backbone, cache: ActivationCache, *,
                 study_out: Path, dest: Path, precision: Sequence[str] = ("fp32",), refits: int = DEFAULT_REFITS,
                 device: str = "cpu", store: ArtifactStore | None = None, distill: bool = True) -> ExportResult:
    """Export trial `number` to `dest/` (model.onnx + json files), verified on the test split.

    With an artifact `store` (artifacts.py), an export of the same trial, refits and precisions already stored in
    the study is downloaded instead of made again, a new export is uploaded, and a trial whose weights another
    machine kept is loaded from its stored checkpoint.

    `refits` >= 1 trains the trial's strategy that many times on train+val and exports their average
    (see `refit.py`); 0 exports the trial's own model, trained on train only, as the search scored it. A refit
    whose members fail their check even with other seeds falls back to that model too; `metrics.json` then
    says why under `refit_fallback`.

    `distill` (with several refit members) trains one student from their ensemble and ships it instead, unless
    it loses more than half a point of test accuracy to the ensemble (`distill.py`); metrics["distillation"]
    has both figures.

    `precision` may add "fp16" / "int8": model.fp16.onnx / model.int8.onnx beside model.onnx, each checked on
    the test split against fp32 and recorded under metrics["variants"] (int8 is calibrated on training images).

    Everything is written into a temporary sibling folder that replaces `dest` only when complete (atomic.py).
    """
    data: ImageData = cache.data
    precisions = parse_precisions(precision)
    trial = study.trials[number]
    if "strategy" not in trial.user_attrs:
        raise AutotransferError(f"Trial {number} of study {study.study_name!r} has no stored strategy to export.")
    strategy = Strategy.from_dict(trial.user_attrs["strategy"])
    distill = distils(strategy, refits, distill)
    if (reused := _stored(study, number, refits, precisions, store, dest, distill)) is not None:
        return reused
    refits_asked = refits
    model, retrained, refits, fallback, distillation = _shipped_model(study, trial, strategy, backbone, cache,
                                                                      study_out, refits, device, store, distill)
    trained_on = TRAIN_AND_VAL if refits else "train"
    scores = _scores(study, trial)
    metadata = {"class_names": list(data.classes), "input_size": [3, data.image_size, data.image_size],
                "mean": list(backbone.mean), "std": list(backbone.std), "input_range": "0-1 RGB",
                "backbone": backbone.name, "weights": backbone.weights_id, "strategy": strategy.to_dict(),
                "optuna_study": study.study_name, "optuna_trial_number": number, **scores,
                "refits": refits, "distilled": _student_recipe(distillation),
                "trained_on": trained_on, "autotransfer_version": __version__}

    with replacing_folder(dest) as tmp:  # never leaves a half-written export behind
        checks, variants = _onnx_files(model, tmp / "model.onnx", data, backbone, metadata, precisions)
        metrics = {"trial": number, **scores, **checks, "retrained": retrained, "refits": refits,
                   "trained_on": trained_on, "refit_fallback": fallback, "backbone": backbone.name, "data": data.name,
                   "precisions": list(precisions), "variants": variants, "distillation": distillation}
        _write_json(tmp / "metrics.json", metrics)
        _write_json(tmp / "strategy.json", {**strategy.to_dict(), "backbone": backbone.name,
                                            "description": strategy.describe(backbone.group_names)})
        _write_json(tmp / "classes.json", list(data.classes))
        _write_json(tmp / "preprocess.json", {
            "image_size": data.image_size, "resize": "shorter side to image_size, bilinear", "crop": "center",
            "color": "RGB", "scale": "0..1", "mean": list(backbone.mean), "std": list(backbone.std), "layout": "NCHW"})
        if store is not None:
            upload_export(store, study, number, refits_asked, precisions, tmp, distill=distill)
    return ExportResult(dest, metrics, retrained)


def _scores(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> dict[str, Any]:
    """The trial's search figures for metrics.json: its objective, validation accuracy (and reverse accuracy)."""
    return {"metric": study.user_attrs.get("metric", "accuracy"), "val_score": trial.value,  # the objective
            "val_accuracy": trial.user_attrs.get("val_accuracy", trial.value),  # older trials: value is accuracy
            **{k: v for k, v in trial.user_attrs.items() if k == "reverse_accuracy"}}  # with --unlabeled


def _shipped_model(study: optuna.Study, trial: optuna.trial.FrozenTrial, strategy: Strategy, backbone: Backbone,
                   cache: ActivationCache, study_out: Path, refits: int, device: str, store: ArtifactStore | None,
                   distill: bool) -> tuple[nn.Module, bool, int, str | None, dict[str, Any] | None]:
    """(model, retrained, refit members shipped, refit fallback reason, distillation record) of the export."""
    fallback = None
    if refits:
        outcome = refit(strategy, backbone, cache, members=refits, device=pick_device(device),
                        reference_train_accuracy=trial.user_attrs.get("train_accuracy"))
        model, retrained, fallback = outcome.model, False, outcome.failure
        refits = len(outcome.seeds)  # the members shipped: one for a seed-independent strategy, 0 on a fallback
    if not refits or fallback is not None:  # a refit that cannot be trusted ships the searched trial's own model
        model, retrained = load_trial_model(study, trial.number, backbone, cache, study_out, store)
    distillation = None
    if distill and fallback is None:
        model, distillation = _distilled(model, strategy, backbone, cache, device, study, trial)
    return model, retrained, refits, fallback, distillation


def _distilled(ensemble: nn.Module, strategy: Strategy, backbone: Backbone, cache: ActivationCache, device: str,
               study: optuna.Study, trial: optuna.trial.FrozenTrial) -> tuple[nn.Module, dict[str, Any]]:
    """(model to ship, the record of `metrics["distillation"]`): the student of `ensemble`, or the ensemble when
    the student failed its check or loses more than `distill.TOLERANCE` of test accuracy to it.

    The test split decides between two finished models here (the issue's rule): the shipped model's test
    figure is then a slightly optimistic estimate, and the record says which model it is.
    """
    student = distil(strategy, ensemble, backbone, cache, device=pick_device(device),
                     metric=study.user_attrs.get("metric", "accuracy"),
                     reference_train_accuracy=trial.user_attrs.get("train_accuracy"))
    x_test, y_test = cache.data.subset("test")
    x_test = NormalisedImages(x_test, backbone.mean, backbone.std)
    teacher_acc = held_out_accuracy(ensemble, x_test, y_test)
    record = {"ensemble_test_accuracy": teacher_acc, **student.recipe.as_dict(),
              "candidates_val": student.candidates,
              "candidates_val_kl": student.teacher_kl, "tolerance": TOLERANCE}
    if student.model is None:
        return ensemble, {**record, "shipped": "ensemble", "student_test_accuracy": None, "why": student.failure}
    student_acc = held_out_accuracy(student.model, x_test, y_test)
    record["student_test_accuracy"] = student_acc
    if student_acc < teacher_acc - TOLERANCE:
        why = (f"the student loses {100 * (teacher_acc - student_acc):.1f} points of test accuracy to the "
               f"ensemble (more than {100 * TOLERANCE:g})")
        return ensemble, {**record, "shipped": "ensemble", "why": why}
    return student.model, {**record, "shipped": "student", "why": None}


def _student_recipe(distillation: dict[str, Any] | None) -> dict[str, float | bool] | None:
    """What the shipped student was distilled with (None: no student shipped), for the model's metadata."""
    if distillation is None or distillation["shipped"] != "student":
        return None
    return Recipe.from_dict(distillation).as_dict()


def _stored(study: optuna.Study, number: int, refits: int, precisions: tuple[str, ...], store: ArtifactStore | None,
            dest: Path, distill: bool = False) -> ExportResult | None:
    """The stored export of this trial, refits and precisions, downloaded to `dest`; None if there is none."""
    record = stored_export(study, number, refits, precisions, distill=distill) if store is not None else None
    if record is None:
        return None
    try:
        with replacing_folder(dest) as tmp:
            if not download_export(store, record, tmp):
                raise _Incomplete()
            metrics = json.loads((tmp / "metrics.json").read_text())
    except _Incomplete:
        return None
    return ExportResult(dest, metrics, False, stored=True)


def _onnx_files(model: nn.Module, path: Path, data: ImageData, backbone: Backbone, metadata: dict[str, Any],
                precisions: Sequence[str]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Write `path` and its `precisions[1:]` variants, each checked on the test split; their figures.

    Each part is a line of progress (see `progress.py`): an export of a large backbone, its int8 calibration
    and the test passes through onnxruntime each take from seconds to minutes.
    """
    with phase("export: ONNX export"):
        export_onnx(model, path, image_size=data.image_size, metadata=metadata)
    x_test, y_test = data.subset("test")
    x_test = NormalisedImages(x_test, backbone.mean, backbone.std)
    checks = {**verify(model, path, x_test, y_test, class_names=data.classes), "test_images": len(y_test)}
    variants = {}
    for p in precisions[1:]:
        calibration = ", calibrated on training images" if p == "int8" else ""
        with phase(f"export: {p} variant{calibration}"):
            int8 = p == "int8"
            variant = make_variant(path, p, _calibration_images(data, backbone) if int8 else None,
                                   _check_images(data, backbone) if int8 else None)
        variants[p] = check_variant(variant, path, x_test, y_test.numpy())
    return checks, variants


def _calibration_images(data: ImageData, backbone: Backbone, n: int = CALIBRATION_IMAGES) -> np.ndarray:
    """A seeded random sample of TRAIN images, preprocessed, for int8 calibration (never the test split)."""
    x, _ = data.subset("train")
    pick = np.sort(np.random.default_rng(0).permutation(len(x))[:n])
    return normalise(x[pick], backbone.mean, backbone.std).numpy()


def _check_images(data: ImageData, backbone: Backbone) -> NormalisedImages:
    """The validation images, preprocessed: int8 keeps layers in float until it agrees with fp32 on them (never
    the test split, which measures the result; a refit model has seen them, so there the check is easier)."""
    return NormalisedImages(data.subset("val")[0], backbone.mean, backbone.std)


def finish_study(study: optuna.Study, config: StudyConfig, backbone: Backbone, cache: ActivationCache, *,
                 precision: Sequence[str] = ("fp32",), refits: int = DEFAULT_REFITS,
                 distill: bool = True) -> ExportResult:
    """Write the leaderboard and export the best trial (refit `refits` times, in each of `precision`) to `out/best/`."""
    write_leaderboard(leaderboard(study), config.out)
    best = best_trial(study)
    if best is None:
        raise AutotransferError(f"Study {study.study_name!r} has no complete trial to export; see "
                                f"{config.out / 'leaderboard.md'} for why trials failed.")
    return export_trial(study, best.number, backbone, cache, study_out=config.out, dest=config.out / "best",
                        precision=precision, refits=refits, device=config.device, store=open_store(config.artifacts),
                        distill=distill)
