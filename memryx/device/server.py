"""The device server: one simulated MX3 shared by many client processes.

``memryx serve`` (or ``python -m memryx serve``) listens on a Unix socket
created owner-only (mode 0600, in a private directory by default), on TCP
(``--tcp HOST:PORT``, with a shared secret and optional TLS), or on both. Each
client connection speaks the protocol of :mod:`memryx.device.protocol`:
handshake, open a DFP (sent once, then cached by its SHA-256), frames in,
outputs out, statistics, close.

The chip is shared by the scheduler of :mod:`._scheduler`, like the vendor's
manager daemon; each connection is a :class:`~._session.Session` held to the
limits of :class:`~._limits.ServerLimits`. A client crashing, disconnecting,
not reading or sending garbage only ends (or slows) its own connection; its
models leave the schedule and its device is closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import ssl
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from types import FrameType
from typing import Any

from .._core.aio import TaskSet
from .._core.threads import call_soon
from ..dfp import Dfp
from ._limits import ServerLimits
from ._listen import ServerRunningError, SocketClaim, default_socket_path
from ._scheduler import ChipScheduler, SchedulerOptions
from ._session import Session

__all__ = ["DeviceServer", "SchedulerOptions", "ServerLimits", "ServerRunningError",
           "StopSignals", "default_socket_path", "parse_host_port", "serve", "tls_server_context"]

log = logging.getLogger("memryx.server")

#: DFPs the server keeps in memory for clients that open them again (count and bytes).
DFP_CACHE = 8
DFP_CACHE_BYTES = 512 * 1024 * 1024
#: Seconds between two checks of the connections' timeouts.
TICK = 0.25


def parse_host_port(text: str) -> tuple[str, int]:
    """``"HOST:PORT"`` (``"[::1]:PORT"`` for IPv6) as a pair; ValueError names what is wrong."""
    host, sep, port = text.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"expected HOST:PORT (like 127.0.0.1:10000), got {text!r}")
    return host, int(port)


def tls_server_context(cert: str | os.PathLike[str], key: str | os.PathLike[str]
                       ) -> ssl.SSLContext:
    """A TLS server context from a certificate chain and its private key (PEM files)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(os.fspath(cert), os.fspath(key))
    return ctx


class DeviceServer:
    """Serves one simulated MX3 on a Unix socket and/or a TCP address.

    ``path``: the Unix socket (default :func:`default_socket_path` when ``tcp``
    is not given either). ``groups``: chip groups (devices) a client may open,
    ``group_id`` 0..groups-1, each a chip with its own scheduler. ``tcp``:
    ``"HOST:PORT"``; it needs ``token`` (the shared secret clients send) unless
    ``insecure``; ``tls`` wraps it.
    """

    def __init__(self, path: str | os.PathLike[str] | None = None, *, mode: str = "timed",
                 options: SchedulerOptions | None = None, limits: ServerLimits | None = None,
                 tcp: str | None = None, token: str | None = None, insecure: bool = False,
                 tls: ssl.SSLContext | None = None, groups: int = 1) -> None:
        if isinstance(groups, bool) or not isinstance(groups, int) or not 1 <= groups <= 64:
            raise ValueError(f"groups must be an int in [1, 64], got {groups!r}")
        self.limits = limits or ServerLimits()
        self.path: Path | None = (Path(path) if path is not None
                                  else default_socket_path(create=True) if tcp is None else None)
        self.tcp = parse_host_port(tcp) if tcp is not None else None
        if self.tcp is not None and not token and not insecure:
            raise ValueError("a TCP device server needs a shared secret: --token-file PATH or "
                             "MEMRYX_TOKEN (or --insecure, for a trusted network only)")
        if tls is not None and self.tcp is None:
            raise ValueError("TLS applies to TCP: give --tcp HOST:PORT with --tls-cert/--tls-key")
        self.token = token or None
        self.tls = tls
        self.mode = mode
        self.groups = groups
        #: One scheduler per chip group (``group_id`` of a client's OPEN): each group is a
        #: chip of its own, shared by the clients that opened it.
        self.schedulers = [ChipScheduler(options or SchedulerOptions()) for _ in range(groups)]
        self.scheduler = self.schedulers[0]
        self.sessions: set[Session] = set()
        self.tcp_address: tuple[str, int] | None = None
        self._dfps: OrderedDict[bytes, tuple[Dfp, int]] = OrderedDict()
        self._claim: SocketClaim | None = None
        self._servers: list[asyncio.AbstractServer] = []
        self._tasks = TaskSet("server", lambda exc: log.error("server task failed: %r", exc))

    @property
    def max_payload(self) -> int:
        return self.limits.max_message_bytes

    def spawn(self, coro: Any, name: str) -> None:
        self._tasks.spawn(coro, name)

    def cached(self, digest: bytes) -> Dfp | None:
        entry = self._dfps.get(digest)
        if entry is None:
            return None
        self._dfps.move_to_end(digest)
        return entry[0]

    def remember(self, digest: bytes, dfp: Dfp, nbytes: int) -> None:
        self._dfps[digest] = (dfp, nbytes)
        while len(self._dfps) > 1 and (len(self._dfps) > DFP_CACHE or sum(
                n for _, n in self._dfps.values()) > DFP_CACHE_BYTES):
            self._dfps.popitem(last=False)

    def scheduler_stats(self) -> dict[str, Any]:
        return {"options": asdict(self.scheduler.options),
                "turns": sum(s.turns for s in self.schedulers),
                "swaps": sum(s.swaps for s in self.schedulers), "groups": self.groups,
                "clients": len(self.sessions)}

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            if self.path is not None:
                claim = self._claim = SocketClaim(self.path)
                claim.acquire()
                old = os.umask(0o177)  # the socket is born owner-only (srw-------)
                try:
                    self._servers.append(await loop.create_unix_server(
                        lambda: Session(self, "unix"), str(self.path)))
                finally:
                    os.umask(old)
                claim.bound()
                os.chmod(self.path, 0o600)
                log.info("memryx device server listening on %s (%s mode)", self.path, self.mode)
            if self.tcp is not None:
                tls_opts: dict[str, Any] = ({"ssl": self.tls, "ssl_handshake_timeout":
                                             self.limits.handshake_timeout} if self.tls else {})
                server = await loop.create_server(lambda: Session(self, "tcp"), *self.tcp,
                                                  reuse_address=True, **tls_opts)
                self._servers.append(server)
                host, port = server.sockets[0].getsockname()[:2]
                self.tcp_address = (host, port)
                log.info("memryx device server listening on %s://%s:%d (%s mode%s)",
                         "tcps" if self.tls else "tcp", host, port, self.mode,
                         "" if self.token else ", INSECURE: no token")
        except BaseException:
            await self.aclose()
            raise
        self.spawn(self._tick(), "tick")

    async def _tick(self) -> None:
        while True:
            await asyncio.sleep(TICK)
            now = time.monotonic()
            for session in list(self.sessions):
                session.tick(now)

    async def aclose(self) -> None:
        servers, self._servers = self._servers, []
        for server in servers:
            server.close()
        for session in list(self.sessions):
            session._close()
            if session.transport is not None:
                session.transport.abort()
        for server in servers:
            await server.wait_closed()
        for _ in range(200):  # aborted transports report connection_lost on a later turn
            if not self.sessions:
                break
            await asyncio.sleep(0.005)
        await asyncio.sleep(0)
        await self._tasks.aclose()
        if self._claim is not None:
            self._claim.release()
            self._claim = None

    async def serve_forever(self) -> None:
        """Serve until SIGINT / SIGTERM (main thread), then stop cleanly.

        The handlers are in place before the server starts: a signal that lands while it
        starts, serves or stops ends in the same clean stop.
        """
        signals = StopSignals().install()
        try:
            await self.serve_until(signals)
        finally:
            signals.restore()

    async def serve_until(self, signals: StopSignals) -> None:
        """Serve until ``signals`` has a stop request (one made already counts)."""
        stop = asyncio.Event()
        signals.attach(asyncio.get_running_loop(), stop)
        try:
            if stop.is_set():
                log.info("memryx device server stopped before it started")
                return
            await self.start()  # a signal now is only recorded: start, then stop at once
            try:
                await stop.wait()
            finally:
                await self.aclose()
                log.info("memryx device server stopped")
        finally:
            signals.detach()


