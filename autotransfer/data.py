"""Data sets: a folder of class folders, a CSV of `path,label`, or an embedded set, split train/val/test.

Everything is decoded once into a uint8 tensor at the backbone's input size, so the activation cache and
every trial see exactly the same pixels, and the fingerprint of those pixels keys the cache.
"""

from __future__ import annotations

import csv
import hashlib
import logging
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from autotransfer.errors import DataError
from autotransfer.images import open_image, to_rgb_square

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")
SPLITS = ("train", "val", "test")


@dataclass(frozen=True, kw_only=True)
class ImageData:
    """Decoded images with labels and a fixed train/val/test split."""

    name: str  # data set name shown in reports, e.g. "digits" or a folder name
    images: torch.Tensor  # uint8 [N, 3, S, S], RGB, already resized and centre-cropped
    labels: torch.Tensor  # int64 [N]
    classes: tuple[str, ...]
    split: dict[str, torch.Tensor] = field(repr=False)  # "train"/"val"/"test" -> index tensor
    fingerprint: str  # digest of pixels, labels and split: part of every cache key

    @property
    def image_size(self) -> int:
        return int(self.images.shape[-1])

    def subset(self, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        idx = self.split[split]
        return self.images[idx], self.labels[idx]


# --- embedded data sets -----------------------------------------------------------------------------


def _digits() -> tuple[list[Image.Image], list[str]]:
    from sklearn.datasets import load_digits

    d = load_digits()
    images = [Image.fromarray((img * (255.0 / 16.0)).round().astype(np.uint8), mode="L") for img in d.images]
    return images, [str(t) for t in d.target]


def _digits_shifted() -> tuple[list[Image.Image], list[str]]:
    """Digits with a domain shift: inverted contrast (light background) and a seeded rotation of +-45 degrees."""
    images, labels = _digits()
    rng = np.random.default_rng(0)
    shifted = []
    for img in images:
        inverted = Image.fromarray(255 - np.asarray(img), mode="L").resize((32, 32), Image.BILINEAR)
        shifted.append(inverted.rotate(float(rng.uniform(-45, 45)), resample=Image.BILINEAR, fillcolor=255))
    return shifted, labels


EMBEDDED: dict[str, tuple[Callable[[], tuple[list[Image.Image], list[str]]], int, str]] = {
    # name -> (loader, default image size, description)
    "digits": (_digits, 64, "sklearn handwritten digits: 1,797 8x8 grayscale images, 10 classes"),
    "digits_shifted": (_digits_shifted, 64, "the same digits inverted (dark on light) and rotated +-45 degrees: "
                                            "a domain shift away from ImageNet's statistics"),
}


# --- decoding ---------------------------------------------------------------------------------------


def _decode(item: str | Image.Image, size: int) -> np.ndarray | None:
    if isinstance(item, Image.Image):
        return to_rgb_square(item, size)
    try:
        return open_image(item, size)
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as e:
        logger.warning("Skipping unreadable image %s (%s)", item, type(e).__name__)
        return None


def _median_short_side(paths: Sequence[str], sample: int = 64) -> int:
    sides = []
    for p in paths[:: max(1, len(paths) // sample)]:
        try:
            with Image.open(p) as img:
                sides.append(min(img.size))
        except (UnidentifiedImageError, OSError, Image.DecompressionBombError):
            continue
    return int(np.median(sides)) if sides else 224


def default_image_size(items: Sequence[str | Image.Image]) -> int:
    """224 for photos; smaller images are not blown up past the next multiple of 32 of their size."""
    paths = [p for p in items if isinstance(p, str)]
    side = _median_short_side(paths) if paths else 224
    return int(min(224, max(32, 32 * int(np.ceil(side / 32)))))


# --- sources ----------------------------------------------------------------------------------------


def _scan_class_folders(root: Path) -> tuple[list[str], list[str]]:
    items, labels, others = [], [], []
    for class_dir in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        files = sorted(f for f in class_dir.rglob("*") if f.is_file() and not f.name.startswith("."))
        images = [f for f in files if f.suffix.lower() in IMAGE_SUFFIXES]
        others += [f for f in files if f.suffix.lower() not in IMAGE_SUFFIXES]
        items += [str(f) for f in images]
        labels += [class_dir.name] * len(images)
    if others:
        logger.warning("Ignoring %d non-image file(s) in %s, e.g. %s; images must end in %s", len(others), root,
                       others[0].relative_to(root), ", ".join(IMAGE_SUFFIXES))
    return items, labels


def _read_csv(path: Path) -> tuple[list[str], list[str]]:
    # utf-8-sig: Excel's "CSV UTF-8" starts with a byte-order mark, which would otherwise stick to "path"
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            if not reader.fieldnames or not {"path", "label"} <= {c.strip() for c in reader.fieldnames}:
                raise DataError(
                    f"CSV {str(path)!r} must have a header with columns 'path' and 'label', got "
                    f"{reader.fieldnames}; write one row per image as `path,label`."
                )
            rows = [{k.strip(): (v or "").strip() for k, v in row.items() if k} for row in reader]
    except UnicodeDecodeError as e:
        raise DataError(f"CSV {str(path)!r} is not UTF-8 text (byte {e.start} cannot be decoded); save it as "
                        "UTF-8 (in Excel: 'CSV UTF-8').") from None
    items, labels = [], []
    for i, row in enumerate(rows, start=2):
        p = Path(row["path"])
        p = p if p.is_absolute() else path.parent / p
        if not p.is_file():
            raise DataError(f"CSV {str(path)!r} line {i}: image {row['path']!r} not found (paths are relative "
                            "to the CSV's folder); fix the path or remove the row.")
        items.append(str(p))
        labels.append(row["label"])
    return items, labels


def _stratified_split(labels: np.ndarray, classes: Sequence[str], fractions: tuple[float, float, float],
                      seed: int) -> dict[str, np.ndarray]:
    """Per class: at least one image in each of train, val and test, the rest by `fractions`.

    One stable sort groups the images by class (no scan of every label per class: 1,000 classes stay linear),
    and each class is permuted in class order with one generator, so a seed always draws the same split.
    """
    counts = np.bincount(labels, minlength=len(classes))
    small = np.flatnonzero(counts < 3)
    if len(small):
        others = f" (and {len(small) - 1} more class(es) with fewer than 3)" if len(small) > 1 else ""
        raise DataError(f"Class {classes[small[0]]!r} has {counts[small[0]]} image(s){others}; a train/val/test split "
                        "needs at least 3 per class. Add images to it or remove the class.")
    rng = np.random.default_rng(seed)
    by_class = np.split(np.argsort(labels, kind="stable"), np.cumsum(counts)[:-1])  # each class's indices, sorted
    parts: dict[str, list[np.ndarray]] = {s: [] for s in SPLITS}
    for idx in by_class:
        idx = rng.permutation(idx)
        n_val = min(max(1, round(len(idx) * fractions[1])), len(idx) - 2)  # train and test keep one at least
        n_test = min(max(1, round(len(idx) * fractions[2])), len(idx) - 1 - n_val)
        parts["val"].append(idx[:n_val])
        parts["test"].append(idx[n_val:n_val + n_test])
        parts["train"].append(idx[n_val + n_test:])
    return {s: np.sort(np.concatenate(p)) for s, p in parts.items()}


def _check_classes(source: str, labels: Sequence[str]) -> tuple[str, ...]:
    classes = tuple(sorted(set(labels)))
    if len(labels) == 0:
        raise DataError(f"No images found in {source!r}; expected class folders (DATA/<class>/*.png) or a CSV "
                        f"of path,label. Supported files: {', '.join(IMAGE_SUFFIXES)}.")
    if len(classes) < 2:
        raise DataError(f"Found {len(classes)} class in {source!r}; need at least 2 "
                        "(layout: DATA/<class>/<image>.png). Add a folder per class.")
    return classes


def _fingerprint(images: torch.Tensor, labels: torch.Tensor, split: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256(images.numpy().tobytes())
    h.update(labels.numpy().tobytes())
    for s in SPLITS:
        h.update(split[s].numpy().tobytes())
    return h.hexdigest()[:16]


def _read_source(source: str) -> tuple[str, list, list[str], list[str] | None, int | None]:
    """(name, items, class names, given split per item or None, default image size or None) of a source."""
    if source in EMBEDDED:
        loader, size, _ = EMBEDDED[source]
        items, names = loader()
        return source, items, names, None, size
    path = Path(source)
    if not path.exists():
        raise DataError(f"Data {source!r} is neither a folder, a CSV file nor an embedded data set "
                        f"({', '.join(EMBEDDED)}); check the path or run `autotransfer datasets`.")
    name = path.stem if path.is_file() else path.name
    given_split = None
    if path.is_file():
        if path.suffix.lower() != ".csv":
            raise DataError(f"Data file {source!r} is not a .csv; pass a folder of class folders or a CSV "
                            "with columns path,label.")
        items, names = _read_csv(path)
    elif (path / "train").is_dir() and (path / "val").is_dir():
        items, names, given_split = [], [], []
        for s in SPLITS:
            if (path / s).is_dir():
                i, n = _scan_class_folders(path / s)
                items, names, given_split = items + i, names + n, given_split + [s] * len(i)
    else:
        items, names = _scan_class_folders(path)
    _check_classes(source, names)
    return name, items, names, given_split, None


def _split_indices(label_ids: np.ndarray, classes: tuple[str, ...], given: list[str] | None,
                   fractions: tuple[float, float, float], seed: int) -> dict[str, torch.Tensor]:
    """The given train/val(/test) folders, a test split carved from train when there is none, or a fresh split."""
    if given is not None:
        idx = {s: np.flatnonzero(np.array(given) == s) for s in SPLITS}
        if len(idx["test"]) == 0:  # no test folder: carve one out of train
            inner = _stratified_split(label_ids[idx["train"]], classes, (0.85, 0.0, 0.15), seed)
            idx["test"], idx["train"] = idx["train"][inner["test"]], idx["train"][np.concatenate(
                [inner["train"], inner["val"]])]
    else:
        idx = _stratified_split(label_ids, classes, fractions, seed)
    return {s: torch.from_numpy(np.sort(idx[s])) for s in SPLITS}


def load_data(source: str = "digits", *, image_size: int | None = None, seed: int = 0,
              fractions: tuple[float, float, float] = (0.70, 0.15, 0.15)) -> ImageData:
    """Load a data set by embedded name, folder or CSV, decode it and split it.

    A folder that already holds `train/`, `val/` (and optionally `test/`) keeps that split; otherwise a
    stratified split with `fractions` and `seed` is drawn.
    """
    if image_size is not None and not 16 <= image_size <= 1024:
        raise DataError(f"--image-size must be between 16 and 1024 pixels, got {image_size}.")
    name, items, names, given_split, embedded_size = _read_source(source)
    image_size = image_size or embedded_size or default_image_size(items)
    with ThreadPoolExecutor(max_workers=4) as pool:
        decoded = list(pool.map(lambda it: _decode(it, image_size), items))
    keep = [i for i, d in enumerate(decoded) if d is not None]
    lost = sorted(set(names) - {names[i] for i in keep})
    if lost:
        raise DataError(f"Class {lost[0]!r} in {source!r} has no readable image left (all failed to decode); "
                        "replace its corrupt files or remove the class.")
    names = [names[i] for i in keep]
    classes = _check_classes(source, names)
    images = torch.from_numpy(np.stack([decoded[i] for i in keep])).permute(0, 3, 1, 2).contiguous()
    class_id = {c: i for i, c in enumerate(classes)}  # a dict, not classes.index: linear in images x classes
    label_ids = np.fromiter((class_id[n] for n in names), dtype=np.int64, count=len(names))
    split = _split_indices(label_ids, classes, None if given_split is None else [given_split[i] for i in keep],
                           fractions, seed)
    labels = torch.from_numpy(label_ids)
    return ImageData(name=name, images=images, labels=labels, classes=classes, split=split,
                     fingerprint=_fingerprint(images, labels, split))
