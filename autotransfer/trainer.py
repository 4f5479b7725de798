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
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from autotransfer.adapt import reverse_accuracy, self_train
from autotransfer.augment import augment_batch, build_augment
from autotransfer.backbones import Backbone
from autotransfer.calibration import Margin
from autotransfer.data import UNLABELED
from autotransfer.device import autocast, threads
from autotransfer.errors import AutotransferError
from autotransfer.evaluation import accuracy, evaluate, logits_of, to_input
from autotransfer.features import ActivationCache, rows_per_batch
from autotransfer.fidelity import BATCH_SIZE
from autotransfer.heads import head_loss
from autotransfer.metrics import balanced_class_weights
from autotransfer.model import TransferModel, build_model
from autotransfer.progress import progress
from autotransfer.strategy import DEFAULT_PROBE_L2, Strategy

Report = Callable[[int, float], None]
# (hard-label loss, student logits, the batch as it enters group `start`, start) -> the loss to minimise; a
# fine-tune that learns from a teacher (distillation, see `distill.py`) passes one.
SoftLoss = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, int], torch.Tensor]
Pseudo = tuple[torch.Tensor, torch.Tensor]  # (rows of the unlabelled split, their pseudo-labels)
LBFGS_ITERATIONS = 300  # converged: digits probes move by less than one validation image past ~100


class TrainingDiverged(AutotransferError):
    """The loss became NaN or infinite; the trial is dropped, the study goes on."""


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
    reverse_accuracy: float | None = None  # with unlabelled images: reverse validation (see `adapt.py`)

    @property
    def objective(self) -> float:
        """What the search maximises: `val_score`, averaged with the reverse validation when there is one."""
        if self.reverse_accuracy is None:
            return self.val_score
        return 0.5 * (self.val_score + self.reverse_accuracy)


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


def class_weights(strategy: Strategy, y: torch.Tensor, num_classes: int) -> torch.Tensor | None:
    """Per-class loss weights of `strategy.class_weight` on the labels it trains on (None: unweighted)."""
    return balanced_class_weights(y.cpu(), num_classes) if strategy.class_weight == "balanced" else None


def _criterion(s: Strategy, y: torch.Tensor, num_classes: int, device: torch.device) -> nn.Module:
    """The head's loss, class-weighted on the labels `y` it trains on when the strategy says so."""
    weight = class_weights(s, y, num_classes)
    return head_loss(s.head, label_smoothing=s.label_smoothing, weight=None if weight is None else weight.to(device))


def fit_head(head: nn.Sequential, x: torch.Tensor, y: torch.Tensor, strategy: Strategy, *,
             l2: float | None = None, weight: torch.Tensor | None = None) -> None:
    """Fit a head to convergence on pooled features `x` by full-batch L-BFGS (in place).

    The head's BatchNorm standardises with the statistics of `x` (its affine part stays the identity), the
    final linear layer starts at zero, and the loss is convex for linear and SVM heads: the fit does not
    depend on the seed. `l2` (default: the strategy's `weight_decay`) penalises l2/2 * ||W||^2; `weight`
    weighs each class in the loss.
    """
    l2 = strategy.weight_decay if l2 is None else l2
    norm, layers = head[0], head[1:]
    with torch.no_grad():
        norm.running_mean.copy_(x.mean(0))
        norm.running_var.copy_(x.var(0, unbiased=False))
        layers[-1].weight.zero_()
        layers[-1].bias.zero_()
    head.eval()  # BatchNorm on the statistics just set, dropout off: a deterministic objective
    params = [p for p in layers.parameters() if p.requires_grad]
    weights = [p for p in params if p.ndim > 1]
    criterion = head_loss(strategy.head, label_smoothing=strategy.label_smoothing,
                          weight=None if weight is None else weight.to(x.device))
    optimizer = torch.optim.LBFGS(params, lr=1.0, max_iter=LBFGS_ITERATIONS, history_size=20,
                                  tolerance_grad=1e-6, tolerance_change=1e-9, line_search_fn="strong_wolfe")
    features = norm(x).detach()

    def closure() -> torch.Tensor:
        optimizer.zero_grad(set_to_none=True)
        loss = criterion(layers(features), y) + 0.5 * l2 * sum(w.pow(2).sum() for w in weights)
        if not torch.isfinite(loss):
            raise TrainingDiverged(f"loss became {loss.item()} in the head's L-BFGS fit")
        loss.backward()
        return loss

    optimizer.step(closure)


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


