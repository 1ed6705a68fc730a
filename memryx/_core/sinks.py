"""Where request outputs go: the sinks of ``run``, ``astream`` and ``send``/``receive``.

A sink lives on the loop; the lane's collector calls ``deliver`` / ``fail`` on it.
"""

from __future__ import annotations

import asyncio
from collections import deque

from .._exceptions import ClosedError
from .aio import Budget
from .lane import Frame, Lane

__all__ = ["RECEIVE_DEPTH", "BatchSink", "ChannelSink", "StreamSink", "Waiter"]

#: Outputs a ``SyncAccl`` holds per model for ``receive`` (beyond the frame budget,
#: which holds more on the way) before ``send`` waits.
RECEIVE_DEPTH = 16


class Waiter:
    """Wake-ups for loop tasks (cheaper than a new Event per wait)."""

    def __init__(self) -> None:
        self._futs: list[asyncio.Future[None]] = []

    async def wait(self) -> None:
        fut = asyncio.get_running_loop().create_future()
        self._futs.append(fut)
        try:
            await fut
        finally:
            if fut in self._futs:
                self._futs.remove(fut)

    def wake(self) -> None:
        futs, self._futs = self._futs, []
        for fut in futs:
            if not fut.done():
                fut.set_result(None)


class BatchSink:
    """The outputs of one ``run`` / ``arun`` request, by position."""

    def __init__(self, n: int) -> None:
        self.results: list[Frame | None] = [None] * n
        self.remaining = n
        self.error: BaseException | None = None
        self.cancelled = False
        self._waiter = Waiter()

    def deliver(self, key: int, outputs: Frame) -> None:
        if self.cancelled:
            return
        self.results[key] = outputs
        self.remaining -= 1
        if self.remaining == 0:
            self._waiter.wake()

    def fail(self, exc: BaseException) -> None:
        if self.error is None:
            self.error = exc
        self._waiter.wake()

    async def wait(self) -> list[Frame]:
        while self.remaining and self.error is None:
            await self._waiter.wait()
        if self.error is not None and self.remaining:
            raise self.error
        return [r for r in self.results if r is not None]


class _QueueSink:
    """Outputs waiting in order for a consumer; taking one is all or nothing."""

    def __init__(self) -> None:
        self.outputs: deque[Frame] = deque()
        self.error: BaseException | None = None
        self.closed = False
        self._waiter = Waiter()

    def deliver(self, key: int, outputs: Frame) -> None:
        if not self.closed:
            self.outputs.append(outputs)
            self._waiter.wake()

    def fail(self, exc: BaseException) -> None:
        if self.error is None:
            self.error = exc
        self._waiter.wake()

    def close(self) -> None:
        self.closed = True
        self.outputs.clear()
        self._waiter.wake()

    def take_nowait(self) -> Frame | None:
        if self.outputs:
            return self.outputs.popleft()
        if self.error is not None:
            raise self.error
        if self.closed:
            raise ClosedError("the accelerator is closed")
        return None

    async def take(self) -> Frame:
        """The next output. Cancelled while waiting: nothing was taken."""
        while True:
            out = self.take_nowait()
            if out is not None:
                return out
            await self._waiter.wait()


class ChannelSink(_QueueSink):
    """Outputs of ``SyncAccl.send`` frames, waiting for ``receive``.

    ``window`` bounds frames sent and not yet received; the lane never waits
    for this sink, so ``run`` on the same model is never stuck behind it.
    """

    def __init__(self) -> None:
        super().__init__()
        self.window: Budget | None = None

    def bind(self, lane: Lane) -> Budget:
        if self.window is None:
            self.window = Budget(RECEIVE_DEPTH + lane.budget.total)
        return self.window

    def fail(self, exc: BaseException) -> None:
        super().fail(exc)
        if self.window is not None:
            self.window.fail(exc)  # a send waiting for room sees it too

    def take_nowait(self) -> Frame | None:
        out = super().take_nowait()
        if out is not None and self.window is not None:
            self.window.give(1)
        return out


class StreamSink(_QueueSink):
    """Outputs of one ``astream``, at most ``window`` in flight or waiting."""

    def __init__(self, window: int) -> None:
        super().__init__()
        self.slots = Budget(window)
