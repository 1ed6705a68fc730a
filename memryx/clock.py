"""Clocks: the real one, and a virtual one for tests of long runs that finish in seconds.

The simulated device (its timing model and its release timers), the ``fps_target``
pacer and ``smoothing`` of the SDK options, the fault injector (stalls, jitter,
throttling) and the pytest plugin's synthetic camera read time and wait through a
:class:`Clock`. By default that is :data:`REAL_CLOCK` (``time.monotonic`` and the
event loop's timers). A :class:`VirtualClock` passed to the device instead
(``SimulatedDevice(mode="timed", clock=VirtualClock())``) makes all of them run in
virtual time, and so do the accelerator's timestamps and ``statistics()``
(``elapsed_s``, ``fps``, latencies) and its trace::

    clock = VirtualClock()
    device = SimulatedDevice(mode="timed", clock=clock)
    async with mx.AsyncAccl(dfp, device=device) as accl:
        ...   # 10 minutes of a 30 fps camera: 18,000 frames, in seconds of wall time

Virtual time stands still while anything runs and jumps, like a discrete-event
simulation, to the next thing waiting on the clock when nothing else can happen
first: when the event loop has no callback ready to run (checked directly on
asyncio's loop, by letting ``SETTLE_ROUNDS`` rounds of it run on other loops) and
no work the clock was told about (:meth:`VirtualClock.hold`) is in progress. The
simulated device computes its frames on the loop thread under a virtual clock, so
the same script gives the same timestamps and statistics on every run.

What is *not* virtual: whatever does not wait through the clock — a ``time.sleep``
or ``asyncio.sleep`` of the application, real sockets, a device server. Virtual
time does not move while such code runs (a ``time.sleep(1)`` in a callback costs a
second of wall time and no virtual time), and it may jump ahead while the loop waits
for it (an ``asyncio.sleep`` of the app is not a virtual wait). Plain (non-async)
input callbacks paced with ``fps_target`` wait in virtual time too, but they hand
their frames over from a thread, so their frames' arrival times are as
deterministic as the thread hand-over is; drive the accelerator from the loop
(``async`` callbacks, ``arun``, ``async for`` over a camera) for timestamps that are
identical run after run.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol

from ._core.threads import call_soon
from ._exceptions import UsageError

__all__ = ["REAL_CLOCK", "Clock", "RealClock", "Timer", "VirtualClock", "clock_of"]


class Timer(Protocol):
    """What :meth:`Clock.call_later` returns: a scheduled call that can be cancelled."""

    def cancel(self) -> None: ...


class Clock:
    """Reads time and waits; :class:`RealClock` and :class:`VirtualClock` are the two kinds."""

    #: Whether time is virtual (jumps instead of passing).
    virtual = False

    def now(self) -> float:
        """The time, in seconds (only differences mean something)."""
        raise NotImplementedError

    def call_later(self, delay: float, callback: Callable[..., Any], *args: Any) -> Timer:
        """Call ``callback(*args)`` on the running loop ``delay`` seconds from now."""
        raise NotImplementedError

    async def sleep(self, delay: float) -> None:
        """Wait ``delay`` seconds (on the loop)."""
        raise NotImplementedError

    def wait(self, delay: float, stop: threading.Event) -> bool:
        """On a thread other than the loop's: wait ``delay`` seconds, or until ``stop`` is
        set; whether ``stop`` was set."""
        raise NotImplementedError

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        """Attach to the loop the clock's waits run on (nothing to do for the real clock)."""

    def hold(self) -> None:
        """Work that will wait on the clock later is in progress: time must not jump."""

    def release(self) -> None:
        """The work announced by :meth:`hold` has reached the clock (or ended)."""


class RealClock(Clock):
    """``time.monotonic`` and the event loop's own timers."""

    #: ``time.monotonic`` itself: the hot paths that read it pay no extra call.
    now = staticmethod(time.monotonic)

    def call_later(self, delay: float, callback: Callable[..., Any], *args: Any) -> Timer:
        return asyncio.get_running_loop().call_later(delay, callback, *args)

    async def sleep(self, delay: float) -> None:
        await asyncio.sleep(delay)

    def wait(self, delay: float, stop: threading.Event) -> bool:
        return stop.wait(delay)

    def __repr__(self) -> str:
        return "REAL_CLOCK"


#: The clock of everything that is not given another one.
REAL_CLOCK = RealClock()


def clock_of(device: Any) -> Clock:
    """The clock a device keeps time by (``device.clock``), else the real one."""
    clock = getattr(device, "clock", None)
    return clock if isinstance(clock, Clock) else REAL_CLOCK


