"""Where a paced frame's host CPU goes (a tool for issue 17, not a benchmark of the suite).

Runs the test model ``testing.mobilenet_like()`` through ``AsyncAccl`` as
``bench_modes.py`` does (plain input callback looping over 8 frames, plain output
callback stamping the time) in the given modes, and reports per mode:

* frames/s and its ratio to the modeled rate, the process CPU per frame;
* the CPU per frame of each thread (``pthread_getcpuclockid``: exact, no profiler);
* with ``--count``: hops per frame (cross-thread wake-ups of the loop, device
  submits, release wake-ups, output batches, input batches), counted by wrapping the
  runtime's functions in a second run (so not timed);
* with ``--yappi``: the top functions by CPU time (yappi, per thread), in a third run.

    python benchmarks/_profile_modes.py [--modes reuse,sampled,shapes] [--seconds 4]
        [--count] [--yappi]
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _common  # noqa: F401 - pins the BLAS thread pools before numpy
import numpy as np

DISTINCT = 8


def _thread_group(name: str) -> str:
    for prefix in ("memryx-input", "memryx-output", "memryx-runner", "memryx-sim-release",
                   "AnyIO worker thread"):
        if name.startswith(prefix):
            return prefix
    return name


class ThreadClock:
    """CPU time of every thread alive at a sample, by thread group."""

    def sample(self, into: dict[int, tuple[str, float]]) -> None:
        switches = self.first_switches if into is self.first else self.last_switches
        for t in threading.enumerate():
            if t.ident is None:
                continue
            try:
                cpu = time.clock_gettime(time.pthread_getcpuclockid(t.ident))
            except (OSError, ProcessLookupError):
                continue
            into[t.ident] = (_thread_group(t.name), cpu)
            switches[t.ident] = _switches(t.native_id)

    def __init__(self) -> None:
        self.first: dict[int, tuple[str, float]] = {}
        self.last: dict[int, tuple[str, float]] = {}
        self.first_switches: dict[int, int] = {}
        self.last_switches: dict[int, int] = {}

    def per_group(self) -> dict[str, tuple[float, int]]:
        """Thread group -> (CPU seconds, context switches) between the two samples."""
        out: dict[str, list[float]] = collections.defaultdict(lambda: [0.0, 0])
        for ident, (name, cpu) in self.last.items():
            start = self.first.get(ident, (name, 0.0))[1]
            out[name][0] += cpu - start
            out[name][1] += self.last_switches.get(ident, 0) - self.first_switches.get(ident, 0)
        return {k: (v[0], int(v[1])) for k, v in out.items()}


def _switches(native_id: int | None) -> int:
    """Voluntary + involuntary context switches of a thread so far (Linux)."""
    try:
        with open(f"/proc/self/task/{native_id}/status") as f:
            return sum(int(line.split()[1]) for line in f if "ctxt_switches" in line)
    except OSError:
        return 0


def run_one(dfp: Any, mode: str, seconds: float, warmup: float, clock: ThreadClock | None,
            **options: Any) -> dict[str, Any]:
    from memryx import AsyncAccl

    port = dfp.model(0).inputs[0]
    rng = np.random.default_rng(0)
    pool = [rng.standard_normal(port.shape).astype(port.dtype) for _ in range(DISTINCT)]
    t_out: list[float] = []
    perf = time.perf_counter
    state = {"deadline": 0.0, "i": 0, "marked": False, "n0": 0, "t0": 0.0, "cpu0": 0.0,
             "n1": 0, "t1": 0.0, "cpu1": 0.0}

    def source() -> np.ndarray | None:
        now = perf()
        if not state["deadline"]:
            state["deadline"] = now + seconds
        elif now >= state["deadline"]:
            return None
        state["i"] += 1
        return pool[state["i"] % DISTINCT]

    def sink(*outputs: Any) -> None:
        now = perf()
        t_out.append(now)
        if not state["marked"] and now > state["deadline"] - seconds + warmup:
            state["marked"] = True
            state.update(n0=len(t_out), t0=now, cpu0=time.process_time())
            if clock is not None:
                clock.sample(clock.first)
        elif state["marked"] and not len(t_out) % 1000:
            state.update(n1=len(t_out), t1=now, cpu1=time.process_time())
            if clock is not None:
                clock.sample(clock.last)

    accl = AsyncAccl(dfp, mode=mode, **options)
    try:
        accl.connect_output(sink)
        accl.connect_input(source)
        accl.wait()
        stats = accl.statistics()
    finally:
        accl.close()
    n = state["n1"] - state["n0"]
    span = state["t1"] - state["t0"]
    return {"fps": n / span if span > 0 else float("nan"), "frames": n,
            "cpu_us": (state["cpu1"] - state["cpu0"]) / n * 1e6 if n else float("nan"),
            "stats": stats}


# -- counting hops ----------------------------------------------------------------------------
@contextlib.contextmanager
def counting() -> Iterator[collections.Counter[str]]:
    """Count calls of the hot path's functions (wrapped: slower, so not timed)."""
    import memryx._core.aio as aio
    import memryx._core.callbacks as callbacks
    import memryx._core.lane as lane
    import memryx._core.threads as threads
    import memryx._core.workers as workers
    import memryx.device._release as release
    import memryx.device.simulated as sim

    counts: collections.Counter[str] = collections.Counter()
    patched: list[tuple[Any, str, Any]] = []

    def wrap(owner: Any, name: str, label: str) -> None:
        orig = getattr(owner, name)

        def counted(*args: Any, **kwargs: Any) -> Any:
            counts[label] += 1
            return orig(*args, **kwargs)

        patched.append((owner, name, orig))
        setattr(owner, name, counted)

    lock = threading.Lock()
    orig_call_soon = threads.call_soon

    def call_soon(loop: Any, fn: Callable[..., Any], *args: Any) -> None:
        with lock:
            counts[f"thread->loop wake-up: {getattr(fn, '__qualname__', fn)}"] += 1
        orig_call_soon(loop, fn, *args)

    for mod in (aio, workers, release):
        patched.append((mod, "call_soon", mod.call_soon))
        mod.call_soon = call_soon
    wrap(sim.SimulatedDevice, "submit", "device submit")
    wrap(sim.SimulatedDevice, "_resolve", "device resolve (job)")
    wrap(release.Releases, "_wake", "release wake-up")
    wrap(lane.Lane, "_flush", "lane flush")
    wrap(lane.Lane, "put_many", "lane put_many (input batches)")
    wrap(callbacks.CallbackOutput, "deliver_now", "output hand-over (batches)")
    wrap(callbacks.CallbackOutput, "_batch_done", "output batch done (loop)")
    wrap(workers.ThreadProducer, "grant", "input grant")
    wrap(aio.Budget, "give", "budget give")
    try:
        yield counts
    finally:
        for owner, name, orig in reversed(patched):
            setattr(owner, name, orig)


