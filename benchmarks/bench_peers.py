"""Peers: memryx ("as fast as host") against plain onnxruntime and OpenVINO, same models.

Every runner gets the same thread budget (``BUDGET`` = the machine's cores)
for inference, runs the same ONNX model on the same frame for a set time, and
stamps each frame when it is handed over and when its outputs reach the
application:

* onnxruntime, plain loop: one session with ``intra_op_num_threads=BUDGET``,
  ``session.run`` in a loop;
* onnxruntime in threads: ``BUDGET`` Python threads sharing one session with
  one intra-op thread each;
* OpenVINO ``AsyncInferQueue``: ``compile_model(onnx, "CPU")`` with
  ``INFERENCE_NUM_THREADS=BUDGET`` and the THROUGHPUT hint, as many infer
  requests as it calls optimal, an output callback that copies the output;
* memryx ``AsyncAccl(dfp, mode="fast")`` (``concurrency=BUDGET`` sessions of one
  intra-op thread each), plain input / output callbacks;
* memryx ``astream`` on an asyncio (uvloop) app loop.
"""

from __future__ import annotations

import os
import tempfile
import threading
import time
from collections.abc import Callable
from functools import partial
from typing import Any

import _common as c
import numpy as np

BUDGET = os.cpu_count() or 1


def _ort_session(model_bytes: bytes, threads: int) -> Any:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    return ort.InferenceSession(model_bytes, opts, providers=["CPUExecutionProvider"])


def ort_loop(model_bytes: bytes, frame: np.ndarray, duration: float) -> c.Stamps:
    session = _ort_session(model_bytes, BUDGET)
    name = session.get_inputs()[0].name
    stamps = c.Stamps()
    clock = time.perf_counter
    session.run(None, {name: frame})
    end = clock() + duration
    while (t := clock()) < end:
        stamps.t_in.append(t)
        session.run(None, {name: frame})
        stamps.t_out.append(clock())
    return stamps


