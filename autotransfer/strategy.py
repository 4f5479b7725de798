"""A transfer strategy as plain data, and the one function that draws it from an Optuna trial.

Flow is one way: trial -> `suggest_strategy` -> `Strategy` -> trainer. Nothing else calls
`trial.suggest_*`, so the search space is read in one place.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from autotransfer.defaults import DEFAULT_MAX_EPOCHS
from autotransfer.errors import ConfigError
from autotransfer.heads import HEADS, POOLS

if TYPE_CHECKING:
    import optuna

OPTIMIZERS = ("sgd", "adamw")
BN_MODES = ("train", "frozen")
HEAD_ONLY_EPOCHS = 15  # converged: 10, 15 and 30 epochs score the same on digits (Lite0 stage5/6 probes)
PROBE_LR = 0.05  # SGD LR of the linear probe that starts an LP-FT trial (BatchNorm'd inputs: robust)
BATCH_SIZES = (64, 128)
# Fine-tuning starts from a fitted head: fast.ai's one frozen epoch, or LP-FT's converged probe. On cached
# features either costs about a second; a random head on small data gets so few steps per epoch that such
# trials reach epoch 1 near chance and are pruned, wasting their epoch.
PROBE_EPOCHS = (1, HEAD_ONLY_EPOCHS)
# Head LR ranges per optimizer: a head on frozen features takes large steps; a fine-tune needs small ones.
LR_RANGES = {("sgd", False): (1e-3, 0.3), ("adamw", False): (1e-4, 1e-2),
             ("sgd", True): (5e-3, 0.1), ("adamw", True): (2e-4, 3e-3)}


@dataclass(frozen=True, kw_only=True)
class Strategy:
    """How to transfer: where to tap, what to freeze, which head, how to train and regularise."""

    tap: int  # groups 1..tap run; the output of group `tap` feeds the head
    freeze: int  # groups 1..freeze keep pretrained weights (freeze == tap: pure feature extractor)
    pool: str = "avg"  # "avg" or "avgmax" global pooling of the tapped activations
    head: str = "linear"  # "linear" (softmax), "svm" (multi-class hinge) or "mlp"
    mlp_hidden: int = 0  # hidden width of the mlp head (0 for other heads)
    dropout: float = 0.0  # dropout before each linear layer of the head
    lr: float = 0.01  # learning rate of the head
    lr_ratio: float = 1.0  # lowest trainable group's LR / head LR; geometric in between (0.01 = "100x smaller")
    optimizer: str = "sgd"  # "sgd" (momentum 0.9, Nesterov) or "adamw"
    weight_decay: float = 1e-4  # on weights with ndim >= 2 of the head, and of the backbone unless L2-SP is on
    l2sp_alpha: float = 0.0  # alpha/2 * ||w - w_pretrained||^2 on trainable backbone weights (0 = off)
    label_smoothing: float = 0.0  # softmax heads only
    bn: str = "frozen"  # BatchNorm of trainable groups: "train" (batch statistics) or "frozen" (running)
    probe_epochs: int = 0  # head-only epochs on cached features before the backbone trains (15: LP-FT, 1: fast.ai)
    epochs: int = HEAD_ONLY_EPOCHS
    batch_size: int = 64
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
            (self.probe_epochs >= 0, f"probe_epochs must be >= 0, but got {self.probe_epochs}."),
            (self.epochs >= 1, f"epochs must be >= 1, but got epochs={self.epochs}."),
            (self.batch_size >= 1, f"batch_size must be >= 1, but got batch_size={self.batch_size}."),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(f"Invalid strategy: {message}")

    @property
    def trains_backbone(self) -> bool:
        return self.freeze < self.tap

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Strategy:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def describe(self, group_names: tuple[str, ...] | None = None) -> str:
        """One line in words, e.g. 'linear head on stage5 (avgmax), backbone frozen'."""
        where = group_names[self.tap - 1] if group_names else f"group {self.tap}"
        if not self.trains_backbone:
            body = "backbone frozen"
        else:
            first = group_names[self.freeze] if group_names else f"group {self.freeze + 1}"
            probe = f" after a {self.probe_epochs}-epoch probe" if self.probe_epochs else ""
            body = (f"fine-tune {first}..{where}{probe} ({self.optimizer}, "
                    f"lr {self.lr:.2g}, lowest group x{self.lr_ratio:.2g}"
                    f"{f', L2-SP {self.l2sp_alpha:.2g}' if self.l2sp_alpha else ''}, {self.epochs} epochs)")
        return f"{self.head} head on {where} ({self.pool} pool), {body}"


@dataclass(frozen=True, kw_only=True)
class SearchSpace:
    """Bounds of the search that depend on the backbone, the data and the budget, not on the trial.

    `min_tap..max_tap` and `max_trainable` come from the transferability prior (see `prior.py`): taps
    whose features score far below the best are not searched, and small data sets fine-tune at most a
    few groups under the tap.
    """

    num_groups: int  # G: the backbone's groups
    max_epochs: int = DEFAULT_MAX_EPOCHS  # head-only trials use HEAD_ONLY_EPOCHS
    min_tap: int = 1
    max_tap: int = 0  # 0: num_groups
    max_trainable: int = 0  # most groups a trial fine-tunes; 0: any number
    seed: int = 0

    @property
    def tap_range(self) -> tuple[int, int]:
        return self.min_tap, self.max_tap or self.num_groups

    @property
    def trainable_range(self) -> int:
        return self.max_trainable or self.tap_range[1]


def suggest_strategy(trial: optuna.Trial, space: SearchSpace) -> Strategy:
    """Draw one strategy; parameters are only suggested where they matter (define-by-run).

    Every parameter name has one fixed distribution (the LR is named per optimizer and per mode), which
    is what Optuna's multivariate TPE needs to model them jointly.
    """
    tap = trial.suggest_int("tap", *space.tap_range)
    trainable = trial.suggest_int("trainable_groups", 0, space.trainable_range)
    freeze = max(0, tap - trainable)
    head = trial.suggest_categorical("head", HEADS)
    optimizer = trial.suggest_categorical("optimizer", OPTIMIZERS)
    fine_tune = freeze < tap
    params: dict[str, Any] = dict(
        tap=tap,
        freeze=freeze,
        pool=trial.suggest_categorical("pool", POOLS),
        head=head,
        mlp_hidden=trial.suggest_categorical("mlp_hidden", (128, 256, 512)) if head == "mlp" else 0,
        dropout=trial.suggest_float("dropout", 0.0, 0.5),
        optimizer=optimizer,
        lr=trial.suggest_float(f"{'ft_' if fine_tune else ''}lr_{optimizer}", *LR_RANGES[optimizer, fine_tune],
                               log=True),
        weight_decay=trial.suggest_float("weight_decay", 1e-6, 1e-2, log=True),
        label_smoothing=trial.suggest_float("label_smoothing", 0.0, 0.2) if head != "svm" else 0.0,
        batch_size=trial.suggest_categorical("batch_size", BATCH_SIZES),
        seed=space.seed,
    )
    if fine_tune:
        params.update(
            epochs=trial.suggest_int("epochs", 1, space.max_epochs),
            lr_ratio=trial.suggest_float("lr_ratio", 0.01, 1.0, log=True),
            l2sp_alpha=trial.suggest_float("l2sp_alpha", 1e-4, 1e-1, log=True)
            if trial.suggest_categorical("l2sp", (True, False)) else 0.0,
            bn=trial.suggest_categorical("bn", BN_MODES),
            probe_epochs=trial.suggest_categorical("probe_epochs", PROBE_EPOCHS),
        )
    return Strategy(**params)


def enqueue_params(strategy: Strategy) -> dict[str, Any]:
    """The Optuna parameter dict that makes `suggest_strategy` return `strategy` (for enqueue_trial)."""
    s = strategy
    fine_tune = s.trains_backbone
    p: dict[str, Any] = dict(tap=s.tap, trainable_groups=s.tap - s.freeze, head=s.head, pool=s.pool,
                             dropout=s.dropout, optimizer=s.optimizer, weight_decay=s.weight_decay,
                             batch_size=s.batch_size)
    p[f"{'ft_' if fine_tune else ''}lr_{s.optimizer}"] = s.lr
    if s.head == "mlp":
        p["mlp_hidden"] = s.mlp_hidden
    if s.head != "svm":
        p["label_smoothing"] = s.label_smoothing
    if fine_tune:
        p.update(epochs=s.epochs, lr_ratio=s.lr_ratio, l2sp=s.l2sp_alpha > 0, bn=s.bn, probe_epochs=s.probe_epochs)
        if s.l2sp_alpha > 0:
            p["l2sp_alpha"] = s.l2sp_alpha
    return p
