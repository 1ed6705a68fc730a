"""The simulated device's state of one model: its jobs, counters and statistics (the
device, :mod:`.simulated`, drives it; the release heap and pacer are :mod:`._release`'s,
the compute strategies :mod:`._compute`'s)."""

from __future__ import annotations

import asyncio
import threading
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.typing import NDArray

from ._compute import ReuseCache, Runner, Sampler
from ._release import Pacer, Releases

if TYPE_CHECKING:
    from .._exceptions import DeviceError
    from ..dfp import ModelInfo

__all__ = ["LATE_WINDOW", "Frame", "Job", "ModelState", "Slots", "errors", "fail",
           "model_statistics", "percentiles"]

Array = NDArray[Any]
Frame = list[Array]
Slots = Sequence[Frame | None]
"""Outputs of a job's frames; None: a sampled frame, answered when due."""
#: Outputs whose lateness is remembered to judge whether the host is too slow.
LATE_WINDOW = 100


@dataclass
class Job:
    frames: list[Frame]
    future: asyncio.Future[list[Frame]]
    times: list[tuple[float, float]]
    seqs: list[tuple[int, int]] = field(default_factory=list)
    """Sampled mode: the frames' streams and numbers in their streams."""


@dataclass
class ModelState:
    info: ModelInfo
    run: Runner | None
    pacer: Pacer | None
    in_chip: int
    queue_depth: int = 4
    """Frames buffered on the way in and out (the device's ``queue_depth``, per model)."""
    cache: ReuseCache | None = None
    sampler: Sampler | None = None
    jobs: deque[Job] = field(default_factory=deque)
    parked: deque[tuple[Job, Slots, float]] = field(default_factory=deque)
    """Sampled mode: jobs due before any frame of their stream was computed."""
    error: DeviceError | None = None
    """Sampled mode: a failed computation whose own frame was answered already."""
    workers: int = 0
    frames_in: int = 0
    frames_out: int = 0
    late_frames: int = 0
    max_late: float = 0.0
    recent_late: deque[bool] = field(default_factory=lambda: deque(maxlen=LATE_WINDOW))
    host_slower: bool = False
    latencies: deque[float] = field(default_factory=lambda: deque(maxlen=4096))
    """Per frame: from entering the (modeled) chip to leaving the device."""
    release_errors: deque[float] = field(default_factory=lambda: deque(maxlen=4096))
    """Paced modes, per frame: when it left the device minus when the timing model said
    (< 0: early; a late wake-up, a batch released with its last frame, a frame ready late)."""
    releases: Releases | None = None
    """Paced modes: jobs whose outputs are ready and not due yet, and their wake-up."""
    frame_cost: float = 1.0
    """Running average of the host's CPU time per frame (``thread_time``, seconds)."""
    costed: bool = False
    computing: int = 0
    """Worker threads inside ``_compute`` (under ``lock``)."""
    stopping: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock)
    first_out: float = 0.0
    last_out: float = 0.0
    modeled: dict[str, Any] = field(default_factory=dict)

    def admit(self, now: float, n: int) -> list[tuple[float, float]]:
        """Entry and release times of ``n`` frames that reach the chip ``now``."""
        if self.pacer is None:
            return [(now, now)] * n
        return self.pacer.admit_many(now, n)


def percentiles(samples: deque[float]) -> dict[str, float | None]:
    ms = np.asarray(samples) * 1000.0
    if not ms.size:
        return {"p50": None, "p99": None}
    return {"p50": float(np.percentile(ms, 50)), "p99": float(np.percentile(ms, 99))}


def errors(samples: deque[float]) -> dict[str, float | None]:
    """Percentiles of signed release errors (ms), and the median of their size."""
    ms = np.asarray(samples) * 1000.0
    if not ms.size:
        return {"p1": None, "p50": None, "p99": None, "abs_p50": None}
    p1, p50, p99 = (float(v) for v in np.percentile(ms, [1, 50, 99]))
    return {"p1": p1, "p50": p50, "p99": p99, "abs_p50": float(np.median(np.abs(ms)))}


def model_statistics(m: ModelState) -> dict[str, Any]:
    """One model's entry of the device's ``statistics()``."""
    span = m.last_out - m.first_out
    entry: dict[str, Any] = {
        "model_idx": m.info.index, "frames_in": m.frames_in, "frames_out": m.frames_out,
        "late_frames": m.late_frames, "max_late_ms": m.max_late * 1000,
        "host_slower": m.host_slower,
        "device_fps": (m.frames_out - 1) / span if span > 0 else 0.0,
        "device_latency_ms": percentiles(m.latencies),
        "release_error_ms": errors(m.release_errors) if m.pacer else None,
        "modeled_fps": m.modeled.get("fps"),
        "modeled_latency_ms": m.modeled.get("latency_ms"),
        "in_chip": m.in_chip, "queue_depth": m.queue_depth,
        "caught_up_frames": m.pacer.caught_up if m.pacer is not None else 0,
        "queued": sum(len(j.frames) for j in tuple(m.jobs)),  # read off the loop too
        "compute_ms_per_frame": m.frame_cost * 1000 if m.costed else None,
    }
    if m.cache is not None:
        entry["reuse"] = m.cache.statistics()
    if m.sampler is not None:
        entry["sampled"] = m.sampler.statistics()
    return entry


def fail(fut: asyncio.Future[Any], exc: BaseException) -> None:
    """Fail a frame's future with ``exc``, already marked as seen: the lane raises it when
    it reaches that frame, but a loop that stops first (the process exiting with the
    accelerator still running) would print it as "Future exception was never retrieved"."""
    fut.set_exception(exc)
    fut.exception()