def main() -> None:
    from memryx import NeuralCompiler, testing

    ap = argparse.ArgumentParser()
    ap.add_argument("--modes", default="reuse,sampled,shapes")
    ap.add_argument("--seconds", type=float, default=4.0)
    ap.add_argument("--count", action="store_true")
    ap.add_argument("--yappi", action="store_true")
    args = ap.parse_args()
    dfp = NeuralCompiler(models=testing.mobilenet_like()).run()
    modeled = float(dfp.model(0).perf["fps"])
    print(f"mobilenet_like: modeled {modeled:,.0f} fps ({1e6 / modeled:.1f} us a frame); "
          f"load {os.getloadavg()}")
    for mode in args.modes.split(","):
        clock = ThreadClock()
        r = run_one(dfp, mode, args.seconds, 1.0, clock)
        per = clock.per_group()
        print(f"\n== {mode}: {r['fps']:,.0f} fps ({r['fps'] / modeled:.3f}x), "
              f"process CPU {r['cpu_us']:.1f} us/frame, load {os.getloadavg()[0]:.2f}")
        for name, (cpu, sw) in sorted(per.items(), key=lambda kv: -kv[1][0]):
            print(f"   {name:28s} {cpu / r['frames'] * 1e6:6.1f} us/frame "
                  f"{sw / r['frames']:6.3f} context switches/frame")
        dev = r["stats"]["device"]["models"][0]
        print(f"   device: late {dev['late_frames']}, caught up {dev['caught_up_frames']}, "
              f"release error {dev['release_error_ms']}")
        if args.count:
            with counting() as counts:
                rc = run_one(dfp, mode, args.seconds, 1.0, None)
            total = rc["stats"]["models"][0]["frames_out"] if "models" in rc["stats"] else None
            frames = total or sum(1 for _ in ())
            print(f"   counts per frame ({frames} frames; this run {rc['fps']:,.0f} fps):")
            for label, k in sorted(counts.items()):
                print(f"      {label:60s} {k / frames:7.3f}")
        if args.yappi:
            import yappi

            yappi.set_clock_type("cpu")
            yappi.start(builtins=True, profile_threads=True)
            ry = run_one(dfp, mode, args.seconds, 1.0, None)
            yappi.stop()
            frames = ry["stats"]["models"][0]["frames_out"]
            for th in yappi.get_thread_stats():
                if th.ttot < 0.05:
                    continue
                print(f"   -- thread {th.name} ({th.id}): {th.ttot / frames * 1e6:.1f} us/frame "
                      "(yappi)")
                fs = yappi.get_func_stats(filter={"ctx_id": th.id})
                fs.sort("tsub")
                for f in list(fs)[:18]:
                    print(f"      {f.tsub / frames * 1e6:6.2f} us tsub {f.ttot / frames * 1e6:6.2f}"
                          f" us ttot {f.ncall / frames:6.2f} calls  {f.name} "
                          f"({os.path.basename(f.module)}:{f.lineno})")
            yappi.clear_stats()


if __name__ == "__main__":
    main()
