"""The fd device: an accelerator reached through a file descriptor.

``FdDevice("/run/memryx.sock")`` connects to a device server (``memryx serve``)
over a Unix socket (or ``FdDevice("tcp://HOST:PORT")`` over TCP, ``tcps://``
with TLS; see :mod:`._transport`) and speaks :mod:`memryx.device.protocol` on
it. The socket is
a non-blocking fd owned by this object and driven by the event loop
(``add_reader`` for input, ``sendmsg`` with ``add_writer`` when the kernel buffer
is full); frame data goes out as memoryviews of the arrays, without copies.

Data path: ``submit`` numbers each frame (a sequence number per connection),
writes the frames (each tagged with its stream when the server takes stream
tags), and keeps one future per batch; each OUTPUT event is matched by its
sequence number to the oldest outstanding frame of its model, and a batch's
future resolves when its last output arrived.

Faults: when the server dies, closes the connection or sends garbage, the
future of every batch in flight fails with :class:`DeviceError` at once,
saying how many frames were sent and never came back; later calls fail too. A new accelerator
(a new connection) may be opened once a server listens again.

Deadlines: every wait on the server -- connect, handshake, replies, outputs of
frames in flight, a blocked write -- ends with :class:`DeviceError` once the
server has moved no byte for ``timeout`` seconds (argument, else
``$MEMRYX_DEVICE_TIMEOUT``, else 30), so a stopped, overloaded or vanished
server never hangs the client; ``aclose`` never waits on the server.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import socket
import ssl
from collections import deque
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import anyio
from numpy.typing import NDArray

from .. import _exceptions
from .._core.channel import ReceiveEnd, SendEnd, get, open_channel
from .._exceptions import ClosedError, DeviceError, MemryxError
from .._version import __version__
from . import protocol as p
from ._auth import client_token, preamble
from ._transport import Address, PlainIO, TlsIO, Watchdog, connect, resolve_timeout
from .base import Limits

if TYPE_CHECKING:
    from ..dfp import Dfp

__all__ = ["FdDevice"]

log = logging.getLogger("memryx.device.fd")
Array = NDArray[Any]
#: Error codes that travel as the builtin exception of that name.
_BUILTIN_ERRORS: dict[str, type[Exception]] = {"ValueError": ValueError, "TypeError": TypeError}


def _remote_error(err: p.Error, doing: str) -> Exception:
    """The server's error as the exception the in-process device would have raised."""
    cls = getattr(_exceptions, err.code, None)
    if isinstance(cls, type) and issubclass(cls, MemryxError) and cls is not DeviceError:
        return cls(err.message)
    if err.code in _BUILTIN_ERRORS:
        return _BUILTIN_ERRORS[err.code](err.message)
    if err.code == "refused":
        return DeviceError(f"the device server refused the connection: {err.message}")
    return DeviceError(f"device server error while {doing}: {err.code}: {err.message}")


class _Batch:
    """One ``submit``: its future and the outputs that arrived so far."""

    __slots__ = ("future", "outputs", "size")

    def __init__(self, future: asyncio.Future[list[list[Array]]], size: int) -> None:
        self.future = future
        self.size = size
        self.outputs: list[list[Array]] = []


