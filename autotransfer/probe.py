"""A head fitted to convergence on pooled features by full-batch L-BFGS: every head-only trial, the linear probe
that starts every fine-tune (LP-FT), and the reverse-validation head (see `adapt.py`)."""

from __future__ import annotations

import torch
from torch import nn

from autotransfer.errors import AutotransferError
from autotransfer.heads import head_loss
from autotransfer.metrics import balanced_class_weights
from autotransfer.strategy import Strategy

LBFGS_ITERATIONS = 300  # converged: digits probes move by less than one validation image past ~100


class TrainingDiverged(AutotransferError):
    """The loss became NaN or infinite; the trial is dropped, the study goes on."""


def set_statistics(norm: nn.BatchNorm1d, x: torch.Tensor) -> None:
    """`norm` standardises with the mean and (biased) variance of the rows `x` (in place)."""
    with torch.no_grad():
        norm.running_mean.copy_(x.float().mean(0))
        norm.running_var.copy_(x.float().var(0, unbiased=False))


def class_weights(strategy: Strategy, y: torch.Tensor, num_classes: int) -> torch.Tensor | None:
    """Per-class loss weights of `strategy.class_weight` on the labels it trains on (None: unweighted)."""
    return balanced_class_weights(y.cpu(), num_classes) if strategy.class_weight == "balanced" else None


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
    set_statistics(norm, x)
    with torch.no_grad():
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
