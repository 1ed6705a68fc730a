"""The one bounded queue type that carries every frame.

Built on anyio memory object streams: paired send / receive ends, ``*_nowait``
variants, end-of-stream when every send end is closed (``clone()`` gives each
producer its own end), ``statistics()``. There is deliberately no way to make
an unbounded one: a slow consumer must slow its producer.
"""

from __future__ import annotations

from typing import TypeVar

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

__all__ = ["ReceiveEnd", "SendEnd", "drain", "get", "open_channel", "put"]

T = TypeVar("T")

SendEnd = MemoryObjectSendStream
ReceiveEnd = MemoryObjectReceiveStream


def open_channel(capacity: int) -> tuple[MemoryObjectSendStream[T], MemoryObjectReceiveStream[T]]:
    """A bounded channel holding at most ``capacity`` items (0: a rendezvous)."""
    if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 0:
        raise ValueError(f"channel capacity must be a finite integer >= 0, got {capacity!r}")
    send, receive = anyio.create_memory_object_stream[T](capacity)
    return send, receive


async def put(send: MemoryObjectSendStream[T], item: T) -> None:
    """Send ``item``: at once when there is room, else wait for room.

    anyio's ``send`` always yields to the loop first; on the per-frame path that
    forced yield costs more than the hand-off itself, so take the fast path when
    it is free. Loops built on ``put``/``get`` still yield whenever a channel is
    full or empty, which a bounded pipeline reaches within its capacity.
    """
    try:
        send.send_nowait(item)
    except anyio.WouldBlock:
        await send.send(item)


async def get(receive: MemoryObjectReceiveStream[T]) -> T:
    """Receive an item: at once when one is ready, else wait (``EndOfStream`` at the end)."""
    try:
        return receive.receive_nowait()
    except anyio.WouldBlock:
        return await receive.receive()


def drain(receive: MemoryObjectReceiveStream[T], limit: int) -> list[T]:
    """Up to ``limit`` items that are ready now, without waiting."""
    items: list[T] = []
    while len(items) < limit:
        try:
            items.append(receive.receive_nowait())
        except (anyio.WouldBlock, anyio.EndOfStream):
            break
    return items
