"""One model from the refit ensemble: born-again distillation, so the shipped model costs one member.

The ensemble of refits (`refit.py`) is the most accurate model we make, and it costs its members' tails at
inference (on digits 1.27x the latency of one model, 22.9 MB against 9.5 MB). The student has the strategy's
own architecture, starts as every fine-tune does (pretrained weights, head fitted by L-BFGS), and trains under
the strategy's schedule on train+val with

    (1 - alpha) * CE(student, labels) + alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T))

(Hinton et al., 2015; born-again networks, Furlanello et al., 2018). The teacher sees the same, possibly
augmented, batch, so the soft targets follow the augmentation.

A recipe may also mix the inputs (`trainer.mix_pairs`): student and teacher then see in-batch mixes of the
images (or of the activations at the freeze boundary), labelled by the teacher alone (alpha 1), so every step
shows the student new points of the teacher's function (function matching, Beyer et al., 2022).

The recipe is chosen without the test split: each of `CANDIDATES` trains a student on the train split alone
and is scored on validation (the teacher was trained on those images; the student was not), and the best is
trained again on train+val. Validation has a few hundred images, so the scores often tie; the student closer
to its teacher there (lower mean KL) then wins. `pipeline.py` then compares student and ensemble on the test split
and ships the ensemble instead when the student loses more than `TOLERANCE` of accuracy.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from autotransfer.backbones import Backbone
from autotransfer.features import TRAIN_AND_VAL, ActivationCache
from autotransfer.model import TransferModel
from autotransfer.preprocess import NormalisedImages, normalise, rows_per_batch
from autotransfer.refit import check_member, refit_schedule
from autotransfer.strategy import Strategy
from autotransfer.trainer import TrainingDiverged, train_trial


@dataclass(frozen=True)
class Recipe:
    """How a student learns: the temperature, the weight of the soft targets, whether the inputs are mixed."""

    temperature: float
    alpha: float
    mixup: bool = False

    def __post_init__(self) -> None:
        if self.mixup and self.alpha != 1:
            raise ValueError("a mixed input has no hard label: a mixup recipe needs alpha 1")

    @property
    def name(self) -> str:
        return f"T={self.temperature:g} alpha={self.alpha:g}" + (" mixup" if self.mixup else "")

    def as_dict(self) -> dict[str, float | bool]:
        return {"temperature": self.temperature, "alpha": self.alpha, "mixup": self.mixup}

    @classmethod
    def from_dict(cls, d: dict) -> Recipe:
        return cls(float(d["temperature"]), float(d["alpha"]), bool(d.get("mixup", False)))


# The born-again student (all soft targets at T=1), Hinton's softened mix, and function matching.
CANDIDATES = (Recipe(1.0, 1.0), Recipe(4.0, 0.5), Recipe(1.0, 1.0, mixup=True))
TOLERANCE = 0.005  # test accuracy the student may lose to the ensemble and still ship (half a point)


@dataclass(frozen=True)
class SoftTargets:
    """The distillation loss of one fine-tune: `trainer.SoftLoss` with a teacher and a recipe's parts."""

    teacher: nn.Module  # `refit.Ensemble` (or any model with `forward_from(x, start)`), in eval mode
    temperature: float
    alpha: float
    mixup: bool = False

    @classmethod
    def of(cls, teacher: nn.Module, recipe: Recipe) -> SoftTargets:
        return cls(teacher, recipe.temperature, recipe.alpha, recipe.mixup)

    def __call__(self, hard: torch.Tensor, logits: torch.Tensor, inputs: torch.Tensor, start: int) -> torch.Tensor:
        t = self.temperature
        with torch.no_grad():
            target = F.log_softmax(self.teacher.forward_from(inputs, start).float() / t, dim=1)
        soft = F.kl_div(F.log_softmax(logits / t, dim=1), target, log_target=True, reduction="batchmean") * t * t
        return (1 - self.alpha) * hard + self.alpha * soft


@dataclass(frozen=True)
class Student:
    """The distilled model, or None with the reason; the chosen recipe and every candidate's score."""

    model: TransferModel | None
    recipe: Recipe
    candidates: dict[str, float]  # `Recipe.name` -> validation score of a student trained on train only
    teacher_kl: dict[str, float] = field(default_factory=dict)  # `Recipe.name` -> its KL to the teacher there
    failure: str | None = None


