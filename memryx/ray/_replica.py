"""One pool replica: a Ray actor that owns one accelerator on its node.

The actor is an *async* actor: Ray runs its methods on one event loop, and the
replica binds an :class:`~memryx.AsyncAccl` to that loop, so the frames of many
concurrent ``infer`` calls are pipelined on the device, each call getting
exactly its own outputs (``AsyncAccl.arun``).

The accelerator is opened lazily by the first method that needs it (``ready``
at pool creation, or the first frame after Ray restarted the actor), never in
``__init__``: a DFP that cannot be loaded is an error of ``ready`` that the
pool raises to its creator, not a crash that Ray would keep restarting.
A :class:`~memryx.DeviceError` drops the accelerator; the next call opens a
new one, so a replica recovers when its device (a ``memryx serve`` on its
node) comes back.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from typing import Any

import numpy as np
from numpy.typing import NDArray

from memryx import AsyncAccl, DeviceError, Dfp

__all__ = ["Replica"]

log = logging.getLogger("memryx.ray")


class Replica:
    """The body of a replica actor (wrapped with ``ray.remote`` by the pool)."""

    def __init__(self, dfp: NDArray[np.uint8], group_id: int, device: str | None,
                 device_options: dict[str, Any]) -> None:
        # ``dfp`` is the pool's one copy in the object store, resolved by Ray on
        # this node: a read-only view on shared memory, not a copy per replica.
        self._dfp = dfp
        self._group_id = group_id
        self._device = device
        self._device_options = device_options
        self._accl: AsyncAccl | None = None
        self._stack: contextlib.AsyncExitStack | None = None
        self._lock: asyncio.Lock | None = None
        self._frames = 0

    async def _accelerator(self) -> AsyncAccl:
        if self._accl is not None:
            return self._accl
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            if self._accl is None:
                dfp = Dfp(self._dfp.data)
                stack = contextlib.AsyncExitStack()
                accl = AsyncAccl(dfp, self._group_id, device=self._device,
                                 **self._device_options)
                try:
                    await stack.enter_async_context(accl)
                except BaseException:
                    await stack.aclose()
                    raise
                self._accl, self._stack = accl, stack
            return self._accl

    async def _drop(self) -> None:
        stack, self._accl, self._stack = self._stack, None, None
        if stack is not None:
            with contextlib.suppress(Exception):
                await stack.aclose()

    async def ready(self) -> dict[str, Any]:
        """Open the accelerator (if needed) and say where this replica runs."""
        try:
            await self._accelerator()
        except DeviceError:
            await self._drop()
            raise
        import ray

        return {"pid": os.getpid(), "host": socket.gethostname(),
                "node_id": ray.get_runtime_context().get_node_id()}

    async def infer(self, frame: Any, model_idx: int) -> Any:
        """The outputs of one frame (the errors of ``AsyncAccl.arun``)."""
        accl = await self._accelerator()
        try:
            outputs = await accl.arun(frame, model_idx)
        except DeviceError:
            log.warning("replica %d: device failed; reopening it on the next call", os.getpid())
            await self._drop()
            raise
        self._frames += 1
        return outputs

    async def statistics(self) -> dict[str, Any]:
        stats: dict[str, Any] = {"pid": os.getpid(), "frames": self._frames}
        if self._accl is not None:
            stats["accelerator"] = self._accl.statistics()
        return stats

    async def close(self) -> None:
        """Close the accelerator (the pool kills the actor afterwards)."""
        await self._drop()
