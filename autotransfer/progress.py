"""Progress of one long step (decoding, the activation pass, a trial's steps, a refit): counts and time left.

On a terminal it is a tqdm bar that disappears when the step ends; in a log (stderr not a terminal) it is one
plain line every `interval` seconds, so a CI log or `nohup` output shows work, not a hang, and is not flooded
with carriage returns. `AUTOTRANSFER_PROGRESS=0` silences it (tests, library use).
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TextIO

LOG_INTERVAL = 10.0  # seconds between two lines when stderr is not a terminal


def _format_seconds(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


class Progress:
    """Counts done out of `total` in one step; `update(n)` after each chunk of work."""

    def __init__(self, total: int, description: str, unit: str, *, stream: TextIO, interval: float,
                 terminal: bool, enabled: bool) -> None:
        self.total, self.description, self.unit = max(0, int(total)), description, unit
        self.done = 0
        self._stream, self._interval, self._enabled = stream, interval, enabled
        self._start = self._last = time.monotonic()
        self._bar = None
        if enabled and terminal:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=self.total, desc=description, unit=unit, leave=False, dynamic_ncols=True,
                             file=stream)

    def update(self, n: int = 1) -> None:
        self.done += n
        if self._bar is not None:
            self._bar.update(n)
            return
        now = time.monotonic()
        if self._enabled and now - self._last >= self._interval and self.done < self.total:
            self._last = now
            self._stream.write(self.line() + "\n")
            self._stream.flush()

    def line(self) -> str:
        """`<description>: done/total unit (pct %), elapsed, about T left`."""
        elapsed = time.monotonic() - self._start
        pct = 100.0 * self.done / self.total if self.total else 100.0
        left = elapsed * (self.total - self.done) / self.done if self.done else float("nan")
        eta = f", about {_format_seconds(left)} left" if self.done else ""
        return (f"{self.description}: {self.done}/{self.total} {self.unit} ({pct:.0f} %), "
                f"{_format_seconds(elapsed)} elapsed{eta}")

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def enabled() -> bool:
    return os.environ.get("AUTOTRANSFER_PROGRESS", "1") != "0"


@contextmanager
def progress(total: int, description: str, unit: str = "it", *, stream: TextIO | None = None,
             interval: float = LOG_INTERVAL) -> Iterator[Progress]:
    """A `Progress` for one step, closed when the block ends (its bar removed, even on an exception)."""
    stream = sys.stderr if stream is None else stream
    terminal = bool(getattr(stream, "isatty", lambda: False)())
    p = Progress(total, description, unit, stream=stream, interval=interval, terminal=terminal, enabled=enabled())
    try:
        yield p
    finally:
        p.close()
