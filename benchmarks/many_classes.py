"""Does anything grow with classes^2 or images x classes? Loading, the split and the prior at 100 vs 1,000 classes.

    python benchmarks/many_classes.py [--classes 100,1000] [--per-class 4] [--size 16]

Each run writes a synthetic folder of class folders (tiny generated PNGs, `--per-class` per class) into a temporary
folder, then times, on one thread (PyTorch and numpy's BLAS):
  load     `load_data` (scan, decode, labels, stratified split, fingerprint)
  split    `_stratified_split` alone, on the loaded labels
  cache    the activations of a small random 3-group CNN (one forward pass; grows with images only)
  prior    `build_prior`: LogME and the ridge probe of every group, the quadrant, the first strategies and the space
  space    drawing 20 strategies from the prior's space with Optuna (the search-space set-up a trial pays)
With the same images per class, 10x the classes is 10x the images: a stage that scales linearly shows a ratio near
10 between the two sizes, a quadratic one near 100. It ends with `ratio_<stage>=...` for the largest over the
smallest size and `worst_ratio=...`.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):  # one thread for numpy's BLAS too
    os.environ.setdefault(_var, "1")

import numpy as np  # noqa: E402
import optuna  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from torch import nn  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from autotransfer.backbones import Backbone  # noqa: E402
from autotransfer.data import _stratified_split, load_data  # noqa: E402
from autotransfer.features import ActivationCache  # noqa: E402
from autotransfer.prior import build_prior  # noqa: E402
from autotransfer.strategy import suggest_strategy  # noqa: E402

STAGES = ("load", "split", "cache", "prior", "space")


def write_classes(root: Path, classes: int, per_class: int, size: int, seed: int = 0) -> None:
    """`classes` folders of `per_class` PNGs: a class-specific colour and a random pattern, `size` px."""
    rng = np.random.default_rng(seed)
    for c in range(classes):
        folder = root / f"class{c:04d}"
        folder.mkdir(parents=True)
        colour = rng.integers(0, 256, 3)
        for i in range(per_class):
            noise = rng.integers(-40, 40, (size, size, 3))
            Image.fromarray(np.clip(colour + noise, 0, 255).astype(np.uint8)).save(folder / f"{i}.png")


def small_backbone() -> Backbone:
    """A random 3-group CNN (32/64/128 channels): the prior's cost depends on classes and images, not on weights."""
    torch.manual_seed(0)

    def block(c_in: int, c_out: int, stride: int) -> nn.Sequential:
        return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU())

    groups = nn.ModuleList([block(3, 32, 2), block(32, 64, 2), block(64, 128, 1)])
    return Backbone(name="bench_cnn", groups=groups, group_names=("g1", "g2", "g3"), channels=(32, 64, 128),
                    mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), weights_id="bench-seed0")


def _timed(fn, repeats: int = 1):
    """(value, best seconds of `repeats` calls): a stage of milliseconds is timed several times."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        value = fn()
        best = min(best, time.perf_counter() - start)
    return value, best


def measure(classes: int, per_class: int, size: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory(prefix="many-classes-") as tmp:
        write_classes(Path(tmp), classes, per_class, size)
        data, load = _timed(lambda: load_data(tmp, image_size=size, seed=0), repeats=3)
    labels = data.labels.numpy()
    _, split = _timed(lambda: _stratified_split(labels, data.classes, (0.70, 0.15, 0.15), 0), repeats=5)
    cache = ActivationCache(small_backbone(), data)
    _, forward = _timed(cache.load)
    prior, prior_seconds = _timed(lambda: build_prior(cache, max_steps=20), repeats=3)

    def draw() -> None:
        study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
        for _ in range(20):
            trial = study.ask()
            suggest_strategy(trial, prior.space)
            study.tell(trial, 0.0)

    _, space = _timed(draw, repeats=3)
    return {"images": float(len(labels)), "load": load, "split": split, "cache": forward, "prior": prior_seconds,
            "space": space}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--classes", default="100,1000", help="comma-separated class counts (default: 100,1000)")
    parser.add_argument("--per-class", type=int, default=4, help="images per class (default: 4)")
    parser.add_argument("--size", type=int, default=16, help="image side in pixels (default: 16)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    sizes = [int(c) for c in args.classes.split(",")]
    measure(10, args.per_class, args.size)  # warm-up: imports, first Optuna study, first allocations
    rows = {}
    for c in sizes:
        rows[c] = measure(c, args.per_class, args.size)
        r = rows[c]
        print(f"{c:5d} classes, {int(r['images']):6d} images: " + "  ".join(f"{s} {r[s]:.3f}s" for s in STAGES),
              flush=True)
    low, high = min(sizes), max(sizes)
    if low == high:
        return
    ratios = {s: rows[high][s] / max(rows[low][s], 1e-9) for s in STAGES}
    print(f"{high} vs {low} classes ({rows[high]['images'] / rows[low]['images']:.0f}x the images; linear ~"
          f"{high / low:.0f}x, quadratic ~{(high / low) ** 2:.0f}x):")
    print(" ".join(f"ratio_{s}={ratios[s]:.1f}" for s in STAGES) + f" worst_ratio={max(ratios.values()):.1f}")


if __name__ == "__main__":
    main()
