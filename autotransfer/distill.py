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
trained again on train+val. `pipeline.py` then compares student and ensemble on the test split
and ships the ensemble instead when the student loses more than `TOLERANCE` of accuracy.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from autotransfer.backbones import Backbone
from autotransfer.features import TRAIN_AND_VAL, ActivationCache, rows_per_batch
from autotransfer.model import TransferModel
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
    scores = _choose(strategy, teacher, backbone, cache, device, metric, candidates) if len(candidates) > 1 else {}
    recipe = max(candidates, key=lambda c: scores.get(c.name, 0.0))  # ties: the first, born-again
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
        return Student(None, recipe, scores, failure=f"the student failed its check: {problem}")
    return Student(result.model, recipe, scores)


def _choose(strategy: Strategy, teacher: nn.Module, backbone: Backbone, cache: ActivationCache,
            device: torch.device | str, metric: str, candidates: tuple[Recipe, ...]) -> dict[str, float]:
    """Validation score of a student trained on the train split alone, per recipe."""
    scores: dict[str, float] = {}
    for recipe in candidates:
        try:
            result = train_trial(strategy, backbone, cache, device=device, metric=metric, fit_split="train",
                                 soft_loss=SoftTargets.of(teacher, recipe), description=f"distil: choose {recipe.name}")
            scores[recipe.name] = result.val_score
        except TrainingDiverged:
            scores[recipe.name] = float("-inf")
    return scores


@torch.no_grad()
def held_out_accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 256) -> float:
    """Top-1 accuracy of `model` (on the CPU, eval mode) on normalised images `x` with labels `y`."""
    model = model.cpu().eval()
    batch_size = rows_per_batch(x.shape[1:], most=batch_size)
    correct = sum(int((model(x[i:i + batch_size]).argmax(1) == y[i:i + batch_size]).sum())
                  for i in range(0, len(x), batch_size))
    return correct / max(1, len(x))
