"""The thread bridge: the one module that starts threads and hops between them.

Every thread the runtime starts, and every call that crosses from one thread to
another (into an event loop from a thread, onto a worker thread from a loop),
goes through a function here; ``tests/test_architecture.py`` fails on any other
module that calls ``threading.Thread``, ``call_soon_threadsafe``,
``run_coroutine_threadsafe``, ``wrap_future``, ``anyio.to_thread`` /
``anyio.from_thread``, ``run_in_executor`` or a thread pool. Users of threads
built on it: :mod:`.workers` (persistent threads for sync callbacks),
:mod:`.streams` (the input worker pool), :mod:`.aio` (a channel's cross-thread
wake-ups), the facades (:mod:`memryx.accl`, the pytest plugin, the clock).

* :func:`start_thread` - start a named thread (a daemon unless told otherwise).
* :func:`call_soon` - schedule a plain call on a loop owned by another thread.
* :func:`run_in_loop` / :func:`call_in_loop` - run a coroutine on a loop owned by
  another thread: a ``concurrent.futures.Future``, or its result (blocking).
* :func:`loop_future` / :func:`await_future` - a future completed on another
  thread, made awaitable on this loop.
* :func:`run_sync` runs a blocking function (an onnxruntime session setup, a
  blocking pre/post-processing step) on a worker thread of the running loop's own
  pool (daemons that end when idle or when the loop closes) and awaits it without
  blocking the loop. If the awaiting task is cancelled, the worker is abandoned
  (unless told otherwise): the call returns at once and whatever the function
  returns later is dropped.
* :class:`Runner` owns one named thread with its own event loop (uvloop when it
  is installed) and an anyio ``BlockingPortal``; sync facades call into the
  core through it and block their own thread only.
* :func:`user_code` marks a worker thread as running user callbacks;
  :func:`check_not_on_loop` refuses a blocking call from a thread that runs an
  event loop (it would deadlock or stall that loop).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import contextvars
import itertools
import logging
import queue
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from typing import Any, TypeVar

import anyio
from anyio.from_thread import BlockingPortal

from .. import _lifecycle as lifecycle
from .._exceptions import ClosedError, LoopBlockingError

__all__ = [
    "HAVE_UVLOOP",
    "INTERRUPT_SLICE_S",
    "Runner",
    "await_future",
    "call_in_loop",
    "call_soon",
    "check_not_on_loop",
    "end_workers",
    "in_user_code",
    "loop_future",
    "loop_running",
    "on_loop_thread",
    "run_in_loop",
    "run_sync",
    "start_thread",
    "user_code",
    "wait_interruptibly",
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


def start_thread(name: str, target: Callable[..., Any], *args: Any,
                 daemon: bool | None = True) -> threading.Thread:
    """Start ``target(*args)`` on a new thread called ``name`` and return the thread.

    A daemon by default: a runtime thread never keeps a process alive (the exit hook
    of :mod:`memryx._lifecycle` stops what still runs). ``daemon=None``: inherit the
    flag of the calling thread, as ``threading.Thread`` does.
    """
    thread = threading.Thread(target=target, args=args, name=name, daemon=daemon)
    thread.start()
    return thread


def call_soon(loop: asyncio.AbstractEventLoop, fn: Callable[..., Any], *args: Any) -> None:
    """Schedule ``fn(*args)`` on ``loop`` from any thread, without waiting.

    Raises ``RuntimeError`` when ``loop`` is closed (callers decide what that means).
    """
    loop.call_soon_threadsafe(fn, *args)


def run_in_loop(loop: asyncio.AbstractEventLoop,
                coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
    """Run ``coro`` on ``loop`` (owned by another thread); its future, at once."""
    return asyncio.run_coroutine_threadsafe(coro, loop)


def loop_future(fut: concurrent.futures.Future[T]) -> asyncio.Future[T]:
    """An asyncio future of the running loop that follows ``fut`` (completed on another
    thread); cancelling it cancels ``fut``."""
    return asyncio.wrap_future(fut)


#: How long an idle worker thread of :func:`run_sync` waits for more work before it ends.
WORKER_IDLE_S = 10.0
#: How often an idle worker thread looks whether its event loop has closed (seconds).
WORKER_POLL_S = 0.1

_Job = tuple[contextvars.Context, Callable[..., Any], tuple[Any, ...], "asyncio.Future[Any]"]


class _Pool:
    """The worker threads of one event loop (state guarded by ``_pools_lock``)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.idle: list[queue.SimpleQueue[_Job | None]] = []  # inboxes of idle workers, newest last
        self.threads = 0


_pools: dict[asyncio.AbstractEventLoop, _Pool] = {}
_pools_lock = threading.Lock()
_worker_names = itertools.count()


def _hand_over(loop: asyncio.AbstractEventLoop, job: _Job) -> None:
    """Give ``job`` to an idle worker thread of ``loop``, or to a new one."""
    with _pools_lock:
        pool = _pools.get(loop)
        if pool is None:
            pool = _pools[loop] = _Pool(loop)
        if pool.idle:
            pool.idle.pop().put(job)
            return
        pool.threads += 1
    inbox: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
    inbox.put(job)
    try:
        start_thread(f"memryx-worker-{next(_worker_names)}", _serve, pool, inbox)
    except BaseException:
        _retire(pool)
        raise


