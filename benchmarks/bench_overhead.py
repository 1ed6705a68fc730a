"""Runtime overhead: a null (identity) model through AsyncAccl, "as fast as host".

The reference is the same hand-offs done by hand: three plain threads joined by
``queue.Queue`` (input callback -> "device" -> output callback), the device
thread running the same ONNX identity model with onnxruntime, the same way the
simulated device does (one ``InferenceSession``, one intra-op thread). Its
queues are as deep as the runtime's frame budget for this model (read from
``statistics()``), so neither side buffers more than the other; a shallow
reference (``maxsize=4``) is shown for information. Both run the very same input
and output callbacks, in the same process, interleaved repetition by repetition.

The unpaced modes' default device queues are 16 frames each way (like the vendor
scheduler's input queue; 4 until 2026-11-30): for information, the runtime with
``queue_depth=4`` is shown beside a reference as deep as that smaller budget.
"""

from __future__ import annotations

import queue
import threading
import time
from typing import Any

import _common as c
import numpy as np

SHAPE = (1, 16)
#: The informational shallow reference's queue depth.
SHALLOW_QUEUE_DEPTH = 4
#: The device queue depth of the informational shallow-budget rows (the former default).
SHALLOW_DEVICE_QUEUE = 4
#: Frames/s of the paced (camera-like) source of the latency table.
PACED_RATE = 100.0


def _session(model_bytes: bytes) -> Any:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    return ort.InferenceSession(model_bytes, opts, providers=["CPUExecutionProvider"])


def _input(frame: np.ndarray, duration: float, stamps: c.Stamps, rate: float | None) -> Any:
    if rate is None:
        return c.feeder(frame, duration, stamps)
    return c.paced_feeder(frame, rate, duration, stamps)


def frame_budget(dfp: Any, **options: Any) -> int:
    """The runtime's in-flight bound for model 0 in ``mode="fast"`` (from statistics())."""
    from memryx import SyncAccl

    with SyncAccl(dfp, mode="fast", **options) as accl:
        return int(accl.statistics()["models"][0]["frame_budget"])


