"""One client connection of the device server, and its models' turns on the chip.

A session is guarded so that nothing its client does can slow another client
beyond one scheduler turn:

* frames in flight per model are counted exactly (received, output not yet
  written); one frame beyond the capacity ends the connection with a reason;
* outputs are written without waiting; a client that does not read them fills
  its own buffer, and from then on its models get no turn on the chip until it
  reads (backpressure). Left unread for ``stall_timeout`` it is cut off;
* frame bytes queued in the server beyond ``max_buffered_bytes`` stop the server
  reading that connection until the chip catches up, and so does a full output
  buffer (a client asking for STATS replies it never reads gets nowhere);
* a connection must say HELLO and OPEN within ``handshake_timeout`` and may not
  stay silent with nothing in flight beyond ``idle_timeout``.

The server's ticker calls :meth:`Session.tick` to enforce the timeouts.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from typing import TYPE_CHECKING, Any, cast

from numpy.typing import NDArray

from .._core.aio import TaskSet
from .._core.channel import open_channel
from .._exceptions import MemryxError
from .._version import __version__
from ..dfp import Dfp
from . import _metrics
from . import protocol as p
from ._auth import PreambleReader, tokens_match
from ._listen import peer_uid
from ._scheduler import ChipScheduler, ClientSchedule, client_schedule
from ._slot import Slot
from .simulated import SimulatedDevice

if TYPE_CHECKING:
    from .server import DeviceServer

__all__ = ["Session", "Slot"]

log = logging.getLogger("memryx.server")
Array = NDArray[Any]

#: Bytes of unread outputs above which a client's models get no turn on the chip.
WRITE_HIGH = 1024 * 1024
WRITE_LOW = 256 * 1024
#: Seconds a refused connection is given to read why before it is dropped.
REFUSED_GRACE = 1.0
class Session(asyncio.Protocol):
    """One client connection (``kind`` "unix" or "tcp")."""

    def __init__(self, server: DeviceServer, kind: str) -> None:
        self.server = server
        self.limits = server.limits
        self.kind = kind
        self.conn = p.Connection(p.Role.SERVER, max_payload=server.limits.max_message_bytes)
        self.transport: asyncio.Transport | None = None
        self.device: SimulatedDevice | None = None
        self.slots: list[Slot] = []
        #: This client's turns: the server's options until its HELLO asks for its own.
        self.schedule: ClientSchedule = client_schedule(server.scheduler.options, None)
        #: The scheduler of the chip group this client opened.
        self.chip: ChipScheduler = server.scheduler
        self.tasks = TaskSet("session", self._on_error)
        self.peer = "?"
        self.born = self.last_rx = time.monotonic()
        self.opened = False
        self.rejected = False
        self.queued_bytes = 0
        self._preamble = PreambleReader() if kind == "tcp" else None
        self._pending_open: p.Open | None = None
        self._can_write = asyncio.Event()
        self._can_write.set()
        self._paused_since: float | None = None
        self._paused_size = 0  # write buffer size when last checked while paused
        self._read_blockers: set[str] = set()  # "buffered", "unread": why reading is paused
        self._closing = False
        self._closing_since = 0.0

    # -- asyncio.Protocol -------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        self.transport.set_write_buffer_limits(high=WRITE_HIGH, low=WRITE_LOW)
        sessions = self.server.sessions
        if len(sessions) >= self.limits.max_connections:
            log.warning("refused a client: %d connected, the limit", len(sessions))
            self._closing = True
            self.transport.write(self.conn.farewell(
                "busy", f"the device server has {len(sessions)} clients connected, its limit "
                        "(memryx serve --max-connections)"))
            self.transport.close()
            return
        sessions.add(self)
        _metrics.recorder().client_connected(self)
        sock = self.transport.get_extra_info("socket")
        if self.kind == "unix":
            uid = peer_uid(sock)
            self.peer = f"uid {uid}"
            if uid not in self.limits.allowed_uids:
                self._refuse(f"uid {uid} may not use this device server (allowed: uid "
                             f"{', '.join(map(str, sorted(self.limits.allowed_uids)))}; "
                             "memryx serve --allow-uid)")
                return
        else:
            self.peer = str(self.transport.get_extra_info("peername"))
            with contextlib.suppress(OSError, AttributeError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, 30)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, 10)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, 3)
        log.info("client connected (%d connected)", len(sessions))

    def data_received(self, data: bytes) -> None:
        if self.rejected or self._closing:
            return
        self.last_rx = time.monotonic()
        if self._preamble is not None:
            try:
                got = self._preamble.feed(data)
            except ValueError as exc:
                self._refuse(str(exc))
                return
            if got is None:
                return
            token, rest = got
            self._preamble = None
            if self.server.token is not None and not tokens_match(token, self.server.token):
                self._refuse("wrong token (check MEMRYX_TOKEN)")
                return
            if not rest:
                return
            data = rest
        try:
            events = self.conn.receive_data(data)
        except p.ProtocolError as exc:
            self._fail("protocol", str(exc))
            return
        for event in events:
            if self._closing:
                return  # failed on an earlier event of the same read
            try:
                self._handle(event)
            except (p.ProtocolError, MemryxError, ValueError) as exc:
                self._fail("protocol", str(exc))
                return

    def eof_received(self) -> bool | None:
        return None  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        if self not in self.server.sessions:
            return  # refused as busy: never joined
        self.server.sessions.discard(self)
        _metrics.recorder().client_disconnected(self)
        self._closing = True
        self._can_write.set()
        for slot in self.slots:
            self.chip.drop(slot)
        self.server.spawn(self._cleanup(), "cleanup")
        log.info("client %s disconnected (%d connected)", self.peer, len(self.server.sessions))

    def pause_writing(self) -> None:
        self._can_write.clear()
        self._paused_since = time.monotonic()
        self._paused_size = self.transport.get_write_buffer_size() if self.transport else 0
        self._block_reading("unread")

    def resume_writing(self) -> None:
        self._can_write.set()
        self._paused_since = None
        self._unblock_reading("unread")

    def _block_reading(self, why: str) -> None:
        if not self._read_blockers and self.transport is not None and not self._closing:
            self.transport.pause_reading()
        self._read_blockers.add(why)

    def _unblock_reading(self, why: str) -> None:
        if why not in self._read_blockers:
            return
        self._read_blockers.discard(why)
        if not self._read_blockers and self.transport is not None and not self._closing:
            self.transport.resume_reading()

    # -- flow control ---------------------------------------------------------------------
    @property
    def closing(self) -> bool:
        return self._closing

    def can_write(self) -> bool:
        return self._can_write.is_set()

    async def writable(self) -> None:
        await self._can_write.wait()

    def dequeued(self, nbytes: int) -> None:
        """Frame bytes left the server's queue for the chip."""
        self.queued_bytes -= nbytes
        if self.queued_bytes <= self.limits.max_buffered_bytes // 2:
            self._unblock_reading("buffered")

    def tick(self, now: float) -> None:
        """Enforce the timeouts (called about every quarter second by the server)."""
        lim = self.limits
        if self.rejected:
            if now - self._closing_since > REFUSED_GRACE and self.transport is not None:
                self.transport.abort()
        elif self._closing:
            if now - self._closing_since > lim.stall_timeout and self.transport is not None:
                self.transport.abort()  # it never read what was left for it
        elif not self.opened and now - self.born > lim.handshake_timeout:
            self._fail("timeout", f"no DFP opened within {lim.handshake_timeout:g} s of "
                                  "connecting (memryx serve --handshake-timeout)")
        elif self._paused_since is not None and self._stalled(now):
            self._fail("stalled", f"outputs left unread for {lim.stall_timeout:g} s "
                                  "(memryx serve --stall-timeout)", abort=True)
        elif now - self.last_rx > lim.idle_timeout and not any(s.unanswered for s in self.slots):
            self._fail("idle", f"idle for {lim.idle_timeout:g} s (memryx serve --idle-timeout)")

    def _stalled(self, now: float) -> bool:
        """No byte of the paused output buffer taken for ``stall_timeout`` (a slow reader
        of a large output makes progress and is never cut off)."""
        assert self._paused_since is not None
        assert self.transport is not None
        size = self.transport.get_write_buffer_size()
        if size < self._paused_size:
            self._paused_since = now
        self._paused_size = size
        return now - self._paused_since > self.limits.stall_timeout

    # -- events -------------------------------------------------------------------------------
    def _handle(self, event: Any) -> None:
        if isinstance(event, p.Hello):
            self.peer = f"{event.client} pid {event.pid} ({self.peer})"
            try:
                self.schedule = client_schedule(self.server.scheduler.options, event.scheduler)
            except ValueError as exc:
                self._fail("ValueError", f"the device server refused the scheduler options: "
                                         f"{exc}")
                return
            if event.scheduler is not None:
                log.info("client %s schedules %s", self.peer, self.schedule.wire())
            self._send(p.Welcome(f"memryx-server {__version__}", self.limits.max_message_bytes,
                                 idle_timeout=self.limits.idle_timeout,
                                 scheduler=self.schedule.wire(),
                                 stream_tags=event.stream_tags))  # taken when asked for
        elif isinstance(event, p.Open):
            self.opened = True
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
            # the protocol checked the bytes against OPEN's sha256 (the one hash of this open)
            dfp = Dfp(event.data)
            self.server.remember(opening.dfp_hash, dfp, len(event.data))
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
        if slot.unanswered >= slot.capacity:
            raise p.ProtocolError(
                f"more than {slot.capacity} frames in flight for model {event.model}: a client "
                "must read outputs before it sends more")
        arrays = list(event.arrays)
        nbytes = sum(a.nbytes for a in arrays)
        # room: unanswered < capacity
        slot.frames[0].send_nowait((event.seq, arrays, nbytes, event.stream))
        slot.arrived.set()
        slot.unanswered += 1
        slot.frames_in += 1
        _metrics.recorder().frame_in(event.model, self)
        self.queued_bytes += nbytes
        if self.queued_bytes > self.limits.max_buffered_bytes:
            self._block_reading("buffered")

    async def _open(self, dfp: Dfp, group_id: int) -> None:
        if self.device is not None:
            self._fail("state", "this connection has a DFP open already")
            return
        device = SimulatedDevice(mode=self.server.mode, queue_depth=self.schedule.ofmap_queue,
                                 groups=self.server.groups)
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
        self.chip = self.server.schedulers[group_id]  # in range: the device checked it
        cap = self.schedule.ifmap_queue
        stats = device.statistics()
        for m in dfp.models:
            slot = Slot(self, m.index, cap, open_channel(cap))
            fig = stats["models"][m.index] if stats.get("paced") else {}
            fps, latency = fig.get("modeled_fps"), fig.get("modeled_latency_ms")
            if fps and latency is not None:
                slot.modeled = (1.0 / fps, latency / 1000.0)
            self.slots.append(slot)
            self.chip.register(slot)
            self.tasks.spawn(slot.run(self.chip, device), f"slot-{m.index}")
            self.tasks.spawn(slot.collect(device), f"collect-{m.index}")
        self._send(p.Opened(tuple(p.OpenedModel(cap) for _ in dfp.models)))
        log.info("client %s opened %r", self.peer, dfp)
        _metrics.recorder().model_opened(self, dfp)

    # -- output ---------------------------------------------------------------------------
    def send(self, event: Any) -> None:
        """Write an event now (never waits: flow control acts on the chip turns)."""
        if self.transport is None or self._closing:
            return
        self.transport.writelines(self.conn.send(event))

    _send = send

    def _refuse(self, message: str) -> None:
        """Say why, keep the connection (discarding what comes) a moment, then drop it."""
        log.warning("refused client %s: %s", self.peer, message)
        self.rejected = True
        self._closing_since = time.monotonic()
        if self.transport is not None:
            self.transport.write(self.conn.farewell("refused", message))

    def _fail(self, code: str, message: str, *, abort: bool = False) -> None:
        log.warning("client %s: %s error: %s", self.peer, code, message)
        if self.transport is not None and not self._closing:
            with contextlib.suppress(p.ProtocolError):
                self.transport.write(self.conn.farewell(code, message))
        self._close()
        if abort and self.transport is not None:
            self.transport.abort()

    def _close(self) -> None:
        if self.transport is not None and not self._closing:
            self._closing = True
            self._closing_since = time.monotonic()
            self.transport.close()

    def _on_error(self, exc: BaseException) -> None:
        self._fail("device", f"{type(exc).__name__}: {exc}")

    async def _cleanup(self) -> None:
        await self.tasks.aclose()
        for slot in self.slots:
            for end in slot.frames:
                end.close()
        device, self.device = self.device, None
        # the slots point back at this session: let the device (its onnxruntime sessions,
        # its buffers) go now, not at the next full garbage collection
        self.slots = []
        if device is not None:
            await device.aclose()

    def statistics(self) -> dict[str, Any]:
        return {
            "models": [{"model_idx": s.model_idx, "frames_in": s.frames_in,
                        "frames_out": s.frames_out, "in_flight": s.unanswered,
                        "turns": s.turns, "turn_frames_max": s.turn_frames_max,
                        "turn_frames_mean": s.turn_frames_total / s.turns if s.turns else 0.0,
                        "turn_ms_max": s.turn_ms_max, "turn_ends": dict(s.turn_ends)}
                       for s in self.slots],
            "schedule": self.schedule.wire(),
            "device": self.device.statistics() if self.device else None,
            "scheduler": self.server.scheduler_stats(),
        }
