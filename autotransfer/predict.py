"""Classify image files with an exported model through onnxruntime, preprocessing read from its metadata.

Imports neither torch nor onnx: `pip install --no-deps autotransfer onnxruntime-gpu numpy pillow` is enough.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from autotransfer.errors import DataError, ExportError
from autotransfer.images import open_image
from autotransfer.runtime import open_session, read_metadata, run_batched

REQUIRED_METADATA = ("class_names", "input_size", "mean", "std")
_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16}


def load_images(paths: Sequence[str | Path], size: int, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """Files -> float32 [N,3,size,size], exactly as the training data was prepared."""
    if not paths:
        raise DataError("No images given; pass one or more image files (PNG/JPEG/BMP/TIFF/WebP).")
    arrays = []
    for p in paths:
        try:
            arrays.append(open_image(p, size))
        except (FileNotFoundError, IsADirectoryError):
            raise DataError(f"Image {str(p)!r} does not exist; pass existing image files.") from None
        except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError):
            raise DataError(f"Image {str(p)!r} cannot be decoded; pass PNG/JPEG/BMP/TIFF/WebP files.") from None
    x = np.stack(arrays).astype(np.float32).transpose(0, 3, 1, 2) / 255.0
    return (x - np.asarray(mean, np.float32).reshape(1, 3, 1, 1)) / np.asarray(std, np.float32).reshape(1, 3, 1, 1)


def _input_spec(session, meta: dict, name: str) -> tuple[int, int | None, type]:
    """(image size, fixed batch or None, dtype) the model takes; ExportError if autotransfer cannot feed it."""
    missing = [k for k in REQUIRED_METADATA if k not in meta]
    if missing:
        raise ExportError(f"Model {name!r} lacks metadata {missing}, so its preprocessing is unknown; export it "
                          "with autotransfer (`autotransfer search` or `autotransfer export`).")
    inp = session.get_inputs()[0]
    shape = list(inp.shape)
    if len(shape) != 4 or shape[1] != 3:
        raise ExportError(f"Model {name!r} takes input {inp.name!r} of shape {shape}; predict feeds RGB images as "
                          "[batch, 3, H, W] (NCHW). Re-export the model with autotransfer.")
    size = int(meta["input_size"][-1])
    fixed = [d for d in shape[2:] if isinstance(d, int)]
    if any(d != size for d in fixed):
        raise ExportError(f"Model {name!r} takes {shape[2]}x{shape[3]} images but its metadata says {size}px; "
                          "the file was edited after export: re-export it.")
    if inp.type not in _DTYPES:
        raise ExportError(f"Model {name!r} takes {inp.type} input; predict feeds float32 or float16 images.")
    batch = shape[0] if isinstance(shape[0], int) and shape[0] > 0 else None
    return size, batch, _DTYPES[inp.type]


class Predictor:
    """An exported model on an onnxruntime provider (`auto`: TensorRT > CUDA > CPU), with its own preprocessing."""

    def __init__(self, model_path: str | Path, *, provider: str = "auto") -> None:
        self.session = open_session(model_path, provider=provider)
        meta = read_metadata(self.session)
        self.image_size, self._fixed_batch, self._dtype = _input_spec(self.session, meta, str(model_path))
        self.classes: list[str] = list(meta["class_names"])
        self.mean, self.std = meta["mean"], meta["std"]

    @property
    def provider(self) -> str:
        return self.session.get_providers()[0]

    def logits(self, x: np.ndarray) -> np.ndarray:
        """Logits for a preprocessed float32 batch; pads to the model's batch size when it is fixed."""
        size = self._fixed_batch or max(1, len(x))  # a dynamic batch axis takes all of `x` at once
        out = run_batched(self.session, x.astype(self._dtype, copy=False), sizes=(size,), pad=bool(self._fixed_batch))
        return out.astype(np.float32)

    def predict(self, paths: Sequence[str | Path], *, batch_size: int = 64) -> list[dict]:
        """One dict per image: path, class, probability (softmax of the logits); decodes one batch at a time."""
        if not paths:
            raise DataError("No images given; pass one or more image files (PNG/JPEG/BMP/TIFF/WebP).")
        if batch_size < 1:
            raise DataError(f"batch_size must be at least 1, got {batch_size}.")
        results = []
        for i in range(0, len(paths), batch_size):
            chunk = paths[i:i + batch_size]
            logits = self.logits(load_images(chunk, self.image_size, self.mean, self.std))
            e = np.exp(logits - logits.max(1, keepdims=True))
            probs = e / e.sum(1, keepdims=True)
            for p, row in zip(chunk, probs, strict=True):
                k = int(row.argmax())
                results.append({"path": str(p), "class": self.classes[k], "probability": float(row[k])})
        return results
