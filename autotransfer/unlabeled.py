"""What a trial does with the unlabelled split of the activation cache (`--unlabeled`): its self-trained probe,
the rows a fine-tune trains on, its head's AdaBN statistics, and its reverse validation. The methods themselves are in
`adapt.py` and `dann.py`; this module applies them to a trial's model and the cache.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from autotransfer.adapt import Reverse, adabn, reverse_validation, self_train
from autotransfer.data import UNLABELED
from autotransfer.device import threads
from autotransfer.evaluation import logits_of, pooled_features
from autotransfer.features import ActivationCache
from autotransfer.model import TransferModel
from autotransfer.probe import class_weights, fit_head
from autotransfer.strategy import DEFAULT_PROBE_L2, Strategy

Pseudo = tuple[torch.Tensor, torch.Tensor]  # (rows of the unlabelled split, their pseudo-labels)
_REVERSE_HEAD = Strategy(tap=1, freeze=1, head="linear", weight_decay=DEFAULT_PROBE_L2)


def _single_thread(device: torch.device):
    return threads(1) if device.type == "cpu" else contextlib.nullcontext()  # tiny full-batch matrix products


def fit_probe(model: TransferModel, s: Strategy, cache: ActivationCache, x_fit: torch.Tensor, y_fit: torch.Tensor,
              use_cache: bool, device: torch.device) -> Pseudo | None:
    """Fit the head on the pooled features by L-BFGS (self-trained when `s.adapt` says so); the pseudo-labels
    of the last round, or None."""
    num_classes = len(cache.data.classes)

    def fit(x: torch.Tensor, y: torch.Tensor) -> None:
        fit_head(model.head, x.to(device), y.to(device), s, l2=None if not s.trains_backbone else DEFAULT_PROBE_L2,
                 weight=class_weights(s, y, num_classes))

    with _single_thread(device):
        if s.adapt != "pseudo_label" or cache.data.unlabeled_count == 0:
            fit(x_fit, y_fit)
            return None
        x_unlabeled = pooled_features(model, cache, UNLABELED, use_cache, device)[0]
        return self_train(fit, model.head, x_fit.to(device), y_fit.to(device), x_unlabeled.to(device),
                          fraction=s.pseudo_fraction, rounds=s.pseudo_rounds)


def reverse(head: nn.Module, x_unlabeled: torch.Tensor, x_val: torch.Tensor, y_val: torch.Tensor,
            cache: ActivationCache, device: torch.device) -> Reverse:
    """Reverse validation (see `adapt.py`) of `head` on pooled features of the unlabelled and validation images."""
    logits = logits_of(head, x_unlabeled, cache, device)
    with _single_thread(device):
        return reverse_validation(x_unlabeled, logits, x_val, y_val, lambda h, x, y: fit_head(h, x, y, _REVERSE_HEAD),
                                  len(cache.data.classes))


def finish_fine_tune(model: TransferModel, s: Strategy, cache: ActivationCache, use_cache: bool,
                     scored: bool) -> Reverse | None:
    """After a fine-tune, on the model it returns (on the CPU): AdaBN of its head when `s.adapt` says so, and
    (`scored`) its reverse validation on its own pooled features."""
    if not scored and s.adapt != "adabn" or cache.data.unlabeled_count == 0:
        return None
    start = cache.start_boundary(s.freeze) if use_cache else 0
    features = lambda x: model.features_from(x, start)
    unlabeled_features = logits_of(features, cache.split(start, UNLABELED)[0], cache, "cpu")  # where the model is
    if s.adapt == "adabn":
        adabn(model.head[0], unlabeled_features)
    if not scored:
        return None
    x_val, y_val = cache.split(start, "val")
    return reverse(model.head, unlabeled_features, logits_of(features, x_val, cache, "cpu"), y_val, cache,
                   torch.device("cpu"))


class IndexedRows:
    """Rows `rows` of a stored array, indexed like a tensor of them (one batch is copied at a time, never all)."""

    def __init__(self, x: torch.Tensor, rows: torch.Tensor) -> None:
        self.x, self.rows = x, rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, idx: torch.Tensor) -> torch.Tensor:
        return self.x[self.rows[idx]]


def training_rows(cache: ActivationCache, start: int, fit_split: str,
                  pseudo: Pseudo | None) -> tuple[torch.Tensor | IndexedRows, torch.Tensor]:
    """(rows, labels) a fine-tune draws its batches from: the split `fit_split` at boundary `start`, and the
    pseudo-labelled unlabelled rows after it."""
    x, y = cache.split(start, fit_split)
    if pseudo is None:
        return x, y
    fit, unlabeled = cache.slices[fit_split], cache.slices[UNLABELED]
    rows = torch.cat([torch.arange(fit.start, fit.stop), unlabeled.start + pseudo[0].cpu()])
    return IndexedRows(cache.boundary(start), rows), torch.cat([y, pseudo[1].cpu()])
