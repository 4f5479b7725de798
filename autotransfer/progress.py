"""Progress of one long step (decoding, the activation pass, a trial's steps, a refit): counts and time left.

On a terminal it is a tqdm bar that disappears when the step ends; in a log (stderr not a terminal) it is one
plain line every `interval` seconds, so a CI log or `nohup` output shows work, not a hang, and is not flooded
with carriage returns. A step without a count (an ONNX export) is a `phase`: a line when it starts, and one
with its duration when it ends, if it was long.

`AUTOTRANSFER_PROGRESS=0` silences it (tests, library use); `AUTOTRANSFER_PROGRESS=lines` writes lines even
on a terminal (worker processes sharing one, whose bars would overwrite each other);
`AUTOTRANSFER_PROGRESS_INTERVAL=S` sets the seconds between two lines.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TextIO

LOG_INTERVAL = 10.0  # seconds between two lines when stderr is not a terminal
LONG_PHASE = 5.0  # a phase that took this many seconds or more ends with a line giving its duration


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


def _mode() -> str:
    return os.environ.get("AUTOTRANSFER_PROGRESS", "1").strip().lower()


def enabled() -> bool:
    return _mode() != "0"


def _interval() -> float:
    """`AUTOTRANSFER_PROGRESS_INTERVAL` when it is a number >= 0, else LOG_INTERVAL."""
    try:
        return max(0.0, float(os.environ["AUTOTRANSFER_PROGRESS_INTERVAL"]))
    except (KeyError, ValueError):
        return LOG_INTERVAL


def _is_terminal(stream: TextIO) -> bool:
    return _mode() != "lines" and bool(getattr(stream, "isatty", lambda: False)())


@contextmanager
def progress(total: int, description: str, unit: str = "it", *, stream: TextIO | None = None,
             interval: float | None = None) -> Iterator[Progress]:
    """A `Progress` for one step, closed when the block ends (its bar removed, even on an exception).

    `interval` (seconds between two lines in a log) defaults to `AUTOTRANSFER_PROGRESS_INTERVAL` or LOG_INTERVAL.
    """
    stream = sys.stderr if stream is None else stream
    interval = _interval() if interval is None else interval
    p = Progress(total, description, unit, stream=stream, interval=interval, terminal=_is_terminal(stream),
                 enabled=enabled())
    try:
        yield p
    finally:
        p.close()


@contextmanager
def phase(description: str, *, stream: TextIO | None = None, long: float = LONG_PHASE) -> Iterator[None]:
    """A step without a count: `<description> ...` when it starts, `<description>: done in T` when it ends
    after `long` seconds or more, so a log shows what runs now and what took the time."""
    stream = sys.stderr if stream is None else stream
    on = enabled()
    if on:
        stream.write(f"{description} ...\n")
        stream.flush()
    start = time.monotonic()
    yield
    elapsed = time.monotonic() - start
    if on and elapsed >= long:
        stream.write(f"{description}: done in {_format_seconds(elapsed)}\n")
        stream.flush()
