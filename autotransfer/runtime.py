"""onnxruntime sessions: provider choice with fallback, tuned CPU options, the model's metadata, batched runs.

Imports neither torch nor onnx, so a GPU inference image needs only onnxruntime-gpu, numpy and pillow.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from autotransfer.errors import ConfigError, ExportError

PROVIDERS = {"tensorrt": "TensorrtExecutionProvider", "cuda": "CUDAExecutionProvider", "cpu": "CPUExecutionProvider"}
PROVIDER_CHOICES = ("auto", *PROVIDERS)  # `auto` tries them in this order


def _ort():
    try:
        import onnxruntime as ort
    except ImportError:
        raise ConfigError("onnxruntime is not installed; `pip install 'autotransfer[cpu]'` (CPU) or "
                          "`pip install 'autotransfer[gpu]'` (CUDA).") from None
    return ort


def available_cpus() -> int:
    """Logical CPUs this process may run on: its affinity mask where there is one (Linux), else all of them.

    Each hyper-thread counts as one, so this is not the number of physical cores; PyTorch's and ORT's thread
    counts are sized from it.
    """
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


physical_cores = available_cpus  # the old, wrong name; benchmarks/onnx_latency.py still imports it


def session_options(*, threads: int | None = None):
    """Full graph optimisation and a fixed thread count: `threads`, or with None one per available CPU (which
    beats ORT's default on small CNNs). 0 is refused: to ORT it means "its default", not "no limit"."""
    if threads is not None and threads < 1:
        raise ConfigError(f"threads must be at least 1 (or None for one per available CPU), got {threads}.")
    ort = _ort()
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = available_cpus() if threads is None else threads
    return options


def provider_list(provider: str = "auto") -> list[str]:
    """Execution providers to request, best first; CPU always last so unsupported nodes still run."""
    if provider not in PROVIDER_CHOICES:
        raise ConfigError(f"Unknown provider {provider!r}; choose one of {', '.join(PROVIDER_CHOICES)}.")
    available = set(_ort().get_available_providers())
    wanted = list(PROVIDERS.values()) if provider == "auto" else [PROVIDERS[provider], PROVIDERS["cpu"]]
    if wanted[0] not in available and provider not in ("auto", "cpu"):
        raise ConfigError(f"Provider {provider!r} is not available in this onnxruntime (available: "
                          f"{', '.join(sorted(available))}); install 'autotransfer[gpu]' on a CUDA machine "
                          "or use --provider auto.")
    return [p for p in dict.fromkeys(wanted) if p in available]


def open_session(model_path: str | Path, *, provider: str = "auto", threads: int | None = None):
    """Session for `model_path` on `provider` (`auto`: TensorRT, then CUDA, then CPU, as available).

    Raises ConfigError for a missing file or an unavailable provider, ExportError for an unreadable model.
    """
    path = Path(model_path)
    if not path.is_file():
        raise ConfigError(f"Model {str(path)!r} does not exist; pass the path of an exported model.onnx.")
    ort = _ort()
    providers = provider_list(provider)
    if PROVIDERS["cuda"] in providers and "torch" not in sys.modules:
        ort.preload_dlls()  # CUDA/cuDNN from the nvidia-* wheels of onnxruntime-gpu[cuda,cudnn]
    try:
        session = ort.InferenceSession(str(path), session_options(threads=threads), providers=providers)
    except Exception as e:  # noqa: BLE001 - onnxruntime raises several unrelated types for a bad file
        raise ExportError(f"Model {str(path)!r} is not a readable ONNX model ({type(e).__name__}); re-export it "
                          "with `autotransfer search` or pass another file.") from None
    if provider != "auto" and session.get_providers()[0] != PROVIDERS[provider]:
        raise ConfigError(f"Provider {provider!r} failed to start for {str(path)!r} (running on "
                          f"{session.get_providers()[0]}); check the CUDA/TensorRT install or use --provider auto.")
    return session


def cpu_session(path: str | Path, *, threads: int | None = None):
    """A CPU session (exact fp32 kernels, used for the export checks)."""
    return open_session(path, provider="cpu", threads=threads)


def read_metadata(session) -> dict[str, Any]:
    """metadata_props of an onnxruntime session, JSON-decoded."""
    raw = session.get_modelmeta().custom_metadata_map
    out = {}
    for k, v in raw.items():
        try:
            out[k] = json.loads(v)
        except json.JSONDecodeError:
            out[k] = v
    return out


def batch_slices(n: int, sizes: Sequence[int] = (64,)) -> list[slice]:
    """Consecutive slices covering rows 0..n, their sizes cycling through `sizes` (the last may be shorter).

    `n == 0` gives one empty slice, so a run of no rows still returns an output of the right shape.
    """
    if any(size < 1 for size in sizes):
        raise ValueError(f"batch sizes must be at least 1, got {list(sizes)}")
    slices, start = [], 0
    while start < n:
        size = sizes[len(slices) % len(sizes)]
        slices.append(slice(start, min(n, start + size)))
        start += size
    return slices or [slice(0, 0)]


class Rows(Protocol):
    """Rows that are read a slice at a time (an array, or `preprocess.NormalisedImages`)."""

    def __len__(self) -> int: ...

    def __getitem__(self, rows: slice) -> Any: ...


def run_batched(session, x: np.ndarray | Rows, *, sizes: Sequence[int] = (64,), pad: bool = False,
                on_batch: Callable[[int], None] | None = None) -> np.ndarray:
    """The session's first output for the rows of `x`, run in the batches of `batch_slices(len(x), sizes)`.

    `pad=True` is for a model with a fixed batch size `sizes[0]`: a shorter batch is padded with zero rows,
    whose outputs are dropped. `x` must already have the dtype the model takes; it may be anything whose slices
    are arrays (`preprocess.NormalisedImages`: a batch is normalised when it is run). `on_batch(rows)` runs after
    each batch (a progress's `update`).
    """
    input_name, output_name = session.get_inputs()[0].name, session.get_outputs()[0].name
    outputs = []
    for rows in batch_slices(len(x), sizes):
        batch = np.ascontiguousarray(x[rows])
        n = len(batch)
        if pad and n < sizes[0]:
            batch = np.concatenate([batch, np.zeros((sizes[0] - n, *batch.shape[1:]), batch.dtype)])
        outputs.append(session.run([output_name], {input_name: batch})[0][:n])
        if on_batch is not None:
            on_batch(n)
    return np.concatenate(outputs)
