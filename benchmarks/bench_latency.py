"""Latency under backlog: a source faster than the device.

The device is the timed simulated MX3 running an identity model compiled with
``fps=500, latency_ms=2`` (one output every 2 ms: the *device frame time*). The
input callback returns a frame at once whenever it is asked, so frames queue in
front of the device and every frame waits for those ahead of it; how many there
are is bounded by the runtime's frame budget. Latency: from the input callback's
return to the output callback's call, in steady state.
"""

from __future__ import annotations

from typing import Any

import _common as c
import numpy as np

SHAPE = (1, 16)
DEVICE_FPS, DEVICE_LATENCY_MS = 500.0, 2.0
FRAME_MS = 1000.0 / DEVICE_FPS
GOAL_FRAMES = 12.0


def _budget(dfp: Any) -> int:
    from memryx import SyncAccl

    with SyncAccl(dfp) as accl:
        return int(accl.statistics()["models"][0]["frame_budget"])


def run_plain(dfp: Any, frame: np.ndarray, duration: float) -> c.Stamps:
    from memryx import AsyncAccl

    stamps = c.Stamps()
    accl = AsyncAccl(dfp)
    accl.connect_output(c.sink(stamps))
    accl.connect_input(c.feeder(frame, duration, stamps))
    accl.wait()
    return stamps


def run_async(dfp: Any, frame: np.ndarray, duration: float) -> c.Stamps:
    return c.run_async_callbacks(dfp, frame, duration)


def run(quick: bool) -> dict[str, Any]:
    from memryx import testing

    duration, reps, warmup = (1.0, 1, 0.3) if quick else (3.0, 3, 0.5)
    available, why = c.timed_mode()
    if not available:
        return c.result("latency", "Latency under backlog", why,
                        goals=[c.goal("p50 latency <= 12 device frame times", "n/a", None, why)])
    dfp = c.compile_dfp(testing.identity_model(SHAPE), fps=DEVICE_FPS,
                        latency_ms=DEVICE_LATENCY_MS)
    budget = _budget(dfp)
    frame = np.zeros(SHAPE, np.float32)
    variants = {"AsyncAccl, plain callbacks": run_plain,
                "AsyncAccl, async def callbacks": run_async}
    p50: dict[str, list[float]] = {k: [] for k in variants}
    p99: dict[str, list[float]] = {k: [] for k in variants}
    fps: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(reps):
        for key, fn in variants.items():
            stamps = fn(dfp, frame, duration)
            lat = stamps.latency(warmup)
            p50[key].append(c.percentile(lat, 50))
            p99[key].append(c.percentile(lat, 99))
            fps[key].append(stamps.fps(warmup))
    rows = []
    for key in variants:
        m50, m99 = c.median(p50[key]), c.median(p99[key])
        rows.append([key, c.fmt(c.median(fps[key])), c.fmt(m50), c.fmt(m50 / FRAME_MS),
                     c.fmt(m99), c.fmt(m99 / FRAME_MS), c.spread(p50[key])])
    goals = []
    for key in variants:
        frames = c.median(p50[key]) / FRAME_MS
        goals.append(c.goal(f"{key}: p50 latency <= {GOAL_FRAMES:g} device frame times",
                            f"{c.fmt(frames)} frame times ({c.fmt(c.median(p50[key]))} ms)",
                            frames <= GOAL_FRAMES,
                            c.excess(frames, GOAL_FRAMES)))
    return c.result(
        "latency", "Latency under backlog: a source faster than the device",
        f"Identity model on a `{SHAPE}` float32 frame compiled with `fps={DEVICE_FPS:g}, "
        f"latency_ms={DEVICE_LATENCY_MS:g}`, simulated device in `mode=\"timed\"` (device frame "
        f"time {FRAME_MS:g} ms). The input callback returns a frame at once each time it is "
        f"asked, for {duration:g} s; the output callback only stamps the time. Latency from the "
        f"input callback's return to the output callback's call, first {warmup:g} s dropped, "
        f"median of {reps} repetitions. The runtime's frame budget for this model is {budget} "
        f"frames (`statistics()[\"models\"][0][\"frame_budget\"]`): with the budget full, a "
        f"frame waits for about that many frames ahead of it.",
        tables=[c.table("", ["variant", "frames/s", "p50 latency ms", "p50 in frame times",
                             "p99 latency ms", "p99 in frame times", "p50 ms min-max"], rows)],
        goals=goals,
        raw={"p50_ms": p50, "p99_ms": p99, "fps": fps, "frame_budget": budget},
    )


if __name__ == "__main__":
    c.main(run)
