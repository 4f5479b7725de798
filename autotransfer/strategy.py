"""A transfer strategy as plain data, and the one function that draws it from an Optuna trial.

Flow is one way: trial -> `suggest_strategy` -> `Strategy` -> trainer. Nothing else calls
`trial.suggest_*`, so the search space is read in one place.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from autotransfer.augment import AUGMENTS
from autotransfer.errors import ConfigError
from autotransfer.fidelity import MIN_STEPS
from autotransfer.heads import HEADS, POOLS

if TYPE_CHECKING:
    import optuna

OPTIMIZERS = ("sgd", "adamw")
BN_MODES = ("train", "frozen")
CLASS_WEIGHTS = ("none", "balanced")  # "balanced": each class weighs n / (classes * count) in the loss
# What unlabelled images are used for (searched only when some are given; see adapt.py): nothing, their BatchNorm
# statistics (AdaBN), or self-training on their confident pseudo-labels. A fine-tune may add DANN to either.
ADAPTS = ("none", "adabn", "pseudo_label")
DANN_SCHEDULES = ("ramp", "constant")  # gradient-reversal weight over the fine-tune: Ganin's 0 -> 1 ramp, or fixed
# Head LR ranges per optimizer when the backbone trains (head-only trials are fitted by L-BFGS, no LR).
LR_RANGES = {"sgd": (5e-3, 0.1), "adamw": (2e-4, 3e-3)}
# L2 strength of a head fitted to convergence on frozen features (standardised inputs, mean loss + l2/2 ||W||^2).
PROBE_L2_RANGE = (1e-5, 1.0)
DEFAULT_PROBE_L2 = 1e-2  # the linear probe that starts every fine-tune (LP-FT): weaker L2 gives large head
# weights whose gradients jolt the features in the first steps (tiny CNN, SGD 0.02: val 0.13-0.67 after one step
# at 1e-3, 0.32-0.83 at 1e-2)


@dataclass(frozen=True, kw_only=True)
class Strategy:
    """How to transfer: where to tap, what to freeze, which head, how to train and regularise."""

    tap: int  # groups 1..tap run; the output of group `tap` feeds the head
    freeze: int  # groups 1..freeze keep pretrained weights (freeze == tap: pure feature extractor)
    pool: str = "avg"  # "avg" or "avgmax" global pooling of the tapped activations
    head: str = "linear"  # "linear" (softmax), "svm" (multi-class squared hinge) or "mlp"
    mlp_hidden: int = 0  # hidden width of the mlp head (0 for other heads)
    dropout: float = 0.0  # dropout before each linear layer of the head (fine-tuning only)
    lr: float = 0.01  # learning rate of the head when the backbone trains
    lr_ratio: float = 1.0  # lowest trainable group's LR / head LR; geometric in between (0.01 = "100x smaller")
    optimizer: str = "sgd"  # "sgd" (momentum 0.9, Nesterov) or "adamw"
    weight_decay: float = 1e-4  # fine-tune: decoupled decay on weights; head only: the L2 strength of the fit
    l2sp_alpha: float = 0.0  # alpha/2 * ||w - w_pretrained||^2 on trainable backbone weights (0 = off)
    label_smoothing: float = 0.0  # softmax heads only
    bn: str = "frozen"  # BatchNorm of trainable groups: "train" (batch statistics) or "frozen" (running)
    augment: str = "none"  # fine-tuning only: "none", "shift", "crop" or "trivial" (see augment.py)
    flip: bool = False  # random horizontal flips on top of `augment` (wrong for digits and text)
    class_weight: str = "none"  # "none" or "balanced": rare classes weigh more in the loss (searched when imbalanced)
    adapt: str = "none"  # "adabn": BatchNorm statistics of the unlabelled images; "pseudo_label": self-training
    pseudo_fraction: float = 0.0  # of each predicted class, the most confident fraction that gets pseudo-labels
    pseudo_rounds: int = 0  # rounds of pseudo-labelling and refitting the head on frozen features
    dann_weight: float = 0.0  # fine-tuning only: domain-adversarial loss weight behind gradient reversal (0 = off)
    dann_hidden: int = 0  # hidden width of the domain classifier (DANN only)
    dann_schedule: str = "ramp"  # how the reversal weight moves over the steps, one of DANN_SCHEDULES
    im_weight: float = 0.0  # fine-tuning only: information maximisation on unlabelled batches (0 = off; adapt.py)
    steps: int = 0  # optimizer steps of a fine-tune (its cosine schedule); 0 for a head fitted to convergence
    seed: int = 0

    def __post_init__(self) -> None:
        checks = [
            (self.tap >= 1, f"tap must be >= 1, but got tap={self.tap}."),
            (0 <= self.freeze <= self.tap, f"freeze must be in 0..tap={self.tap}, but got freeze={self.freeze}."),
            (self.pool in POOLS, f"pool must be one of {POOLS}, but got pool={self.pool!r}."),
            (self.head in HEADS, f"head must be one of {HEADS}, but got head={self.head!r}."),
            (self.head != "mlp" or self.mlp_hidden >= 1, f"an mlp head needs mlp_hidden >= 1, got {self.mlp_hidden}."),
            (0.0 <= self.dropout < 1.0, f"dropout must be in [0, 1), but got dropout={self.dropout}."),
            (self.lr > 0 and math.isfinite(self.lr), f"lr must be a positive number, but got lr={self.lr}."),
            (0 < self.lr_ratio <= 1.0, f"lr_ratio must be in (0, 1], but got lr_ratio={self.lr_ratio}."),
            (self.optimizer in OPTIMIZERS, f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}."),
            (self.weight_decay >= 0, f"weight_decay must be >= 0, but got {self.weight_decay}."),
            (self.l2sp_alpha >= 0, f"l2sp_alpha must be >= 0, but got {self.l2sp_alpha}."),
            (0 <= self.label_smoothing < 1, f"label_smoothing must be in [0, 1), got {self.label_smoothing}."),
            (self.bn in BN_MODES, f"bn must be one of {BN_MODES}, but got bn={self.bn!r}."),
            (self.augment in AUGMENTS, f"augment must be one of {AUGMENTS}, but got augment={self.augment!r}."),
            (self.class_weight in CLASS_WEIGHTS, f"class_weight must be one of {CLASS_WEIGHTS}, "
                                                 f"but got class_weight={self.class_weight!r}."),
            (self.adapt in ADAPTS, f"adapt must be one of {ADAPTS}, but got adapt={self.adapt!r}."),
            (self.adapt != "pseudo_label" or (0 < self.pseudo_fraction <= 1 and self.pseudo_rounds >= 1),
             f"pseudo-labelling needs pseudo_fraction in (0, 1] and pseudo_rounds >= 1, got {self.pseudo_fraction} "
             f"and {self.pseudo_rounds}."),
            (self.dann_weight >= 0, f"dann_weight must be >= 0, but got dann_weight={self.dann_weight}."),
            (self.dann_weight == 0 or (self.trains_backbone and self.dann_hidden >= 1),
             f"DANN needs a fine-tune (freeze < tap) and dann_hidden >= 1, got freeze={self.freeze}, tap={self.tap}, "
             f"dann_hidden={self.dann_hidden}."),
            (self.dann_schedule in DANN_SCHEDULES, f"dann_schedule must be one of {DANN_SCHEDULES}, "
                                                   f"but got {self.dann_schedule!r}."),
            (self.im_weight >= 0, f"im_weight must be >= 0, but got im_weight={self.im_weight}."),
            (self.im_weight == 0 or self.trains_backbone,
             f"information maximisation needs a fine-tune (freeze < tap), got freeze={self.freeze}, tap={self.tap}."),
            (self.steps >= 0, f"steps must be >= 0, but got steps={self.steps}."),
            (self.steps >= 1 or self.freeze == self.tap, f"a fine-tune needs steps >= 1, but got steps={self.steps}."),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(f"Invalid strategy: {message}")

    @property
    def trains_backbone(self) -> bool:
        return self.freeze < self.tap

    @property
    def seed_independent(self) -> bool:
        """A linear or SVM head on frozen features: a convex fit from zero, the same model whatever the seed."""
        return not self.trains_backbone and self.head in ("linear", "svm")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Strategy:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def describe(self, group_names: tuple[str, ...] | None = None) -> str:
        """One line in words, e.g. 'linear head on stage5 (avgmax pool), backbone frozen (L2 0.001)'."""
        where = group_names[self.tap - 1] if group_names else f"group {self.tap}"
        if not self.trains_backbone:
            body = f"backbone frozen (head fitted to convergence, L2 {self.weight_decay:.2g})"
        else:
            first = group_names[self.freeze] if group_names else f"group {self.freeze + 1}"
            augment = "" if self.augment == "none" else f", {self.augment}{'+flip' if self.flip else ''} augmentation"
            body = (f"fine-tune {first}..{where} after a linear probe ({self.optimizer}, "
                    f"lr {self.lr:.2g}, lowest group x{self.lr_ratio:.2g}"
                    f"{f', L2-SP {self.l2sp_alpha:.2g}' if self.l2sp_alpha else ''}{augment}, {self.steps} steps)")
        weighted = ", class-balanced loss" if self.class_weight == "balanced" else ""
        return f"{self.head} head on {where} ({self.pool} pool), {body}{weighted}{self._describe_adapt()}"

    def _describe_adapt(self) -> str:
        rounds = f"{self.pseudo_rounds} round{'s' if self.pseudo_rounds > 1 else ''}"
        adapted = {"none": "", "adabn": ", BatchNorm statistics of the unlabelled images (AdaBN)",
                   "pseudo_label": f", self-trained on the {self.pseudo_fraction:.0%} most confident unlabelled "
                                   f"images per class ({rounds})"}[self.adapt]
        if self.dann_weight > 0:
            adapted += (f", domain-adversarial (DANN weight {self.dann_weight:.2g} {self.dann_schedule}, "
                        f"classifier width {self.dann_hidden})")
        if self.im_weight > 0:
            adapted += f", information maximisation on the unlabelled images (weight {self.im_weight:.2g})"
        return adapted


@dataclass(frozen=True, kw_only=True)
class SearchSpace:
    """Bounds of the search that depend on the backbone, the data and the budget, not on the trial.

    `min_tap..max_tap` come from the transferability prior (see `prior.py`): taps whose features score far
    below the best are not searched. `max_steps` is the full fine-tuning schedule of the data's step ladder
    (see `fidelity.py`).
    """

    num_groups: int  # G: the backbone's groups
    max_steps: int = MIN_STEPS  # optimizer steps of every fine-tune; the pruner stops most of them early
    min_tap: int = 1
    max_tap: int | None = None  # None: num_groups
    max_trainable: int | None = None  # most groups a trial fine-tunes; None: any number
    seed: int = 0
    imbalanced: bool = False  # the train split's largest class is > 3x its smallest: `class_weight` is searched
    unlabeled: bool = False  # images without labels were given: `adapt` is searched

    @property
    def tap_range(self) -> tuple[int, int]:
        return self.min_tap, self.num_groups if self.max_tap is None else self.max_tap

    @property
    def max_trainable_groups(self) -> int:
        return self.tap_range[1] if self.max_trainable is None else self.max_trainable


def suggest_strategy(trial: optuna.Trial, space: SearchSpace) -> Strategy:
    """Draw one strategy; parameters are only suggested where they matter (define-by-run).

    Every parameter name has one fixed distribution (the LR is named per optimizer, the head-only L2 apart
    from the fine-tuning weight decay), which is what Optuna's multivariate TPE needs to model them jointly.
    """
    tap = trial.suggest_int("tap", *space.tap_range)
    trainable = trial.suggest_int("trainable_groups", 0, space.max_trainable_groups)
    freeze = max(0, tap - trainable)
    head = trial.suggest_categorical("head", HEADS)
    params: dict[str, Any] = dict(
        tap=tap, freeze=freeze, head=head, pool=trial.suggest_categorical("pool", POOLS),
        mlp_hidden=trial.suggest_categorical("mlp_hidden", (128, 256, 512)) if head == "mlp" else 0,
        label_smoothing=trial.suggest_float("label_smoothing", 0.0, 0.2) if head != "svm" else 0.0,
        class_weight=trial.suggest_categorical("class_weight", CLASS_WEIGHTS) if space.imbalanced else "none",
        seed=space.seed, **_suggest_adapt(trial, space))
    if freeze == tap:  # a head on frozen features, fitted to convergence: only its L2 strength matters
        params["weight_decay"] = trial.suggest_float("probe_l2", *PROBE_L2_RANGE, log=True)
        return Strategy(**params)
    optimizer = trial.suggest_categorical("optimizer", OPTIMIZERS)
    augment = trial.suggest_categorical("augment", AUGMENTS)
    params.update(
        optimizer=optimizer,
        lr=trial.suggest_float(f"ft_lr_{optimizer}", *LR_RANGES[optimizer], log=True),
        lr_ratio=trial.suggest_float("lr_ratio", 0.01, 1.0, log=True),
        weight_decay=trial.suggest_float("weight_decay", 1e-6, 1e-1, log=True),
        l2sp_alpha=trial.suggest_float("l2sp_alpha", 1e-4, 1e-1, log=True)
        if trial.suggest_categorical("l2sp", (True, False)) else 0.0,
        bn=trial.suggest_categorical("bn", BN_MODES),
        dropout=trial.suggest_float("dropout", 0.0, 0.5),
        augment=augment,
        flip=trial.suggest_categorical("flip", (False, True)) if augment != "none" else False,
        steps=space.max_steps, **_suggest_dann(trial, space), **_suggest_im(trial, space),
    )
    return Strategy(**params)


def _suggest_adapt(trial: optuna.Trial, space: SearchSpace) -> dict[str, Any]:
    """`adapt` and its parameters, only where unlabelled images were given (else nothing is suggested)."""
    adapt = trial.suggest_categorical("adapt", ADAPTS) if space.unlabeled else "none"
    if adapt != "pseudo_label":
        return dict(adapt=adapt)
    return dict(adapt=adapt, pseudo_fraction=trial.suggest_float("pseudo_fraction", 0.1, 0.9),
                pseudo_rounds=trial.suggest_int("pseudo_rounds", 1, 3))


def _suggest_dann(trial: optuna.Trial, space: SearchSpace) -> dict[str, Any]:
    """A fine-tune's domain-adversarial loss, only where unlabelled images were given (else nothing is suggested)."""
    if not space.unlabeled or not trial.suggest_categorical("dann", (False, True)):
        return {}
    return dict(dann_weight=trial.suggest_float("dann_weight", 0.01, 1.0, log=True),
                dann_hidden=trial.suggest_categorical("dann_hidden", (64, 256, 1024)),
                dann_schedule=trial.suggest_categorical("dann_schedule", DANN_SCHEDULES))


