"""Train one strategy on cached activations and score it on the validation split.

The trainer knows nothing about Optuna: it calls `report(epoch, val_accuracy)` after every epoch, and the
caller decides whether that stops the trial (by raising from the callback).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from autotransfer.backbones import Backbone
from autotransfer.errors import AutotransferError
from autotransfer.features import ActivationCache
from autotransfer.heads import head_loss
from autotransfer.model import TransferModel, build_model
from autotransfer.strategy import Strategy

Report = Callable[[int, float], None]


class TrainingDiverged(AutotransferError):
    """The loss became NaN or infinite; the trial is dropped, the study goes on."""


@dataclass
class TrialResult:
    val_accuracy: float
    epochs_run: int
    seconds: float
    model: TransferModel = field(repr=False)
    history: list[float] = field(default_factory=list)  # validation accuracy after each epoch


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


@torch.no_grad()
def accuracy(forward: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, y: torch.Tensor,
             batch_size: int = 256) -> float:
    correct = 0
    for i in range(0, len(x), batch_size):
        correct += int((forward(x[i:i + batch_size]).argmax(1) == y[i:i + batch_size]).sum())
    return correct / max(1, len(x))


def _set_train_mode(model: TransferModel, strategy: Strategy, backbone_live: bool) -> None:
    """Head in train mode; trainable groups per `strategy.bn`; frozen groups (and all groups during warm-up) eval.

    With `bn == "train"` the running statistics restart every epoch as a plain average over that epoch's
    batches: pretrained BatchNorm momentum (0.01 for the TF-ported Lite0) would otherwise leave them
    describing the old weights, and evaluation would collapse to chance.
    """
    model.train()
    for i in range(strategy.freeze, strategy.tap):
        group = model.groups[i]
        if not backbone_live:
            group.eval()
            continue
        for m in group.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                if strategy.bn == "frozen":
                    m.eval()
                else:
                    m.reset_running_stats()
                    m.momentum = None  # cumulative average over the epoch


def train_trial(strategy: Strategy, backbone: Backbone, cache: ActivationCache, *,
                report: Report | None = None) -> TrialResult:
    """Train `strategy` from the activations at boundary `freeze`; return the final validation accuracy."""
    start_time = time.perf_counter()
    s = strategy
    torch.manual_seed(s.seed)
    model = build_model(s, backbone, len(cache.data.classes))
    if s.trains_backbone:
        start = s.freeze
        x_train, y_train = cache.split(start, "train")
        x_val, y_val = cache.split(start, "val")

        def forward(x: torch.Tensor) -> torch.Tensor:
            return model.forward_from(x, start)
    else:  # pure feature extractor: pool once, then train only the head on vectors
        with torch.no_grad():
            x_train, y_train = cache.split(s.tap, "train")
            x_val, y_val = cache.split(s.tap, "val")
            x_train, x_val = model.pool(x_train), model.pool(x_val)
        forward = model.head

    reference = {n: p.detach().clone() for n, p in model.groups.named_parameters() if p.requires_grad}
    backbone_params = [p for p in model.groups.parameters() if p.requires_grad]
    optimizer = _optimizer(param_groups(model, s), s)
    steps_per_epoch = math.ceil(len(x_train) / s.batch_size)
    total_steps = steps_per_epoch * s.epochs
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * min(step, total_steps) / total_steps)))
    criterion = head_loss(s.head, label_smoothing=s.label_smoothing)
    generator = torch.Generator().manual_seed(s.seed)

    history: list[float] = []
    for epoch in range(s.epochs):
        backbone_live = s.trains_backbone and epoch >= s.warmup_epochs
        for p in backbone_params:
            p.requires_grad_(backbone_live)
        _set_train_mode(model, s, backbone_live)
        order = torch.randperm(len(x_train), generator=generator)
        for i in range(0, len(order), s.batch_size):
            idx = order[i:i + s.batch_size]
            if len(idx) < 2 and i > 0:  # BatchNorm cannot train on a single example
                continue
            loss = criterion(forward(x_train[idx]), y_train[idx])
            if backbone_live and s.l2sp_alpha > 0:
                loss = loss + l2sp_penalty(model, reference, s.l2sp_alpha)
            if not torch.isfinite(loss):
                raise TrainingDiverged(f"loss became {loss.item()} at epoch {epoch + 1}")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
        model.eval()
        history.append(accuracy(forward, x_val, y_val))
        if report is not None:
            report(epoch, history[-1])
    for p in backbone_params:
        p.requires_grad_(True)
    model.eval()
    return TrialResult(val_accuracy=history[-1], epochs_run=len(history), seconds=time.perf_counter() - start_time,
                       model=model, history=history)
