"""memryx.ray: an accelerator pool on a local Ray cluster.

An identity model on a ``(1, 3, 64, 64)`` float32 frame (48 KiB, below Ray's
100 KiB inline limit) compiled with ``fps=`` / ``latency_ms=`` overrides and
run in ``mode="timed"``: each replica is paced by the MX3 timing model, which
leaves the CPUs free, so the numbers show what the pool and Ray add.

* throughput: ``pool.imap`` over a stream of frames with 1, 2 and 4
  replicas (default window: 8 frames in flight per replica), one frame per
  replica call (``chunk=1``, the default) and 8 (``chunk=8``), against a local
  ``SyncAccl.run(batch)`` on the same DFP, interleaved repetition by repetition;
* overhead per frame: one frame at a time, ``pool.run(frame)`` (1 replica)
  against ``SyncAccl.run(frame)``: both wait the modeled latency, the
  difference is what going through Ray costs;
* recovery: 2 replicas, ``imap`` at a steady rate, one replica's process is
  SIGKILLed mid-stream: every frame must come back once and in order; the
  longest gap between two outputs and the time until Ray restarted the
  replica and the pool took it back are measured.
"""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
import time
from collections.abc import Iterator
from typing import Any

import _common as c
import numpy as np

SHAPE = (1, 3, 64, 64)
#: The modeled MX3 rate and latency of one replica.
FPS, LATENCY_MS = 300.0, 5.0
REPLICAS = (1, 2, 4)
#: Frames per replica call: 1 (the default, for live sources) and a chunked run.
CHUNKS = (1, 8)
SCALE_GOAL = 0.8          # N replicas give at least 0.8 x N x one replica
RECOVERY_GOAL_S = 10.0    # the killed replica serves again within this
STALL_GOAL_S = 2.0        # the stream never stops longer than this


