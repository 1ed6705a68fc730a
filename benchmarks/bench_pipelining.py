"""Pipelining: input callback, device and output callback each take a set time.

Stages of 2 ms (input callback) / 3 ms (device) / 2 ms (output callback): a
pipelined runtime delivers 1 / (slowest stage) = 333 frames/s, a serial one
1 / 7 ms = 143. The device's 3 ms come from the MX3 timing model: an identity
model compiled with ``fps=1000/3, latency_ms=3`` run in ``mode="timed"``. The
callbacks' 2 ms are either ``time.sleep`` or busy numpy work that releases the
GIL. ``SyncAccl.run`` on a batch gets the same host stages as pre- and
post-processing callables.

While the simulated device has no timed mode, the goal lines are SKIPPED and a
bench-side stand-in device (``_common.PacedDevice``, same 3 ms pacing) still
measures the runtime's own pipelining, for information.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from functools import partial
from typing import Any

import _common as c
import numpy as np

IN_MS, DEVICE_MS, OUT_MS = 2.0, 3.0, 2.0
SHAPE = (1, 16)


Works = tuple[Callable[[], None], Callable[[], None]] | None


def _async_accl(dfp: Any, device_kw: Callable[[], dict[str, Any]], works: Works,
                duration: float, warmup: float) -> tuple[float, list[float], float]:
    from memryx import AsyncAccl

    assert works is not None
    w_in, w_out = works
    stamps = c.Stamps()
    frame = np.zeros(SHAPE, np.float32)
    accl = AsyncAccl(dfp, **device_kw())
    accl.connect_output(c.sink(stamps, w_out))
    accl.connect_input(c.feeder(frame, duration, stamps, w_in))
    accl.wait()
    return stamps.fps(warmup), stamps.latency(warmup), stamps.cpu_us_per_frame(warmup)


def _stage(work: Callable[[], None]) -> Callable[[np.ndarray], np.ndarray]:
    def stage(x: np.ndarray) -> np.ndarray:
        work()
        return x

    return stage


def _sync_batch(dfp: Any, device_kw: Callable[[], dict[str, Any]], works: Works, n: int
                ) -> tuple[float, list[float], float]:
    """SyncAccl.run on a batch of ``n``; the host stages as pre-/post-processing callables."""
    from memryx import SyncAccl

    frame = np.zeros(SHAPE, np.float32)
    with SyncAccl(dfp, **device_kw()) as accl:
        if works is not None:
            accl.set_preprocessing_model(_stage(works[0]))
            accl.set_postprocessing_model(_stage(works[1]))
        accl.run([frame] * 8)  # warm the worker threads
        t, cpu = time.perf_counter(), time.process_time()
        accl.run([frame] * n)
        fps = n / (time.perf_counter() - t)
        return fps, [], (time.process_time() - cpu) / n * 1e6


def run(quick: bool) -> dict[str, Any]:
    from memryx import testing

    duration, reps, warmup = (0.8, 1, 0.15) if quick else (2.5, 3, 0.3)
    bound = 1e3 / max(IN_MS, DEVICE_MS, OUT_MS)
    target = 0.95 * bound
    model = testing.identity_model(SHAPE)
    available, why = c.timed_mode()

    devices: list[tuple[str, Any, Callable[[], dict[str, Any]]]] = []
    if available:
        timed_dfp = c.compile_dfp(model, fps=1e3 / DEVICE_MS, latency_ms=DEVICE_MS)
        devices.append(("timed", timed_dfp, lambda: {"mode": "timed"}))
    plain_dfp = c.compile_dfp(model)
    devices.append(("stand-in", plain_dfp,
                    lambda: {"device": c.PacedDevice(DEVICE_MS / 1e3, DEVICE_MS / 1e3)}))

    works = {"sleep": (c.sleep_work(IN_MS), c.sleep_work(OUT_MS)),
             "numpy": (c.numpy_work(IN_MS), c.numpy_work(OUT_MS))}
    rows: list[list[str]] = []
    goals: list[dict[str, str]] = []
    raw: dict[str, Any] = {}
    n_batch = max(100, int(bound * duration))
    for dev_name, dfp, kw in devices:
        label = ('simulated device, `mode="timed"`' if dev_name == "timed"
                 else "stand-in paced device (information only)")
        configs: list[tuple[str, Callable[[], tuple[float, list[float], float]]]] = []
        for wname, pair in works.items():
            configs.append((f"AsyncAccl, callbacks {IN_MS:g} / {OUT_MS:g} ms {wname}",
                            partial(_async_accl, dfp, kw, pair, duration, warmup)))
            configs.append((f"SyncAccl.run(batch of {n_batch}), pre/post-processing "
                            f"{IN_MS:g} / {OUT_MS:g} ms {wname}",
                            partial(_sync_batch, dfp, kw, pair, n_batch)))
        configs.append((f"SyncAccl.run(batch of {n_batch}), no host stages",
                        partial(_sync_batch, dfp, kw, None, n_batch)))
        fps: dict[str, list[float]] = {name: [] for name, _ in configs}
        lat: dict[str, list[list[float]]] = {name: [] for name, _ in configs}
        cpu: dict[str, list[float]] = {name: [] for name, _ in configs}
        for _ in range(reps):
            for name, fn in configs:
                f, la, cp = fn()
                fps[name].append(f)
                cpu[name].append(cp)
                if la:
                    lat[name].append(la)
        raw[dev_name] = fps
        for name, _ in configs:
            f = c.median(fps[name])
            p50 = c.median([c.percentile(x, 50) for x in lat[name]]) if lat[name] else float("nan")
            p99 = c.median([c.percentile(x, 99) for x in lat[name]]) if lat[name] else float("nan")
            rows.append([label, name, c.fmt(f), c.ratio(f / bound), c.fmt(c.median(cpu[name])),
                         c.fmt(p50), c.fmt(p99), c.spread(fps[name])])
            if dev_name == "timed":
                goals.append(c.goal(f"{name}: >= 0.95 x {c.fmt(bound)} frames/s",
                                    f"{c.fmt(f)} frames/s ({c.ratio(f / bound)})",
                                    f >= target, c.shortfall(f, target)))
    if not available:
        for api in ("AsyncAccl", "SyncAccl.run(batch)"):
            goals.append(c.goal(f"{api}: >= 0.95 x {c.fmt(bound)} frames/s with a "
                                f"{DEVICE_MS:g} ms timed device", "not measured", None,
                                f"SKIPPED: {why}"))
    notes = [f"The numpy variants need {IN_MS + OUT_MS:g} ms of CPU per frame for the callbacks "
             f"alone: {(IN_MS + OUT_MS) * bound / 1e3:.2f} cores at {c.fmt(bound)} frames/s, "
             "plus the runtime's own CPU (\"CPU us per frame\" is the whole process's), on a "
             f"{os.cpu_count()}-core machine shared with other work: they are sensitive to "
             "the machine's load."]
    if not available:
        notes.append(f"SKIPPED: {why}. The stand-in rows show the runtime core's pipelining "
                     "with the same stage times, using a bench-side paced device.")
    return c.result(
        "pipelining", f"Pipelining: {IN_MS:g} ms / {DEVICE_MS:g} ms / {OUT_MS:g} ms stages",
        f"Input callback {IN_MS:g} ms, device {DEVICE_MS:g} ms (identity model compiled with "
        f"`fps=1000/{DEVICE_MS:g}, latency_ms={DEVICE_MS:g}`, `mode=\"timed\"`), output callback "
        f"{OUT_MS:g} ms; callback time is `time.sleep` or GIL-releasing numpy work. Bound: "
        f"1 / slowest stage = {c.fmt(bound)} frames/s (fully serial: "
        f"{c.fmt(1e3 / (IN_MS + DEVICE_MS + OUT_MS))}). AsyncAccl runs {duration:g} s, "
        f"steady-state frames/s; SyncAccl runs one batch; median of {reps}. Latency: input "
        f"callback's return to output callback's call (it includes the wait in the bounded "
        f"buffers, since the input stage is faster than the device).",
        tables=[c.table("", ["device", "run", "frames/s", "vs bound", "CPU us per frame",
                             "p50 latency ms", "p99 latency ms", "frames/s min-max"], rows)],
        goals=goals, notes=notes, raw=raw,
    )


if __name__ == "__main__":
    c.main(run)