def distil(strategy: Strategy, teacher: nn.Module, backbone: Backbone, cache: ActivationCache, *,
           device: torch.device | str = "cpu", metric: str = "accuracy", reference_train_accuracy: float | None = None,
           candidates: tuple[Recipe, ...] = CANDIDATES) -> Student:
    """Choose the recipe on validation, then train the student on train+val (see the module docstring).

    With a single candidate nothing is chosen (the export's recorded choice, trained again exactly). The student
    is checked as a refit member is (`refit.check_member`); one that fails has no model.
    """
    if not strategy.trains_backbone:
        raise ValueError("a head-only strategy trains the same model whatever its seed: there is nothing to distil")
    teacher = teacher.eval().to(device)
    scores, kl = _choose(strategy, teacher, backbone, cache, device, metric, candidates) if len(candidates) > 1 \
        else ({}, {})
    # Validation has a few hundred images, so scores often tie: the closer match of the teacher breaks the tie.
    recipe = max(candidates, key=lambda c: (scores.get(c.name, 0.0), -kl.get(c.name, 0.0)))
    schedule = refit_schedule(strategy, cache)
    try:
        result = train_trial(schedule, backbone, cache, device=device, metric=metric,
                             fit_split=TRAIN_AND_VAL, soft_loss=SoftTargets.of(teacher, recipe),
                             description=f"distil: student ({recipe.name})")
        problem = check_member(result, reference_train_accuracy)
    except TrainingDiverged as e:
        problem = str(e)
    teacher.to("cpu")
    if problem is not None:
        return Student(None, recipe, scores, kl, failure=f"the student failed its check: {problem}")
    return Student(result.model, recipe, scores, kl)


def _choose(strategy: Strategy, teacher: nn.Module, backbone: Backbone, cache: ActivationCache,
            device: torch.device | str, metric: str, candidates: tuple[Recipe, ...],
            ) -> tuple[dict[str, float], dict[str, float]]:
    """Per recipe, a student trained on the train split alone: its validation score and its KL to the teacher."""
    images, _ = cache.data.subset("val")
    scores: dict[str, float] = {}
    kl: dict[str, float] = {}
    for recipe in candidates:
        try:
            result = train_trial(strategy, backbone, cache, device=device, metric=metric, fit_split="train",
                                 soft_loss=SoftTargets.of(teacher, recipe), description=f"distil: choose {recipe.name}")
            scores[recipe.name] = result.val_score
            kl[recipe.name] = _kl_to(teacher, result.model, images, backbone, device)
        except TrainingDiverged:
            scores[recipe.name], kl[recipe.name] = float("-inf"), float("inf")
    return scores, kl


@torch.no_grad()
def _kl_to(teacher: nn.Module, student: nn.Module, images: torch.Tensor, backbone: Backbone,
           device: torch.device | str) -> float:
    """Mean KL(teacher || student) of the predicted distributions on uint8 `images`, normalised batch by batch
    so that a large validation split is never held as floats at once."""
    student = student.to(device).eval()
    batch_size = rows_per_batch(images.shape[1:], most=256)
    total = 0.0
    for i in range(0, len(images), batch_size):
        batch = normalise(images[i:i + batch_size], backbone.mean, backbone.std).to(device)
        total += F.kl_div(F.log_softmax(student(batch).float(), 1), F.log_softmax(teacher(batch).float(), 1),
                          reduction="sum", log_target=True).item()
    student.to("cpu")
    return total / max(1, len(images))


@torch.no_grad()
def held_out_accuracy(model: nn.Module, x: torch.Tensor | NormalisedImages, y: torch.Tensor, batch_size: int = 256,
                      ) -> float:
    """Top-1 accuracy of `model` (on the CPU, eval mode) on normalised images `x` (or uint8 ones seen as such)
    with labels `y`."""
    model = model.cpu().eval()
    batch_size = rows_per_batch(x.shape[1:], most=batch_size)
    correct = sum(int((model(x[i:i + batch_size]).argmax(1) == y[i:i + batch_size]).sum())
                  for i in range(0, len(x), batch_size))
    return correct / max(1, len(x))
