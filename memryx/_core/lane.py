"""The lane: ONE in-order pipeline per model.

::

    submitters (input streams, run / send / astream)        budget: the one in-flight bound
        take budget units, lane.put(tags, frames)  ─►  [queued]  ─► flush (one per batch)
                                                                     │ device.submit(frames)
                                                                     ▼
                                           [(tags, future), ...]  in submission order
                                                                     │ collector awaits
                                                                     ▼ the oldest future
                           sinks: output callback, run / astream / receive  ─► budget back

A frame is admitted once its submitter holds a unit of the lane's
:class:`~.aio.Budget`; it is queued with its *tag* (who gets its outputs) and
a wake-up is scheduled for the batch (a frame costs an append). The flush hands
every queued frame to the device in one ``submit`` call per batch and keeps
``(tags, future)`` in order; the collector awaits the oldest future and hands
each output to its tag's sink. That is the only place outputs are paired with
frames. The unit comes back when the output reached its receiver (a callback
returned, a request stored it), so the budget bounds every frame between its
admission and its delivery.

**The frame budget** of a model is computed in :func:`frame_budget`, from the
device's queue depths (:class:`~memryx.device.base.Limits`): the frames it
buffers on the way in, those inside the chip, and the outputs it buffers on the
way out. With a source faster than the device the budget is full, so the
latency of a frame is about ``budget`` device frame times.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import threading
import weakref
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

from numpy.typing import NDArray

from .._trace import Tracer
from ..clock import clock_of
from .aio import Budget, TaskSet
from .lane_trace import LaneTracing
from .meter import Meter
from .processing import PortSpec, Processor, as_array_list, conform
from .runner import run_sync

if TYPE_CHECKING:
    from ..device.base import Device, Limits
    from ..dfp import ModelInfo

__all__ = ["MAX_FRAME_BUDGET", "Lane", "Meter", "Sink", "frame_budget"]

log = logging.getLogger("memryx.core")
Array = NDArray[Any]
Frame = list[Array]

#: The most frames one model may have in flight, whatever the device says (a DFP
#: compiled with an absurd latency must not hold gigabytes in flight).
MAX_FRAME_BUDGET = 256
#: The stream of request frames whose receiver cannot be weakly referenced.
SHARED_REQUEST_STREAM = -(1 << 62)

def frame_budget(limits: Limits) -> int:
    """THE in-flight bound of one model: frames between admission and delivery."""
    total = limits.in_queue + limits.in_chip + limits.out_queue
    return max(1, min(MAX_FRAME_BUDGET, total))


class Sink(Protocol):
    """Where a frame's outputs go (on the loop; must not block)."""

    def deliver(self, key: int, outputs: Frame) -> None: ...

    def fail(self, exc: BaseException) -> None: ...


#: Who gets a frame's outputs: (sink, or None for the output callback; key; admission time).
Tag = tuple[Sink | None, int, float]
#: A traced frame: (stream, frame number in its stream, when it was queued).
Traced = tuple[int, int, float]
#: An output for the output callback: (stream, outputs, admission time, ready time,
#: frame number when traced else -1).
Out = tuple[int, Frame, float, float, int]


class _HandOverChain:
    """The done-callback of the batch the collector waits for (:meth:`Lane._until_done`):
    hands that batch, and each one after it as it resolves, to a plain output callback's
    thread, and wakes the collector when one cannot go that way or nothing is left. An
    object, not a closure: a closure that registers itself refers to itself, a reference
    cycle that kept the lane and its device alive until a garbage collection."""

    __slots__ = ("armed", "lane", "waiter")

    def __init__(self, lane: Lane, waiter: asyncio.Future[None],
                 fut: asyncio.Future[list[Frame]]) -> None:
        self.lane = lane
        self.waiter = waiter
        self.armed = fut
        """The future this callback waits on now."""

    def __call__(self, resolved: asyncio.Future[list[Frame]]) -> None:
        waiter, lane = self.waiter, self.lane
        if waiter.done():
            return
        woken = False
        try:
            while lane._hand_over(resolved):
                inflight = lane._inflight
                if not inflight:
                    break
                resolved = inflight[0][1]
                if not resolved.done():  # the next batch: handed over as it resolves
                    self.armed = resolved
                    resolved.add_done_callback(self)
                    return
            woken = True
            waiter.set_result(None)
        finally:  # the collector wakes whatever happened (it reports errors)
            if not woken and not waiter.done() and self.armed.done():
                waiter.set_result(None)


