"""The in-process simulated MX3.

Each model of the DFP runs its graph with onnxruntime on worker threads, several
frames at once, and hands outputs back in the order the frames came in::

    send -> [input buffer] -> dispatcher -> concurrent runs -> [in order] -> collector
         -> [output buffer] -> receive

Modes:

* ``"timed"`` (default): outputs are real, and paced like the chip would
  deliver them: frame *i* enters the modeled pipeline at
  ``entry_i = max(arrival_i, entry_{i-1} + 1/fps)`` and leaves at
  ``entry_i + latency`` (fps and latency from the DFP's performance model, see
  :mod:`memryx.timing`). When the host computes a frame later than the chip
  would have delivered it, the device logs a warning (once per model) and
  counts the frame in ``statistics()["models"][i]["late_frames"]``.
* ``"fast"``: real outputs, as fast as the host computes them.
* ``"shapes"``: zeros of the right shapes and dtypes, nothing computed and no
  pacing: for wiring tests of models too big to run on the host.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import anyio
import numpy as np
from numpy.typing import NDArray

from .._core.channel import ReceiveEnd, SendEnd, drain, get, open_channel, put
from .._core.processing import new_session
from .._core.runner import new_limiter, run_sync
from .._core.tasks import TaskSet
from .._exceptions import ClosedError, DeviceError, DfpError, ModelIndexError

if TYPE_CHECKING:
    from ..dfp import Dfp, ModelInfo

__all__ = ["MODES", "SimulatedDevice"]

log = logging.getLogger("memryx.device.sim")

Array = NDArray[Any]
Result = list[Array] | BaseException
MODES = ("timed", "fast", "shapes")
#: How much later than its modeled release an output may be before it counts as late.
LATE_TOLERANCE_S = 0.002
#: The most waiting frames of one model computed in one thread hop.
RUN_BATCH = 16
#: Graphs the host computes faster than this per frame run on the loop thread itself.
INLINE_COST_S = 30e-6


@dataclass
class _Pacer:
    """Release times of one model's outputs under the timing model."""

    interval: float
    latency: float
    last_entry: float = -1e18
    last_release: float = -1e18

    def admit(self, now: float) -> tuple[float, float]:
        """The frame arriving ``now`` enters the pipeline: its (entry, release) times."""
        entry = max(now, self.last_entry + self.interval)
        self.last_entry = entry
        self.last_release = max(entry + self.latency, self.last_release)
        return entry, self.last_release


@dataclass
class _Model:
    info: ModelInfo
    session: Any
    names: list[str]
    pacer: _Pacer | None
    inq: tuple[SendEnd[list[Array]], ReceiveEnd[list[Array]]]
    running: tuple[SendEnd[tuple[asyncio.Task[list[Result]], list[tuple[float, float]]]],
                   ReceiveEnd[tuple[asyncio.Task[list[Result]], list[tuple[float, float]]]]]
    outq: tuple[SendEnd[Result], ReceiveEnd[Result]]
    frames_in: int = 0
    frames_out: int = 0
    late_frames: int = 0
    warned: bool = False
    latencies: deque[float] = field(default_factory=lambda: deque(maxlen=4096))
    """Per frame: from entering the (modeled) chip to leaving the device."""
    oversleep: float = 0.0
    """How late the loop wakes a pacing sleep, learnt as it runs (seconds)."""
    frame_cost: float = 1.0
    """Running average of the host's compute time per frame (seconds)."""
    first_out: float = 0.0
    last_out: float = 0.0
    modeled: dict[str, Any] = field(default_factory=dict)

    def admit(self, now: float) -> tuple[float, float]:
        """Entry and release time of a frame that reaches the chip ``now``."""
        return self.pacer.admit(now) if self.pacer is not None else (now, now)


def _perf(info: ModelInfo, num_chips: int) -> dict[str, Any]:
    """The model's performance figures: from the DFP, or estimated now if it has none."""
    if info.perf and "fps" in info.perf and "latency_ms" in info.perf:
        return dict(info.perf)
    import onnx

    from ..timing import estimate

    return estimate(onnx.load_model_from_string(info.graph), num_chips).to_json()


def _percentiles(samples: deque[float]) -> dict[str, float | None]:
    ms = np.asarray(samples) * 1000.0
    if not ms.size:
        return {"p50": None, "p99": None}
    return {"p50": float(np.percentile(ms, 50)), "p99": float(np.percentile(ms, 99))}


_ORT_TYPES = {"tensor(float)": "float32", "tensor(float16)": "float16",
              "tensor(double)": "float64", "tensor(uint8)": "uint8", "tensor(int8)": "int8",
              "tensor(uint16)": "uint16", "tensor(int16)": "int16", "tensor(int32)": "int32",
              "tensor(int64)": "int64", "tensor(bool)": "bool"}


