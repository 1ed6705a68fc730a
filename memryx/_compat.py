"""The vendor SDK's accelerator surface that the engine does not need to know about.

:class:`CompatMixin` gives the three accelerator classes the SDK's properties
(``input_port_ids``, ``mpu_count``, ``device_ids``, ...), ``shutdown()``, the
modeled device telemetry of SDK 2.1 (``get_temperature`` / ``get_pressure`` /
``get_avg_power``), the chip-layout conversion of ``use_model_shape`` and the
``ClientOptions`` (``fps_target`` pacing of input callbacks, ``smoothing`` of
output delivery). All of it lives in the facade, around the user's callbacks
and frames: the engine below sees ordinary frames and callbacks.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Generic, NoReturn, TypeVar, overload

import numpy as np
from numpy.typing import NDArray

from ._core.callbacks import CallbackKind, classify
from ._exceptions import ModelIndexError, ShapeError
from ._options import ClientOptions, Resolved, SchedulerOptions
from ._pacing import Pacer, Smoother, delivering, paced
from .clock import REAL_CLOCK, Clock, clock_of
from .dfp import CHIP_GEN

if TYPE_CHECKING:
    from .dfp import Dfp, ModelInfo, PortInfo

__all__ = ["CHIP_GEN", "CompatMixin", "TelemetryModel", "to_chip", "to_model"]

Array = NDArray[Any]



# -- chip layout ------------------------------------------------------------------------------

def to_model(arr: Array, port: PortInfo) -> Array:
    """A frame in the chip layout ``[row, col, z, ch]`` as the model's own shape."""
    dims = port.shape[1:] if len(port.shape) > 1 and port.shape[0] == 1 else port.shape
    if len(dims) == 3:  # NCHW <- [H, W, 1, C]
        return np.ascontiguousarray(np.moveaxis(arr[:, :, 0, :], 2, 0)).reshape(port.shape)
    return np.ascontiguousarray(arr).reshape(port.shape)


def to_chip(arr: Array, port: PortInfo) -> Array:
    """An output in the model's own shape as the chip layout ``[row, col, z, ch]``."""
    chip = port.chip_shape
    dims = port.shape[1:] if len(port.shape) > 1 and port.shape[0] == 1 else port.shape
    if len(dims) == 3 and arr.size == int(np.prod(dims)):
        chw = arr.reshape(dims)
        return np.ascontiguousarray(np.moveaxis(chw, 0, 2))[:, :, None, :]
    return np.ascontiguousarray(arr).reshape(chip)


def _is_chip_frame(arr: Any, port: PortInfo) -> bool:
    """A frame that is in the chip layout and cannot be read as the model's shape."""
    if not isinstance(arr, np.ndarray):
        return False
    chip = port.chip_shape
    model = port.shape
    unbatched = model[1:] if len(model) > 1 and model[0] == 1 else model
    return arr.shape == chip and arr.shape not in (model, unbatched)


def _same(frame: Any) -> Any:
    return frame


def _converter(model: ModelInfo, chip_only: bool) -> Callable[[Any], Any]:
    """``_convert_in`` for the frames of one input callback (None passes through); an
    array of a one-input model that is not in the chip layout is returned at once."""
    chip = model.inputs[0].chip_shape if len(model.inputs) == 1 and not chip_only else None

    def conv(frame: Any) -> Any:
        if frame is None or (chip is not None and type(frame) is np.ndarray
                             and frame.shape != chip):
            return frame
        return _convert_in(frame, model, chip_only)
    return conv


def _convert_in(frame: Any, model: ModelInfo, chip_only: bool) -> Any:
    """Frames in the chip layout to the model's shapes (one array or one per port)."""
    ports = model.inputs
    if isinstance(frame, np.ndarray):
        if len(ports) != 1:
            return frame
        port = ports[0]
        if chip_only:
            if frame.shape != port.chip_shape:
                raise ShapeError(
                    f"model {model.index}, input layer {port.layer!r}: use_model_shape is off "
                    f"for inputs, so frames are in the chip layout {port.chip_shape} "
                    f"[row, col, z, ch]; got {frame.shape}")
            return to_model(frame, port)
        return to_model(frame, port) if _is_chip_frame(frame, port) else frame
    if isinstance(frame, (list, tuple)) and len(frame) == len(ports) and \
            all(isinstance(a, np.ndarray) for a in frame):
        out = []
        for arr, port in zip(frame, ports, strict=True):
            if chip_only and arr.shape != port.chip_shape:
                raise ShapeError(
                    f"model {model.index}, input layer {port.layer!r}: use_model_shape is off "
                    f"for inputs, so frames are in the chip layout {port.chip_shape}; got "
                    f"{arr.shape}")
            out.append(to_model(arr, port) if chip_only or _is_chip_frame(arr, port) else arr)
        return type(frame)(out) if isinstance(frame, tuple) else out
    return frame


