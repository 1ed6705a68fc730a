"""How the fd device reaches a device server: addresses, connect, TLS, deadlines.

* :class:`Address`: ``unix:PATH``, ``tcp://HOST:PORT`` or ``tcps://HOST:PORT``.
* :func:`connect`: a connected non-blocking socket (and, for ``tcps``, a
  :class:`TlsIO` that finished its handshake), all within the deadline. A Unix
  server run by another user (root excepted) is refused before a byte is sent.
* :class:`PlainIO` / :class:`TlsIO`: ``recv`` and ``sendmsg`` over the socket,
  the second through an in-memory TLS object (``ssl.SSLObject``), so the fd
  device drives both the same way from its loop callbacks.
* :class:`Watchdog`: the one deadline of every wait. While the client waits on
  the server (frames in flight, a reply due, a write blocked) and no byte has
  moved for ``timeout`` seconds, it declares the server dead; while the
  connection is idle it asks for a keep-alive now and then.
"""

from __future__ import annotations

import asyncio
import os
import socket
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

from .._exceptions import DeviceError
from ._listen import check_server_owner

__all__ = ["DEFAULT_TIMEOUT", "TIMEOUT_ENV", "Address", "PlainIO", "TlsIO", "Watchdog",
           "connect", "resolve_timeout"]

#: Environment variable with the fd device's deadline, in seconds.
TIMEOUT_ENV: Final = "MEMRYX_DEVICE_TIMEOUT"
#: Seconds the fd device waits for a server that moves no byte, when nothing says otherwise.
DEFAULT_TIMEOUT: Final = 30.0
_TLS_CHUNK: Final = 256 * 1024


def resolve_timeout(timeout: float | None) -> float:
    """The argument, else ``$MEMRYX_DEVICE_TIMEOUT``, else :data:`DEFAULT_TIMEOUT`."""
    source = "timeout"
    if timeout is None:
        text = os.environ.get(TIMEOUT_ENV)
        if not text:
            return DEFAULT_TIMEOUT
        source = TIMEOUT_ENV
        try:
            timeout = float(text)
        except ValueError:
            raise ValueError(f"{TIMEOUT_ENV}={text!r} is not a number of seconds") from None
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not (
            0 < timeout < 1e9):
        raise ValueError(f"{source} must be a positive number of seconds, got {timeout!r}")
    return float(timeout)


@dataclass(frozen=True)
class Address:
    """Where a device server listens."""

    scheme: str  # "unix", "tcp" or "tcps"
    path: str = ""
    host: str = ""
    port: int = 0

    @classmethod
    def parse(cls, text: str) -> Address:
        """``unix:PATH`` (or a bare path), ``tcp://HOST:PORT``, ``tcps://HOST:PORT``."""
        for scheme in ("tcp", "tcps"):
            prefix = f"{scheme}://"
            if text.startswith(prefix):
                host, sep, port = text[len(prefix):].rpartition(":")
                host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
                if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
                    raise ValueError(f"bad device address {text!r}: expected "
                                     f"{scheme}://HOST:PORT, like {scheme}://127.0.0.1:10000")
                return cls(scheme, host=host, port=int(port))
        path = text[5:] if text.startswith("unix:") else text
        if not path:
            raise ValueError(f"bad device address {text!r}: expected unix:/path/to/socket")
        return cls("unix", path=path)

    def __str__(self) -> str:
        if self.scheme == "unix":
            return f"unix:{self.path}"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}"


class PlainIO:
    """``recv`` / ``sendmsg`` straight on the socket."""

    pending = False

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock

    def recv(self, size: int) -> bytes | None:
        return self._sock.recv(size)

    def sendmsg(self, pieces: list[memoryview]) -> int:
        return self._sock.sendmsg(pieces) if pieces else 0


