"""``Benchmark``: the SDK's Python benchmark, measured with warm-up.

::

    from memryx import Benchmark
    with Benchmark(dfp="model.dfp") as b:
        outputs, latency_ms, fps = b.run(frames=1000)

One accelerator stays open for the whole ``with`` block, so repeated ``run()``
calls measure the same warmed-up pipeline instead of each paying for start-up.
Each ``run()``:

1. warms up: pushes ``warmup`` frames (default: a tenth of ``frames``, at least
   8) through the pipeline and drops their timings;
2. measures **latency**: the median time of single frames sent one at a time
   through an otherwise idle pipeline (``latency_frames`` of them);
3. measures **throughput**: ``frames`` frames pipelined (``threading=True``, the
   default) or one at a time (``threading=False``), timed from the first send
   to the last output.

It returns the outputs of the last frame (a list with an array per output
port), the median latency in milliseconds and the frames per second. The
figures are those of the device the accelerator runs on: by default the
simulated MX3 in its timed mode, so they follow the DFP's timing model as
long as the host keeps up (``statistics()["device"]["models"][i]["late_frames"]``
counts frames it did not).
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any

import numpy as np

from ._bench import random_arrays
from ._core.threads import start_thread
from .accl import DfpLike, SyncAccl
from .dfp import Dfp

__all__ = ["Benchmark"]

log = logging.getLogger("memryx.benchmark")


def _positive_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return value


class Benchmark:
    """Measure a DFP's latency and throughput (see the module docstring).

    Parameters:
        dfp: path, bytes or :class:`Dfp`.
        group: the chip group / device id.
        frames: default frame count of :meth:`run`.
        fps: when > 0, feed frames at most this fast (0: as fast as possible).
        verbose: 1 and up logs a line per run (INFO on ``memryx.benchmark``).
        chip_gen: accepted for the SDK's signature; the simulated MX3 is the only chip.
        model_idx: which model of a multi-model DFP to measure.
        **accl_options: passed to :class:`SyncAccl` (e.g. ``device="sim:fast"``).
    """

    def __init__(self, dfp: DfpLike, group: int = 0, frames: int = 1000, fps: float = 0.0,
                 verbose: int = 0, chip_gen: Any = None, *, model_idx: int = 0,
                 latency_frames: int = 32, warmup: int | None = None,
                 **accl_options: Any) -> None:
        self.dfp = Dfp(dfp)
        self.group = group
        self.frames = _positive_int(frames, "frames")
        if isinstance(fps, bool) or not isinstance(fps, (int, float)) or \
                not (fps >= 0 and math.isfinite(fps)):
            raise ValueError(f"fps must be a number >= 0 (0: as fast as possible), got {fps!r}")
        self.fps = float(fps)
        self.verbose = verbose
        self.chip_gen = chip_gen
        self.model_idx = model_idx
        self.latency_frames = _positive_int(latency_frames, "latency_frames")
        self.warmup = None if warmup is None else _positive_int(warmup, "warmup")
        model = self.dfp.model(model_idx)
        rng = np.random.default_rng(0)
        self._pool = [random_arrays(model.inputs, rng) for _ in range(8)]
        self._single = len(model.inputs) == 1
        self._accl_options = accl_options
        self._accl: SyncAccl | None = None
        #: Figures of every run in this context: dicts with latency_ms, fps, frames.
        self.history: list[dict[str, float]] = []

    def __enter__(self) -> Benchmark:
        self._accl = SyncAccl(self.dfp, device_ids=self.group, **self._accl_options)
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        if self._accl is not None:
            accl, self._accl = self._accl, None
            accl.close()

    def _frame(self, i: int) -> Any:
        arrays = self._pool[i % len(self._pool)]
        return arrays[0] if self._single else arrays

    def run(self, frames: int | None = None, threading: bool = True) -> tuple[Any, float, float]:
        """Warm up, then measure; returns ``(outputs of the last frame, latency_ms, fps)``."""
        if self._accl is None:
            raise RuntimeError("use Benchmark as a context manager: `with Benchmark(dfp=...) "
                               "as b: b.run()`")
        n = self.frames if frames is None else _positive_int(frames, "frames")
        accl, idx = self._accl, self.model_idx
        warm = self.warmup if self.warmup is not None else max(8, n // 10)
        accl.run([self._frame(i) for i in range(warm)], idx)

        singles = []
        for i in range(self.latency_frames):
            t0 = time.perf_counter()
            accl.run(self._frame(i), idx)
            singles.append(time.perf_counter() - t0)
        latency_ms = float(np.median(singles)) * 1000.0

        batch = [self._frame(i) for i in range(n)]
        start = time.perf_counter()
        if self.fps > 0:
            outputs = self._paced(batch)
        elif threading:
            outputs = accl.run(batch, idx)[-1]
        else:
            for frame in batch:
                outputs = accl.run(frame, idx)
        elapsed = time.perf_counter() - start
        fps = n / elapsed if elapsed > 0 else float("inf")
        self.history.append({"frames": n, "latency_ms": latency_ms, "fps": fps})
        if self.verbose:
            log.info("%d frames: latency %.2f ms, %.1f FPS", n, latency_ms, fps)
        result = outputs if isinstance(outputs, list) else [outputs]
        return result, latency_ms, fps

    def _paced(self, batch: list[Any]) -> Any:
        """Send at ``fps`` while a second thread receives (the SDK's paced benchmark)."""
        assert self._accl is not None
        accl, idx = self._accl, self.model_idx
        last: list[Any] = [None]
        failure: list[BaseException] = []

        def drain() -> None:
            try:
                for _ in batch:
                    last[0] = accl.receive(idx)
            except BaseException as exc:  # surfaced in the caller
                failure.append(exc)

        reader = start_thread("memryx-benchmark-receive", drain)
        interval = 1.0 / self.fps
        t0 = time.perf_counter()
        for i, frame in enumerate(batch):
            delay = t0 + i * interval - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            accl.send(frame, idx)
        reader.join()
        if failure:
            raise failure[0]
        return last[0]