def _check_ports(info: ModelInfo, session: Any) -> None:
    """The DFP's port table must describe its own graph (a crafted DFP may lie)."""
    for kind, ports, metas in (("input", info.inputs, session.get_inputs()),
                               ("output", info.outputs, session.get_outputs())):
        if [p.layer for p in ports] != [m.name for m in metas]:
            raise DfpError(
                f"model {info.index} ({info.name!r}): the DFP's {kind} ports "
                f"{[p.layer for p in ports]} are not its graph's {[m.name for m in metas]}")
        for port, meta in zip(ports, metas, strict=True):
            dims = tuple(d if isinstance(d, int) else -1 for d in meta.shape)
            fits = len(dims) == len(port.shape) and all(
                d in (-1, s) for d, s in zip(dims, port.shape, strict=True))
            if not fits or _ORT_TYPES.get(meta.type) != port.dtype.name:
                raise DfpError(
                    f"model {info.index} ({info.name!r}): {kind} port {port.port} "
                    f"({port.layer!r}) says {port.shape} {port.dtype}, but the graph has "
                    f"{tuple(meta.shape)} {meta.type}")


class SimulatedDevice:
    """An MX3 simulated in this process.

    Parameters:
        mode: ``"timed"`` (default), ``"fast"`` or ``"shapes"`` (module docstring).
        groups: how many chip groups the simulated box has (``group_id`` must be below it).
        concurrency: frames of one model computed at once (default: the host's cores).
        queue_depth: frames each model's input and output buffers hold.
    """

    name = "sim"

    def __init__(self, *, mode: str = "timed", groups: int = 1, concurrency: int | None = None,
                 queue_depth: int = 8) -> None:
        if mode not in MODES:
            raise ValueError(f"unknown simulated device mode {mode!r}: expected one of {MODES}")
        if isinstance(queue_depth, bool) or not isinstance(queue_depth, int) or queue_depth < 1:
            raise ValueError(f"queue_depth must be an int >= 1, got {queue_depth!r}")
        if concurrency is not None and (isinstance(concurrency, bool) or
                                        not isinstance(concurrency, int) or concurrency < 1):
            raise ValueError(f"concurrency must be an int >= 1, got {concurrency!r}")
        if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1:
            raise ValueError(f"groups must be an int >= 1, got {groups!r}")
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
        if self.mode == "shapes":
            sessions: list[Any] = [None] * len(dfp.models)
        else:
            try:
                sessions = await run_sync(lambda: [new_session(m.graph) for m in dfp.models])
            except Exception as exc:
                raise DfpError(f"the DFP's graphs cannot be loaded ({exc})") from exc
            for info, session in zip(dfp.models, sessions, strict=True):
                _check_ports(info, session)
        self._tasks = TaskSet("sim", self._on_task_error)
        limiter = new_limiter(self.concurrency * len(dfp.models))
        for info, session in zip(dfp.models, sessions, strict=True):
            pacer = None
            modeled: dict[str, Any] = {}
            in_chip = self.concurrency
            if self.mode == "timed":
                modeled = _perf(info, dfp.num_chips)
                pacer = _Pacer(1.0 / float(modeled["fps"]), float(modeled["latency_ms"]) / 1000)
                in_chip = max(in_chip, int(modeled.get("pipeline_depth", 1)) + 1)
            model = _Model(
                info=info, session=session, names=[p.layer for p in info.inputs], pacer=pacer,
                inq=open_channel(self.queue_depth), running=open_channel(max(0, in_chip - 1)),
                outq=open_channel(self.queue_depth), modeled=modeled,
            )
            self._models.append(model)
            self._tasks.spawn(self._dispatch(model, limiter), f"dispatch-{info.index}")
            self._tasks.spawn(self._collect(model), f"collect-{info.index}")
        log.debug("simulated device opened %d model(s) in %s mode", len(sessions), self.mode)

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
        m = self._models[model_idx]
        return 2 * self.queue_depth + int(m.running[0].statistics().max_buffer_size) + 1

    async def send(self, model_idx: int, frame: list[Array]) -> None:
        model = self._model(model_idx)
        try:
            await put(model.inq[0], frame)
        except (anyio.BrokenResourceError, anyio.ClosedResourceError):
            raise self._lost(model) from self._fault
        model.frames_in += 1

    async def receive(self, model_idx: int) -> list[Array]:
        model = self._model(model_idx)
        try:
            item = await get(model.outq[1])
        except (anyio.EndOfStream, anyio.ClosedResourceError):
            raise self._lost(model) from self._fault
        if isinstance(item, BaseException):
            raise item
        model.frames_out += 1
        return item

    def _lost(self, model: _Model) -> DeviceError:
        lost = model.frames_in - model.frames_out
        cause = f": {self._fault!r}" if self._fault else ""
        return DeviceError(f"simulated device failed on model {model.info.index} "
                           f"({model.info.name!r}); {lost} frame(s) lost{cause}", lost_frames=lost)

    async def _dispatch(self, model: _Model, limiter: anyio.CapacityLimiter) -> None:
        """Start computing frames as they come, at most ``concurrency`` hops at once;
        the frames that arrive while all are busy share the next hop."""
        assert self._tasks is not None
        send_running, recv_in = model.running[0], model.inq[1]
        slots = anyio.Semaphore(self.concurrency)
        async with send_running:
            while True:
                try:
                    first = await get(recv_in)
                except anyio.EndOfStream:
                    break
                times = [model.admit(time.monotonic())]
                await slots.acquire()
                batch = [first, *drain(recv_in, RUN_BATCH - 1)]
                now = time.monotonic()
                times += [model.admit(now) for _ in batch[1:]]
                task = self._tasks.spawn(self._run(model, batch, limiter, slots),
                                         f"run-{model.info.index}")
                await put(send_running, (task, times))

    @staticmethod
    async def _run(model: _Model, batch: list[list[Array]], limiter: anyio.CapacityLimiter,
                   slots: anyio.Semaphore) -> list[Result]:
        try:
            return await SimulatedDevice._compute(model, batch, limiter)
        finally:
            slots.release()

    @staticmethod
    async def _compute(model: _Model, batch: list[list[Array]], limiter: anyio.CapacityLimiter
                       ) -> list[Result]:
        if model.session is None:  # shapes mode
            return [[np.zeros(p.shape, p.dtype) for p in model.info.outputs] for _ in batch]

        def compute() -> list[Result]:
            results: list[Result] = []
            start = time.thread_time()  # CPU time: waiting for the GIL is not the graph's cost
            for frame in batch:
                try:
                    results.append(list(model.session.run(
                        None, dict(zip(model.names, frame, strict=True)))))
                except Exception as exc:  # handed to the collector, in frame order
                    results.append(DeviceError(
                        f"model {model.info.index} ({model.info.name!r}) failed to execute: "
                        f"{exc}"))
            per_frame = (time.thread_time() - start) / len(batch)
            model.frame_cost += 0.2 * (per_frame - model.frame_cost)
            return results

        if model.frame_cost < INLINE_COST_S:
            # A graph this cheap costs less than a thread hop: run it on the loop.
            return compute()
        return await run_sync(compute, limiter=limiter)

    async def _collect(self, model: _Model) -> None:
        send_out, recv_running = model.outq[0], model.running[1]
        async with send_out:
            while True:
                try:
                    task, times = await get(recv_running)
                except anyio.EndOfStream:
                    break
                for (entry, release), outs in zip(times, await task, strict=True):
                    if model.pacer is not None:
                        delay = release - time.monotonic()
                        if delay > 0:
                            # the loop wakes sleepers a little late: aim that much earlier
                            await asyncio.sleep(max(0.0, delay - model.oversleep))
                            late = time.monotonic() - release
                            model.oversleep = min(0.002, max(
                                0.0, model.oversleep + 0.1 * late))
                        elif -delay > LATE_TOLERANCE_S:
                            self._late(model, -delay)
                    now = time.monotonic()
                    model.first_out = model.first_out or now
                    model.last_out = now
                    model.latencies.append(now - entry)
                    await put(send_out, outs)

    def _late(self, model: _Model, behind: float) -> None:
        model.late_frames += 1
        if not model.warned:
            model.warned = True
            log.warning(
                "model %d (%r): the host computes frames slower than the modeled MX3 rate of "
                "%.0f fps (an output was %.1f ms late); timed outputs follow the host, and "
                "statistics() counts late frames", model.info.index, model.info.name,
                model.modeled.get("fps", 0.0), behind * 1000)

    def statistics(self) -> dict[str, Any]:
        models = []
        for m in self._models:
            span = m.last_out - m.first_out
            models.append({
                "model_idx": m.info.index, "frames_in": m.frames_in, "frames_out": m.frames_out,
                "late_frames": m.late_frames,
                "device_fps": (m.frames_out - 1) / span if span > 0 else 0.0,
                "device_latency_ms": _percentiles(m.latencies),
                "modeled_fps": m.modeled.get("fps"),
                "modeled_latency_ms": m.modeled.get("latency_ms"),
                "queued_in": m.inq[0].statistics().current_buffer_used,
                "queued_out": m.outq[0].statistics().current_buffer_used,
            })
        return {"device": self.name, "mode": self.mode, "models": models}

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._tasks is not None:
            await self._tasks.aclose()
        for m in self._models:
            for end in (*m.inq, *m.running, *m.outq):
                end.close()
