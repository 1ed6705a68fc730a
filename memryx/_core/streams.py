"""Input streams with plain callbacks, served by a bounded pool of worker threads.

``MultiStreamAsyncAccl`` may run dozens of streams on one model. One thread per
stream would cost, per frame, a wake-up of that stream's thread and a wake-up
of the loop from it. Here the streams of one model share:

* a **pool of worker threads**: a stream with credits waits in one ready queue,
  and any free worker calls its callback for every credit it holds, then takes
  the next ready stream. A stream is served by one worker at a time, so its
  callback never runs concurrently with itself and its frames stay in order.
  The pool starts with up to :data:`BASE_WORKERS` threads. Quick callbacks are
  all run by whichever worker is awake (waking a second thread costs more than
  the call); callbacks that take :data:`PARALLEL_S` or more on average are run
  by several workers at once. When streams are ready and no worker is free to
  take them while one is stuck in a callback for :data:`STUCK_S` or more (or
  callbacks are slow), the pool grows, up to ``stream_workers`` (default
  :data:`MAX_WORKERS`) and never beyond one worker per stream: a callback that
  blocks (a camera waiting for its next frame) does not hold the other streams
  up for long. A worker added that way ends after :data:`RETIRE_S` without work.
* **one channel to the loop**: a worker takes every ready stream in one pass
  (while callbacks are quick), calls each for its credits and puts the frames it
  made into the channel as one run of ``(stream, frame)`` pairs (a frame costs
  an append; a pass that takes :data:`PARALLEL_S` puts what it made so far, so
  slow callbacks never hold frames back); the loop takes everything that is
  ready in one wake-up and queues it in the lane, whichever streams it came from.
* **one granter on the loop**: free units of the model's frame budget are given
  to the streams that want them round-robin, one unit at a time, and no stream
  holds more than ``ceil(budget / live streams)`` units (a blocked stream holds
  few). That makes the streams' shares fair.

A stream ends when its callback returns ``None``, raises ``StopIteration``, is
an exhausted generator, or raises (recorded for ``wait()``).
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import math
import os
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .aio import END, Channel, ChannelClosed
from .threads import start_thread

if TYPE_CHECKING:
    from .engine import Engine
    from .lane import Lane, Meter

__all__ = ["BASE_WORKERS", "MAX_WORKERS", "STUCK_S", "StreamPool"]

#: Workers a pool starts with (at most one per stream): the host's cores, at least 2.
BASE_WORKERS = max(2, os.cpu_count() or 1)
#: The most workers of one pool when ``stream_workers`` is not given (or -1).
MAX_WORKERS = 64
#: A worker inside one callback for longer than this counts as stuck (blocked).
STUCK_S = 0.005
#: A worker added for stuck ones ends after this long without work.
RETIRE_S = 1.0
#: Callbacks that take longer than this on average are run by several workers at once
#: (up to :data:`BASE_WORKERS`); quicker ones by one worker, which is cheaper than
#: waking another thread for them.
PARALLEL_S = 200e-6
#: The most ready streams one worker pass takes while callbacks are quick.
PASS_STREAMS = 64
#: How often the loop looks for stuck workers while streams wait.
TICK_S = 0.01


class _Failed:
    """A stream's callback raised ``error`` (the stream ended)."""

    __slots__ = ("error",)

    def __init__(self, error: BaseException) -> None:
        self.error = error


class _Stream:
    """One input stream; ``credits``/``busy``/``queued``/``holder`` are guarded by the
    pool's lock, ``outstanding``/``ended`` belong to the loop."""

    __slots__ = ("args", "busy", "credits", "done", "ended", "fn", "gen", "holder", "idx",
                 "meter", "outstanding", "produce", "queued", "role")

    def __init__(self, idx: int, role: str, meter: Meter,
                 produce: Callable[[], Any], gen: Any) -> None:
        self.idx = idx
        self.role = role
        self.meter = meter
        self.produce = produce
        self.gen = gen
        self.credits = 0
        self.busy = False
        self.queued = False
        self.done = False  # thread side: no more calls
        self.holder: int | None = None  # the worker holding frames of it not yet put
        self.outstanding = 0  # loop side: units granted, not come back as frames
        self.ended = False  # loop side


