"""How the device server shares the one chip among its clients' models.

One (client, model) pair -- a *slot* -- holds the chip at a time and sends it up
to ``frame_limit`` frames or for up to ``time_limit_ms``, whichever comes first;
then, if another slot waits, its frames drain and the next waiting slot gets
the chip, first come first served (so slots with work take turns round-robin).

Each client may ask for its own turns (the SDK's ``SchedulerOptions``, sent in
its HELLO): :func:`client_schedule` checks what it asked, caps it by the
server's own options (a turn never lasts longer than ``max_time_limit_ms``, so
no client holds the chip beyond that while another waits; the queues never
exceed the server's) and gives the :class:`ClientSchedule` its slots follow.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from . import _metrics

__all__ = ["ChipScheduler", "ClientSchedule", "SchedulerOptions", "client_schedule"]

#: The largest count a client may ask for (frame limit, queue sizes).
MAX_COUNT = 2**31 - 1
#: The longest turn a server may allow when nothing else says (ms).
DEFAULT_MAX_TIME_LIMIT_MS = 1000.0


@dataclass(frozen=True)
class SchedulerOptions:
    """How the server shares the chip (defaults as the vendor's manager daemon).

    frame_limit: frames a model may send per turn on the chip.
    time_limit_ms: how long a turn may last.
    ifmap_queue: frames of one model a client may have in flight (its capacity).
    ofmap_queue: frames of one model on the chip at once (submitted, outputs not yet
        sent back).
    stop_on_empty: end a turn as soon as the model has no frame waiting (for clients
        that do not ask otherwise).
    max_time_limit_ms: the longest turn any client may ask for (default: the larger of
        1000 ms and ``time_limit_ms``); a client's ``time_limit=0`` means this.

    The first five are what a client that asks for nothing gets; a client's own
    queue sizes are capped by them.
    """

    frame_limit: int = 20
    time_limit_ms: float = 250.0
    ifmap_queue: int = 16
    ofmap_queue: int = 21
    stop_on_empty: bool = True
    max_time_limit_ms: float | None = None

    def __post_init__(self) -> None:
        for name in ("frame_limit", "ifmap_queue", "ofmap_queue"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not \
                    1 <= value <= MAX_COUNT:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not self.time_limit_ms > 0 or not math.isfinite(self.time_limit_ms):
            raise ValueError(f"time_limit_ms must be > 0, got {self.time_limit_ms!r}")
        if not isinstance(self.stop_on_empty, bool):
            raise ValueError(f"stop_on_empty must be a bool, got {self.stop_on_empty!r}")
        cap = self.max_time_limit_ms
        if cap is not None and (not cap > 0 or not math.isfinite(cap)
                                or cap < self.time_limit_ms):
            raise ValueError(f"max_time_limit_ms must be a number of ms >= time_limit_ms "
                             f"({self.time_limit_ms:g}), got {cap!r}")

    @property
    def turn_cap_ms(self) -> float:
        """The longest turn a client may have (ms)."""
        if self.max_time_limit_ms is not None:
            return float(self.max_time_limit_ms)
        return max(DEFAULT_MAX_TIME_LIMIT_MS, float(self.time_limit_ms))


@dataclass(frozen=True)
class ClientSchedule:
    """The turns of one client's models, as the server applies them."""

    frame_limit: int
    time_limit_ms: float
    stop_on_empty: bool
    ifmap_queue: int
    ofmap_queue: int

    def wire(self) -> dict[str, Any]:
        """As WELCOME reports it (the SDK's names; ``time_limit`` in ms)."""
        return {"frame_limit": self.frame_limit, "time_limit": self.time_limit_ms,
                "stop_on_empty": self.stop_on_empty, "ifmap_queue_size": self.ifmap_queue,
                "ofmap_queue_size": self.ofmap_queue}


def _count(asked: Mapping[str, Any], name: str, default: int) -> int:
    value = asked.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_COUNT:
        raise ValueError(f"scheduler option {name} must be an integer in [1, {MAX_COUNT}], "
                         f"got {value!r:.40}")
    return value


def client_schedule(server: SchedulerOptions, asked: Mapping[str, Any] | None
                    ) -> ClientSchedule:
    """What a client asked for in its HELLO (None: nothing), checked and capped.

    Raises ValueError naming the first option the server cannot take. Fields the
    server does not know are ignored (a newer client), so the reply tells the
    client what applies.
    """
    asked = asked or {}
    frame_limit = _count(asked, "frame_limit", server.frame_limit)
    time_limit = asked.get("time_limit", server.time_limit_ms)
    if isinstance(time_limit, bool) or not isinstance(time_limit, (int, float)) or not (
            0 <= time_limit < math.inf):
        raise ValueError(f"scheduler option time_limit must be a number of milliseconds "
                         f">= 0, got {time_limit!r:.40}")
    stop_on_empty = asked.get("stop_on_empty", server.stop_on_empty)
    if not isinstance(stop_on_empty, bool):
        raise ValueError(f"scheduler option stop_on_empty must be true or false, got "
                         f"{stop_on_empty!r:.40}")
    ifmap = _count(asked, "ifmap_queue_size", server.ifmap_queue)
    ofmap = _count(asked, "ofmap_queue_size", server.ofmap_queue)
    cap = server.turn_cap_ms
    # (compared before any float(): an int beyond a float's range is capped, not an
    # OverflowError that would drop the connection without a word)
    turn = cap if time_limit == 0 or time_limit >= cap else float(time_limit)
    return ClientSchedule(frame_limit, turn, stop_on_empty, min(ifmap, server.ifmap_queue),
                          min(ofmap, server.ofmap_queue))


class ChipScheduler:
    """Hands the one chip to one slot at a time, first come first served.

    A slot that still has frames after its turn queues again at the back, so
    slots with work take turns round-robin.
    """

    def __init__(self, options: SchedulerOptions) -> None:
        self.options = options
        self._holder: Any = None
        self._waiting: deque[tuple[Any, asyncio.Future[None]]] = deque()
        self._slots: list[Any] = []
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

    def contended(self, holder: Any = None) -> bool:
        """Whether another slot waits for the chip, or (given the ``holder``) has frames
        queued: its task may not have asked for the chip yet, because a turn hands its
        frames to the chip without pausing."""
        if self._waiting:
            return True
        return holder is not None and any(
            s is not holder and s.queued() for s in self._slots)

    def register(self, slot: Any) -> None:
        """A slot that may ask for the chip (it has ``queued() -> bool``)."""
        self._slots.append(slot)

    def drop(self, slot: Any) -> None:
        """Forget a slot whose client is gone."""
        self._waiting = deque((s, f) for s, f in self._waiting if s is not slot)
        with contextlib.suppress(ValueError):
            self._slots.remove(slot)
        self.release(slot)