class TlsIO:
    """TLS over a non-blocking socket, through ``ssl.SSLObject`` and memory BIOs.

    ``recv`` returns ``None`` when the bytes read held no application data yet;
    ``sendmsg`` encrypts up to 256 KiB, returns the plaintext bytes it took,
    and keeps the ciphertext the kernel did not take (``pending``) for the next
    call (which raises ``BlockingIOError`` while it cannot flush it).
    """

    def __init__(self, sock: socket.socket, ctx: ssl.SSLContext, server_hostname: str) -> None:
        self._sock = sock
        self._in = ssl.MemoryBIO()
        self._out = ssl.MemoryBIO()
        self._obj = ctx.wrap_bio(self._in, self._out, server_hostname=server_hostname)
        self._unsent = bytearray()

    @property
    def pending(self) -> bool:
        return bool(self._unsent)

    def _flush(self) -> None:
        self._unsent += self._out.read()
        while self._unsent:
            try:
                sent = self._sock.send(self._unsent)
            except (BlockingIOError, InterruptedError):
                return
            del self._unsent[:sent]

    async def _ready(self, loop: asyncio.AbstractEventLoop, write: bool) -> None:
        fut: asyncio.Future[None] = loop.create_future()
        fd = self._sock.fileno()

        def ready() -> None:
            if not fut.done():
                fut.set_result(None)

        (loop.add_writer if write else loop.add_reader)(fd, ready)
        try:
            await fut
        finally:
            (loop.remove_writer if write else loop.remove_reader)(fd)

    async def handshake(self, loop: asyncio.AbstractEventLoop) -> None:
        while True:
            try:
                self._obj.do_handshake()
                done = True
            except ssl.SSLWantReadError:
                done = False
            self._flush()
            while self._unsent:
                await self._ready(loop, write=True)
                self._flush()
            if done:
                return
            await self._ready(loop, write=False)
            try:
                data = self._sock.recv(1 << 16)
            except (BlockingIOError, InterruptedError):
                continue
            if not data:
                raise ConnectionResetError("the server closed the connection during the TLS "
                                           "handshake")
            self._in.write(data)

    def recv(self, size: int) -> bytes | None:
        raw = self._sock.recv(size)
        if raw:
            self._in.write(raw)
        else:
            self._in.write_eof()
        chunks: list[bytes] = []
        while True:
            try:
                chunk = self._obj.read(size)
            except ssl.SSLWantReadError:
                break
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                return b"".join(chunks)
            if not chunk:
                return b"".join(chunks)
            chunks.append(chunk)
        self._flush()  # a read may produce records to send (session tickets, key updates)
        return b"".join(chunks) if chunks else None

    def sendmsg(self, pieces: list[memoryview]) -> int:
        self._flush()
        if self._unsent:
            raise BlockingIOError("TLS records still waiting for the socket")
        taken: list[memoryview] = []
        size = 0
        for piece in pieces:
            if size >= _TLS_CHUNK:
                break
            part = piece[: _TLS_CHUNK - size]
            taken.append(part)
            size += len(part)
        if size:
            self._obj.write(b"".join(taken))
            self._flush()
        return size


async def connect(address: Address, deadline_s: float, tls: ssl.SSLContext | None = None
                  ) -> tuple[socket.socket, PlainIO | TlsIO]:
    """A connected non-blocking socket to ``address``, with its I/O (see the docstring)."""
    loop = asyncio.get_running_loop()
    sock: socket.socket | None = None
    try:
        async with asyncio.timeout(deadline_s):
            if address.scheme == "unix":
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                sock.setblocking(False)
                await loop.sock_connect(sock, address.path)
                check_server_owner(sock, address.path)
                return sock, PlainIO(sock)
            infos = await loop.getaddrinfo(address.host, address.port, type=socket.SOCK_STREAM)
            family, stype, proto, _, sockaddr = infos[0]
            sock = socket.socket(family, stype, proto)
            sock.setblocking(False)
            await loop.sock_connect(sock, sockaddr)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
            if address.scheme == "tcp":
                return sock, PlainIO(sock)
            io = TlsIO(sock, tls or ssl.create_default_context(), address.host)
            await io.handshake(loop)
            return sock, io
    except BaseException as exc:
        if sock is not None:
            sock.close()
        if isinstance(exc, DeviceError):
            raise
        if isinstance(exc, TimeoutError):
            raise DeviceError(f"cannot reach the device server at {address}: no answer within "
                              f"{deadline_s:g} s") from None
        if isinstance(exc, (OSError, ssl.SSLError)):
            raise DeviceError(f"cannot reach the device server at {address}: {exc}") from exc
        raise


class Watchdog:
    """Declares the server dead after ``timeout`` s without progress while waiting on it."""

    def __init__(self, loop: asyncio.AbstractEventLoop, timeout: float,
                 busy: Callable[[], bool], expired: Callable[[float], None],
                 keepalive: Callable[[], Any]) -> None:
        self._loop = loop
        self.timeout = timeout
        self._busy = busy
        self._expired = expired
        self._keepalive = keepalive
        self.keepalive_every = 0.0  # set from the server's idle timeout (0: never)
        self.last_rx = self.last_tx = time.monotonic()
        self._period = min(0.25, timeout / 4)
        self._handle: asyncio.TimerHandle | None = self._loop.call_later(self._period, self._check)

    def received(self) -> None:
        self.last_rx = time.monotonic()

    def sent(self) -> None:
        self.last_tx = time.monotonic()

    def _check(self) -> None:
        self._handle = None
        now = time.monotonic()
        if self._busy():
            silent = now - max(self.last_rx, self.last_tx)
            if silent > self.timeout:
                self._expired(silent)
                return
        elif self.keepalive_every and now - max(self.last_tx, self.last_rx) > self.keepalive_every:
            self.last_tx = now
            self._keepalive()
        self._handle = self._loop.call_later(self._period, self._check)

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
