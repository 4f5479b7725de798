"""Arrays over the memory bound: `.npy` files written row by row and mapped back, never copied whole.

Writing streams (`RowWriter` appends rows with plain writes): a writable memory map would hold every dirty
page in the process's resident set until write-back, which is how the old activation cache's peak memory
grew with the data. Reading maps the file copy-on-write (`open_rows`): pages come from the page cache on
demand and are never written back, and `release` drops them from the resident set again. `permute_rows`
puts rows in a new order in place, holding one row, in memory or in a file.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import math
import mmap
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np

from autotransfer.errors import ConfigError

try:
    _LIBC = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    _LIBC.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
except (OSError, AttributeError, TypeError):  # no C library with madvise (Windows)
    _LIBC = None


class RowWriter:
    """A `.npy` file of `shape` and `dtype`, written in row order by `write(rows)`; `close` checks the count.

    `close(rows=n)` accepts fewer rows than the header promises (skipped inputs): the file is padded with zeros.
    """

    def __init__(self, path: Path, shape: tuple[int, ...], dtype: np.dtype | str) -> None:
        self.path, self.shape, self.dtype = Path(path), tuple(int(s) for s in shape), np.dtype(dtype)
        self.rows = 0
        self._file = open(self.path, "wb")
        header = {"descr": np.lib.format.dtype_to_descr(self.dtype), "fortran_order": False, "shape": self.shape}
        np.lib.format.write_array_header_1_0(self._file, header)
        self.offset = self._file.tell()
        self.row_bytes = int(np.prod(self.shape[1:], dtype=np.int64)) * self.dtype.itemsize

    def write(self, rows: np.ndarray) -> None:
        rows = np.ascontiguousarray(rows, dtype=self.dtype)
        if rows.shape[1:] != self.shape[1:] or self.rows + len(rows) > self.shape[0]:
            raise ValueError(f"{self.path.name}: rows of shape {rows.shape} do not fit {self.shape} after {self.rows}")
        self._file.write(memoryview(rows).cast("B"))
        self.rows += len(rows)

    def close(self, *, rows: int | None = None) -> None:
        expected = self.shape[0] if rows is None else rows
        if self.rows != expected:
            self._file.close()
            raise ValueError(f"{self.path.name}: {self.rows} rows written, expected {expected}")
        self._file.truncate(self.offset + self.shape[0] * self.row_bytes)
        self._file.close()


def open_rows(path: Path) -> np.ndarray:
    """The array of a `.npy` file, mapped copy-on-write: nothing is read until used, nothing written back."""
    with open(path, "rb") as f:
        version = np.lib.format.read_magic(f)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read_header(f)
        offset = f.tell()
        size = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if fortran or os.fstat(f.fileno()).st_size < offset + size:
            raise ValueError(f"{Path(path).name} is truncated or not in row order")
        mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    return np.ndarray(shape, dtype=dtype, buffer=mapped, offset=offset)


def release(array) -> None:
    """Drop the pages of an array mapped by `open_rows` (or a tensor on one) from the resident set.

    They stay in the page cache and are read again on use. Only for such arrays: on ordinary memory
    MADV_DONTNEED would zero the pages. A no-op where the C library has no madvise.
    """
    a = np.asarray(array)
    if a.nbytes == 0 or _LIBC is None:
        return
    address = a.__array_interface__["data"][0]
    start = address - address % mmap.PAGESIZE
    _LIBC.madvise(ctypes.c_void_p(start), ctypes.c_size_t(address + a.nbytes - start), mmap.MADV_DONTNEED)


def permute_rows(get: Callable[[int], np.ndarray], put: Callable[[int, np.ndarray], None], order: np.ndarray) -> None:
    """Rearrange rows in place so that new row i is old row `order[i]`, following cycles with one spare row."""
    done = np.zeros(len(order), dtype=bool)
    for start in range(len(order)):
        if done[start]:
            continue
        done[start] = True
        if order[start] == start:
            continue
        first, j = np.array(get(start)), start
        while True:
            k = int(order[j])
            if k == start:
                put(j, first)
                break
            put(j, get(k))
            done[k] = True
            j = k


def permute_file_rows(path: Path, order: np.ndarray) -> None:
    """`permute_rows` on the rows of a `.npy` file with positioned reads and writes (no memory map)."""
    with open(path, "rb") as f:
        version = np.lib.format.read_magic(f)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, _, dtype = read_header(f)
        offset = f.tell()
    row_bytes = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize
    fd = os.open(path, os.O_RDWR)
    try:
        def get(i: int) -> np.ndarray:
            return np.frombuffer(os.pread(fd, row_bytes, offset + i * row_bytes), dtype=np.uint8)

        def put(i: int, row: np.ndarray) -> None:
            os.pwrite(fd, memoryview(np.ascontiguousarray(row)).cast("B"), offset + i * row_bytes)

        permute_rows(get, put, order)
    finally:
        os.close(fd)


def human(nbytes: float) -> str:
    """Bytes as the flags write them, rounded up: 1.5G, 300.0M, 12.1K."""
    for unit, scale in (("T", 2**40), ("G", 2**30), ("M", 2**20), ("K", 2**10)):
        if nbytes >= scale:
            return f"{math.ceil(nbytes / scale * 10) / 10:.1f}{unit}"
    return f"{int(nbytes)}B"


def check_disk(needed: int, limit: int, folder: Path, what: str) -> None:
    """Refuse, before anything is written, to put `needed` bytes in `folder` past `limit` or its free space."""
    folder = Path(folder)
    existing = next((p for p in (folder, *folder.parents) if p.exists()), Path("."))
    free = shutil.disk_usage(existing).free
    if needed > limit:
        raise ConfigError(f"{what} needs {human(needed)} on disk in {str(folder)!r}, over --cache-disk "
                          f"{human(limit)}; pass --cache-disk {human(needed)} or more, or a smaller "
                          "--image-size.")
    if needed > free:
        raise ConfigError(f"{what} needs {human(needed)} on disk in {str(folder)!r}, but only {human(free)} is free "
                          "there; free some space or pass --out on a larger disk.")