def ort_threads(model_bytes: bytes, frame: np.ndarray, duration: float) -> c.Stamps:
    session = _ort_session(model_bytes, 1)
    name = session.get_inputs()[0].name
    session.run(None, {name: frame})
    clock = time.perf_counter
    pairs: list[list[tuple[float, float]]] = [[] for _ in range(BUDGET)]
    end = clock() + duration

    def worker(out: list[tuple[float, float]]) -> None:
        while (t := clock()) < end:
            session.run(None, {name: frame})
            out.append((t, clock()))

    threads = [threading.Thread(target=worker, args=(p,)) for p in pairs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    merged = sorted((p for ps in pairs for p in ps), key=lambda p: p[1])
    stamps = c.Stamps()
    stamps.t_in = [p[0] for p in merged]
    stamps.t_out = [p[1] for p in merged]
    return stamps


class _OpenVino:
    def __init__(self, model_bytes: bytes) -> None:
        import openvino as ov

        with tempfile.NamedTemporaryFile(suffix=".onnx", delete=False) as f:
            f.write(model_bytes)
            self.path = f.name
        self.compiled = ov.Core().compile_model(self.path, "CPU", {
            "INFERENCE_NUM_THREADS": BUDGET, "PERFORMANCE_HINT": "THROUGHPUT"})
        self.jobs = int(self.compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS"))
        os.unlink(self.path)

    def run(self, frame: np.ndarray, duration: float) -> c.Stamps:
        import openvino as ov

        queue = ov.AsyncInferQueue(self.compiled, self.jobs)
        clock = time.perf_counter
        t_in: list[float] = []
        t_out: dict[int, float] = {}

        def callback(request: Any, i: int) -> None:
            request.get_output_tensor(0).data.copy()
            t_out[i] = clock()

        queue.set_callback(callback)
        end = clock() + duration
        i = 0
        while (t := clock()) < end:
            t_in.append(t)
            queue.start_async({0: frame}, i)
            i += 1
        queue.wait_all()
        order = sorted(range(i), key=lambda k: t_out[k])
        stamps = c.Stamps()
        stamps.t_in = [t_in[k] for k in order]
        stamps.t_out = [t_out[k] for k in order]
        return stamps


def memryx_async_accl(dfp: Any, frame: np.ndarray, duration: float) -> c.Stamps:
    from memryx import AsyncAccl

    stamps = c.Stamps()
    accl = AsyncAccl(dfp, mode="fast", concurrency=BUDGET)
    accl.connect_output(c.sink(stamps))
    accl.connect_input(c.feeder(frame, duration, stamps))
    accl.wait()
    return stamps


def memryx_astream(dfp: Any, frame: np.ndarray, duration: float) -> c.Stamps:
    from memryx import AsyncAccl

    stamps = c.Stamps()
    clock = time.perf_counter

    async def frames() -> Any:
        end = clock() + duration
        while clock() < end:
            stamps.t_in.append(clock())
            yield frame

    async def main() -> None:
        async with AsyncAccl(dfp, mode="fast", concurrency=BUDGET) as accl:
            async for _ in accl.astream(frames(), window=16):
                stamps.t_out.append(clock())

    c.loop_runner()(main())
    return stamps


def run(quick: bool) -> dict[str, Any]:
    from memryx import testing

    duration, reps, warmup = (0.6, 1, 0.1) if quick else (2.5, 3, 0.3)
    models: list[tuple[str, Any]] = [("tiny: mlp_model() 16-32-10", testing.mlp_model())]
    if quick:
        models.append(("mobilenet_like(input_size=224)", testing.mobilenet_like(224)))
    else:
        models.append(("MobileNetV1 224x224 (mobilenet_v1())", testing.mobilenet_v1(224)))
    try:
        import openvino  # noqa: F401

        have_ov = True
    except ImportError:
        have_ov = False

    rows: list[list[str]] = []
    raw: dict[str, Any] = {}
    summary: list[str] = []
    for label, model in models:
        mb = testing.model_bytes(model)
        dfp = c.compile_dfp(model)
        shape = dfp.model(0).inputs[0].shape
        frame = np.random.default_rng(0).random(shape, dtype=np.float32)
        runners: dict[str, Callable[[], c.Stamps]] = {
            "onnxruntime, plain loop": partial(ort_loop, mb, frame, duration),
            f"onnxruntime, {BUDGET} threads": partial(ort_threads, mb, frame, duration),
        }
        if have_ov:
            ov_runner = _OpenVino(mb)
            runners[f"OpenVINO AsyncInferQueue ({ov_runner.jobs} requests)"] = \
                partial(ov_runner.run, frame, duration)
        runners["memryx AsyncAccl, fast mode"] = partial(memryx_async_accl, dfp, frame, duration)
        runners["memryx astream (asyncio), fast mode"] = \
            partial(memryx_astream, dfp, frame, duration)
        fps: dict[str, list[float]] = {k: [] for k in runners}
        p50: dict[str, list[float]] = {k: [] for k in runners}
        p99: dict[str, list[float]] = {k: [] for k in runners}
        for _ in range(reps):
            for key, fn in runners.items():
                s = fn()
                fps[key].append(s.fps(warmup))
                la = s.latency(warmup)
                p50[key].append(c.percentile(la, 50))
                p99[key].append(c.percentile(la, 99))
        raw[label] = {"fps": fps, "p50": p50, "p99": p99}
        best = max(c.median(v) for v in fps.values())
        for key in runners:
            f = c.median(fps[key])
            rows.append([label, key, c.fmt(f), c.ratio(f / best), c.fmt(c.median(p50[key])),
                         c.fmt(c.median(p99[key])), c.spread(fps[key])])
        mx = c.median(fps["memryx AsyncAccl, fast mode"])
        ort = c.median(fps["onnxruntime, plain loop"])
        summary.append(f"{label}: memryx AsyncAccl at {c.ratio(mx / ort)} of the plain "
                       f"onnxruntime loop, {c.ratio(mx / best)} of the fastest runner.")
    notes = [
        *summary,
        "No pass/fail goal: the peers are the reference. \"vs fastest\" is each runner's "
        "frames/s over the fastest runner's on the same model.",
        "Latency: from handing the frame over (the input callback's return, `session.run` / "
        "`start_async` call, the astream source yielding) to its outputs reaching the "
        "application; it includes waiting in each runner's own queues.",
    ]
    if not have_ov:
        notes.append("OpenVINO not installed (`pip install -e '.[bench]'`): its rows are missing.")
    return c.result(
        "peers", "Peers: onnxruntime and OpenVINO, same model, same thread budget",
        f"Each runner gets {BUDGET} inference threads, runs the same ONNX model on the same "
        f"random frame for {duration:g} s; steady-state frames/s (first {warmup:g} s dropped), "
        f"median of {reps} interleaved repetitions.",
        tables=[c.table("", ["model", "runner", "frames/s", "vs fastest", "p50 latency ms",
                             "p99 latency ms", "frames/s min-max"], rows)],
        notes=notes, raw=raw,
    )


if __name__ == "__main__":
    c.main(run)