# -- modeled telemetry -----------------------------------------------------------------------

class TelemetryModel:
    """Modeled power, temperature and thermal pressure of one simulated MX3 module.

    Not measurements: the simulated device has no sensors. Utilisation ``u`` is
    the rate outputs left the device over the last reading interval divided by
    the modeled MX3 rate (from the DFP's timing model), summed over models and
    capped at 1. Power is ``chips * (IDLE_W + u * ACTIVE_W)``; the die
    temperature follows ``AMBIENT_C + THERMAL_C_PER_W * power`` with a
    first-order lag of ``TAU_S`` seconds; pressure is how close that is to the
    throttling point, from 0 (ambient) to 1 (``THROTTLE_C``).
    """

    IDLE_W = 0.35
    ACTIVE_W = 1.15
    AMBIENT_C = 35.0
    THERMAL_C_PER_W = 5.0
    TAU_S = 8.0
    THROTTLE_C = 100.0

    def __init__(self, chips: int, clock: Clock = REAL_CLOCK) -> None:
        self.chips = chips
        self.clock = clock
        self._t = clock.now()
        self._frames: list[int] | None = None
        self.utilisation = 0.0
        self.power_w = chips * self.IDLE_W
        self.temperature_c = self.AMBIENT_C + self.THERMAL_C_PER_W * self.power_w
        self._energy = 0.0
        self._since = self._t
        self._lock = threading.Lock()

    def update(self, frames_out: list[int], modeled_fps: list[float]) -> None:
        with self._lock:
            now = self.clock.now()
            dt = now - self._t
            if dt > 0:  # the frames since the last reading (since the start, at first)
                before = self._frames if self._frames is not None else [0] * len(frames_out)
                u = sum((n - p) / dt / f for n, p, f in
                        zip(frames_out, before, modeled_fps, strict=True) if f > 0)
                self.utilisation = min(1.0, max(0.0, u))
                self.power_w = self.chips * (self.IDLE_W + self.utilisation * self.ACTIVE_W)
                self._energy += self.power_w * dt  # the interval ran at that power
                steady = self.AMBIENT_C + self.THERMAL_C_PER_W * self.power_w
                self.temperature_c = steady + (self.temperature_c - steady) * \
                    float(np.exp(-dt / self.TAU_S))
            self._frames = list(frames_out)
            self._t = now

    @property
    def avg_power_w(self) -> float:
        span = self._t - self._since
        return self._energy / span if span > 0 else self.power_w

    @property
    def pressure(self) -> float:
        return min(1.0, max(0.0, (self.temperature_c - self.AMBIENT_C) /
                            (self.THROTTLE_C - self.AMBIENT_C)))


# -- the mixin ---------------------------------------------------------------------------------
T = TypeVar("T")


class _Option(Generic[T]):
    """A read-only property: the option of the same name the accelerator was built with
    (its :class:`~memryx._options.Resolved`, ``self._compat``), as the SDK names it."""

    def __init__(self, doc: str) -> None:
        self.__doc__ = doc
        self.name = ""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    @overload
    def __get__(self, obj: None, owner: type | None = None) -> _Option[T]: ...
    @overload
    def __get__(self, obj: object, owner: type | None = None) -> T: ...
    def __get__(self, obj: object | None, owner: type | None = None) -> Any:
        return self if obj is None else getattr(obj._compat, self.name)  # type: ignore[attr-defined]

    def __set__(self, obj: object, value: NoReturn) -> NoReturn:  # read-only for mypy too
        raise AttributeError(f"property {self.name!r} of {type(obj).__name__!r} object has "
                             "no setter")


