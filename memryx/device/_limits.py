"""What one device server lets each client use: the per-connection limits.

Every limit is a maximum the operator may change (``memryx serve --help``); each
one that a client hits ends that client's connection only, with a fatal ERROR
that names the limit and the option that raises it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields

__all__ = ["ServerLimits"]

_MiB = 1024 * 1024


@dataclass(frozen=True)
class ServerLimits:
    """Per-connection and per-server limits of a device server.

    max_connections: clients connected at once; one more is refused with a reason.
    max_message_bytes: largest message (a DFP or a frame, however many chunks
        it travels in) the server accepts and announces to clients
        (``--max-message-mb``); the server holds at most one such partial
        message per connection.
    max_buffered_bytes: frame bytes one connection may have queued in the
        server, not yet on the chip; beyond it the server stops reading that
        connection until the chip catches up (backpressure, nobody is cut off).
    handshake_timeout: seconds from connect to an open DFP; a client slower than
        this (a slowloris dripping bytes) is cut off.
    idle_timeout: seconds a connection may send nothing while it has nothing in
        flight; clients keep their connection alive by themselves.
    stall_timeout: seconds a client may take not one byte of the outputs waiting
        for it (its buffer full); then it is cut off. Reading slowly is progress.
    allowed_uids: user ids that may connect over the Unix socket (``SO_PEERCRED``);
        default: only the server's own user.
    """

    max_connections: int = 64
    max_message_bytes: int = 256 * _MiB
    max_buffered_bytes: int = 64 * _MiB
    handshake_timeout: float = 10.0
    idle_timeout: float = 300.0
    stall_timeout: float = 30.0
    allowed_uids: frozenset[int] = field(default_factory=lambda: frozenset({os.getuid()}))

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "allowed_uids":
                if not isinstance(value, frozenset) or not all(
                        isinstance(u, int) and u >= 0 for u in value):
                    raise TypeError(f"allowed_uids must be a frozenset of uids, got {value!r:.80}")
            elif isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"{f.name} must be a positive number, got {value!r:.80}")
        if not isinstance(self.max_connections, int) or not isinstance(
                self.max_message_bytes, int) or not isinstance(self.max_buffered_bytes, int):
            raise TypeError("max_connections, max_message_bytes and max_buffered_bytes are ints")
        if self.max_message_bytes > 1 << 50:
            raise ValueError(f"max_message_bytes must be at most 2**50, got "
                             f"{self.max_message_bytes}")
