"""The backbone's input: uint8 images normalised to float32 with its mean and std, a batch at a time, and how many
rows a no-grad batch holds so that its memory stays bounded whatever the image size."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

# Values in the input of one no-grad forward batch (64 images at 224 px): peak memory follows the batch, and
# Lite0 at 224 px peaked at 3.7 GiB RSS for a batch of 256 images against 1.4 GiB for 64.
EVAL_BATCH_VALUES = 64 * 3 * 224 * 224


def normalise(images: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """uint8 [N,3,H,W] -> float32 normalised with the backbone's mean/std."""
    m = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
    return (images.float() / 255.0 - m) / s


class NormalisedImages:
    """uint8 images [N,3,H,W] seen as their normalised float32 rows, one slice at a time: the export's checks
    run the whole test split through two runtimes, and as floats at once it would take 4x its uint8 size in
    memory (a 20,000-image test split at 224 px: 12 GB), besides the images themselves."""

    def __init__(self, images: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        self.images, self.mean, self.std = images, mean, std

    def __len__(self) -> int:
        return len(self.images)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.images.shape)

    def __getitem__(self, rows: slice) -> torch.Tensor:
        return normalise(self.images[rows], self.mean, self.std)


def rows_per_batch(row_shape: Sequence[int], most: int = 256) -> int:
    """Rows of shape `row_shape` per no-grad forward batch: `most`, fewer for rows so large that the batch's
    activations would grow past a fixed bound (`EVAL_BATCH_VALUES`), whatever the image size."""
    return max(1, min(most, EVAL_BATCH_VALUES // max(1, int(np.prod(row_shape)))))