def _pooled(model: TransferModel, cache: ActivationCache, split: str, use_cache: bool,
            device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Pooled features at the tap for one split: cached, or (the naive baseline) computed from the images."""
    tap = len(model.groups)
    if use_cache:
        return cache.pooled(tap, model.pool.kind, split)
    x, y = cache.split(0, split)
    model.eval()
    step = rows_per_batch(x.shape[1:])
    with torch.no_grad():
        feats = [model.pool(nn.Sequential(*model.groups)(to_input(x[i:i + step], device, cache))).float().cpu()
                 for i in range(0, len(x), step)]
    return torch.cat(feats), y


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
    """
    start_time = time.perf_counter()
    s = strategy
    device = torch.device(device)
    torch.manual_seed(s.seed)
    model = build_model(s, backbone, len(cache.data.classes)).to(device, memory_format=torch.channels_last)
    x_fit, y_fit = _pooled(model, cache, fit_split, use_cache, device)
    pseudo = _fit_probe(model, s, cache, x_fit, y_fit, use_cache, device)
    scored = fit_split == "train" and cache.data.unlabeled_count > 0  # a refit's "validation" is training data
    if not s.trains_backbone:
        x_val, y_val = _pooled(model, cache, "val", use_cache, device)
        with torch.no_grad():
            val, val_score, margin = evaluate(model.head, x_val, y_val, cache, device, metric)
            train = accuracy(model.head, x_fit, y_fit, cache, device)
            x_unlabeled = _pooled(model, cache, UNLABELED, use_cache, device)[0] if scored else None
            reverse = _reverse(model.head, x_unlabeled, x_val, y_val, cache, device) if scored else None
        model = model.eval().to("cpu", memory_format=torch.contiguous_format)
        return TrialResult(val_accuracy=val, val_margin=margin, train_accuracy=train, steps_run=0,
                           seconds=time.perf_counter() - start_time, model=model, val_score=val_score, metric=metric,
                           reverse_accuracy=reverse)
    result = _fine_tune(model, s, cache, fit_split, device, report, report_at, use_cache, start_time, metric,
                        description, soft_loss, pseudo)
    if scored:
        result.reverse_accuracy = _reverse_of_fine_tune(result.model, s, cache, use_cache, device)
    return result


def _fit_probe(model: TransferModel, s: Strategy, cache: ActivationCache, x_fit: torch.Tensor, y_fit: torch.Tensor,
               use_cache: bool, device: torch.device) -> Pseudo | None:
    """Fit the head on the pooled features by L-BFGS (self-trained when `s.adapt` says so); the pseudo-labels
    of the last round, or None."""
    num_classes = len(cache.data.classes)

    def fit(x: torch.Tensor, y: torch.Tensor) -> None:
        fit_head(model.head, x.to(device), y.to(device), s, l2=None if not s.trains_backbone else DEFAULT_PROBE_L2,
                 weight=class_weights(s, y, num_classes))

    with threads(1) if device.type == "cpu" else contextlib.nullcontext():  # tiny full-batch matrix products
        if s.adapt != "pseudo_label":
            fit(x_fit, y_fit)
            return None
        x_unlabeled = _pooled(model, cache, UNLABELED, use_cache, device)[0]
        return self_train(fit, model.head, x_fit.to(device), y_fit.to(device), x_unlabeled.to(device),
                          fraction=s.pseudo_fraction, rounds=s.pseudo_rounds)


_REVERSE_HEAD = Strategy(tap=1, freeze=1, head="linear", weight_decay=DEFAULT_PROBE_L2)


def _reverse(head: nn.Module, x_unlabeled: torch.Tensor, x_val: torch.Tensor, y_val: torch.Tensor,
             cache: ActivationCache, device: torch.device) -> float:
    """Reverse validation (see `adapt.py`) of `head` on pooled features of the unlabelled and validation images."""
    logits = logits_of(head, x_unlabeled, cache, device)
    with threads(1) if device.type == "cpu" else contextlib.nullcontext():
        return reverse_accuracy(x_unlabeled, logits, x_val, y_val,
                                lambda h, x, y: fit_head(h, x, y, _REVERSE_HEAD), len(cache.data.classes))


def _reverse_of_fine_tune(model: TransferModel, s: Strategy, cache: ActivationCache, use_cache: bool,
                          device: torch.device | str) -> float:
    """Reverse validation of a fine-tuned model, on its own pooled features (on the CPU, where it is returned)."""
    start = cache.start_boundary(s.freeze) if use_cache else 0
    features = lambda x: model.features_from(x, start)
    x_unlabeled = logits_of(features, cache.split(start, UNLABELED)[0], cache, "cpu")
    x_val, y_val = cache.split(start, "val")
    return _reverse(model.head, x_unlabeled, logits_of(features, x_val, cache, "cpu"), y_val, cache,
                    torch.device("cpu"))


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


class _Rows:
    """Rows `rows` of a stored array, indexed like a tensor of them (one batch is copied at a time, never all)."""

    def __init__(self, x: torch.Tensor, rows: torch.Tensor) -> None:
        self.x, self.rows = x, rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, idx: torch.Tensor) -> torch.Tensor:
        return self.x[self.rows[idx]]


