"""Data sets: a folder of class folders, a CSV of `path,label`, or an embedded set, split train/val/test.

Everything is decoded once into a uint8 array at the backbone's input size, so the activation cache and
every trial see exactly the same pixels, and the fingerprint of those pixels keys the cache. Decoding
streams: a few threads decode ahead of one writer, which puts each image straight into a preallocated
array (in memory, or a memory-mapped file past the memory bound) and into the fingerprint's hash; the
rows are then put in split order in place, so a split is a slice and no full copy is ever made.
"""

from __future__ import annotations

import hashlib
import logging
import os
import secrets
import tempfile
import weakref
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from autotransfer.errors import DataError
from autotransfer.images import open_image, to_rgb_square
from autotransfer.progress import progress
from autotransfer.rowfiles import RowWriter, check_disk, open_rows, permute_file_rows, permute_rows
from autotransfer.runtime import available_cpus
from autotransfer.sources import (  # noqa: F401 - EMBEDDED, IMAGE_SUFFIXES, data_name re-exported
    EMBEDDED,
    IMAGE_SUFFIXES,
    SPLITS,
    _digits,
    check_classes,
    data_name,
    join_split_folders,
    read_source,
    read_unlabeled,
)

logger = logging.getLogger(__name__)

UNLABELED = "unlabeled"  # the split of images without labels (`--unlabeled`), after test
DECODE_THREADS = 4  # at most; never more than the CPUs this process may use
DECODE_CHUNK = 64  # images per thread and round: what is decoded ahead of the writer


@dataclass(frozen=True, kw_only=True)
class ImageData:
    """Decoded images with labels and a fixed train/val/test split, rows in split order (train, val, test)."""

    name: str  # data set name shown in reports, e.g. "digits" or a folder name
    images: torch.Tensor  # uint8 [N, 3, S, S], RGB, already resized and centre-cropped
    labels: torch.Tensor  # int64 [N]
    classes: tuple[str, ...]
    # "train"/"val"/"test" (and "unlabeled", with label -1, when images without labels were given) -> row
    # indices (contiguous)
    split: dict[str, torch.Tensor] = field(repr=False)
    fingerprint: str  # digest of pixels, labels and split: part of every cache key
    source_index: torch.Tensor | None = field(default=None, repr=False)  # row -> item of the source's listing
    images_file: Path | None = field(default=None, repr=False)  # the .npy the images are mapped from, if any
    target_val: bool = False  # the validation split is `--val`: labelled images of the setting the model serves

    @property
    def image_size(self) -> int:
        return int(self.images.shape[-1])

    @property
    def split_names(self) -> tuple[str, ...]:
        """The splits in row order: train, val, test, then unlabeled if there is one."""
        return tuple(self.split)

    @property
    def unlabeled_count(self) -> int:
        return len(self.split.get(UNLABELED, ()))

    def subset(self, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(images, labels) of `split`; a split's rows are contiguous, so its images are a view (images mapped
        from a file stay there until read)."""
        idx = self.split[split]
        if len(idx) and int(idx[-1]) - int(idx[0]) + 1 == len(idx):
            rows = slice(int(idx[0]), int(idx[-1]) + 1)
            return self.images[rows], self.labels[rows]
        return self.images[idx], self.labels[idx]

    def __reduce__(self):
        """Images mapped from a file travel to worker processes as the file's name, not as a copy."""
        fields = {k: getattr(self, k) for k in self.__dataclass_fields__ if k != "images"}
        if self.images_file is None:
            return _rebuild, (fields, self.images)
        return _reopen, (fields, len(self.images))


def _rebuild(fields: dict, images: torch.Tensor) -> ImageData:
    return ImageData(images=images, **fields)


def _reopen(fields: dict, rows: int) -> ImageData:
    return ImageData(images=torch.from_numpy(open_rows(fields["images_file"])[:rows]), **fields)


# --- decoding ---------------------------------------------------------------------------------------


def _decode(item: str | Image.Image, size: int) -> np.ndarray | None:
    if isinstance(item, Image.Image):
        return to_rgb_square(item, size)
    try:
        return open_image(item, size)
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as e:
        logger.warning("Skipping unreadable image %s (%s)", item, type(e).__name__)
        return None


