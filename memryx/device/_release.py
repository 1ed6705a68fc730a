"""When the simulated device's outputs leave: the chip's schedule and the release heap.

* :class:`Pacer` gives each frame its entry and release times under the timing model
  (pure: times in, times out).
* :class:`Releases` keeps one model's outputs that are ready before they are due, in a
  heap by release time, and wakes once for the earliest: every job due by then goes out
  in that one wake-up, in release order.
* :class:`PreciseWaker` is what wakes it on the real clock: a thread of the device's own
  that sleeps until a release and hands it to the loop. An event loop's own timers wake
  in whole milliseconds (asyncio's epoll rounds its timeout up to the next millisecond,
  libuv keeps time in milliseconds), so a release aimed with them lands up to a
  millisecond off; a thread's timed wait is precise to tens of microseconds. Under a
  :class:`~memryx.clock.VirtualClock` the clock's own timers are exact and free, and are
  used instead.

This module knows nothing of frames, modes or futures: a job is whatever the device
pushes, handed back to its ``resolve`` when due.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .._core.threads import call_soon, start_thread
from ..clock import Clock, ScheduledCall, Timer

__all__ = ["EARLY_WAKE_S", "LOOP_TIMER_SLACK_S", "RELEASE_TICK_S", "Pacer", "PreciseWaker",
           "Releases", "paced_batch"]

#: The shortest time between two release wake-ups of a model on the real clock (frames
#: due meanwhile are released together, at most this late).
RELEASE_TICK_S = 0.0003
#: How much earlier than aimed a wake-up may come and still release what it was aimed
#: at (the wake-ups are aimed early by what they are learnt to oversleep, see Releases).
EARLY_WAKE_S = 0.0001
#: How much earlier than its time a job may leave on the loop's own timers (a model
#: faster than a frame a tick, released in batches). Those timers keep whole
#: milliseconds: uvloop rounds a shorter delay to none, so waiting again for the rest of
#: it would spin the loop (one iteration after another until the job is due, measured at
#: about two loop wake-ups per frame at 18,000 fps: most of the loop thread's CPU); a
#: wake-up releases what is due within half of that millisecond instead.
LOOP_TIMER_SLACK_S = 0.0005
#: The most a wake-up is aimed early (a host so loaded that it oversleeps more is late).
MAX_LEAD_S = 0.002
#: How much one wake-up moves the learnt lead (towards the median of the lateness).
LEAD_STEP_S = 0.000005
#: How often the waker's thread looks whether its loop has ended without telling it.
WAKER_POLL_S = 0.25


def paced_batch(interval: float, queue_depth: int) -> int:
    """The most frames the core hands a paced model of a mode that computes little in one
    ``submit``: those whose releases
    fit in one ``RELEASE_TICK_S`` (a batch is released with its last frame, so its first
    is at most a tick late, as frames due within a tick of one wake-up are anyway), at
    most ``queue_depth``. One frame per ``submit`` for a model slower than a frame a tick:
    each frame is released at its own time."""
    return max(1, min(queue_depth, int(RELEASE_TICK_S / interval + 1e-9) + 1))


@dataclass
class Pacer:
    """Release times of one model's outputs under the timing model.

    The chip takes a frame every ``interval`` seconds while it has one: its *slots* are
    spaced by the interval. A frame that arrives after its slot (a host stall between the
    source and the device) enters when it arrives, but the slots that follow keep the
    schedule, so frames waiting behind it enter as soon as they are there until the
    schedule is met again: the stall does not cost throughput. This holds for frames up to
    ``slack`` seconds behind the schedule (the device's input queue: frames a chip would
    have had waiting); a frame later than that restarts the schedule at its arrival (the
    source is slower than the chip, or paused). So the k-th frame after a restart never
    enters before ``restart + k * interval``: the pacer never delivers more frames than
    the chip could have since the schedule started, and it catches up on at most
    ``slack / interval + 1`` frames at once.
    """

    interval: float
    latency: float
    slack: float = 0.0
    slot: float = -1e18
    """The schedule: when the last frame was due to enter."""
    last_entry: float = -1e18
    last_release: float = -1e18
    caught_up: int = 0
    """Frames that entered less than an interval after the one before (catching up)."""

    def admit(self, now: float) -> tuple[float, float]:
        """The frame arriving ``now`` enters the pipeline: its (entry, release) times."""
        slot = self.slot + self.interval
        if now > slot + self.slack:  # too far behind the schedule: restart it
            slot = now
        self.slot = slot
        entry = max(now, slot)
        if entry < self.last_entry + self.interval:
            self.caught_up += 1
        self.last_entry = entry
        self.last_release = max(entry + self.latency, self.last_release)
        return entry, self.last_release

    def admit_many(self, now: float, n: int) -> list[tuple[float, float]]:
        """``admit(now)`` for ``n`` frames arriving together (one call per batch: the same
        schedule, without a method call per frame)."""
        interval, slack, latency = self.interval, self.slack, self.latency
        slot, last_entry, last_release = self.slot, self.last_entry, self.last_release
        caught_up = 0
        out = []
        for _ in range(n):
            slot += interval
            if now > slot + slack:  # too far behind the schedule: restart it
                slot = now
            entry = now if now > slot else slot
            if entry < last_entry + interval:
                caught_up += 1
            last_entry = entry
            if entry + latency > last_release:
                last_release = entry + latency
            out.append((entry, last_release))
        self.slot, self.last_entry, self.last_release = slot, last_entry, last_release
        self.caught_up += caught_up
        return out


class PreciseWaker:
    """Calls back on ``loop`` at a ``time.monotonic`` time, precisely: one thread (started
    at the first wake-up, ended by :meth:`close` or when the loop has ended) waits for the
    earliest wake-up and hands it to the loop through the thread bridge
    (:func:`memryx._core.threads.call_soon`); a loop closed meanwhile ends the thread.

    The thread sleeps in a timed wait (no spinning): it costs one thread wake-up and one
    loop wake-up per wake-up asked for, which the release heap bounds (one per model at a
    time).
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, name: str = "memryx-sim-release"
                 ) -> None:
        self._loop = loop
        self._name = name
        self._cond = threading.Condition()
        self._heap: list[tuple[float, int, ScheduledCall]] = []
        self._order = itertools.count()
        self._thread: threading.Thread | None = None
        self._closed = False
        self.wakeups = 0

    def call_at(self, when: float, callback: Callable[..., Any], *args: Any) -> Timer:
        """Call ``callback(*args)`` on the loop at monotonic time ``when``."""
        wake = ScheduledCall(when, callback, args)
        with self._cond:
            if self._closed:
                wake.cancelled = True
                return wake
            heapq.heappush(self._heap, (when, next(self._order), wake))
            if self._thread is None:
                self._thread = start_thread(self._name, self._run)
            elif self._heap[0][2] is wake:  # earlier than what the thread waits for
                self._cond.notify()
        return wake

    def _run(self) -> None:
        heap, cond, monotonic = self._heap, self._cond, time.monotonic
        while True:
            with cond:
                while True:
                    if self._closed:
                        return
                    while heap and heap[0][2].cancelled:
                        heapq.heappop(heap)
                    if heap:
                        delay = heap[0][0] - monotonic()
                        if delay <= 0:
                            wake = heapq.heappop(heap)[2]
                            break
                    else:
                        delay = WAKER_POLL_S
                    if self._loop.is_closed():
                        return
                    cond.wait(min(delay, WAKER_POLL_S))
                self.wakeups += 1
                try:
                    call_soon(self._loop, wake.fire)
                except RuntimeError:  # the loop is closed: nobody to wake
                    return

    def close(self) -> None:
        """End the thread (waits for it: it only ever waits on its condition). On the
        loop's thread."""
        with self._cond:
            self._closed = True
            self._heap.clear()
            self._cond.notify()
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=5.0)


