"""Train one strategy on cached activations and score it on the validation split.

Two kinds of trial. A head on frozen features is fitted to convergence by full-batch L-BFGS on the cached
pooled vectors: the same strategy gets the same score whatever its seed, so the search ranks strategies,
not SGD noise. A fine-tune first fits its head the same way (LP-FT), then trains for `strategy.steps`
optimizer steps under a cosine schedule, from the cached activations at its freeze boundary or, when it
augments, from the images (its frozen groups then run every step, without gradients).

The trainer knows nothing about Optuna: a fine-tune calls `report(step, value)` (the validation score in the
study's metric, see `metrics.py`) at the steps in `report_at` and at its last step, and the caller decides
whether that stops the trial (by raising).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import nn

from autotransfer.adapt import Reverse, adabn, information_loss
from autotransfer.augment import augment_batch, build_augment
from autotransfer.backbones import Backbone
from autotransfer.calibration import Margin
from autotransfer.dann import DomainClassifier, reversal_weight
from autotransfer.data import UNLABELED
from autotransfer.device import autocast
from autotransfer.evaluation import accuracy, evaluate, pooled_features, to_input
from autotransfer.features import ActivationCache
from autotransfer.fidelity import BATCH_SIZE
from autotransfer.heads import head_loss
from autotransfer.model import TransferModel, build_model
from autotransfer.probe import TrainingDiverged, class_weights
from autotransfer.progress import progress
from autotransfer.strategy import Strategy
from autotransfer.unlabeled import Pseudo, finish_fine_tune, fit_probe, reverse, training_rows

Report = Callable[[int, float], None]


class SoftLoss(Protocol):
    """The loss of a fine-tune that learns from a teacher (distillation, see `distill.py`)."""

    mixup: bool  # whether student and teacher see in-batch mixes of the inputs (`mix_pairs`) instead of the batch

    def __call__(self, hard: torch.Tensor, logits: torch.Tensor, inputs: torch.Tensor, start: int) -> torch.Tensor:
        """(hard-label loss, student logits, the batch as it enters group `start`, start) -> the loss to minimise."""
        ...


def mix_pairs(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Each row mixed with a random other row of the batch, weight ~ U(0, 1) per row (mixup's inputs).

    Distillation only: the teacher labels the mixed input, so no label has to be mixed, and each step shows
    the student views between the training images (function matching, Beyer et al., 2022).
    """
    n = len(x)
    partner = torch.randperm(n, generator=generator).to(x.device)
    weight = torch.rand(n, generator=generator).to(x).view(n, *([1] * (x.ndim - 1)))
    return weight * x + (1 - weight) * x[partner]


@dataclass
class TrialResult:
    val_accuracy: float
    val_margin: Margin  # orders trials of equal validation score (see `calibration.py`, `ranking.py`)
    train_accuracy: float  # on the data it was fitted to, without augmentation (refits are checked against it)
    steps_run: int  # optimizer steps of a fine-tune; 0 for a head fitted by L-BFGS
    seconds: float
    model: TransferModel = field(repr=False)
    history: list[tuple[int, float]] = field(default_factory=list)  # (step, validation score) at each report
    val_score: float | None = None  # the study's metric (`metric`) on the validation split
    metric: str = "accuracy"
    reverse: Reverse | None = None  # with unlabelled images: reverse validation (see `adapt.py`)

    @property
    def objective(self) -> float:
        """What the search maximises: `val_score`, averaged with the reverse validation when there is one."""
        if self.reverse is None:
            return self.val_score
        return 0.5 * (self.val_score + self.reverse.accuracy)

    @property
    def reverse_accuracy(self) -> float | None:
        return None if self.reverse is None else self.reverse.accuracy