def _decoded(items: Sequence[str | Image.Image], size: int) -> Iterator[np.ndarray | None]:
    """Each item decoded (None if unreadable), in order, with at most one round of chunks decoded ahead."""
    threads = max(1, min(DECODE_THREADS, available_cpus()))
    round_size = threads * DECODE_CHUNK
    with ThreadPoolExecutor(max_workers=threads) as pool:
        for start in range(0, len(items), round_size):
            yield from pool.map(lambda it: _decode(it, size), items[start:start + round_size], chunksize=DECODE_CHUNK)


def _remove_orphans(folder: Path) -> None:
    """Delete image files left by processes that were killed before they could (`.images-<pid>-*.npy`)."""
    for path in folder.glob(".images-*-*.npy"):
        try:
            os.kill(int(path.name.split("-")[1]), 0)
        except ProcessLookupError:
            path.unlink(missing_ok=True)
        except (ValueError, PermissionError):  # not ours to judge: another user's process is alive
            continue


class _Rows:
    """The preallocated uint8 [rows, 3, S, S] array decoding writes into: in memory, or a file past the bound."""

    def __init__(self, rows: int, size: int, *, memory_limit: int | None, disk_limit: int | None,
                 spill: Path | None) -> None:
        shape, nbytes = (rows, 3, size, size), rows * 3 * size * size
        self.path: Path | None = None
        if memory_limit is None or nbytes <= memory_limit // 2:
            self.array, self.writer = np.empty(shape, dtype=np.uint8), None
            return
        folder = Path(spill) if spill is not None else Path(tempfile.gettempdir())
        check_disk(nbytes, disk_limit if disk_limit is not None else nbytes, folder,
                   f"Decoding {rows} images at {size}px (over half of --cache-memory)")
        folder.mkdir(parents=True, exist_ok=True)
        _remove_orphans(folder)
        self.path = folder / f".images-{os.getpid()}-{secrets.token_hex(4)}.npy"
        self.writer = RowWriter(self.path, shape, np.uint8)

    def put(self, row: int, chw: np.ndarray) -> None:
        if self.writer is None:
            self.array[row] = chw
        else:
            self.writer.write(chw[None])

    def finish(self, kept: int, order: np.ndarray) -> tuple[torch.Tensor, Path | None]:
        """Rows `order` of the first `kept` rows, in that order, as a tensor (mapped from the file, if any)."""
        if self.writer is None:
            permute_rows(lambda i: self.array[i], self.array.__setitem__, order)
            return torch.from_numpy(self.array[:kept]), None
        self.writer.close(rows=kept)
        permute_file_rows(self.path, order)
        mapped = open_rows(self.path)
        weakref.finalize(mapped, self.path.unlink, missing_ok=True)  # the file lives as long as its map
        return torch.from_numpy(mapped[:kept]), self.path

    def discard(self) -> None:
        """After a failure: close and delete the file, if any (nothing half-written stays behind)."""
        if self.path is not None:
            if not self.writer._file.closed:
                self.writer._file.close()
            self.path.unlink(missing_ok=True)


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


def _finish_fingerprint(h: hashlib._Hash, labels: np.ndarray, split: dict[str, np.ndarray]) -> str:
    """The digest of the pixels (already hashed, in source order), labels and split indices in source order.

    Without unlabelled images it is what it was before they existed: their split only adds to it."""
    h.update(labels.tobytes())
    for s in split:
        h.update(split[s].tobytes())
    return h.hexdigest()[:16]


def _split_indices(label_ids: np.ndarray, classes: tuple[str, ...], given: list[str] | None,
                   fractions: tuple[float, float, float], seed: int) -> dict[str, np.ndarray]:
    """The given train/val(/test) folders, a test split carved from train when there is none, or a fresh split."""
    if given is not None:
        idx = {s: np.flatnonzero(np.array(given) == s) for s in SPLITS}
        for missing in ("val", "test"):
            if len(idx[missing]) == 0:  # no such folder (nor --val/--test): carve one out of train
                inner = _stratified_split(label_ids[idx["train"]], classes, (0.85, 0.0, 0.15), seed)
                idx[missing], idx["train"] = idx["train"][inner["test"]], idx["train"][np.concatenate(
                    [inner["train"], inner["val"]])]
    else:
        idx = _stratified_split(label_ids, classes, fractions, seed)
    return {s: np.sort(idx[s]).astype(np.int64) for s in SPLITS}


