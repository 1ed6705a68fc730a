"""The core: one coroutine pipeline per model, over bounded channels.

::

    feeders (one per input stream)  ─┐
    requests (run / send / arun)    ─┼─► [lane input channel] ─► dispatcher ─► device.send
                                     │                               │ tag
                                     │                               ▼
                                     │                    [pending channel] (frames in flight)
                                     │                               │
    sinks (output callback, receive ◄┴────────── collector ◄── device.receive
    channel, a request's results)

Every frame travels with a *tag* naming who gets its outputs (a sink and a
key: a stream index or a position in a batch). One dispatcher per model moves
frames to the device and their tags to the pending channel in the same order,
and the device is FIFO per model, so the collector pairs each output with its
tag; a stream's order is kept because each stream submits in order. The lane's
input channel is served first come, first served, which interleaves many
ready streams round-robin.

All of this runs on one event loop: the app's own (async use) or a runner
thread's (sync use). Blocking work (sync callbacks, onnxruntime pre/post
models) goes to worker threads through :mod:`.runner`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import (
    AsyncGenerator,
    AsyncIterable,
    AsyncIterator,
    Callable,
    Iterable,
    Iterator,
    Sequence,
)
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import anyio
import numpy as np
from numpy.typing import NDArray

from .._exceptions import ClosedError, NotConnectedError, UsageError
from .callbacks import CallbackKind, check_signature, classify, frames_from
from .channel import ReceiveEnd, SendEnd, drain, get, open_channel, put
from .processing import PortSpec, Processor, as_array_list, conform
from .runner import new_limiter, run_sync, stop_flag, user_code
from .tasks import TaskSet

if TYPE_CHECKING:
    from ..device.base import Device
    from ..dfp import Dfp, ModelInfo

__all__ = ["BatchSink", "ChannelSink", "Engine", "Lane", "Sink"]

log = logging.getLogger("memryx.core")
Array = NDArray[Any]
Frame = list[Array]

#: Frames a lane's input channel holds before submitters wait.
LANE_INPUT_DEPTH = 16
#: Outputs waiting for the output callback, and the most handed over per thread hop.
OUTPUT_BATCH = 32
#: The most frames an input callback is asked for in one thread hop.
INPUT_BATCH = 32


class Sink(Protocol):
    """Where a frame's outputs go."""

    async def deliver(self, key: int, outputs: Frame) -> None: ...

    def fail(self, exc: BaseException) -> None: ...


#: Who gets a frame's outputs: (sink or None for the output callback, key, submit time).
Tag = tuple[Sink | None, int, float]
#: An output waiting for the output callback: (stream, outputs, submit time, ready time).
Delivery = tuple[int, Frame, float, float]
#: Latency samples kept per model and per stream for percentiles.
LATENCY_SAMPLES = 4096


class BatchSink:
    """Collects the outputs of one request (``run`` / ``arun``) by position."""

    def __init__(self, n: int) -> None:
        self.results: list[Frame | None] = [None] * n
        self.remaining = n
        self.done = anyio.Event()
        self.error: BaseException | None = None
        self.cancelled = False
        if n == 0:
            self.done.set()

    async def deliver(self, key: int, outputs: Frame) -> None:
        if self.cancelled:
            return
        self.results[key] = outputs
        self.remaining -= 1
        if self.remaining == 0:
            self.done.set()

    def fail(self, exc: BaseException) -> None:
        if self.error is None:
            self.error = exc
        self.done.set()

    async def wait(self) -> list[Frame]:
        await self.done.wait()
        if self.error is not None and self.remaining:
            raise self.error
        return [r for r in self.results if r is not None]


class _ChannelSink:
    """A sink whose outputs wait in a channel for their consumer."""

    def __init__(self, capacity: int) -> None:
        self.send_end: SendEnd[Any]
        self.receive_end: ReceiveEnd[Any]
        self.send_end, self.receive_end = open_channel(capacity)
        self.error: BaseException | None = None

    def fail(self, exc: BaseException) -> None:
        """End the consumer's wait: it sees ``exc`` (the first failure)."""
        if self.error is None:
            self.error = exc
        self.send_end.close()

    def close(self) -> None:
        self.send_end.close()
        self.receive_end.close()


