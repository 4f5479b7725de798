"""Activations at every group boundary, computed in one forward pass and shared by all trials.

Boundary `k` holds the input of group `k + 1` (boundary 0 = normalised images, boundary G = the last
group's output). A trial that freezes `k` groups trains only on boundary `k`: its frozen groups are never
run again, which is what makes a 50-trial search affordable on a CPU.

Storage is bounded: boundaries are kept as float32 when they fit in `memory_limit` bytes, as float16 when
only that fits, and otherwise stay on disk as memory-mapped `.npy` files. Trials always read what is
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
from pathlib import Path

import numpy as np
import torch

from autotransfer.atomic import replacing_folder
from autotransfer.backbones import Backbone
from autotransfer.data import SPLITS, ImageData
from autotransfer.heads import GlobalPool

logger = logging.getLogger(__name__)
TRAIN_AND_VAL = "train+val"
DEFAULT_MEMORY_LIMIT = 4 * 2**30


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
    """Activations at boundaries 1..G for all images of `data`, computed once in eval mode.

    `folder`: persist the arrays there (under the cache key) and reuse them on the next run.
    `memory_limit`: bytes the boundaries may take in memory; beyond it float16, then memory-mapped disk.
    """

    def __init__(self, backbone: Backbone, data: ImageData, *, folder: Path | None = None,
                 memory_limit: int = DEFAULT_MEMORY_LIMIT, batch_size: int = 128) -> None:
        self.backbone, self.data, self.batch_size = backbone, data, batch_size
        self.key = cache_key(backbone, data)
        self.folder, self.memory_limit = folder, memory_limit
        self.order = torch.cat([data.split[s] for s in SPLITS])  # stored row i is image order[i]
        bounds = np.cumsum([0] + [len(data.split[s]) for s in SPLITS])
        self.slices = {s: slice(int(bounds[i]), int(bounds[i + 1])) for i, s in enumerate(SPLITS)}
        self.slices[TRAIN_AND_VAL] = slice(int(bounds[0]), int(bounds[2]))
        self.labels = data.labels[self.order]
        self.storage: str | None = None  # "float32" / "float16" in memory, or "disk"
        self.loaded_from_disk = False
        self.seconds = 0.0  # time of the forward pass (0 when loaded)
        self._boundaries: dict[int, torch.Tensor] = {}
        self._pooled: dict[tuple[int, str], torch.Tensor] = {}
        self._images: torch.Tensor | None = None

    # -- reading ---------------------------------------------------------------------------------
    def boundary(self, k: int) -> torch.Tensor:
        """Activations entering group `k + 1` for every image, rows in split order (see `order`).

        Boundary 0 is the uint8 images themselves (4x smaller than floats); `as_input` normalises a batch.
        """
        if k == 0:
            if self._images is None:
                self._images = self.data.images[self.order]
            return self._images
        if not self._boundaries:
            self._load_or_compute()
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
        """Globally pooled float32 vectors of boundary `k` (memoised: every head-only trial reuses them)."""
        if (k, pool) not in self._pooled:
            x = self.boundary(k)
            pooling = GlobalPool(pool)
            with torch.no_grad():
                self._pooled[k, pool] = torch.cat([pooling(self.as_input(x[i:i + 512])) for i in range(0, len(x), 512)])
        return self._pooled[k, pool][self.slices[split]], self.labels[self.slices[split]]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._boundaries.values())

    # -- building --------------------------------------------------------------------------------
    def _load_or_compute(self) -> None:
        shapes = self._shapes()
        floats = len(self.order) * sum(int(np.prod(s)) for s in shapes.values())
        dtype = "float32" if floats * 4 <= self.memory_limit else "float16"
        on_disk = floats * np.dtype(dtype).itemsize > self.memory_limit
        path = None if self.folder is None else self.folder / f"{self.key}-{dtype}"
        if path is not None and (path / "meta.json").is_file():
            try:
                self._load(path, on_disk)
                self.loaded_from_disk = True
                return
            except (OSError, ValueError, KeyError) as e:  # a damaged cache is recomputed, not trusted
                logger.warning("activation cache in %s is unreadable (%s); recomputing it", path, e)
                shutil.rmtree(path, ignore_errors=True)
        if path is None and on_disk:
            path = Path(tempfile.mkdtemp(prefix="autotransfer-cache-")) / f"{self.key}-{dtype}"
        self._compute(shapes, np.dtype(dtype), path, on_disk)

    def _shapes(self) -> dict[int, tuple[int, ...]]:
        groups = self.backbone.groups
        was_training = groups.training
        with torch.no_grad():
            x = normalise(self.data.images[:1], self.backbone.mean, self.backbone.std)
            shapes = {}
            for k, group in enumerate(groups.eval(), start=1):
                x = group(x)
                shapes[k] = tuple(x.shape[1:])
        groups.train(was_training)
        return shapes

    @torch.no_grad()
    def _compute(self, shapes: dict[int, tuple[int, ...]], dtype: np.dtype, path: Path | None,
                 on_disk: bool) -> None:
        """One eval-mode pass; each boundary is written straight into its (memory or disk) array."""
        started = time.perf_counter()
        # Another worker may build the same cache at the same moment: the first complete copy wins (atomic.py).
        staging = contextlib.nullcontext(None) if path is None else replacing_folder(path, keep_existing=True)
        with staging as write_dir:
            arrays = {}
            for k, shape in shapes.items():
                full = (len(self.order), *shape)
                if on_disk:
                    arrays[k] = np.lib.format.open_memmap(write_dir / f"b{k}.npy", mode="w+", dtype=dtype,
                                                          shape=full)
                else:
                    arrays[k] = np.empty(full, dtype=dtype)
            groups = self.backbone.groups
            was_training = groups.training
            groups.eval()
            for start in range(0, len(self.order), self.batch_size):
                rows = self.order[start:start + self.batch_size]
                x = normalise(self.data.images[rows], self.backbone.mean, self.backbone.std)
                for k in shapes:
                    x = groups[k - 1](x)
                    arrays[k][start:start + len(rows)] = x.numpy()
            groups.train(was_training)
            if write_dir is not None:
                for k, a in arrays.items():
                    a.flush() if on_disk else np.save(write_dir / f"b{k}.npy", a)
                (write_dir / "meta.json").write_text(json.dumps({"key": self.key, "dtype": str(dtype),
                                                                 "boundaries": sorted(shapes)}))
        self.seconds = time.perf_counter() - started
        self.storage = "disk" if on_disk else str(dtype)
        if on_disk:
            del arrays  # the memory maps of the staging folder, which has been renamed (or removed)
            self._load(path, on_disk)
            return
        self._boundaries = {k: torch.from_numpy(a) for k, a in arrays.items()}

    def _load(self, path: Path, on_disk: bool) -> None:
        meta = json.loads((path / "meta.json").read_text())
        if meta["key"] != self.key:
            raise ValueError(f"cache key {meta['key']} != {self.key}")
        boundaries = {}
        for k in meta["boundaries"]:
            a = np.load(path / f"b{k}.npy", mmap_mode="c" if on_disk else None)  # "c": never written back
            if len(a) != len(self.order):
                raise ValueError(f"boundary {k} has {len(a)} rows, expected {len(self.order)}")
            boundaries[int(k)] = torch.from_numpy(a)
        self._boundaries = boundaries
        self.storage = "disk" if on_disk else meta["dtype"]
