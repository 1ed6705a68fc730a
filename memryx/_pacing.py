"""``ClientOptions`` in the facade: ``fps_target`` pacing of input callbacks and
``smoothing`` of output delivery, plus the per-stream output router of
``connect_streams``. Each wraps a user callback in one of the same kind (plain,
generator, ``async def``, async generator), so the engine treats it as the user's.
"""

from __future__ import annotations

import functools
import inspect
import threading
from collections import deque
from collections.abc import Callable
from typing import Any

from ._core.callbacks import CallbackKind, classify
from .clock import REAL_CLOCK, Clock

__all__ = ["Pacer", "Smoother", "delivering", "paced", "stream_router"]


class Pacer:
    """Calls at most ``fps`` times a second, evenly (a missed slot is not made up twice)."""

    def __init__(self, fps: float, stop: threading.Event, clock: Clock = REAL_CLOCK) -> None:
        self.clock = clock
        self.interval = 1.0 / fps
        self.next = 0.0
        self.stop = stop
        self.lock = threading.Lock()

    def delay(self) -> float:
        with self.lock:
            now = self.clock.now()
            at = max(now, self.next)
            self.next = at + self.interval
            return at - now


class Smoother:
    """Spreads outputs that arrive in bursts evenly over time.

    The spacing is 0.95 times the average interval between the last ``WINDOW``
    scheduled deliveries. While outputs queue up behind the smoother it
    delivers a bit faster than it did, so the average converges to the rate
    the device produces at; a delivery is never held more than four intervals,
    and a late wake-up does not shift the schedule.
    """

    WINDOW = 32
    SPEEDUP = 0.95

    def __init__(self, stop: threading.Event, clock: Clock = REAL_CLOCK) -> None:
        self.clock = clock
        self.times: deque[float] = deque(maxlen=self.WINDOW)
        self.next = 0.0
        self.stop = stop
        self.lock = threading.Lock()

    def delay(self) -> float:
        with self.lock:
            now = self.clock.now()
            self.times.append(now)
            if len(self.times) < 2:
                self.next = now
                return 0.0
            spacing = self.SPEEDUP * (self.times[-1] - self.times[0]) / (len(self.times) - 1)
            # Nothing queued behind us for a while: restart the schedule. Else keep it,
            # even when the last wake-up was late (a loaded host oversleeps), so lateness
            # does not pile up into a slower rate.
            at = now if now - self.next > 2 * spacing else min(self.next, now + 4 * spacing)
            self.next = at + spacing
            self.times[-1] = at  # the scheduled time is what the window averages
            return max(0.0, at - now)


def paced(fn: Callable[..., Any], gate: Pacer | None,
           convert: Callable[[Any], Any] | None = None) -> Callable[..., Any]:
    """Input callback ``fn`` wrapped to wait ``gate.delay()`` before each frame it
    produces, and to pass each frame through ``convert``."""
    kind = classify(fn)
    conv = convert or (lambda x: x)
    if kind is CallbackKind.SYNC:
        @functools.wraps(fn)
        def sync(*args: Any) -> Any:
            if gate is not None:
                d = gate.delay()
                if d > 0 and gate.clock.wait(d, gate.stop):
                    return None
            return conv(fn(*args))
        return sync
    if kind is CallbackKind.ASYNC:
        @functools.wraps(fn)
        async def coro(*args: Any) -> Any:
            if gate is not None:
                d = gate.delay()
                if d > 0:
                    await gate.clock.sleep(d)
            return conv(await fn(*args))
        return coro
    if kind is CallbackKind.GENERATOR:
        @functools.wraps(fn)
        def gen(*args: Any) -> Any:
            for item in fn(*args):
                if gate is not None:
                    d = gate.delay()
                    if d > 0 and gate.clock.wait(d, gate.stop):
                        return
                yield conv(item)
        return gen

    @functools.wraps(fn)
    async def agen(*args: Any) -> Any:
        async for item in fn(*args):
            if gate is not None:
                d = gate.delay()
                if d > 0:
                    await gate.clock.sleep(d)
            yield conv(item)
    return agen


def delivering(fn: Callable[..., Any], gate: Smoother | None,
                convert: Callable[[tuple[Any, ...]], tuple[Any, ...]] | None
                ) -> Callable[..., Any]:
    """An output callback wrapped to smooth its calls and convert its arguments."""
    conv = convert or (lambda args: args)
    if classify(fn) is CallbackKind.ASYNC:
        async def coro(*args: Any) -> Any:
            if gate is not None:
                d = gate.delay()
                if d > 0:
                    await gate.clock.sleep(d)
            return await fn(*conv(args))
        return coro

    def sync(*args: Any) -> Any:
        if gate is not None:
            d = gate.delay()
            if d > 0 and gate.clock.wait(d, gate.stop):
                return None
        return fn(*conv(args))
    return sync




def stream_router(groups: list[tuple[int, int, Callable[..., Any]]], first: Callable[..., Any]
                  ) -> Callable[..., Any]:
    """One output callback for a model's streams that hands each stream's outputs to the
    callback its ``connect_streams`` call gave (``groups``: first stream, count, callback;
    appended to as streams are added)."""

    def pick(stream: int) -> Callable[..., Any]:
        for start, count, fn in groups:
            if start <= stream < start + count:
                return fn
        return first  # pragma: no cover - every stream belongs to a group

    if classify(first) is CallbackKind.ASYNC:
        async def aroute(stream: int, *outputs: Any) -> Any:
            fn = pick(stream)
            result = fn(stream, *outputs)
            if inspect.isawaitable(result):
                return await result
            return result
        return aroute

    def route(stream: int, *outputs: Any) -> Any:
        return pick(stream)(stream, *outputs)
    return route