def param_groups(model: TransferModel, strategy: Strategy) -> list[dict]:
    """Optimizer groups: head at `lr`, trainable backbone groups geometrically down to `lr * lr_ratio`.

    The lowest trainable group gets `lr * lr_ratio`, the one under the head `lr * lr_ratio ** (1/n)`.
    Biases and norm parameters (ndim <= 1) get no weight decay; with L2-SP on, backbone weights get none
    either, because the L2-SP penalty pulls them toward the pretrained values instead of toward zero.
    """
    s = strategy
    groups: list[dict] = []

    def add(name: str, module: nn.Module, lr: float, decay: float) -> None:
        params = [p for p in module.parameters() if p.requires_grad]
        decayed = [p for p in params if p.ndim > 1]
        plain = [p for p in params if p.ndim <= 1]
        if decayed:
            groups.append({"name": name, "params": decayed, "lr": lr, "weight_decay": decay})
        if plain:
            groups.append({"name": f"{name}.no_decay", "params": plain, "lr": lr, "weight_decay": 0.0})

    add("head", model.head, s.lr, s.weight_decay)
    n = s.tap - s.freeze
    for j, i in enumerate(range(s.freeze, s.tap)):
        add(f"group{i + 1}", model.groups[i], s.lr * s.lr_ratio ** ((n - j) / n),
            0.0 if s.l2sp_alpha > 0 else s.weight_decay)
    return groups


def l2sp_penalty(model: TransferModel, reference: dict[str, torch.Tensor], alpha: float) -> torch.Tensor:
    """alpha/2 * ||w - w0||^2 over the trainable backbone weights (Li et al., 2018)."""
    total = torch.zeros(())
    for name, p in model.groups.named_parameters():
        if p.requires_grad and name in reference:
            total = total + (p - reference[name]).pow(2).sum()
    return 0.5 * alpha * total


def _optimizer(groups: list[dict], strategy: Strategy) -> torch.optim.Optimizer:
    if strategy.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=strategy.lr, momentum=0.9, nesterov=True)
    return torch.optim.AdamW(groups, lr=strategy.lr)


def _criterion(s: Strategy, y: torch.Tensor, num_classes: int, device: torch.device) -> nn.Module:
    """The head's loss, class-weighted on the labels `y` it trains on when the strategy says so."""
    weight = class_weights(s, y, num_classes)
    return head_loss(s.head, label_smoothing=s.label_smoothing, weight=None if weight is None else weight.to(device))


@contextlib.contextmanager
def running_statistics_kept(module: nn.Module) -> Iterator[None]:
    """Inside, `module`'s BatchNorm layers still normalise by the batch but leave their running statistics as
    they are (momentum 0): a pass over unlabelled rows must not move the head's statistics, by which the labelled
    validation split is scored."""
    norms = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [m.momentum for m in norms]
    for m in norms:
        m.momentum = 0.0
    try:
        yield
    finally:
        for m, momentum in zip(norms, saved, strict=True):
            m.momentum = momentum


def _set_train_mode(model: TransferModel, strategy: Strategy, *, new_epoch: bool = True) -> None:
    """Head in train mode; trainable groups per `strategy.bn`; frozen groups in eval mode.

    With `bn == "train"` the running statistics restart every epoch as a plain average over that epoch's
    batches: pretrained BatchNorm momentum (0.01 for the TF-ported Lite0) would otherwise leave them
    describing the old weights, and evaluation would collapse to chance.
    """
    model.train()
    for i in range(strategy.freeze, strategy.tap):
        for m in model.groups[i].modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                if strategy.bn == "frozen":
                    m.eval()
                elif new_epoch:
                    m.reset_running_stats()
                    m.momentum = None  # cumulative average over the epoch


