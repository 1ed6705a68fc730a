"""The engine: a DFP's models on a device, one :class:`~.lane.Lane` per model.

The engine owns the lifecycle (start, stop), the callback mode (input streams
and output callbacks, see :mod:`.callbacks`), the request mode (``run``,
``astream``, ``send``/``receive``, each a *sink* for its outputs) and the error
bookkeeping: a failure from user code is kept until a caller saw it, once.

All of it runs on one event loop: the app's own (async use) or a runner
thread's (sync use).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import (
    AsyncGenerator,
    AsyncIterable,
    AsyncIterator,
    Callable,
    Iterable,
    Sequence,
)
from typing import TYPE_CHECKING, Any

from .._exceptions import ClosedError, NotConnectedError, UsageError
from .._trace import Tracer
from ..clock import clock_of
from .aio import TaskSet, weak_handler
from .callbacks import (
    CallbackKind,
    CallbackOutput,
    check_signature,
    classify,
    feed,
    make_producer,
)
from .lane import Frame, Lane
from .processing import Processor
from .sinks import BatchSink, ChannelSink, StreamSink, Waiter
from .streams import StreamPool

if TYPE_CHECKING:
    from ..device.base import Device
    from ..dfp import Dfp

__all__ = ["BatchSink", "ChannelSink", "Engine", "StreamSink"]  # the sinks: from .sinks

log = logging.getLogger("memryx.core")

#: Errors kept for ``wait()`` at most (each ends a stream, so there are few).
MAX_ERRORS = 64


class Engine:
    """Runs a DFP's models on a device, on the loop it is started on."""

    def __init__(self, dfp: Dfp, device: Device, group_id: int = 0, *,
                 stream_workers: int | None = None) -> None:
        self.dfp = dfp
        self.device = device
        self.group_id = group_id
        self.lanes: list[Lane] = []
        self.errors: list[BaseException] = []
        self.more_errors = 0
        self.fatal: BaseException | None = None
        self._fatal_seen = False
        self.closed = False
        self.started = False
        self.started_at = 0.0
        self._changed = Waiter()
        self._tasks: TaskSet | None = None
        self._feeders: TaskSet | None = None
        self._feeders_of: dict[int, list[asyncio.Task[Any]]] = {}
        self._open_streams: dict[int, int] = {}
        self._inputs: set[int] = set()
        self._outputs: dict[int, CallbackOutput] = {}
        #: Set when the accelerator stops: threads call no more user code.
        self.stopping = threading.Event()
        self.stream_workers = stream_workers
        self._pools: dict[int, StreamPool] = {}
        #: Bounds how many input callbacks run at once (``stream_workers``).
        self.input_gate = threading.BoundedSemaphore(stream_workers) \
            if stream_workers is not None else None
        self._processors: dict[tuple[int, str], Processor] = {}
        self.loop: asyncio.AbstractEventLoop | None = None
        #: The accelerator's tracer, shared by every lane (set before :meth:`start`).
        self.tracer = Tracer.off()

    # -- lifecycle ------------------------------------------------------------------------
    async def start(self) -> None:
        await self.device.open(self.dfp, self.group_id)
        if self.closed:  # closed while the device opened: release it, start nothing
            await self.device.aclose()
            raise ClosedError("the accelerator was closed while it started")
        self.loop = asyncio.get_running_loop()
        self._tasks = TaskSet("memryx", self._on_fault)
        self._feeders = TaskSet("memryx-feed", self._on_fault)
        for model in self.dfp.models:
            lane = Lane(model, self.device, self.device.limits(model.index),
                        weak_handler(self._on_fault))  # no Engine <-> Lane cycle
            lane.pre = self._processors.get((model.index, "pre"))
            lane.post = self._processors.get((model.index, "post"))
            lane.tracer = self.tracer
            self.tracer.name_model(model.index, model.name)
            self.lanes.append(lane)
            lane.start(self._tasks)
        self.started = True
        self.started_at = clock_of(self.device).now()

    def notify(self) -> None:
        self._changed.wake()

    def _on_fault(self, exc: BaseException) -> None:
        """The device or the core failed: every waiter sees ``exc``."""
        if self.fatal is None:
            self.fatal = exc
            log.debug("accelerator failed: %r", exc)
        for lane in self.lanes:
            self.stop_feeding(lane)
            lane.budget.fail(exc)
            for sink in list(lane.sinks):
                sink.fail(exc)
        self.notify()

    def record(self, exc: BaseException, where: str) -> None:
        """Keep a user-code error for ``wait()`` to re-raise."""
        exc.add_note(f"(raised by {where})")
        if len(self.errors) < MAX_ERRORS:
            self.errors.append(exc)
        else:
            self.more_errors += 1
        log.debug("error in %s: %r", where, exc)
        self.notify()

    def lane(self, model_idx: int) -> Lane:
        self.check_open()
        self.dfp.model(model_idx)  # raises a clear ModelIndexError
        return self.lanes[model_idx]

    def check_open(self) -> None:
        if self.closed:
            raise ClosedError("the accelerator is closed; create a new one")
        if self.fatal is not None:
            raise self.fatal

    def stop_feeding(self, lane: Lane) -> None:
        for task in self._feeders_of.get(lane.idx, []):
            task.cancel()

    def stream_ended(self, lane: Lane) -> None:
        self._open_streams[lane.idx] = self._open_streams.get(lane.idx, 1) - 1
        self.notify()

    def lane_progress(self, lane: Lane) -> None:
        if lane.budget.used == 0:
            self.notify()

    async def aclose(self) -> None:
        """Stop everything: no callback is called after this returns."""
        if self.closed:
            return
        self.closed = True
        self.stopping.set()
        self.notify()
        for tasks in (self._feeders, self._tasks):
            if tasks is not None:
                await tasks.aclose()
        # the stream pools hold the engine (pool.engine): no cycle left once closed, so the
        # device is freed by reference counting (the output deliverers drop theirs in close())
        self._pools.clear()
        dropped = 0
        for lane in self.lanes:
            lane.close()
            lane.drop_queued()
            out = self._outputs.get(lane.idx)
            if out is not None:
                out.close()
            # admitted and never delivered: dropped by the stop, counted here only (from
            # `closed` on, the output side counts no drop of its own: CallbackOutput._drop)
            dropped += lane.count_at_close()
        closed = ClosedError(f"the accelerator was closed with {dropped} frame(s) in flight")
        for lane in self.lanes:
            lane.budget.fail(closed)
            for sink in list(lane.sinks):
                sink.fail(closed)
        await self.device.aclose()
        if dropped:
            log.info("closed with %d frame(s) in flight", dropped)
        self.notify()

    def abandon(self) -> None:
        """The loop is gone (ended or collected): stop threads, forget tasks, quietly."""
        self.closed = True
        self.stopping.set()
        for out in self._outputs.values():
            with contextlib.suppress(Exception):
                out.close()

    def set_processor(self, model_idx: int, role: str, proc: Processor) -> None:
        """Set the pre- (``role="pre"``) or post-processing step of a model."""
        self.check_open()
        self.dfp.model(model_idx)
        if self.lanes:
            lane = self.lanes[model_idx]
            busy = (model_idx in self._inputs or lane.frames_in) if role == "pre" else \
                (model_idx in self._outputs or lane.frames_in)
            if busy:
                raise UsageError(
                    f"set the {role}-processing model of model {model_idx} before connecting "
                    f"its {'input' if role == 'pre' else 'output'} or sending frames to it")
            setattr(lane, role, proc)
        self._processors[(model_idx, role)] = proc

    def used(self) -> bool:
        """Whether anything was connected or sent (binding elsewhere would lose it)."""
        return bool(self._inputs or self._outputs or any(lane.frames_in for lane in self.lanes))

    # -- callback mode --------------------------------------------------------------------
    def connect_input(self, model_idx: int, fn: Callable[..., Any], stream_count: int | None
                      ) -> None:
        """Start feeding ``model_idx`` from ``fn`` (``fn(stream_idx)`` when stream_count)."""
        lane = self.lane(model_idx)
        if model_idx in self._inputs:
            raise UsageError(f"the input of model {model_idx} is already connected")
        if lane.sinks:
            raise UsageError(f"model {model_idx} is in use by run/send requests")
        self._inputs.add(model_idx)
        streams = range(stream_count) if stream_count is not None else range(1)
        self._open_streams[model_idx] = 0
        self._start_streams(lane, fn, streams, stream_count is not None)

    def add_streams(self, model_idx: int, fn: Callable[..., Any], first: int, count: int
                    ) -> None:
        """Feed streams ``first .. first+count-1`` of ``model_idx`` from ``fn(stream_idx)``,
        beside the streams already connected (``connect_streams`` called again)."""
        lane = self.lane(model_idx)
        if model_idx not in self._inputs or not lane.streams:
            raise UsageError(f"model {model_idx} has no streams to add to")
        if self._open_streams.get(model_idx, 0) <= 0:
            raise UsageError(f"every stream of model {model_idx} has ended, so no stream can "
                             "be added (use a new accelerator)")
        self._start_streams(lane, fn, range(first, first + count), True)

    def _start_streams(self, lane: Lane, fn: Callable[..., Any], streams: range, multi: bool
                       ) -> None:
        """Start feeding ``lane`` from ``fn`` (``fn(stream)`` for each stream when ``multi``):
        plain callbacks of streams on the lane's worker pool, the rest one task each."""
        assert self._feeders is not None
        idx = lane.idx
        self._open_streams[idx] = self._open_streams.get(idx, 0) + len(streams)
        tasks = self._feeders_of.setdefault(idx, [])
        kind = classify(fn)
        pool = None
        if multi and kind in (CallbackKind.SYNC, CallbackKind.GENERATOR):
            pool = self._pools.get(idx)
            if pool is None or pool.finished:
                pool = self._pools[idx] = StreamPool(self, lane, self.stream_workers)
                tasks.append(self._feeders.spawn(pool.run(), f"streams-{idx}"))
        share = max(1, lane.budget.total // self._open_streams[idx])
        for stream in streams:
            args = (stream,) if multi else ()
            role = f"the input callback of model {idx}" + (f", stream {stream}" if multi else "")
            meter = lane.stream_meter(stream)
            if pool is not None:
                pool.add(stream, *make_producer(lane, fn, args, meter, kind, role, stream), role)
                continue
            tasks.append(self._feeders.spawn(feed(self, lane, fn, args, stream, share, role),
                                             f"feed-{idx}-{stream}"))

    def connect_output(self, model_idx: int, fn: Callable[..., Any], with_stream_idx: bool
                       ) -> None:
        lane = self.lane(model_idx)
        if model_idx in self._outputs:
            raise UsageError(f"the output of model {model_idx} is already connected")
        n = lane.n_outputs
        check_signature(fn, None if n is None else n + with_stream_idx,
                        f"the output callback of model {model_idx}")
        out = CallbackOutput(self, lane, fn, with_stream_idx)
        out.start()
        lane.set_callback_sink(out)
        self._outputs[model_idx] = out

    def unconnected(self) -> list[str]:
        missing = []
        for lane in self.lanes:
            if lane.idx not in self._inputs:
                missing.append(f"model {lane.idx} input")
            if lane.idx not in self._outputs:
                missing.append(f"model {lane.idx} output")
        return missing

    def _all_done(self) -> bool:
        return all(self._open_streams.get(lane.idx, 0) <= 0 and lane.budget.used == 0
                   for lane in self.lanes)

    async def wait_done(self) -> None:
        """Wait until every model's streams ended and all outputs were delivered.

        Does not raise the callbacks' errors: the caller does, with
        :meth:`raise_errors`, in its own thread (a ``KeyboardInterrupt`` from a
        callback must not be raised inside the loop).
        """
        missing = self.unconnected()
        if missing:
            raise NotConnectedError(
                f"wait() needs every model's input and output connected; not connected: "
                f"{', '.join(missing)}"
            )
        me = asyncio.current_task()
        if any(ts is not None and ts.owns(me) for ts in (self._tasks, self._feeders)):
            raise UsageError("wait() / await_done() cannot be called from this accelerator's "
                             "own callback: it would wait for itself")
        while self.fatal is None and not self.closed and not self._all_done():
            await self._changed.wait()

    def reported(self, exc: BaseException) -> None:
        """``exc`` reached a caller: it is not raised again elsewhere."""
        if exc is self.fatal:
            self._fatal_seen = True
        self.errors = [e for e in self.errors if e is not exc]

    def raise_errors(self) -> None:
        """Re-raise the first failure nobody has seen yet, once (later ones as notes)."""
        errors = list(self.errors)
        if self.fatal is not None and not self._fatal_seen:
            errors.insert(0, self.fatal)
        self.errors = []
        self._fatal_seen = True
        if not errors:
            return
        first = errors[0]
        for other in errors[1:]:
            first.add_note(f"also failed: {other!r}")
        if self.more_errors:
            first.add_note(f"and {self.more_errors} more error(s)")
            self.more_errors = 0
        raise first

    # -- request mode ----------------------------------------------------------------------
    def request_lane(self, model_idx: int) -> Lane:
        lane = self.lane(model_idx)
        if model_idx in self._inputs:
            raise UsageError(
                f"model {model_idx} is fed by its connected input callback; "
                "run/send/arun cannot be used on it as well"
            )
        return lane

    async def run(self, model_idx: int, frames: Sequence[Any]) -> list[Frame]:
        """Run a batch of frames through ``model_idx``; outputs in input order."""
        lane = self.request_lane(model_idx)
        for data in frames:
            lane.check(data)
        sink = BatchSink(len(frames))
        lane.sinks.add(sink)
        try:
            i = 0
            while i < len(frames):
                self.check_open()
                got = await lane.budget.take(len(frames) - i)
                done = 0
                try:
                    if lane.prepare_blocks:  # one hop per frame: the device starts at once
                        for k in range(i, i + got):
                            pre = lane.trace_clock()
                            (frame,) = await lane.aprepare_many([frames[k]])
                            self.check_open()
                            if pre:
                                lane.trace_pre(pre, lane.now())
                            lane.put((sink, k, lane.now()), frame)
                            done += 1
                    else:
                        prepared = lane.prepare_traced(frames[i:i + got]) if lane.tracer.on \
                            else [lane.prepare(d) for d in frames[i:i + got]]
                        now = lane.now()
                        lane.put_many([(sink, i + k, now) for k in range(got)], prepared)
                        done = got
                except BaseException:
                    lane.budget.give(got - done)
                    raise
                i += got
            return await sink.wait()
        finally:
            sink.cancelled = True
            lane.sinks.discard(sink)

    async def stream(self, model_idx: int, frames: Iterable[Any] | AsyncIterable[Any],
                     window: int, check: Callable[[Any], None]) -> AsyncGenerator[Frame, None]:
        """Outputs of ``frames`` in order, with at most ``window`` frames in flight."""
        lane = self.request_lane(model_idx)
        sink = StreamSink(window)
        lane.sinks.add(sink)
        submitted = 0
        producer_done = False
        bad_input: Exception | None = None

        async def produce() -> None:
            nonlocal submitted, bad_input, producer_done
            try:
                source: AsyncIterator[Any] = (aiter(frames) if isinstance(frames, AsyncIterable)
                                              else _aiter_sync(frames))
                async for data in source:
                    check(data)
                    await sink.slots.take(1)
                    try:
                        pre = lane.trace_clock()
                        (frame,) = await lane.aprepare_many([data])
                        prepared = lane.now() if pre else 0.0
                        self.check_open()
                        await lane.budget.take(1)
                    except BaseException:
                        sink.slots.give(1)
                        raise
                    if pre:
                        lane.trace_pre(pre, prepared)
                    lane.put((sink, submitted, lane.now()), frame)
                    submitted += 1
            except Exception as exc:
                bad_input = exc  # raised after the outputs of the frames before it
            finally:
                producer_done = True
                sink._waiter.wake()

        producer = asyncio.get_running_loop().create_task(produce(), name="memryx-astream")
        received = 0
        try:
            while True:
                if sink.outputs:
                    item = sink.outputs.popleft()
                    received += 1
                    sink.slots.give(1)
                    yield item
                    continue
                if producer_done and received >= submitted:
                    break
                if sink.error is not None:
                    raise sink.error
                if sink.closed:
                    raise ClosedError("the accelerator is closed")
                await sink._waiter.wait()
            if bad_input is not None:
                raise bad_input
        finally:
            producer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await producer
            lane.sinks.discard(sink)
            sink.close()

    async def send(self, model_idx: int, data: Any, sink: ChannelSink, *, nowait: bool = False
                   ) -> None:
        """Queue one frame whose outputs go to ``sink`` (``nowait``: or raise WouldBlock).

        Cancelled before it returns: the frame was not sent.
        """
        lane = self.request_lane(model_idx)
        pre = lane.trace_clock()
        (frame,) = await lane.aprepare_many([data])
        prepared = lane.now() if pre else 0.0
        self.check_open()
        window = sink.bind(lane)
        lane.sinks.add(sink)  # from now on a close or a fault reaches this send
        if nowait:
            if not window.take_nowait(1):
                raise WouldBlock
            if not lane.budget.take_nowait(1):
                window.give(1)
                raise WouldBlock
        else:
            await window.take(1)
            try:
                await lane.budget.take(1)
                self.check_open()
            except BaseException:
                window.give(1)
                raise
        lane.sinks.add(sink)
        if pre:
            lane.trace_pre(pre, prepared)
        lane.put((sink, 0, lane.now()), frame)

    async def receive(self, model_idx: int, sink: ChannelSink, *, nowait: bool = False
                      ) -> Frame:
        """The next output of ``send`` frames (``nowait``: or raise WouldBlock).

        Cancelled while waiting: nothing was taken; the output stays for the next call.
        """
        lane = self.lane(model_idx)
        lane.sinks.add(sink)
        if nowait:
            out = sink.take_nowait()
            if out is None:
                raise WouldBlock
            return out
        return await sink.take()

    # -- statistics ---------------------------------------------------------------------------
    def statistics(self) -> dict[str, Any]:
        """Counters per model and per stream; see ``docs/api.md`` for every field."""
        elapsed = clock_of(self.device).now() - self.started_at if self.started else 0.0
        models = []
        for lane in self.lanes:
            entry: dict[str, Any] = {"model_idx": lane.idx, "name": lane.model.name,
                                     **lane.meter.summary()}
            entry.update({
                "in_flight": lane.in_flight,
                "frame_budget": lane.budget.total,
                "dropped": lane.dropped,
                "device_wait_s": lane.device_wait_s,
                "queues": {"input": lane.queued_count, "on_device": lane.on_device_count},
                "streams": {s: m.summary() for s, m in sorted(lane.streams.items())},
            })
            if lane.streams:  # the input callbacks run per stream: the model's is their sum
                entry["input_callback_s"] = sum(m.input_s for m in tuple(lane.streams.values()))
            models.append(entry)
        return {"elapsed_s": elapsed, "models": models, "device": self.device.statistics()}


class WouldBlock(Exception):
    """A ``nowait`` call found no room."""


async def _aiter_sync(iterable: Iterable[Any]) -> AsyncIterator[Any]:
    for item in iterable:
        yield item
        await asyncio.sleep(0)
