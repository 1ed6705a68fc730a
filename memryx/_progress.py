"""Progress display of the ``memryx`` command (the library never draws anything).

Three modes: ``"bar"`` (stdout and stderr are a terminal: a tqdm bar on stderr,
redrawn in place), ``"plain"`` (piped: a whole line on stderr at most once a
second and at the end, so logs stay readable) and ``"off"`` (``-q``).
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Literal, TextIO

__all__ = ["LogHandler", "Progress", "progress", "progress_mode"]

Mode = Literal["bar", "plain", "off"]
_active: list[Any] = []  # the tqdm bars on screen now (at most one)
#: Seconds between two plain progress lines.
PLAIN_INTERVAL_S = 1.0


def progress_mode(*, quiet: bool, stdout: TextIO | None = None,
                  stderr: TextIO | None = None) -> Mode:
    if quiet:
        return "off"
    out, err = stdout or sys.stdout, stderr or sys.stderr
    return "bar" if _isatty(out) and _isatty(err) else "plain"


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # closed or not a real stream
        return False


class Progress:
    """Counts done out of ``total``; thread-safe (bench's callbacks run on worker threads)."""

    def __init__(self, total: int, desc: str, unit: str, mode: Mode, plain: bool,
                 stream: TextIO) -> None:
        self.total, self.desc, self.unit, self.stream = total, desc, unit, stream
        self.mode: Mode = mode if (mode != "plain" or plain) else "off"
        self.count = 0
        self._steps = 0
        self.started = time.monotonic()
        self._last = self.started
        self._lock = threading.Lock()
        self._bar: Any = None
        if self.mode == "bar":
            try:
                from tqdm import tqdm
            except ImportError:  # pragma: no cover - tqdm is a dependency
                self.mode = "plain"
            else:
                self._bar = tqdm(total=total, desc=desc, unit=unit, file=stream,
                                 dynamic_ncols=True, leave=False, mininterval=0.1)
                _active.append(self._bar)

    def step(self, what: str) -> None:
        """Start the next step of a staged task (compile), described by ``what``: the
        previous step is done."""
        with self._lock:
            self._steps += 1
            if self._bar is not None:
                self._bar.set_description_str(f"{self.desc}: {what}", refresh=False)
        self.update(self._steps - 1)

    def update(self, count: int) -> None:
        """``count`` units are done."""
        with self._lock:
            self.count = count
            if self._bar is not None:
                self._bar.update(count - self._bar.n)
            elif self.mode == "plain":
                now = time.monotonic()
                if now - self._last >= PLAIN_INTERVAL_S or count >= self.total:
                    self._last = now
                    self._line(now)

    def _line(self, now: float) -> None:
        rate = self.count / max(now - self.started, 1e-9)
        self.stream.write(f"{self.desc}: {self.count}/{self.total} {self.unit}s  "
                          f"{rate:,.0f} {self.unit}s/s\n")
        self.stream.flush()

    def close(self) -> None:
        with self._lock:
            if self._bar is not None:
                _active.remove(self._bar)
                self._bar.close()
                self._bar = None


class LogHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Log lines that do not tear a progress bar: printed above it while one is drawn."""

    def emit(self, record: logging.LogRecord) -> None:
        if not _active:
            super().emit(record)
            return
        try:
            from tqdm import tqdm

            tqdm.write(self.format(record), file=self.stream)
        except Exception:  # pragma: no cover - as logging does
            self.handleError(record)


@contextmanager
def progress(total: int, desc: str, *, unit: str = "step", mode: Mode = "plain",
             plain: bool = True, stream: TextIO | None = None) -> Iterator[Progress]:
    """A progress display for ``total`` units; ``plain=False``: nothing when piped."""
    bar = Progress(total, desc, unit, mode, plain, stream or sys.stderr)
    try:
        yield bar
    finally:
        bar.close()
