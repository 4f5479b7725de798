"""The fine-tuning fidelity: optimizer steps, derived from the data size, and the rungs a pruner cuts at.

A fine-tune's cost and its chance to converge depend on the optimizer steps it takes, not on epochs: two
epochs are 80 steps on 1,257 images and 20 on 300, and no fine-tune converges in 20 steps. The ladder gives
every data set a full schedule of at least `MIN_STEPS` steps and between `MIN_EPOCHS` and `MAX_EPOCHS`
epochs; successive halving then stops hopeless trials at the rungs `max_steps / 3**k` (the cheapest rung
is 1/9 of a full fine-tune), so only promising strategies pay for convergence. A first rung of 1/27 was
too early: on digits the augmented full fine-tune, 0.9926 after 30 steps, stood at 0.76 after 11 and would
have been cut by an upper-group fine-tune that was ahead there (0.97) and ended behind (0.96).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

BATCH_SIZE = 32  # images per fine-tuning step (fast.ai's and most hand recipes' few-shot batch)
MIN_STEPS = 300  # a full fine-tune on small data: e.g. 30 epochs of 300 images
MIN_EPOCHS = 3  # large data: at least three passes
MAX_EPOCHS = 50  # tiny data: no more than 50 passes (beyond that a fine-tune only memorises)
REDUCTION = 3  # successive halving keeps the best third at each rung
RUNGS = 3  # rungs including the full schedule: max/9, max/3, max


@dataclass(frozen=True)
class StepLadder:
    """`max_steps` is a full fine-tune; `rungs` are the steps at which it reports to the pruner."""

    max_steps: int

    @property
    def min_steps(self) -> int:
        return max(1, round(self.max_steps / REDUCTION ** (RUNGS - 1)))

    @property
    def rungs(self) -> tuple[int, ...]:
        """max_steps / 3**k for k = RUNGS-1 .. 0, rounded; the last one is the trial's result, never pruned.

        Optuna's successive halving promotes at min_steps * 3**k, which each rung reaches or just passes.
        """
        return tuple(sorted({max(1, round(self.max_steps / REDUCTION ** k)) for k in range(RUNGS)}))


def steps_per_epoch(train_images: int, batch_size: int = BATCH_SIZE) -> int:
    return max(1, math.ceil(train_images / batch_size))


def step_ladder(train_images: int, *, max_steps: int | None = None) -> StepLadder:
    """The ladder for `train_images` training images; `max_steps` overrides the derived full schedule."""
    if max_steps is None:
        epoch = steps_per_epoch(train_images)
        max_steps = min(max(MIN_STEPS, MIN_EPOCHS * epoch), MAX_EPOCHS * epoch)
    return StepLadder(max_steps=max(1, max_steps))