def _training_rows(cache: ActivationCache, start: int, fit_split: str,
                   pseudo: Pseudo | None) -> tuple[torch.Tensor | _Rows, torch.Tensor]:
    """(rows, labels) a fine-tune draws its batches from: the split `fit_split` at boundary `start`, and the
    pseudo-labelled unlabelled rows after it."""
    x, y = cache.split(start, fit_split)
    if pseudo is None:
        return x, y
    fit, unlabeled = cache.slices[fit_split], cache.slices[UNLABELED]
    rows = torch.cat([torch.arange(fit.start, fit.stop), unlabeled.start + pseudo[0].cpu()])
    return _Rows(cache.boundary(start), rows), torch.cat([y, pseudo[1].cpu()])


def _fine_tune(model: TransferModel, s: Strategy, cache: ActivationCache, fit_split: str, device: torch.device,
               report: Report | None, report_at: Sequence[int], use_cache: bool, start_time: float, metric: str,
               description: str, soft_loss: SoftLoss | None = None, pseudo: Pseudo | None = None) -> TrialResult:
    """`s.steps` optimizer steps from the fitted head (on `pseudo`-labelled rows too); reports validation `metric`
    at `report_at` and at the end."""
    augment = build_augment(s.augment, cache.data.image_size, flip=s.flip)
    # From the freeze boundary or the nearest stored one below; augmented views are new: from the images.
    evaluate_from = cache.start_boundary(s.freeze) if use_cache else 0
    start = evaluate_from if augment is None else 0
    x_train, y_train = _training_rows(cache, start, fit_split, pseudo)
    x_fit_eval, _ = cache.split(evaluate_from, fit_split)
    x_val, y_val = cache.split(evaluate_from, "val")
    reference = {n: p.detach().clone() for n, p in model.groups.named_parameters() if p.requires_grad}
    optimizer = _optimizer(param_groups(model, s), s)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=s.steps)
    criterion = _criterion(s, y_train, len(cache.data.classes), device)
    generator = torch.Generator().manual_seed(s.seed)
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
        for idx in _batches(len(x_train), s.steps, generator, on_epoch=lambda: _set_train_mode(model, s)):
            batch = x_train[idx]
            if augment is not None:
                batch = augment_batch(batch, augment)
            with autocast(device):
                inputs = to_input(batch, device, cache)
                logits = model.forward_from(inputs, start).float()
                loss = criterion(logits, y_train[idx.to(device)])
                loss = loss if soft_loss is None else soft_loss(loss, logits, inputs, start)
            loss = loss + l2sp_penalty(model, reference, s.l2sp_alpha) if s.l2sp_alpha > 0 else loss
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
