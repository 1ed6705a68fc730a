"""Helpers of the memryx.ray tests."""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from tests.conftest import settle


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
    """:func:`tests.conftest.settle` with the longer default Ray's start-up needs."""
    return settle(check, seconds)


class Later(threading.Thread):
    """Run ``fn`` on a thread once ``ready()`` returned (joined by the test)."""

    def __init__(self, ready: Callable[[], object], fn: Callable[[], None]) -> None:
        super().__init__(daemon=True, name="test-later")
        self._ready, self._fn = ready, fn

    def run(self) -> None:
        self._ready()
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
