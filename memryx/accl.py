"""The public accelerator classes: AsyncAccl, SyncAccl and MultiStreamAsyncAccl.

Each class is a thin facade over the asyncio core (:mod:`memryx._core.engine`).

**Sync programs.** An accelerator created outside a running event loop starts
a dedicated runner thread that owns an event loop (uvloop when installed); the
methods block the calling thread only. Plain callbacks run on worker threads,
never on the loop thread.

**Async programs.** ``async with AsyncAccl(dfp) as accl:`` binds the accelerator
to the running loop: the pipeline runs on the app's loop, ``async def``
callbacks run on it too (so they may touch the app's loop objects), blocking
callbacks still run on worker threads. ``await accl.arun(...)``,
``accl.astream(...)``, ``await accl.await_done()`` and ``await accl.aclose()``
are the async twins of ``run``, ``wait`` and ``close``. A blocking method
called on the loop's own thread raises :class:`LoopBlockingError` naming its
twin, instead of deadlocking.

**Errors.** An exception raised by a callback ends that stream; the first one is
re-raised, once, from ``wait()`` / ``await_done()`` (or from ``close()`` /
``__exit__`` if nobody waited), with its traceback and a note naming the
callback; later ones are attached as notes.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import enum
import logging
import os
import sys
import threading
import time
import warnings
from collections.abc import (
    AsyncIterable,
    AsyncIterator,
    Callable,
    Coroutine,
    Iterable,
    Sequence,
)
from pathlib import Path
from typing import Any, TypeVar

import anyio
import numpy as np
from numpy.typing import NDArray

from ._compat import CompatMixin
from ._core.callbacks import CallbackKind, check_output_kind, check_signature, classify
from ._core.engine import ChannelSink, Engine, WouldBlock
from ._core.lane import Frame
from ._core.processing import PortSpec, check_post_inputs, make_processor, running_processors
from ._core.threads import (
    Runner,
    await_future,
    call_in_loop,
    call_soon,
    check_not_on_loop,
    in_user_code,
    loop_future,
    loop_running,
    on_loop_thread,
    run_in_loop,
    run_sync,
    wait_interruptibly,
)
from ._exceptions import (
    CallbackSignatureError,
    ClosedError,
    LoopBlockingError,
    ModelIndexError,
    NotConnectedError,
    ShapeError,
    StreamCountError,
    UsageError,
)
from ._lifecycle import register as register_for_exit
from ._options import ClientOptions, SchedulerOptions, resolve
from ._pacing import stream_router
from ._trace import DEFAULT_FRAMES, Tracer
from .device.base import Device, open_device
from .device.multi import MultiDevice
from .dfp import Dfp

__all__ = ["AsyncAccl", "MultiStreamAsyncAccl", "SyncAccl"]

log = logging.getLogger("memryx.accl")
T = TypeVar("T")
Array = NDArray[Any]
#: What ``run`` / ``receive`` return for one frame: the array of a one-output
#: model, or a list with an array per output port.
Outputs = Array | list[Array]
DfpLike = str | os.PathLike[str] | bytes | bytearray | memoryview | Dfp

#: How long close() lets a stop finish after a second Ctrl-C, and waits for the runner.
STOP_GRACE_S = 5.0
#: Frames ``astream`` keeps in flight by default.
ASTREAM_WINDOW = 8


class _State(enum.Enum):
    NEW = "new"          # created inside a running loop, not bound yet
    SYNC = "sync"        # runs on its own runner thread
    ASYNC = "async"      # bound to an app's event loop
    CLOSED = "closed"


def _ms_timeout(timeout: float | None) -> float | None:
    if timeout is None:
        return None
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or \
            not timeout >= 0:  # also refuses NaN
        raise ValueError(f"timeout must be None or a number of milliseconds >= 0, got {timeout!r}")
    return timeout / 1000.0


class _Accelerator(CompatMixin):
    """What the three classes share: lifecycle, loop binding, models, pre/post."""

    def __init__(self, dfp: DfpLike, device_ids: int | Sequence[int] | None = None,
                 use_model_shape: bool | tuple[bool, bool] = (True, True),
                 local_mode: bool = False, scheduler_options: SchedulerOptions | None = None,
                 client_options: ClientOptions | None = None, manager_addr: str | None = None,
                 manager_port: int | None = None, ignore_manager: bool = False, *,
                 group_id: int | None = None, device: str | Device | None = None,
                 stream_workers: int | None = None, **kwargs: Any) -> None:
        self._dfp = Dfp(dfp)
        resolved = resolve(type(self).__name__, device_ids=device_ids,
                           use_model_shape=use_model_shape, local_mode=local_mode,
                           scheduler_options=scheduler_options, client_options=client_options,
                           manager_addr=manager_addr, manager_port=manager_port,
                           ignore_manager=ignore_manager, group_id=group_id, device=device,
                           stream_workers=stream_workers, kwargs=kwargs)
        if resolved.group_id < 0:
            raise ModelIndexError(f"group_id must be >= 0, got {resolved.group_id}")
        self._compat_init(resolved)
        self._post_outputs: dict[int, int | None] = {}
        self._stream_groups: dict[int, list[tuple[int, int, Callable[..., Any]]]] = {}
        self._resolved = resolved
        self._tracer = Tracer.from_env()  # MEMRYX_TRACE=path: on from the start
        if self._tracer.path is not None:
            _check_trace_path(self._tracer.path, f"MEMRYX_TRACE={os.environ.get('MEMRYX_TRACE')}"
                              f" (this accelerator's trace: {self._tracer.path})")
        self._engine = self._make_engine()
        self._state = _State.NEW
        self._runner: Runner | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._receivers: dict[int, ChannelSink] = {}
        self._close_lock = threading.RLock()
        self._stopping = False
        self._binding: asyncio.Future[bool] | None = None
        register_for_exit(self)
        if not loop_running():
            self._start_sync()

    # -- lifecycle ------------------------------------------------------------------------
    def _make_engine(self) -> Engine:
        r = self._resolved
        device: Device
        if len(r.device_ids) > 1:  # one accelerator over several devices
            device = MultiDevice([open_device(r.device, **r.options_for(i))
                                  for i in r.device_ids], r.device_ids)
        else:
            device = open_device(r.device, **r.device_options)
        engine = Engine(self._dfp, device, r.group_id, stream_workers=r.stream_workers)
        engine.tracer = self._tracer
        return engine

    def _start_sync(self) -> None:
        runner = Runner()
        try:
            runner.call(self._engine.start)
        except BaseException:
            with contextlib.suppress(Exception):
                runner.call(self._engine.aclose)
            runner.close()
            self._state = _State.CLOSED
            raise
        self._runner = runner
        self._state = _State.SYNC

    async def _bind(self) -> None:
        """Bind to the running loop (from NEW, or from an unused SYNC runtime), once:
        concurrent callers wait for the first one's binding."""
        loop = asyncio.get_running_loop()
        binding = self._binding
        while binding is not None and binding.get_loop() is loop:
            if await asyncio.shield(binding):
                return
            # the caller that was binding was cancelled (not this one): bind here instead
            binding = self._binding
        binding = self._binding = loop.create_future()
        try:
            await self._bind_now(loop)
        except asyncio.CancelledError:
            self._binding = None
            binding.set_result(False)  # the other waiters try again themselves
            raise
        except BaseException as exc:
            self._binding = None
            if self._stopping and isinstance(exc, Exception):  # closed while it was starting
                exc = ClosedError(f"this {type(self).__name__} was closed while it started")
            binding.set_exception(exc)
            binding.exception()  # retrieved: the other waiters see it, or nobody needs it
            raise exc from None
        binding.set_result(True)

    async def _bind_now(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._state is _State.SYNC:
            if self._engine.used():
                raise UsageError("this accelerator already runs on its own thread (it was "
                                 "created outside an event loop and used); create it inside "
                                 "the loop to bind it there")
            runner, self._runner = self._runner, None
            assert runner is not None
            await await_future(runner.start(self._engine.aclose))
            await run_sync(runner.close, abandon_on_cancel=False)
            self._engine = self._make_engine()
            self._state = _State.NEW
        self._check_open()
        engine = self._engine
        await engine.start()
        if self._stopping or self._state is _State.CLOSED or engine.closed:
            await engine.aclose()  # closed while it started: stay closed
            raise ClosedError(f"this {type(self).__name__} was closed while it started")
        self._loop = loop
        self._state = _State.ASYNC

    def _check_open(self) -> None:
        if self._state is _State.CLOSED:
            raise ClosedError(f"this {type(self).__name__} is closed; create a new one")

    def _blocking(self, what: str, twin: str, fn: Callable[..., Coroutine[Any, Any, T]],
                  *args: Any) -> T:
        """Run core coroutine ``fn`` for a sync caller, blocking only that caller."""
        self._check_open()
        running = running_processors()
        if running and any(proc is lane.pre or proc is lane.post
                           for lane in self._engine.lanes for proc in running):
            raise UsageError(f"{what} cannot be called from this accelerator's own pre- or "
                             f"post-processing: it would wait for itself")
        if self._state is _State.ASYNC:
            assert self._loop is not None
            if on_loop_thread(self._loop):
                raise LoopBlockingError(
                    f"{what} blocks, and was called on the event loop this accelerator runs "
                    f"on; use `{twin}` instead")
            try:
                return call_in_loop(self._loop, fn, *args)
            except BaseException as exc:
                self._engine.reported(exc)
                raise
        check_not_on_loop(what, twin)
        if self._state is _State.NEW:
            self._start_sync()
        assert self._runner is not None
        try:
            return self._runner.call(fn, *args)
        except BaseException as exc:
            self._engine.reported(exc)
            raise

    def _apply(self, fn: Callable[..., T], *args: Any) -> T:
        """Run a quick core method on the core's loop thread."""
        self._check_open()
        if self._state is _State.ASYNC and self._loop is not None and on_loop_thread(self._loop):
            return fn(*args)
        if self._state is _State.NEW and loop_running():
            raise UsageError(
                f"inside a running event loop, bind {type(self).__name__} to it first: "
                f"`async with {type(self).__name__}(dfp) as accl:`")

        async def on_loop() -> T:
            return fn(*args)

        if self._state is _State.ASYNC:
            assert self._loop is not None
            return call_in_loop(self._loop, on_loop)
        if self._state is _State.NEW:
            self._start_sync()
        assert self._runner is not None
        return self._runner.call(on_loop)  # quick: fine even from a coroutine

    async def _acall(self, fn: Callable[..., Coroutine[Any, Any, T]], *args: Any) -> T:
        """Run core coroutine ``fn`` for an async caller without blocking its loop."""
        self._check_open()
        if self._state is not _State.ASYNC and (self._state is _State.NEW or
                                                self._binding is not None):
            await self._bind()
        try:
            if self._state is _State.ASYNC:
                if self._loop is not asyncio.get_running_loop():
                    raise UsageError(f"this {type(self).__name__} is bound to another event loop")
                return await fn(*args)
            assert self._runner is not None
            return await await_future(self._runner.start(fn, *args))
        except BaseException as exc:
            self._engine.reported(exc)
            raise

    def close(self) -> None:
        """Stop every model and release every thread; re-raise a callback error nobody saw.

        Blocks until all models have stopped. A callback that is blocked inside
        user code is abandoned (it keeps its worker thread until it returns) and
        none is called after this returns. Idempotent.
        """
        with self._close_lock:  # close() may race from several threads (a watchdog, main)
            if self._state is _State.CLOSED:
                return
            self._stopping = True
            self._compat_stop.set()  # pacing / smoothing waits end
            if self._state is _State.ASYNC and self._loop_gone():
                self._engine.abandon()  # its loop has ended: nothing runs any more
            elif self._state is _State.ASYNC:
                assert self._loop is not None
                if on_loop_thread(self._loop):
                    raise LoopBlockingError("close() blocks, and was called on the event loop "
                                            "this accelerator runs on; use `await accl.aclose()`")
                call_in_loop(self._loop, self._engine.aclose)
            elif self._runner is not None:
                check_not_on_loop("close()", "await accl.aclose()")
                stopping = self._runner.start(self._engine.aclose)
                try:
                    wait_interruptibly(stopping)
                except KeyboardInterrupt:
                    # Ctrl-C again while stopping: the stop is quick, let it finish (a
                    # half-done stop would leave the pipeline running), then interrupt
                    with contextlib.suppress(BaseException):
                        stopping.result(STOP_GRACE_S)
                    raise KeyboardInterrupt from None
                finally:
                    self._runner.close(STOP_GRACE_S)
            self._finish_trace()
            self._closed()

    def _loop_gone(self) -> bool:
        """Whether the loop this accelerator is bound to has stopped for good."""
        loop = self._loop
        return loop is None or loop.is_closed() or not loop.is_running()

    def _closed(self) -> None:
        self._state = _State.CLOSED
        for sink in self._receivers.values():
            sink.close()
        self._engine.raise_errors()

    def stop(self) -> None:
        """Stop each model and clean up; returns within about a second even while a
        callback is blocked, and no callback is called after it returns."""
        self.close()

    async def aclose(self) -> None:
        """The async twin of :meth:`close`."""
        if self._state is _State.CLOSED:
            return
        self._stopping = True
        self._compat_stop.set()  # pacing / smoothing waits end
        if self._state is _State.ASYNC and self._loop is not asyncio.get_running_loop():
            if self._loop_gone():
                self._engine.abandon()
            else:  # bound to a loop in another thread: close it there
                assert self._loop is not None
                await loop_future(run_in_loop(self._loop, self._engine.aclose()))
        elif self._state in (_State.ASYNC, _State.NEW):
            await self._engine.aclose()  # NEW: never started, but its device may hold resources
        elif self._runner is not None:
            runner = self._runner
            await await_future(runner.start(self._engine.aclose))
            await run_sync(runner.close, abandon_on_cancel=False)
        if self._tracer.on:
            await run_sync(self._finish_trace, abandon_on_cancel=False)
        self._closed()

    def __enter__(self) -> Any:
        self._check_open()
        return self

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        if exc is None:
            self.close()
        else:
            self._close_after(exc)

    def _close_after(self, exc: BaseException) -> None:
        """Close while ``exc`` propagates; a different error from close rides along as a note."""
        try:
            self.close()
        except Exception as late:
            if late is not exc:
                exc.add_note(f"while stopping the accelerator, another error: {late!r}")

    async def _aclose_after(self, exc: BaseException) -> None:
        """The async twin of :meth:`_close_after`."""
        try:
            await self.aclose()
        except Exception as late:
            if late is not exc:
                exc.add_note(f"while stopping the accelerator, another error: {late!r}")

    async def __aenter__(self) -> Any:
        self._check_open()
        if self._state is not _State.ASYNC:
            await self._bind()
        return self

    async def __aexit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        if exc is None:
            await self.aclose()
        else:
            await self._aclose_after(exc)

    def __del__(self) -> None:
        # Never blocks: the close is only scheduled on the accelerator's own loop.
        state = getattr(self, "_state", _State.CLOSED)
        if state not in (_State.SYNC, _State.ASYNC) or sys.is_finalizing():
            return
        with contextlib.suppress(Exception):
            warnings.warn(f"unclosed {type(self).__name__}; use `with` or call close()",
                          ResourceWarning, stacklevel=2)
        self._stopping = True
        self._compat_stop.set()  # pacing / smoothing waits end
        if state is _State.SYNC and self._runner is not None:
            self._runner.close_soon(self._engine.aclose)
        elif state is _State.ASYNC and self._loop is not None:
            with contextlib.suppress(RuntimeError):  # the loop is closed: nothing runs on it
                call_soon(self._loop, _spawn_close, self._engine)
        self._finish_trace()  # what was recorded so far (the last frames may be missing)

    def _close_at_exit(self, deadline: float) -> None:
        """Called by the exit hook (memryx._lifecycle): stop, waiting at most until ``deadline``."""
        if not self._close_lock.acquire(timeout=max(0.0, deadline - time.monotonic())):
            return
        try:
            state = self._state
            if state is _State.CLOSED:
                return
            self._stopping = True
            self._compat_stop.set()  # pacing / smoothing waits end
            if state is _State.SYNC and self._runner is not None:
                stopped = self._runner.close_soon(self._engine.aclose)
                with contextlib.suppress(Exception):
                    stopped.result(max(0.0, deadline - time.monotonic()))
                self._runner.join(max(0.0, deadline - time.monotonic()))
            elif state is _State.ASYNC and self._loop is not None and self._loop.is_running() \
                    and not on_loop_thread(self._loop):
                with contextlib.suppress(Exception):
                    run_in_loop(self._loop, self._engine.aclose()).result(
                        max(0.0, deadline - time.monotonic()))
            self._state = _State.CLOSED
            for sink in self._receivers.values():
                sink.close()
            self._finish_trace()
        finally:
            self._close_lock.release()

    # -- models and ports -------------------------------------------------------------------
    @property
    def dfp(self) -> Dfp:
        """The loaded DFP."""
        return self._dfp

    def inport_assignment(self, model_idx: int = 0) -> dict[int, str]:
        """Map the input port ids of model ``model_idx`` to its input layer names."""
        return {p.port: p.layer for p in self._dfp.model(model_idx).inputs}

    def outport_assignment(self, model_idx: int = 0) -> dict[int, str]:
        """Map the output port ids of model ``model_idx`` to its output layer names."""
        return {p.port: p.layer for p in self._dfp.model(model_idx).outputs}

    def set_preprocessing_model(self, model_or_path: Any, model_idx: int = 0) -> None:
        """Run ``model_or_path`` on each input frame of ``model_idx`` before the device.

        Takes an ONNX path, ``onnx.ModelProto`` or ONNX bytes (run with
        onnxruntime on a worker thread; frames are then checked against its
        inputs), or a Python callable ``fn(*arrays) -> array | sequence``. Set
        it before connecting the model's input.
        """
        self._dfp.model(model_idx)
        proc = make_processor(model_or_path, model_idx, "pre-processing")
        self._engine.set_processor(model_idx, "pre", proc)
        self._pre_set.add(model_idx)

    def set_postprocessing_model(self, model_or_path: Any, model_idx: int = 0) -> None:
        """Run ``model_or_path`` on each output of ``model_idx``; callbacks and ``run``
        then get its outputs. Same forms as :meth:`set_preprocessing_model`; set it
        before connecting the model's output."""
        model = self._dfp.model(model_idx)
        proc = make_processor(model_or_path, model_idx, "post-processing")
        check_post_inputs(proc, [PortSpec(model_idx, p.port, p.layer, p.shape, p.dtype,
                                          where="output port") for p in model.outputs])
        self._engine.set_processor(model_idx, "post", proc)
        self._post_set.add(model_idx)
        self._post_outputs[model_idx] = proc.n_outputs

    def _n_outputs(self, model_idx: int) -> int | None:
        """How many arrays the output callback of ``model_idx`` gets (None: unknown)."""
        if model_idx in self._post_outputs:
            return self._post_outputs[model_idx]
        return len(self._dfp.model(model_idx).outputs)

    def statistics(self) -> dict[str, Any]:
        """Counters per model and per stream (frames in/out, in flight, fps)."""
        return self._engine.statistics()

    # -- tracing ------------------------------------------------------------------------------
    def trace(self, path: str | os.PathLike[str] | None, frames: int = DEFAULT_FRAMES
              ) -> Tracer:
        """Record a timeline of the last ``frames`` frames, for https://ui.perfetto.dev.

        Every stage of each frame (input callback, pre-processing, queued, device,
        post-processing, output callback) per model and stream, and when the device
        was busy with each model. The trace (Chrome trace-event JSON) is written to
        ``path`` when the accelerator closes; ``trace(None)`` writes it at once and
        stops recording. Calling ``trace(path)`` again starts a new recording.
        Returns the :class:`~memryx._trace.Tracer` (``write(path)`` writes a copy).
        """
        tracer = self._tracer
        if path is None:
            tracer.finish()
            return tracer
        self._check_open()
        if isinstance(frames, bool) or not isinstance(frames, int) or frames < 1:
            raise UsageError(f"trace(frames=...) must be an int >= 1, got {frames!r}")
        target = Path(os.fspath(path))
        _check_trace_path(target, f"trace path {str(target)!r}")
        return tracer.start(target, frames)

    def _finish_trace(self) -> None:
        """At close: write the trace, if one is being recorded (never raises)."""
        tracer = self._tracer
        if not tracer.on:
            return
        try:
            written = tracer.finish()
        except Exception as exc:  # a close must not fail because a trace could not be written
            log.warning("could not write the trace to %s: %r", tracer.path, exc)
        else:
            if written is not None:
                log.info("wrote the trace %s", written)

    # -- request API (run / arun / astream) ------------------------------------------------------
    def _frames(self, inputs: Any, model_idx: int) -> tuple[list[Any], bool]:
        """Split ``inputs`` into frames; True when it was a single frame."""
        model = self._dfp.model(model_idx)
        n_in = len(model.inputs)
        if isinstance(inputs, np.ndarray):
            if n_in == 1:
                _refuse_stacked(inputs, model_idx, model.inputs[0].shape, model.inputs[0].layer)
                return [inputs], True
            return [inputs], True  # the port-count check names the problem
        if isinstance(inputs, (list, tuple)):
            if not inputs:
                return [], False
            if n_in > 1 and all(isinstance(x, np.ndarray) for x in inputs):
                return [list(inputs)], True
            return list(inputs), False
        raise TypeError(f"model {model_idx}: inputs must be a numpy.ndarray, a list of frames or "
                        f"a list of lists of arrays, got {type(inputs).__name__}")

    def _shape_outputs(self, results: list[Frame], single: bool) -> Any:
        shaped = [r[0] if len(r) == 1 else r for r in results]
        return shaped[0] if single else shaped

    async def arun(self, inputs: Any, model_idx: int = 0) -> Any:
        """The async twin of :meth:`SyncAccl.run`: same input forms, same results.

        Pipelined, never blocks the loop; many tasks may ``arun`` at once, each
        gets exactly its own outputs. Cancelling the awaiting task drops the
        frames it had in flight and nothing else.
        """
        frames, single = self._frames(self._inputs_to_model(inputs, model_idx), model_idx)
        results = await self._acall(self._engine.run, model_idx, frames)
        return self._outputs_to_chip(self._shape_outputs(results, single), model_idx, single)

    async def astream(self, frames: Iterable[Any] | AsyncIterable[Any], model_idx: int = 0, *,
                      window: int = ASTREAM_WINDOW) -> AsyncIterator[Any]:
        """Run ``frames`` (a sync or async iterable) and yield their outputs in order.

        At most ``window`` frames are in flight: a slow consumer slows the
        producer and memory stays flat. Leaving the loop early (``break``,
        cancellation) stops reading ``frames`` and drops what was in flight.
        Needs the accelerator bound to this loop (``async with``, or created
        inside it).
        """
        if isinstance(window, bool) or not isinstance(window, int) or window < 1:
            raise ValueError(f"window must be a positive int, got {window!r}")
        self._check_open()
        if self._state is _State.NEW:
            await self._bind()
        if self._state is not _State.ASYNC or self._loop is not asyncio.get_running_loop():
            raise UsageError("astream() needs the accelerator bound to this event loop: create "
                             "it inside the loop or use `async with`")
        model = self._dfp.model(model_idx)

        def check(data: Any) -> None:
            if len(model.inputs) == 1 and isinstance(data, np.ndarray):
                port = model.inputs[0]
                _refuse_stacked(data, model_idx, port.shape, port.layer)

        outputs = self._engine.stream(model_idx, frames, window, check)
        async with contextlib.aclosing(outputs):
            async for frame in outputs:
                yield self._shape_outputs([frame], True)

    # -- helpers for the callback API --------------------------------------------------------------
    def _wait(self) -> None:
        self._check_open()
        if in_user_code():
            raise UsageError("wait() cannot be called from this accelerator's own callback: "
                             "it would wait for itself (call stop() to end the run)")
        try:
            self._blocking("wait()", "await accl.await_done()", self._engine.wait_done)
        except BaseException as exc:
            if self._stopping and isinstance(exc, (concurrent.futures.CancelledError,
                                                   ClosedError)):
                # stop() from another thread (or a callback) ended the run: wait() is over
                with self._close_lock:
                    pass  # let that stop() finish first
                self._engine.raise_errors()
                return
            if not isinstance(exc, NotConnectedError):  # else: connect and wait again
                self._close_after(exc)
            raise
        try:
            self._engine.raise_errors()  # here, in the caller's thread: even KeyboardInterrupt
        except BaseException as exc:
            self._close_after(exc)
            raise
        self.close()

    async def _await_done(self) -> None:
        self._check_open()
        try:
            await self._acall(self._engine.wait_done)
        except BaseException as exc:
            if not isinstance(exc, NotConnectedError):  # else: connect and wait again
                await self._aclose_after(exc)
            raise
        try:
            self._engine.raise_errors()  # in the caller's task, as itself
        except BaseException as exc:
            await self._aclose_after(exc)
            raise
        await self.aclose()


def _check_trace_path(target: Path, what: str) -> None:
    """Refuse, up front, a trace path that cannot be written as a file."""
    if target.is_dir():
        raise UsageError(f"{what}: is a directory; give a file name")
    if not target.parent.is_dir():
        raise UsageError(f"{what}: the directory {str(target.parent)!r} does not exist")


def _spawn_close(engine: Engine) -> None:
    """On the engine's loop: start closing it (for ``__del__``, which may not wait)."""
    task = asyncio.get_running_loop().create_task(engine.aclose())
    _closing.add(task)
    task.add_done_callback(_closing.discard)


_closing: set[asyncio.Task[None]] = set()


def _refuse_stacked(arr: Array, model_idx: int, shape: tuple[int, ...], layer: str) -> None:
    """A stacked batch (N frames in one array) gets its own clear error."""
    if arr.shape == shape or (shape and shape[0] == 1 and arr.shape == shape[1:]):
        return
    frame = shape[1:] if shape and shape[0] == 1 else shape
    if arr.ndim > 0 and arr.shape[0] > 1 and arr.shape[1:] in (shape, frame):
        raise ShapeError(
            f"model {model_idx}, input layer {layer!r}: got a stacked batch of {arr.shape[0]} "
            f"frames {arr.shape}; stacking frames into one array is not supported, pass a "
            f"list of frames of shape {shape} instead")


class AsyncAccl(_Accelerator):
    """Run models with callbacks that feed and drain the accelerator, pipelined.

    Parameters (the vendor SDK's 1.x and 2.x forms both work; ``docs/migrating.md``):
        dfp: path to a DFP, its bytes (``bytes`` / ``bytearray``), or a :class:`Dfp`.
        device_ids: the device to run on, an int or a one-element list (SDK 2.x; also
            positional). In simulation each id is a simulated device of its own.
        use_model_shape: ``(inputs, outputs)``; ``False`` means frames in (or outputs
            out) in the chip layout ``[row, col, z, ch]``.
        local_mode, ignore_manager: own the device in this process (the in-process
            simulated MX3), never a device server.
        scheduler_options: a :class:`SchedulerOptions` (validated; a device server
            schedules with its own).
        client_options: a :class:`ClientOptions`: ``fps_target`` paces input callbacks,
            ``smoothing`` evens out output delivery.
        manager_addr, manager_port: the device server (``memryx serve``) to use: a Unix
            socket path, or a host and TCP port.
        group_id: index of the chip group to use (SDK 1.x; keyword).
        device: ``"sim"`` (default, or ``$MEMRYX_DEVICE``) or a :class:`~memryx.device.Device`.
        **kwargs: device options (``mode``, ``concurrency``, ``queue_depth``, ``groups``
            for ``"sim"``); any other keyword is ignored with a ``UserWarning``.
    """

    def connect_input(self, callback: Callable[..., Any], model_idx: int = 0) -> None:
        """Set the callback that produces input frames for model ``model_idx``.

        ``callback`` takes no arguments and returns one frame (an ndarray, or a
        sequence of ndarrays for a multi-input model) each time the model is
        ready for one. It may be a generator function, an ``async def``
        function or an async generator function. Returning ``None``, raising
        ``StopIteration`` or any exception ends this model's input stream; an
        exception is re-raised by :meth:`wait`. If a pre-processing model is
        set, frames go through it first. Starts feeding at once.

        Raises:
            RuntimeError (CallbackSignatureError): ``callback`` needs arguments.
        """
        self._dfp.model(model_idx)
        try:
            check_signature(callback, 0, f"the input callback of model {model_idx}")
        except CallbackSignatureError as exc:
            raise CallbackSignatureError(f"{exc}; input callbacks take no parameters") from None
        callback = self._wrap_input(callback, model_idx)
        self._apply(self._engine.connect_input, model_idx, callback, None)

    def connect_output(self, callback: Callable[..., Any], model_idx: int = 0) -> None:
        """Set the callback called with each frame's outputs of model ``model_idx``.

        Called as ``callback(*outputs)``, outputs in outport order (or the
        post-processing model's outputs if one is set); the arrays are the
        callback's to keep. May be an ``async def`` function.
        """
        self._dfp.model(model_idx)
        check_output_kind(callback, f"the output callback of model {model_idx}")
        callback = self._wrap_output(callback, model_idx, False, self._n_outputs(model_idx))
        self._apply(self._engine.connect_output, model_idx, callback, False)

    def wait(self) -> None:
        """Block until every model's input stream has ended and every output was
        delivered, then release the accelerator.

        Raises:
            RuntimeError (NotConnectedError): a model's input or output is not connected.
            The first exception a callback raised, once, with its traceback.
        """
        self._wait()

    async def await_done(self) -> None:
        """The async twin of :meth:`wait`."""
        await self._await_done()


class MultiStreamAsyncAccl(_Accelerator):
    """Many input streams (cameras) on one model, each with its own stream index.

    Streams are served round-robin; a stream's callbacks never run
    concurrently with themselves; outputs keep each stream's order.

    Parameters:
        stream_workers: how many input callbacks may run at once on worker
            threads (default: as many as there are streams, up to 64).
        Other parameters as :class:`AsyncAccl`.
    """

    #: The most streams one model may have, over every ``connect_streams`` call: far more
    #: cameras than one accelerator serves at a useful rate (at 2,000 frames/s over all
    #: streams, 4096 streams get under half a frame per second each), and a bound on the
    #: time and memory the streams' state takes (10**6 streams took 30 s and 2.3 GB).
    MAX_STREAMS = 4096

    def __init__(self, dfp: DfpLike, device_ids: int | Sequence[int] | None = None,
                 stream_workers: int | None = None,
                 use_model_shape: bool | tuple[bool, bool] = (True, True),
                 local_mode: bool = False, scheduler_options: SchedulerOptions | None = None,
                 client_options: ClientOptions | None = None, manager_addr: str | None = None,
                 manager_port: int | None = None, ignore_manager: bool = False,
                 **kwargs: Any) -> None:
        super().__init__(dfp, device_ids, use_model_shape, local_mode, scheduler_options,
                         client_options, manager_addr, manager_port, ignore_manager,
                         stream_workers=stream_workers, **kwargs)

    def connect_streams(self, input_callback: Callable[[int], Any],
                        output_callback: Callable[..., Any], stream_count: int,
                        model_idx: int = 0) -> None:
        """Start ``stream_count`` streams on model ``model_idx``.

        ``input_callback(stream_idx)`` returns the next frame of that stream
        (``None`` ends it); ``output_callback(stream_idx, *outputs)`` gets its
        outputs, in that stream's order.
        """
        self._dfp.model(model_idx)
        if isinstance(stream_count, bool) or not isinstance(stream_count, int):
            raise TypeError(f"stream_count must be an int, got {type(stream_count).__name__} "
                            f"({stream_count!r})")
        if stream_count < 1:
            raise ValueError(f"stream_count must be a positive int, got {stream_count!r}")
        groups = self._stream_groups.get(model_idx)
        have = groups[-1][0] + groups[-1][1] if groups else 0
        if have + stream_count > self.MAX_STREAMS:
            more = f"; it has {have} already" if have else ""
            raise StreamCountError(
                f"stream_count {stream_count}: model {model_idx} may have at most "
                f"{self.MAX_STREAMS} streams (MultiStreamAsyncAccl.MAX_STREAMS){more}; "
                "use more accelerators (or processes) for more streams")
        check_signature(input_callback, 1, f"the input callback of model {model_idx}")
        check_output_kind(output_callback, f"the output callback of model {model_idx}")
        n_out = self._n_outputs(model_idx)
        if n_out is not None:
            check_signature(output_callback, n_out + 1,
                            f"the output callback of model {model_idx}")
        output_callback = self._wrap_output(output_callback, model_idx, True, n_out)
        input_callback = self._wrap_stream_input(input_callback, model_idx)
        if groups is None:  # the first call: a router sends each stream to its own callback
            groups = self._stream_groups[model_idx] = [(0, stream_count, output_callback)]
            self._apply(self._engine.connect_output, model_idx,
                        stream_router(groups, output_callback), True)
            self._apply(self._engine.connect_input, model_idx, input_callback, stream_count)
            return
        # called again: more streams, numbered after the existing ones
        first = groups[-1][0] + groups[-1][1]
        if classify(output_callback) is not classify(groups[0][2]) and \
                CallbackKind.ASYNC in (classify(output_callback), classify(groups[0][2])):
            raise UsageError("connect_streams called again: the output callbacks of one model "
                             "must all be `async def` or all plain functions")
        self._apply(self._engine.add_streams, model_idx, input_callback, first, stream_count)
        groups.append((first, stream_count, output_callback))

    def wait(self) -> None:
        """Block until every stream has ended and every output was delivered.

        Raises like :meth:`AsyncAccl.wait`.
        """
        self._wait()

    async def await_done(self) -> None:
        """The async twin of :meth:`wait`."""
        await self._await_done()


class SyncAccl(_Accelerator):
    """Send frames and receive outputs with blocking calls.

    ``send`` and ``receive`` may run on two threads at once (the pipelined way
    to use it); ``run`` sends a frame or a batch and waits for all outputs.
    """

    def _receiver(self, model_idx: int) -> ChannelSink:
        sink = self._receivers.get(model_idx)
        if sink is None:
            sink = self._receivers[model_idx] = ChannelSink()
        return sink

    def send(self, data: Any, model_idx: int = 0, timeout: float | None = None) -> None:
        """Copy one frame into model ``model_idx``'s input buffer and return.

        Blocks while the buffer is full: forever if ``timeout`` is None, else at
        most ``timeout`` milliseconds, then raises ``TimeoutError``.
        """
        self._dfp.model(model_idx)
        seconds = _ms_timeout(timeout)
        data = self._inputs_to_model(data, model_idx)
        self._blocking("send()", "await accl.asend(...)", self._send, data, model_idx, seconds)

    def receive(self, model_idx: int = 0, timeout: float | None = None) -> Outputs:
        """The outputs of the oldest frame sent to model ``model_idx``.

        Blocks until they are ready: forever if ``timeout`` is None, else at
        most ``timeout`` milliseconds, then raises ``TimeoutError``. Returns the
        array for a one-output model, else a list in outport order.
        """
        self._dfp.model(model_idx)
        seconds = _ms_timeout(timeout)
        out = self._blocking("receive()", "await accl.areceive(...)", self._receive,
                             model_idx, seconds)
        return self._outputs_to_chip(out, model_idx, True)  # type: ignore[no-any-return]

    # ``timeout`` mirrors send()/receive() (milliseconds), hence the noqa.
    async def asend(self, data: Any, model_idx: int = 0,
                    timeout: float | None = None) -> None:  # noqa: ASYNC109
        """The async twin of :meth:`send`."""
        self._dfp.model(model_idx)
        data = self._inputs_to_model(data, model_idx)
        await self._acall(self._send, data, model_idx, _ms_timeout(timeout))

    async def areceive(self, model_idx: int = 0,
                       timeout: float | None = None) -> Outputs:  # noqa: ASYNC109
        """The async twin of :meth:`receive`."""
        self._dfp.model(model_idx)
        out = await self._acall(self._receive, model_idx, _ms_timeout(timeout))
        return self._outputs_to_chip(out, model_idx, True)  # type: ignore[no-any-return]

    async def _send(self, data: Any, model_idx: int, seconds: float | None) -> None:
        sink = self._receiver(model_idx)
        with _timeout(seconds, f"send() to model {model_idx}: no space in the input buffer"):
            await self._engine.send(model_idx, data, sink, nowait=seconds == 0)

    async def _receive(self, model_idx: int, seconds: float | None) -> Outputs:
        sink = self._receiver(model_idx)
        with _timeout(seconds, f"receive() from model {model_idx}: no output available"):
            outputs = await self._engine.receive(model_idx, sink, nowait=seconds == 0)
        return self._shape_outputs([outputs], True)  # type: ignore[no-any-return]

    def run(self, inputs: Any, model_idx: int = 0) -> Any:
        """Send ``inputs`` to model ``model_idx`` and wait for all their outputs.

        ``inputs``: one frame (an ndarray, or a list of ndarrays for a
        multi-input model), or a batch: a list of frames (a list of lists for a
        multi-input model), pipelined inside. Returns outputs of the same
        form: for one frame, the output array (a list of arrays for a
        multi-output model); for a batch, a list of those. Stacking frames into
        one array is refused with a ``ShapeError``.
        """
        frames, single = self._frames(self._inputs_to_model(inputs, model_idx), model_idx)
        results = self._blocking("run()", "await accl.arun(...)", self._engine.run, model_idx,
                                 frames)
        return self._outputs_to_chip(self._shape_outputs(results, single), model_idx, single)


@contextlib.contextmanager
def _timeout(seconds: float | None, message: str) -> Any:
    """Bound a wait; a zero timeout means "only if it can be done at once"."""
    if seconds is None:
        yield
        return
    try:
        if seconds == 0:
            try:
                yield
            except WouldBlock:
                raise TimeoutError from None
            return
        with anyio.fail_after(seconds):
            yield
    except TimeoutError:
        raise TimeoutError(f"{message} after {seconds * 1000:g} ms") from None
