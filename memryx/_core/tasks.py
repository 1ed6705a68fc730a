"""A small owner of asyncio tasks: spawn, watch for failures, cancel and await all."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from typing import Any

__all__ = ["TaskSet"]

log = logging.getLogger("memryx.core")


class TaskSet:
    """Tasks that live and die together.

    A task that ends with an exception (other than cancellation) is reported to
    ``on_error`` exactly once; nothing is left for the loop's exception handler.
    """

    def __init__(self, name: str, on_error: Callable[[BaseException], None]) -> None:
        self._name = name
        self._on_error = on_error
        self._tasks: set[asyncio.Task[Any]] = set()

    def spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro, name=f"{self._name}:{name}")
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