class ScheduledCall:
    """``callback(*args)`` due at ``when`` on some clock, until cancelled: the timer of
    :class:`VirtualClock` and of the simulated device's precise release thread."""

    __slots__ = ("args", "callback", "cancelled", "when")

    def __init__(self, when: float, callback: Callable[..., Any], args: tuple[Any, ...]) -> None:
        self.when = when
        self.callback = callback
        self.args = args
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True

    def fire(self) -> None:
        if not self.cancelled:
            self.callback(*self.args)



class VirtualClock(Clock):
    """Virtual time for tests: it jumps to the next timer whenever nothing else can run
    (module docstring). One clock serves one event loop (it binds to the first loop it
    is used on); any number of devices and cameras on that loop may share it.

    Parameters:
        start: the time it starts at (seconds; default 0.0).
    """

    virtual = True
    #: Loop rounds with nothing new that make the loop count as idle where the clock
    #: cannot see the loop's ready queue (uvloop).
    SETTLE_ROUNDS = 24

    def __init__(self, start: float = 0.0) -> None:
        if isinstance(start, bool) or not isinstance(start, (int, float)) or \
                not -_FLOAT_MAX <= start <= _FLOAT_MAX:
            raise ValueError(f"start must be a finite number of seconds, got {start!r:.60}")
        self._now = float(start)
        self._heap: list[tuple[float, int, ScheduledCall]] = []
        self._seq = itertools.count()
        self._lock = threading.Lock()
        self._holds = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: int | None = None
        self._settling = False
        self.jumps = 0
        """How many times virtual time jumped forward."""

    def __repr__(self) -> str:
        return f"VirtualClock(now={self._now!r}, timers={len(self._heap)})"

    # -- reading ---------------------------------------------------------------------------
    def now(self) -> float:
        return self._now

    # -- binding ---------------------------------------------------------------------------
    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._loop is loop:
            return
        if self._loop is not None and not self._loop.is_closed():
            raise UsageError(
                "this VirtualClock is already used by another event loop: a virtual clock "
                "serves one loop (make one clock per test)")
        self._loop = loop
        self._thread = threading.get_ident()
        self._settling = False

    def _running(self) -> asyncio.AbstractEventLoop:
        loop = asyncio.get_running_loop()
        self.bind(loop)
        return loop

    # -- waiting ---------------------------------------------------------------------------
    def call_later(self, delay: float, callback: Callable[..., Any], *args: Any) -> Timer:
        self._running()
        delay = _delay(delay)
        if delay == _INF:
            return ScheduledCall(_INF, callback, args)  # never due: never scheduled
        return self._push(max(0.0, delay), callback, args)

    async def sleep(self, delay: float) -> None:
        loop = self._running()
        delay = _delay(delay)
        if delay <= 0:
            await asyncio.sleep(0)
            return
        fut: asyncio.Future[None] = loop.create_future()
        if delay == _INF:  # for ever (until cancelled), without moving time to infinity
            await fut
            return
        timer = self._push(delay, _wake, (fut,))
        try:
            await fut
        finally:
            timer.cancel()

    def wait(self, delay: float, stop: threading.Event) -> bool:
        if self._loop is None or self._loop.is_closed():
            raise UsageError("a VirtualClock was waited on from a thread before an event loop "
                             "used it: open the device it drives first")
        if threading.get_ident() == self._thread:
            raise UsageError("VirtualClock.wait() called on its event loop's thread, which it "
                             "would block for ever: on the loop, await clock.sleep()")
        if stop.is_set():
            return True
        delay = _delay(delay)
        if delay <= 0:
            return False
        done = threading.Event()
        timer = (ScheduledCall(_INF, done.set, ()) if delay == _INF
                 else self._push(delay, done.set, ()))
        try:
            while not done.wait(0.05):
                if stop.is_set() or self._loop.is_closed():
                    return stop.is_set()
            return False
        finally:
            timer.cancel()

    def _push(self, delay: float, callback: Callable[..., Any], args: tuple[Any, ...]
              ) -> ScheduledCall:
        with self._lock:
            timer = ScheduledCall(self._now + delay, callback, args)
            heapq.heappush(self._heap, (timer.when, next(self._seq), timer))
        self._kick()
        return timer

    # -- work in progress --------------------------------------------------------------------
    def hold(self) -> None:
        with self._lock:
            self._holds += 1

    def release(self) -> None:
        with self._lock:
            if self._holds <= 0:
                raise UsageError("VirtualClock.release() without a hold()")
            self._holds -= 1
            last = not self._holds
        if last:
            self._kick()

    # -- advancing ---------------------------------------------------------------------------
    def _kick(self) -> None:
        """Start settling towards the next jump, from any thread."""
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        if threading.get_ident() != self._thread:
            with contextlib.suppress(RuntimeError):  # a closed loop: nothing left to advance
                call_soon(loop, self._kick)
            return
        if not self._settling:
            self._settling = True
            loop.call_soon(self._settle, 0)

    def _settle(self, rounds: int) -> None:
        loop = self._loop
        if loop is None or loop.is_closed():
            self._settling = False
            return
        with self._lock:
            while self._heap and self._heap[0][2].cancelled:
                heapq.heappop(self._heap)
            if self._holds or not self._heap:
                self._settling = False  # a release() or a new timer kicks again
                return
        ready = getattr(loop, "_ready", None)  # asyncio's queue of callbacks to run
        if ready is not None:
            if any(not _is_settle(h) for h in ready):  # (other clocks' settling: not work)
                loop.call_soon(self._settle, 0)
                return
        elif not rounds:  # let the loop run SETTLE_ROUNDS rounds, then look again
            loop.call_soon(_spin, loop, self.SETTLE_ROUNDS, self._settle)
            return
        self._settling = False
        self._jump()

    def _jump(self) -> None:
        """Move to the earliest timer and fire every timer due then, in the order set."""
        due: list[ScheduledCall] = []
        with self._lock:
            while self._heap and self._heap[0][2].cancelled:
                heapq.heappop(self._heap)
            if not self._heap:
                return
            when = self._heap[0][0]
            if when > self._now:
                self._now = when
                self.jumps += 1
            while self._heap and self._heap[0][0] <= self._now:
                timer = heapq.heappop(self._heap)[2]
                if not timer.cancelled:
                    due.append(timer)
        try:
            for timer in due:
                if not timer.cancelled:
                    timer.cancelled = True  # fired: a later cancel() is a no-op
                    try:
                        timer.callback(*timer.args)
                    except Exception as exc:  # like the loop's own timers: report, go on
                        loop = self._loop
                        if loop is None or loop.is_closed():
                            raise
                        loop.call_exception_handler({
                            "message": f"Exception in VirtualClock timer {timer.callback!r}",
                            "exception": exc})
        finally:
            self._kick()  # a timer that raised must not stop time for everything else

    def advance(self, seconds: float) -> None:
        """Move virtual time forward by ``seconds`` now, firing the timers due on the way
        (for tests that step time by hand; call it on the loop's thread)."""
        if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or \
                not 0 <= seconds <= _FLOAT_MAX:
            raise ValueError(f"seconds must be a finite number >= 0, got {seconds!r:.60}")
        loop = self._loop
        if loop is not None and not loop.is_closed() and threading.get_ident() != self._thread:
            raise UsageError("VirtualClock.advance() called from a thread other than its event "
                             "loop's: the timers it fires resolve the loop's futures, which "
                             "only the loop's thread may do (loop.call_soon_threadsafe("
                             "clock.advance, seconds) runs it there)")
        target = self._now + seconds
        while True:
            with self._lock:
                while self._heap and self._heap[0][2].cancelled:
                    heapq.heappop(self._heap)
                nxt = self._heap[0][0] if self._heap else None
            if nxt is None or nxt > target:
                break
            self._jump()
        self._now = max(self._now, target)


_INF = float("inf")
_FLOAT_MAX = 1.7976931348623157e308


def _delay(delay: Any) -> float:
    """``delay`` checked: a number of seconds, not NaN (which would never come due and
    keep the clock jumping in place for ever)."""
    if isinstance(delay, bool) or not isinstance(delay, (int, float)) or delay != delay:
        raise ValueError(f"delay must be a number of seconds, got {delay!r:.60}")
    return _INF if delay > _FLOAT_MAX else float(delay)  # (an int beyond a float's range)


def _spin(loop: asyncio.AbstractEventLoop, rounds: int, then: Callable[[int], None]) -> None:
    """A round of the loop that does nothing; ``then(1)`` after ``rounds`` of them."""
    if rounds > 1:
        loop.call_soon(_spin, loop, rounds - 1, then)
    else:
        then(1)


def _is_settle(handle: Any) -> bool:
    return getattr(getattr(handle, "_callback", None), "__func__", None) is VirtualClock._settle


def _wake(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)
