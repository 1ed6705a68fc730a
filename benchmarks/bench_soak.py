"""Soak: a million frames through several streams and models, nothing lost.

The long variant of ``tests/reliability/test_soak.py``: MultiStreamAsyncAccl on
a three-model DFP (identity-like graphs in ``mode="fast"``), 8 streams per
model, every frame carrying (model, stream, sequence number) in its values, and
at the same time ``SyncAccl.run`` batches on a second accelerator. At the end
every stream must have received every frame exactly once and in order, and
the process's threads, fds and RSS must be back near their baseline.
"""

from __future__ import annotations

import os
import threading
import time
from typing import Any

import _common as c
import numpy as np

STREAMS = 8
MODELS = 3


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def run(quick: bool) -> dict[str, Any]:
    import memryx as mx
    from memryx import testing

    total = 60_000 if quick else 1_000_000
    per_stream = total // (MODELS * STREAMS)
    dfp = mx.NeuralCompiler(models=[testing.identity_model((1, 4)) for _ in range(MODELS)]).run()
    batch_dfp = mx.NeuralCompiler(models=testing.identity_model((1, 4))).run()
    with mx.SyncAccl(batch_dfp) as warm:  # once-per-process resources (uvloop's pipe, ...)
        warm.run(np.zeros((1, 4), np.float32))
    threads0, fds0, rss0 = threading.active_count(), len(os.listdir("/proc/self/fd")), _rss_mb()

    sent = np.zeros((MODELS, STREAMS), np.int64)
    expect = np.zeros((MODELS, STREAMS), np.int64)  # the next index each stream should see
    calls = np.zeros((MODELS, STREAMS), np.int64)   # outputs delivered, counted one by one
    wrong_count = [0]                               # every output that was not the expected one
    problems: list[str] = []                        # the first few of them, described

    def source(m: int) -> Any:
        def src(s: int) -> np.ndarray | None:
            i = sent[m, s]
            if i >= per_stream:
                return None
            sent[m, s] += 1
            return np.array([[m, s, i // 65536, i % 65536]], np.float32)
        return src

    def sink(m: int) -> Any:
        def out(s: int, y: np.ndarray) -> None:
            i = int(y[0, 2]) * 65536 + int(y[0, 3])
            calls[m, s] += 1
            wrong = int(y[0, 0]) != m or int(y[0, 1]) != s or i != expect[m, s]
            if wrong:
                wrong_count[0] += 1
                if len(problems) < 10:
                    problems.append(f"model {m} stream {s}: got {y.tolist()}, "
                                    f"expected #{expect[m, s]}")
            expect[m, s] = i + 1
        return out

    batches = [0]
    stop_batches = threading.Event()

    def batch_worker() -> None:
        with mx.SyncAccl(batch_dfp, mode="fast") as accl:
            xs = [np.full((1, 4), k, np.float32) for k in range(64)]
            while not stop_batches.is_set():
                outs = accl.run(xs)
                if [int(o[0, 0]) for o in outs] != list(range(64)):
                    wrong_count[0] += 1
                    if len(problems) < 10:
                        problems.append("a SyncAccl.run batch came back wrong")
                batches[0] += 1

    worker = threading.Thread(target=batch_worker)
    start = time.monotonic()
    worker.start()
    accl = mx.MultiStreamAsyncAccl(dfp, mode="fast")
    try:
        for m in range(MODELS):
            accl.connect_streams(source(m), sink(m), STREAMS, model_idx=m)
        accl.wait()
    finally:
        accl.close()
        stop_batches.set()
        worker.join(60)
    elapsed = time.monotonic() - start
    delivered = int(calls.sum())
    time.sleep(0.5)
    threads1, fds1, rss1 = threading.active_count(), len(os.listdir("/proc/self/fd")), _rss_mb()

    lost = MODELS * STREAMS * per_stream - delivered  # negative: duplicates
    goals = [
        c.goal(f"{MODELS * STREAMS * per_stream:,} frames: none lost, duplicated or reordered",
               f"{delivered:,} delivered, {lost} missing, {wrong_count[0]} out of order",
               lost == 0 and wrong_count[0] == 0,
               "; ".join(problems[:3]) or f"{lost} lost"),
        c.goal("threads and fds back to their baseline after close",
               f"threads {threads0} -> {threads1}, fds {fds0} -> {fds1}",
               threads1 <= threads0 and fds1 <= fds0, "resources left behind"),
    ]
    rows = [[f"{delivered:,}", f"{batches[0] * 64:,}", f"{elapsed:.1f}",
             f"{delivered / elapsed:,.0f}", f"{rss0:.0f} -> {rss1:.0f}"]]
    return c.result(
        "soak", "Soak: a million frames, several streams and models",
        f"MultiStreamAsyncAccl, {MODELS} models x {STREAMS} streams, `mode=\"fast\"`, plus "
        "SyncAccl.run batches of 64 on a second accelerator at the same time.",
        tables=[c.table("run", ["stream frames", "batch frames", "seconds", "frames/s",
                                "RSS MB before -> after"], rows)],
        goals=goals, raw={"delivered": delivered, "lost": lost, "out_of_order": wrong_count[0],
             "first_problems": problems})


if __name__ == "__main__":
    c.main(run)