class StreamPool:
    """The plain-callback input streams of one lane (module docstring)."""

    def __init__(self, engine: Engine, lane: Lane, limit: int | None) -> None:
        self.engine = engine
        self.lane = lane
        self.limit = max(1, limit if limit is not None else MAX_WORKERS)
        # items are runs of (stream, frame) made by one worker pass (at most one per frame)
        self.channel: Channel[list[tuple[_Stream, Any]]] = Channel(lane.budget.total + 64)
        self.streams: list[_Stream] = []
        self.finished = False
        self._live = 0
        self._rr = 0
        self._lock = threading.Condition()
        self._ready: deque[_Stream] = deque()
        self._since: dict[int, float] = {}  # worker -> when its callback started (0: none)
        self._next_worker = 0
        self._sleeping = 0  # workers waiting for a ready stream (under the lock)
        self._made: dict[int, list[tuple[_Stream, Any]]] = {}  # worker -> frames not put
        self._made_at: dict[int, float] = {}  # worker -> when its oldest frame not put began
        self.cost = 0.0
        """Running average of a callback call's duration (seconds, written by workers)."""
        self._halted = False
        self._want: asyncio.Future[None] | None = None
        self._tick: asyncio.TimerHandle | None = None

    # -- loop side --------------------------------------------------------------------------
    def add(self, idx: int, produce: Callable[[], Any], gen: Any, role: str) -> None:
        """Add stream ``idx``: ``produce()`` calls its callback once (on a worker) and
        returns a prepared frame or :data:`END`; ``gen`` is its generator, if any."""
        meter = self.lane.stream_meter(idx)
        self.streams.append(_Stream(idx, role, meter, produce, gen))
        self._live += 1
        self._wake_granter()

    def _cap(self) -> int:
        return max(1, math.ceil(self.lane.budget.total / max(1, self._live)))

    async def run(self) -> None:
        """Grant units and queue frames until every stream ended (or we are cancelled)."""
        self._grow(min(BASE_WORKERS, len(self.streams)))
        granter = asyncio.get_running_loop().create_task(self._grant(), name="memryx-grant")
        try:
            await self._collect()
        finally:
            self.finished = True
            granter.cancel()
            with contextlib.suppress(BaseException):
                await granter
            self._stop()

    def _wanted(self) -> int:
        """Units the streams could take now (each up to the cap), counted up to the
        budget's total (no more can be granted at once: the same grant, without walking
        thousands of streams on every frame)."""
        streams = self.streams
        if len(streams) > 2 * self._live + 16:  # forget ended streams (amortised O(1))
            streams = self.streams = [s for s in streams if not s.ended]
            self._rr = 0
        cap, limit = self._cap(), self.lane.budget.total
        want = 0
        for s in streams:
            if not s.ended and s.outstanding < cap:
                want += cap - s.outstanding
                if want >= limit:
                    return limit
        return want

    async def _grant(self) -> None:
        budget = self.lane.budget
        while True:
            want = self._wanted()
            if want <= 0:
                self._want = asyncio.get_running_loop().create_future()
                try:
                    await self._want
                finally:
                    self._want = None
                continue
            got = await budget.take(want)
            more = self._wanted() - got  # frames that came in while we waited freed more
            if more > 0:
                got += budget.take_nowait(more)
            left = self._distribute(got, self._cap())
            if left:
                budget.give(left)

    def _distribute(self, units: int, cap: int) -> int:
        """Hand ``units`` round-robin, one at a time, to streams below ``cap``."""
        streams = self.streams
        n = len(streams)
        granted: dict[int, int] = {}
        i, misses = self._rr, 0
        while units and misses < n:
            s = streams[i % n]
            i += 1
            if not s.ended and s.outstanding < cap:
                s.outstanding += 1
                units -= 1
                granted[i - 1] = granted.get(i - 1, 0) + 1
                misses = 0
            else:
                misses += 1
        self._rr = i % n if n else 0
        if granted:
            with self._lock:
                woken = 0
                for k, g in granted.items():
                    s = streams[k % n]
                    s.credits += g
                    if not s.busy and not s.queued and not s.done:  # done: the loop
                        # has not seen its end yet; it is never called again
                        s.queued = True
                        self._ready.append(s)
                        woken += 1
                if woken and self._sleeping:
                    if self.cost >= PARALLEL_S:
                        self._lock.notify(woken)
                    elif not self._free_awake():  # nobody awake to take them
                        self._lock.notify(1)
            self._arm_tick()
        return units

    def _wake_granter(self) -> None:
        want = self._want
        if want is not None and not want.done():
            want.set_result(None)

    async def _collect(self) -> None:
        lane, channel = self.lane, self.channel
        tracer = lane.tracer
        while self._live > 0:
            try:
                batch = await channel.get(channel.capacity)
            except ChannelClosed:  # pragma: no cover - only closed by ourselves
                return
            tags: list[Any] = []
            frames: list[Any] = []
            ready = -math.inf
            traced = tracer.on
            for run in batch:
                for s, item in run:
                    if item is END or isinstance(item, _Failed):
                        if tags:  # the stream's frames before its end are queued first
                            self._put(tags, frames, traced, ready)
                            tags, frames = [], []
                        self._end(s, item.error if isinstance(item, _Failed) else None)
                        continue
                    s.outstanding -= 1
                    if item[2] > ready:
                        ready = item[2]
                    if traced:
                        tags.append((s, item))
                        frames.append(None)
                    else:
                        tags.append((None, s.idx, item[1]))
                        frames.append(item[0])
                        s.meter.frames_in += 1
            if tags:
                self._put(tags, frames, traced, ready)
            lane.flush_now()  # everything that was ready is in: no iteration to wait for
            self._wake_granter()  # every item freed a unit or ended a stream

    def _put(self, tags: list[Any], frames: list[Any], traced: bool, ready: float) -> None:
        lane = self.lane
        if not traced:
            lane.put_many(tags, frames, None, ready)
            return
        from .callbacks import _trace_inputs

        run: list[Any] = []
        for k, (s, item) in enumerate(tags):
            run.append(item)
            last = k + 1 == len(tags) or tags[k + 1][0] is not s
            if last:
                _trace_inputs(lane, s.idx, s.meter.frames_in, run)
                lane.put_many([(None, s.idx, it[1]) for it in run], [it[0] for it in run],
                              s.meter, ready)
                run = []

    def _end(self, s: _Stream, error: BaseException | None) -> None:
        engine = self.engine
        s.ended = True
        self._live -= 1
        if s.outstanding:
            self.lane.budget.give(s.outstanding)
            s.outstanding = 0
        if error is not None and not (engine.closed or error is engine.fatal):
            engine.record(error, s.role)
        self._close_gen(s)
        engine.stream_ended(self.lane)

    @staticmethod
    def _close_gen(s: _Stream) -> None:
        gen = s.gen
        if gen is not None and inspect.getgeneratorstate(gen) != "GEN_RUNNING":
            with contextlib.suppress(Exception):
                gen.close()  # a generator still running on an abandoned thread is left to it

    def _stop(self) -> None:
        """Cancelled or done: no more calls; frames made and not queued are dropped."""
        with self._lock:
            self._halted = True
            self._lock.notify_all()
        if self._tick is not None:
            self._tick.cancel()
            self._tick = None
        lane = self.lane
        for s, item in (pair for run in self.channel.abort_items() for pair in run):
            if item is not END and not isinstance(item, _Failed):  # its unit is given below
                lane.lost_frames(s.meter)
        with self._lock:  # made by workers and not put: the channel is closed, so dropped
            for made in self._made.values():
                if made:
                    self._send(made)
        given = 0
        for s in self.streams:
            given += max(0, s.outstanding)
            s.outstanding = 0
            if not s.ended:
                s.ended = True
                self._live -= 1
                self._close_gen(s)
                self.engine.stream_ended(lane)
        if given:
            lane.budget.give(given)

    # -- growing the pool --------------------------------------------------------------------
    def _arm_tick(self) -> None:
        if self._tick is None and not self._halted:
            self._tick = asyncio.get_running_loop().call_later(TICK_S, self._check)

    def _max_workers(self) -> int:
        return min(self.limit, max(1, self._live))

    def _check(self) -> None:
        """Streams are ready and nobody takes them: wake sleeping workers, or add workers
        when the busy ones are stuck in a callback (or callbacks are slow: then each
        ready stream may have a worker, within the limit)."""
        self._tick = None
        if self._halted:
            return
        slow = self.cost >= PARALLEL_S
        with self._lock:
            self._rescue(time.monotonic())
            waiting, sleeping = len(self._ready), self._sleeping
            free = self._free_awake()
            if waiting and sleeping and (slow or not free):
                self._lock.notify(waiting)
        if waiting and not sleeping and (slow or not free):
            self._grow(waiting if slow else min(waiting, BASE_WORKERS))
        if waiting or any(not s.ended and s.outstanding for s in self.streams):
            self._arm_tick()

    def _free_awake(self) -> int:
        """Under the lock: workers awake and not stuck in a callback (they will take the
        next ready stream)."""
        now = time.monotonic()
        free = sum(1 for t in self._since.values() if not t or now - t < STUCK_S)
        return free - self._sleeping

    def _grow(self, n: int) -> None:
        with self._lock:
            n = min(n, self._max_workers() - len(self._since))
            ids = []
            for _ in range(max(0, n)):
                k = self._next_worker
                self._next_worker += 1
                self._since[k] = 0.0
                ids.append(k)
        for k in ids:
            start_thread(f"memryx-input-{self.lane.idx}-w{k}", self._work, k)

    @property
    def workers(self) -> int:
        """Worker threads serving the streams now."""
        return len(self._since)

    # -- thread side ------------------------------------------------------------------------
    def _stopped(self) -> bool:
        return self._halted or self.engine.stopping.is_set() or self.channel._loop.is_closed()

    def _next(self, k: int) -> _Stream | None:
        """On worker ``k``, under the lock: the next ready stream, or None to end."""
        ready, lock = self._ready, self._lock
        idle = 0.0
        while not ready:
            if self._stopped():
                return None
            if idle >= RETIRE_S and len(self._since) > BASE_WORKERS:
                return None  # grown for callbacks that blocked; not needed any more
            t = time.monotonic()
            self._sleeping += 1
            try:
                lock.wait(0.25)  # also notices a stop set without a wake-up
            finally:
                self._sleeping -= 1
            idle += time.monotonic() - t
        if self._stopped():
            return None
        s = ready.popleft()
        s.queued = False
        s.busy = True
        if s.holder is not None and s.holder != k:
            # another worker still holds frames it made of this stream: they go first, or
            # this worker's frames of it could reach the channel before them (out of order)
            self._send(self._made[s.holder])
        return s

    def _work(self, k: int) -> None:
        from .runner import user_code

        lock, since = self._lock, self._since
        gate, monotonic = self.engine.input_gate, time.monotonic
        # Frames made and not yet put, in order (under the lock: the loop takes them from a
        # worker stuck in a callback, and counts them at a stop).
        made = self._made[k] = []
        s: _Stream | None = None
        try:
            with user_code():
                while True:
                    with lock:
                        if s is not None:  # the last stream's credits are used
                            s.busy = False
                            if s.credits and not s.done and not s.queued:
                                s.queued = True
                                self._ready.append(s)
                            # quick callbacks: the frames of every ready stream go in one
                            # put (a frame costs an append)
                            if made and (not self._ready or self.cost >= PARALLEL_S
                                         or monotonic() - self._made_at[k] >= PARALLEL_S):
                                self._send(made)
                        s = self._next(k)
                        if s is None:
                            return
                        n, s.credits = s.credits, 0
                    for _ in range(n):
                        if self._stopped():
                            return
                        since[k] = started = monotonic()
                        try:
                            if gate is not None:
                                with gate:
                                    item = s.produce()
                            else:
                                item = s.produce()
                        except BaseException as exc:
                            item = _Failed(exc)
                        now = monotonic()
                        self.cost += 0.05 * (now - started - self.cost)
                        last = item is END or isinstance(item, _Failed)
                        with lock:
                            since[k] = 0.0
                            s.done = last
                            if not made:
                                self._made_at[k] = started
                            made.append((s, item))
                            s.holder = k
                            if now - self._made_at[k] >= PARALLEL_S:  # slow: they go now
                                self._send(made)
                        if last:
                            break
        finally:
            with lock:
                since.pop(k, None)
                if made:  # stopped (or the thread ended) with frames not put
                    self._send(made)
                del self._made[k]

    def _send(self, made: list[tuple[_Stream, Any]]) -> None:
        """Under the lock: put the frames made by a worker into the channel as one run and
        empty ``made``. Never waits: what is in the channel is bounded by the units granted
        and the streams' ends. A stopped pool's channel is closed: they were never sent."""
        run = made[:]
        made.clear()
        for s, _ in run:
            s.holder = None
        try:
            self.channel.put_many_nowait((run,))
        except ChannelClosed:
            for s, item in run:
                if item is not END and not isinstance(item, _Failed):
                    self._lost(s)

    def _rescue(self, now: float) -> None:
        """On the loop, under the lock: frames made by a worker stuck in a later callback
        of its pass go now (they would wait for that callback to return)."""
        for k, made in self._made.items():
            t = self._since.get(k, 0.0)
            if made and t and now - t >= STUCK_S:
                self._send(made)

    def _lost(self, s: _Stream) -> None:
        """On a worker: a frame made after the pool stopped listening (a stop)."""
        self.lane.lost_frames(s.meter)
