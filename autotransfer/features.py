"""Activations at the group boundaries trials start from, computed in one forward pass and shared by all trials.

Boundary `k` holds the input of group `k + 1` (boundary 0 = the images, boundary G = the last group's
output). A trial that freezes `k` groups trains from boundary `k`: its frozen groups are never run again,
which is what makes a 50-trial search affordable on a CPU. The pass also keeps every group's pooled
features (average and max per channel): the prior scores them and head-only trials train on them.

Only what the trials can use is kept (`stored`): the boundaries a fine-tune of the study's space may
start from (`use_space`; before the prior has narrowed it, every freeze depth), never boundary G (heads
read its pooled features). A boundary with more values per image than the image itself (the early, wide
layers: Lite0's stem and stage1 outputs at 224 px are 78 % of all its boundary bytes) is not stored
either: a trial freezing those groups starts from the nearest stored boundary below (`start_boundary`)
and runs the rest of its frozen groups on each batch without gradients, which costs less than reading them.

Storage is bounded: the arrays are kept as float32 when they fit in `memory_limit` bytes (less what
in-memory images take), as float16 when only that fits, and otherwise stay on disk as memory-mapped
`.npy` files, written by streaming (`rowfiles.py`), at most `disk_limit` bytes. Trials always read what is
stored (cast to float32 per batch), so a warm cache loaded from disk gives bit-identical results to the
cold pass that wrote it. Rows are stored in split order (train, val, test), so a split is a slice and
reading one never copies the whole array; "train+val" (the final refit's data) is one slice too.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import shutil
import tempfile
import time
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from autotransfer.atomic import replacing_folder
from autotransfer.backbones import Backbone
from autotransfer.data import ImageData
from autotransfer.preprocess import normalise, rows_per_batch
from autotransfer.progress import progress
from autotransfer.rowfiles import RowWriter, check_disk, open_rows, release

if TYPE_CHECKING:
    from autotransfer.strategy import SearchSpace

logger = logging.getLogger(__name__)
TRAIN_AND_VAL = "train+val"
DEFAULT_MEMORY_LIMIT = 4 * 2**30
DEFAULT_DISK_LIMIT = 50 * 2**30
RECOMPUTE_ABOVE = 1.0  # boundaries with more values per image than this times the image's are recomputed


def cache_key(backbone: Backbone, data: ImageData) -> str:
    """Everything that changes an activation: backbone, weights, image size, preprocessing, pixels."""
    parts = (backbone.name, backbone.weights_id, data.image_size, backbone.mean, backbone.std, data.fingerprint)
    return hashlib.sha256(repr(parts).encode()).hexdigest()[:16]


def nearest_below(stored: Sequence[int], k: int) -> int:
    """The largest stored boundary at or under `k`; 0 (the images) when there is none."""
    return max((j for j in stored if j <= k), default=0)


@dataclass(frozen=True)
class _Plan:
    """What one pass keeps and where: shapes, stored boundaries, dtype, memory or disk, bytes."""

    shapes: dict[int, tuple[int, ...]]  # boundary k (1..G) -> per-image shape
    stored: tuple[int, ...]
    dtype: np.dtype
    boundaries_on_disk: bool
    pooled_on_disk: bool
    rows: int

    def boundary_bytes(self, dtype: np.dtype | None = None) -> int:
        size = sum(int(np.prod(self.shapes[k])) for k in self.stored)
        return self.rows * size * np.dtype(dtype or self.dtype).itemsize

    @property
    def pooled_bytes(self) -> int:
        return self.rows * sum(2 * s[0] for s in self.shapes.values()) * 4

    @property
    def name(self) -> str:
        return f"{self.dtype}-b{''.join(map(str, self.stored)) if self.stored else 'none'}"


class ActivationCache:
    """Pooled features of every group and the stored boundaries for all images of `data`, in eval mode.

    `folder`: persist the arrays there (under the cache key) and reuse them on the next run.
    `memory_limit`: bytes the arrays may take in memory (in-memory images count); beyond it float16, then disk.
    `disk_limit`: bytes the arrays may take on disk (a memory-mapped image file counts); past it, a ConfigError.
    `store`: the boundaries to keep (default: every one a fine-tune may start from; `()`: pooled features only).
    """

    def __init__(self, backbone: Backbone, data: ImageData, *, folder: Path | None = None,
                 memory_limit: int = DEFAULT_MEMORY_LIMIT, disk_limit: int = DEFAULT_DISK_LIMIT,
                 batch_size: int = 128, store: Sequence[int] | None = None) -> None:
        self.backbone, self.data, self.batch_size = backbone, data, batch_size
        self.key = cache_key(backbone, data)
        self.folder, self.memory_limit, self.disk_limit = folder, memory_limit, disk_limit
        names = data.split_names  # train, val, test (and unlabeled)
        self.order = torch.cat([data.split[s] for s in names])  # stored row i is image order[i]
        bounds = np.cumsum([0] + [len(data.split[s]) for s in names])
        self.slices = {s: slice(int(bounds[i]), int(bounds[i + 1])) for i, s in enumerate(names)}
        self.slices[TRAIN_AND_VAL] = slice(int(bounds[0]), int(bounds[2]))
        self.labels = data.labels[self.order]
        self.storage: str | None = None  # "float32" / "float16" in memory, or "disk"
        self.loaded_from_disk = False
        self.seconds = 0.0  # time of the forward pass (0 when loaded)
        self.stored: tuple[int, ...] = ()  # boundaries kept in full, known once loaded
        self._store = None if store is None else tuple(sorted(set(store)))
        self._shapes_cache: dict[int, tuple[int, ...]] | None = None
        self._boundaries: dict[int, torch.Tensor] = {}
        self._pooled: dict[int, torch.Tensor] = {}  # k -> float32 [N, 2C]: channel averages, then maxima
        self._images: torch.Tensor | None = None
        self._mapped: list[torch.Tensor] = []  # arrays mapped from files, released at each trial's start
        self._ready = False

    # -- what to keep ----------------------------------------------------------------------------
    def candidates(self) -> tuple[int, ...]:
        """Boundaries worth storing: 1..G-1 without those larger per image than the image (see the module)."""
        limit = RECOMPUTE_ABOVE * 3 * self.data.image_size ** 2
        return tuple(k for k, s in self._shapes().items() if k < self.backbone.num_groups and np.prod(s) <= limit)

    def use_space(self, space: SearchSpace) -> None:
        """Keep only the boundaries that fine-tunes of `space` start from; a no-op once the arrays exist."""
        if self._ready:
            return
        low, high = space.tap_range
        depths = range(max(0, low - space.max_trainable_groups), high)  # freeze < tap for a fine-tune
        wide = self.candidates()
        self._store = tuple(sorted({nearest_below(wide, k) for k in depths} - {0}))

    def start_boundary(self, k: int) -> int:
        """The boundary a trial that freezes `k` groups trains from: `k`, or the nearest stored one below it."""
        self.load()
        return nearest_below(self.stored, k)

    # -- reading ---------------------------------------------------------------------------------
    def boundary(self, k: int) -> torch.Tensor:
        """Activations entering group `k + 1` for every image, rows in split order (see `order`).

        Boundary 0 is the uint8 images themselves (4x smaller than floats); `as_input` normalises a batch.
        """
        if k == 0:
            if self._images is None:
                identity = torch.equal(self.order, torch.arange(len(self.order)))
                self._images = self.data.images if identity else self.data.images[self.order]
            return self._images
        self.load()
        if k not in self._boundaries:
            raise KeyError(f"boundary {k} is not stored (stored: {self.stored}); start from "
                           f"start_boundary({k}) = {self.start_boundary(k)}")
        return self._boundaries[k]

    def split(self, k: int, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(activations, labels) of one split at boundary `k`; activations in their storage dtype."""
        return self.boundary(k)[self.slices[split]], self.labels[self.slices[split]]

    def as_input(self, x: torch.Tensor) -> torch.Tensor:
        """Stored rows of any boundary -> float32 model input (uint8 images are normalised here)."""
        if x.dtype == torch.uint8:
            return normalise(x, self.backbone.mean, self.backbone.std)
        return x.float()

    def pooled(self, k: int, pool: str, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Globally pooled float32 features of group `k` (its output, boundary k) for one split.

        Every trial starts here (its head is fitted first): the pages the last trial read from memory-mapped
        arrays leave the resident set, so memory stays bounded however many boundaries the trials touch.
        """
        self.load()
        self.release()
        both = self._pooled[k]
        x = both[:, : both.shape[1] // 2] if pool == "avg" else both
        return x[self.slices[split]], self.labels[self.slices[split]]

    def release(self) -> None:
        """Drop the pages of memory-mapped arrays (images, boundaries, pooled) from the resident set."""
        for t in self._mapped:
            release(t)
        if self.data.images_file is not None:
            release(self.data.images)

    @property
    def nbytes(self) -> int:
        """Bytes of the stored boundaries and pooled features (in memory or mapped)."""
        arrays = [*self._boundaries.values(), *self._pooled.values()]
        return sum(t.numel() * t.element_size() for t in arrays)

    # -- building --------------------------------------------------------------------------------
    def load(self) -> None:
        """Load the arrays from `folder`, or compute them in one forward pass (and persist them there)."""
        if self._ready:
            return
        plan = self._plan()
        found = self._find(plan)
        if found is not None:
            try:
                self._load(found, plan)
                self.loaded_from_disk = True
                self._ready = True
                return
            except (OSError, ValueError, KeyError) as e:  # a damaged cache is recomputed, not trusted
                logger.warning("activation cache in %s is unreadable (%s); recomputing it", found, e)
                shutil.rmtree(found, ignore_errors=True)
        self._compute(plan)
        self._ready = True

    def _available_memory(self) -> int:
        images = 0 if self.data.images_file is not None else self.data.images.numel()
        return self.memory_limit - images

    def _plan(self, stored: Sequence[int] | None = None, dtype: np.dtype | None = None) -> _Plan:
        """Float32 if everything fits in memory, float16 if that fits, else the boundaries (and pooled) on disk."""
        stored = tuple(stored if stored is not None else (self._store if self._store is not None else
                                                           self.candidates()))
        base = _Plan(self._shapes(), stored, np.dtype("float32"), False, False, len(self.order))
        free = self._available_memory()
        if dtype is None:
            dtype = np.dtype("float32") if base.pooled_bytes + base.boundary_bytes() <= free else np.dtype("float16")
        fits = base.pooled_bytes + base.boundary_bytes(dtype) <= free
        return _Plan(base.shapes, stored, np.dtype(dtype), not fits, base.pooled_bytes > free, base.rows)

    def _find(self, plan: _Plan) -> Path | None:
        """The folder of this plan, else any complete one of this key that stores at least these boundaries."""
        if self.folder is None:
            return None
        exact = self.folder / f"{self.key}-{plan.name}"
        if (exact / "meta.json").is_file():
            return exact
        for path in sorted(self.folder.glob(f"{self.key}-*")):
            try:
                meta = json.loads((path / "meta.json").read_text())
            except (OSError, ValueError):
                continue
            if meta.get("key") == self.key and set(plan.stored) <= set(meta.get("boundaries", ())):
                return path
        return None

    def _shapes(self) -> dict[int, tuple[int, ...]]:
        if self._shapes_cache is None:
            groups = self.backbone.groups
            was_training = groups.training
            with torch.no_grad():
                x = normalise(self.data.images[:1], self.backbone.mean, self.backbone.std)
                shapes = {}
                for k, group in enumerate(groups.eval(), start=1):
                    x = group(x)
                    shapes[k] = tuple(x.shape[1:])
            groups.train(was_training)
            self._shapes_cache = shapes
        return self._shapes_cache

    def _destination(self, plan: _Plan) -> tuple[Path | None, int]:
        """Where the pass writes (the cache folder, a temporary one for disk arrays, or nowhere) and how much."""
        if self.folder is not None:
            return self.folder / f"{self.key}-{plan.name}", plan.pooled_bytes + plan.boundary_bytes()
        needed = plan.boundary_bytes() * plan.boundaries_on_disk + plan.pooled_bytes * plan.pooled_on_disk
        if not needed:
            return None, 0
        tmp = Path(tempfile.mkdtemp(prefix="autotransfer-cache-"))
        weakref.finalize(self, shutil.rmtree, tmp, ignore_errors=True)
        return tmp / f"{self.key}-{plan.name}", needed

    @torch.no_grad()
    def _compute(self, plan: _Plan) -> None:
        """One eval-mode pass; each batch goes straight into its memory arrays and/or streams to its files."""
        path, needed = self._destination(plan)
        if path is not None:
            images_file = self.data.images_file
            on_disk = images_file.stat().st_size if images_file is not None and images_file.exists() else 0
            check_disk(needed, self.disk_limit - on_disk, path.parent,
                       f"The activation cache ({len(self.order)} images, boundaries {list(plan.stored)} in "
                       f"{plan.dtype} and pooled features)")
        started = time.perf_counter()
        # Another worker may build the same cache at the same moment: the first complete copy wins (atomic.py).
        staging = contextlib.nullcontext(None) if path is None else replacing_folder(path, keep_existing=True)
        with staging as write_dir:
            sinks = _Sinks(plan, write_dir)
            self._forward(plan, sinks)
            sinks.close(write_dir, {"key": self.key, "dtype": str(plan.dtype), "boundaries": list(plan.stored),
                                    "groups": len(plan.shapes), "rows": plan.rows})
        self.seconds = time.perf_counter() - started
        if plan.boundaries_on_disk or plan.pooled_on_disk:
            del sinks  # the files of the staging folder, which has been renamed (or removed)
            self._load(path, plan)
            return
        self._set(plan, {k: torch.from_numpy(a) for k, a in sinks.boundaries.items()},
                  {k: torch.from_numpy(a) for k, a in sinks.pooled.items()}, on_disk=False)

    def _forward(self, plan: _Plan, sinks: _Sinks) -> None:
        groups = self.backbone.groups
        was_training = groups.training
        groups.eval()
        images = self.boundary(0)
        try:
            step = rows_per_batch(images.shape[1:], most=self.batch_size)
            with progress(len(self.order), "activation pass", "images") as bar:
                for start in range(0, len(self.order), step):
                    x = normalise(images[start:start + step], self.backbone.mean, self.backbone.std)
                    for k in plan.shapes:
                        x = groups[k - 1](x)
                        sinks.put(k, start, x)
                    if self.data.images_file is not None:  # read once: keep the resident set flat
                        release(images[start:start + step])
                    bar.update(len(x))
        finally:
            groups.train(was_training)

    def _load(self, path: Path, plan: _Plan) -> None:
        meta = json.loads((path / "meta.json").read_text())
        if meta["key"] != self.key or meta["rows"] != plan.rows:
            raise ValueError(f"cache key {meta['key']} ({meta['rows']} rows) != {self.key} ({plan.rows} rows)")
        stored = tuple(int(k) for k in meta["boundaries"])
        actual = self._plan(stored, np.dtype(meta["dtype"]))  # memory or disk: decided by what is there
        boundaries, pooled = {}, {}
        for k in plan.shapes:
            pooled[k] = _read(path / f"p{k}.npy", (plan.rows, 2 * plan.shapes[k][0]), actual.pooled_on_disk)
        for k in stored:
            boundaries[k] = _read(path / f"b{k}.npy", (plan.rows, *plan.shapes[k]), actual.boundaries_on_disk)
        self._set(actual, boundaries, pooled, on_disk=actual.boundaries_on_disk)

    def _set(self, plan: _Plan, boundaries: dict, pooled: dict, *, on_disk: bool) -> None:
        self._boundaries, self._pooled, self.stored = boundaries, pooled, plan.stored
        self._mapped = ([*boundaries.values()] if plan.boundaries_on_disk else []) + (
            [*pooled.values()] if plan.pooled_on_disk else [])
        self.storage = "disk" if on_disk else str(plan.dtype)


def _read(path: Path, shape: tuple[int, ...], mapped: bool) -> torch.Tensor:
    a = open_rows(path)
    if a.shape != shape:
        raise ValueError(f"{path.name} has shape {a.shape}, expected {shape}")
    return torch.from_numpy(a if mapped else np.array(a))


class _Sinks:
    """Where one pass puts each batch: arrays in memory (what the plan keeps there), files in `write_dir`."""

    def __init__(self, plan: _Plan, write_dir: Path | None) -> None:
        self.plan = plan
        self.boundaries: dict[int, np.ndarray] = {}
        self.pooled: dict[int, np.ndarray] = {}
        self.files: dict[str, RowWriter] = {}
        for k, shape in plan.shapes.items():
            width = (plan.rows, 2 * shape[0])
            if not plan.pooled_on_disk:
                self.pooled[k] = np.empty(width, dtype=np.float32)
            if write_dir is not None:
                self.files[f"p{k}"] = RowWriter(write_dir / f"p{k}.npy", width, np.float32)
            if k in plan.stored:
                if not plan.boundaries_on_disk:
                    self.boundaries[k] = np.empty((plan.rows, *shape), dtype=plan.dtype)
                if write_dir is not None:
                    self.files[f"b{k}"] = RowWriter(write_dir / f"b{k}.npy", (plan.rows, *shape), plan.dtype)

    def put(self, k: int, start: int, x: torch.Tensor) -> None:
        pooled = torch.cat([x.mean(dim=(2, 3)), x.amax(dim=(2, 3))], dim=1).numpy()
        self._write(self.pooled, f"p{k}", k, start, pooled)
        if k in self.plan.stored:
            self._write(self.boundaries, f"b{k}", k, start, x.numpy().astype(self.plan.dtype, copy=False))

    def _write(self, arrays: dict[int, np.ndarray], name: str, k: int, start: int, rows: np.ndarray) -> None:
        if k in arrays:
            arrays[k][start:start + len(rows)] = rows
        if name in self.files:
            self.files[name].write(rows)

    def close(self, write_dir: Path | None, meta: dict) -> None:
        for f in self.files.values():
            f.close()
        if write_dir is not None:
            (write_dir / "meta.json").write_text(json.dumps(meta))
