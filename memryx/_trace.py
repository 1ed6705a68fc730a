"""Frame traces in the Chrome / Perfetto trace-event format.

A :class:`Tracer` keeps the events of the last frames in a bounded ring and
writes them as a JSON object ``{"traceEvents": [...]}`` that
https://ui.perfetto.dev and ``chrome://tracing`` open:

* one *process* per model (``pid = model index + 1``, named after the model),
  one *thread* per stream of that model (``tid = stream index + 1``); each stage
  of a frame's life (input callback, pre-processing, queueing, device,
  post-processing, output callback) is a complete event (``"ph": "X"``) on its
  stream's thread, with the frame number in ``args``;
* one more process, ``DEVICE_PID``, "device", with one thread per model: the
  intervals when the device was busy with that model's frames.

Cost: recording is an append of a tuple to a ``deque`` (no dict, no formatting:
that happens in :meth:`Tracer.write`). Code on the hot path tests one
attribute, ``if tracer.on:``, and pays nothing else when tracing is off.

Where the runtime records (the hook points): the input thread or loop (input
callback, pre-processing), :class:`memryx._core.lane.Lane` (queued, device, the
busy intervals, request frames' pre- and post-processing) and
:class:`memryx._core.callbacks.CallbackOutput` (post-processing, output callback),
each behind ``if tracer.on:``::

    if tracer.on:
        tracer.frame(stream, model, "device", t0, t1, frame_no)

Times are seconds of the device's clock (``time.monotonic()``, or a test's
:class:`memryx.clock.VirtualClock`; the file starts at the
earliest event).

The public API built on it:

* ``accl.trace(path, frames=10_000)`` on any accelerator starts recording the
  last ``frames`` frames and returns the :class:`Tracer`; the file is written
  when the accelerator closes, or at once by ``accl.trace(None)``, which also
  stops recording. Calling it again replaces the path.
* ``MEMRYX_TRACE=path``: every accelerator of the process behaves as if
  ``trace(path)`` had been called when it was created; the second one writes
  ``path`` with ``.1`` before the suffix, and so on (:func:`trace_path_from_env`).
* ``memryx bench --trace out.json [--trace-frames N]`` records through
  ``accl.trace``.

An accelerator owns ONE tracer for its whole life (its lanes and callback
threads keep a reference to it): :meth:`Tracer.start` and :meth:`Tracer.stop`
turn that tracer on and off rather than replacing it.
"""

from __future__ import annotations

import itertools
import json
import os
import threading
from collections import deque
from collections.abc import Iterable
from pathlib import Path
from typing import Any

__all__ = ["DEVICE_PID", "ENV_VAR", "STAGES", "Tracer", "trace_path_from_env"]

#: The environment variable that turns tracing on for every accelerator of a process.
ENV_VAR = "MEMRYX_TRACE"
#: The stages of a frame's life, in order (other names are allowed).
STAGES = ("input callback", "pre-processing", "queued", "device", "post-processing",
          "output callback")
#: Events kept per frame of the ring: the stages plus room for a split stage.
EVENTS_PER_FRAME = 8
#: The pid of the device's own track.
DEVICE_PID = 1_000_000
#: Default number of frames kept.
DEFAULT_FRAMES = 10_000

_env_counter = itertools.count()
_env_lock = threading.Lock()


def trace_path_from_env() -> Path | None:
    """Where ``MEMRYX_TRACE`` asks this accelerator's trace to go, if it does.

    The first accelerator of the process gets the path as given, later ones
    ``NAME.1.json``, ``NAME.2.json``... so two accelerators never overwrite
    each other's trace.
    """
    value = os.environ.get(ENV_VAR, "").strip()
    if not value:
        return None
    with _env_lock:
        n = next(_env_counter)
    path = Path(value)
    return path if n == 0 else path.with_name(f"{path.stem}.{n}{path.suffix}")