def _imap_fps(pool: Any, frames: int, chunk: int) -> float:
    frame = np.zeros(SHAPE, np.float32)
    warm = max(8, frames // 10)
    stamps: list[float] = []
    for _ in pool.imap((frame for _ in range(frames + warm)), chunk=chunk):
        stamps.append(time.perf_counter())
    span = stamps[-1] - stamps[warm]
    return (len(stamps) - 1 - warm) / span


def _sync_fps(accl: Any, frames: int) -> float:
    batch = [np.zeros(SHAPE, np.float32)] * frames
    accl.run(batch[: max(8, frames // 10)])
    t = time.perf_counter()
    accl.run(batch)
    return frames / (time.perf_counter() - t)


def _one_at_a_time_ms(run: Any, frames: int) -> list[float]:
    frame = np.zeros(SHAPE, np.float32)
    for _ in range(5):
        run(frame)
    out = []
    for _ in range(frames):
        t = time.perf_counter()
        run(frame)
        out.append((time.perf_counter() - t) * 1e3)
    return out


def _recovery(ray: Any, dfp: Any, frames: int, rate: float) -> dict[str, Any]:
    from memryx.ray import AcceleratorPool

    with AcceleratorPool(dfp, replicas=2, max_restarts=3) as pool:
        victim = int(pool.statistics()["replicas"][0]["pid"])
        kill_at = frames // 3
        killed_t = [0.0]

        def source() -> Iterator[np.ndarray]:
            period = 1.0 / rate
            nxt = time.perf_counter()
            for i in range(frames):
                if i == kill_at:
                    os.kill(victim, signal.SIGKILL)
                    killed_t[0] = time.perf_counter()
                nxt += period
                delay = nxt - time.perf_counter()
                if delay > 0:
                    time.sleep(delay)
                yield np.full(SHAPE, i, np.float32)

        values: list[int] = []
        stamps: list[float] = []
        back_t = float("nan")
        for out in pool.imap(source()):
            values.append(int(out.flat[0]))
            stamps.append(time.perf_counter())
            if back_t != back_t and killed_t[0] and all(
                    r["state"] == "live" for r in pool.statistics()["replicas"]) and \
                    pool.statistics()["replicas"][0]["faults"] == 1:
                back_t = time.perf_counter()
        # the stream may end before the replica is back: wait for it
        deadline = time.perf_counter() + 30
        while back_t != back_t and time.perf_counter() < deadline:
            pool.run(np.zeros(SHAPE, np.float32))
            stats = pool.statistics()["replicas"]
            if all(r["state"] == "live" for r in stats):
                back_t = time.perf_counter()
            time.sleep(0.02)
        after = [i for i, t in enumerate(stamps) if t >= killed_t[0]]
        gaps = np.diff(stamps[max(0, after[0] - 1):]) if after else np.array([])
        return {"exact": values == list(range(frames)), "received": len(values),
                "sent": frames, "duplicates": len(values) - len(set(values)),
                "stall_s": float(gaps.max()) if gaps.size else float("nan"),
                "back_s": back_t - killed_t[0],
                "resubmitted": pool.statistics()["resubmitted"]}


def run(quick: bool) -> dict[str, Any]:
    title = "Ray pool: replicas on a local Ray cluster"
    about = (f"Identity model, `{SHAPE}` float32 frames, `mode=\"timed\"` with `fps={FPS:g}` "
             f"and `latency_ms={LATENCY_MS:g}` per replica (the timing model paces each "
             "replica and leaves the CPUs free). A local Ray runtime on this machine "
             "(`ray.init(num_cpus=2, resources={'MX3': 4})`): the driver, the replicas and "
             "Ray's own processes share the 2 cores. The reference is a local `SyncAccl` on "
             "the same DFP in the same run.")
    try:
        import ray

        from memryx.ray import AcceleratorPool
    except ImportError as exc:
        why = f"SKIPPED: Ray not installed ({exc}); pip install -e '.[ray]'"
        return c.result("ray", title, about, goals=[c.goal("scaling", "not measured", None, why)],
                        notes=[why])
    from memryx import SyncAccl, testing

    dfp = c.compile_dfp(testing.identity_model(SHAPE), fps=FPS, latency_ms=LATENCY_MS)
    frames, reps, single = (300, 1, 50) if quick else (1000, 3, 200)
    temp_dir = tempfile.mkdtemp(prefix="mxbench", dir="/tmp")
    ray.init(address="local", num_cpus=2, resources={"MX3": max(REPLICAS)},
             include_dashboard=False, log_to_driver=False, _temp_dir=temp_dir)
    raw: dict[str, Any] = {}
    try:
        fps: dict[tuple[int, int], list[float]] = {(n, k): [] for n in REPLICAS
                                                    for k in CHUNKS}
        ref: list[float] = []
        with SyncAccl(dfp) as accl:
            pools: dict[int, Any] = {}
            try:
                for _ in range(reps):
                    ref.append(_sync_fps(accl, frames))
                    for n in REPLICAS:
                        if n not in pools:
                            for p in pools.values():
                                p.close()
                            pools = {n: AcceleratorPool(dfp, replicas=n)}
                        for k in CHUNKS:
                            fps[(n, k)].append(_imap_fps(pools[n], frames * n, k))
                for p in pools.values():
                    p.close()
                pools = {1: AcceleratorPool(dfp, replicas=1)}
                sync_ms = _one_at_a_time_ms(accl.run, single)
                pool_ms = _one_at_a_time_ms(pools[1].run, single)
            finally:
                for p in pools.values():
                    p.close()
        recovery = _recovery(ray, dfp, 600 if quick else 1500, rate=0.8 * 2 * FPS)
    finally:
        ray.shutdown()
        shutil.rmtree(temp_dir, ignore_errors=True)
    raw.update(fps={f"{n} replicas, chunk {k}": v for (n, k), v in fps.items()},
               reference_fps=ref, recovery=recovery,
               one_frame_ms={name: {f"p{q}": c.percentile(v, q) for q in (50, 90, 99)}
                             for name, v in (("sync", sync_ms), ("pool", pool_ms))})

    ref_fps = c.median(ref)
    rows = [["local SyncAccl.run(batch) (reference)", "-", c.fmt(ref_fps), c.spread(ref),
             "1.00x", "-"]]
    goals = []
    for k in CHUNKS:
        one = c.median(fps[(1, k)])
        for n in REPLICAS:
            got = c.median(fps[(n, k)])
            eff = got / (n * one)
            rows.append([f"pool.imap, {n} replica{'s' if n > 1 else ''}", str(k), c.fmt(got),
                         c.spread(fps[(n, k)]), c.ratio(got / ref_fps), f"{eff:.2f}"])
            if n > 1:
                goals.append(c.goal(
                    f"chunk={k}: {n} replicas >= {SCALE_GOAL} x {n} x one replica",
                    f"{got:.0f} vs {n} x {one:.0f} ({eff:.2f})", eff >= SCALE_GOAL,
                    c.shortfall(got, SCALE_GOAL * n * one)))
    p50_sync, p50_pool = c.percentile(sync_ms, 50), c.percentile(pool_ms, 50)
    p99_sync, p99_pool = c.percentile(sync_ms, 99), c.percentile(pool_ms, 99)
    overhead = p50_pool - p50_sync
    exact = recovery["exact"] and recovery["duplicates"] == 0
    goals += [
        c.goal("a replica SIGKILLed mid-stream: every frame once, in order",
               f"{recovery['received']}/{recovery['sent']} in order, "
               f"{recovery['duplicates']} duplicated, {recovery['resubmitted']} resubmitted",
               exact, "frames lost, duplicated or out of order"),
        c.goal(f"the stream stalls at most {STALL_GOAL_S:g} s after the kill",
               f"{recovery['stall_s']:.2f} s", recovery["stall_s"] <= STALL_GOAL_S,
               c.excess(recovery["stall_s"], STALL_GOAL_S)),
        c.goal(f"the killed replica serves again within {RECOVERY_GOAL_S:g} s",
               f"{recovery['back_s']:.2f} s", recovery["back_s"] <= RECOVERY_GOAL_S,
               c.excess(recovery["back_s"], RECOVERY_GOAL_S)),
    ]
    tables = [
        c.table("Throughput (frames/s, median of repetitions)",
                ["configuration", "frames per call", "frames/s", "range", "vs reference",
                 "scaling efficiency (vs 1 replica, same chunk)"],
                rows),
        c.table("One frame at a time (round trip, ms)",
                ["path", "p50", "p99", "overhead vs SyncAccl (p50)"],
                [["SyncAccl.run(frame) (reference)", c.fmt(p50_sync), c.fmt(p99_sync), "-"],
                 ["pool.run(frame), 1 replica", c.fmt(p50_pool), c.fmt(p99_pool),
                  f"{overhead:+.2f} ms"]]),
        c.table("Recovery after a replica's process is killed (2 replicas, "
                f"input at {0.8 * 2 * FPS:g} frames/s)",
                ["frames in / out", "in order, once", "longest output gap",
                 "replica back after", "frames resubmitted"],
                [[f"{recovery['sent']} / {recovery['received']}", "yes" if exact else "NO",
                  f"{recovery['stall_s']:.2f} s", f"{recovery['back_s']:.2f} s",
                  str(recovery["resubmitted"])]]),
    ]
    notes = [f"{reps} repetition(s) of {frames} x N frames per configuration; one-frame "
             f"latency over {single} frames.",
             "Machine: the 2-core development VM, shared with other work while measuring "
             "(see the load average in the raw record)."]
    raw["load_average_at_end"] = list(os.getloadavg())
    return c.result("ray", title, about, tables=tables, goals=goals, notes=notes, raw=raw)


if __name__ == "__main__":
    c.main(run)
