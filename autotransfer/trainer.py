"""Train one strategy on cached activations and score it on the validation split.

The trainer knows nothing about Optuna: a fine-tuning trial calls `report(step, val_accuracy)` every half
epoch, and the caller decides whether that stops the trial (by raising from the callback).
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from autotransfer.backbones import Backbone
from autotransfer.device import autocast, threads
from autotransfer.errors import AutotransferError
from autotransfer.features import ActivationCache
from autotransfer.heads import head_loss
from autotransfer.model import TransferModel, build_model
from autotransfer.strategy import PROBE_LR, Strategy

Report = Callable[[int, float], None]
# Validation checkpoints per fine-tuning epoch: a pruner can stop a hopeless trial after half an epoch. Each costs
# one pass over the validation split through the trainable groups, a few percent of an epoch.
REPORTS_PER_EPOCH = 2


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
             cache: ActivationCache, device: torch.device | str = "cpu", batch_size: int = 256) -> float:
    """Top-1 accuracy of `forward` on stored rows `x` of `cache` (any boundary, any stored dtype)."""
    correct = 0
    device = torch.device(device)
    for i in range(0, len(x), batch_size):
        with autocast(device):
            logits = forward(_to_input(x[i:i + batch_size], device, cache))
        correct += int((logits.argmax(1).cpu() == y[i:i + batch_size]).sum())
    return correct / max(1, len(x))


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


def _to_input(x: torch.Tensor, device: torch.device, cache: ActivationCache) -> torch.Tensor:
    """Stored rows (uint8 images, float16/32 activations, maybe memory-mapped) -> float32 input on `device`.

    The stored dtype crosses to the device (half or a quarter of the bytes), conversion happens there.
    """
    x = cache.as_input(x.to(device, non_blocking=True))
    return x.contiguous(memory_format=torch.channels_last) if x.ndim == 4 else x


def _probe_head(model: TransferModel, strategy: Strategy, backbone: Backbone, cache: ActivationCache,
                device: torch.device, use_cache: bool = True, fit_split: str = "train") -> None:
    """Train the head alone for `probe_epochs` on the cached tapped features, before the backbone trains.

    A random head's gradients wreck pretrained features in the first steps; a fitted one does not (LP-FT,
    Kumar et al., 2022, with a converged probe; fast.ai's `fine_tune` with one frozen epoch). On cached
    vectors the probe costs about a second.
    """
    probe = dataclasses.replace(strategy, freeze=strategy.tap, epochs=strategy.probe_epochs, optimizer="sgd",
                                lr=PROBE_LR, l2sp_alpha=0.0, probe_epochs=0)
    fitted = train_trial(probe, backbone, cache, device=device, use_cache=use_cache, fit_split=fit_split).model
    model.head.load_state_dict(fitted.head.state_dict())


def train_trial(strategy: Strategy, backbone: Backbone, cache: ActivationCache, *, report: Report | None = None,
                device: torch.device | str = "cpu", use_cache: bool = True, fit_split: str = "train") -> TrialResult:
    """Train `strategy` from the activations at boundary `freeze`; return the final validation accuracy.

    `report(step, val_accuracy)` is called every 1/REPORTS_PER_EPOCH of a fine-tuning epoch (step counts
    from 1); head-only trials take about a second and report nothing, so a pruner only ever stops expensive
    trials.
    `use_cache=False` runs every batch through the whole model from the images instead (the naive
    baseline of `benchmarks/search_speed.py`); the training itself is the same.
    `fit_split="train+val"` trains on both splits (the final refit, see `refit.py`); the validation accuracy
    it returns then scores training data and is no estimate of anything.
    """
    start_time = time.perf_counter()
    s = strategy
    device = torch.device(device)
    torch.manual_seed(s.seed)
    model = build_model(s, backbone, len(cache.data.classes)).to(device, memory_format=torch.channels_last)
    if s.trains_backbone or not use_cache:
        start = s.freeze if use_cache else 0
        x_train, y_train = cache.split(start, fit_split)
        x_val, y_val = cache.split(start, "val")
        if s.probe_epochs:
            _probe_head(model, s, backbone, cache, device, use_cache, fit_split)

        def forward(x: torch.Tensor) -> torch.Tensor:
            return model.forward_from(x, start)
    else:  # pure feature extractor: pooled vectors are cached too, train only the head on them
        x_train, y_train = cache.pooled(s.tap, s.pool, fit_split)
        x_val, y_val = cache.pooled(s.tap, s.pool, "val")
        forward = model.head
        if device.type == "cpu":  # tiny matrix products: one thread beats two that wait on each other
            with threads(1):
                return _fit(model, forward, s, cache, (x_train, y_train), (x_val, y_val), device, report, start_time)
    return _fit(model, forward, s, cache, (x_train, y_train), (x_val, y_val), device, report, start_time)


def _fit(model: TransferModel, forward: Callable[[torch.Tensor], torch.Tensor], s: Strategy, cache: ActivationCache,
         train: tuple[torch.Tensor, torch.Tensor], val: tuple[torch.Tensor, torch.Tensor], device: torch.device,
         report: Report | None, start_time: float) -> TrialResult:
    """The training loop shared by head-only and fine-tuning trials."""
    (x_train, y_train), (x_val, y_val) = train, val
    reference = {n: p.detach().clone() for n, p in model.groups.named_parameters() if p.requires_grad}
    optimizer = _optimizer(param_groups(model, s), s)
    steps_per_epoch = math.ceil(len(x_train) / s.batch_size)
    total_steps = steps_per_epoch * s.epochs
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * min(step, total_steps) / total_steps)))
    criterion = head_loss(s.head, label_smoothing=s.label_smoothing)
    generator = torch.Generator().manual_seed(s.seed)
    y_train = y_train.to(device)

    checkpoints = s.trains_backbone and report is not None
    part_way = {round(steps_per_epoch * k / REPORTS_PER_EPOCH): k for k in range(1, REPORTS_PER_EPOCH)}
    part_way.pop(0, None)  # an epoch of one batch has no middle
    history: list[float] = []
    for epoch in range(1, s.epochs + 1):
        _set_train_mode(model, s)
        order = torch.randperm(len(x_train), generator=generator)
        for step, i in enumerate(range(0, len(order), s.batch_size)):
            if checkpoints and step in part_way:
                model.eval()
                report((epoch - 1) * REPORTS_PER_EPOCH + part_way[step], accuracy(forward, x_val, y_val, cache, device))
                _set_train_mode(model, s, new_epoch=False)
            idx = order[i:i + s.batch_size]
            if len(idx) < 2 and i > 0:  # BatchNorm cannot train on a single example
                continue
            with autocast(device):
                loss = criterion(forward(_to_input(x_train[idx], device, cache)).float(), y_train[idx.to(device)])
            if s.trains_backbone and s.l2sp_alpha > 0:
                loss = loss + l2sp_penalty(model, reference, s.l2sp_alpha)
            if not torch.isfinite(loss):
                raise TrainingDiverged(f"loss became {loss.item()} at epoch {epoch}")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
        model.eval()
        history.append(accuracy(forward, x_val, y_val, cache, device))
        if checkpoints:
            report(epoch * REPORTS_PER_EPOCH, history[-1])
    model = model.eval().to("cpu", memory_format=torch.contiguous_format)
    return TrialResult(val_accuracy=history[-1], epochs_run=len(history), seconds=time.perf_counter() - start_time,
                       model=model, history=history)
