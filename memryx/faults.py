"""Fault injection: a device that misbehaves on purpose, for testing applications.

:class:`FaultyDevice` wraps any :class:`~memryx.device.Device` (the simulated MX3
in ``fast`` mode by default) and follows a :class:`Faults` script. Pass it as
``device=`` to any accelerator; every fault surfaces through the public API as
the real one would::

    device = FaultyDevice(script=Faults(Stall(after_frame=10, ms=200),
                                        DeviceFault(after_frames=50)))
    async with mx.AsyncAccl(dfp, device=device) as accl:
        ...   # frames 11.. arrive 200 ms late; frame 51 makes the chip vanish

The faults (frames are counted over the whole device, from 1, in submission order):

* :class:`Stall` ``(after_frame=K, ms=N)``: when frame ``K + 1`` reaches the device,
  outputs stop for ``N`` ms (every output due in that window waits for its end).
* :class:`DeviceFault` ``(after_frames=K)``: frame ``K + 1`` finds the chip gone:
  every frame in flight fails with :class:`~memryx.DeviceError` (its
  ``lost_frames`` counts them), and so does every later submit. At most ``K``
  outputs are delivered (exactly ``K`` when frames are sent one at a time and
  awaited).
* :class:`Throttle` ``(above_c=100.0, start_c=None)``: the device models its die
  temperature (:class:`memryx._compat.TelemetryModel`, from the rate outputs leave
  it); while it is above ``above_c`` °C, outputs leave at half the rate, as the MX3
  module does at 100 °C: spaced at least twice the modeled interval (``1/fps``) and
  twice the inner device's own pace (so it shows in ``fast`` mode too, where the
  host, not the model, sets the pace). ``start_c`` sets the
  temperature the module starts at (a hot enclosure). ``statistics()`` shows
  ``temperature_c``, ``throttling`` and ``throttled_frames``.
* :class:`Jitter` ``(ms=N, seed=0)``: each output is delayed by a uniform random
  0..``N`` ms, reproducibly from ``seed`` (outputs stay in order).
* :class:`Hang` ``(after_frame=K)``: a device (or server) that stops answering:
  outputs of frames after ``K`` never come. The app's own timeouts are what gets
  tested; closing the accelerator ends it. For a real device server
  (``memryx serve``) the same is done by sending the server ``SIGSTOP`` (and
  ``SIGCONT`` to resume): the fd client's deadline then fires as in production.

``statistics()["device"]["faults"]`` counts what was injected. A fault that never
fired because the run ended first (scheduled past the end) is reported when the
device closes, as a :class:`FaultNotReachedWarning` naming it — a warning, not an
error, because the app did nothing wrong; the pytest plugin turns it into a test
failure (``pytest -W error`` does too). Bad scripts (an unknown fault kind,
negative or non-numeric numbers) raise :class:`FaultScriptError` when built.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import random
import warnings
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from numpy.typing import NDArray

from ._compat import TelemetryModel
from ._exceptions import ClosedError, DeviceError, UsageError
from .clock import Clock, Timer, clock_of
from .device.base import Device, Limits

if TYPE_CHECKING:
    from .dfp import Dfp

__all__ = ["FAULT_KINDS", "DeviceFault", "Fault", "FaultNotReachedWarning", "FaultScriptError",
           "Faults", "FaultyDevice", "Hang", "Jitter", "Stall", "Throttle", "fault"]

Frame = list[NDArray[Any]]


class FaultScriptError(UsageError, ValueError):
    """A fault script is malformed: unknown fault kind, negative or non-numeric values."""


class FaultNotReachedWarning(UserWarning):
    """A scripted fault never fired: the run ended before the frame it waited for."""


def _count(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise FaultScriptError(f"{name} must be an int >= 0 (a frame count), got {value!r}")
    return value


def _number(name: str, value: Any) -> float:
    number = math.nan
    if not isinstance(value, bool) and isinstance(value, (int, float)):
        with contextlib.suppress(OverflowError):  # an int beyond a float's range
            number = float(value)
    if not (math.isfinite(number) and number >= 0):
        raise FaultScriptError(f"{name} must be a finite number >= 0, got {value!r:.60}")
    return number


class Fault:
    """Base class of the scripted faults."""

    kind = "fault"

    def _check(self) -> None:  # pragma: no cover - overridden
        pass

    def __post_init__(self) -> None:
        self._check()


@dataclass(frozen=True)
class Stall(Fault):
    """Outputs stop for ``ms`` milliseconds when frame ``after_frame + 1`` arrives."""

    after_frame: int
    ms: float
    kind = "stall"

    def _check(self) -> None:
        _count("Stall.after_frame", self.after_frame)
        _number("Stall.ms", self.ms)


@dataclass(frozen=True)
class DeviceFault(Fault):
    """The chip vanishes when frame ``after_frames + 1`` arrives (module docstring)."""

    after_frames: int
    message: str = "injected device fault: the chip stopped responding"
    kind = "device_fault"

    def _check(self) -> None:
        _count("DeviceFault.after_frames", self.after_frames)
        if not isinstance(self.message, str):
            raise FaultScriptError(f"DeviceFault.message must be a str, got {self.message!r}")


@dataclass(frozen=True)
class Throttle(Fault):
    """Half the modeled rate while the modeled die is above ``above_c`` °C."""

    above_c: float = TelemetryModel.THROTTLE_C
    start_c: float | None = None
    kind = "throttle"

    def _check(self) -> None:
        _number("Throttle.above_c", self.above_c)
        if self.start_c is not None:
            _number("Throttle.start_c", self.start_c)


@dataclass(frozen=True)
class Jitter(Fault):
    """Each output delayed by a uniform 0..``ms`` ms, reproducibly from ``seed``."""

    ms: float
    seed: int = 0
    kind = "jitter"

    def _check(self) -> None:
        _number("Jitter.ms", self.ms)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise FaultScriptError(f"Jitter.seed must be an int, got {self.seed!r}")


@dataclass(frozen=True)
class Hang(Fault):
    """Outputs of the frames after ``after_frame`` never come (a server that stops answering)."""

    after_frame: int = 0
    kind = "hang"

    def _check(self) -> None:
        _count("Hang.after_frame", self.after_frame)


#: The fault kinds by name, for :func:`fault`.
FAULT_KINDS: dict[str, type[Fault]] = {
    c.kind: c for c in (Stall, DeviceFault, Throttle, Jitter, Hang)}


def fault(kind: str, **params: Any) -> Fault:
    """A fault by name: ``fault("stall", after_frame=3, ms=50)`` (for parametrized tests)."""
    cls = FAULT_KINDS.get(kind)
    if cls is None:
        raise FaultScriptError(
            f"unknown fault kind {kind!r}: expected one of {sorted(FAULT_KINDS)}")
    try:
        return cls(**params)
    except TypeError as exc:
        raise FaultScriptError(f"fault {kind!r}: {exc}") from None


class Faults:
    """A fault script: any number of :class:`Fault` objects (at most one Throttle/Jitter)."""

    def __init__(self, *faults: Fault) -> None:
        for f in faults:
            if not isinstance(f, Fault):
                raise FaultScriptError(
                    f"unknown fault {f!r}: expected Stall, DeviceFault, Throttle, Jitter or "
                    f"Hang (or fault(kind, ...) with kind one of {sorted(FAULT_KINDS)})")
        for cls in (Throttle, Jitter):
            if sum(isinstance(f, cls) for f in faults) > 1:
                raise FaultScriptError(f"at most one {cls.__name__} per script")
        self.faults: tuple[Fault, ...] = faults

    def __repr__(self) -> str:
        return f"Faults({', '.join(map(repr, self.faults))})"


def _fail(fut: asyncio.Future[Any], exc: BaseException) -> None:
    """Fail ``fut``, quietly: after a fault the core stops awaiting the later futures (it has
    its error), as it does for a real device's, so an unread one is not a loop error."""
    if not fut.done():
        fut.set_exception(exc)
        fut.exception()