class Tracer:
    """A bounded ring of the last ``frames`` frames' events.

    ``on`` is False for a disabled tracer (:meth:`off`): the one check the hot
    path makes.
    """

    __slots__ = ("_busy", "_events", "_models", "_pending", "frames", "on", "path")

    def __init__(self, frames: int = DEFAULT_FRAMES, path: str | os.PathLike[str] | None = None,
                 *, on: bool = True) -> None:
        if isinstance(frames, bool) or not isinstance(frames, int) or frames < 1:
            raise ValueError(f"frames must be an int >= 1, got {frames!r}")
        self.frames = frames
        self.on = on
        self.path = Path(path) if path is not None else None
        # (stage, model, stream, frame, t0, t1): deque appends are atomic, so the
        # loop thread and worker threads may record at once without a lock
        keep = frames if on else 0  # an off tracer keeps nothing, even if called
        self._events: deque[tuple[str, int, int, int, float, float]] = deque(
            maxlen=keep * EVENTS_PER_FRAME)
        self._busy: deque[tuple[int, float, float]] = deque(maxlen=keep)
        self._models: dict[int, str] = {}
        self._pending: dict[int, list[float]] = {}  # per model: the busy interval growing now

    def start(self, path: str | os.PathLike[str] | None = None,
              frames: int = DEFAULT_FRAMES) -> Tracer:
        """Start recording (again) into a fresh ring of ``frames`` frames, to write to ``path``."""
        if isinstance(frames, bool) or not isinstance(frames, int) or frames < 1:
            raise ValueError(f"frames must be an int >= 1, got {frames!r}")
        self.on = False  # writers that see this stop appending to the old ring
        self.frames = frames
        self.path = Path(path) if path is not None else None
        self._events = deque(maxlen=frames * EVENTS_PER_FRAME)
        self._busy = deque(maxlen=frames)
        self._pending = {}
        self.on = True
        return self

    def stop(self) -> None:
        """Stop recording; what was recorded stays (for :meth:`write`)."""
        self.on = False

    def finish(self) -> Path | None:
        """Stop recording and write to ``path`` if one was given (the accelerator's close)."""
        was_on, self.on = self.on, False
        if not was_on or self.path is None:
            return None
        return self.write()

    @classmethod
    def off(cls) -> Tracer:
        """A tracer that records nothing (``on`` is False)."""
        return cls(1, on=False)

    @classmethod
    def from_env(cls, frames: int = DEFAULT_FRAMES) -> Tracer:
        """On, writing to ``$MEMRYX_TRACE``'s path at close, when the variable is set."""
        path = trace_path_from_env()
        return cls(frames, path) if path is not None else cls.off()

    # -- recording (the hot path: an append each) -------------------------------------------
    def frame(self, stream: int, model: int, stage: str, t0: float, t1: float,
              frame: int = -1) -> None:
        """Stage ``stage`` of frame ``frame`` of ``stream`` of ``model`` ran from t0 to t1."""
        self._events.append((stage, model, stream, frame, t0, t1))

    def busy(self, model: int, t0: float, t1: float) -> None:
        """The device was busy with frames of ``model`` from t0 to t1.

        Back-to-back or overlapping intervals of a model (a chip streaming frames)
        merge into one, so a saturated device costs one event, not one per frame.
        """
        if not self.on:
            return
        pending = self._pending.get(model)
        if pending is not None and pending[0] <= t0 <= pending[1]:
            if t1 > pending[1]:
                pending[1] = t1
            return
        if pending is not None:
            self._busy.append((model, pending[0], pending[1]))
        self._pending[model] = [t0, t1]

    def name_model(self, model: int, name: str) -> None:
        """Label ``model``'s track (the DFP's model name)."""
        self._models[model] = name

    def clear(self) -> None:
        self._events.clear()
        self._busy.clear()
        self._pending.clear()

    def __len__(self) -> int:
        return len(self._events) + len(self._busy) + len(self._pending)

    # -- output ---------------------------------------------------------------------------------
    def events(self) -> list[dict[str, Any]]:
        """The trace events, metadata first, then complete events sorted by start time."""
        spans = _snapshot(self._events)
        busy = _snapshot(self._busy) + [(m, p[0], p[1]) for m, p in
                                        _snapshot(self._pending.items())]
        starts = [e[4] for e in spans] + [b[1] for b in busy]
        origin = min(starts) if starts else 0.0
        out: list[dict[str, Any]] = []
        for stage, model, stream, frame, t0, t1 in spans:
            ev: dict[str, Any] = {
                "name": stage, "cat": "frame", "ph": "X", "pid": model + 1, "tid": stream + 1,
                "ts": _us(t0 - origin), "dur": _us(max(0.0, t1 - t0)),
            }
            if frame >= 0:
                ev["args"] = {"frame": frame}
            out.append(ev)
        for model, t0, t1 in busy:
            out.append({"name": f"model {model}", "cat": "device", "ph": "X",
                        "pid": DEVICE_PID, "tid": model + 1, "ts": _us(t0 - origin),
                        "dur": _us(max(0.0, t1 - t0))})
        out.sort(key=lambda e: (e["ts"], e["pid"], e["tid"]))
        return self._metadata(spans, busy) + out

    def _metadata(self, spans: Iterable[tuple[str, int, int, int, float, float]],
                  busy: Iterable[tuple[int, float, float]]) -> list[dict[str, Any]]:
        meta: list[dict[str, Any]] = []
        tracks = sorted({(e[1], e[2]) for e in spans})
        for model in sorted({m for m, _ in tracks}):
            name = self._models.get(model)
            meta.append(_meta("process_name", model + 1, 0,
                              f"model {model}" + (f" ({name})" if name else "")))
            meta.append(_meta("process_sort_index", model + 1, 0, model))
        for model, stream in tracks:
            meta.append(_meta("thread_name", model + 1, stream + 1, f"stream {stream}"))
        device_models = sorted({b[0] for b in busy})
        if device_models:
            meta.append(_meta("process_name", DEVICE_PID, 0, "device"))
            meta.append(_meta("process_sort_index", DEVICE_PID, 0, -1))
            for model in device_models:
                meta.append(_meta("thread_name", DEVICE_PID, model + 1, f"model {model} busy"))
        return meta

    def to_json(self) -> dict[str, Any]:
        return {"traceEvents": self.events(), "displayTimeUnit": "ms",
                "otherData": {"producer": "memryx", "frames_kept": self.frames}}

    def write(self, path: str | os.PathLike[str] | None = None) -> Path:
        """Write the trace (atomically) to ``path``, or to the path given at construction."""
        target = Path(path) if path is not None else self.path
        if target is None:
            raise ValueError("no path to write the trace to")
        tmp = target.with_name(target.name + ".tmp")
        try:
            with tmp.open("w") as f:
                json.dump(self.to_json(), f, separators=(",", ":"))
            os.replace(tmp, target)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return target


def _snapshot(items: Iterable[Any]) -> list[Any]:
    """A copy of a ring other threads may append to while we read it."""
    for _ in range(100):
        try:
            return list(items)
        except RuntimeError:  # "mutated during iteration": try again
            continue
    return []


def _us(seconds: float) -> float:
    return round(seconds * 1e6, 3)


def _meta(name: str, pid: int, tid: int, value: str | int) -> dict[str, Any]:
    key = "sort_index" if name.endswith("sort_index") else "name"
    return {"name": name, "ph": "M", "pid": pid, "tid": tid, "args": {key: value}}