def run_reference(session: Any, frame: np.ndarray, duration: float,
                  depth: int, rate: float | None = None) -> c.Stamps:
    """input thread -> Queue -> device thread (onnxruntime) -> Queue -> output thread."""
    stamps = c.Stamps()
    produce = _input(frame, duration, stamps, rate)
    consume = c.sink(stamps)
    to_device: queue.Queue[Any] = queue.Queue(depth)
    to_output: queue.Queue[Any] = queue.Queue(depth)
    name = session.get_inputs()[0].name

    def input_stage() -> None:
        while (f := produce()) is not None:
            to_device.put(np.array(f, copy=True))  # the runtime copies each frame it accepts
        to_device.put(None)

    def device_stage() -> None:
        while (f := to_device.get()) is not None:
            to_output.put(session.run(None, {name: f}))
        to_output.put(None)

    def output_stage() -> None:
        while (outs := to_output.get()) is not None:
            consume(*outs)

    threads = [threading.Thread(target=f, name=f"ref-{f.__name__}")
               for f in (input_stage, device_stage, output_stage)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return stamps


def run_async_accl(dfp: Any, frame: np.ndarray, duration: float, rate: float | None = None,
                   **options: Any) -> c.Stamps:
    from memryx import AsyncAccl

    stamps = c.Stamps()
    accl = AsyncAccl(dfp, mode="fast", **options)
    accl.connect_output(c.sink(stamps))
    accl.connect_input(_input(frame, duration, stamps, rate))
    accl.wait()
    return stamps


def run_async_callbacks(dfp: Any, frame: np.ndarray, duration: float) -> c.Stamps:
    """``async def`` callbacks on the app's loop: no thread hop for the callbacks."""
    return c.run_async_callbacks(dfp, frame, duration, mode="fast")


def run_sync_batch(dfp: Any, frame: np.ndarray, n: int) -> float:
    from memryx import SyncAccl

    with SyncAccl(dfp, mode="fast") as accl:
        batch = [frame] * n
        t = time.perf_counter()
        accl.run(batch)
        return n / (time.perf_counter() - t)


def run(quick: bool) -> dict[str, Any]:
    from memryx import testing

    duration, reps, warmup = (0.6, 2, 0.1) if quick else (2.0, 5, 0.25)
    paced_s = 1.0 if quick else 2.0
    model = testing.identity_model(SHAPE)
    dfp = c.compile_dfp(model)
    session = _session(testing.model_bytes(model))
    frame = np.zeros(SHAPE, np.float32)
    depth = frame_budget(dfp)
    small = frame_budget(dfp, queue_depth=SHALLOW_DEVICE_QUEUE)

    variants: dict[str, Any] = {
        f"reference: 3 threads + queue.Queue(maxsize={depth}), the frame budget":
            lambda: run_reference(session, frame, duration, depth),
        f"shallow reference, maxsize={SHALLOW_QUEUE_DEPTH} (information)":
            lambda: run_reference(session, frame, duration, SHALLOW_QUEUE_DEPTH),
        "AsyncAccl, plain callbacks (default options)":
            lambda: run_async_accl(dfp, frame, duration),
        "AsyncAccl, plain callbacks, concurrency=1":
            lambda: run_async_accl(dfp, frame, duration, concurrency=1),
        "AsyncAccl, async def callbacks on the app loop":
            lambda: run_async_callbacks(dfp, frame, duration),
        f"reference, maxsize={small} (information: the budget below)":
            lambda: run_reference(session, frame, duration, small),
        f"AsyncAccl, plain callbacks, queue_depth={SHALLOW_DEVICE_QUEUE} (information: "
        f"budget {small})":
            lambda: run_async_accl(dfp, frame, duration, queue_depth=SHALLOW_DEVICE_QUEUE),
    }
    paced = {
        "reference: 3 threads + queue.Queue":
            lambda: run_reference(session, frame, paced_s, depth, rate=PACED_RATE),
        "AsyncAccl, plain callbacks":
            lambda: run_async_accl(dfp, frame, paced_s, rate=PACED_RATE),
    }
    lat_paced: dict[str, list[list[float]]] = {k: [] for k in paced}
    fps: dict[str, list[float]] = {k: [] for k in variants}
    lat: dict[str, list[list[float]]] = {k: [] for k in variants}
    cpu: dict[str, list[float]] = {k: [] for k in variants}
    sync_fps: list[float] = []
    batch_n = 500
    for _ in range(reps):  # interleaved, so drifts in machine load hit every variant alike
        for key, fn in variants.items():
            stamps = fn()
            fps[key].append(stamps.fps(warmup))
            lat[key].append(stamps.latency(warmup))
            cpu[key].append(stamps.cpu_us_per_frame(warmup))
        sync_fps.append(run_sync_batch(dfp, frame, batch_n))
        # size the next batch to take about ``duration``
        batch_n = max(200, int(sync_fps[-1] * duration))
        for key, fn in paced.items():
            stamps = fn()
            lat_paced[key].append(stamps.latency(warmup))

    ref_key = next(iter(variants))
    ref = c.median(fps[ref_key])
    rows = []
    for key in variants:
        f = c.median(fps[key])
        p50 = c.median([c.percentile(x, 50) for x in lat[key]])
        p99 = c.median([c.percentile(x, 99) for x in lat[key]])
        rows.append([key, c.fmt(f), c.ratio(f / ref), c.fmt(c.median(cpu[key])), c.fmt(p50),
                     c.fmt(p99), c.spread(fps[key])])
    s = c.median(sync_fps)
    rows.append(["SyncAccl.run(batch)", c.fmt(s), c.ratio(s / ref), "n/a", "n/a", "n/a",
                 c.spread(sync_fps)])

    paced_rows = []
    for key in paced:
        paced_rows.append([key, c.fmt(c.median([c.percentile(x, 50) for x in lat_paced[key]])),
                           c.fmt(c.median([c.percentile(x, 99) for x in lat_paced[key]])),
                           c.fmt(c.median([max(x) if x else float("nan")
                                           for x in lat_paced[key]]))])
    main_key = "AsyncAccl, plain callbacks (default options)"
    main_fps = c.median(fps[main_key])
    async_key = "AsyncAccl, async def callbacks on the app loop"
    async_fps = c.median(fps[async_key])
    goals = [
        c.goal("AsyncAccl, plain callbacks >= 1.0x the reference", c.ratio(main_fps / ref),
               main_fps / ref >= 1.0, c.shortfall(main_fps / ref, 1.0, c.ratio)),
        c.goal("AsyncAccl, async def callbacks >= 2.5x the reference",
               c.ratio(async_fps / ref), async_fps / ref >= 2.5,
               c.shortfall(async_fps / ref, 2.5, c.ratio)),
    ]
    return c.result(
        "overhead", "Runtime overhead: null model, as fast as host",
        f"An identity model on a `{SHAPE}` float32 frame, simulated device in `mode=\"fast\"`; "
        f"the input callback returns the same frame for {duration:g} s, the output callback "
        f"only stamps the time. Reference: the same callbacks on three plain threads joined by "
        f"`queue.Queue(maxsize={depth})`, as deep as the runtime's frame budget for this model "
        f"(`statistics()[\"models\"][0][\"frame_budget\"]`), the middle thread running the "
        f"same ONNX model with onnxruntime; a shallow `maxsize={SHALLOW_QUEUE_DEPTH}` reference "
        f"for information, and the runtime with `queue_depth={SHALLOW_DEVICE_QUEUE}` (a frame "
        f"budget of {small}, the unpaced modes' default until 2026-11-30) beside a reference "
        f"that deep. Frames/s in steady state "
        f"(first {warmup:g} s dropped), median of {reps} interleaved repetitions; latency from "
        f"the input callback's return to the output callback's call.",
        tables=[c.table("", ["variant", "frames/s", "vs reference", "CPU us per frame",
                             "p50 latency ms", "p99 latency ms", "frames/s min-max"], rows),
                c.table(f"Latency with a paced, camera-like source ({PACED_RATE:g} frames/s, "
                        f"{paced_s:g} s, same model and device; information, no goal)",
                        ["pipeline", "p50 latency ms", "p99 latency ms", "max latency ms"],
                        paced_rows)],
        goals=goals,
        notes=["\"CPU us per frame\": CPU time of the whole process (all threads) per frame in "
               "steady state; on this 2-core machine 500 us/frame of CPU caps any runtime at "
               "4,000 frames/s."],
        raw={"fps": fps, "sync_fps": sync_fps, "cpu_us_per_frame": cpu, "frame_budget": depth,
             "shallow_frame_budget": small},
    )


if __name__ == "__main__":
    c.main(run)
