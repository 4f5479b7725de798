"""Where trials run: device choice, mixed precision and CPU threads.

On a GPU, training runs under bf16 autocast (fp32 on GPUs without bf16, where fp16 would need loss
scaling) with channels_last tensors; on the CPU it runs in float32, also channels_last (2-3x faster for
depthwise convolutions), on one thread per CPU the process may use (`runtime.available_cpus`).
"""

from __future__ import annotations

import contextlib

import torch

from autotransfer.defaults import DEVICES
from autotransfer.errors import ConfigError
from autotransfer.runtime import available_cpus


def pick_device(name: str = "auto") -> torch.device:
    """'auto' -> cuda when available, else cpu; 'cuda' without a GPU is a clear error."""
    if name not in DEVICES:
        raise ConfigError(f"--device must be one of {DEVICES}, got {name!r}.")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda was asked for but no CUDA GPU is visible; use --device cpu or auto.")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA; a no-op on the CPU, where fp32 is both exact and fastest."""
    if device.type != "cuda" or not torch.cuda.is_bf16_supported():
        return contextlib.nullcontext()
    return torch.autocast("cuda", dtype=torch.bfloat16)


def threads_per_worker(workers: int = 1) -> int:
    """An equal share of the CPUs this process may use (`runtime.available_cpus`: its affinity mask)."""
    return max(1, available_cpus() // max(1, workers))


def configure_threads(workers: int = 1) -> int:
    """Give each of `workers` processes an equal share of the CPUs; returns this process's threads."""
    threads = threads_per_worker(workers)
    torch.set_num_threads(threads)
    return threads


@contextlib.contextmanager
def threads(n: int):
    """Run a block on `n` intra-op threads, then restore the previous setting."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)
