"""Checks shared by the reliability suite: "the process is still usable", resource
baselines (threads, fds, RSS) and the engine's close-time log line."""

from __future__ import annotations

import contextlib
import logging
import re
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

import memryx as mx
from tests.conftest import fds as fds
from tests.conftest import settle as settle

#: A frame with values an identity model must give back bit for bit.
PROBE = np.array([[1.5, -2.0, 3.25, 1e6]], np.float32)


def assert_usable(dfp: mx.Dfp, device: str | None = "sim") -> None:
    """A *new* accelerator in this process runs frames correctly (one, then a batch)."""
    with mx.SyncAccl(dfp, device=device) as accl:
        np.testing.assert_array_equal(accl.run(PROBE), PROBE)
        batch = accl.run([PROBE + i for i in range(3)])
        for i, out in enumerate(batch):
            np.testing.assert_array_equal(out, PROBE + i)


async def assert_usable_async(dfp: mx.Dfp, device: str | None = "sim") -> None:
    """The same from a coroutine: a new accelerator bound to the running loop."""
    async with mx.SyncAccl(dfp, device=device) as accl:
        np.testing.assert_array_equal(await accl.arun(PROBE), PROBE)
        batch = await accl.arun([PROBE + i for i in range(3)])
        for i, out in enumerate(batch):
            np.testing.assert_array_equal(out, PROBE + i)



def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS in /proc/self/status")  # pragma: no cover




@dataclass
class Baseline:
    """Threads, fds and RSS now, to compare with after a run."""

    threads: set[threading.Thread] = field(default_factory=lambda: set(threading.enumerate()))
    fds: set[int] = field(default_factory=fds)
    rss: float = field(default_factory=rss_mb)

    def new_threads(self) -> list[str]:
        return [t.name for t in threading.enumerate() if t not in self.threads and t.is_alive()]

    def assert_back(self, rss_growth_mb: float = 50.0) -> float:
        """Threads and fds back to the baseline; RSS grew less than the bound. Returns growth."""
        assert settle(lambda: not self.new_threads()), f"threads left: {self.new_threads()}"
        assert settle(lambda: not (fds() - self.fds)), f"fds left open: {fds() - self.fds}"
        growth = rss_mb() - self.rss
        assert growth < rss_growth_mb, f"RSS grew by {growth:.1f} MB"
        return growth


class CloseLog(logging.Handler):
    """Collects what the engine logs on ``memryx.core`` (thread-safe)."""

    PATTERN = re.compile(r"closed with (\d+) frame\(s\) in flight|dropped (\d+) frame\(s\) "
                         r"input callbacks of model \d+ returned after the close")

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []
        self._lock2 = threading.Lock()

    def emit(self, record: logging.LogRecord) -> None:
        with self._lock2:
            self.messages.append(record.getMessage())

    def dropped(self) -> list[int]:
        """The count of every "closed with N frame(s) in flight" line so far, and of every
        line for frames input callbacks returned after that close."""
        with self._lock2:
            return [int(m.group(1) or m.group(2)) for msg in self.messages
                    if (m := self.PATTERN.search(msg))]

    def clear(self) -> None:
        with self._lock2:
            self.messages.clear()


@contextlib.contextmanager
def close_log() -> Iterator[CloseLog]:
    logger = logging.getLogger("memryx.core")
    handler = CloseLog()
    old = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old)


class Counter:
    """A thread-safe counter with a per-key breakdown."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.by_key: dict[Any, int] = {}

    def add(self, key: Any = None, n: int = 1) -> None:
        with self._lock:
            self.by_key[key] = self.by_key.get(key, 0) + n

    @property
    def total(self) -> int:
        with self._lock:
            return sum(self.by_key.values())

    def get(self, key: Any) -> int:
        with self._lock:
            return self.by_key.get(key, 0)
