"""The shipped model: the best strategy trained again on train+val, a few times, averaged.

The search needs the validation split to choose; once it has chosen, that split is better spent as
training data (scikit-learn's `refit=True`, AutoGluon's `refit_full`). One fine-tune is noisy, though: on
digits with Lite0 one strategy's test accuracy moved by up to four of 269 images between training seeds,
and a single refit was no better than the searched trial on average. Averaging the probabilities of a few
refits removes most of that noise: over 7 splits of digits and digits_shifted, 3 refits never scored below
the searched trial, and took digits' mean test error from 1.39 % to 1.02 % (README, Benchmarks).

A refit runs the trial's schedule scaled to its data (the same epochs over train+val), and every member is
checked before it is shipped: a longer fine-tune makes a diverging refit likelier, and a diverged member once
shipped a chance-level model whose ONNX parity check passed. See `refit`.

Members share their frozen groups (pretrained weights, fixed BatchNorm statistics), so the ensemble runs
those once; only the fine-tuned groups and the heads are repeated.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from dataclasses import dataclass

import torch
from torch import nn

from autotransfer.backbones import Backbone
from autotransfer.defaults import DEFAULT_REFITS
from autotransfer.features import TRAIN_AND_VAL, ActivationCache
from autotransfer.model import TransferModel
from autotransfer.progress import phase
from autotransfer.strategy import Strategy
from autotransfer.trainer import TrainingDiverged, TrialResult, train_trial


class Ensemble(nn.Module):
    """Frozen groups once, then each member's trainable groups, pool and head; output log mean softmax.

    The output is a valid logits tensor: its softmax is the mean of the members' probabilities.
    """

    def __init__(self, members: list[TransferModel]) -> None:
        super().__init__()
        freeze = members[0].freeze
        if any(m.freeze != freeze or len(m.groups) != len(members[0].groups) for m in members):
            raise ValueError("ensemble members must share one strategy's tap and freeze")
        self.trunk = nn.Sequential(*members[0].groups[:freeze])
        self.tails = nn.ModuleList(nn.Sequential(*m.groups[freeze:], m.pool, m.head) for m in members)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_from(x, 0)

    def forward_from(self, x: torch.Tensor, start: int) -> torch.Tensor:
        """From the input of group `start` (at most the freeze boundary), as `TransferModel.forward_from`."""
        h = self.trunk[start:](x)
        log_probs = torch.stack([tail(h).log_softmax(dim=1) for tail in self.tails])
        return torch.logsumexp(log_probs, dim=0) - math.log(len(self.tails))


# A refit member must fit its own training data nearly as well as the searched trial fitted its own: a member
# 5 points worse (or with a non-finite loss) has diverged or collapsed, and is not shipped.
TRAIN_ACCURACY_TOLERANCE = 0.05


@dataclass(frozen=True)
class RefitOutcome:
    """The refit model, or None with the reason when no set of good members could be trained."""

    model: nn.Module | None
    seeds: tuple[int, ...]  # seeds of the shipped members
    rejected: tuple[str, ...]  # one line per member that failed its check (and was retrained with another seed)

    @property
    def failure(self) -> str | None:
        return None if self.model is not None else "; ".join(self.rejected)


def refit_schedule(strategy: Strategy, cache: ActivationCache) -> Strategy:
    """The trial's schedule scaled to train+val: the same epochs, so the same number of passes over the data."""
    if not strategy.trains_backbone:
        return strategy
    train, fit = (cache.slices[s] for s in ("train", TRAIN_AND_VAL))
    scale = (fit.stop - fit.start) / max(1, train.stop - train.start)
    return dataclasses.replace(strategy, steps=max(1, round(strategy.steps * scale)))


def check_member(result: TrialResult, reference: float | None) -> str | None:
    """Why a member must not be shipped, or None: its training accuracy against the searched trial's."""
    if not math.isfinite(result.train_accuracy):
        return f"accuracy on its training data is {result.train_accuracy}"
    if reference is not None and result.train_accuracy < reference - TRAIN_ACCURACY_TOLERANCE:
        return (f"accuracy on its training data {result.train_accuracy:.4f} is below the searched trial's "
                f"{reference:.4f} by more than {TRAIN_ACCURACY_TOLERANCE}")
    return None


def member_count(strategy: Strategy, requested: int) -> int:
    """Members a refit trains: one for a seed-independent strategy (every seed trains the same weights)."""
    return min(requested, 1) if strategy.seed_independent else requested


def distils(strategy: Strategy, requested: int, distill: bool) -> bool:
    """Whether an export with `requested` refits and `distill` distils an ensemble (`distill.py`): only when the
    refit trains several members that fine-tune the backbone (an ensemble of MLP heads on one frozen backbone is
    shipped as it is: `distill.distil` has no student recipe for a head-only strategy)."""
    return distill and strategy.trains_backbone and member_count(strategy, requested) > 1


def refit(strategy: Strategy, backbone: Backbone, cache: ActivationCache, *, members: int = DEFAULT_REFITS,
          device: torch.device | str = "cpu", reference_train_accuracy: float | None = None) -> RefitOutcome:
    """Train `strategy` on train+val with seeds seed, seed+1, ...; one member is returned as is.

    A seed-independent strategy (`Strategy.seed_independent`) is trained once, whatever `members` says.

    Each member is checked (finite loss; accuracy on its training data at least the searched trial's
    `reference_train_accuracy` minus a tolerance). A failing member is retrained with the next unused seed,
    up to `members` retries in all; when that is not enough the outcome has no model and says why.
    """
    if members < 1:
        raise ValueError(f"members must be >= 1, got {members}")
    members = member_count(strategy, members)
    schedule = refit_schedule(strategy, cache)
    models, seeds, rejected = [], [], []
    for seed in range(strategy.seed, strategy.seed + 2 * members):
        if len(models) == members:
            break
        name = f"refit member {len(models) + 1}/{members}" + (f" (seed {seed})" if rejected else "")
        try:  # a fine-tune shows its steps; a head fit by L-BFGS has no count, only a line
            with phase(f"{name}: head fit") if not schedule.trains_backbone else contextlib.nullcontext():
                result = train_trial(dataclasses.replace(schedule, seed=seed), backbone, cache, device=device,
                                     fit_split=TRAIN_AND_VAL, description=name)
            problem = check_member(result, reference_train_accuracy)
        except TrainingDiverged as e:
            problem = str(e)
        if problem is None:
            models.append(result.model)
            seeds.append(seed)
        else:
            rejected.append(f"seed {seed}: {problem}")
    if len(models) < members:
        return RefitOutcome(model=None, seeds=(), rejected=tuple(rejected))
    model = models[0] if members == 1 else Ensemble(models).eval()
    return RefitOutcome(model=model, seeds=tuple(seeds), rejected=tuple(rejected))