def _decode_all(items: Sequence, image_size: int, rows: _Rows) -> tuple[list[int], hashlib._Hash]:
    """Decode every item into `rows` (readable ones only, in order); the pixels' hash is built on the way."""
    digest, keep = hashlib.sha256(), []
    with progress(len(items), "decoding", "images") as bar:
        for i, decoded in enumerate(_decoded(items, image_size)):
            bar.update(1)
            if decoded is not None:
                chw = np.ascontiguousarray(decoded.transpose(2, 0, 1))
                digest.update(chw)
                rows.put(len(keep), chw)
                keep.append(i)
    return keep, digest


def _labelled(source: str, names: list[str], keep: list[int]) -> tuple[tuple[str, ...], np.ndarray]:
    """(classes, label id per kept image) of the labelled items `keep`; a class left without images is an error."""
    lost = sorted(set(names) - {names[i] for i in keep})
    if lost:
        raise DataError(f"Class {lost[0]!r} in {source!r} has no readable image left (all failed to decode); "
                        "replace its corrupt files or remove the class.")
    names = [names[i] for i in keep]
    classes = check_classes(source, names)
    class_id = {c: i for i, c in enumerate(classes)}  # a dict, not classes.index: linear in images x classes
    return classes, np.fromiter((class_id[n] for n in names), dtype=np.int64, count=len(names))


def load_data(source: str = "digits", *, image_size: int | None = None, seed: int = 0,
              fractions: tuple[float, float, float] = (0.70, 0.15, 0.15), memory_limit: int | None = None,
              disk_limit: int | None = None, spill: Path | None = None, unlabeled: str | None = None,
              val: str | None = None, test: str | None = None) -> ImageData:
    """Load a data set by embedded name, folder or CSV, decode it and split it.

    A folder that already holds `train/`, `val/` (and optionally `test/`) keeps that split; otherwise a
    stratified split with `fractions` and `seed` is drawn. `memory_limit`: the decoded images may take half of
    it (the activation cache gets the rest); past that they are decoded into a memory-mapped file in `spill`
    (default: the temporary folder), refused past `disk_limit`. None keeps them in memory whatever their size.
    `unlabeled`: a folder or CSV of images without labels (see `sources.read_unlabeled`), decoded with the
    rest into the split "unlabeled", after test.
    `val`, `test`: class folders of labelled images from the setting the model serves, used as those splits
    (see `sources.join_split_folders`); with `val` the search validates on them alone.
    """
    if image_size is not None and not 16 <= image_size <= 1024:
        raise DataError(f"--image-size must be between 16 and 1024 pixels, got {image_size}.")
    name, items, names, given_split, embedded_size = read_source(source)
    items, names, given_split = join_split_folders(source, items, names, given_split, val=val, test=test)
    extra = read_unlabeled(unlabeled, items) if unlabeled is not None else []
    image_size = image_size or embedded_size or default_image_size(items)
    rows = _Rows(len(items) + len(extra), image_size, memory_limit=memory_limit, disk_limit=disk_limit, spill=spill)
    try:
        keep, digest = _decode_all(items + extra, image_size, rows)
        keep_extra = [i for i in keep if i >= len(items)]
        keep = keep[:len(keep) - len(keep_extra)]
        if extra and not keep_extra:
            raise DataError(f"None of the {len(extra)} images in --unlabeled {unlabeled!r} could be decoded; pass a "
                            f"folder of readable images ({', '.join(IMAGE_SUFFIXES)}).")
        classes, label_ids = _labelled(source, names, keep)
        split = _split_indices(label_ids, classes, None if given_split is None else [given_split[i] for i in keep],
                               fractions, seed)
        if extra:
            split[UNLABELED] = np.arange(len(keep), len(keep) + len(keep_extra), dtype=np.int64)
        order = np.concatenate(list(split.values()))  # row i of the result is decoded image order[i]
        images, images_file = rows.finish(len(keep) + len(keep_extra), order)
    except BaseException:
        rows.discard()
        raise
    labels = np.concatenate([label_ids, np.full(len(keep_extra), -1, dtype=np.int64)])
    bounds = np.cumsum([0] + [len(v) for v in split.values()])
    return ImageData(name=name, images=images, labels=torch.from_numpy(labels[order]), classes=classes,
                     split={s: torch.arange(int(bounds[i]), int(bounds[i + 1])) for i, s in enumerate(split)},
                     fingerprint=_finish_fingerprint(digest, label_ids, split),
                     source_index=torch.from_numpy(np.asarray(keep + keep_extra, dtype=np.int64)[order]),
                     images_file=images_file, target_val=val is not None)
