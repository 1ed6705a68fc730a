"""Helpers of the memryx.ray tests."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np


def numbered(n: int, width: int = 4) -> list[np.ndarray]:
    """Frames for the identity model whose values say their position."""
    return [np.full((1, width), i, np.float32) for i in range(n)]


def positions(outputs: list[Any]) -> list[int]:
    """The positions carried by the outputs of ``numbered`` frames."""
    return [int(np.asarray(o).ravel()[0]) for o in outputs]


def paced(frames: list[Any], at: dict[int, Callable[[], None]]) -> Iterator[Any]:
    """Yield ``frames``, calling ``at[i]`` just before frame ``i`` is taken."""
    for i, frame in enumerate(frames):
        if i in at:
            at[i]()
        yield frame


def kill_pid(pid: int) -> None:
    os.kill(pid, signal.SIGKILL)


def wait_for(check: Callable[[], bool], seconds: float = 20.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.05)
    return check()


class Later(threading.Thread):
    """Run ``fn`` on a thread after ``delay`` seconds (joined by the test)."""

    def __init__(self, delay: float, fn: Callable[[], None]) -> None:
        super().__init__(daemon=True, name="test-later")
        self._delay, self._fn = delay, fn

    def run(self) -> None:
        time.sleep(self._delay)
        self._fn()


def wait_dead(ray: Any, actor: Any, seconds: float = 20.0) -> bool:
    """Wait until Ray reports ``actor`` dead for good (``ray.kill`` is asynchronous)."""

    def dead() -> bool:
        try:
            ray.get(actor.ready.remote(), timeout=seconds)
        except ray.exceptions.ActorDiedError:
            return True
        except ray.exceptions.RayError:
            return False
        return False

    return wait_for(dead, seconds)
