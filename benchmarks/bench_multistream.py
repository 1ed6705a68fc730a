"""Multi-stream: 1, 4, 16, 32 and 64 streams on one model through MultiStreamAsyncAccl.

Every stream's input callback returns frames until a common deadline; the
output callback counts each stream's frames. Aggregate throughput should not
drop much as streams are added (>= 0.9x of one stream's), and each stream should
get its fair share (within 5% of total / streams). Run twice: the device as
fast as the host (``mode="fast"``: the runtime is the bottleneck), and the
timed device at a modeled 992 fps (the device is the bottleneck, like an NVR).
"""

from __future__ import annotations

import time
from typing import Any

import _common as c
import numpy as np

SHAPE = (1, 16)
STREAMS = (1, 4, 16, 32, 64)
TIMED_FPS, TIMED_LATENCY_MS = 992.0, 3.0
AGG_GOAL, SHARE_TOL = 0.9, 0.05


def _run(dfp: Any, n: int, duration: float, mode: str
         ) -> tuple[list[float], list[int], float]:
    from memryx import MultiStreamAsyncAccl

    frame = np.zeros(SHAPE, np.float32)
    clock = time.perf_counter
    deadline = [0.0]
    counts = [0] * n
    t_out: list[float] = []

    def input_callback(stream_idx: int) -> np.ndarray | None:
        now = clock()
        if not deadline[0]:
            deadline[0] = now + duration
        elif now >= deadline[0]:
            return None
        return frame

    def output_callback(stream_idx: int, *outputs: Any) -> None:
        t_out.append(clock())
        counts[stream_idx] += 1

    accl = MultiStreamAsyncAccl(dfp, mode=mode)
    cpu = time.process_time()
    accl.connect_streams(input_callback, output_callback, n)
    accl.wait()
    cpu_us = (time.process_time() - cpu) / max(1, len(t_out)) * 1e6
    accl.close()
    return t_out, counts, cpu_us


def run(quick: bool) -> dict[str, Any]:
    from memryx import testing

    duration, reps, warmup = (0.7, 1, 0.1) if quick else (2.5, 3, 0.3)
    # long enough for every stream to get ``min_frames`` (one frame more or less is then
    # a small part of a share)
    min_frames = 30 if quick else 100
    model = testing.identity_model(SHAPE)
    available, why = c.timed_mode()
    setups = [("fast", c.compile_dfp(model))]
    if available:
        setups.append(("timed", c.compile_dfp(model, fps=TIMED_FPS, latency_ms=TIMED_LATENCY_MS)))
    rows, goals = [], []
    raw: dict[str, Any] = {}
    for mode, dfp in setups:
        fps: dict[int, list[float]] = {n: [] for n in STREAMS}
        dev: dict[int, list[float]] = {n: [] for n in STREAMS}
        cpu: dict[int, list[float]] = {n: [] for n in STREAMS}
        expected = TIMED_FPS if mode == "timed" else None
        for _ in range(reps):
            for n in STREAMS:
                if expected is None:
                    run_s = duration
                else:
                    run_s = max(duration, warmup + min_frames * n / expected)
                t_out, counts, cpu_us = _run(dfp, n, run_s, mode)
                cpu[n].append(cpu_us)
                if n == 1 and expected is None:
                    expected = c.steady_fps(t_out, warmup)
                fps[n].append(c.steady_fps(t_out, warmup))
                mean = sum(counts) / n
                dev[n].append(max(abs(k / mean - 1) for k in counts) if mean else float("nan"))
        raw[mode] = {"fps": fps, "share_deviation": dev, "cpu_us_per_frame": cpu}
        one = c.median(fps[1])
        label = ("`mode=\"fast\"` (as fast as host)" if mode == "fast"
                 else f"`mode=\"timed\"`, modeled {TIMED_FPS:g} fps")
        for n in STREAMS:
            f, d = c.median(fps[n]), c.median(dev[n])
            rows.append([label, n, c.fmt(f), c.ratio(f / one), f"{d * 100:.1f}%",
                         c.spread(fps[n]), c.fmt(c.median(cpu[n]))])
            if n == 1:
                continue
            goals.append(c.goal(f"{mode}, {n} streams: aggregate >= {AGG_GOAL}x one stream's",
                                c.ratio(f / one), f / one >= AGG_GOAL,
                                c.shortfall(f / one, AGG_GOAL, c.ratio)))
            goals.append(c.goal(f"{mode}, {n} streams: every stream within "
                                f"{SHARE_TOL:.0%} of its fair share",
                                f"worst stream {d * 100:.1f}% off", d <= SHARE_TOL,
                                c.excess(d * 100, SHARE_TOL * 100, lambda x: f"{x:.1f}%")))
    notes = [] if available else [f"timed rows SKIPPED: {why}"]
    return c.result(
        "multistream", "Multi-stream: 1 / 4 / 16 / 32 / 64 streams",
        f"MultiStreamAsyncAccl, identity model on a `{SHAPE}` float32 frame, every stream's "
        f"input callback returning frames for {duration:g} s (longer when needed for every "
        f"stream to get {min_frames} frames), the output callback counting "
        f"frames per stream. Aggregate frames/s in steady state (first {warmup:g} s dropped), "
        f"\"worst stream\" = largest deviation of a stream's frame count from total / streams; "
        f"median of {reps}.",
        tables=[c.table("", ["device", "streams", "aggregate frames/s", "vs 1 stream",
                             "worst stream vs fair share", "frames/s min-max",
                             "CPU us per frame"], rows)],
        goals=goals, raw=raw,
        notes=[*notes, "\"CPU us per frame\": CPU time of the whole process (all threads) "
               "per output over the run; it does not depend on the machine's other load the "
               "way frames/s does, so it shows what a stream count costs."],
    )


if __name__ == "__main__":
    c.main(run)
