"""The runner thread and the one-off thread hops (the persistent callback threads and
the channels they use live in :mod:`.aio`).

* :class:`Runner` owns one named thread with its own event loop (uvloop when it
  is installed) and an anyio ``BlockingPortal``; sync facades call into the
  core through it and block their own thread only.
* :func:`run_sync` runs a blocking function (an onnxruntime session setup, a
  blocking pre/post-processing step) on a worker thread and awaits it without
  blocking the loop. If the awaiting task is cancelled, the worker is abandoned:
  the call returns at once and whatever the function returns later is dropped.
* :func:`check_not_on_loop` refuses a blocking call from a thread that runs an
  event loop (it would deadlock or stall that loop).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import itertools
import logging
import threading
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from typing import Any, TypeVar

import anyio
import anyio.to_thread
from anyio.from_thread import BlockingPortal

from .. import _lifecycle as lifecycle
from .._exceptions import ClosedError, LoopBlockingError

__all__ = [
    "HAVE_UVLOOP",
    "Runner",
    "await_future",
    "call_in_loop",
    "check_not_on_loop",
    "in_user_code",
    "loop_running",
    "on_loop_thread",
    "run_sync",
    "user_code",
]

log = logging.getLogger("memryx.runner")
T = TypeVar("T")
R = TypeVar("R")

try:  # pragma: no cover - depends on the platform
    import uvloop  # noqa: F401

    HAVE_UVLOOP = True
except ImportError:  # pragma: no cover
    HAVE_UVLOOP = False

_counter = itertools.count()


def check_not_on_loop(what: str, twin: str) -> None:
    """Raise :class:`LoopBlockingError` if the calling thread runs an event loop."""
    if not loop_running():
        return
    raise LoopBlockingError(
        f"{what} blocks, and was called from a thread that runs an event loop, which it "
        f"would stall or deadlock; in async code use `{twin}` instead"
    )


_callback_thread = threading.local()


@contextlib.contextmanager
def user_code() -> Iterator[None]:
    """Mark the current worker thread as running user callbacks (see :func:`in_user_code`).

    The thread is also known to the exit hook (:mod:`memryx._lifecycle`) for that
    time, so that a callback stuck in user code does not keep the process alive.
    """
    _callback_thread.active = True
    me = threading.current_thread()
    lifecycle.enter_user_code(me)
    try:
        yield
    finally:
        _callback_thread.active = False
        lifecycle.leave_user_code(me)


def in_user_code() -> bool:
    """Whether the calling thread is running one of the runtime's user callbacks."""
    return bool(getattr(_callback_thread, "active", False))


async def run_sync(fn: Callable[..., T], *args: Any,
                   limiter: anyio.CapacityLimiter | None = None) -> T:
    """Run ``fn(*args)`` on a worker thread; cancelling abandons the thread."""
    return await anyio.to_thread.run_sync(fn, *args, abandon_on_cancel=True, limiter=limiter)


#: How often a blocking call wakes to let a pending Ctrl-C be handled (seconds).
INTERRUPT_SLICE_S = 0.1


def wait_interruptibly(fut: concurrent.futures.Future[T]) -> T:
    """``fut.result()``, waited for in slices. The kernel may deliver SIGINT to any thread
    (onnxruntime's, a worker's); that only sets Python's flag, which the main thread sees
    when it runs bytecode again, and an unbounded lock wait never does: Ctrl-C would wait
    for the whole batch."""
    while True:
        try:
            return fut.result(timeout=INTERRUPT_SLICE_S)
        except TimeoutError:
            if fut.done():  # the work itself raised TimeoutError
                raise