def _suggest_im(trial: optuna.Trial, space: SearchSpace) -> dict[str, Any]:
    """A fine-tune's information-maximisation loss, only where unlabelled images were given."""
    if not space.unlabeled or not trial.suggest_categorical("im", (False, True)):
        return {}
    return dict(im_weight=trial.suggest_float("im_weight", 0.01, 1.0, log=True))


def enqueue_params(strategy: Strategy, space: SearchSpace | None = None) -> dict[str, Any]:
    """The Optuna parameter dict that makes `suggest_strategy` return `strategy` (for enqueue_trial).

    `class_weight` is a parameter only where `space` searches it (imbalanced data); without a space it is
    given when the strategy weighs classes.
    """
    s = strategy
    p: dict[str, Any] = dict(tap=s.tap, trainable_groups=s.tap - s.freeze, head=s.head, pool=s.pool)
    if (space.imbalanced if space is not None else s.class_weight != "none"):
        p["class_weight"] = s.class_weight
    if (space.unlabeled if space is not None else s.adapt != "none"):
        p["adapt"] = s.adapt
        if s.adapt == "pseudo_label":
            p.update(pseudo_fraction=s.pseudo_fraction, pseudo_rounds=s.pseudo_rounds)
    if s.head == "mlp":
        p["mlp_hidden"] = s.mlp_hidden
    if s.head != "svm":
        p["label_smoothing"] = s.label_smoothing
    if not s.trains_backbone:
        p["probe_l2"] = s.weight_decay
        return p
    p.update({"optimizer": s.optimizer, f"ft_lr_{s.optimizer}": s.lr, "lr_ratio": s.lr_ratio,
              "weight_decay": s.weight_decay, "l2sp": s.l2sp_alpha > 0, "bn": s.bn, "dropout": s.dropout,
              "augment": s.augment})
    if s.l2sp_alpha > 0:
        p["l2sp_alpha"] = s.l2sp_alpha
    if s.augment != "none":
        p["flip"] = s.flip
    if (space.unlabeled if space is not None else s.dann_weight > 0):
        p["dann"] = s.dann_weight > 0
        if s.dann_weight > 0:
            p.update(dann_weight=s.dann_weight, dann_hidden=s.dann_hidden, dann_schedule=s.dann_schedule)
    if (space.unlabeled if space is not None else s.im_weight > 0):
        p["im"] = s.im_weight > 0
        if s.im_weight > 0:
            p["im_weight"] = s.im_weight
    return p
