"""Scoring a model on stored rows of the activation cache (images or activations at any boundary).

Everything that scores a trial goes through `logits_of`, one batched no-grad pass whose batches are sized by
their values (`preprocess.rows_per_batch`), so memory does not follow the image size.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from autotransfer.calibration import Margin, validation_margin
from autotransfer.device import autocast
from autotransfer.features import ActivationCache
from autotransfer.metrics import score
from autotransfer.preprocess import rows_per_batch

if TYPE_CHECKING:
    from autotransfer.model import TransferModel


@torch.no_grad()
def logits_of(forward: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, cache: ActivationCache,
              device: torch.device | str = "cpu", batch_size: int = 256) -> torch.Tensor:
    """float32 logits [len(x), classes] on the CPU of `forward` on stored rows `x` of `cache` (any boundary).

    Large rows (images at 224 px and more) go in smaller batches, so memory does not follow the image size."""
    device = torch.device(device)
    batch_size = rows_per_batch(x.shape[1:], most=batch_size)
    out = []
    for i in range(0, len(x), batch_size):
        with autocast(device):
            out.append(forward(to_input(x[i:i + batch_size], device, cache)).float().cpu())
    return torch.cat(out) if out else torch.empty(0, 0)


def accuracy(forward: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, y: torch.Tensor,
             cache: ActivationCache, device: torch.device | str = "cpu", batch_size: int = 256) -> float:
    """Top-1 accuracy of `forward` on stored rows `x` of `cache` (any boundary, any stored dtype)."""
    return evaluate(forward, x, y, cache, device, batch_size=batch_size)[0]


def evaluate(forward: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, y: torch.Tensor,
             cache: ActivationCache, device: torch.device | str = "cpu", metric: str = "accuracy", *,
             batch_size: int = 256) -> tuple[float, float, Margin]:
    """(accuracy, `metric`, margin) of `forward` on stored rows `x` with labels `y`, from one pass of logits.

    The margin orders trials of equal `metric` (see `calibration.py`).
    """
    if len(x) == 0:
        return 0.0, 0.0, Margin(0.0, 0.0)
    logits = logits_of(forward, x, cache, device, batch_size)
    predicted, classes = logits.argmax(1), len(cache.data.classes)
    return score("accuracy", predicted, y, classes), score(metric, predicted, y, classes), validation_margin(logits, y)


def to_input(x: torch.Tensor, device: torch.device, cache: ActivationCache) -> torch.Tensor:
    """Stored rows (uint8 images, float16/32 activations, maybe memory-mapped) -> float32 input on `device`.

    The stored dtype crosses to the device (half or a quarter of the bytes), conversion happens there.
    """
    x = cache.as_input(x.to(device, non_blocking=True))
    return x.contiguous(memory_format=torch.channels_last) if x.ndim == 4 else x


def pooled_features(model: TransferModel, cache: ActivationCache, split: str, use_cache: bool,
                    device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Pooled features at `model`'s tap for one split: cached, or (the naive baseline) computed from the images."""
    if use_cache:
        return cache.pooled(len(model.groups), model.pool.kind, split)
    x, y = cache.split(0, split)
    model.eval()
    return logits_of(lambda batch: model.features_from(batch, 0), x, cache, device), y
