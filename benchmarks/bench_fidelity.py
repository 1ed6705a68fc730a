"""Fidelity of the timed mode: does the runtime reach the modeled fps and latency?

An identity model compiled with ``fps=`` / ``latency_ms=`` overrides (the
figures MemryX publishes for three networks on a 4-chip MX3) runs in
``mode="timed"`` with cheap callbacks, so the timing model, not the host's
compute, sets the pace:

* throughput: the input callback returns frames as fast as it is asked; the
  steady-state output rate should be the modeled fps;
* latency: the input callback paces frames at half the modeled rate (at most
  200/s), so no frame waits for another; the time from the input callback's
  return to the output callback's call should be the modeled latency.
"""

from __future__ import annotations

from typing import Any

import _common as c
import numpy as np

SHAPE = (1, 16)
#: (label, fps, latency ms): MemryX's published 4-chip MX3 figures (the latency
#: of the last two is the timing model's estimate for those networks).
CONFIGS = [
    ("MobileNetV1-like", 1583.0, 1.8),
    ("ResNet50-like", 992.0, 3.0),
    ("YOLOv7-tiny-like", 404.0, 5.0),
]
FPS_TOL, LAT_TOL = 0.02, 0.05


def _run(dfp: Any, duration: float, rate: float | None, mode: str = "timed"
         ) -> tuple[c.Stamps, dict[str, Any]]:
    from memryx import AsyncAccl

    stamps = c.Stamps()
    frame = np.zeros(SHAPE, np.float32)
    accl = AsyncAccl(dfp, mode=mode)
    accl.connect_output(c.sink(stamps))
    accl.connect_input(c.feeder(frame, duration, stamps) if rate is None
                       else c.paced_feeder(frame, rate, duration, stamps))
    accl.wait()
    dev = accl.statistics().get("device", {}).get("models", [{}])[0]
    return stamps, dev


def run(quick: bool) -> dict[str, Any]:
    from memryx import testing

    available, why = c.timed_mode()
    title = "Timed-mode fidelity: modeled fps and latency"
    about = (f"Identity model on a `{SHAPE}` float32 frame compiled with `fps=` / `latency_ms=` "
             "overrides, `mode=\"timed\"`, callbacks that only stamp the time. Throughput: input "
             "as fast as the runtime asks, steady-state output rate. Latency: input paced at half "
             "the modeled rate (at most 200 frames/s), p50 of input callback return -> output "
             "callback call.")
    if not available:
        return c.result("fidelity", title, about, goals=[
            c.goal(f"frames/s within {FPS_TOL:.0%} of the modeled fps", "not measured", None,
                   f"SKIPPED: {why}"),
            c.goal(f"latency within {LAT_TOL:.0%} of the modeled latency", "not measured", None,
                   f"SKIPPED: {why}")], notes=[f"SKIPPED: {why}"])

    configs = CONFIGS[1:2] if quick else CONFIGS
    duration, reps, warmup = (1.0, 1, 0.2) if quick else (3.0, 3, 0.4)
    model = testing.identity_model(SHAPE)
    rows = []
    goals = []
    raw: dict[str, Any] = {}
    for label, fps, lat_ms in configs:
        dfp = c.compile_dfp(model, fps=fps, latency_ms=lat_ms)
        got_fps, got_p50, got_p99, sat_p50, late, dev_p50, host_p50 = [], [], [], [], [], [], []
        for _ in range(reps):
            stamps, dev = _run(dfp, duration, None)
            got_fps.append(stamps.fps(warmup))
            sat_p50.append(c.percentile(stamps.latency(warmup), 50))
            late.append(dev.get("late_frames", float("nan")))
            stamps, dev = _run(dfp, duration, min(fps / 2, 200.0))
            la = stamps.latency(warmup)
            got_p50.append(c.percentile(la, 50))
            got_p99.append(c.percentile(la, 99))
            dev_p50.append(float((dev.get("device_latency_ms") or {}).get("p50", float("nan"))))
            # the same paced frames with the device as fast as the host: the host's own path
            stamps, _ = _run(dfp, duration, min(fps / 2, 200.0), mode="fast")
            host_p50.append(c.percentile(stamps.latency(warmup), 50))
        f, p50, p99 = c.median(got_fps), c.median(got_p50), c.median(got_p99)
        raw[label] = {"fps": got_fps, "p50": got_p50, "p99": got_p99, "late": late,
                      "device_p50": dev_p50, "host_path_p50": host_p50}
        rows.append([label, c.fmt(fps), c.fmt(f), f"{(f / fps - 1) * 100:+.1f}%",
                     c.fmt(lat_ms), c.fmt(p50), f"{(p50 / lat_ms - 1) * 100:+.1f}%",
                     c.fmt(p99), c.fmt(c.median(dev_p50)), c.fmt(c.median(host_p50)),
                     c.fmt(c.median(sat_p50)), c.fmt(c.median(late))])
        fps_err = abs(f / fps - 1)
        lat_err = abs(p50 / lat_ms - 1)
        goals.append(c.goal(f"{label}: frames/s within {FPS_TOL:.0%} of {c.fmt(fps)}",
                            f"{c.fmt(f)} ({(f / fps - 1) * 100:+.1f}%)", fps_err <= FPS_TOL,
                            f"off by {fps_err * 100:.1f}% (allowed {FPS_TOL:.0%}); "
                            f"{abs(f - fps):.0f} frames/s"))
        goals.append(c.goal(f"{label}: p50 latency within {LAT_TOL:.0%} of {c.fmt(lat_ms)} ms",
                            f"{c.fmt(p50)} ms ({(p50 / lat_ms - 1) * 100:+.1f}%)",
                            lat_err <= LAT_TOL,
                            f"off by {lat_err * 100:.1f}% (allowed {LAT_TOL:.0%}); "
                            f"{(p50 - lat_ms) * 1e3:+.0f} us"))
    return c.result(
        "fidelity", title, about + f" {duration:g} s per run, median of {reps}.",
        tables=[c.table("", ["modeled on", "modeled fps", "frames/s", "error",
                             "modeled latency ms", "p50 latency ms", "error", "p99 latency ms",
                             "device-reported p50 ms", "host path p50 ms (fast mode)",
                             "p50 latency ms, saturated", "late frames (device)"], rows)],
        goals=goals, raw=raw,
        notes=["Information, not goals: \"device-reported p50\" is the simulated device's own "
               "latency (chip entry to output, `statistics()[\"device\"]`); \"host path p50 "
               "(fast mode)\" is the same paced run with `mode=\"fast\"`, i.e. the time the "
               "runtime itself adds around an instant device; \"p50 latency ms, saturated\" "
               "is measured in the throughput runs, where frames also wait in the bounded "
               "buffers."],
    )


if __name__ == "__main__":
    c.main(run)
