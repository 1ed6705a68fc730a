"""The in-process simulated MX3.

Each model of the DFP runs its graph with onnxruntime on worker threads, several
frames at once, and hands outputs back in the order the frames came in::

    send -> [input buffer] -> dispatcher -> N concurrent runs -> [in order] -> collector
         -> [output buffer] -> receive

The collector is where a timing model paces outputs to the modeled MX3 rate;
until one is set, outputs leave as fast as the host computes them.
"""

from __future__ import annotations

import asyncio
import logging
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import anyio
from numpy.typing import NDArray

from .._core.channel import ReceiveEnd, SendEnd, open_channel
from .._core.processing import new_session
from .._core.runner import new_limiter, run_sync
from .._core.tasks import TaskSet
from .._exceptions import ClosedError, DeviceError, ModelIndexError

if TYPE_CHECKING:
    from ..dfp import Dfp, ModelInfo

__all__ = ["MODES", "SimulatedDevice"]

log = logging.getLogger("memryx.device.sim")

Array = NDArray[Any]
MODES = ("fast",)


@dataclass
class _ModelStats:
    frames_in: int = 0
    frames_out: int = 0


@dataclass
class _Model:
    info: ModelInfo
    session: Any
    names: list[str]
    inq: tuple[SendEnd[list[Array]], ReceiveEnd[list[Array]]]
    running: tuple[SendEnd[asyncio.Task[list[Array] | BaseException]],
                   ReceiveEnd[asyncio.Task[list[Array] | BaseException]]]
    outq: tuple[SendEnd[list[Array] | BaseException], ReceiveEnd[list[Array] | BaseException]]
    stats: _ModelStats = field(default_factory=_ModelStats)


class SimulatedDevice:
    """An MX3 simulated in this process.

    Parameters:
        groups: how many chip groups the simulated box has (``group_id`` must be below it).
        concurrency: frames of one model computed at once (default: the host's cores).
        queue_depth: frames each model's input and output buffers hold.
        mode: ``"fast"``: outputs as fast as the host computes them.
    """

    name = "sim"

    def __init__(self, *, groups: int = 1, concurrency: int | None = None,
                 queue_depth: int = 4, mode: str = "fast") -> None:
        if mode not in MODES:
            raise ValueError(f"unknown simulated device mode {mode!r}: expected one of {MODES}")
        if queue_depth < 1:
            raise ValueError(f"queue_depth must be >= 1, got {queue_depth}")
        self.groups = groups
        self.mode = mode
        self.concurrency = concurrency or max(1, os.cpu_count() or 1)
        self.queue_depth = queue_depth
        self._models: list[_Model] = []
        self._tasks: TaskSet | None = None
        self._closed = False
        self._fault: BaseException | None = None

    async def open(self, dfp: Dfp, group_id: int) -> None:
        if isinstance(group_id, bool) or not isinstance(group_id, int):
            raise TypeError(f"group_id must be an int, got {type(group_id).__name__}")
        if not 0 <= group_id < self.groups:
            raise ModelIndexError(
                f"group_id {group_id} out of range: the simulated device has {self.groups} "
                f"chip group(s) (valid: 0..{self.groups - 1})"
            )
        try:
            sessions = await run_sync(lambda: [new_session(m.graph) for m in dfp.models])
        except Exception as exc:
            from .._exceptions import DfpError

            raise DfpError(f"the DFP's graphs cannot be loaded ({exc})") from exc
        self._tasks = TaskSet("sim", self._on_task_error)
        limiter = new_limiter(self.concurrency * len(dfp.models))
        for info, session in zip(dfp.models, sessions, strict=True):
            model = _Model(
                info=info, session=session, names=[p.layer for p in info.inputs],
                inq=open_channel(self.queue_depth),
                running=open_channel(max(0, self.concurrency - 1)),
                outq=open_channel(self.queue_depth),
            )
            self._models.append(model)
            self._tasks.spawn(self._dispatch(model, limiter), f"dispatch-{info.index}")
            self._tasks.spawn(self._collect(model), f"collect-{info.index}")
        log.debug("simulated device opened %d model(s), concurrency %d", len(sessions),
                  self.concurrency)

    def _on_task_error(self, exc: BaseException) -> None:
        if self._fault is None:
            self._fault = exc
            log.error("simulated device fault: %r", exc)
        for m in self._models:
            m.outq[0].close()

    def _model(self, model_idx: int) -> _Model:
        if self._closed:
            raise ClosedError("the device is closed")
        if not 0 <= model_idx < len(self._models):
            raise ModelIndexError(f"model_idx {model_idx} out of range")
        return self._models[model_idx]

    def capacity(self, model_idx: int) -> int:
        return 2 * self.queue_depth + self.concurrency

    async def send(self, model_idx: int, frame: list[Array]) -> None:
        model = self._model(model_idx)
        try:
            await model.inq[0].send(frame)
        except (anyio.BrokenResourceError, anyio.ClosedResourceError):
            raise self._lost(model) from self._fault
        model.stats.frames_in += 1

    async def receive(self, model_idx: int) -> list[Array]:
        model = self._model(model_idx)
        try:
            item = await model.outq[1].receive()
        except (anyio.EndOfStream, anyio.ClosedResourceError):
            raise self._lost(model) from self._fault
        if isinstance(item, BaseException):
            raise self._lost(model) from item
        model.stats.frames_out += 1
        return item

    def _lost(self, model: _Model) -> DeviceError:
        lost = model.stats.frames_in - model.stats.frames_out
        cause = f": {self._fault!r}" if self._fault else ""
        return DeviceError(f"simulated device failed on model {model.info.index} "
                           f"({model.info.name!r}); {lost} frame(s) lost{cause}", lost_frames=lost)

    async def _dispatch(self, model: _Model, limiter: anyio.CapacityLimiter) -> None:
        assert self._tasks is not None
        send_running, recv_in = model.running[0], model.inq[1]
        async with send_running:
            async for frame in recv_in:
                feeds = dict(zip(model.names, frame, strict=True))
                task = self._tasks.spawn(self._run(model, feeds, limiter),
                                         f"run-{model.info.index}")
                await send_running.send(task)

    @staticmethod
    async def _run(model: _Model, feeds: dict[str, Array], limiter: anyio.CapacityLimiter
                   ) -> list[Array] | BaseException:
        try:
            return list(await run_sync(model.session.run, None, feeds, limiter=limiter))
        except Exception as exc:  # handed to the collector, in frame order
            return DeviceError(
                f"model {model.info.index} ({model.info.name!r}) failed to execute: {exc}")

    async def _collect(self, model: _Model) -> None:
        send_out, recv_running = model.outq[0], model.running[1]
        async with send_out:
            async for task in recv_running:
                outs = await task
                # A timing model paces the release of each output here.
                await send_out.send(outs)

    def statistics(self) -> dict[str, Any]:
        return {
            "device": self.name, "mode": self.mode,
            "models": [{"model_idx": m.info.index, "frames_in": m.stats.frames_in,
                        "frames_out": m.stats.frames_out} for m in self._models],
        }

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._tasks is not None:
            await self._tasks.aclose()
        for m in self._models:
            for end in (*m.inq, *m.running, *m.outq):
                end.close()
