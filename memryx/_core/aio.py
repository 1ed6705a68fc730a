"""The async primitives of the core, used by the engine and the devices alike.

* :class:`Channel` - the one bounded FIFO that carries frames and outputs, between
  tasks of one loop or between a loop and threads. It moves *batches*: a
  consumer takes everything that is ready in one call, and a producer on a
  thread wakes a waiting consumer on the loop at most once per batch (the
  wake-ups are coalesced: items put while a wake-up is pending ride along).
* :class:`Budget` - a counting semaphore whose holders take several units at
  once (a batch of frames), first come first served.
* :class:`TaskSet` - tasks that live and die together; failures reported once.

The persistent threads that exchange batches with the loop through a
:class:`Channel` are in :mod:`.workers`; threads are started, and loops woken
from other threads, only by the thread bridge :mod:`.threads`.

Thread rules: a ``Channel`` is created on its loop's thread; ``*_from_thread``
methods are for other threads, the rest for the loop. Every cross-thread
wake-up is a :func:`.threads.call_soon`.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import threading
import weakref
from collections import deque
from collections.abc import Callable, Coroutine, Iterable
from typing import Any, Generic, TypeVar

from .threads import call_soon

__all__ = ["END", "Budget", "Channel", "ChannelClosed", "TaskSet"]

log = logging.getLogger("memryx.core")
T = TypeVar("T")


class ChannelClosed(Exception):
    """The channel was closed and every item in it was taken (or it was aborted)."""


class Channel(Generic[T]):
    """A bounded FIFO of items, taken in batches (see the module docstring).

    ``close()`` ends it: items already in it are still taken, then getters see
    :class:`ChannelClosed`. ``abort()`` drops what it holds and wakes everyone.
    Putting into a closed channel raises :class:`ChannelClosed`.
    """

    def __init__(self, capacity: int, *, loop: asyncio.AbstractEventLoop | None = None) -> None:
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1:
            raise ValueError(f"channel capacity must be an int >= 1, got {capacity!r}")
        self.capacity = capacity
        self._loop = loop or asyncio.get_running_loop()
        self._items: deque[T] = deque()
        self._lock = threading.Lock()
        self._room = threading.Condition(self._lock)  # threads waiting to put
        self._ready = threading.Condition(self._lock)  # threads waiting to get
        self._getter: asyncio.Future[None] | None = None  # one loop-side getter at a time
        self._putters: deque[asyncio.Future[None]] = deque()
        self._wake_pending = False
        self._closed = False
        self._aborted = False
        self._ident = _loop_thread_id(self._loop)
        self.dropped = 0

    # -- state ------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._items)

    @property
    def closed(self) -> bool:
        return self._closed

    def statistics(self) -> dict[str, int]:
        return {"items": len(self._items), "capacity": self.capacity}

    # -- loop side ------------------------------------------------------------------------------
    def put_nowait(self, item: T) -> bool:
        """Put ``item`` if there is room (True), else return False."""
        with self._lock:
            if self._closed:
                raise ChannelClosed
            if len(self._items) >= self.capacity:
                return False
            self._items.append(item)
            self._notify_getters()
        return True

    async def put(self, item: T) -> None:
        """Put ``item``, waiting for room. Cancelled while waiting: it was not put."""
        while not self.put_nowait(item):
            fut = self._loop.create_future()
            self._putters.append(fut)
            try:
                await fut
            finally:
                if fut in self._putters:
                    self._putters.remove(fut)

    def put_many_nowait(self, items: Iterable[T]) -> None:
        """Put every item now, beyond the capacity if need be (the caller bounds it)."""
        with self._lock:
            if self._closed:
                raise ChannelClosed
            self._items.extend(items)
            self._notify_getters()

    def get_nowait(self, limit: int) -> list[T]:
        """Up to ``limit`` items that are ready now (possibly none)."""
        with self._lock:
            if not self._items and self._closed:
                raise ChannelClosed
            return self._take(limit)

    async def get(self, limit: int) -> list[T]:
        """At least one and at most ``limit`` items, waiting for the first.

        Cancelled while waiting: nothing was taken (the items stay for the next call).
        """
        while True:
            with self._lock:
                if self._items:
                    return self._take(limit)
                if self._closed:
                    raise ChannelClosed
                fut = self._getter = self._loop.create_future()
            try:
                await fut
            finally:
                self._getter = None

    def _take(self, limit: int) -> list[T]:
        items = self._items
        if len(items) <= limit:
            batch = list(items)
            items.clear()
        else:
            batch = [items.popleft() for _ in range(limit)]
        if self._room._waiters:  # type: ignore[attr-defined]
            self._room.notify_all()
        if self._putters:
            self._loop.call_soon(self._wake_putters)
        return batch

    def _wake_putters(self) -> None:
        while self._putters and len(self._items) < self.capacity:
            fut = self._putters.popleft()
            if not fut.done():
                fut.set_result(None)
                break

    def close(self) -> None:
        """No more puts; getters take what is left, then see :class:`ChannelClosed`."""
        with self._lock:
            self._closed = True
            self._notify_getters()
            self._room.notify_all()
        for fut in self._putters:
            if not fut.done():
                fut.set_result(None)  # they find the channel closed

    def abort(self) -> int:
        """Close and drop every item; returns how many were dropped."""
        return len(self.abort_items())

    def abort_items(self) -> list[T]:
        """Close and drop every item; returns the dropped items."""
        with self._lock:
            dropped = list(self._items)
            self.dropped += len(dropped)
            self._items.clear()
            self._aborted = True
        self.close()
        return dropped

    # -- both sides -----------------------------------------------------------------------------
    def _notify_getters(self) -> None:
        """Called with the lock held after items were added or the channel closed."""
        if self._ready._waiters:  # type: ignore[attr-defined]
            self._ready.notify()
        if self._getter is None or self._wake_pending:
            return
        if threading.get_ident() == self._ident:
            fut = self._getter
            if not fut.done():
                fut.set_result(None)
        else:  # one wake-up per batch: later puts ride along until the loop runs it
            self._wake_pending = True
            try:
                call_soon(self._loop, self._wake_getter)
            except RuntimeError:  # the loop is closed: nobody waits any more
                self._wake_pending = False

    def _wake_getter(self) -> None:
        self._wake_pending = False
        fut = self._getter
        if fut is not None and not fut.done():
            fut.set_result(None)

    # -- thread side ---------------------------------------------------------------------------
    def put_from_thread(self, item: T, stop: threading.Event | None = None) -> bool:
        """Put ``item`` from a thread, blocking while full; False if the channel closed."""
        with self._lock:
            while len(self._items) >= self.capacity and not self._closed:
                if stop is not None and stop.is_set():
                    return False
                self._room.wait(0.1 if stop is not None else None)
            if self._closed:
                return False
            self._items.append(item)
            self._notify_getters()
        return True

    def get_from_thread(self, limit: int) -> list[T]:
        """At least one and at most ``limit`` items for a thread; [] once closed and empty."""
        with self._lock:
            while not self._items:
                if self._closed or self._loop.is_closed():
                    return []
                self._ready.wait(0.25)  # also notices that the loop has ended
            batch = self._take_threadsafe(limit)
        return batch

    def _take_threadsafe(self, limit: int) -> list[T]:
        items = self._items
        if len(items) <= limit:
            batch = list(items)
            items.clear()
        else:
            batch = [items.popleft() for _ in range(limit)]
        if self._putters:
            call_soon(self._loop, self._wake_putters)
        return batch


def _loop_thread_id(loop: asyncio.AbstractEventLoop) -> int:
    """The id of the thread running ``loop`` (channels are created on it)."""
    try:
        running = asyncio.get_running_loop()
    except RuntimeError:
        running = None
    if running is loop:
        return threading.get_ident()
    thread_id = getattr(loop, "_thread_id", None)  # asyncio and uvloop both keep it
    return int(thread_id) if thread_id is not None else -1


class Budget:
    """A counting semaphore taken in batches, first come first served.

    ``await take(n)`` returns between 1 and ``n`` units as soon as at least one
    is free and nobody queued earlier; ``give(n)`` returns units. A waiter that
    is cancelled holds nothing.
    """

    def __init__(self, total: int) -> None:
        if total < 1:
            raise ValueError(f"a budget needs at least one unit, got {total}")
        self.total = total
        self.free = total
        self._waiters: deque[tuple[asyncio.Future[int], int]] = deque()
        self._failed: BaseException | None = None

    @property
    def used(self) -> int:
        return self.total - self.free

    def take_nowait(self, n: int) -> int:
        """Up to ``n`` units that are free now and wanted by nobody queued earlier."""
        if self._waiters or self.free <= 0:
            return 0
        got = min(n, self.free)
        self.free -= got
        return got

    async def take(self, n: int) -> int:
        if self._failed is not None:
            raise self._failed
        got = self.take_nowait(n)
        if got:
            return got
        fut: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._waiters.append((fut, n))
        try:
            return await fut
        except BaseException:
            if fut.done() and not fut.cancelled():
                self.give(fut.result())  # granted as we were cancelled: hand it on
            else:
                with contextlib.suppress(ValueError):
                    self._waiters.remove((fut, n))
            raise

    def fail(self, exc: BaseException) -> None:
        """Nobody gets units any more: waiters (and later takers) see ``exc``."""
        self._failed = exc
        while self._waiters:
            fut, _ = self._waiters.popleft()
            if not fut.done():
                fut.set_exception(exc)
                # seen: its waiter raises it if it runs, but a loop that stops first (the
                # process exiting mid-run) would print "Future exception was never
                # retrieved" once per waiting stream
                fut.exception()

    def give(self, n: int) -> None:
        self.free += n
        while self.free > 0 and self._waiters:
            fut, want = self._waiters.popleft()
            if fut.done():
                continue
            got = min(want, self.free)
            self.free -= got
            fut.set_result(got)


def weak_handler(fn: Callable[[BaseException], None]) -> Callable[[BaseException], None]:
    """``fn``, holding its object weakly when it is a bound method (an owner's own error
    handler given to something the owner holds: a strong one makes a reference cycle).
    Called once the owner is gone, it does nothing: nobody is left to tell."""
    if not inspect.ismethod(fn):
        return fn
    ref = weakref.WeakMethod(fn)

    def call(exc: BaseException) -> None:
        handler = ref()
        if handler is not None:
            handler(exc)

    return call


class TaskSet:
    """Tasks that live and die together.

    A task that ends with an exception (other than cancellation) is reported to
    ``on_error`` exactly once; nothing is left for the loop's exception handler.

    A bound method as ``on_error`` (its owner's own handler, the usual case) is held
    weakly: owner -> task set -> owner was a reference cycle, so a closed device, engine
    or server session, with its onnxruntime sessions and frame buffers, lived on until
    the next full garbage collection (a device server grew by hundreds of MB per client
    that came and went). Errors after the owner is gone have nobody to go to.
    """

    def __init__(self, name: str, on_error: Callable[[BaseException], None]) -> None:
        self._name = name
        self._on_error = weak_handler(on_error)
        self._tasks: set[asyncio.Task[Any]] = set()

    def spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro, name=f"{self._name}:{name}")
        # owned and cancelled by aclose(); if the loop dies under it, there is nothing to say
        task._log_destroy_pending = False  # type: ignore[attr-defined]
        self._tasks.add(task)
        task.add_done_callback(self._done)
        return task

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None:
            self._on_error(exc)

    def __len__(self) -> int:
        return len(self._tasks)

    def owns(self, task: asyncio.Task[Any] | None) -> bool:
        return task is not None and task in self._tasks

    async def aclose(self) -> None:
        """Cancel every task and wait until all have ended.

        Called from one of its own tasks (a callback closing its accelerator),
        that task is left to finish by itself instead of waiting for itself.
        """
        me = asyncio.current_task()
        while others := [t for t in self._tasks if t is not me]:
            for t in others:
                t.cancel()
            await asyncio.gather(*others, return_exceptions=True)

    def cancel_now(self) -> None:
        """Cancel every task without waiting (the loop may be gone)."""
        for t in list(self._tasks):
            t.cancel()


#: Returned by a producer's function when its stream ended normally.
END: Any = type("End", (), {"__repr__": lambda self: "END"})()