class CompatMixin:
    """The SDK's surface on top of an accelerator facade (see the module docstring)."""

    _dfp: Dfp
    _compat: Resolved
    _compat_stop: threading.Event
    _telemetry: dict[int, TelemetryModel]
    _post_set: set[int]
    _pre_set: set[int]

    def _compat_init(self, resolved: Resolved) -> None:
        self._compat = resolved
        self._compat_stop = threading.Event()
        self._telemetry = {i: TelemetryModel(self._dfp.num_chips) for i in resolved.device_ids}
        self._post_set = set()
        self._pre_set = set()

    # -- properties ---------------------------------------------------------------------------
    @property
    def input_port_ids(self) -> list[int]:
        """The input port ids of every model, in port order."""
        return [p.port for p in self._dfp.input_ports]

    @property
    def output_port_ids(self) -> list[int]:
        """The output port ids of every model, in port order."""
        return [p.port for p in self._dfp.output_ports]

    @property
    def mpu_count(self) -> int:
        """How many MX3 chips (MPUs) the DFP was compiled for."""
        return self._dfp.num_chips

    @property
    def chip_gen(self) -> float:
        """The chip generation, as the SDK numbers it (3.1: MX3)."""
        return CHIP_GEN

    @property
    def device_ids(self) -> list[int]:
        """The device ids this accelerator runs on (SDK 2.x)."""
        return list(self._compat.device_ids)

    @property
    def models(self) -> list[str]:
        """The names of the DFP's models, in ``model_idx`` order."""
        return [m.name for m in self._dfp.models]

    group_id = _Option[int]("The chip group this accelerator runs on (SDK 1.x).")
    scheduler_options = _Option[SchedulerOptions]("The scheduler options it was built with.")
    client_options = _Option[ClientOptions]("The client options it was built with.")
    use_model_shape = _Option[tuple[bool, bool]](
        "(inputs, outputs) in model shapes rather than the chip's layout (SDK 2.x).")

    def shutdown(self) -> None:
        """Release the device (the SDK's name for :meth:`close`)."""
        self.close()  # type: ignore[attr-defined]

    # -- modeled telemetry --------------------------------------------------------------------
    def _check_device_id(self, device_id: int) -> None:
        if isinstance(device_id, bool) or not isinstance(device_id, int):
            raise TypeError(f"device_id must be an int, got {type(device_id).__name__}")
        if device_id not in self._compat.device_ids:
            raise ModelIndexError(f"device_id {device_id} is not one of this accelerator's "
                                  f"devices {self._compat.device_ids}")

    def _clock(self) -> Clock:
        """The clock the accelerator's device keeps time by (virtual in tests)."""
        engine = getattr(self, "_engine", None)
        return clock_of(getattr(engine, "device", None))

    def _read_telemetry(self, device_id: int) -> TelemetryModel:
        self._check_device_id(device_id)
        engine = getattr(self, "_engine", None)
        device = getattr(engine, "device", None)
        parts, ids = getattr(device, "devices", None), getattr(device, "ids", None)
        if isinstance(parts, list) and isinstance(ids, list) and device_id in ids:
            device = parts[ids.index(device_id)]  # several devices: this id's own
        modeled = getattr(device, "telemetry", None)
        own = modeled() if callable(modeled) else None
        if isinstance(own, TelemetryModel):  # the device models it (a Throttle fault scenario)
            return own
        clock = self._clock()
        if self._telemetry[device_id].clock is not clock:  # virtual time: so does this
            self._telemetry[device_id] = TelemetryModel(self._dfp.num_chips, clock)
        stats = self.statistics()  # type: ignore[attr-defined]
        frames = [int(m.get("frames_out", 0)) for m in stats["models"]]
        per_device = (stats.get("device") or {}).get("devices")
        if per_device is not None:  # several devices: this one's share of the frames
            mine = per_device.get(device_id, {})
            frames = [int(n) - int(q) for n, q in zip(
                mine.get("frames_submitted", []), mine.get("frames_in_flight", []),
                strict=True)]
        fps = []
        for m in self._dfp.models:
            fps.append(float((m.perf or {}).get("fps") or 0.0))
        telemetry = self._telemetry[device_id]
        if len(frames) == len(fps):
            telemetry.update(frames, fps)
        return telemetry

    def get_temperature(self, device_id: int = 0) -> float:
        """Modeled die temperature (°C) of device ``device_id`` — a model, not a sensor
        reading: see :class:`memryx._compat.TelemetryModel`."""
        return round(self._read_telemetry(device_id).temperature_c, 2)

    def get_pressure(self, device_id: int = 0) -> float:
        """Modeled thermal pressure of device ``device_id``, 0 (cool) to 1 (throttling)."""
        return round(self._read_telemetry(device_id).pressure, 4)

    def get_avg_power(self, device_id: int = 0) -> float:
        """Modeled average power (W) of device ``device_id`` since the accelerator started."""
        return round(self._read_telemetry(device_id).avg_power_w, 3)

    # -- frames in and out ----------------------------------------------------------------------
    def _chip_in(self, model_idx: int) -> tuple[bool, bool]:
        """(convert at all, frames must be chip layout) for inputs of ``model_idx``."""
        if model_idx in self._pre_set:
            return (False, False)
        return (True, not self._compat.use_model_shape[0])

    def _chip_out(self, model_idx: int) -> bool:
        return not self._compat.use_model_shape[1] and model_idx not in self._post_set

    def _inputs_to_model(self, inputs: Any, model_idx: int) -> Any:
        """``run``/``send`` inputs (one frame or a list of frames) in model shapes."""
        convert, chip_only = self._chip_in(model_idx)
        if not convert:
            return inputs
        model = self._dfp.model(model_idx)
        if isinstance(inputs, np.ndarray):
            return _convert_in(inputs, model, chip_only)
        if isinstance(inputs, (list, tuple)) and inputs:
            if len(model.inputs) > 1 and all(isinstance(x, np.ndarray) for x in inputs):
                return _convert_in(list(inputs), model, chip_only)
            if not chip_only and len(model.inputs) == 1:
                # a batch: only frames in exactly the chip layout need a look (cheap test)
                chip = model.inputs[0].chip_shape
                if not any(isinstance(x, np.ndarray) and x.shape == chip for x in inputs):
                    return inputs
            return [_convert_in(x, model, chip_only) for x in inputs]
        return inputs

    def _outputs_to_chip(self, outputs: Any, model_idx: int, single: bool) -> Any:
        if not self._chip_out(model_idx):
            return outputs
        ports = self._dfp.model(model_idx).outputs

        def one(frame: Any) -> Any:
            if isinstance(frame, np.ndarray):
                return to_chip(frame, ports[0])
            return [to_chip(a, p) for a, p in zip(frame, ports, strict=True)]

        return one(outputs) if single else [one(f) for f in outputs]

    def _input_conversion(self, model_idx: int) -> tuple[ModelInfo, bool, bool]:
        """(the model, frames must be chip layout, frames need converting) for an input
        callback of ``model_idx``."""
        convert, chip_only = self._chip_in(model_idx)
        model = self._dfp.model(model_idx)
        needs_convert = convert and (chip_only or any(
            p.chip_shape not in (p.shape, p.shape[1:]) for p in model.inputs))
        return model, chip_only, needs_convert

    def _wrap_input(self, fn: Callable[..., Any], model_idx: int) -> Callable[..., Any]:
        fps = self._compat.client_options.fps_target
        model, chip_only, needs_convert = self._input_conversion(model_idx)
        if not fps and not needs_convert:
            return fn

        conv = _converter(model, chip_only)
        gate = Pacer(fps, self._compat_stop, self._clock()) if fps else None
        return paced(fn, gate, conv if needs_convert else None)

    def _wrap_stream_input(self, fn: Callable[[int], Any], model_idx: int) -> Callable[..., Any]:
        """Per-stream pacing for ``connect_streams``: each stream at ``fps_target``."""
        fps = self._compat.client_options.fps_target
        model, chip_only, needs_convert = self._input_conversion(model_idx)
        if not fps and not needs_convert:
            return fn
        pacers: dict[int, Pacer] = {}
        stop = self._compat_stop
        clock = self._clock()
        kind = classify(fn)

        def gate_for(stream: int) -> Pacer | None:
            if not fps:
                return None
            return pacers.setdefault(stream, Pacer(fps, stop, clock))

        conv = _converter(model, chip_only) if needs_convert else _same

        if kind is CallbackKind.ASYNC:
            @functools.wraps(fn)
            async def coro(stream: int) -> Any:
                gate = gate_for(stream)
                if gate is not None:
                    d = gate.delay()
                    if d > 0:
                        await clock.sleep(d)
                return conv(await fn(stream))
            return coro
        if kind is not CallbackKind.SYNC:
            return fn  # generator stream callbacks: unpaced (the SDK has none)

        @functools.wraps(fn)
        def sync(stream: int) -> Any:
            gate = gate_for(stream)
            if gate is not None:
                d = gate.delay()
                if d > 0 and clock.wait(d, stop):
                    return None
            return conv(fn(stream))
        return sync

    def _wrap_output(self, fn: Callable[..., Any], model_idx: int, with_stream: bool,
                     n_outputs: int | None) -> Callable[..., Any]:
        smoothing = self._compat.client_options.smoothing
        chip = self._chip_out(model_idx)
        if not smoothing and not chip:
            return fn
        from ._core.callbacks import check_signature

        if n_outputs is not None:
            check_signature(fn, n_outputs + with_stream,
                            f"the output callback of model {model_idx}")
        ports = self._dfp.model(model_idx).outputs

        def conv(args: tuple[Any, ...]) -> tuple[Any, ...]:
            head, outs = (args[:1], args[1:]) if with_stream else ((), args)
            return (*head, *(to_chip(a, p) for a, p in zip(outs, ports, strict=True)))

        gates: dict[int, Smoother] = {}
        if not smoothing:
            return delivering(fn, None, conv)
        if not with_stream:
            return delivering(fn, Smoother(self._compat_stop, self._clock()),
                              conv if chip else None)
        # one smoother per stream: streams are delivered independently
        stop = self._compat_stop
        inner: dict[int, Callable[..., Any]] = {}

        def per_stream(*args: Any) -> Any:
            stream = args[0]
            wrapped = inner.get(stream)
            if wrapped is None:
                gate = gates.setdefault(stream, Smoother(stop, self._clock()))
                wrapped = inner[stream] = delivering(fn, gate, conv if chip else None)
            return wrapped(*args)

        if classify(fn) is CallbackKind.ASYNC:
            async def aper_stream(*args: Any) -> Any:
                return await per_stream(*args)
            return aper_stream
        return per_stream

