"""The in-process simulated MX3: a pacer plus compute.

``submit(model_idx, frames)`` computes the batch on the host (on the loop
thread when the graph is cheaper than a thread hop, else on a worker thread, up
to ``concurrency`` batches of a model at once) and resolves its future when
the outputs are due. The modes say what is computed and when it is released;
the *paced* ones release like the chip would: frame *i* enters the modeled
pipeline at its slot ``slot_i = slot_{i-1} + 1/fps``, or when it arrives if that
is later, and leaves at ``entry_i + latency`` (fps and latency from the DFP's
performance model, see :mod:`memryx.timing`). A frame *arrives* when the core had
it ready for the device (``submit``'s ``ready``: its pre-processing done, on
whichever thread), not when the core's hand-over reaches ``submit``: a chip's
latency is measured from the host, with the transfer inside it, so the runtime's
own thread switch and loop iteration are inside the modeled latency too, and an
app sees the modeled latency from its input callback's return to its output. A
frame up to ``queue_depth`` slots late (a host stall between the source and the
device) does not move the slots after it: the frames behind it catch up, so a
stall costs no throughput; a later one restarts the slots at its arrival (see
:class:`._release.Pacer`).

A batch is released with its last frame, so the core hands a paced model only
the frames whose releases fit in one release tick (``Limits.batch``, see
:func:`._release.paced_batch`): one frame per ``submit`` for models slower than
a frame a tick (each frame released at its own time), a few for faster ones (the
first of them at most a tick late, counted in ``release_error_ms``). One wake-up
per model releases every batch that is due; on the real clock a thread of the
device's own wakes it (:class:`._release.PreciseWaker`: the loop's timers wake
in whole milliseconds), so a release lands within tens of microseconds of its
time on a quiet host.

* ``"timed"`` (default): every frame computed, paced.
* ``"reuse"``: paced; each distinct frame computed once, identical frames get
  a copy of its outputs (a bounded LRU cache of ``cache_size`` frames).
* ``"sampled"``: paced; a frame is computed in the background when a compute
  slot is free (``concurrency`` slots, default 1); when due, every frame gets
  the outputs of the newest frame of the same *stream*, at or before it, whose
  computation has finished (its staleness, in frames of that stream, is counted
  in ``statistics()``, per stream and as a histogram). The stream comes from the
  core (``submit``'s ``streams``); frames without one form one stream.
* ``"shapes"``: paced; zeros of the right shapes and dtypes, nothing computed.
* ``"fast"``: every frame computed, unpaced: as fast as the host computes them.
* ``"shapes-unpaced"``: zeros, nothing computed, unpaced.

What runs the graphs (onnxruntime or OpenVINO) and the reuse and sampling
strategies live in :mod:`._compute`.

When an output is ready only after the chip would have delivered it, the
frame is *late*: it is released when ready and counted
(``late_frames``, ``max_late_ms``). When at least half of a model's last
``LATE_WINDOW`` outputs (and at least ``LATE_MIN``) were late, or in timed mode
when frames are late and the host's compute time per frame (per worker) exceeds
the modeled frame interval, the host is too slow for the modeled rate
(``host_slower``): the device says so once, through ``logging`` at INFO, naming
the mode that would keep chip timing.

The device keeps no queues: the core's frame budget bounds what is in flight,
from :meth:`SimulatedDevice.limits` (``queue_depth`` frames on the way in and
as many on the way out, plus the frames inside the modeled chip; ``queue_depth``
is 4 by default, and in the modes that compute little 16, or 4 ms of frames of a
model faster than 4,000 fps, at most 96).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import os
import time
from collections import deque
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from .._core.aio import TaskSet
from .._core.runner import run_sync
from .._exceptions import ClosedError, DeviceError, DfpError, ModelIndexError, UsageError
from ..clock import REAL_CLOCK, Clock
from ._compute import (
    DEFAULT_CACHE_SIZE,
    ReuseCache,
    Runner,
    Sampler,
    check_int,
    load_runner,
    modeled_perf,
    resolve_backend,
)
from ._release import Pacer, PreciseWaker, Releases, paced_batch
from ._state import LATE_WINDOW, Frame, Slots, model_statistics
from ._state import Job as _Job
from ._state import ModelState as _Model
from ._state import fail as _fail
from ._taking import Borrowed, Taker, reuse_taker, sampled_taker, shapes_taker
from .base import Limits

if TYPE_CHECKING:
    from ..dfp import Dfp, ModelInfo

__all__ = ["CHEAP_MODES", "MODES", "PACED_MODES", "SimulatedDevice"]

log = logging.getLogger("memryx.device.sim")

MODES = ("timed", "reuse", "sampled", "shapes", "fast", "shapes-unpaced")
#: The modes that release outputs at the modeled MX3 rate and latency.
PACED_MODES = ("timed", "reuse", "sampled", "shapes")
#: The paced modes that compute little: meant to keep chip timing on any host.
CHEAP_MODES = ("reuse", "sampled", "shapes")
#: Frames each model buffers on the way in and out, by default (see ``queue_depth``): in
#: ``timed`` mode, where a frame's latency behind a faster source is about a budget of
#: modeled frame times, ...
DEFAULT_QUEUE_DEPTH = 4
#: ... in the modes that compute little, and in the unpaced modes (16, the vendor
#: scheduler's default input queue): there a batch rides out more thread hand-offs and
#: host stalls, and a frame of a fast model costs less of a thread wake-up.
CHEAP_QUEUE_DEPTH = 16
#: The modes that run as fast as the host (no modeled timing).
UNPACED_MODES = ("fast", "shapes-unpaced")
#: In the unpaced modes a model's default queue holds at most this many bytes of input
#: frames (but at least ``DEFAULT_QUEUE_DEPTH`` frames): the depth pays for small frames,
#: whose thread hand-offs cost more than their work, and would only hold memory for big
#: ones (16 frames of 4K float32 are 1.6 GB).
UNPACED_QUEUE_BYTES = 4 << 20
#: ... and in those modes at least this long a host stall's worth of a fast model's frames
#: (16 frames of a model at 18,000 fps ride out less than a millisecond; a thread of a busy
#: host waits longer than that for a core), up to ``MAX_CHEAP_QUEUE_DEPTH`` frames.
CHEAP_QUEUE_S = 0.004
MAX_CHEAP_QUEUE_DEPTH = 96
#: What to suggest when a host is too slow for the modeled rate in a mode.
KEEPS_TIMING = {
    "timed": ("reuse", "mode='reuse' (each distinct frame computed once: for looped or "
              "repeating input) or mode='sampled' (the model runs on the frames the host can "
              "afford, the others get recent real outputs)"),
    "reuse": ("sampled", "mode='sampled' (the model runs on the frames the host can afford, "
              "the others get recent real outputs)"),
    "sampled": ("shapes", "mode='shapes' (zeros, nothing computed)"),
    "shapes": (None, "no mode: this host cannot pace outputs at this rate"),
}
#: How much later than its modeled release an output may be before it counts as late.
LATE_TOLERANCE_S = 0.002
#: The host is reported too slow when at least half of the last ``LATE_WINDOW`` outputs
#: (and of at least ``LATE_MIN`` outputs) were late: a stall of a busy machine is not reported.
LATE_MIN = LATE_WINDOW
#: In timed mode, late frames enough to report a host whose compute time per frame (per
#: worker) exceeds the modeled frame interval.
LATE_SURE = 10
#: Graphs the host computes faster than this per frame run on the loop thread itself.
INLINE_COST_S = 30e-6
#: The most frames of one model handed over in one ``submit`` in unpaced modes.
FAST_BATCH = 64
#: How long a close waits for the frame a worker thread is computing.
CLOSE_WAIT_S = 10.0
#: The most frames of one model computed in one thread hop.
RUN_BATCH = 16


class SimulatedDevice:
    """An MX3 simulated in this process.

    Parameters:
        mode: one of :data:`MODES` (module docstring); ``"timed"`` by default.
        groups: how many chip groups the simulated box has (``group_id`` must be below it).
        concurrency: batches of one model computed at once (default: the host's cores;
            in ``"sampled"`` mode: the frames computed at once, default 1).
        queue_depth: frames each model buffers on the way in, and outputs on the way
            out; with the frames inside the modeled chip they make the frame budget.
            Default: in the modes that compute little (:data:`CHEAP_MODES`), whose
            thread hops and host stalls a deeper budget rides out, 16, or for a model
            faster than 4,000 fps its frames of ``CHEAP_QUEUE_S`` (4 ms; at most 96);
            in the unpaced modes (``"fast"``, ``"shapes-unpaced"``: throughput, no
            modeled timing) 16, like the vendor scheduler's input queue, or as many
            frames as fit in ``UNPACED_QUEUE_BYTES`` (4 MiB; at least 4); in
            ``"timed"`` 4 (a frame's latency with a source faster than the chip is
            about a budget of frames). ``statistics()`` gives each model's.
        backend: what computes the graphs, ``"onnxruntime"`` or ``"openvino"`` (default:
            ``$MEMRYX_SIM_BACKEND``, else onnxruntime).
        cache_size: ``"reuse"`` mode: distinct frames whose outputs are kept (default 1024).
        clock: what the timing model keeps time by: :data:`memryx.clock.REAL_CLOCK` by
            default; a :class:`memryx.clock.VirtualClock` runs the device in virtual time
            (frames are then computed on the loop thread; not in ``"sampled"`` mode,
            whose outputs depend on how fast the host computes).
    """

    name = "sim"
    takes_streams = True
    takes_ready = True

    def __init__(self, *, mode: str = "timed", groups: int = 1, concurrency: int | None = None,
                 queue_depth: int | None = None, backend: str | None = None,
                 cache_size: int | None = None, clock: Clock | None = None) -> None:
        if mode not in MODES:
            raise ValueError(f"unknown simulated device mode {mode!r}: expected one of {MODES}")
        check_int("queue_depth", queue_depth)
        check_int("concurrency", concurrency)
        check_int("groups", groups, allow_none=False)
        check_int("cache_size", cache_size)
        if cache_size is not None and mode != "reuse":
            raise ValueError(f"cache_size is an option of mode 'reuse', not of mode {mode!r}")
        if clock is None:
            clock = REAL_CLOCK
        if not isinstance(clock, Clock):
            raise TypeError(f"clock must be a memryx.clock.Clock (REAL_CLOCK or a VirtualClock), "
                            f"got {type(clock).__name__}")
        if clock.virtual and mode == "sampled":
            raise UsageError("mode 'sampled' cannot run on a VirtualClock: which frames it "
                             "computes depends on how fast the host is; use mode 'timed', "
                             "'reuse' or 'shapes'")
        self.clock = clock
        self.groups = groups
        self.mode = mode
        self.paced = mode in PACED_MODES
        self.computes = not mode.startswith("shapes")
        self.backend = resolve_backend(backend) if self.computes else None
        self.cache_size = cache_size or DEFAULT_CACHE_SIZE
        if mode == "sampled":
            self.concurrency = concurrency or 1
        else:
            self.concurrency = concurrency or max(1, os.cpu_count() or 1)
        self.queue_depth = queue_depth or (
            CHEAP_QUEUE_DEPTH if mode in CHEAP_MODES or mode in UNPACED_MODES
            else DEFAULT_QUEUE_DEPTH)
        self._depth_given = queue_depth is not None
        self._models: list[_Model] = []
        self._tasks: TaskSet | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._waker: PreciseWaker | None = None
        self._closed = False
        self._fault: BaseException | None = None
        self._reported = False

    async def open(self, dfp: Dfp, group_id: int) -> None:
        if isinstance(group_id, bool) or not isinstance(group_id, int):
            raise TypeError(f"group_id must be an int, got {type(group_id).__name__}")
        if not 0 <= group_id < self.groups:
            raise ModelIndexError(
                f"group_id {group_id} out of range: the simulated device has {self.groups} "
                f"chip group(s) (valid: 0..{self.groups - 1})"
            )
        self.clock.bind(asyncio.get_running_loop())
        runners: list[Runner | None] = [None] * len(dfp.models)
        if self.backend is not None:
            backend = self.backend
            self.clock.hold()  # virtual time stands still while the models load
            try:
                runners = list(await run_sync(
                    lambda: [load_runner(m, backend) for m in dfp.models]))
            finally:
                self.clock.release()
        self._loop = asyncio.get_running_loop()
        self._tasks = TaskSet("sim", self._on_task_error)
        for info, run in zip(dfp.models, runners, strict=True):
            pacer = None
            modeled: dict[str, Any] = {}
            in_chip = self.concurrency
            depth = self._unpaced_depth(info) if self.mode in UNPACED_MODES else self.queue_depth
            if self.paced:
                modeled = modeled_perf(info, dfp.num_chips)
                fps, latency_s = float(modeled["fps"]), float(modeled["latency_ms"]) / 1000
                if not (math.isfinite(fps) and fps > 0 and math.isfinite(latency_s)
                        and latency_s >= 0):
                    raise DfpError(f"model {info.index} ({info.name!r}): modeled fps {fps!r} "
                                   f"and latency {latency_s * 1000!r} ms cannot be simulated")
                depth = self._depth_of(fps)
                # frames up to the device's input queue behind the schedule catch up
                pacer = Pacer(1.0 / fps, latency_s, slack=depth / fps)
                # frames the modeled pipeline holds at full rate, plus the one entering
                in_chip = max(1, min(1 << 20, math.ceil(latency_s * fps))) + 1
            model = _Model(
                info=info, run=run, pacer=pacer, in_chip=in_chip, modeled=modeled,
                queue_depth=depth,
                cache=ReuseCache(self.cache_size) if self.mode == "reuse" else None,
                sampler=Sampler(self.concurrency) if self.mode == "sampled" else None)
            if pacer is not None:
                # a model slower than a frame a tick releases each frame at its own time:
                # the waker's thread wakes it precisely; a faster one's frames leave in
                # batches anyway, on the loop's cheaper (millisecond) timers
                precise = (not self.clock.virtual
                           and paced_batch(pacer.interval, depth) == 1)
                if precise and self._waker is None:
                    self._waker = PreciseWaker(self._loop)
                model.releases = Releases(self.clock, functools.partial(self._due, model),
                                          self._waker if precise else None)
            self._models.append(model)
        log.debug("simulated device opened %d model(s) in %s mode (%s)", len(runners),
                  self.mode, self.backend or "nothing computed")

    def _depth_of(self, fps: float) -> int:
        """The queue depth of a paced model modeled at ``fps`` (``queue_depth``)."""
        if self._depth_given or self.mode not in CHEAP_MODES:
            return self.queue_depth
        return max(self.queue_depth, min(MAX_CHEAP_QUEUE_DEPTH, math.ceil(CHEAP_QUEUE_S * fps)))

    def _unpaced_depth(self, info: ModelInfo) -> int:
        """The queue depth of a model in an unpaced mode (``UNPACED_QUEUE_BYTES``)."""
        if self._depth_given:
            return self.queue_depth
        frame = sum(int(np.prod(p.shape)) * p.dtype.itemsize for p in info.inputs)
        fits = UNPACED_QUEUE_BYTES // max(1, frame)
        return max(DEFAULT_QUEUE_DEPTH, min(self.queue_depth, fits))

    def _on_task_error(self, exc: BaseException) -> None:
        if self._fault is None:
            self._fault = exc
            log.error("simulated device fault: %r", exc)
        for m in self._models:
            for job in [*m.jobs, *(p[0] for p in m.parked)]:
                if not job.future.done():
                    job.future.set_exception(self._lost(m))
            m.jobs.clear()
            m.parked.clear()

    def _model(self, model_idx: int) -> _Model:
        if self._closed:
            raise ClosedError("the device is closed")
        if not 0 <= model_idx < len(self._models):
            raise ModelIndexError(f"model_idx {model_idx} out of range")
        return self._models[model_idx]

    def limits(self, model_idx: int) -> Limits:
        m = self._models[model_idx]
        if m.pacer is None:
            batch = FAST_BATCH
        elif self.clock.virtual or self.mode not in CHEAP_MODES:
            # virtual time: wake-ups cost nothing, each frame leaves when due; timed: the
            # compute, not the runtime's per-frame cost, bounds it (one frame per submit)
            batch = 1
        else:
            batch = paced_batch(m.pacer.interval, m.queue_depth)
        return Limits(in_queue=m.queue_depth, in_chip=m.in_chip,
                      out_queue=m.queue_depth, batch=batch)

    def submit(self, model_idx: int, frames: list[Frame],
               streams: Sequence[int] | None = None,
               ready: float | None = None) -> asyncio.Future[list[Frame]]:
        """Frames in; ``ready``: when the last of them was ready for the device on the host
        (the core's hand-over to the device is inside the modeled latency, see the module
        docstring); default: now."""
        model = self._model(model_idx)
        if streams is not None and len(streams) != len(frames):
            raise ValueError(f"{len(streams)} stream tags for {len(frames)} frames")
        assert self._loop is not None
        fut: asyncio.Future[list[Frame]] = self._loop.create_future()
        if self._fault is not None:
            fut.set_exception(self._lost(model))
            return fut
        now = self.clock.now()
        if ready is not None and not math.isfinite(ready):
            raise ValueError(f"ready must be a finite time on the device's clock, got {ready!r}")
        arrived = now if ready is None or not ready < now else ready
        job = _Job(frames, fut, model.admit(arrived, len(frames)))
        model.frames_in += len(frames)
        if model.run is None:  # shapes modes
            ports = [(p.shape, p.dtype) for p in model.info.outputs]
            zeros = np.zeros
            self._release(model, job, [[zeros(shape, dtype) for shape, dtype in ports]
                                       for _ in frames])
            return fut
        if model.sampler is not None:
            # every frame is answered when due; those given a slot are computed meanwhile
            # (per stream: a frame gets the outputs of its own stream's frames)
            tags = streams if streams is not None else [0] * len(frames)
            plan = model.sampler.admit_many(tags, [type(f) is not Borrowed for f in frames])
            job.seqs = [(tag, seq) for tag, seq, _ in plan]
            # (a borrowed frame is never computed: its stream's computed outputs answer it)
            todo = [(f, (tag, seq)) for f, (tag, seq, c) in zip(frames, plan, strict=True) if c]
            self._release(model, job, [None] * len(frames))
            if not todo:
                return fut
            job = _Job([f for f, _ in todo], fut, [], seqs=[ts for _, ts in todo])
        if model.cache is not None:
            hits = model.cache.cached(frames)  # hits cost a hash and a copy: no thread hop
            if hits is not None:
                self._release(model, job, hits)
                return fut
        self._schedule(model, job)
        return fut

    def frame_taker(self, model_idx: int) -> Taker | None:
        """How this device takes model ``model_idx``'s frames on the thread that produced
        them, instead of the core's copy (see :mod:`._taking`); None: the core copies."""
        model = self._model(model_idx)
        if self.mode in ("shapes", "shapes-unpaced"):
            return shapes_taker
        if model.cache is not None:
            return reuse_taker(model.cache)
        if model.sampler is not None:
            return sampled_taker(model.sampler)
        return None  # every frame is computed: the core copies

    def _schedule(self, model: _Model, job: _Job) -> None:
        """Compute the frames of ``job``: here, or queued for a worker thread."""
        if (model.frame_cost < INLINE_COST_S and not model.workers) or self.clock.virtual:
            # A graph this cheap costs less than a thread hop: run it here, on the loop.
            self._computed(model, job, self._compute(model, job.frames))
        else:
            model.jobs.append(job)
            if model.workers < self.concurrency:
                model.workers += 1
                assert self._tasks is not None
                self._tasks.spawn(self._work(model), f"compute-{model.info.index}")

    async def _work(self, model: _Model) -> None:
        """Compute queued batches on a worker thread: what is queued goes in one hop."""
        try:
            while model.jobs:
                jobs: list[tuple[_Job, int]] = []
                frames: list[Frame] = []
                while model.jobs and len(frames) < RUN_BATCH:
                    job = model.jobs.popleft()
                    jobs.append((job, len(job.frames)))
                    frames.extend(job.frames)
                outputs = await run_sync(self._compute, model, frames)
                start = 0
                for job, n in jobs:
                    self._computed(model, job, outputs if isinstance(outputs, DeviceError)
                                   else outputs[start:start + n])
                    start += n
        finally:
            model.workers -= 1

    @staticmethod
    def _compute(model: _Model, frames: list[Frame]) -> list[Frame] | DeviceError:
        start = time.thread_time()  # CPU time: waiting for the GIL is not the graph's cost
        run, cache = model.run, model.cache
        assert run is not None
        outputs: list[Frame] = []
        with model.lock:
            model.computing += 1
        try:
            for frame in frames:
                if model.stopping:  # closing: a native graph run must not outlive the close
                    return DeviceError("the simulated device was closed")
                outputs.extend(cache.compute(run, [frame]) if cache is not None
                               else [run(frame)])
        except Exception as exc:
            return DeviceError(f"model {model.info.index} ({model.info.name!r}) failed to "
                               f"execute: {exc}")
        finally:
            with model.lock:
                model.computing -= 1
        per_frame = (time.thread_time() - start) / max(1, len(frames))
        if model.costed:
            model.frame_cost += 0.2 * (per_frame - model.frame_cost)
        else:
            model.frame_cost, model.costed = per_frame, True
        return outputs

    def _computed(self, model: _Model, job: _Job, outputs: Slots | DeviceError) -> None:
        """The frames of ``job`` are computed: hand them to the pacer (sampled mode: to the
        sampler, the frames' jobs are paced already)."""
        sampler = model.sampler
        if sampler is None:
            self._release(model, job, outputs)
            return
        done: Slots = [None] * len(job.seqs) if isinstance(outputs, DeviceError) else outputs
        for (tag, seq), out in zip(job.seqs, done, strict=True):
            sampler.computed_one(tag, seq, out)
        if isinstance(outputs, DeviceError):  # reaches the frame's receiver, or the next one's
            if not job.future.done():
                _fail(job.future, outputs)
            else:
                model.error = outputs
            # parked frames of streams with nothing left that could answer them fail too
            keep: deque[tuple[_Job, Slots, float]] = deque()
            for parked in model.parked:
                if all(sampler.running_for(t) or sampler.can_answer(t, q)
                       for t, q in parked[0].seqs):
                    keep.append(parked)
                    continue
                for t, q in parked[0].seqs:
                    sampler.forget(t, q)
                if not parked[0].future.done():
                    _fail(parked[0].future, outputs)
                    model.error = None  # it reached a receiver
            model.parked = keep
        self._unpark(model)

    def _release(self, model: _Model, job: _Job, outputs: Slots | DeviceError) -> None:
        """Resolve the job's future when its last frame is due (now, unpaced)."""
        if job.future.done():  # cancelled by a close
            return
        if isinstance(outputs, DeviceError):
            _fail(job.future, outputs)
            return
        if model.pacer is None:
            self._resolve(model, job, outputs, None)
            return
        release = job.times[-1][1]
        now = self.clock.now()
        if release - now > 0:  # wait in the model's heap for its time
            assert model.releases is not None
            model.releases.push(release, now, (job, outputs))
            return
        self._resolve(model, job, outputs, release)

    def _due(self, model: _Model, item: tuple[_Job, Slots]) -> None:
        """A job's release time has come (the model's wake-up)."""
        self._resolve(model, item[0], item[1], None)

    def _resolve(self, model: _Model, job: _Job, outputs: Slots,
                 release: float | None) -> None:
        """Deliver ``outputs``; ``release`` is the time they were due when they were ready
        only after it (None: on time)."""
        sampler = model.sampler
        if job.future.done():
            if sampler is not None:
                for t, q in job.seqs:
                    sampler.forget(t, q)
            return
        if sampler is not None:
            if model.error is not None:  # a computation failed after its frame was answered
                _fail(job.future, model.error)
                model.error = None
                for t, q in job.seqs:
                    sampler.forget(t, q)
                return
            answered = sampler.answer(job.seqs)
            if answered is None:
                model.parked.append((job, outputs, job.times[-1][1]))  # wait for a computation
                for (t, q), frame in zip(job.seqs, job.frames, strict=True):
                    if not sampler.can_answer(t, q) and not sampler.running_for(t):
                        # nothing of its stream could answer it (a computation failed): its own
                        sampler.start(t)
                        self._schedule(model, _Job([frame], job.future, [], seqs=[(t, q)]))
                return
            outputs = answered
        now = self.clock.now()
        behind = now - release if release is not None else 0.0
        late = behind > LATE_TOLERANCE_S
        if late:
            model.late_frames += len(job.frames)
            model.max_late = max(model.max_late, behind)
        model.recent_late.extend([late] * len(job.frames))
        if late and not model.host_slower and self._behind(model):
            self._slower(model)
        model.first_out = model.first_out or now
        model.last_out = now
        model.frames_out += len(outputs)
        times = job.times
        model.latencies.extend([now - entry for entry, _ in times])
        if model.pacer is not None:
            model.release_errors.extend([now - due for _, due in times])
        job.future.set_result(outputs)  # type: ignore[arg-type]

    def _behind(self, model: _Model) -> bool:
        """Whether the host is too slow for the modeled rate (a late frame just came)."""
        recent = model.recent_late
        if len(recent) >= LATE_MIN and sum(recent) * 2 >= len(recent):
            return True
        # timed: the host's compute time per frame, per worker, exceeds the chip's interval
        return (self.mode == "timed" and model.pacer is not None and model.costed
                and model.late_frames >= LATE_SURE
                and model.frame_cost > model.pacer.interval * self.concurrency)

    def _unpark(self, model: _Model) -> None:
        """Sampled mode: a frame was computed; answer the jobs that waited for one."""
        now = self.clock.now()
        sampler = model.sampler
        assert sampler is not None
        pending, model.parked = model.parked, deque()
        for parked in pending:  # answer every job that can be now; the others wait again
            job, outputs, release = parked
            if job.future.done():  # failed or cancelled meanwhile
                for t, q in job.seqs:
                    sampler.forget(t, q)
            elif all(sampler.can_answer(t, q) for t, q in job.seqs):
                self._resolve(model, job, outputs, release if now > release else None)
            else:
                model.parked.append(parked)

    def _lost(self, model: _Model) -> DeviceError:
        lost = model.frames_in - model.frames_out
        cause = f": {self._fault!r}" if self._fault else ""
        return DeviceError(f"simulated device failed on model {model.info.index} "
                           f"({model.info.name!r}); {lost} frame(s) lost{cause}", lost_frames=lost)

    def _slower(self, model: _Model) -> None:
        model.host_slower = True
        if self._reported:
            return
        self._reported = True
        _, advice = KEEPS_TIMING[self.mode]
        log.info(
            "model %d (%r): this host is slower than the modeled MX3 rate of %.0f fps in %r "
            "mode (outputs up to %.1f ms late); outputs follow the host. To keep chip "
            "timing: %s. statistics() counts late_frames and max_late_ms.",
            model.info.index, model.info.name, model.modeled.get("fps", 0.0), self.mode,
            model.max_late * 1000, advice)

    def statistics(self) -> dict[str, Any]:
        models = [model_statistics(m) for m in self._models]
        slower = any(m.host_slower for m in self._models)
        return {"device": self.name, "mode": self.mode, "paced": self.paced,
                "backend": self.backend, "host_slower": slower,
                "suggested_mode": KEEPS_TIMING[self.mode][0] if slower else None,
                "models": models}

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        for m in self._models:
            if m.releases is not None:
                for job, _ in m.releases.close():
                    job.future.cancel()
            for job in [*m.jobs, *(p[0] for p in m.parked)]:
                job.future.cancel()
            m.jobs.clear()
            m.parked.clear()
        for m in self._models:
            m.stopping = True
        if self._waker is not None:
            self._waker.close()
        if self._tasks is not None:
            await self._tasks.aclose()
        # A graph still running on a worker thread would be torn down under its feet by an
        # exiting interpreter (onnxruntime aborts the process): wait for the frame it has.
        # (polled: the thread cannot touch the loop, and this wait is rare and short)
        for _ in range(int(CLOSE_WAIT_S / 0.005)):
            if not any(m.computing for m in self._models):
                break
            await asyncio.sleep(0.005)