@dataclass
class _Job:
    first: int  # device-wide number of the job's first frame (from 1)
    frames: int
    out: asyncio.Future[list[Frame]]
    outputs: list[Frame] | None = None
    ready: bool = False
    release: float = 0.0
    hung: bool = False
    submitted: float = 0.0


@dataclass
class _ModelState:
    fps: float
    jobs: deque[_Job] = field(default_factory=deque)
    frames_out: int = 0
    last_release: float = 0.0
    last_done: float = 0.0
    """When the inner device last completed a job of this model (its clock's time)."""
    timer: Timer | None = None


class FaultyDevice:
    """A :class:`~memryx.device.Device` that injects the faults of ``script`` into ``inner``
    (default: the simulated MX3 in ``fast`` mode). See the module docstring."""

    def __init__(self, inner: Device | None = None, script: Faults | None = None) -> None:
        if inner is None:
            from .device.simulated import SimulatedDevice

            inner = SimulatedDevice(mode="fast")
        if not isinstance(inner, Device):
            raise TypeError(f"inner must be a Device, got {type(inner).__name__}")
        if script is None:
            script = Faults()
        if not isinstance(script, Faults):
            raise FaultScriptError(f"script must be a Faults(...), got {type(script).__name__}")
        self.inner = inner
        self.script = script
        self.name = f"faulty:{inner.name}"
        #: Stream tags pass through to an inner device that takes them.
        self.takes_streams = bool(getattr(inner, "takes_streams", False))
        #: So do the times frames were ready (``Lane.put_many``).
        self.takes_ready = bool(getattr(inner, "takes_ready", False))
        self._loop: asyncio.AbstractEventLoop | None = None
        self._models: list[_ModelState] = []
        self._submitted = 0
        self._fired: set[int] = set()
        self._stall_until = 0.0
        self._hang_after: int | None = None
        self._dead: DeviceError | None = None
        self._closed = False
        self._counts = {"stalls": 0, "stalled_frames": 0, "device_faults": 0, "lost_frames": 0,
                        "jittered_frames": 0, "hung_frames": 0, "throttled_frames": 0}
        jitter = [f for f in script.faults if isinstance(f, Jitter)]
        self._jitter = jitter[0] if jitter else None
        self._rng = random.Random(self._jitter.seed if self._jitter else 0)
        throttle = [f for f in script.faults if isinstance(f, Throttle)]
        self._throttle = throttle[0] if throttle else None
        self._telemetry: TelemetryModel | None = None
        self._telemetry_at = 0.0
        if self._throttle is not None:  # readable before open (one chip until the DFP says)
            self._telemetry = self._hot_module(1)

    # -- the Device protocol ------------------------------------------------------------------
    async def open(self, dfp: Dfp, group_id: int) -> None:
        await self.inner.open(dfp, group_id)
        self._loop = asyncio.get_running_loop()
        for info in dfp.models:
            fps = float((info.perf or {}).get("fps") or 0.0)
            self._models.append(_ModelState(fps=fps))
        if self._throttle is not None:
            self._telemetry = self._hot_module(dfp.num_chips)

    def _hot_module(self, chips: int) -> TelemetryModel:
        """The modeled module of a Throttle scenario, at its start temperature (at open: at
        the temperature read before, if it was)."""
        assert self._throttle is not None
        model = TelemetryModel(chips, self.clock)
        if self._telemetry is not None:
            model.temperature_c = self._telemetry.temperature_c
        elif self._throttle.start_c is not None:
            model.temperature_c = self._throttle.start_c
        return model

    def limits(self, model_idx: int) -> Limits:
        return self.inner.limits(model_idx)

    @property
    def clock(self) -> Clock:
        """The inner device's clock: stalls, jitter and throttling keep its time (virtual
        when the inner device runs on a :class:`~memryx.clock.VirtualClock`)."""
        return clock_of(self.inner)

    def telemetry(self) -> TelemetryModel | None:
        """The modeled temperature, pressure and power of a :class:`Throttle` scenario
        (None without one); ``get_temperature()`` and friends read it."""
        if self._telemetry is None:
            return None
        self._update_telemetry(force=True)
        return self._telemetry

    def submit(self, model_idx: int, frames: list[Frame],
               streams: list[int] | None = None,
               ready: float | None = None) -> asyncio.Future[list[Frame]]:
        if self._closed:
            raise ClosedError("the device is closed")
        assert self._loop is not None, "submit() before open()"
        if not 0 <= model_idx < len(self._models):
            return self._inner_submit(model_idx, frames, streams, ready)  # it names the problem
        out: asyncio.Future[list[Frame]] = self._loop.create_future()
        if self._dead is not None:
            _fail(out, DeviceError(str(self._dead), lost_frames=len(frames)))
            self._counts["lost_frames"] += len(frames)
            return out
        first = self._submitted + 1
        self._submitted += len(frames)
        last = self._submitted
        now = self.clock.now()
        for i, f in enumerate(self.script.faults):
            if i in self._fired:
                continue
            if isinstance(f, DeviceFault) and last > f.after_frames:
                self._fired.add(i)
                self._kill(f, out, len(frames))
                return out
            if isinstance(f, Stall) and last > f.after_frame:
                self._fired.add(i)
                self._counts["stalls"] += 1
                self._stall_until = max(self._stall_until, now + f.ms / 1000.0)
            if isinstance(f, Hang) and last > f.after_frame:
                self._fired.add(i)
                self._hang_after = f.after_frame
            if isinstance(f, (Throttle, Jitter)):
                self._fired.add(i)
        model = self._models[model_idx]
        job = _Job(first=first, frames=len(frames), out=out, submitted=now)
        # may raise (closed): then no job
        inner = self._inner_submit(model_idx, frames, streams, ready)
        model.jobs.append(job)
        inner.add_done_callback(lambda fut: self._inner_done(model, job, fut))
        return out

    def _inner_submit(self, model_idx: int, frames: list[Frame], streams: list[int] | None,
                      ready: float | None) -> asyncio.Future[list[Frame]]:
        options: dict[str, Any] = {}
        if streams is not None and self.takes_streams:
            options["streams"] = streams
        if ready is not None and self.takes_ready:
            options["ready"] = ready
        return self.inner.submit(model_idx, frames, **options)

    def statistics(self) -> dict[str, Any]:
        stats = dict(self.inner.statistics())
        stats["device"] = self.name
        faults: dict[str, Any] = {
            "script": [repr(f) for f in self.script.faults],
            "fired": [repr(self.script.faults[i]) for i in sorted(self._fired)],
            **self._counts,
        }
        if self._telemetry is not None and self._throttle is not None:
            self._update_telemetry(force=True)
            faults["temperature_c"] = round(self._telemetry.temperature_c, 2)
            faults["pressure"] = round(self._telemetry.pressure, 4)
            faults["throttling"] = self._telemetry.temperature_c > self._throttle.above_c
        stats["faults"] = faults
        return stats

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        for model in self._models:
            if model.timer is not None:
                model.timer.cancel()
            for job in model.jobs:
                job.out.cancel()
            model.jobs.clear()
        await self.inner.aclose()
        unfired = [repr(f) for i, f in enumerate(self.script.faults)
                   if i not in self._fired and not isinstance(f, (Throttle, Jitter))]
        if unfired:
            warnings.warn(FaultNotReachedWarning(
                f"fault(s) {', '.join(unfired)} never fired: the device saw only "
                f"{self._submitted} frame(s) before it closed"), stacklevel=2)

    # -- faults -------------------------------------------------------------------------------
    def unfired(self) -> list[Fault]:
        """The scripted faults that have not fired (yet)."""
        return [f for i, f in enumerate(self.script.faults)
                if i not in self._fired and not isinstance(f, (Throttle, Jitter))]

    def _kill(self, f: DeviceFault, out: asyncio.Future[list[Frame]], n: int) -> None:
        lost = n + sum(j.frames for m in self._models for j in m.jobs)
        self._dead = DeviceError(f"{f.message} (after {f.after_frames} frame(s); "
                                 f"{lost} frame(s) in flight lost)", lost_frames=lost)
        self._counts["device_faults"] += 1
        self._counts["lost_frames"] += lost
        for model in self._models:
            if model.timer is not None:
                model.timer.cancel()
                model.timer = None
            for job in model.jobs:
                _fail(job.out, DeviceError(str(self._dead), lost_frames=lost))
            model.jobs.clear()
        _fail(out, DeviceError(str(self._dead), lost_frames=lost))

    def _inner_done(self, model: _ModelState, job: _Job,
                    fut: asyncio.Future[list[Frame]]) -> None:
        if fut.cancelled():
            if not job.out.done():
                job.out.cancel()
            return
        exc = fut.exception()  # retrieved either way
        if job.out.done():
            return
        if exc is not None:
            job.out.set_exception(exc)
            return
        assert self._loop is not None
        now = self.clock.now()
        release = max(now, self._stall_until)
        if release > now:
            self._counts["stalled_frames"] += job.frames
        if self._jitter is not None and self._jitter.ms > 0:
            release += self._rng.uniform(0.0, self._jitter.ms / 1000.0)
            self._counts["jittered_frames"] += job.frames
        # the device's own pace for this job: its time between outputs, at most its service time
        own = min(now - job.submitted, now - model.last_done if model.last_done else math.inf)
        model.last_done = now
        if self._throttled():
            # half the rate: outputs spaced twice the device's own pace, and at least twice
            # the modeled interval (the MX3 module at 100 °C)
            modeled = job.frames / model.fps if model.fps > 0 else 0.0
            release = max(release, model.last_release + 2.0 * max(modeled, own))
            self._counts["throttled_frames"] += job.frames
        if self._hang_after is not None and job.first + job.frames - 1 > self._hang_after:
            job.hung = True
            self._counts["hung_frames"] += job.frames
        job.outputs = fut.result()
        job.release = max(release, model.last_release)
        model.last_release = job.release
        job.ready = True
        self._pump(model)

    def _pump(self, model: _ModelState) -> None:
        """Resolve the head jobs whose release time has come, in submission order."""
        assert self._loop is not None
        model.timer = None
        now = self.clock.now()
        while model.jobs:
            job = model.jobs[0]
            if job.out.done():
                model.jobs.popleft()
                continue
            if not job.ready or job.hung:
                return
            if job.release > now:
                model.timer = self.clock.call_later(job.release - now, self._pump, model)
                return
            model.jobs.popleft()
            assert job.outputs is not None
            model.frames_out += job.frames
            job.out.set_result(job.outputs)

    def _update_telemetry(self, force: bool = False) -> None:
        assert self._telemetry is not None
        now = self.clock.now()
        if force or now - self._telemetry_at >= 0.05:
            self._telemetry_at = now
            self._telemetry.update([m.frames_out for m in self._models],
                                   [m.fps for m in self._models])

    def _throttled(self) -> bool:
        if self._telemetry is None or self._throttle is None:
            return False
        self._update_telemetry()
        return self._telemetry.temperature_c > self._throttle.above_c
