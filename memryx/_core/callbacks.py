"""User callbacks: signature checks, and turning them into async frame sources.

A callback is classified once, at connect time:

* a plain function runs on a worker thread (never on the loop thread);
* a generator function is instantiated once and advanced on a worker thread;
* an ``async def`` function or an async generator function runs on the loop.

Input callbacks end their stream by returning ``None``, by raising
``StopIteration`` (or being an exhausted generator), or by raising any other
exception, which is also recorded for ``wait()`` to re-raise.
"""

from __future__ import annotations

import enum
import inspect
import threading
import time
from collections.abc import AsyncGenerator, Callable
from typing import Any

from .._exceptions import CallbackSignatureError
from .runner import StreamedCall, run_sync, user_code

__all__ = ["END", "CallbackKind", "check_signature", "classify", "frames_from"]


#: How long one thread hop may keep calling a fast input callback to batch its frames.
BATCH_WINDOW_S = 0.0005


class _End:
    def __repr__(self) -> str:
        return "END"


#: Returned by a frame source when its stream ends normally.
END: Any = _End()


class CallbackKind(enum.Enum):
    SYNC = "function"
    GENERATOR = "generator function"
    ASYNC = "async function"
    ASYNC_GENERATOR = "async generator function"


def _target(fn: Callable[..., Any]) -> Any:
    if inspect.isfunction(fn) or inspect.ismethod(fn):
        return fn
    call = getattr(fn, "__call__", None)  # noqa: B004 - callable objects
    return call if call is not None and not inspect.isbuiltin(fn) else fn


def classify(fn: Callable[..., Any]) -> CallbackKind:
    target = _target(fn)
    if inspect.isasyncgenfunction(target):
        return CallbackKind.ASYNC_GENERATOR
    if inspect.iscoroutinefunction(target):
        return CallbackKind.ASYNC
    if inspect.isgeneratorfunction(target):
        return CallbackKind.GENERATOR
    return CallbackKind.SYNC


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


async def frames_from(fn: Callable[..., Any], args: tuple[Any, ...],
                      prepare: Callable[[Any], Any], *, stopping: threading.Event,
                      room: Callable[[], int] = lambda: 1, limiter: Any = None,
                      prepare_blocks: bool = False,
                      on_drop: Callable[[int], None] | None = None
                      ) -> AsyncGenerator[Any, None]:
    """Yield prepared frames from an input callback until its stream ends.

    ``prepare`` turns what the callback returned into device-ready arrays (pre-
    processing, validation, copy); for sync callbacks it runs on the same worker
    thread, right after the callback. Exceptions from the callback or from
    ``prepare`` propagate to the caller (after the frames produced before them),
    which ends the stream and records them.

    A sync callback is called up to ``room()`` times per thread hop (the frames
    the pipeline has room for right now, for at most ``BATCH_WINDOW_S``), back
    to back on one worker thread, so the hop's cost is shared; each frame is
    handed over as soon as the callback returns it. ``stopping`` is checked
    before each call: once it is set, no further call is made. Frames a
    callback returns after the stream was abandoned go to ``on_drop``.
    """
    kind = classify(fn)
    if kind is CallbackKind.SYNC or kind is CallbackKind.GENERATOR:
        if kind is CallbackKind.GENERATOR:
            gen = fn(*args)

            def produce() -> Any:
                item = next(gen, END)
                return END if item is None or item is END else prepare(item)
        else:

            def produce() -> Any:
                try:
                    item = fn(*args)
                except StopIteration:
                    return END
                return END if item is None else prepare(item)

        def produce_batch(emit: Callable[[Any], None], count: int
                          ) -> tuple[BaseException | None, bool]:
            """Up to ``count`` frames in one thread hop, each emitted as soon as it exists:
            (error, ended). The hop ends once it has taken ``BATCH_WINDOW_S``."""
            made = 0
            deadline = time.perf_counter() + BATCH_WINDOW_S
            try:
                with user_code():
                    while made < count and not stopping.is_set():
                        if made and time.perf_counter() > deadline:
                            break
                        frame = produce()
                        if frame is END:
                            return None, True
                        emit(frame)
                        made += 1
            except Exception as exc:
                return exc, True
            return None, stopping.is_set()

        try:
            while True:
                call: StreamedCall[Any, tuple[BaseException | None, bool]] = StreamedCall(
                    produce_batch, max(1, room()), limiter=limiter, on_drop=on_drop)
                try:
                    async for frame in call:
                        yield frame
                finally:
                    await call.aclose()
                assert call.result is not None
                error, ended = call.result
                if error is not None:
                    raise error
                if ended:
                    return
        finally:
            if kind is CallbackKind.GENERATOR and inspect.getgeneratorstate(gen) != "GEN_RUNNING":
                gen.close()  # a generator still running on an abandoned thread is left to it

    async def finish(item: Any) -> Any:
        if item is None:
            return END
        if prepare_blocks:
            return await run_sync(prepare, item, limiter=limiter)
        return prepare(item)

    if kind is CallbackKind.ASYNC_GENERATOR:
        agen = fn(*args)
        try:
            async for item in agen:
                frame = await finish(item)
                if frame is END:
                    return
                yield frame
        finally:
            await agen.aclose()
        return
    while True:
        try:
            item = await fn(*args)
        except StopAsyncIteration:
            return
        except StopIteration:
            return
        frame = await finish(item)
        if frame is END:
            return
        yield frame
