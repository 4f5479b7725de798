"""Image augmentation for fine-tuning trials: a searched part of the strategy, applied per image per batch.

Few-shot fine-tunes over-fit without it; every anchor applies some by default (fast.ai's `aug_transforms`,
timm's RandAugment, AutoGluon's TrivialAugment). Flips are a separate choice, never implied: they are wrong
for digits and text. An augmenting trial cannot train from cached activations (each view is new), so it runs
its frozen groups on the augmented images every step, without gradients; that is its cost.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torchvision.transforms import v2

AUGMENTS: tuple[str, ...] = ("none", "shift", "crop", "trivial")


def build_augment(kind: str, size: int, *, flip: bool = False) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """A transform of one uint8 [3,H,W] image, or None for "none" (the trial may then use the cache).

    - shift: translations up to 1/8 of the side and slight scaling (fast.ai's default spirit, no warping);
    - crop: random-resized crop of 35-100 % of the area, plus mild colour jitter;
    - trivial: TrivialAugmentWide (one random op of random strength per image).
    """
    if kind == "none":
        return None
    if kind == "shift":
        ops: list = [v2.RandomAffine(degrees=0, translate=(0.125, 0.125), scale=(0.9, 1.1))]
    elif kind == "crop":
        ops = [v2.RandomResizedCrop(size, scale=(0.35, 1.0), antialias=True),
               v2.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.2)]
    elif kind == "trivial":
        ops = [v2.TrivialAugmentWide()]
    else:
        raise ValueError(f"Unknown augmentation {kind!r}; expected one of {AUGMENTS}.")
    if flip:
        ops.append(v2.RandomHorizontalFlip())
    return v2.Compose(ops)


def augment_batch(images: torch.Tensor, transform: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """Apply `transform` to each uint8 image of [N,3,H,W] separately (v2 on a batch would draw one for all)."""
    return torch.stack([transform(img) for img in images])