def _retire(pool: _Pool) -> None:
    """Count a worker thread of ``pool`` out (under ``_pools_lock``)."""
    with _pools_lock:
        pool.threads -= 1
        if not pool.threads and _pools.get(pool.loop) is pool:
            del _pools[pool.loop]


def _serve(pool: _Pool, inbox: queue.SimpleQueue[_Job | None]) -> None:
    """A worker thread of :func:`run_sync`: runs the jobs put in its inbox, one at a time.

    It ends once idle for :data:`WORKER_IDLE_S`, or within :data:`WORKER_POLL_S` of its
    loop being closed: its life is bound to the loop, never to a task (anyio's workers
    outlived a loop closed while a task that started one was pending, and being
    non-daemon, held the interpreter's exit)."""
    idle_since = time.monotonic()
    try:
        while True:
            try:
                job = inbox.get(timeout=WORKER_POLL_S)
            except queue.Empty:
                with _pools_lock:
                    if not inbox.empty():  # handed a job just now
                        continue
                    if not pool.loop.is_closed() and time.monotonic() - idle_since < WORKER_IDLE_S:
                        continue
                    pool.idle.remove(inbox)  # no job can be handed to it any more
                return
            if job is None:  # its loop has closed (see end_workers)
                return
            context, fn, args, fut = job
            result: Any = None
            error: BaseException | None = None
            if not fut.cancelled():  # else abandoned before it started: skipped (a racy
                try:                 # read, then harmless)
                    result = context.run(fn, *args)
                except BaseException as exc:  # every outcome goes to the awaiting coroutine
                    error = exc
            idle_since = time.monotonic()
            with _pools_lock:  # idle before the caller hears back: its next call reuses it
                pool.idle.append(inbox)
            try:
                call_soon(pool.loop, _settle, fut, result, error)
            except RuntimeError:  # the loop is closed: nobody awaits anything from it
                with _pools_lock, contextlib.suppress(ValueError):
                    pool.idle.remove(inbox)
                return
            del job, context, fn, args, fut, result, error
    finally:
        _retire(pool)


def end_workers(loop: asyncio.AbstractEventLoop) -> None:
    """End the idle worker threads of ``loop``, which has closed, at once (rather than
    at their next look, within :data:`WORKER_POLL_S`); busy ones end when they finish."""
    with _pools_lock:
        pool = _pools.get(loop)
        if pool is None:
            return
        inboxes, pool.idle = pool.idle, []
    for inbox in inboxes:
        inbox.put(None)


def _settle(fut: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    if fut.done():  # abandoned: the outcome is dropped
        return
    if isinstance(error, StopIteration):  # a future cannot carry it
        wrapped = RuntimeError("the function raised StopIteration")
        wrapped.__cause__ = error
        error = wrapped
    if error is not None:
        fut.set_exception(error)
    else:
        fut.set_result(result)


async def run_sync(fn: Callable[..., T], *args: Any, abandon_on_cancel: bool = True) -> T:
    """Run ``fn(*args)`` on a worker thread of the running loop, in a copy of the caller's
    context, and await its outcome. Cancelled, the call returns at once and ``fn`` is
    abandoned (it finishes on its thread, its outcome is dropped); with
    ``abandon_on_cancel=False`` the cancellation waits until ``fn`` has returned.

    The loop's worker threads are daemons that end when idle or when the loop closes (a
    user's never-returning function keeps neither the loop's close nor the exit waiting).
    """
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[T] = loop.create_future()
    _hand_over(loop, (contextvars.copy_context(), fn, args, fut))
    if abandon_on_cancel:
        return await fut
    interrupted: BaseException | None = None
    with anyio.CancelScope(shield=True):  # anyio's own cancellation waits too, without a spin
        while not fut.done():
            try:
                await asyncio.wait((fut,))
            except asyncio.CancelledError as exc:
                interrupted = exc  # a native one: remembered, raised once fn has returned
    if interrupted is not None:
        if not fut.cancelled():
            fut.exception()  # retrieved: dropped without a "never retrieved" warning
        raise interrupted
    return fut.result()


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
            if ready.done() and not ready.exception():
                end_workers(ready.result()[1])  # a runner's workers end with it

        # A daemon thread: a runner never keeps a process alive; accelerators left
        # open are stopped by the exit hook of memryx._lifecycle before finalization.
        self._thread = start_thread(self.name, main)
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
        try:
            fut = self.start(fn, *args)
        except KeyboardInterrupt:  # while the portal hands the call over: as short
            raise KeyboardInterrupt from None
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
        call_soon(loop, spawn)
    except RuntimeError:  # the loop is closed already
        stopped.set_result(None)
    return stopped


def call_in_loop(loop: asyncio.AbstractEventLoop, fn: Callable[..., Coroutine[Any, Any, T]],
                 *args: Any) -> T:
    """Run coroutine function ``fn`` on ``loop`` (owned by another thread) and wait for it."""
    if _running_loop() is loop:
        raise LoopBlockingError("a blocking call cannot be made on the loop it waits for")
    return run_in_loop(loop, fn(*args)).result()


async def await_future(fut: concurrent.futures.Future[T]) -> T:
    """Await a future completed on another thread (a runner's) from this loop."""
    return await loop_future(fut)


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