def train_trial(strategy: Strategy, backbone: Backbone, cache: ActivationCache, *, report: Report | None = None,
                report_at: Sequence[int] = (), device: torch.device | str = "cpu", use_cache: bool = True,
                fit_split: str = "train", metric: str = "accuracy", description: str = "fine-tune",
                soft_loss: SoftLoss | None = None) -> TrialResult:
    """Train `strategy`; return its final validation accuracy and `metric` (and its accuracy on the data it
    was fitted to). Reports at `report_at` and the history are in `metric`, the study's objective.

    A fine-tune shows its optimizer steps as a progress named `description` (see `progress.py`); a head
    fitted by L-BFGS takes seconds and shows none.
    `use_cache=False` computes everything from the images instead (the naive baseline of
    `benchmarks/search_speed.py`); the training itself is the same.
    `fit_split="train+val"` trains on both splits (the final refit, see `refit.py`); the validation accuracy
    it returns then scores training data and is no estimate of anything.
    `soft_loss` replaces a fine-tune's loss on each batch (a teacher's soft targets, see `distill.py`).
    With unlabelled images in the cache, the strategy's `adapt` and DANN use them (see `unlabeled.py`), and a
    trial on the train split is also scored by reverse validation.
    """
    start_time = time.perf_counter()
    s = strategy
    device = torch.device(device)
    torch.manual_seed(s.seed)
    model = build_model(s, backbone, len(cache.data.classes)).to(device, memory_format=torch.channels_last)
    x_fit, y_fit = pooled_features(model, cache, fit_split, use_cache, device)
    pseudo = fit_probe(model, s, cache, x_fit, y_fit, use_cache, device)
    # Reverse validation where validation cannot see the unlabelled images' setting: not on a refit (its
    # "validation" is training data), nor when the validation images are `--val`, from that setting.
    scored = fit_split == "train" and cache.data.unlabeled_count > 0 and not cache.data.target_val
    if s.trains_backbone:
        result = _fine_tune(model, s, cache, fit_split, device, report, report_at, use_cache, start_time, metric,
                            description, soft_loss, pseudo)
        result.reverse = finish_fine_tune(result.model, s, cache, use_cache, scored)
        return result
    x_val, y_val = pooled_features(model, cache, "val", use_cache, device)
    with torch.no_grad():
        val, val_score, margin = evaluate(model.head, x_val, y_val, cache, device, metric)
        train = accuracy(model.head, x_fit, y_fit, cache, device)
    adapted = s.adapt == "adabn" and cache.data.unlabeled_count > 0
    x_unlabeled = pooled_features(model, cache, UNLABELED, use_cache, device)[0] if scored or adapted else None
    if adapted:
        adabn(model.head[0], x_unlabeled.to(device))
    rev = reverse(model.head, x_unlabeled, x_val, y_val, cache, device) if scored else None
    model = model.eval().to("cpu", memory_format=torch.contiguous_format)
    return TrialResult(val_accuracy=val, val_margin=margin, train_accuracy=train, steps_run=0,
                       seconds=time.perf_counter() - start_time, model=model, val_score=val_score, metric=metric,
                       reverse=rev)


def _batches(n: int, steps: int, generator: torch.Generator, *, on_epoch: Callable[[], None]):
    """`steps` index batches of BATCH_SIZE, epoch after epoch of fresh permutations; `on_epoch` at each start.

    An epoch ends early rather than yield a single example (BatchNorm cannot train on one).
    """
    order, position = torch.empty(0, dtype=torch.long), 0
    for _ in range(steps):
        if position + 2 > len(order):
            order, position = torch.randperm(n, generator=generator), 0
            on_epoch()
        yield order[position:position + BATCH_SIZE]
        position += BATCH_SIZE


@dataclass
class _BatchLoss:
    """The loss of one fine-tuning batch: the head's loss (or `soft_loss` on it), the L2-SP penalty, and with
    DANN the domain classifier's loss and with information maximisation the head's on as many unlabelled rows as
    the batch has labelled ones."""

    model: TransferModel
    s: Strategy
    cache: ActivationCache
    start: int  # the boundary the batches enter at
    criterion: nn.Module
    device: torch.device
    augment: nn.Module | None
    generator: torch.Generator
    soft_loss: SoftLoss | None = None
    reference: dict[str, torch.Tensor] = field(default_factory=dict)  # pretrained weights, for L2-SP
    adversary: DomainClassifier | None = None
    x_target: torch.Tensor | None = None  # unlabelled rows at `start` (DANN, information maximisation)

    def __call__(self, batch: torch.Tensor, labels: torch.Tensor, progress_done: float) -> torch.Tensor:
        n = len(batch)
        if self.x_target is not None:
            drawn = torch.randint(len(self.x_target), (n,), generator=self.generator)
            batch = torch.cat([batch, self.x_target[drawn]])
        if self.augment is not None:
            batch = augment_batch(batch, self.augment)
        with autocast(self.device):
            inputs = to_input(batch, self.device, self.cache)
            if self.soft_loss is not None and self.soft_loss.mixup:
                inputs = torch.cat([mix_pairs(inputs[:n], self.generator), inputs[n:]])
            features = self.model.features_from(inputs, self.start)
            logits = self.model.head(features[:n]).float()
            loss = self.criterion(logits, labels)
            loss = loss if self.soft_loss is None else self.soft_loss(loss, logits, inputs[:n], self.start)
            if self.adversary is not None:
                s = self.s
                loss = loss + self.adversary.loss(features, n, reversal_weight(s.dann_weight, s.dann_schedule,
                                                                               progress_done))
            if self.s.im_weight > 0 and self.x_target is not None:
                with running_statistics_kept(self.model.head):  # they describe the labelled images
                    target_logits = self.model.head(features[n:]).float()
                loss = loss + self.s.im_weight * information_loss(target_logits)
        if self.s.l2sp_alpha > 0:
            loss = loss + l2sp_penalty(self.model, self.reference, self.s.l2sp_alpha)
        return loss