class StopSignals:
    """SIGINT and SIGTERM as a request to stop, from the moment :meth:`install` is called.

    The handler only counts the signal and wakes the loop that waits for it (see
    :meth:`attach`); it never raises. So a Ctrl-C at any moment of a server's life, while it
    starts, serves or stops, ends in the same clean stop, and a second Ctrl-C while it stops
    changes nothing: the stop already under way finishes (it is bounded) and the exit is
    still clean. Installed in the main thread only (as :func:`signal.signal` requires).
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        #: Stop signals received so far.
        self.count = 0
        self._wake: Callable[[], None] | None = None
        self._previous: dict[int, Any] = {}

    @property
    def requested(self) -> bool:
        return self.count > 0

    def install(self) -> StopSignals:
        for sig in self.SIGNALS:
            self._previous[sig] = signal.signal(sig, self._on_signal)
        return self

    def restore(self) -> None:
        """Put back the handlers :meth:`install` replaced."""
        previous, self._previous = self._previous, {}
        for sig, handler in previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)

    def ignore(self) -> None:
        """Ignore the signals from now on (a process that has stopped and is exiting)."""
        for sig in self.SIGNALS:
            signal.signal(sig, signal.SIG_IGN)

    def attach(self, loop: asyncio.AbstractEventLoop, event: asyncio.Event) -> None:
        """Set ``event`` (on ``loop``) on a stop request: now if one was made already."""
        def wake() -> None:
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits
                call_soon(loop, event.set)

        self._wake = wake
        if self.count:
            event.set()

    def detach(self) -> None:
        self._wake = None

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        # runs in the main thread between two bytecodes, wherever it is: record, wake, return
        self.count += 1
        wake = self._wake
        if wake is not None:
            wake()


def serve(path: str | os.PathLike[str] | None = None, *, signals: StopSignals | None = None,
          **kwargs: Any) -> None:
    """Run a device server until SIGINT / SIGTERM (uvloop when installed).

    ``signals``: stop requests installed earlier by the caller (the ``memryx serve``
    command installs them before anything else, so that a Ctrl-C during start-up is a
    clean stop too); by default they are installed here, and restored on return.
    Keyword arguments are those of :class:`DeviceServer`.
    """
    own = signals is None
    stop = StopSignals().install() if signals is None else signals
    try:
        if stop.requested:  # stopped before it started: nothing to start or clean up
            log.info("memryx device server stopped before it started")
            return
        server = DeviceServer(path, **kwargs)
        try:
            import uvloop
        except ImportError:  # pragma: no cover
            asyncio.run(server.serve_until(stop))
        else:
            uvloop.run(server.serve_until(stop))
    finally:
        if own:
            stop.restore()
