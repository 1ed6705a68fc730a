"""Mode ``"sampled"``'s computations: threads of the simulated device's own that use the
host's spare CPU.

In mode ``"sampled"`` every frame is answered when it is due, with the outputs of the
newest computed frame of its stream; which frames get computed is only a matter of how
fresh those outputs are. So the computations must never be what makes outputs late:

* they run on threads of the device's own (``slots`` of them per model, started with the
  first computation), at the process's priority. (A lower one, ``nice`` 19, was tried,
  and measured on a 2-core host with two CPU-bound processes running, 2026-12-01: a
  niced thread preempted while it
  held the GIL held up the event loop with it, and releases were late by up to 18 ms
  at the 99th percentile instead of under 3 ms; and it computed a thirtieth as many
  frames.)
* a thread takes the next frame to compute without the loop's help, and hands a finished
  one to the loop without waking it when the loop is sure to look soon anyway (a release
  wake-up is pending and no frame waits for a computation): at a fast model's rates the
  loop's wake-ups are what the pipeline is short of. Otherwise it wakes the loop, at most
  one wake-up pending at a time.

The device calls :meth:`BackgroundCompute.take` on the loop where it looks (each submit,
each release wake-up) and from the wake-up.
"""

from __future__ import annotations

import asyncio
import threading
from collections import deque
from collections.abc import Callable
from typing import Any, Generic, TypeVar

from .._core.threads import call_soon, start_thread

__all__ = ["BackgroundCompute"]

#: How often an idle background thread looks whether its loop has ended without telling it.
IDLE_POLL_S = 0.25

J = TypeVar("J")


class BackgroundCompute(Generic[J]):
    """Computes queued jobs on up to ``threads`` threads of its own (see the module).

    ``compute(job)`` runs on a thread and returns its error as a value (what it raises
    all the same becomes the job's result); ``wake()`` runs on ``loop`` when a finished
    job would otherwise wait; ``looks_soon()`` is asked on the thread (reading
    loop-owned state without locks, single reads only) whether the loop is sure to call
    :meth:`take` soon anyway.
    ``jobs`` is the queue (given or new; the device may read its length and, on the loop,
    clear it).
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, name: str,
                 compute: Callable[[J], Any], wake: Callable[[], None],
                 looks_soon: Callable[[], bool], threads: int = 1,
                 jobs: deque[J] | None = None) -> None:
        self._loop = loop
        self._name = name
        self._compute = compute
        self._wake = wake
        self._looks_soon = looks_soon
        self._max_threads = max(1, threads)
        self._threads: list[threading.Thread] = []
        self._idle = 0
        self._cond = threading.Condition()
        self._closed = False
        self._wake_pending = False
        self.jobs: deque[J] = deque() if jobs is None else jobs
        self.finished: deque[tuple[J, Any]] = deque()

    def submit(self, job: J) -> None:
        """Queue ``job`` (on the loop); a thread takes it at once if one is free."""
        with self._cond:
            if self._closed:
                raise RuntimeError("the background compute threads are closed")
            self.jobs.append(job)
            if self._idle:
                self._cond.notify()
            elif len(self._threads) < self._max_threads:
                self._threads.append(start_thread(
                    f"{self._name}-{len(self._threads)}", self._run))

    def take(self) -> list[tuple[J, Any]]:
        """The finished jobs and their results, oldest first (on the loop)."""
        self._wake_pending = False  # (before reading: a job finished from now on wakes us)
        finished = self.finished
        out = []
        while finished:
            out.append(finished.popleft())
        return out

    def close(self) -> None:
        """No more jobs; idle threads end now, a busy one after its job (its result is
        dropped: the device cancels what it was for)."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def _next(self) -> J | None:
        with self._cond:
            while True:
                if self._closed or self._loop.is_closed():
                    return None
                if self.jobs:
                    try:
                        return self.jobs.popleft()
                    except IndexError:  # cleared by the loop meanwhile
                        continue
                self._idle += 1
                try:
                    self._cond.wait(IDLE_POLL_S)
                finally:
                    self._idle -= 1

    def _on_wake(self) -> None:
        """On the loop: the wake-up a thread asked for."""
        self._wake_pending = False  # (whatever it was for may have been taken meanwhile)
        self._wake()

    def _run(self) -> None:
        while (job := self._next()) is not None:
            try:
                result = self._compute(job)
            except BaseException as exc:  # (compute returns its errors: this is a last guard,
                result = exc  # so that a job is never lost with its thread)
            self.finished.append((job, result))
            if self._closed:
                return
            if self._wake_pending or self._looks_soon():
                continue
            self._wake_pending = True
            try:
                call_soon(self._loop, self._on_wake)
            except RuntimeError:  # the loop is gone: nobody waits any more
                return