def _batch_loss(model: TransferModel, s: Strategy, cache: ActivationCache, start: int, criterion: nn.Module,
                device: torch.device, soft_loss: SoftLoss | None) -> _BatchLoss:
    """The batch loss of a fine-tune, with its domain classifier when `s` uses DANN and unlabelled rows exist."""
    reference = {n: p.detach().clone() for n, p in model.groups.named_parameters() if p.requires_grad}
    loss = _BatchLoss(model, s, cache, start, criterion, device, build_augment(s.augment, cache.data.image_size,
                      flip=s.flip), torch.Generator().manual_seed(s.seed), soft_loss, reference)
    if (s.dann_weight > 0 or s.im_weight > 0) and cache.data.unlabeled_count > 0:
        loss.x_target = cache.split(start, UNLABELED)[0]
    if s.dann_weight > 0 and loss.x_target is not None:
        loss.adversary = DomainClassifier(model.head[0].num_features, s.dann_hidden).to(device)
    return loss


def _fine_tune(model: TransferModel, s: Strategy, cache: ActivationCache, fit_split: str, device: torch.device,
               report: Report | None, report_at: Sequence[int], use_cache: bool, start_time: float, metric: str,
               description: str, soft_loss: SoftLoss | None = None, pseudo: Pseudo | None = None) -> TrialResult:
    """`s.steps` optimizer steps from the fitted head (on `pseudo`-labelled rows too); reports validation `metric`
    at `report_at` and at the end."""
    # From the freeze boundary or the nearest stored one below; augmented views are new: from the images.
    evaluate_from = cache.start_boundary(s.freeze) if use_cache else 0
    start = evaluate_from if s.augment == "none" else 0
    x_train, y_train = training_rows(cache, start, fit_split, pseudo)
    x_fit_eval, _ = cache.split(evaluate_from, fit_split)
    x_val, y_val = cache.split(evaluate_from, "val")
    batch_loss = _batch_loss(model, s, cache, start, _criterion(s, y_train, len(cache.data.classes), device),
                             device, soft_loss)
    domain = [] if batch_loss.adversary is None else [
        {"name": "domain", "params": list(batch_loss.adversary.parameters()), "lr": s.lr, "weight_decay": 0.0}]
    optimizer = _optimizer(param_groups(model, s) + domain, s)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=s.steps)
    y_train = y_train.to(device)
    checkpoints = set(report_at) if report is not None else set()

    forward_eval = lambda x: model.forward_from(x, evaluate_from)
    def validate() -> float:
        model.eval()
        value = evaluate(forward_eval, x_val, y_val, cache, device, metric)[1]
        _set_train_mode(model, s, new_epoch=False)
        return value

    history, step = [], 0  # (step, validation score) at each report; optimizer steps taken
    with progress(s.steps, description, "steps") as shown:  # one cheap update per step
        for idx in _batches(len(x_train), s.steps, batch_loss.generator, on_epoch=lambda: _set_train_mode(model, s)):
            loss = batch_loss(x_train[idx], y_train[idx.to(device)], step / s.steps)
            if not torch.isfinite(loss):
                raise TrainingDiverged(f"loss became {loss.item()} at step {step + 1}")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            step += 1
            shown.update()
            if step in checkpoints and step < s.steps:
                history.append((step, validate()))
                report(step, history[-1][1])
    model.eval()
    val, val_score, margin = evaluate(forward_eval, x_val, y_val, cache, device, metric)
    history.append((step, val_score))
    if report is not None:
        report(step, history[-1][1])
    train = accuracy(forward_eval, x_fit_eval, cache.labels[cache.slices[fit_split]], cache, device)
    model = model.eval().to("cpu", memory_format=torch.contiguous_format)
    return TrialResult(val_accuracy=val, val_margin=margin, train_accuracy=train, steps_run=step,
                       seconds=time.perf_counter() - start_time, model=model, history=history, val_score=val_score,
                       metric=metric)