class Runner:
    """A dedicated thread hosting an event loop, for sync programs.

    ``call(fn, *args)`` runs the coroutine function ``fn`` on the loop and
    blocks the calling thread until it returns (re-raising what it raises);
    ``start(fn, *args)`` returns a ``concurrent.futures.Future`` at once.
    Both refuse to run on the runner's own thread or on any thread running a
    loop. ``close()`` stops the loop and joins the thread.
    """

    def __init__(self, name: str = "memryx-runner") -> None:
        self.name = f"{name}-{next(_counter)}"
        ready: concurrent.futures.Future[tuple[BlockingPortal, asyncio.AbstractEventLoop]] = \
            concurrent.futures.Future()

        async def serve() -> None:
            async with BlockingPortal() as portal:
                ready.set_result((portal, asyncio.get_running_loop()))
                await portal.sleep_until_stopped()

        def main() -> None:
            try:
                anyio.run(serve, backend="asyncio", backend_options={"use_uvloop": HAVE_UVLOOP})
            except BaseException as exc:  # pragma: no cover - the loop failed to start
                if not ready.done():
                    ready.set_exception(exc)
                log.debug("runner %s ended with %r", self.name, exc)

        # A daemon thread: a runner never keeps a process alive; accelerators left
        # open are stopped by the exit hook of memryx._lifecycle before finalization.
        self._thread = threading.Thread(target=main, name=self.name, daemon=True)
        self._thread.start()
        portal, loop = ready.result()
        self._portal: BlockingPortal | None = portal
        self._loop: asyncio.AbstractEventLoop | None = loop
        log.debug("runner %s started (uvloop=%s)", self.name, HAVE_UVLOOP)

    @property
    def closed(self) -> bool:
        return self._portal is None

    def _portal_or_raise(self) -> BlockingPortal:
        if self._portal is None:
            raise ClosedError(f"runner {self.name} is closed")
        return self._portal

    def call(self, fn: Callable[..., Awaitable[T]], *args: Any) -> T:
        fut = self.start(fn, *args)
        try:
            return wait_interruptibly(fut)
        except KeyboardInterrupt:
            fut.cancel()  # Ctrl-C in the caller: the work on the loop stops too
            # a short traceback, ending at the caller's blocking call (not in futures' wait)
            raise KeyboardInterrupt from None
        except BaseException:
            fut.cancel()
            raise

    def start(self, fn: Callable[..., Awaitable[T]], *args: Any) -> concurrent.futures.Future[T]:
        portal = self._portal_or_raise()
        return portal.start_task_soon(fn, *args)

    def close(self, timeout: float | None = None) -> None:
        """Stop the loop (cancelling what still runs on it) and join the thread
        (at most ``timeout`` seconds when given)."""
        portal, loop = self._portal, self._loop
        self._portal = self._loop = None
        if portal is None or loop is None:
            return
        if threading.current_thread() is self._thread:  # pragma: no cover - misuse guard
            raise RuntimeError("a runner cannot close itself from its own thread")
        stopped = _stop_soon(portal, loop, None)
        with contextlib.suppress(concurrent.futures.TimeoutError):
            stopped.result(timeout)
        self._thread.join(timeout)
        log.debug("runner %s stopped", self.name)

    def close_soon(self, before: Callable[[], Awaitable[Any]] | None = None
                   ) -> concurrent.futures.Future[None]:
        """Run ``before()`` then stop the loop, without waiting for either.

        Never blocks (safe in ``__del__`` and exit hooks): the returned future
        completes when the loop has stopped. Errors of ``before`` are logged.
        """
        portal, loop = self._portal, self._loop
        self._portal = self._loop = None
        if portal is None or loop is None:
            done: concurrent.futures.Future[None] = concurrent.futures.Future()
            done.set_result(None)
            return done
        return _stop_soon(portal, loop, before)

    def join(self, timeout: float | None) -> bool:
        """Wait for the thread to end; True when it has."""
        self._thread.join(timeout)
        return not self._thread.is_alive()


def _stop_soon(portal: BlockingPortal, loop: asyncio.AbstractEventLoop,
               before: Callable[[], Awaitable[Any]] | None) -> concurrent.futures.Future[None]:
    """Schedule ``before()`` and the portal's stop on ``loop`` from any thread, at once."""
    stopped: concurrent.futures.Future[None] = concurrent.futures.Future()

    async def stop() -> None:
        try:
            if before is not None:
                try:
                    await before()
                except BaseException as exc:
                    log.debug("closing on the runner failed: %r", exc)
            await portal.stop(True)
        finally:
            stopped.set_result(None)

    def spawn() -> None:
        loop.create_task(stop())

    try:
        loop.call_soon_threadsafe(spawn)
    except RuntimeError:  # the loop is closed already
        stopped.set_result(None)
    return stopped


def call_in_loop(loop: asyncio.AbstractEventLoop, fn: Callable[..., Coroutine[Any, Any, T]],
                 *args: Any) -> T:
    """Run coroutine function ``fn`` on ``loop`` (owned by another thread) and wait for it."""
    if _running_loop() is loop:
        raise LoopBlockingError("a blocking call cannot be made on the loop it waits for")
    return asyncio.run_coroutine_threadsafe(fn(*args), loop).result()


async def await_future(fut: concurrent.futures.Future[T]) -> T:
    """Await a future completed on another thread (a runner's) from this loop."""
    return await asyncio.wrap_future(fut)


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


def loop_running() -> bool:
    """Whether the calling thread runs an event loop."""
    return _running_loop() is not None


def on_loop_thread(loop: asyncio.AbstractEventLoop) -> bool:
    return _running_loop() is loop