class ChannelSink(_ChannelSink):
    """Outputs of ``SyncAccl.send`` frames, waiting for ``receive``."""

    async def deliver(self, key: int, outputs: Frame) -> None:
        with contextlib.suppress(anyio.ClosedResourceError, anyio.BrokenResourceError):
            await self.send_end.send(outputs)

    async def receive(self, *, nowait: bool = False) -> Frame:
        """The next output; ``nowait`` raises ``anyio.WouldBlock`` when there is none."""
        try:
            frame: Frame = (self.receive_end.receive_nowait() if nowait
                            else await self.receive_end.receive())
        except (anyio.EndOfStream, anyio.ClosedResourceError):
            raise (self.error or ClosedError("the accelerator is closed")) from None
        return frame


class StreamSink(_ChannelSink):
    """Outputs of one ``astream``: in order, at most ``window`` in flight.

    Frames of one sink go through one lane in order, so their outputs arrive in
    order too; the window bounds how many can be waiting, so ``deliver`` never
    blocks the lane's collector (a slow consumer holds back only its producer).
    The channel holds the window's outputs plus the producer's end marker (None).
    """

    def __init__(self, window: int) -> None:
        super().__init__(window + 1)
        self.slots = anyio.Semaphore(window)

    async def deliver(self, key: int, outputs: Frame) -> None:
        # the consumer may have left early: late outputs are dropped
        with contextlib.suppress(anyio.ClosedResourceError, anyio.BrokenResourceError):
            self.send_end.send_nowait(outputs)


@dataclass
class Meter:
    """Counters of one model or one stream."""

    frames_in: int = 0
    frames_out: int = 0
    first_out: float = 0.0
    last_out: float = 0.0
    input_s: float = 0.0
    """Time spent getting frames from the input callback (including its thread hop)."""
    output_s: float = 0.0
    """Time spent handing outputs over (output callback, post-processing)."""
    latencies: deque[float] = field(default_factory=lambda: deque(maxlen=LATENCY_SAMPLES))

    def delivered(self, t0: float, ready: float) -> None:
        self.frames_out += 1
        self.latencies.append(ready - t0)
        self.first_out = self.first_out or ready
        self.last_out = ready

    def summary(self) -> dict[str, Any]:
        span = self.last_out - self.first_out
        lat = np.asarray(self.latencies) * 1000.0
        return {
            "frames_in": self.frames_in, "frames_out": self.frames_out,
            "fps": (self.frames_out - 1) / span if span > 0 else 0.0,
            "latency_ms": {
                "p50": float(np.percentile(lat, 50)) if lat.size else None,
                "p99": float(np.percentile(lat, 99)) if lat.size else None,
                "mean": float(lat.mean()) if lat.size else None,
            },
            "input_callback_s": self.input_s, "output_callback_s": self.output_s,
        }


@dataclass
class _Output:
    fn: Callable[..., Any]
    kind: CallbackKind
    with_stream_idx: bool