class FdDevice:
    """A device server reached through a Unix socket or TCP (see the module docstring).

    ``address``: a socket path, ``unix:PATH``, ``tcp://HOST:PORT`` or
    ``tcps://HOST:PORT``. ``timeout``: the deadline of every wait, in seconds.
    ``token``: the TCP shared secret (default ``$MEMRYX_TOKEN``). ``tls``: the
    client context for ``tcps`` (default: the system's trusted CAs).
    ``scheduler``: this client's turns on the shared chip, with the SDK's
    ``SchedulerOptions`` names (``frame_limit``, ``time_limit`` in ms,
    ``stop_on_empty``, ``ifmap_queue_size``, ``ofmap_queue_size``; any subset);
    None: the server's own. What the server applies is :attr:`schedule` (also in
    :meth:`statistics`) once open.
    """

    name = "fd"
    #: Frames carry their stream to the server (the protocol's stream tags), for its
    #: per-stream modes; a server that predates them gets them untagged (one stream).
    takes_streams = True

    def __init__(self, address: str | os.PathLike[str], *, timeout: float | None = None,
                 token: str | None = None, tls: ssl.SSLContext | None = None,
                 scheduler: Mapping[str, Any] | None = None) -> None:
        self.address = Address.parse(os.fspath(address))
        if scheduler is not None and not isinstance(scheduler, Mapping):
            raise TypeError(f"scheduler must be a mapping of scheduler options, got "
                            f"{type(scheduler).__name__}")
        self._asked = dict(scheduler) if scheduler is not None else None
        #: The scheduler options the server applies to this client (None until open, or
        #: from a server that predates per-client options).
        self.schedule: dict[str, Any] | None = None
        self.path = self.address.path or str(self.address)
        self.timeout = resolve_timeout(timeout)
        self._token = client_token(token)
        self._tls = tls
        self._sock: socket.socket | None = None
        self._io: PlainIO | TlsIO | None = None
        self._fd = -1
        self._loop: asyncio.AbstractEventLoop | None = None
        self._watchdog: Watchdog | None = None
        self._awaiting = 0
        self._pings: set[int] = set()
        self._ping_task: asyncio.Task[None] | None = None
        self._write_waiter: asyncio.Future[None] | None = None
        self._conn = p.Connection(p.Role.CLIENT, max_payload=p.MAX_MESSAGE)
        self._control: tuple[SendEnd[Any], ReceiveEnd[Any]] | None = None
        self._sent: list[deque[tuple[int, _Batch]]] = []
        self._capacity: list[int] = []
        self._seq = 0
        self._pending_writes: deque[Any] = deque()
        self._writer: asyncio.Task[None] | None = None
        self._write_lock = anyio.Lock()
        self._stats_lock = anyio.Lock()
        self._stats_seq = 0
        self._fault: DeviceError | None = None
        self._closed = False
        self.frames_in = 0
        self.frames_out = 0

    # -- connection ---------------------------------------------------------------------------
    async def open(self, dfp: Dfp, group_id: int) -> None:
        loop = asyncio.get_running_loop()
        sock, io = await connect(self.address, self.timeout, self._tls)
        self._sock, self._io, self._fd, self._loop = sock, io, sock.fileno(), loop
        self._control = open_channel(8)
        self._watchdog = Watchdog(loop, self.timeout, self._busy, self._expired, self._keepalive)
        loop.add_reader(self._fd, self._on_readable)
        try:
            if self.address.scheme != "unix":
                await self._write_raw(preamble(self._token))
            await self._write(p.Hello(f"memryx {__version__}", os.getpid(), self._asked,
                                      stream_tags=True))
            welcome = await self._reply(p.Welcome, "connecting")
            self.schedule = dict(welcome.scheduler) if welcome.scheduler is not None else None
            if self._asked and self.schedule is None:
                log.warning("the device server at %s does not take per-client scheduler "
                            "options (an older server): its own apply, not %s",
                            self.address, self._asked)
            if not welcome.stream_tags:
                log.info("the device server at %s does not take stream tags (an older "
                         "server): all frames of this connection are one stream to it",
                         self.address)
            self._watchdog.keepalive_every = welcome.idle_timeout / 3
            data = dfp.to_bytes()
            await self._write(p.Open(p.dfp_digest(data), group_id))  # the one hash of this open
            reply = await self._reply((p.NeedDfp, p.Opened), "opening the DFP")
            if isinstance(reply, p.NeedDfp):
                await self._write(p.DfpData(data))
                reply = await self._reply(p.Opened, "opening the DFP")
        except BaseException:
            self._shutdown()
            self._control[1].close()
            raise
        self._capacity = [int(m.capacity) for m in reply.models]
        self._sent = [deque() for _ in self._capacity]
        log.debug("fd device %s opened %d model(s)", self.path, len(self._capacity))

    # -- deadlines and keep-alive (see _transport.Watchdog) --------------------------------------
    def _busy(self) -> bool:
        """Whether we wait on the server: a reply, outputs in flight, a blocked write."""
        return bool(self._awaiting or self._write_lock.locked() or any(self._sent))

    def _expired(self, silent: float) -> None:
        self._set_fault(f"the device server at {self.address} has not answered for "
                        f"{silent:.1f} s (stopped, overloaded or gone; the deadline is "
                        f"timeout={self.timeout:g} s, also $MEMRYX_DEVICE_TIMEOUT)")

    def _keepalive(self) -> None:
        if self._ping_task is None and self._fault is None and self._loop is not None \
                and self._conn.state is p.State.OPEN:
            self._ping_task = self._loop.create_task(self._ping())

    async def _ping(self) -> None:
        seq = (max(self._pings, default=0) + 1) & 0xFFFFFFFF
        self._pings.add(seq)
        try:
            await self._write(p.Stats(seq))
        except (MemryxError, OSError, p.ProtocolError):
            pass  # the fault, if any, is already recorded
        finally:
            self._ping_task = None

    async def _reply(self, kinds: Any, doing: str) -> Any:
        assert self._control is not None
        self._awaiting += 1
        try:
            with anyio.fail_after(self.timeout):
                event = await get(self._control[1])
        except (anyio.EndOfStream, anyio.ClosedResourceError):
            if self._closed and self._fault is None:
                raise ClosedError(f"the device was closed while {doing}") from None
            raise self._fault or DeviceError(f"connection lost while {doing}") from None
        except TimeoutError:
            raise DeviceError(f"the device server did not answer within {self.timeout:g} s "
                              f"while {doing}") from None
        finally:
            self._awaiting -= 1
        if isinstance(event, p.Error):
            raise _remote_error(event, doing)
        if not isinstance(event, kinds):
            raise DeviceError(f"unexpected {type(event).__name__} from the server while {doing}")
        return event

    # -- reading (loop callback) -----------------------------------------------------------------
    def _on_readable(self) -> None:
        if self._io is None:
            return
        try:
            data = self._io.recv(1 << 20)
        except (BlockingIOError, InterruptedError):
            return
        except (OSError, ssl.SSLError) as exc:
            self._set_fault(f"the connection to the device server broke ({exc})")
            return
        if data is None:
            return  # TLS records without application data
        if self._watchdog is not None:
            self._watchdog.received()
        if not data:
            self._set_fault("the device server closed the connection")
            return
        try:
            events = self._conn.receive_data(data)
        except p.ProtocolError as exc:
            self._set_fault(f"the device server sent malformed data ({exc})")
            return
        for event in events:
            if isinstance(event, p.Output):
                self._route(event)
            elif isinstance(event, p.Error) and self._sent:
                self._set_fault(f"device server error: {event.code}: {event.message}")
            elif isinstance(event, p.Error) and event.fatal and not self._awaiting:
                # the same words whether or not a reply was awaited when it came
                self._set_fault(str(_remote_error(event, "connecting")))
            elif isinstance(event, (p.Closed, p.Bye)):
                self._set_fault("the device server closed the connection")
            elif isinstance(event, p.StatsReply) and event.seq in self._pings:
                self._pings.discard(event.seq)  # a keep-alive answered
            elif self._control is not None:
                try:
                    self._control[0].send_nowait(event)
                except (anyio.WouldBlock, anyio.BrokenResourceError, anyio.ClosedResourceError):
                    self._set_fault("the device server sent more replies than asked for")

    def _route(self, event: p.Output) -> None:
        sent = self._sent[event.model] if 0 <= event.model < len(self._sent) else None
        if not sent or sent[0][0] != event.seq:
            self._set_fault(f"the device server returned an output nobody waits for "
                            f"(model {event.model}, frame {event.seq})")
            return
        _, batch = sent.popleft()
        self.frames_out += 1
        batch.outputs.append(list(event.arrays))
        if len(batch.outputs) == batch.size and not batch.future.done():
            batch.future.set_result(batch.outputs)

    def _set_fault(self, message: str) -> None:
        if self._fault is not None:
            return
        lost = sum(len(s) for s in self._sent)
        self._fault = DeviceError(f"{message}; {lost} frame(s) sent and never returned",
                                  lost_frames=lost)
        log.warning("fd device %s: %s", self.address, self._fault)
        self._shutdown()
        self._fail_in_flight(self._fault)

    def _fail_in_flight(self, exc: BaseException | None) -> None:
        """Every batch still waiting fails with ``exc`` (None: cancelled by a close)."""
        for sent in self._sent:
            for _, batch in sent:
                if not batch.future.done():
                    if exc is None:
                        batch.future.cancel()
                    else:
                        _fail(batch.future, exc)
            sent.clear()

    # -- writing ----------------------------------------------------------------------------------
    async def _write(self, *events: Any) -> None:
        if self._fault is not None:
            raise self._fault
        if self._sock is None:
            raise ClosedError("the device is closed")
        try:
            raw = [x for event in events for x in self._conn.send(event)]
        except p.ProtocolError as exc:
            if "exceeds the limit" not in str(exc):
                raise
            raise DeviceError(f"{exc}: the device server takes messages up to "
                              f"{self._conn.send_limit} bytes (raise it with memryx serve "
                              "--max-message-mb)") from None
        await self._write_raw(*raw)

    async def _write_raw(self, *data: bytes | memoryview) -> None:
        if self._fault is not None:
            raise self._fault
        pieces: list[Any] = [memoryview(x).cast("B") for x in data]
        async with self._write_lock:
            while pieces or (self._io is not None and self._io.pending):
                io = self._io
                if io is None:
                    raise self._fault or ClosedError("the device is closed")
                try:
                    sent = io.sendmsg(pieces)
                except (BlockingIOError, InterruptedError):
                    await self._writable()
                    continue
                except (OSError, ssl.SSLError) as exc:
                    if exc.errno == errno.EBADF:
                        raise ClosedError("the device is closed") from None
                    self._set_fault(f"the connection to the device server broke ({exc})")
                    raise self._fault or DeviceError(str(exc)) from exc
                if sent and self._watchdog is not None:
                    self._watchdog.sent()
                while sent and pieces:
                    if sent >= len(pieces[0]):
                        sent -= len(pieces.pop(0))
                    else:
                        pieces[0] = pieces[0][sent:]
                        sent = 0

    async def _writable(self) -> None:
        assert self._loop is not None
        fut: asyncio.Future[None] = self._loop.create_future()

        def ready() -> None:
            if not fut.done():
                fut.set_result(None)

        if self._fd < 0:
            return  # shut down: the caller sees it
        self._write_waiter = fut
        self._loop.add_writer(self._fd, ready)
        try:
            await fut
        finally:
            self._write_waiter = None
            if self._fd >= 0:
                self._loop.remove_writer(self._fd)

    # -- the Device interface -------------------------------------------------------------------
    def limits(self, model_idx: int) -> Limits:
        # the server admits at most its ifmap queue per model; its outputs wait in our
        # futures, so the whole budget is what the server accepts
        return Limits(in_queue=self._capacity[model_idx], in_chip=0, out_queue=0,
                      batch=self._capacity[model_idx])

    def submit(self, model_idx: int, frames: list[list[Array]],
               streams: Sequence[int] | None = None) -> asyncio.Future[list[list[Array]]]:
        assert self._loop is not None
        batch = _Batch(self._loop.create_future(), len(frames))
        if self._closed:
            _fail(batch.future, ClosedError("the device is closed"))
            return batch.future
        if self._fault is not None:
            _fail(batch.future, self._fault)
            return batch.future
        events = []
        sent = self._sent[model_idx]
        if streams is not None and len(streams) != len(frames):
            raise ValueError(f"{len(streams)} stream tags for {len(frames)} frames")
        for i, frame in enumerate(frames):
            seq = self._seq = (self._seq + 1) & 0xFFFFFFFF
            sent.append((seq, batch))
            events.append(p.Frame(model_idx, seq, frame, streams[i] if streams else 0))
        self.frames_in += len(frames)
        self._pending_writes.extend(events)
        if self._writer is None or self._writer.done():
            self._writer = self._loop.create_task(self._write_pending(), name="memryx-fd-write")
        return batch.future

    async def _write_pending(self) -> None:
        """Write queued frames in order; a broken connection fails what is in flight."""
        try:
            while self._pending_writes:
                events = list(self._pending_writes)
                self._pending_writes.clear()
                await self._write(*events)  # one sendmsg for the batch
        except (MemryxError, OSError) as exc:
            self._pending_writes.clear()
            if self._fault is None:
                self._set_fault(f"the connection to the device server broke ({exc})")
            if not isinstance(exc, ClosedError):
                self._fail_in_flight(self._fault)

    def statistics(self) -> dict[str, Any]:
        return {"device": self.name, "address": str(self.address),
                "frames_in": self.frames_in, "frames_out": self.frames_out,
                "in_flight": sum(len(s) for s in self._sent),
                "scheduler": dict(self.schedule) if self.schedule is not None else None,
                "fault": str(self._fault) if self._fault else None}

    async def server_statistics(self) -> dict[str, Any]:
        """The server's statistics of this connection (its models' frames and turns on the
        chip, the schedule it applies) and of its scheduler."""
        async with self._stats_lock:  # one request at a time: replies come in order
            self._stats_seq = (self._stats_seq + 1) & 0x7FFFFFFF
            await self._write(p.Stats(0x80000000 | self._stats_seq))  # keep-alives count from 1
            reply = await self._reply(p.StatsReply, "reading the server's statistics")
        return dict(reply.data)

    def _shutdown(self) -> None:
        """Stop reading, close the fd, wake every waiter (they see the fault or ClosedError)."""
        sock, self._sock, self._io = self._sock, None, None
        if self._watchdog is not None:
            self._watchdog.stop()
        if self._loop is not None and self._fd >= 0:
            self._loop.remove_reader(self._fd)
            self._loop.remove_writer(self._fd)
        self._fd = -1
        if self._write_waiter is not None and not self._write_waiter.done():
            self._write_waiter.set_result(None)  # the writer wakes up and sees the fd gone
        if self._control is not None:
            self._control[0].close()
        if sock is not None:
            sock.close()

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._sock is not None and self._fault is None and not self._write_lock.locked():
            # a courtesy only: the server treats end of file the same; never wait on it
            with contextlib.suppress(MemryxError, OSError, p.ProtocolError, TimeoutError):
                with anyio.fail_after(min(1.0, self.timeout)):
                    await self._write(p.Close())
        if self._writer is not None and not self._writer.done():
            self._writer.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._writer
        self._shutdown()
        self._fail_in_flight(None)
        if self._ping_task is not None:
            self._ping_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._ping_task
        if self._control is not None:
            self._control[1].close()


def _fail(fut: asyncio.Future[Any], exc: BaseException) -> None:
    """Fail a batch's future with ``exc``, already marked as seen: the core raises the first
    failed batch it awaits and drops the rest (with several device ids, the other
    connections' batches too), which asyncio would otherwise print at exit as "Future
    exception was never retrieved"."""
    fut.set_exception(exc)
    fut.exception()
