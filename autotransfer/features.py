"""Activations at every group boundary, computed in one forward pass and shared by all trials.

Boundary `k` holds the input of group `k` (boundary 0 = normalised images, boundary G = the last group's
output). A trial that freezes `k` groups trains only on boundary `k`: its frozen groups are never run
again, which is what makes a 50-trial search affordable on a CPU.
"""

from __future__ import annotations

import hashlib

import torch

from autotransfer.backbones import Backbone
from autotransfer.data import ImageData


def normalise(images: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """uint8 [N,3,H,W] -> float32 normalised with the backbone's mean/std."""
    m = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
    return (images.float() / 255.0 - m) / s


def cache_key(backbone: Backbone, data: ImageData) -> str:
    """Everything that changes an activation: backbone, weights, image size, preprocessing, pixels."""
    parts = (backbone.name, backbone.weights_id, data.image_size, backbone.mean, backbone.std, data.fingerprint)
    return hashlib.sha256(repr(parts).encode()).hexdigest()[:16]


class ActivationCache:
    """Lazily computed activations at boundaries 0..max_boundary for all images, in eval mode."""

    def __init__(self, backbone: Backbone, data: ImageData, *, batch_size: int = 128) -> None:
        self.backbone, self.data, self.batch_size = backbone, data, batch_size
        self.key = cache_key(backbone, data)
        self._boundaries: dict[int, torch.Tensor] = {}

    def boundary(self, k: int) -> torch.Tensor:
        """Activations entering group `k` for every image (float32, rows aligned with `data.labels`)."""
        if k not in self._boundaries:
            self._compute(up_to=max(k, max(self._boundaries, default=0)))
        return self._boundaries[k]

    def split(self, k: int, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        idx = self.data.split[split]
        return self.boundary(k)[idx], self.data.labels[idx]

    @torch.no_grad()
    def _compute(self, up_to: int) -> None:
        groups = self.backbone.groups
        was_training = groups.training
        groups.eval()
        outs: dict[int, list[torch.Tensor]] = {k: [] for k in range(up_to + 1)}
        for start in range(0, len(self.data.images), self.batch_size):
            x = normalise(self.data.images[start:start + self.batch_size], self.backbone.mean, self.backbone.std)
            outs[0].append(x)
            for k in range(1, up_to + 1):
                x = groups[k - 1](x)
                outs[k].append(x)
        groups.train(was_training)
        for k, chunks in outs.items():
            self._boundaries[k] = torch.cat(chunks)
