"""Persistent worker threads that run blocking user code (sync callbacks) and
exchange batches with the loop through a :class:`~.aio.Channel`. No thread pool
round trip per batch.

* :class:`ThreadProducer` - calls a producing function (an input callback) while
  the loop grants it credits, putting each result into its channel.
* :class:`ThreadConsumer` - hands batches from its channel to a consuming function
  (an output callback) and reports each batch back to the loop.

Their threads are started, and their loops woken, through the thread bridge
(:mod:`.threads`); thread names are ``<name>-<n>``, ``n`` counting up per process.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Callable
from typing import Any, Generic, TypeVar

from .aio import END, Channel
from .threads import call_soon, start_thread, user_code

__all__ = ["ThreadConsumer", "ThreadProducer"]

T = TypeVar("T")
_names = itertools.count()


class ThreadProducer(Generic[T]):
    """A persistent thread that calls ``produce()`` while it holds credits.

    The loop grants credits (:meth:`grant`, e.g. free units of a :class:`Budget`);
    the thread calls ``produce()`` once per credit, back to back, and puts each
    result into :attr:`items` at once (the loop side takes them in batches). It
    ends when ``produce`` returns :data:`END` or raises (kept in :attr:`error`),
    or when ``stop`` is set (checked before every call); then :attr:`items` is
    closed. Credits it did not use are the loop's to give back
    (``granted - produced``). A thread blocked inside ``produce`` at stop is
    left to finish by itself (a daemon; it calls nothing afterwards); an item it
    returns then is reported to ``on_lost`` (on the thread).
    """

    def __init__(self, name: str, produce: Callable[[], Any], capacity: int,
                 stop: threading.Event, *, gate: threading.Semaphore | None = None,
                 on_lost: Callable[[], None] | None = None) -> None:
        self.items: Channel[T] = Channel(capacity)
        self._on_lost = on_lost
        self.error: BaseException | None = None
        self.produced = 0
        self.granted = 0
        self._credits = 0
        self._halted = False
        self._produce = produce
        self._stop = stop
        self._gate = gate
        self._cond = threading.Condition()
        self._thread = start_thread(f"{name}-{next(_names)}", self._run)

    def grant(self, n: int) -> None:
        """Allow ``n`` more calls (from the loop)."""
        with self._cond:
            self.granted += n
            self._credits += n
            self._cond.notify()

    def halt(self) -> None:
        """Make no further call (from the loop); a call under way finishes by itself."""
        with self._cond:
            self._halted = True
            self._cond.notify()

    def _stopped(self) -> bool:
        return self._halted or self._stop.is_set() or self.items._loop.is_closed()

    def _run(self) -> None:
        try:
            with user_code():
                while True:
                    with self._cond:
                        while not self._credits and not self._stopped():
                            self._cond.wait(0.25)  # also notices a stop set without a wake-up
                        if self._stopped():
                            return
                        n, self._credits = self._credits, 0
                    for _ in range(n):
                        if self._stopped():
                            return
                        if self._gate is not None:
                            with self._gate:
                                item = self._produce()
                        else:
                            item = self._produce()
                        if item is END:
                            return
                        self.produced += 1
                        if not self.items.put_from_thread(item, self._stop):
                            if self._on_lost is not None:  # made, then nobody took it
                                self._on_lost()
                            return
        except BaseException as exc:
            self.error = exc
        finally:
            self._close_items()

    def _close_items(self) -> None:
        try:
            call_soon(self.items._loop, self.items.close)
        except RuntimeError:  # the loop is gone: nobody listens
            self.items.close()


class ThreadConsumer(Generic[T]):
    """A persistent thread that hands batches from :attr:`items` to ``consume``.

    ``consume(batch)`` runs on the thread and returns a report that is passed to
    ``on_done(report)`` on the loop (one wake-up per batch). The thread ends
    when :attr:`items` is closed and empty, or at ``stop``.
    """

    def __init__(self, name: str, consume: Callable[[list[T]], Any],
                 on_done: Callable[[Any], None], capacity: int, stop: threading.Event,
                 batch: int) -> None:
        self.items: Channel[T] = Channel(capacity)
        self._consume = consume
        self._on_done = on_done
        self._stop = stop
        self._batch = batch
        self._loop = self.items._loop
        self._thread = start_thread(f"{name}-{next(_names)}", self._run)

    def _run(self) -> None:
        with user_code():
            while not self._stop.is_set():
                batch = self.items.get_from_thread(self._batch)
                if not batch:
                    return
                report = self._consume(batch)
                try:
                    call_soon(self._loop, self._on_done, report)
                except RuntimeError:  # the loop is gone
                    return
