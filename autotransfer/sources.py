"""Where images and labels come from: an embedded data set, a folder of class folders, or a CSV of path,label.

Reading a source lists its items (file paths, or PIL images for the embedded sets) and their class names;
nothing is decoded here (see `data.py`).
"""

from __future__ import annotations

import csv
import logging
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from autotransfer.errors import DataError

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")
SPLITS = ("train", "val", "test")


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


# --- folders and CSV files -------------------------------------------------------------------


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


def _read_csv(path: Path, columns: tuple[str, ...] = ("path", "label")) -> tuple[list[str], list[str]]:
    """(paths, labels) of a CSV with `columns` (a CSV of unlabelled images needs only `path`; labels are then "")."""
    # utf-8-sig: Excel's "CSV UTF-8" starts with a byte-order mark, which would otherwise stick to "path"
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            if not reader.fieldnames or not set(columns) <= {c.strip() for c in reader.fieldnames}:
                wanted = f"column{'s' if len(columns) > 1 else ''} {' and '.join(map(repr, columns))}"
                raise DataError(f"CSV {str(path)!r} must have a header with {wanted}, got {reader.fieldnames}; "
                                f"write one row per image as `{','.join(columns)}`.")
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
        labels.append(row.get("label", ""))
    return items, labels


def read_source(source: str) -> tuple[str, list, list[str], list[str] | None, int | None]:
    """(name, items, class names, given split per item or None, default image size or None) of a source."""
    if source in EMBEDDED:
        loader, size, _ = EMBEDDED[source]
        items, names = loader()
        return source, items, names, None, size
    path = Path(source)
    if not path.exists():
        raise DataError(f"Data {source!r} is neither a folder, a CSV file nor an embedded data set "
                        f"({', '.join(EMBEDDED)}); check the path or run `autotransfer datasets`.")
    name = data_name(source)
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
    check_classes(source, names)
    return name, items, names, given_split, None


def join_split_folders(source: str, items: list, names: list[str], given_split: list[str] | None, *,
                       val: str | None = None, test: str | None = None) -> tuple[list, list[str], list[str] | None]:
    """DATA's listing with the class folders of `--val` and `--test` joined as those splits (DATA's own images are
    then training images, and a split neither DATA nor a flag gives is carved out of them, see `data.py`)."""
    flags = {s: p for s, p in (("val", val), ("test", test)) if p is not None}
    if not flags:
        return items, names, given_split
    for s, p in flags.items():
        if given_split is not None and s in given_split:
            raise DataError(f"Data {source!r} has its own {s}/ folder and --{s} {p!r} was given too; pass one of "
                            "them.")
    items, names = list(items), list(names)
    given_split = list(given_split) if given_split is not None else ["train"] * len(items)
    known, listed = set(names), {str(Path(i).resolve()) for i in items if isinstance(i, str)}
    for s, p in flags.items():
        if not Path(p).is_dir():
            raise DataError(f"--{s} {p!r} is not a folder; pass a folder of class folders (--{s} DIR, with "
                            f"DIR/<class>/<image>.png named as DATA's classes).")
        found, labels = _scan_class_folders(Path(p))
        if not found:
            raise DataError(f"No images found in --{s} {p!r}; expected class folders (DIR/<class>/*.png). "
                            f"Supported files: {', '.join(IMAGE_SUFFIXES)}.")
        unknown = sorted(set(labels) - known)
        if unknown:
            shown = ", ".join(sorted(known)[:5]) + (", ..." if len(known) > 5 else "")
            raise DataError(f"--{s} {p!r} has class {unknown[0]!r}, which DATA {source!r} does not have; name its "
                            f"class folders as DATA's ({shown}).")
        if any(str(Path(f).resolve()) in listed for f in found):
            raise DataError(f"--{s} {p!r} holds images that DATA {source!r} holds too; pass a folder of other images.")
        items, names, given_split = items + found, names + labels, given_split + [s] * len(found)
    return items, names, given_split


def check_classes(source: str, labels: Sequence[str]) -> tuple[str, ...]:
    classes = tuple(sorted(set(labels)))
    if len(labels) == 0:
        raise DataError(f"No images found in {source!r}; expected class folders (DATA/<class>/*.png) or a CSV "
                        f"of path,label. Supported files: {', '.join(IMAGE_SUFFIXES)}.")
    if len(classes) < 2:
        raise DataError(f"Found {len(classes)} class in {source!r}; need at least 2 "
                        "(layout: DATA/<class>/<image>.png). Add a folder per class.")
    return classes


def data_name(source: str) -> str:
    """The name the data of `source` gets (and its study by default), known before anything is decoded."""
    if source in EMBEDDED:
        return source
    path = Path(source)
    return path.stem if path.is_file() else path.name


def read_unlabeled(source: str, labelled: Sequence) -> list[str]:
    """Image paths of `--unlabeled`: a folder of images in any layout, or a CSV with a `path` column.

    `labelled` is the labelled source's listing: an unlabelled set that holds any of its files is refused, since
    its images would count as target images while the search trains and validates on them.
    """
    path = Path(source)
    if not path.exists():
        raise DataError(f"--unlabeled {source!r} does not exist; pass a folder of images (any layout) or a CSV with "
                        "a 'path' column.")
    if path.is_file():
        if path.suffix.lower() != ".csv":
            raise DataError(f"--unlabeled {source!r} is not a .csv; pass a folder of images or a CSV with a 'path' "
                            "column.")
        items = _read_csv(path, columns=("path",))[0]
    else:
        files = sorted(f for f in path.rglob("*")
                       if f.is_file() and not any(p.startswith(".") for p in f.relative_to(path).parts))
        items = [str(f) for f in files if f.suffix.lower() in IMAGE_SUFFIXES]
    if not items:
        raise DataError(f"No images found in --unlabeled {source!r}; expected image files ({', '.join(IMAGE_SUFFIXES)})"
                        " in any layout, or a CSV listing them in a 'path' column.")
    known = {str(Path(p).resolve()) for p in labelled if isinstance(p, str)}
    shared = [p for p in items if str(Path(p).resolve()) in known]
    if shared:
        raise DataError(f"--unlabeled {source!r} holds {len(shared)} of the labelled images (e.g. {shared[0]!r}); "
                        "pass a folder of images that are not in DATA.")
    return items