class Releases:
    """One model's jobs that are ready and not due yet, and their one wake-up.

    ``push(release, job)`` keeps a job until its release time (the device clock's), then
    ``resolve(job)`` runs on the loop. One wake-up is armed for the earliest job; it
    releases every job due by then, in release order (ties: first pushed first), so a late
    wake-up releases what it owes and the schedule does not slip. On the loop's timers, jobs due
    less than ``RELEASE_TICK_S`` apart go out in one wake-up (the wake-ups, not the
    frames, are what cost the loop at high rates); with a :class:`PreciseWaker` (models
    slower than a frame a tick) and in virtual time each job has its own.

    Wake-ups are aimed early by what they are learnt to oversleep (``oversleep``: the
    median of the observed lateness, tracked in steps of ``LEAD_STEP_S``, so that a
    loaded host's rare long oversleeps do not move it; at most ``MAX_LEAD_S``), so
    releases centre on their times; a wake-up that comes early releases the jobs due within
    ``oversleep + EARLY_WAKE_S`` (on the loop's own timers, which keep whole milliseconds:
    ``oversleep + LOOP_TIMER_SLACK_S``), and waits again for later ones.
    """

    def __init__(self, clock: Clock, resolve: Callable[[Any], None],
                 waker: PreciseWaker | None = None) -> None:
        self.clock = clock
        self._resolve = resolve
        self._waker = waker
        self._order = itertools.count()
        self.due: list[tuple[float, int, Any]] = []
        self.timer: Timer | None = None
        self.timer_at = 0.0
        self.oversleep = 0.0
        """How late a wake-up comes, learnt as it runs (seconds)."""
        self.closed = False
        # no least spacing where wake-ups are free (virtual time) or each frame has its own
        # (the waker serves models slower than a frame a tick: each frame at its own time)
        self.tick = 0.0 if clock.virtual or waker is not None else RELEASE_TICK_S
        self.early = 0.0 if clock.virtual else (
            EARLY_WAKE_S if waker is not None else LOOP_TIMER_SLACK_S)
        self.wakeups = 0

    def __len__(self) -> int:
        return len(self.due)

    def push(self, release: float, now: float, job: Any) -> None:
        """Keep ``job`` until ``release`` (> ``now``)."""
        heapq.heappush(self.due, (release, next(self._order), job))
        # (a job due within a tick of the armed wake-up goes out with it)
        if self.timer is None or release + self.tick < self.timer_at:
            self._arm(release, now)

    def _arm(self, release: float, now: float) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.closed:  # a computation that finished after the close: nothing to wake
            return
        self.timer_at = release
        if self._waker is not None:
            self.timer = self._waker.call_at(release - self.oversleep, self._wake)
        else:
            self.timer = self.clock.call_later(release - now - self.oversleep, self._wake)

    def _wake(self) -> None:
        self.timer = None
        self.wakeups += 1
        due = self.due
        if not due or self.closed:
            return
        now = self.clock.now()
        # the median of the lateness, tracked by steps: robust to a loaded host's outliers
        step = LEAD_STEP_S if now > self.timer_at else -LEAD_STEP_S
        self.oversleep = min(MAX_LEAD_S, max(0.0, self.oversleep + step))
        # the job this wake-up was aimed at (early by ``oversleep``) is due; a wake-up far
        # earlier than aimed waits again
        horizon = max(now, min(self.timer_at, now + self.oversleep + self.early))
        while due and due[0][0] <= horizon:
            job = heapq.heappop(due)[2]
            self._resolve(job)
        if due and self.timer is None and not self.closed:
            self._arm(max(due[0][0], now + self.tick), now)

    def close(self) -> list[Any]:
        """No more wake-ups; the jobs that were waiting (for the caller to cancel)."""
        self.closed = True
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        jobs = [job for _, _, job in self.due]
        self.due.clear()
        return jobs
