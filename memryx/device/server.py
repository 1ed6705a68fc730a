"""The device server: one simulated MX3 shared by many client processes.

``memryx serve --socket PATH`` (or ``python -m memryx serve``) listens on a Unix
socket created owner-only (mode 0600). Each client connection speaks the
protocol of :mod:`memryx.device.protocol`: handshake, open a DFP (sent once,
then cached by its SHA-256), frames in, outputs out, statistics, close.

The chip is shared by a scheduler, like the vendor's manager daemon: one
(client, model) pair holds the chip at a time and sends it up to
``frame_limit`` frames or for up to ``time_limit`` ms, whichever comes first;
then its frames drain and the next pair that has frames waiting gets the chip,
round-robin. A client crashing, disconnecting or sending garbage only ends its
own connection; its models leave the schedule and its device is closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import signal
import time
from collections import OrderedDict, deque
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, cast

import anyio
from numpy.typing import NDArray

from .._core.aio import TaskSet
from .._core.channel import ReceiveEnd, SendEnd, get, open_channel
from .._exceptions import MemryxError
from .._version import __version__
from ..dfp import Dfp
from . import _metrics
from . import protocol as p
from .simulated import SimulatedDevice

__all__ = ["DeviceServer", "SchedulerOptions", "default_socket_path", "serve"]

log = logging.getLogger("memryx.server")
Array = NDArray[Any]

#: DFPs the server keeps in memory for clients that open them again.
DFP_CACHE = 8


def default_socket_path() -> Path:
    """``$XDG_RUNTIME_DIR/memryx.sock``, else ``/tmp/memryx-<uid>.sock``."""
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime:
        return Path(runtime) / "memryx.sock"
    return Path(f"/tmp/memryx-{os.getuid()}.sock")


@dataclass(frozen=True)
class SchedulerOptions:
    """How the server shares the chip (defaults as the vendor's manager daemon).

    frame_limit: frames a model may send per turn on the chip.
    time_limit_ms: how long a turn may last.
    ifmap_queue: frames of one model a client may have in flight (its capacity).
    ofmap_queue: outputs (and queued inputs) the chip buffers per model for a slow client.
    """

    frame_limit: int = 20
    time_limit_ms: float = 250.0
    ifmap_queue: int = 16
    ofmap_queue: int = 21

    def __post_init__(self) -> None:
        for name in ("frame_limit", "ifmap_queue", "ofmap_queue"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not self.time_limit_ms > 0:
            raise ValueError(f"time_limit_ms must be > 0, got {self.time_limit_ms!r}")


class ChipScheduler:
    """Hands the one chip to one slot at a time, first come first served.

    A slot that still has frames after its turn queues again at the back, so
    slots with work take turns round-robin.
    """

    def __init__(self, options: SchedulerOptions) -> None:
        self.options = options
        self._holder: Slot | None = None
        self._waiting: deque[tuple[Slot, asyncio.Future[None]]] = deque()
        self.turns = 0
        self.swaps = 0
        self._last: Slot | None = None

    async def acquire(self, slot: Slot) -> None:
        if self._holder is None and not self._waiting:
            self._grant(slot)
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting.append((slot, fut))
        try:
            await fut
        except BaseException:
            if fut.done() and not fut.cancelled() and self._holder is slot:
                self.release(slot)  # granted while being cancelled: pass it on
            else:
                with contextlib.suppress(ValueError):
                    self._waiting.remove((slot, fut))
            raise

    def _grant(self, slot: Slot) -> None:
        self._holder = slot
        self.turns += 1
        if self._last is not None and self._last is not slot:
            self.swaps += 1
            _metrics.recorder().scheduler_switch()
        self._last = slot

    def release(self, slot: Slot) -> None:
        if self._holder is not slot:
            return
        self._holder = None
        while self._waiting:
            nxt, fut = self._waiting.popleft()
            if not fut.done():
                self._grant(nxt)
                fut.set_result(None)
                return

    def contended(self) -> bool:
        """Whether another slot waits for the chip."""
        return bool(self._waiting)

    def drop(self, slot: Slot) -> None:
        """Forget a slot whose client is gone."""
        self._waiting = deque((s, f) for s, f in self._waiting if s is not slot)
        self.release(slot)


@dataclass
class Slot:
    """One model of one client session, as the scheduler sees it."""

    session: Session
    model_idx: int
    capacity: int
    frames: tuple[SendEnd[tuple[int, list[Array]]], ReceiveEnd[tuple[int, list[Array]]]]
    in_flight: deque[tuple[int, asyncio.Future[list[list[Array]]]]] = \
        field(default_factory=deque)
    drained: asyncio.Event = field(default_factory=asyncio.Event)
    has_work: asyncio.Event = field(default_factory=asyncio.Event)
    frames_in: int = 0
    frames_out: int = 0

    async def run(self, scheduler: ChipScheduler, device: SimulatedDevice) -> None:
        """Wait for frames, take a turn on the chip, send a turn's worth, drain."""
        opts = scheduler.options
        recv = self.frames[1]
        while True:
            try:
                first = await get(recv)
            except anyio.EndOfStream:
                return
            await scheduler.acquire(self)
            try:
                started = time.monotonic()
                sent = 0
                item: tuple[int, list[Array]] | None = first
                while item is not None:
                    seq, arrays = item
                    self.in_flight.append((seq, device.submit(self.model_idx, [arrays])))
                    self.drained.clear()
                    self.has_work.set()
                    sent += 1
                    if sent >= opts.frame_limit or \
                            (time.monotonic() - started) * 1000 >= opts.time_limit_ms:
                        if scheduler.contended():
                            break
                        started, sent = time.monotonic(), 0  # nobody waits: a new turn
                    try:
                        item = recv.receive_nowait()
                    except (anyio.WouldBlock, anyio.EndOfStream):
                        item = None
                # Hand the chip over empty: another model waits, so let ours drain.
                if scheduler.contended() and self.in_flight:
                    await self.drained.wait()
            finally:
                scheduler.release(self)

    async def collect(self, device: SimulatedDevice) -> None:
        """Outputs of this model back to the client, in order."""
        while True:
            if not self.in_flight:
                self.has_work.clear()
                await self.has_work.wait()
                continue
            seq, fut = self.in_flight[0]
            (outputs,) = await fut
            self.in_flight.popleft()
            self.frames_out += 1
            _metrics.recorder().frame_out(self.model_idx, self.session)
            await self.session.write(p.Output(self.model_idx, seq, outputs))
            if not self.in_flight:
                self.drained.set()


class Session(asyncio.Protocol):
    """One client connection."""

    def __init__(self, server: DeviceServer) -> None:
        self.server = server
        self.conn = p.Connection(p.Role.SERVER, max_payload=server.max_payload)
        self.transport: asyncio.Transport | None = None
        self.device: SimulatedDevice | None = None
        self.slots: list[Slot] = []
        self.tasks = TaskSet("session", self._on_error)
        self.peer = "?"
        self._pending_open: p.Open | None = None
        self._can_write = asyncio.Event()
        self._can_write.set()
        self._closing = False

    # -- asyncio.Protocol -------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        self.server.sessions.add(self)
        _metrics.recorder().client_connected(self)
        log.info("client connected (%d connected)", len(self.server.sessions))

    def data_received(self, data: bytes) -> None:
        try:
            events = self.conn.receive_data(data)
        except p.ProtocolError as exc:
            self._fail("protocol", str(exc))
            return
        for event in events:
            try:
                self._handle(event)
            except (p.ProtocolError, MemryxError, ValueError) as exc:
                self._fail("protocol", str(exc))
                return

    def eof_received(self) -> bool | None:
        return None  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        self.server.sessions.discard(self)
        _metrics.recorder().client_disconnected(self)
        self._closing = True
        self._can_write.set()
        for slot in self.slots:
            self.server.scheduler.drop(slot)
        self.server.spawn(self._cleanup(), "cleanup")
        log.info("client %s disconnected (%d connected)", self.peer, len(self.server.sessions))

    def pause_writing(self) -> None:
        self._can_write.clear()

    def resume_writing(self) -> None:
        self._can_write.set()

    # -- events -------------------------------------------------------------------------------
    def _handle(self, event: Any) -> None:
        if isinstance(event, p.Hello):
            self.peer = f"{event.client} pid {event.pid}"
            self._send(p.Welcome(f"memryx-server {__version__}", self.server.max_payload))
        elif isinstance(event, p.Open):
            self._pending_open = event
            dfp = self.server.cached(event.dfp_hash)
            if dfp is None:
                self._send(p.NeedDfp())
            else:
                self.tasks.spawn(self._open(dfp, event.group_id), "open")
        elif isinstance(event, p.DfpData):
            opening = self._pending_open
            if opening is None:
                raise p.ProtocolError("DFP sent before OPEN")
            if hashlib.sha256(event.data).digest() != opening.dfp_hash:
                raise p.ProtocolError("the DFP's SHA-256 does not match the one in OPEN")
            dfp = Dfp(bytes(event.data))
            self.server.remember(opening.dfp_hash, dfp)
            self.tasks.spawn(self._open(dfp, opening.group_id), "open")
        elif isinstance(event, p.Frame):
            self._frame(event)
        elif isinstance(event, p.Stats):
            self._send(p.StatsReply(event.seq, self.statistics()))
        elif isinstance(event, p.Close):
            self._send(p.Bye())
            self._close()
        elif isinstance(event, p.Closed):
            self._close()
        elif isinstance(event, p.Error):
            log.warning("client %s reported: %s: %s", self.peer, event.code, event.message)
            if event.fatal:
                self._close()

    def _frame(self, event: p.Frame) -> None:
        if not 0 <= event.model < len(self.slots):
            raise p.ProtocolError(f"frame for model {event.model}, the DFP has "
                                  f"{len(self.slots)} model(s)")
        slot = self.slots[event.model]
        try:
            slot.frames[0].send_nowait((event.seq, list(event.arrays)))
        except anyio.WouldBlock:
            raise p.ProtocolError(
                f"more than {slot.capacity} frames in flight for model {event.model}") from None
        slot.frames_in += 1
        _metrics.recorder().frame_in(event.model, self)

    async def _open(self, dfp: Dfp, group_id: int) -> None:
        if self.device is not None:
            self._fail("state", "this connection has a DFP open already")
            return
        device = SimulatedDevice(mode=self.server.mode,
                                 queue_depth=self.server.scheduler.options.ofmap_queue)
        try:
            await device.open(dfp, group_id)
        except (MemryxError, ValueError, TypeError) as exc:
            await device.aclose()
            self._fail(type(exc).__name__, str(exc))  # the client raises the same type
            return
        if self._closing:
            await device.aclose()
            return
        self.device = device
        cap = self.server.scheduler.options.ifmap_queue
        for m in dfp.models:
            slot = Slot(self, m.index, cap, open_channel(cap))
            self.slots.append(slot)
            self.tasks.spawn(slot.run(self.server.scheduler, device), f"slot-{m.index}")
            self.tasks.spawn(slot.collect(device), f"collect-{m.index}")
        self._send(p.Opened(tuple(p.OpenedModel(cap) for _ in dfp.models)))
        log.info("client %s opened %r", self.peer, dfp)
        _metrics.recorder().model_opened(self, dfp)

    # -- output ---------------------------------------------------------------------------
    def _send(self, event: Any) -> None:
        if self.transport is None or self._closing:
            return
        self.transport.writelines(self.conn.send(event))

    async def write(self, event: Any) -> None:
        """Send an event, waiting while the client is slow to read."""
        await self._can_write.wait()
        self._send(event)

    def _fail(self, code: str, message: str) -> None:
        log.warning("client %s: %s error: %s", self.peer, code, message)
        if self.transport is not None and not self._closing:
            with contextlib.suppress(p.ProtocolError):
                self.transport.write(self.conn.farewell(code, message))
        self._close()

    def _close(self) -> None:
        if self.transport is not None and not self._closing:
            self._closing = True
            self.transport.close()

    def _on_error(self, exc: BaseException) -> None:
        self._fail("device", f"{type(exc).__name__}: {exc}")

    async def _cleanup(self) -> None:
        await self.tasks.aclose()
        for slot in self.slots:
            for end in slot.frames:
                end.close()
        if self.device is not None:
            await self.device.aclose()

    def statistics(self) -> dict[str, Any]:
        return {
            "models": [{"model_idx": s.model_idx, "frames_in": s.frames_in,
                        "frames_out": s.frames_out, "in_flight": len(s.in_flight)}
                       for s in self.slots],
            "device": self.device.statistics() if self.device else None,
            "scheduler": self.server.scheduler_stats(),
        }


class DeviceServer:
    """Serves one simulated MX3 on a Unix socket."""

    def __init__(self, path: str | os.PathLike[str] | None = None, *, mode: str = "timed",
                 options: SchedulerOptions | None = None,
                 max_payload: int = p.DEFAULT_MAX_PAYLOAD) -> None:
        self.path = Path(path) if path is not None else default_socket_path()
        self.mode = mode
        self.scheduler = ChipScheduler(options or SchedulerOptions())
        self.max_payload = max_payload
        self.sessions: set[Session] = set()
        self._dfps: OrderedDict[bytes, Dfp] = OrderedDict()
        self._server: asyncio.AbstractServer | None = None
        self._tasks = TaskSet("server", lambda exc: log.error("server task failed: %r", exc))

    def spawn(self, coro: Any, name: str) -> None:
        self._tasks.spawn(coro, name)

    def cached(self, digest: bytes) -> Dfp | None:
        dfp = self._dfps.get(digest)
        if dfp is not None:
            self._dfps.move_to_end(digest)
        return dfp

    def remember(self, digest: bytes, dfp: Dfp) -> None:
        self._dfps[digest] = dfp
        while len(self._dfps) > DFP_CACHE:
            self._dfps.popitem(last=False)

    def scheduler_stats(self) -> dict[str, Any]:
        return {"options": asdict(self.scheduler.options), "turns": self.scheduler.turns,
                "swaps": self.scheduler.swaps, "clients": len(self.sessions)}

    async def start(self) -> None:
        if self.path.exists() or self.path.is_symlink():
            if not self.path.is_socket():
                raise FileExistsError(f"{self.path} exists and is not a socket")
            self.path.unlink()  # a stale socket of a server that died
        loop = asyncio.get_running_loop()
        old = os.umask(0o177)  # the socket is born owner-only (srw-------)
        try:
            self._server = await loop.create_unix_server(lambda: Session(self), str(self.path))
        finally:
            os.umask(old)
        os.chmod(self.path, 0o600)
        log.info("memryx device server listening on %s (%s mode)", self.path, self.mode)

    async def aclose(self) -> None:
        if self._server is not None:
            self._server.close()
            for session in list(self.sessions):
                session._close()
            await self._server.wait_closed()
            self._server = None
        await asyncio.sleep(0)
        await self._tasks.aclose()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    async def serve_forever(self) -> None:
        await self.start()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        try:
            await stop.wait()
        finally:
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)
            await self.aclose()
            log.info("memryx device server stopped")


def serve(path: str | os.PathLike[str] | None = None, *, mode: str = "timed",
          options: SchedulerOptions | None = None) -> None:
    """Run a device server until SIGINT / SIGTERM (uvloop when installed)."""
    server = DeviceServer(path, mode=mode, options=options)
    try:
        import uvloop

        uvloop.run(server.serve_forever())
    except ImportError:  # pragma: no cover
        asyncio.run(server.serve_forever())
