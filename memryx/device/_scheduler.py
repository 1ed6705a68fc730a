"""How the device server shares the one chip among its clients' models.

One (client, model) pair -- a *slot* -- holds the chip at a time and sends it up
to ``frame_limit`` frames or for up to ``time_limit_ms``, whichever comes first;
then, if another slot waits, its frames drain and the next waiting slot gets
the chip, first come first served (so slots with work take turns round-robin).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from dataclasses import dataclass
from typing import Any

from . import _metrics

__all__ = ["ChipScheduler", "SchedulerOptions"]


@dataclass(frozen=True)
class SchedulerOptions:
    """How the server shares the chip (defaults as the vendor's manager daemon).

    frame_limit: frames a model may send per turn on the chip.
    time_limit_ms: how long a turn may last.
    ifmap_queue: frames of one model a client may have in flight (its capacity).
    ofmap_queue: outputs (and queued inputs) the chip buffers per model for a slow client.
    """

    frame_limit: int = 20
    time_limit_ms: float = 250.0
    ifmap_queue: int = 16
    ofmap_queue: int = 21

    def __post_init__(self) -> None:
        for name in ("frame_limit", "ifmap_queue", "ofmap_queue"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not self.time_limit_ms > 0:
            raise ValueError(f"time_limit_ms must be > 0, got {self.time_limit_ms!r}")


class ChipScheduler:
    """Hands the one chip to one slot at a time, first come first served.

    A slot that still has frames after its turn queues again at the back, so
    slots with work take turns round-robin.
    """

    def __init__(self, options: SchedulerOptions) -> None:
        self.options = options
        self._holder: Any = None
        self._waiting: deque[tuple[Any, asyncio.Future[None]]] = deque()
        self.turns = 0
        self.swaps = 0
        self._last: Any = None

    async def acquire(self, slot: Any) -> None:
        if self._holder is None and not self._waiting:
            self._grant(slot)
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting.append((slot, fut))
        try:
            await fut
        except BaseException:
            if fut.done() and not fut.cancelled() and self._holder is slot:
                self.release(slot)  # granted while being cancelled: pass it on
            else:
                with contextlib.suppress(ValueError):
                    self._waiting.remove((slot, fut))
            raise

    def _grant(self, slot: Any) -> None:
        self._holder = slot
        self.turns += 1
        if self._last is not None and self._last is not slot:
            self.swaps += 1
            _metrics.recorder().scheduler_switch()
        self._last = slot

    def release(self, slot: Any) -> None:
        if self._holder is not slot:
            return
        self._holder = None
        while self._waiting:
            nxt, fut = self._waiting.popleft()
            if not fut.done():
                self._grant(nxt)
                fut.set_result(None)
                return

    def contended(self) -> bool:
        """Whether another slot waits for the chip."""
        return bool(self._waiting)

    def drop(self, slot: Any) -> None:
        """Forget a slot whose client is gone."""
        self._waiting = deque((s, f) for s, f in self._waiting if s is not slot)
        self.release(slot)
