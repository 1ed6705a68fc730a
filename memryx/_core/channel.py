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

__all__ = ["ReceiveEnd", "SendEnd", "open_channel"]

T = TypeVar("T")

SendEnd = MemoryObjectSendStream
ReceiveEnd = MemoryObjectReceiveStream


def open_channel(capacity: int) -> tuple[MemoryObjectSendStream[T], MemoryObjectReceiveStream[T]]:
    """A bounded channel holding at most ``capacity`` items (0: a rendezvous)."""
    if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 0:
        raise ValueError(f"channel capacity must be a finite integer >= 0, got {capacity!r}")
    send, receive = anyio.create_memory_object_stream[T](capacity)
    return send, receive
