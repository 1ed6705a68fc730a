"""User callbacks: signature checks, input streams that feed a lane, output delivery.

A callback is classified once, at connect time:

* a plain function (or generator function) runs on a persistent thread: one per
  input callback (the streams of ``MultiStreamAsyncAccl`` share a pool of them,
  see :mod:`.streams`), one per output callback; never on the loop thread;
* an ``async def`` function or async generator function runs on the loop;
  ``functools.partial`` objects and callable objects whose ``__call__`` is
  ``async def`` count as ``async def``.

Input callbacks end their stream by returning ``None``, by raising
``StopIteration`` (also inside an ``async def`` callback, where Python turns it
into ``RuntimeError``), by being an exhausted generator, or by raising any other
exception, which is also recorded for ``wait()`` to re-raise (as itself, even a
``BaseException`` such as ``KeyboardInterrupt``).

Hops of a frame from a sync input callback to a sync output callback: the
stream's thread calls the callback and prepares the frame, the loop takes the
ready frames in one wake-up and queues them in the lane (an append each), the
device answers the batch with one future, the collector hands the outputs to
the output thread in one put, and that thread reports the batch done in one
wake-up. Both threads keep running while the loop works.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import functools
import inspect
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from numpy import ndarray

from .._exceptions import CallbackSignatureError, UsageError
from ..clock import clock_of
from .aio import END, ChannelClosed
from .lane import Lane, Meter, Out
from .runner import run_sync
from .workers import ThreadConsumer, ThreadProducer

if TYPE_CHECKING:
    from .engine import Engine

__all__ = ["END", "CallbackKind", "CallbackOutput", "check_output_kind", "check_signature",
           "classify", "feed"]

#: The most outputs handed to a sync output callback's thread in one batch.
OUTPUT_BATCH = 64


class CallbackKind(enum.Enum):
    SYNC = "function"
    GENERATOR = "generator function"
    ASYNC = "async function"
    ASYNC_GENERATOR = "async generator function"


def _targets(fn: Any) -> list[Any]:
    """``fn`` and what it calls through: partials' functions, objects' ``__call__``."""
    found: list[Any] = []
    seen = 0
    while fn is not None and seen < 16:
        seen += 1
        found.append(fn)
        if isinstance(fn, (functools.partial, functools.partialmethod)):
            fn = fn.func
        elif not (inspect.isfunction(fn) or inspect.ismethod(fn) or inspect.isbuiltin(fn)
                  or isinstance(fn, type)):
            call = getattr(type(fn), "__call__", None)  # noqa: B004 - callable objects
            fn = getattr(fn, "__call__", None) if call is not None else None  # noqa: B004
            if fn is not None and fn in found:
                break
        else:
            break
    return found


def classify(fn: Callable[..., Any]) -> CallbackKind:
    targets = _targets(fn)
    if any(inspect.isasyncgenfunction(t) for t in targets):
        return CallbackKind.ASYNC_GENERATOR
    if any(inspect.iscoroutinefunction(t) for t in targets):
        return CallbackKind.ASYNC
    if any(inspect.isgeneratorfunction(t) for t in targets):
        return CallbackKind.GENERATOR
    return CallbackKind.SYNC


def check_output_kind(fn: Any, role: str) -> None:
    """Refuse a generator function (plain or async) as an output callback: calling one runs
    none of its body, so every output would be dropped without a word."""
    kind = classify(fn) if callable(fn) else CallbackKind.SYNC
    if kind in (CallbackKind.GENERATOR, CallbackKind.ASYNC_GENERATOR):
        what = "an async generator" if kind is CallbackKind.ASYNC_GENERATOR else "a generator"
        raise CallbackSignatureError(
            f"{role} {getattr(fn, '__qualname__', fn)!r} is {what} function: calling it would "
            f"run none of its body (it only makes a generator), so every output would be "
            f"lost; use `return` instead of `yield` (or `async def` without `yield`)")


def check_signature(fn: Any, n_args: int | None, role: str) -> None:
    """Check that ``fn`` can be called with ``n_args`` positional arguments.

    ``n_args=None`` only checks that ``fn`` is callable.
    """
    if not callable(fn):
        raise CallbackSignatureError(f"{role} must be callable, got {type(fn).__name__}")
    if n_args is None:
        return
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):  # builtins without a signature: trust them
        return
    try:
        sig.bind(*([None] * n_args))
    except TypeError:
        params = ", ".join(str(p) for p in sig.parameters.values()) or "no parameters"
        plural = "argument" if n_args == 1 else "arguments"
        raise CallbackSignatureError(
            f"{role} {getattr(fn, '__qualname__', fn)!r} is called with {n_args} positional "
            f"{plural}, but its signature is ({params})"
        ) from None


def _not_awaited(result: Any, role: str) -> None:
    """A callback classified as plain returned a coroutine: refuse it loudly."""
    if inspect.isawaitable(result):
        if inspect.iscoroutine(result):
            result.close()
        raise UsageError(
            f"{role} returned an awaitable, but it was not recognised as `async def`; "
            "make it an `async def` function (or a functools.partial of one)")


def _stop_iteration(exc: BaseException) -> bool:
    """``StopIteration`` raised inside a coroutine arrives as ``RuntimeError`` (PEP 479)."""
    return isinstance(exc, RuntimeError) and isinstance(exc.__cause__, StopIteration)


# -- input ------------------------------------------------------------------------------------
async def feed(engine: Engine, lane: Lane, fn: Callable[..., Any], args: tuple[Any, ...],
               stream: int, share: int, role: str) -> None:
    """Feed ``lane`` from input callback ``fn(*args)`` until its stream ends.

    Errors the callback raises are recorded for ``wait()``; this coroutine only
    raises its own cancellation.
    """
    meter = lane.stream_meter(stream)
    kind = classify(fn)
    try:
        if kind in (CallbackKind.SYNC, CallbackKind.GENERATOR):
            await _feed_from_thread(engine, lane, fn, args, stream, meter, share, kind, role)
        else:
            await _feed_on_loop(lane, fn, args, stream, meter, share, kind, role)
    except asyncio.CancelledError as exc:
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            raise  # we were stopped
        engine.record(exc, role)  # raised by the callback itself
    except BaseException as exc:
        if not (engine.closed or exc is engine.fatal):  # else: not the callback's doing
            engine.record(exc, role)
    finally:
        engine.stream_ended(lane)


def make_producer(lane: Lane, fn: Callable[..., Any], args: tuple[Any, ...], meter: Meter,
                  kind: CallbackKind, role: str, stream: int | None = None
                  ) -> tuple[Callable[[], Any], Any]:
    """``(produce, generator or None)``: ``produce()`` runs on a thread, calls the input
    callback once and returns the prepared frame, or :data:`END`.

    A frame from the thread is ``(frame, callback returned, ready)`` (*ready*: the time
    the device counts its latency from, see :meth:`.lane.Lane.put_many`: when the
    pre-processing ended, or without one when the callback returned), and when traced
    also ``callback called``; the loop numbers and records them as it queues them.
    """
    prepare, tracer, now = lane.prepare, lane.tracer, lane.now

    def ready(item: Any, t: float, done: float) -> Any:
        frame = prepare(item, stream)
        if tracer.on:
            return frame, done, now(), t
        return frame, done, done if lane.pre is None else now()

    if kind is CallbackKind.GENERATOR:
        gen = fn(*args)

        def produce_next() -> Any:
            t = lane.now()
            item = next(gen, END)
            done = lane.now()
            meter.input_s += done - t
            if item is None or item is END:
                return END
            return ready(item, t, done)

        return produce_next, gen

    def produce() -> Any:
        t = lane.now()
        try:
            item = fn(*args)
        except StopIteration:
            return END
        done = lane.now()
        meter.input_s += done - t
        if item is None:
            return END
        if type(item) is not ndarray:  # (an array is no awaitable: the common case, quickly)
            _not_awaited(item, role)
        return ready(item, t, done)

    return produce, None


async def _feed_from_thread(engine: Engine, lane: Lane, fn: Callable[..., Any],
                            args: tuple[Any, ...], stream: int, meter: Meter, share: int,
                            kind: CallbackKind, role: str) -> None:
    tracer = lane.tracer
    produce, gen = make_producer(lane, fn, args, meter, kind, role, stream)

    def lost() -> None:
        """On the thread: a frame returned after the stream was abandoned (a stop)."""
        lane.lost_frames(meter)

    budget = lane.budget
    producer: ThreadProducer[tuple[Any, ...]] = ThreadProducer(
        f"memryx-input-{lane.idx}-{stream}", produce, budget.total, engine.stopping,
        gate=engine.input_gate, on_lost=lost)
    outstanding = 0  # units granted to the thread and not come back as frames
    try:
        while True:
            if outstanding == 0:
                got = await budget.take(share)
            else:
                got = budget.take_nowait(share - outstanding) if outstanding < share else 0
            if got:
                outstanding += got
                producer.grant(got)
            try:
                batch = await producer.items.get(budget.total)
            except ChannelClosed:
                break
            outstanding -= len(batch)
            if tracer.on:
                _trace_inputs(lane, stream, meter.frames_in, batch)
            lane.put_many([(None, stream, item[1]) for item in batch],
                          [item[0] for item in batch], meter, batch[-1][2])
            lane.flush_now()  # everything that was ready is in: no iteration to wait for
    finally:
        producer.halt()
        left = producer.items.abort()  # made after we stopped listening: never sent
        if left:
            lane.lost_frames(meter, left)
        budget.give(outstanding)  # frames left in the channel held units too
        if gen is not None and inspect.getgeneratorstate(gen) != "GEN_RUNNING":
            with contextlib.suppress(Exception):
                gen.close()  # a generator still running on an abandoned thread is left to it
    if producer.error is not None:
        raise producer.error


async def _feed_on_loop(lane: Lane, fn: Callable[..., Any], args: tuple[Any, ...], stream: int,
                        meter: Meter, share: int, kind: CallbackKind, role: str) -> None:
    agen = fn(*args) if kind is CallbackKind.ASYNC_GENERATOR else None
    budget, tracer = lane.budget, lane.tracer
    prepare, blocks = lane.prepare, lane.prepare_blocks  # fixed once the input is connected
    try:
        while True:
            got = await budget.take(share)
            used = 0
            try:
                while used < got:
                    t = lane.now()
                    try:
                        item = await (anext(agen) if agen is not None else fn(*args))
                    except (StopAsyncIteration, StopIteration):
                        return
                    except RuntimeError as exc:
                        if _stop_iteration(exc):
                            return
                        raise
                    done = lane.now()
                    meter.input_s += done - t
                    if item is None:
                        return
                    frame = (await run_sync(prepare, item, stream)) if blocks \
                        else prepare(item, stream)
                    if tracer.on:
                        k = meter.frames_in
                        tracer.frame(stream, lane.idx, "input callback", t, done, k)
                        tracer.frame(stream, lane.idx, "pre-processing", done, lane.now(),
                                     k)
                    lane.put((None, stream, done), frame, meter,
                             done if lane.pre is None else lane.now())
                    used += 1
            finally:
                budget.give(got - used)
    finally:
        if agen is not None:
            await agen.aclose()


# -- output -----------------------------------------------------------------------------------
class CallbackOutput:
    """Hands a lane's outputs to its output callback, in order.

    A plain callback runs on its own persistent thread, fed in batches; an
    ``async def`` one is awaited on the loop. After the callback raised, it is
    not called again and later outputs are dropped (counted).
    """

    def __init__(self, engine: Engine, lane: Lane, fn: Callable[..., Any],
                 with_stream_idx: bool) -> None:
        # weakly: the engine holds this (``_outputs``), and so does its lane (callback_sink);
        # a strong reference back made a cycle that kept a closed accelerator's device until
        # a full garbage collection. A collected engine reads as closed.
        self._engine: Callable[[], Engine | None] = weakref.ref(engine)
        self._stopping = engine.stopping
        self.lane = lane
        self.fn = fn
        self.kind = classify(fn)
        self.with_stream_idx = with_stream_idx
        self.failed = False
        self.role = f"the output callback of model {lane.idx}"
        self._consumer: ThreadConsumer[Out] | None = None
        self._clock = clock_of(lane.device)
        self._held = 0
        """Virtual clock: outputs on the output thread, during which time stands still."""

    def start(self) -> None:
        if self.kind in (CallbackKind.SYNC, CallbackKind.GENERATOR):
            consume: Callable[[list[Out]], Any] = self._call_batch
            done: Callable[[Any], None] = self._batch_done
            if self._clock.virtual:  # the thread's outputs count as work in progress
                def consume(batch: list[Out]) -> Any:
                    return self._call_batch(batch), len(batch)

                def done(report: tuple[list[Any], int]) -> None:
                    self._unhold(report[1])
                    self._batch_done(report[0])
            self._consumer = ThreadConsumer(
                f"memryx-output-{self.lane.idx}", consume, done,
                self.lane.budget.total, self._stopping, OUTPUT_BATCH)

    def _unhold(self, n: int) -> None:
        if self._held <= 0:
            return
        self._held -= n
        if self._held <= 0:
            self._held = 0
            self._clock.release()

    @property
    def hands_over_now(self) -> bool:
        """Whether :meth:`deliver_now` takes outputs (a plain callback, on its thread)."""
        return self._consumer is not None

    def deliver_now(self, items: list[Out]) -> None:
        """On the loop, for a plain callback: hand outputs of one device batch, in order,
        to the callback's thread (never waits; the frame budget bounds them)."""
        if self.failed or self._engine_closed() or self._consumer is None:
            self._drop(len(items))
            return
        try:
            self._consumer.items.put_many_nowait(items)
        except ChannelClosed:
            self._drop(len(items))
            return
        if self._clock.virtual:
            if not self._held:
                self._clock.hold()
            self._held += len(items)

    async def deliver(self, items: list[Out]) -> None:
        """On the loop: outputs of one device batch, in order."""
        if self._consumer is not None:
            self.deliver_now(items)
            return
        if self.failed or self._engine_closed():
            self._drop(len(items))
            return
        lane = self.lane
        model, meters = lane.meter, lane.streams
        fn, with_idx, finish, blocks = self.fn, self.with_stream_idx, lane.finish, \
            lane.finish_blocks
        tracer = lane.tracer
        done = 0
        started = lane.now()  # each frame's hand-over starts where the last one ended
        try:
            for n, item in enumerate(items):
                if self.failed or self._engine_closed():
                    self._drop(len(items) - n)
                    return
                stream, outputs, t0, ready, k = item
                lane.handed += 1  # delivered from here on: counted now, as a close
                meter = meters.get(stream) or lane.stream_meter(stream)  # during the
                model.delivered(t0, ready)  # callback's awaits cancels what follows
                meter.delivered(t0, ready)
                try:
                    res = (await run_sync(finish, outputs)) if blocks else finish(outputs)
                    if k >= 0:  # traced
                        called = lane.now()
                    await fn(*((stream, *res) if with_idx else res))
                    if k >= 0 and tracer.on:
                        _trace_out(tracer, stream, lane.idx, k, started, called, lane.now())
                except asyncio.CancelledError as exc:
                    task = asyncio.current_task()
                    if task is not None and task.cancelling():
                        raise
                    now = lane.now()
                    self._done_one(item, exc, started, now)
                    started = now
                    continue
                except BaseException as exc:
                    now = lane.now()
                    self._done_one(item, exc, started, now)
                    started = now
                    continue
                now = lane.now()
                spent = now - started
                started = now
                meter.output_s += spent
                model.output_s += spent
                done += 1
        finally:
            if done:
                lane.budget.give(done)
                self._progress()

    def _call_batch(self, batch: list[Out]
                    ) -> list[tuple[Out, BaseException | None, float, float]]:
        """On the output thread: post-process and call back each output of ``batch``;
        report each with the time its own callback (and post-processing) started and ended."""
        report: list[tuple[Out, BaseException | None, float, float]] = []
        stopping = self._stopping
        fn, with_idx, finish = self.fn, self.with_stream_idx, self.lane.finish
        lane = self.lane
        tracer, model, now, count_lock = lane.tracer, lane.idx, lane.now, lane.count_lock
        started = now()  # each output's hand-over starts where the one before ended
        for item in batch:
            stream, outputs, t0, ready, k = item
            with count_lock:  # a close counts the frames in flight under it: counted once
                if stopping.is_set() or self.failed:
                    break  # stopped: no callback after stop() returns
                lane.handed += 1  # from here on the frame is the callback's: delivered
                # (counted now, not in the loop's report of the batch: a close in the
                # middle of the batch may leave no loop to take it)
                lane.meter.delivered(t0, ready)
                (lane.streams.get(stream) or lane.stream_meter(stream)).delivered(t0, ready)
            try:
                res = finish(outputs)
                if k >= 0:  # traced
                    called = now()
                result = fn(*((stream, *res) if with_idx else res))
                if result is not None:
                    _not_awaited(result, self.role)
                if k >= 0 and tracer.on:
                    _trace_out(tracer, stream, model, k, started, called, now())
            except BaseException as exc:
                self.failed = True
                report.append((item, exc, started, now()))
                break  # the callback raised: it is not called again
            ended = now()
            report.append((item, None, started, ended))
            started = ended
        if report:
            with count_lock:
                self._count_spent(report)
        if len(report) < len(batch):
            report.append(((-1, [], 0.0, 0.0, -1), None, 0.0,
                           float(len(batch) - len(report))))
        return report

    def _count_spent(self, report: list[Any]) -> None:
        """On the output thread, under the count lock: the time the callbacks of
        ``report`` took, per stream (their frames were counted as they were handed)."""
        lane = self.lane
        meters = lane.streams
        spent = 0.0
        for item, _error, started, finished in report:
            meter = meters.get(item[0]) or lane.stream_meter(item[0])
            meter.output_s += finished - started
            spent += finished - started
        lane.meter.output_s += spent

    def _batch_done(self, report: list[Any]) -> None:
        """On the loop: a batch the output thread finished (one wake-up, counted by the
        thread): the budget is given back once, a callback's error recorded."""
        done = 0
        for item, error, _started, finished in report:
            if item[0] == -1:  # not called: dropped
                self._drop(int(finished))
            elif error is not None:
                self.lane.budget.give(1)
                self._fail(item[0], error)
            else:
                done += 1
        if done:
            self.lane.budget.give(done)
        self._progress()

    def _done_one(self, item: Out, error: BaseException | None,
                  started: float, finished: float) -> None:
        """An output the async callback got (counted delivered as it was handed over)
        is done, ``error`` what the callback raised."""
        stream = item[0]
        lane = self.lane
        lane.stream_meter(stream).output_s += finished - started
        lane.meter.output_s += finished - started
        lane.budget.give(1)
        if error is not None:
            self._fail(stream, error)
        self._progress()

    def _fail(self, stream: int, error: BaseException) -> None:
        """The output callback raised ``error`` for a frame of ``stream``: it is not
        called again; ``wait()`` raises it."""
        where = self.role + (f", stream {stream}" if self.with_stream_idx else "")
        self.failed = True
        engine = self._engine()
        if engine is not None:
            engine.record(error, where)
            engine.stop_feeding(self.lane)

    def _drop(self, n: int) -> None:
        # Once the accelerator closes, its close owns the fate of every frame not delivered:
        # Engine.aclose counts them dropped as in flight. A drop seen here from then on (the
        # output thread's report of a batch it stopped calling back, which may come after
        # the close) is one of those frames: counting it too would count it twice.
        if not self._engine_closed():
            self.lane.dropped += n
        self.lane.budget.give(n)
        self._progress()

    def _engine_closed(self) -> bool:
        engine = self._engine()
        return engine is None or engine.closed

    def _progress(self) -> None:
        engine = self._engine()
        if engine is not None:
            engine.lane_progress(self.lane)

    @property
    def handed(self) -> int:
        """Outputs handed to the callback (counted when it is called)."""
        return self.lane.handed

    def close(self) -> None:
        consumer, self._consumer = self._consumer, None  # its thread keeps it while it ends
        if consumer is not None:
            consumer.items.abort()  # counted by the engine as in flight at the stop
        self._unhold(self._held)
        # no lane <-> deliverer cycle once closed (the count of handed outputs is the lane's)
        if self.lane.callback_sink is self:
            self.lane.callback_sink = None


def _trace_inputs(lane: Lane, stream: int, first: int, batch: list[tuple[Any, ...]]) -> None:
    """Record the input callback and pre-processing of thread-made frames about to be
    queued, numbered from ``first`` (frames made before tracing started have no times)."""
    tracer, model = lane.tracer, lane.idx
    for k, item in enumerate(batch, first):
        if len(item) == 4:
            _, done, prepared, called = item
            tracer.frame(stream, model, "input callback", called, done, k)
            tracer.frame(stream, model, "pre-processing", done, prepared, k)


def _trace_out(tracer: Any, stream: int, model: int, k: int, started: float, called: float,
               ended: float) -> None:
    """Record a traced frame's last two stages: post-processing, then the output callback."""
    tracer.frame(stream, model, "post-processing", started, called, k)
    tracer.frame(stream, model, "output callback", called, ended, k)
