"""Classify image files with an exported model through onnxruntime, preprocessing read from its metadata."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from autotransfer.data import to_rgb_square
from autotransfer.errors import ConfigError, DataError
from autotransfer.export import read_metadata

PROVIDER_ORDER = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")


def open_session(model_path: str | Path):
    """Session on the best available provider (TensorRT, CUDA, then CPU)."""
    try:
        import onnxruntime as ort
    except ImportError:
        raise ConfigError("onnxruntime is not installed; `pip install autotransfer` (CPU) or "
                          "`pip install 'autotransfer[gpu]'` (CUDA).") from None
    path = Path(model_path)
    if not path.is_file():
        raise ConfigError(f"Model {str(path)!r} does not exist; pass the path of an exported model.onnx.")
    available = set(ort.get_available_providers())
    providers = [p for p in PROVIDER_ORDER if p in available]
    options = ort.SessionOptions()
    options.log_severity_level = 3
    try:
        return ort.InferenceSession(str(path), options, providers=providers)
    except Exception as e:  # noqa: BLE001 - onnxruntime raises several unrelated types for a bad file
        raise ConfigError(f"Model {str(path)!r} is not a readable ONNX model ({type(e).__name__}); re-export it "
                          "with `autotransfer search` or pass another file.") from None


def load_images(paths: Sequence[str | Path], size: int, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """Files -> float32 [N,3,size,size], exactly as the training data was prepared."""
    arrays = []
    for p in paths:
        try:
            with Image.open(p) as img:
                arrays.append(to_rgb_square(img, size))
        except (FileNotFoundError, IsADirectoryError):
            raise DataError(f"Image {str(p)!r} does not exist; pass existing image files.") from None
        except (UnidentifiedImageError, OSError):
            raise DataError(f"Image {str(p)!r} cannot be decoded; pass PNG/JPEG/BMP/TIFF/WebP files.") from None
    x = np.stack(arrays).astype(np.float32).transpose(0, 3, 1, 2) / 255.0
    return (x - np.asarray(mean, np.float32).reshape(1, 3, 1, 1)) / np.asarray(std, np.float32).reshape(1, 3, 1, 1)


class Predictor:
    """An exported model on the best available onnxruntime provider, with its own preprocessing."""

    def __init__(self, model_path: str | Path) -> None:
        self.session = open_session(model_path)
        meta = read_metadata(self.session)
        missing = {"class_names", "input_size", "mean", "std"} - set(meta)
        if missing:
            raise ConfigError(f"Model {str(model_path)!r} lacks metadata {sorted(missing)}; export it with "
                              "autotransfer.")
        self.classes: list[str] = list(meta["class_names"])
        self.image_size = int(meta["input_size"][-1])
        self.mean, self.std = meta["mean"], meta["std"]

    @property
    def provider(self) -> str:
        return self.session.get_providers()[0]

    def predict(self, paths: Sequence[str | Path], *, batch_size: int = 64) -> list[dict]:
        """One dict per image: path, class, probability (softmax of the logits)."""
        results = []
        for i in range(0, len(paths), batch_size):
            chunk = paths[i:i + batch_size]
            x = load_images(chunk, self.image_size, self.mean, self.std)
            logits = self.session.run(["logits"], {"input": x})[0]
            e = np.exp(logits - logits.max(1, keepdims=True))
            probs = e / e.sum(1, keepdims=True)
            for p, row in zip(chunk, probs, strict=True):
                k = int(row.argmax())
                results.append({"path": str(p), "class": self.classes[k], "probability": float(row[k])})
        return results
