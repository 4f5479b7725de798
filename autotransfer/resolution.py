"""Input resolution, chosen by the prior: small images are also tried upscaled, each size with its own cache.

A backbone trained at 224 px loses the spatial map of a 32 px image after a few stride-2 stages; upscaling it
2x or 3x before the network often transfers better (a budget-30 search on 32 px colour images scored 0.676 test
accuracy at 64 px against 0.630 at 32 px). Which factor helps depends on the data, so it is measured: each
candidate size gets one forward pass (pooled features only, nothing stored) and the closed-form ridge probe of
every group (see `prior.py`), and the smallest size within a point of the best probe wins (larger inputs make
every trial slower).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from autotransfer.backbones import Backbone
from autotransfer.data import ImageData
from autotransfer.features import ActivationCache

UPSCALE_BELOW = 64  # images under this many pixels a side are also tried at 2x and 3x
MAX_UPSCALED = 224  # never past the backbone's usual training size
SIZE_MARGIN = 0.01  # a larger input must beat the smaller one's best probe by more than a point


@dataclass(frozen=True)
class Resolution:
    chosen: int
    probe_accuracy: dict[int, float]  # size -> best ridge-probe validation accuracy over the groups

    def describe(self) -> str:
        scores = ", ".join(f"{s}px {a:.3f}" for s, a in self.probe_accuracy.items())
        return f"input size {self.chosen}px (best ridge probe per size, val: {scores})"


def candidate_sizes(base: int) -> tuple[int, ...]:
    if base >= UPSCALE_BELOW:
        return (base,)
    return tuple(s for s in (base, 2 * base, 3 * base) if s <= MAX_UPSCALED)


def best_probe(cache: ActivationCache) -> float:
    from autotransfer.prior import score_groups

    return max(g.probe_accuracy for g in score_groups(cache))


def choose_resolution(data: ImageData, load: Callable[[int], ImageData], backbone: Backbone, *,
                      record: Path | None = None) -> tuple[ImageData, Resolution]:
    """`data` at its default size, or reloaded (`load(size)`) at the upscaled size whose features probe best.

    `record`: a JSON file that keeps the choice for this data (a resumed study does not measure again).
    """
    sizes = candidate_sizes(data.image_size)
    if len(sizes) == 1:
        return data, Resolution(chosen=data.image_size, probe_accuracy={})
    key = {"fingerprint": data.fingerprint, "backbone": backbone.name, "weights": backbone.weights_id}
    if record is not None and record.is_file():
        stored = json.loads(record.read_text())
        if stored.get("key") == key:
            chosen = int(stored["chosen"])
            scores = {int(k): v for k, v in stored["probe_accuracy"].items()}
            return (data if chosen == data.image_size else load(chosen)), Resolution(chosen, scores)
    scores = {}
    for size in sizes:  # one upscaled copy alive at a time: the chosen one is decoded again if it is not the base
        scores[size] = best_probe(ActivationCache(backbone, data if size == data.image_size else load(size), store=()))
    top = max(scores.values())
    chosen = min(s for s in sizes if scores[s] >= top - SIZE_MARGIN)
    if record is not None:
        record.write_text(json.dumps({"key": key, "chosen": chosen, "probe_accuracy": scores}, indent=2) + "\n")
    return (data if chosen == data.image_size else load(chosen)), Resolution(chosen, scores)
