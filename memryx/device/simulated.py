"""The in-process simulated MX3: a pacer plus compute.

``submit(model_idx, frames)`` computes the batch with onnxruntime (on the loop
thread when the graph is cheaper than a thread hop, else on a worker thread, up
to ``concurrency`` batches of a model at once) and resolves its future when
the outputs are due:

* ``"timed"`` (default): outputs are real, and paced like the chip would
  deliver them: frame *i* enters the modeled pipeline at
  ``entry_i = max(arrival_i, entry_{i-1} + 1/fps)`` and leaves at
  ``entry_i + latency`` (fps and latency from the DFP's performance model, see
  :mod:`memryx.timing`). When the host computes a frame later than the chip
  would have delivered it, the device logs a warning (once per model) and
  counts the frame in ``statistics()["models"][i]["late_frames"]``. Frames go
  in one per ``submit`` so that each is released at its own time.
* ``"fast"``: real outputs, as fast as the host computes them.
* ``"shapes"``: zeros of the right shapes and dtypes, nothing computed and no
  pacing: for wiring tests of models too big to run on the host.

The device keeps no queues: the core's frame budget bounds what is in flight,
from :meth:`SimulatedDevice.limits` (``queue_depth`` frames on the way in and
as many on the way out, plus the frames inside the modeled chip).
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import time
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.typing import NDArray

from .._core.aio import TaskSet
from .._core.processing import new_session
from .._core.runner import run_sync
from .._exceptions import ClosedError, DeviceError, DfpError, ModelIndexError
from .base import Limits

if TYPE_CHECKING:
    from ..dfp import Dfp, ModelInfo

__all__ = ["MODES", "SimulatedDevice"]

log = logging.getLogger("memryx.device.sim")

Array = NDArray[Any]
Frame = list[Array]
MODES = ("timed", "fast", "shapes")
#: How much later than its modeled release an output may be before it counts as late.
LATE_TOLERANCE_S = 0.002
#: Graphs the host computes faster than this per frame run on the loop thread itself.
INLINE_COST_S = 30e-6
#: The most frames of one model handed over in one ``submit`` in fast/shapes mode.
FAST_BATCH = 64
#: The most frames of one model computed in one thread hop.
RUN_BATCH = 16


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
class _Job:
    frames: list[Frame]
    future: asyncio.Future[list[Frame]]
    times: list[tuple[float, float]]


@dataclass
class _Model:
    info: ModelInfo
    session: Any
    names: list[str]
    pacer: _Pacer | None
    in_chip: int
    jobs: deque[_Job] = field(default_factory=deque)
    workers: int = 0
    frames_in: int = 0
    frames_out: int = 0
    late_frames: int = 0
    warned: bool = False
    latencies: deque[float] = field(default_factory=lambda: deque(maxlen=4096))
    """Per frame: from entering the (modeled) chip to leaving the device."""
    oversleep: float = 0.0
    """How late the loop wakes a timer, learnt as it runs (seconds)."""
    frame_cost: float = 1.0
    """Running average of the host's CPU time per frame (``thread_time``, seconds)."""
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
        concurrency: batches of one model computed at once (default: the host's cores).
        queue_depth: frames each model buffers on the way in, and outputs on the way
            out; with the frames inside the modeled chip they make the frame budget.
    """

    name = "sim"

    def __init__(self, *, mode: str = "timed", groups: int = 1, concurrency: int | None = None,
                 queue_depth: int = 4) -> None:
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
        self._timers: set[asyncio.TimerHandle] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
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
        self._loop = asyncio.get_running_loop()
        self._tasks = TaskSet("sim", self._on_task_error)
        for info, session in zip(dfp.models, sessions, strict=True):
            pacer = None
            modeled: dict[str, Any] = {}
            in_chip = self.concurrency
            if self.mode == "timed":
                modeled = _perf(info, dfp.num_chips)
                fps, latency_s = float(modeled["fps"]), float(modeled["latency_ms"]) / 1000
                if not (math.isfinite(fps) and fps > 0 and math.isfinite(latency_s)
                        and latency_s >= 0):
                    raise DfpError(f"model {info.index} ({info.name!r}): modeled fps {fps!r} "
                                   f"and latency {latency_s * 1000!r} ms cannot be simulated")
                pacer = _Pacer(1.0 / fps, latency_s)
                # frames the modeled pipeline holds at full rate, plus the one entering
                in_chip = max(1, min(1 << 20, math.ceil(latency_s * fps))) + 1
            self._models.append(_Model(info=info, session=session,
                                       names=[p.layer for p in info.inputs], pacer=pacer,
                                       in_chip=in_chip, modeled=modeled))
        log.debug("simulated device opened %d model(s) in %s mode", len(sessions), self.mode)

    def _on_task_error(self, exc: BaseException) -> None:
        if self._fault is None:
            self._fault = exc
            log.error("simulated device fault: %r", exc)
        for m in self._models:
            for job in m.jobs:
                if not job.future.done():
                    job.future.set_exception(self._lost(m))
            m.jobs.clear()

    def _model(self, model_idx: int) -> _Model:
        if self._closed:
            raise ClosedError("the device is closed")
        if not 0 <= model_idx < len(self._models):
            raise ModelIndexError(f"model_idx {model_idx} out of range")
        return self._models[model_idx]

    def limits(self, model_idx: int) -> Limits:
        m = self._models[model_idx]
        batch = 1 if m.pacer is not None else FAST_BATCH
        return Limits(in_queue=self.queue_depth, in_chip=m.in_chip,
                      out_queue=self.queue_depth, batch=batch)

    def submit(self, model_idx: int, frames: list[Frame]) -> asyncio.Future[list[Frame]]:
        model = self._model(model_idx)
        assert self._loop is not None
        fut: asyncio.Future[list[Frame]] = self._loop.create_future()
        if self._fault is not None:
            fut.set_exception(self._lost(model))
            return fut
        now = time.monotonic()
        job = _Job(frames, fut, [model.admit(now) for _ in frames])
        model.frames_in += len(frames)
        if model.session is None:  # shapes mode
            self._release(model, job, [[np.zeros(p.shape, p.dtype) for p in model.info.outputs]
                                       for _ in frames])
        elif model.frame_cost < INLINE_COST_S and not model.workers:
            # A graph this cheap costs less than a thread hop: run it here, on the loop.
            self._release(model, job, self._compute(model, frames))
        else:
            model.jobs.append(job)
            if model.workers < self.concurrency:
                model.workers += 1
                assert self._tasks is not None
                self._tasks.spawn(self._work(model), f"compute-{model_idx}")
        return fut

    async def _work(self, model: _Model) -> None:
        """Compute queued batches on a worker thread: what is queued goes in one hop."""
        try:
            while model.jobs:
                jobs: list[_Job] = []
                frames: list[Frame] = []
                while model.jobs and len(frames) < RUN_BATCH:
                    job = model.jobs.popleft()
                    jobs.append(job)
                    frames.extend(job.frames)
                outputs = await run_sync(self._compute, model, frames)
                start = 0
                for job in jobs:
                    n = len(job.frames)
                    self._release(model, job, outputs if isinstance(outputs, DeviceError)
                                  else outputs[start:start + n])
                    start += n
        finally:
            model.workers -= 1

    @staticmethod
    def _compute(model: _Model, frames: list[Frame]) -> list[Frame] | DeviceError:
        start = time.thread_time()  # CPU time: waiting for the GIL is not the graph's cost
        outputs: list[Frame] = []
        run, names = model.session.run, model.names
        try:
            for frame in frames:
                outputs.append(list(run(None, dict(zip(names, frame, strict=True)))))
        except Exception as exc:
            return DeviceError(f"model {model.info.index} ({model.info.name!r}) failed to "
                               f"execute: {exc}")
        per_frame = (time.thread_time() - start) / max(1, len(frames))
        model.frame_cost += 0.2 * (per_frame - model.frame_cost)
        return outputs

    def _release(self, model: _Model, job: _Job, outputs: list[Frame] | DeviceError) -> None:
        """Resolve the job's future when its last frame is due (now, unpaced)."""
        if job.future.done():  # cancelled by a close
            return
        if isinstance(outputs, DeviceError):
            job.future.set_exception(outputs)
            return
        if model.pacer is None:
            self._resolve(model, job, outputs)
            return
        assert self._loop is not None
        release = job.times[-1][1]
        now = time.monotonic()
        if release - now > 0:
            when = self._loop.time() + (release - now) - model.oversleep
            handle = self._loop.call_at(when, self._due, model, job, outputs, release)
            self._timers.add(handle)
            job.future.add_done_callback(lambda _f: self._forget(handle))
            return
        if now - release > LATE_TOLERANCE_S:
            self._late(model, now - release, len(job.frames))
        self._resolve(model, job, outputs)

    def _forget(self, handle: asyncio.TimerHandle) -> None:
        handle.cancel()
        self._timers.discard(handle)

    def _due(self, model: _Model, job: _Job, outputs: list[Frame], release: float) -> None:
        late = time.monotonic() - release  # the loop wakes timers a little late: aim earlier
        model.oversleep = min(0.002, max(0.0, model.oversleep + 0.1 * late))
        self._resolve(model, job, outputs)

    def _resolve(self, model: _Model, job: _Job, outputs: list[Frame]) -> None:
        if job.future.done():
            return
        now = time.monotonic()
        model.first_out = model.first_out or now
        model.last_out = now
        model.frames_out += len(outputs)
        for entry, _ in job.times:
            model.latencies.append(now - entry)
        job.future.set_result(outputs)

    def _lost(self, model: _Model) -> DeviceError:
        lost = model.frames_in - model.frames_out
        cause = f": {self._fault!r}" if self._fault else ""
        return DeviceError(f"simulated device failed on model {model.info.index} "
                           f"({model.info.name!r}); {lost} frame(s) lost{cause}", lost_frames=lost)

    def _late(self, model: _Model, behind: float, n: int) -> None:
        model.late_frames += n
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
                "in_chip": m.in_chip,
                "queued": sum(len(j.frames) for j in m.jobs),
            })
        return {"device": self.name, "mode": self.mode, "models": models}

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        for handle in list(self._timers):
            handle.cancel()
        self._timers.clear()
        for m in self._models:
            for job in m.jobs:
                job.future.cancel()
            m.jobs.clear()
        if self._tasks is not None:
            await self._tasks.aclose()