@dataclass
class Lane:
    """The pipeline of one model."""

    engine: Engine
    model: ModelInfo
    capacity: int
    specs: tuple[PortSpec, ...] = ()
    pre: Processor | None = None
    post: Processor | None = None
    output: _Output | None = None
    output_set: anyio.Event = field(default_factory=anyio.Event)
    input_connected: bool = False
    sealed: bool = False
    done: anyio.Event = field(default_factory=anyio.Event)
    feeders: list[Any] = field(default_factory=list)
    streams: dict[int, Meter] = field(default_factory=dict)
    meter: Meter = field(default_factory=Meter)
    device_wait_s: float = 0.0
    """Time the collector spent waiting for the device."""
    output_failed: bool = False
    """The output callback raised: later outputs are dropped, not handed to it."""
    dropped: int = 0
    """Outputs not delivered: after the output callback raised, or at stop."""
    feeder_ends: list[Any] = field(default_factory=list)
    handed: int = 0
    """Outputs handed to the output callback (counted before it returns)."""

    @property
    def frames_in(self) -> int:
        return self.meter.frames_in

    @property
    def frames_out(self) -> int:
        return self.meter.frames_out

    @property
    def delivered(self) -> int:
        """Frames whose outputs reached their receiver (a callback still running when the
        accelerator stopped was handed its frame: that counts)."""
        return max(self.frames_out, self.handed) if self.output else self.frames_out

    @property
    def in_flight(self) -> int:
        return max(0, self.frames_in - self.delivered - self.dropped)

    def count_dropped_input(self, n: int, stream: Meter) -> None:
        """Frames an input callback returned that were never sent: dropped by a stop."""
        self.meter.frames_in += n
        stream.frames_in += n
        self.dropped += n

    def count_in(self, stream: Meter | None = None) -> None:
        self.meter.frames_in += 1
        if stream is not None:
            stream.frames_in += 1

    def __post_init__(self) -> None:
        self.idx = self.model.index
        self.specs = tuple(PortSpec(self.idx, p.port, p.layer, p.shape, p.dtype)
                           for p in self.model.inputs)
        self.in_send: SendEnd[tuple[Tag, Frame]]
        self.in_send, self._in_recv = open_channel(LANE_INPUT_DEPTH)
        self._pending_send: SendEnd[Tag]
        self._pending_recv: ReceiveEnd[Tag]
        self._pending_send, self._pending_recv = open_channel(self.capacity)
        self._out_send: SendEnd[Delivery]
        self._out_recv: ReceiveEnd[Delivery]
        self._out_send, self._out_recv = open_channel(OUTPUT_BATCH)
        self.sinks: set[Sink] = set()

    # -- frames in --------------------------------------------------------------------
    @property
    def n_outputs(self) -> int | None:
        if self.post is None:
            return len(self.model.outputs)
        return self.post.n_outputs

    def user_specs(self) -> tuple[PortSpec, ...] | None:
        """What user frames are checked against (None: a Python pre-processor decides)."""
        if self.pre is None:
            return self.specs
        return self.pre.input_specs

    def check(self, data: Any) -> None:
        """Validate one user frame without copying it (for whole batches up front)."""
        specs = self.user_specs()
        if specs is not None:
            conform(data, specs, copy=False)

    def prepare(self, data: Any) -> Frame:
        """A user frame -> device-ready private arrays (pre-processing, checks, copies)."""
        if self.pre is None:
            return conform(data, self.specs)
        specs = self.pre.input_specs
        if specs is not None:
            arrays = conform(data, specs, copy=False)
        else:
            arrays = as_array_list(data, len(self.specs), self.idx, "frame") \
                if not hasattr(data, "shape") else [data]
        return conform(self.pre(arrays), self.specs, "pre-processing output")

    async def aprepare(self, data: Any) -> Frame:
        if self.pre is not None and self.pre.blocking:
            return await run_sync(self.prepare, data)
        return self.prepare(data)

    # -- frames out -------------------------------------------------------------------
    def finish(self, outputs: Frame) -> Frame:
        if self.post is None:
            return outputs
        return self.post(outputs)

    async def afinish(self, outputs: Frame) -> Frame:
        if self.post is not None and self.post.blocking:
            return await run_sync(self.finish, outputs)
        return self.finish(outputs)

    # -- the tasks of a lane --------------------------------------------------------------
    async def dispatch(self, device: Device) -> None:
        """Frames to the device, their tags to the pending channel, in the same order."""
        async with self._pending_send:
            while True:
                try:
                    tag, frame = await get(self._in_recv)
                except anyio.EndOfStream:
                    break
                await put(self._pending_send, tag)
                await device.send(self.idx, frame)

    async def collect(self, device: Device) -> None:
        """Pair each output with its tag and hand it on: to its sink, or to the deliverer."""
        async with self._out_send:
            while True:
                try:
                    sink, key, t0 = await get(self._pending_recv)
                except anyio.EndOfStream:
                    break
                waiting = time.monotonic()
                outputs = await device.receive(self.idx)
                ready = time.monotonic()
                self.device_wait_s += ready - waiting
                if sink is None:
                    await put(self._out_send, (key, outputs, t0, ready))
                else:
                    await sink.deliver(key, await self.afinish(outputs))
                    self.meter.delivered(t0, ready)
                    self.meter.output_s += time.monotonic() - ready

    async def deliver(self) -> None:
        """Call the output callback, in order; a sync one gets a batch per thread hop."""
        await self.output_set.wait()
        out = self.output
        assert out is not None
        while not self.engine.closed:
            try:
                first = await get(self._out_recv)
            except (anyio.EndOfStream, anyio.ClosedResourceError):
                break
            batch = [first, *drain(self._out_recv, OUTPUT_BATCH - 1)]
            if self.output_failed:
                self.dropped += len(batch)  # the callback raised: its stream has ended
                continue
            if out.kind is CallbackKind.SYNC:
                results = await run_sync(self._call_batch, out, batch,
                                         limiter=self.engine.output_limiter)
            else:
                results = [await self._acall(out, item) for item in batch]
            for (stream, _, t0, ready), (error, finished) in zip(batch, results, strict=False):
                stats = self.streams.setdefault(stream, Meter())
                self.meter.delivered(t0, ready)
                stats.output_s += finished - ready
                self.meter.output_s += finished - ready
                if error is None:
                    stats.delivered(t0, ready)
                    continue
                where = f"the output callback of model {self.idx}"
                if out.with_stream_idx:
                    where += f", stream {stream}"
                self.engine.record(error, where)
                self.output_failed = True
                self.stop_feeding()
            self.dropped += len(batch) - len(results)
        self.done.set()
        self.engine.notify()

    def _call_batch(self, out: _Output, batch: list[Delivery]
                    ) -> list[tuple[Exception | None, float]]:
        """On a worker thread: post-process and call back each output of ``batch``."""
        results: list[tuple[Exception | None, float]] = []
        with user_code():
            for stream, outputs, _, _ in batch:
                if self.engine.stopping.is_set():
                    break  # stopped: no callback after stop() returns
                self.handed += 1  # from here on the frame is the callback's
                try:
                    res = self.finish(outputs)
                    out.fn(*((stream, *res) if out.with_stream_idx else res))
                except Exception as exc:
                    results.append((exc, time.monotonic()))
                    break  # the callback raised: it is not called again
                results.append((None, time.monotonic()))
        return results

    async def _acall(self, out: _Output, item: Delivery) -> tuple[Exception | None, float]:
        stream, outputs, _, _ = item
        self.handed += 1
        try:
            res = await self.afinish(outputs)
            await out.fn(*((stream, *res) if out.with_stream_idx else res))
        except Exception as exc:
            return exc, time.monotonic()
        return None, time.monotonic()

    def stop_feeding(self) -> None:
        for task in self.feeders:
            task.cancel()

    def room(self) -> int:
        """Frames each of this lane's streams may produce in one go right now."""
        st = self.in_send.statistics()
        free = int(st.max_buffer_size) - st.current_buffer_used
        return max(1, min(INPUT_BATCH, free // max(1, len(self.feeders))))

    def pending_count(self) -> int:
        return int(self._pending_send.statistics().current_buffer_used)

    def close_channels(self) -> None:
        for end in (self.in_send, self._in_recv, self._pending_send, self._pending_recv,
                    self._out_send, self._out_recv, *self.feeder_ends):
            end.close()


class Engine:
    """Runs a DFP's models on a device, on the loop it is started on."""

    def __init__(self, dfp: Dfp, device: Device, group_id: int = 0, *,
                 stream_workers: int | None = None) -> None:
        self.dfp = dfp
        self.device = device
        self.group_id = group_id
        self.lanes: list[Lane] = []
        self.errors: list[BaseException] = []
        self.fatal: BaseException | None = None
        self._reported: list[BaseException] = []
        self.closed = False
        self.started_at = 0.0
        self._changed = anyio.Event()
        self._tasks: TaskSet | None = None
        self._feeders: TaskSet | None = None
        #: Set when the accelerator stops: worker threads call no more callbacks.
        self.stopping = stop_flag()
        self.input_limiter = new_limiter(stream_workers or 64)
        self.output_limiter = new_limiter(64)
        self._processors: dict[tuple[int, str], Processor] = {}

    # -- lifecycle ----------------------------------------------------------------------
    async def start(self) -> None:
        await self.device.open(self.dfp, self.group_id)
        self._tasks = TaskSet("memryx", self._on_internal_error)
        self._feeders = TaskSet("memryx-feed", self._on_internal_error)
        for model in self.dfp.models:
            # the collector holds one tag while it waits: the channel holds the rest
            lane = Lane(self, model, max(0, self.device.capacity(model.index) - 1))
            lane.pre = self._processors.get((model.index, "pre"))
            lane.post = self._processors.get((model.index, "post"))
            self.lanes.append(lane)
            self._tasks.spawn(lane.dispatch(self.device), f"dispatch-{model.index}")
            self._tasks.spawn(lane.collect(self.device), f"collect-{model.index}")
            self._tasks.spawn(lane.deliver(), f"deliver-{model.index}")
        self.started_at = time.monotonic()

    def notify(self) -> None:
        self._changed.set()
        self._changed = anyio.Event()

    def _on_internal_error(self, exc: BaseException) -> None:
        if self.fatal is None:
            self.fatal = exc
            log.debug("accelerator failed: %r", exc)
        for lane in self.lanes:
            lane.stop_feeding()
            for sink in list(lane.sinks):
                sink.fail(exc)
        self.notify()

    def record(self, exc: BaseException, where: str) -> None:
        """Keep a user-code error for ``wait()`` to re-raise."""
        exc.add_note(f"(raised by {where})")
        self.errors.append(exc)
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

    async def aclose(self) -> None:
        """Stop everything: no callback is called after this returns."""
        if self.closed:
            return
        self.closed = True
        self.stopping.set()
        self.notify()  # wait_done() returns: stopping ends the run
        for tasks in (self._feeders, self._tasks):
            if tasks is not None:
                await tasks.aclose()
        for lane in self.lanes:  # frames accepted and not delivered: dropped by the stop
            lane.dropped += lane.in_flight
        dropped = sum(lane.dropped for lane in self.lanes)
        closed = ClosedError(f"the accelerator was closed with {dropped} frame(s) in flight")
        for lane in self.lanes:
            for sink in list(lane.sinks):
                sink.fail(closed)
            lane.close_channels()
        await self.device.aclose()
        if dropped:
            log.info("closed with %d frame(s) in flight", dropped)
        self.notify()

    def set_processor(self, model_idx: int, role: str, proc: Processor) -> None:
        """Set the pre- (``role="pre"``) or post-processing step of a model."""
        self.check_open()
        self.dfp.model(model_idx)
        if self.lanes:
            lane = self.lanes[model_idx]
            busy = (lane.input_connected or lane.frames_in) if role == "pre" else \
                (lane.output is not None or lane.frames_in)
            if busy:
                raise UsageError(
                    f"set the {role}-processing model of model {model_idx} before connecting "
                    f"its {'input' if role == 'pre' else 'output'} or sending frames to it")
            setattr(lane, role, proc)
        self._processors[(model_idx, role)] = proc

    # -- callback mode --------------------------------------------------------------------
    def connect_input(self, model_idx: int, fn: Callable[..., Any], stream_count: int | None
                      ) -> None:
        """Start feeding ``model_idx`` from ``fn`` (``fn(stream_idx)`` when stream_count)."""
        lane = self.lane(model_idx)
        if lane.input_connected:
            raise UsageError(f"the input of model {model_idx} is already connected")
        if lane.sinks:
            raise UsageError(f"model {model_idx} is in use by run/send requests")
        assert self._feeders is not None
        lane.input_connected = True
        lane.sealed = True
        streams = range(stream_count) if stream_count is not None else [0]
        for stream in streams:
            args = (stream,) if stream_count is not None else ()
            lane.streams[stream] = Meter()
            end = lane.in_send.clone()
            lane.feeder_ends.append(end)  # closed at close even if the feeder never ran
            task = self._feeders.spawn(self._feed(lane, fn, args, stream, end),
                                       f"feed-{model_idx}-{stream}")
            lane.feeders.append(task)
        lane.in_send.close()

    def add_streams(self, model_idx: int, fn: Callable[..., Any], first: int, count: int
                    ) -> None:
        """Feed streams ``first .. first+count-1`` of ``model_idx`` from ``fn(stream_idx)``,
        beside the streams already connected (``connect_streams`` called again)."""
        lane = self.lane(model_idx)
        if not lane.streams:
            raise UsageError(f"model {model_idx} has no streams to add to")
        assert self._feeders is not None
        source = None
        for end in lane.feeder_ends:
            try:
                source = end.clone()
                break
            except (anyio.ClosedResourceError, anyio.BrokenResourceError):
                continue
        if source is None:
            raise UsageError(f"every stream of model {model_idx} has ended; its input is "
                             "closed, so no stream can be added (use a new accelerator)")
        with source:
            for stream in range(first, first + count):
                lane.streams[stream] = Meter()
                end = source.clone()
                lane.feeder_ends.append(end)
                task = self._feeders.spawn(self._feed(lane, fn, (stream,), stream, end),
                                           f"feed-{model_idx}-{stream}")
                lane.feeders.append(task)

    def connect_output(self, model_idx: int, fn: Callable[..., Any], with_stream_idx: bool
                       ) -> None:
        lane = self.lane(model_idx)
        if lane.output is not None:
            raise UsageError(f"the output of model {model_idx} is already connected")
        n = lane.n_outputs
        check_signature(fn, None if n is None else n + with_stream_idx,
                        f"the output callback of model {model_idx}")
        lane.output = _Output(fn, classify(fn), with_stream_idx)
        lane.output_set.set()

    async def _feed(self, lane: Lane, fn: Callable[..., Any], args: tuple[Any, ...],
                    stream: int, send_end: SendEnd[tuple[Tag, Frame]]) -> None:
        stats = lane.streams[stream]
        frames = frames_from(fn, args, lane.prepare, stopping=self.stopping, room=lane.room,
                             limiter=self.input_limiter,
                             prepare_blocks=lane.pre is not None and lane.pre.blocking,
                             on_drop=lambda n: lane.count_dropped_input(n, stats))
        async with send_end, aclosing(frames):
            try:
                while True:
                    asked = time.monotonic()
                    try:
                        frame = await anext(frames)
                    except StopAsyncIteration:
                        break
                    now = time.monotonic()
                    stats.input_s += now - asked
                    try:
                        await put(send_end, ((None, stream, now), frame))
                    except BaseException:  # stopped while waiting for room: count the frame
                        lane.count_dropped_input(1, stats)
                        raise
                    lane.count_in(stats)
            except Exception as exc:
                where = f"the input callback of model {lane.idx}"
                if args:
                    where += f", stream {stream}"
                self.record(exc, where)

    def unconnected(self) -> list[str]:
        missing = []
        for lane in self.lanes:
            if not lane.input_connected:
                missing.append(f"model {lane.idx} input")
            if lane.output is None:
                missing.append(f"model {lane.idx} output")
        return missing

    async def wait_done(self) -> None:
        """Wait until every model's streams have ended and all outputs are delivered."""
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
        while self.fatal is None and not self.closed and \
                not all(lane.done.is_set() for lane in self.lanes):
            await self._changed.wait()
        self.raise_errors()

    def reported(self, exc: BaseException) -> BaseException:
        """Note that ``exc`` reached a caller, so it is not raised again elsewhere."""
        self._reported.append(exc)
        return exc

    def raise_errors(self) -> None:
        """Re-raise the first failure nobody has seen yet, once (later ones as notes)."""
        errors = ([self.fatal] if self.fatal is not None else []) + self.errors
        errors = [e for e in errors if not any(e is r for r in self._reported)]
        self.errors = []
        if not errors:
            return
        self._reported.extend(errors)
        first = errors[0]
        for other in errors[1:]:
            first.add_note(f"also failed: {other!r}")
        raise first

    # -- request mode ----------------------------------------------------------------------
    def request_lane(self, model_idx: int) -> Lane:
        lane = self.lane(model_idx)
        if lane.sealed:
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
            for i, data in enumerate(frames):
                frame = await lane.aprepare(data)
                self.check_open()
                with self.closed_as_error():
                    await lane.in_send.send(((sink, i, time.monotonic()), frame))
                lane.count_in()
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
        bad_input: Exception | None = None

        async def produce() -> None:
            nonlocal submitted, bad_input
            try:
                source: AsyncIterator[Any] = (aiter(frames) if isinstance(frames, AsyncIterable)
                                              else _aiter_sync(frames))
                async for data in source:
                    check(data)
                    await sink.slots.acquire()
                    frame = await lane.aprepare(data)
                    self.check_open()
                    with self.closed_as_error():
                        await lane.in_send.send(((sink, submitted, time.monotonic()), frame))
                    lane.count_in()
                    submitted += 1
            except Exception as exc:
                bad_input = exc  # raised after the outputs of the frames before it
            sink.send_end.send_nowait(None)

        producer = asyncio.get_running_loop().create_task(produce(), name="memryx-astream")
        received = 0
        producer_done = False
        try:
            while not producer_done or received < submitted:
                try:
                    item = await sink.receive_end.receive()
                except anyio.EndOfStream:
                    raise (sink.error or ClosedError("the accelerator is closed")) from None
                if item is None:
                    producer_done = True
                else:
                    received += 1
                    sink.slots.release()
                    yield item
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
        """Queue one frame whose outputs go to ``sink`` (``nowait``: or raise WouldBlock)."""
        lane = self.request_lane(model_idx)
        frame = await lane.aprepare(data)
        lane.sinks.add(sink)
        with self.closed_as_error():
            if nowait:
                lane.in_send.send_nowait(((sink, 0, time.monotonic()), frame))
            else:
                await lane.in_send.send(((sink, 0, time.monotonic()), frame))
        lane.count_in()

    @contextlib.contextmanager
    def closed_as_error(self) -> Iterator[None]:
        """A lane channel closed under a submitter means the accelerator was closed."""
        try:
            yield
        except (anyio.ClosedResourceError, anyio.BrokenResourceError):
            raise (self.fatal or ClosedError("the accelerator was closed")) from None

    # -- statistics ---------------------------------------------------------------------------
    def statistics(self) -> dict[str, Any]:
        """Counters per model and per stream; see ``docs/api.md`` for every field."""
        elapsed = time.monotonic() - self.started_at if self.started_at else 0.0
        models = []
        for lane in self.lanes:
            entry = {"model_idx": lane.idx, "name": lane.model.name, **lane.meter.summary()}
            entry.update({
                "in_flight": lane.in_flight,
                "dropped": lane.dropped,
                "device_wait_s": lane.device_wait_s,
                "queues": {
                    "input": lane.in_send.statistics().current_buffer_used,
                    "on_device": lane.pending_count(),
                },
                "streams": {s: m.summary() for s, m in sorted(lane.streams.items())},
            })
            models.append(entry)
        return {"elapsed_s": elapsed, "models": models, "device": self.device.statistics()}


async def _aiter_sync(iterable: Iterable[Any]) -> AsyncIterator[Any]:
    for item in iterable:
        yield item
        await asyncio.sleep(0)
