"""One model of one client session as the chip's scheduler sees it: its turns.

A slot waits for frames and a client that reads, takes a turn on the chip
(:class:`~._scheduler.ChipScheduler`) following its client's
:class:`~._scheduler.ClientSchedule`, and drains before it hands the chip over;
its collector writes the outputs back in order. Split from :mod:`._session`,
which owns the connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import anyio
from numpy.typing import NDArray

from .._core.channel import ReceiveEnd, SendEnd, get
from . import _metrics
from . import protocol as p
from ._scheduler import ChipScheduler
from .simulated import SimulatedDevice

if TYPE_CHECKING:
    from ._session import Session

__all__ = ["TURN_ENDS", "Item", "Slot"]

Array = NDArray[Any]
Item = tuple[int, list[Array], int, int]  # seq, arrays, bytes, the client's stream tag
#: Why a turn on the chip ended: its frame or time limit while another slot waited, no
#: frame left, a client not reading its outputs, or a limit reached with nobody waiting.
TURN_ENDS = ("frame_limit", "time_limit", "empty", "unread", "renewed")



@dataclass
class Slot:
    """One model of one client session, as the scheduler sees it."""

    session: Session
    model_idx: int
    capacity: int
    frames: tuple[SendEnd[Item], ReceiveEnd[Item]]
    in_flight: deque[tuple[int, asyncio.Future[list[list[Array]]]]] = \
        field(default_factory=deque)
    drained: asyncio.Event = field(default_factory=asyncio.Event)
    has_work: asyncio.Event = field(default_factory=asyncio.Event)
    arrived: asyncio.Event = field(default_factory=asyncio.Event)
    """Set when a frame was queued (for a turn that holds the chip waiting for one)."""
    left_chip: asyncio.Event = field(default_factory=asyncio.Event)
    """Set when an output left the chip (for a turn waiting for room on it)."""
    unanswered: int = 0
    frames_in: int = 0
    frames_out: int = 0
    turns: int = 0
    turn_frames_max: int = 0
    turn_frames_total: int = 0
    turn_ms_max: float = 0.0
    turn_ends: dict[str, int] = field(default_factory=lambda: dict.fromkeys(TURN_ENDS, 0))
    modeled: tuple[float, float] | None = None
    """(frame interval, latency) in seconds of the modeled chip, in a paced mode."""
    last_entry: float = -math.inf
    chip_free_at: float = 0.0
    """When the modeled chip has let out the last frame of ours (paced modes)."""

    def queued(self) -> bool:
        """Whether frames of this slot wait for the chip, for a client that reads its
        outputs (one that does not gets no turn until it does: it contends for nothing)."""
        return self.frames[1].statistics().current_buffer_used > 0 and \
            self.session.can_write() and not self.session.closing

    def _end_turn(self, sent: int, why: str, started: float) -> None:
        self.turn_ms_max = max(self.turn_ms_max, (time.monotonic() - started) * 1000)
        self.turns += 1
        self.turn_frames_max = max(self.turn_frames_max, sent)
        self.turn_frames_total += sent
        self.turn_ends[why] += 1

    @staticmethod
    async def _until(event: asyncio.Event, deadline: float) -> bool:
        """Wait for ``event`` until ``deadline`` (monotonic); whether it is set."""
        if event.is_set():
            return True
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return False
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(event.wait(), remaining)
        return event.is_set()

    async def run(self, scheduler: ChipScheduler, device: SimulatedDevice) -> None:
        """Wait for frames and a reading client, take a turn on the chip, drain.

        The turn follows the client's :class:`ClientSchedule`: at most
        ``frame_limit`` frames or ``time_limit_ms``, at most ``ofmap_queue`` frames
        on the chip at once; with ``stop_on_empty`` off, a turn that runs out of
        frames while another slot waits keeps the chip until its time is up.
        """
        recv = self.frames[1]
        session = self.session
        while True:
            try:
                first = await get(recv)
            except anyio.EndOfStream:
                return
            await session.writable()
            if session.closing:
                return  # its client is gone: no more turns
            await scheduler.acquire(self)
            try:
                await self._turn(scheduler, device, first)
                # Hand the chip over empty: another model waits, so let ours drain.
                # Draining never waits for the client: outputs are written at once.
                if scheduler.contended(self) and self.in_flight:
                    await self._drain()
            finally:
                scheduler.release(self)

    async def _drain(self) -> None:
        """Until our frames left the chip: in a paced mode, when the modeled chip let the
        last one out (a host slower than the chip does not hold the chip longer: the
        outputs follow when computed), else when their outputs are back."""
        if self.modeled is None:
            await self.drained.wait()
        else:
            await self._until(self.drained, self.chip_free_at)

    def _entered(self) -> None:
        """A frame entered the modeled chip now."""
        if self.modeled is not None:
            interval, latency = self.modeled
            entry = max(time.monotonic(), self.last_entry + interval)
            self.last_entry = entry
            self.chip_free_at = max(self.chip_free_at, entry + latency)

    async def _turn(self, scheduler: ChipScheduler, device: SimulatedDevice, first: Item
                    ) -> None:
        opts = self.session.schedule
        recv = self.frames[1]
        session = self.session
        started = time.monotonic()
        sent = 0
        item: Item | None = first
        while item is not None:
            while len(self.in_flight) >= opts.ofmap_queue:
                # the chip holds all it may of ours: the oldest leaves in a frame time
                self.left_chip.clear()
                await self.left_chip.wait()
            seq, arrays, nbytes, stream = item
            # Each session has a device of its own: the streams of different clients
            # never meet in one device (two clients' stream 0 are two streams).
            self.in_flight.append((seq, device.submit(self.model_idx, [arrays],
                                                      streams=(stream,))))
            self._entered()
            self.drained.clear()
            self.has_work.set()
            session.dequeued(nbytes)
            sent += 1
            if not session.can_write():
                self._end_turn(sent, "unread", started)  # no more chip time until the client reads
                return
            now = time.monotonic()
            over = "frame_limit" if sent >= opts.frame_limit else \
                "time_limit" if (now - started) * 1000 >= opts.time_limit_ms else None
            if over is not None:
                if scheduler.contended(self):
                    self._end_turn(sent, over, started)
                    return
                self._end_turn(sent, "renewed", started)  # nobody waits: a new turn
                started, sent = now, 0
            try:
                item = recv.receive_nowait()
            except anyio.EndOfStream:
                item = None
            except anyio.WouldBlock:
                item = None
                if not opts.stop_on_empty and scheduler.contended(self):
                    # hold the chip for the rest of the turn, for this client's next frame
                    self.arrived.clear()
                    deadline = started + opts.time_limit_ms / 1000
                    while item is None and await self._until(self.arrived, deadline):
                        self.arrived.clear()
                        try:
                            item = recv.receive_nowait()
                        except anyio.WouldBlock:
                            continue
                        except anyio.EndOfStream:
                            break
                    if item is None:
                        self._end_turn(sent, "time_limit", started)
                        return
        self._end_turn(sent, "empty", started)

    async def collect(self, device: SimulatedDevice) -> None:
        """Outputs of this model back to the client, in order, without waiting for it."""
        while True:
            if not self.in_flight:
                self.has_work.clear()
                await self.has_work.wait()
                continue
            seq, fut = self.in_flight[0]
            (outputs,) = await fut
            self.in_flight.popleft()
            self.frames_out += 1
            self.left_chip.set()
            _metrics.recorder().frame_out(self.model_idx, self.session)
            self.unanswered -= 1
            self.session.send(p.Output(self.model_idx, seq, outputs))
            if not self.in_flight:
                self.drained.set()
