"""The lane's tracing: frames numbered as they are queued, and their queued, device and
pre-processing stages recorded (only called when the accelerator's tracer is on)."""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

from .._trace import Tracer
from .meter import Meter

if TYPE_CHECKING:
    from .lane import Frame, Tag, Traced

__all__ = ["LaneTracing"]


class LaneTracing:
    """The tracing half of :class:`~.lane.Lane` (a mixin: it uses the lane's state)."""

    idx: int
    now: Callable[[], float]
    meter: Meter
    tracer: Tracer
    _traced: list[Traced]
    _traced_flight: deque[tuple[asyncio.Future[list[Frame]], list[Traced], float, list[float]]]

    def prepare(self, data: Any) -> Frame:  # pragma: no cover - the lane's
        raise NotImplementedError

    def trace_clock(self) -> float:
        """Now, if tracing is on, else 0.0 (a request frame's pre-processing starts)."""
        return self.now() if self.tracer.on else 0.0

    def trace_pre(self, t0: float, t1: float) -> None:
        """A request frame about to be put was pre-processed from t0 to t1."""
        if self.tracer.on:
            self.tracer.frame(0, self.idx, "pre-processing", t0, t1, self.meter.frames_in)

    def prepare_traced(self, items: Sequence[Any]) -> list[Frame]:
        """``prepare`` request frames that are put next, in order, recording each one's
        pre-processing."""
        out: list[Frame] = []
        base = self.meter.frames_in
        for j, data in enumerate(items):
            t0 = self.now()
            out.append(self.prepare(data))
            self.tracer.frame(0, self.idx, "pre-processing", t0, self.now(), base + j)
        return out

    def _trace_put(self, tags: Iterable[Tag], stream: Meter | None) -> None:
        """Frames queued: number them (per stream; request frames on stream 0, per model)."""
        now = self.now()
        base = stream.frames_in if stream is not None else self.meter.frames_in
        traced = self._traced
        for i, (sink, key, _) in enumerate(tags):
            traced.append((key if sink is None else 0, base + i, now))

    def _trace_submit(self, fut: asyncio.Future[list[Frame]], traced: list[Traced], n: int,
                      start: int, end: int) -> None:
        """Frames ``start:end`` of ``n`` flushed went to the device (``traced`` is the tail)."""
        offset = n - len(traced)
        batch = traced[max(0, start - offset):max(0, end - offset)]
        if not batch:
            return
        tracer, model, now = self.tracer, self.idx, self.now()
        for stream, k, queued in batch:
            tracer.frame(stream, model, "queued", queued, now, k)
        resolved_at: list[float] = []
        self._traced_flight.append((fut, batch, now, resolved_at))

        def resolved(_fut: asyncio.Future[list[Frame]]) -> None:
            # the collector may have taken the outputs first (its wake-up ran before this
            # callback): then its time is the end of both the device stage and busy interval
            if not resolved_at:
                resolved_at.append(self.now())
            if tracer.on:
                tracer.busy(model, now, resolved_at[0])

        fut.add_done_callback(resolved)

    def _trace_device(self, ready: float) -> list[Traced]:
        """The collector took a traced batch's outputs at ``ready``: record its device stage,
        from submit to the future's resolution (``ready`` if its callback has not run yet)."""
        _, batch, submitted, resolved_at = self._traced_flight.popleft()
        if not resolved_at:  # its done-callback has not run yet: it will use this time too
            resolved_at.append(ready)
        done = resolved_at[0]
        tracer, model = self.tracer, self.idx
        if tracer.on:
            for stream, k, _ in batch:
                tracer.frame(stream, model, "device", submitted, done, k)
        return batch