class Lane(LaneTracing):
    """The pipeline of one model (module docstring); its tracing is in :mod:`.lane_trace`."""

    def __init__(self, model: ModelInfo, device: Device, limits: Limits,
                 on_fault: Callable[[BaseException], None]) -> None:
        self.model = model
        self.idx = model.index
        self.device = device
        #: What the lane's timestamps are read from: the device's clock (virtual in tests).
        self.now = clock_of(device).now
        self.limits = limits
        self.budget = Budget(frame_budget(limits))
        self.specs = tuple(PortSpec(self.idx, p.port, p.layer, p.shape, p.dtype)
                           for p in model.inputs)
        self.pre: Processor | None = None
        self.post: Processor | None = None
        self.meter = Meter()
        self.streams: dict[int, Meter] = {}
        self.sinks: set[Any] = set()
        self.dropped = 0
        """Frames admitted and never delivered (the output callback raised, or a stop)."""
        #: Guards the counts a producer thread changes after a stop (:meth:`lost_frames`),
        #: and the frames the output thread hands to a plain callback (``handed``, the
        #: meters' delivered frames), against the close's own count (``Engine.aclose``).
        self.count_lock = threading.Lock()
        self.closed_count: int | None = None
        """The frames the close counted dropped (None: not closed yet)."""
        self.device_wait_s = 0.0
        self.callback_sink: Any = None  # the output callback's deliverer, when connected
        self.handed = 0
        """Outputs handed to the output callback (counted when it is called)."""
        self._on_fault = on_fault
        self._loop = asyncio.get_running_loop()
        self._queued_tags: list[Tag] = []
        self._queued: list[Frame] = []
        self._flush_handle: asyncio.Handle | None = None
        self._inflight: deque[tuple[list[Tag], asyncio.Future[list[Frame]]]] = deque()
        self._wake: asyncio.Future[None] | None = None
        self._output_set: asyncio.Future[None] | None = None
        self._closed = False
        #: The accelerator's tracer (one for its life; ``tracer.on`` is the hot path's check).
        self.tracer: Tracer = Tracer.off()
        # Traced frames queued, and per batch on the device: the tail of each batch (frames
        # put after tracing started), so a trace started mid-run pairs every frame right.
        self._traced: list[Traced] = []
        self._traced_flight: deque[tuple[asyncio.Future[list[Frame]], list[Traced], float,
                                         list[float]]] = deque()
        # Devices that tell streams apart (``takes_streams``) get each frame's stream: the
        # callback stream's index, or for requests a number < 0 per receiver (run call,
        # astream, send/receive), kept as long as the receiver lives.
        self._takes_streams = bool(getattr(device, "takes_streams", False))
        # Devices that ``takes_ready`` get when the batch's last frame was ready (put_many).
        self._takes_ready = bool(getattr(device, "takes_ready", False))
        # Devices with a ``frame_taker`` take checked frames themselves instead of the copy
        # (most of a fast model's frames are never read again in the modes that compute
        # little: see memryx.device._taking).
        taker = getattr(device, "frame_taker", None)
        self._take: Callable[[Frame, int | None], Frame] | None = \
            taker(self.idx) if taker is not None else None
        self._ready = -math.inf
        self._request_streams: weakref.WeakKeyDictionary[Any, int] = \
            weakref.WeakKeyDictionary()
        self._next_request_stream = itertools.count(-1, -1)

    def start(self, tasks: TaskSet) -> None:
        tasks.spawn(self._collect(), f"collect-{self.idx}")

    # -- numbers ---------------------------------------------------------------------------
    @property
    def frames_in(self) -> int:
        return self.meter.frames_in

    @property
    def delivered(self) -> int:
        """Frames whose outputs reached their receiver (a callback still running when the
        accelerator stopped was handed its frame: that counts)."""
        return max(self.meter.frames_out, self.handed)

    @property
    def in_flight(self) -> int:
        """Frames admitted and neither delivered nor dropped."""
        return max(0, self.meter.frames_in - self.delivered - self.dropped)

    @property
    def queued_count(self) -> int:
        return len(self._queued)

    @property
    def on_device_count(self) -> int:
        # a C-level copy first: statistics() may read this on another thread than the loop's
        return sum(len(tags) for tags, _ in tuple(self._inflight))

    @property
    def n_outputs(self) -> int | None:
        return len(self.model.outputs) if self.post is None else self.post.n_outputs

    def stream_meter(self, stream: int) -> Meter:
        meter = self.streams.get(stream)
        if meter is None:
            meter = self.streams[stream] = Meter()
        return meter

    def lost_frames(self, stream: Meter | None, n: int = 1) -> None:
        """Input callbacks returned ``n`` frames after their stream was abandoned (a stop;
        on a producer thread, or on the loop for frames left in a producer's channel).
        They came in and are dropped; if the close has already counted the dropped frames
        (and logged them), these are logged on their own."""
        with self.count_lock:
            self.meter.frames_in += n
            if stream is not None:
                stream.frames_in += n
            self.dropped += n
            late = self.closed_count is not None
        if late:
            log.info("dropped %d frame(s) input callbacks of model %d returned after the "
                     "close", n, self.idx)

    def count_at_close(self) -> int:
        """On the loop, at the close: every frame admitted and not delivered is dropped;
        the lane's dropped frames so far."""
        with self.count_lock:
            self.dropped += self.in_flight
            self.closed_count = self.dropped
            return self.dropped

    # -- pre- and post-processing: the one place they run ----------------------------------------
    def user_specs(self) -> tuple[PortSpec, ...] | None:
        """What user frames are checked against (None: a Python pre-processor decides)."""
        return self.specs if self.pre is None else self.pre.input_specs

    def check(self, data: Any) -> None:
        """Validate one user frame without copying it (for whole batches up front)."""
        specs = self.user_specs()
        if specs is not None:
            conform(data, specs, copy=False)

    def prepare(self, data: Any, stream: int | None = None) -> Frame:
        """A user frame -> device-ready arrays (pre-processing, checks, and private copies,
        or what the device's ``frame_taker`` keeps instead; ``stream``: the frame's
        callback stream, None if not known yet)."""
        take = self._take
        if self.pre is None:
            if take is None:
                return conform(data, self.specs)
            return take(conform(data, self.specs, copy=False), stream)
        specs = self.pre.input_specs
        if specs is not None:
            arrays = conform(data, specs, copy=False)
        else:
            arrays = as_array_list(data, len(self.specs), self.idx, "frame") \
                if not hasattr(data, "shape") else [data]
        if take is None:
            return conform(self.pre(arrays), self.specs, "pre-processing output")
        return take(conform(self.pre(arrays), self.specs, "pre-processing output",
                            copy=False), stream)

    @property
    def prepare_blocks(self) -> bool:
        return self.pre is not None and self.pre.blocking

    async def aprepare_many(self, items: list[Any]) -> list[Frame]:
        """``prepare`` for several frames on the loop, or in one thread hop if it blocks."""
        if self.prepare_blocks:
            return await run_sync(lambda: [self.prepare(d) for d in items])
        return [self.prepare(d) for d in items]

    def finish(self, outputs: Frame) -> Frame:
        return outputs if self.post is None else self.post(outputs)

    @property
    def finish_blocks(self) -> bool:
        return self.post is not None and self.post.blocking

    # -- frames in -----------------------------------------------------------------------------
    def put(self, tag: Tag, frame: Frame, stream: Meter | None = None,
            ready: float | None = None) -> None:
        """Queue one admitted frame (its budget unit is held by the caller); ``ready``:
        when it was ready for the device (default: now), see :meth:`put_many`."""
        if self.tracer.on:
            self._trace_put((tag,), stream)
        ready = self.now() if ready is None else ready
        if ready > self._ready:
            self._ready = ready
        self._queued_tags.append(tag)
        self._queued.append(frame)
        self.meter.frames_in += 1
        if stream is not None:
            stream.frames_in += 1
        if self._flush_handle is None:
            self._flush_handle = self._loop.call_soon(self._flush)

    def put_many(self, tags: list[Tag], frames: list[Frame], stream: Meter | None = None,
                 ready: float | None = None) -> None:
        """Queue admitted frames. ``ready`` is when the last of them was ready for the
        device (default: now): when its pre-processing ended, or without pre-processing
        when its input callback returned, on whichever thread. A device that
        ``takes_ready`` counts their latency from then, so the runtime's own hand-over to
        the device (its checks and copy, a thread switch, a loop iteration) is inside the
        modeled latency, as the transfer to a real chip is inside its measured one."""
        ready = self.now() if ready is None else ready
        if ready > self._ready:
            self._ready = ready
        if self.tracer.on:
            self._trace_put(tags, stream)
        self._queued_tags.extend(tags)
        self._queued.extend(frames)
        self.meter.frames_in += len(frames)
        if stream is not None:
            stream.frames_in += len(frames)
        if self._flush_handle is None:
            self._flush_handle = self._loop.call_soon(self._flush)

    def flush_now(self) -> None:
        """Hand what is queued to the device now, not on the next loop iteration: for a
        submitter that has just queued a whole batch (it took every frame that was ready)
        and has nothing to wait for."""
        handle = self._flush_handle
        if handle is not None:
            handle.cancel()
            self._flush()

    def _flush(self) -> None:
        """Hand the queued frames to the device: one ``submit`` per batch."""
        self._flush_handle = None
        if self._closed or not self._queued:
            return
        tags, frames = self._queued_tags, self._queued
        self._queued_tags, self._queued = [], []
        options: dict[str, Any] = {}
        if self._takes_ready:
            options["ready"] = self._ready
        self._ready = -math.inf
        traced = None
        if self._traced:
            traced, self._traced = self._traced, []
        limit = max(1, self.limits.batch)
        try:
            for i in range(0, len(frames), limit):
                if self._takes_streams:
                    options["streams"] = self._streams_of(tags[i:i + limit])
                fut = self.device.submit(self.idx, frames[i:i + limit],
                                         **options)
                self._inflight.append((tags[i:i + limit], fut))
                if traced is not None:
                    self._trace_submit(fut, traced, len(frames), i, min(len(frames), i + limit))
        except BaseException as exc:  # a device that cannot take frames any more
            self._on_fault(exc)
            return
        wake = self._wake
        if wake is not None and not wake.done():
            wake.set_result(None)

    def _streams_of(self, tags: list[Tag]) -> list[int]:
        """The stream of each frame, for a device that tells them apart."""
        out = []
        for sink, key, _ in tags:
            if sink is None:
                out.append(key)
                continue
            try:
                tag = self._request_streams.get(sink)
                if tag is None:
                    tag = self._request_streams[sink] = next(self._next_request_stream)
            except TypeError:  # a receiver that cannot be weakly referenced: one shared stream
                tag = SHARED_REQUEST_STREAM
            out.append(tag)
        return out

    # -- frames out ----------------------------------------------------------------------------
    async def _collect(self) -> None:
        """Await the oldest batch's future, hand each output to its sink, in order."""
        inflight = self._inflight
        while True:
            if not inflight:
                self._wake = self._loop.create_future()
                try:
                    await self._wake
                finally:
                    self._wake = None
                continue
            tags, fut = inflight[0]
            if not fut.done():
                waiting = self.now()
                await self._until_done(fut)
                self.device_wait_s += self.now() - waiting
                if not inflight or inflight[0][1] is not fut:
                    continue  # handed over to the output thread as it resolved
            inflight.popleft()
            outputs = fut.result()  # a device fault raises: the task set reports it
            ready = self.now()
            traced = None
            if self._traced_flight and self._traced_flight[0][0] is fut:
                traced = self._trace_device(ready)
            await self._deliver(tags, outputs, ready, traced)

    async def _until_done(self, fut: asyncio.Future[list[Frame]]) -> None:
        """Wait for ``fut`` without awaiting it: our cancellation is not its (what
        ``asyncio.wait((fut,))`` does, without its set, timeout and bookkeeping).

        Outputs for a plain output callback are handed over as ``fut`` resolves, and so
        are those of the batches after it, each as it resolves, without waking the
        collector: it wakes when a batch cannot be handed over that way (requests,
        ``async def`` callbacks, a fault, tracing) or nothing is left on the device (a
        task switch and a waiter per batch fewer, about one batch in six frames of a fast
        paced model)."""
        waiter: asyncio.Future[None] = self._loop.create_future()
        chain = _HandOverChain(self, waiter, fut)
        fut.add_done_callback(chain)
        try:
            await waiter
        finally:
            chain.armed.remove_done_callback(chain)

    def _hand_over(self, fut: asyncio.Future[list[Frame]]) -> bool:
        """The oldest batch ``fut`` resolved: when all its frames go to a plain output
        callback, hand them to that callback's thread right here, in the future's own
        callback (one loop iteration and a task switch fewer than through the collector);
        anything else (requests, ``async def`` callbacks, a fault, tracing) is left to it.
        True when handed over."""
        inflight, sink = self._inflight, self.callback_sink
        if (not inflight or inflight[0][1] is not fut or fut.cancelled()
                or fut.exception() is not None or not getattr(sink, "hands_over_now", False)
                or (self._traced_flight and self._traced_flight[0][0] is fut)):
            return False
        tags = inflight[0][0]
        outputs = fut.result()
        if len(outputs) != len(tags) or any(sink_ is not None for sink_, _, _ in tags):
            return False
        inflight.popleft()
        ready = self.now()
        sink.deliver_now([(key, outs, t0, ready, -1)
                          for (_, key, t0), outs in zip(tags, outputs, strict=True)])
        return True

    async def _deliver(self, tags: list[Tag], outputs: list[Frame], ready: float,
                       traced: list[Traced] | None = None) -> None:
        callback: list[Out] = []
        requests: list[tuple[Sink, int, float, Frame]] = []
        numbers: list[int] | None = None  # of the requests, when traced
        if traced is None:
            for (sink, key, t0), outs in zip(tags, outputs, strict=True):
                if sink is None:
                    callback.append((key, outs, t0, ready, -1))
                else:
                    requests.append((sink, key, t0, outs))
        else:
            numbers = []
            ks = [-1] * (len(tags) - len(traced)) + [k for _, k, _ in traced]
            for (sink, key, t0), outs, k in zip(tags, outputs, ks, strict=True):
                if sink is None:
                    callback.append((key, outs, t0, ready, k))
                else:
                    requests.append((sink, key, t0, outs))
                    numbers.append(k)
        if requests:
            finished: list[Frame | BaseException]
            if self.post is not None:
                finished = await run_sync(self._finish_all, requests, numbers) \
                    if self.finish_blocks else self._finish_all(requests, numbers)
            else:
                finished = [outs for _, _, _, outs in requests]
            meter = self.meter
            for (sink, key, t0, _), result in zip(requests, finished, strict=True):
                if isinstance(result, BaseException):
                    sink.fail(result)
                else:
                    sink.deliver(key, result)
                meter.delivered(t0, ready)
            self.meter.output_s += self.now() - ready
            self.budget.give(len(requests))
        if callback:
            while self.callback_sink is None:  # input connected first: wait for the output
                self._output_set = self._loop.create_future()
                await self._output_set
            await self.callback_sink.deliver(callback)

    def set_callback_sink(self, sink: Any) -> None:
        self.callback_sink = sink
        if self._output_set is not None and not self._output_set.done():
            self._output_set.set_result(None)

    def _finish_all(self, requests: list[tuple[Sink, int, float, Frame]],
                    numbers: list[int] | None = None) -> list[Frame | BaseException]:
        results: list[Frame | BaseException] = []
        for n, (_, _, _, outs) in enumerate(requests):
            started = self.now() if numbers is not None else 0.0
            try:
                results.append(self.finish(outs))
            except Exception as exc:
                results.append(exc)
            if numbers is not None and numbers[n] >= 0:
                self.tracer.frame(0, self.idx, "post-processing", started, self.now(),
                                  numbers[n])
        return results

    def drop_queued(self) -> int:
        """At a stop: forget frames not yet handed over (their units are not given back)."""
        n = len(self._queued) + sum(len(t) for t, _ in self._inflight)
        self._queued_tags, self._queued = [], []
        self._inflight.clear()
        self._traced, self._traced_flight = [], deque()
        return n

    def close(self) -> None:
        self._closed = True
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
