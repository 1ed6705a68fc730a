"""Memory: RSS stays flat over a long run whose output callback is slow.

The input callback returns 600 KB frames as fast as the runtime takes them,
the output callback sleeps 5 ms per frame, so the output side is 100x slower
than the input side. With bounded queues everywhere the runtime holds a fixed
number of frames, and the process's resident memory stops growing once the
pipeline is full; an unbounded queue would grow by ~120 MB/s. A sampler thread
reads RSS (psutil) and the frames in flight (``statistics()``) 4 times a second.
"""

from __future__ import annotations

import gc
import threading
import time
from typing import Any

import _common as c
import numpy as np

SHAPE = (1, 3, 224, 224)
OUT_MS = 5.0
GROWTH_LIMIT_MB = 10.0


def _rss_mb() -> float:
    import psutil

    return float(psutil.Process().memory_info().rss) / 2**20


def _run(dfp: Any, duration: float, streams: int | None) -> dict[str, Any]:
    from memryx import AsyncAccl, MultiStreamAsyncAccl

    frame = np.ones(SHAPE, np.float32)
    clock = time.perf_counter
    end = [0.0]
    done = [0]

    def input_callback(*stream_idx: int) -> np.ndarray | None:
        now = clock()
        if not end[0]:
            end[0] = now + duration
        return frame if now < end[0] else None

    def output_callback(*outputs: Any) -> None:
        time.sleep(OUT_MS / 1e3)
        done[0] += 1

    gc.collect()
    samples: list[tuple[float, float, int]] = []
    stop = threading.Event()
    if streams is None:
        accl: Any = AsyncAccl(dfp, mode="fast")
    else:
        accl = MultiStreamAsyncAccl(dfp, mode="fast")
    t0 = clock()

    def sample() -> None:
        while not stop.wait(0.25):
            try:
                in_flight = sum(m["in_flight"] for m in accl.statistics()["models"])
            except Exception:
                in_flight = -1
            samples.append((clock() - t0, _rss_mb(), in_flight))

    sampler = threading.Thread(target=sample, name="rss-sampler", daemon=True)
    start_rss = _rss_mb()
    sampler.start()
    if streams is None:
        accl.connect_output(output_callback)
        accl.connect_input(input_callback)
    else:
        accl.connect_streams(input_callback, output_callback, streams)
    accl.wait()
    stop.set()
    sampler.join()
    return {"samples": samples, "frames": done[0], "start_rss": start_rss}


def _analyse(samples: list[tuple[float, float, int]]) -> dict[str, float]:
    """Growth after the pipeline filled: from the plateau at 20-30% of the run to the end."""
    t_end = samples[-1][0]
    early = [r for t, r, _ in samples if 0.2 * t_end <= t <= 0.3 * t_end]
    late = [r for t, r, _ in samples if t >= 0.75 * t_end]
    after = [(t, r) for t, r, _ in samples if t >= 0.2 * t_end]
    slope = float("nan")
    if len(after) >= 3:
        ts, rs = np.array(after).T
        slope = float(np.polyfit(ts, rs, 1)[0]) * 60  # MB per minute
    half = [r for t, r, _ in samples if t >= 0.5 * t_end]
    return {"plateau": c.median(early), "end": max(late), "growth": max(late) - c.median(early),
            "second_half": max(half) - half[0] if half else float("nan"),
            "peak": max(r for _, r, _ in samples), "slope": slope,
            "in_flight_max": max(f for *_, f in samples)}


def run(quick: bool) -> dict[str, Any]:
    from memryx import testing

    duration = 5.0 if quick else 40.0
    dfp = c.compile_dfp(testing.identity_model(SHAPE))
    frame_mb = np.prod(SHAPE) * 4 / 2**20
    rows, goals = [], []
    raw: dict[str, Any] = {}
    for label, streams in (("AsyncAccl", None), ("MultiStreamAsyncAccl, 16 streams", 16)):
        res = _run(dfp, duration, streams)
        a = _analyse(res["samples"])
        raw[label] = {"analysis": a, "frames": res["frames"],
                      "samples": [(round(t, 2), round(r, 1), f) for t, r, f in res["samples"]]}
        passed_gb = res["frames"] * frame_mb / 1024
        rows.append([label, f"{duration:g}", res["frames"], f"{passed_gb:.1f}",
                     c.fmt(res["start_rss"]), c.fmt(a["plateau"]), c.fmt(a["end"]),
                     f"{a['growth']:+.1f}", f"{a['second_half']:+.1f}", f"{a['slope']:+.2f}",
                     a["in_flight_max"]])
        goals.append(c.goal(f"{label}: RSS grows < {GROWTH_LIMIT_MB:g} MB after the pipeline "
                            f"filled", f"{a['growth']:+.1f} MB", a["growth"] < GROWTH_LIMIT_MB,
                            c.excess(a["growth"], GROWTH_LIMIT_MB, lambda x: f"{x:.1f} MB")))
    return c.result(
        "memory", "Memory: RSS over a long run with a slow output callback",
        f"Identity model on `{SHAPE}` float32 frames ({frame_mb:.2f} MB each), `mode=\"fast\"`, "
        f"input as fast as the runtime asks, output callback sleeping {OUT_MS:g} ms per frame, "
        f"{duration:g} s per run (one run each: the run is the repetition). RSS sampled every "
        f"0.25 s; \"plateau\" is the median RSS over 20-30% of the run, \"end\" the largest RSS "
        f"over its last quarter, \"growth\" their difference (the goal), \"second-half growth\" "
        f"the largest RSS of the second half minus its first sample, \"slope\" a linear fit "
        f"of RSS after 20% of the run (early allocator steps weigh on it).",
        tables=[c.table("", ["run", "seconds", "frames out", "GB through", "RSS at start MB",
                             "plateau MB", "end MB", "growth MB", "second-half growth MB",
                             "slope MB/min",
                             "max frames in flight"], rows)],
        goals=goals, raw=raw,
    )


if __name__ == "__main__":
    c.main(run)
