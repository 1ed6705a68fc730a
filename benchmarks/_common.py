"""Shared helpers for the benchmarks: timing, statistics, result records, machine facts.

Every ``bench_<name>.py`` module has ``run(quick: bool) -> dict`` returning a
*result record* (see :func:`result`), and a ``__main__`` that runs it and prints
the record as JSON. ``run_all.py`` turns the records into ``docs/performance.md``.

Import this module before numpy: it pins the BLAS thread pools to one thread,
so that "GIL-releasing numpy work" in callbacks uses exactly one core.
"""

from __future__ import annotations

import os

for _var in ("OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "OMP_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import asyncio  # noqa: E402
import datetime as _dt  # noqa: E402
import inspect  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable, Sequence  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent

PASS, MISS, SKIPPED = "PASS", "MISS", "SKIPPED"


# -- statistics -----------------------------------------------------------------------------
def median(values: Sequence[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


def percentile(values: Sequence[float], q: float) -> float:
    if not len(values):
        return float("nan")
    return float(np.percentile(np.asarray(values, dtype=np.float64), q))


def steady_fps(out_times: Sequence[float], warmup_s: float) -> float:
    """Frames/s between the first output after ``warmup_s`` and the last output."""
    if len(out_times) < 3:
        return float("nan")
    t0 = out_times[0] + warmup_s
    k = next((i for i, t in enumerate(out_times) if t >= t0), 0)
    if len(out_times) - 1 - k < 2:
        k = 0
    span = out_times[-1] - out_times[k]
    return (len(out_times) - 1 - k) / span if span > 0 else float("nan")


def latencies_ms(in_times: Sequence[float], out_times: Sequence[float], skip: int = 0
                 ) -> list[float]:
    """Per-frame latency, pairing the i-th input with the i-th output (FIFO runtimes)."""
    n = min(len(in_times), len(out_times))
    return [(out_times[i] - in_times[i]) * 1e3 for i in range(skip, n)]


def fmt(x: float, digits: int = 3) -> str:
    """A number with ``digits`` significant digits, thousands separated."""
    if x is None or (isinstance(x, float) and x != x):
        return "n/a"
    if abs(x) >= 10 ** digits:
        return f"{x:,.0f}"
    return f"{x:,.{max(0, digits - 1 - int(np.floor(np.log10(abs(x)))) if x else 0)}f}"


def ratio(x: float) -> str:
    return "n/a" if x != x else f"{x:.2f}x"


def spread(values: Sequence[float]) -> str:
    """min-max of the repetitions, for the tables."""
    if not values:
        return "n/a"
    return f"{fmt(min(values))}-{fmt(max(values))}"


# -- result records -------------------------------------------------------------------------
def goal(text: str, measured: str, ok: bool | None, miss: str = "") -> dict[str, str]:
    """One goal line: ``ok`` None means SKIPPED (``miss`` then says why)."""
    status = SKIPPED if ok is None else (PASS if ok else MISS)
    return {"goal": text, "measured": measured, "status": status,
            "miss": "" if status == PASS else miss}


def shortfall(measured: float, target: float, show: Callable[[float], str] | None = None
              ) -> str:
    """How far below an "at least" target a measurement is."""
    if measured != measured:
        return "no measurement"
    show = show or fmt
    return (f"{(1 - measured / target) * 100:.1f}% below the goal "
            f"({show(measured)} vs {show(target)}; {target / measured:.2f}x short)")


def excess(measured: float, limit: float, show: Callable[[float], str] | None = None) -> str:
    """How far above an "at most" limit a measurement is."""
    if measured != measured:
        return "no measurement"
    show = show or fmt
    return f"{show(measured)} vs at most {show(limit)} ({measured / limit:.2f}x the limit)"


def table(title: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> dict[str, Any]:
    return {"title": title, "columns": list(columns), "rows": [[str(c) for c in r] for r in rows]}


def result(name: str, title: str, about: str, *, tables: Sequence[dict[str, Any]] = (),
           goals: Sequence[dict[str, str]] = (), notes: Sequence[str] = (),
           raw: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"name": name, "title": title, "about": about, "tables": list(tables),
            "goals": list(goals), "notes": list(notes), "raw": raw or {}}


def main(run: Callable[[bool], dict[str, Any]]) -> None:
    """The ``__main__`` of a benchmark module: run it, print its record as JSON."""
    parser = argparse.ArgumentParser(description=(run.__module__ or "").strip())
    parser.add_argument("--quick", action="store_true", help="short smoke run")
    args = parser.parse_args()
    t = time.monotonic()
    rec = run(args.quick)
    rec["seconds"] = round(time.monotonic() - t, 1)
    json.dump(rec, sys.stdout, indent=2, default=str)
    print()


# -- the runtime ----------------------------------------------------------------------------
def timed_mode() -> tuple[bool, str]:
    """Whether the simulated device has ``mode="timed"`` and the compiler takes ``fps=`` /
    ``latency_ms=``; if not, why (for SKIPPED lines)."""
    try:
        from memryx import NeuralCompiler
        from memryx.device import simulated
    except Exception as exc:  # pragma: no cover
        return False, f"memryx import failed: {exc!r}"
    modes = getattr(simulated, "MODES", ())
    params = inspect.signature(NeuralCompiler.__init__).parameters
    missing = []
    if "timed" not in modes:
        missing.append(f'simulated device modes are {tuple(modes)}, no "timed"')
    if not ("fps" in params and "latency_ms" in params):
        missing.append("NeuralCompiler takes no fps=/latency_ms=")
    if missing:
        return False, "timed mode not available (" + "; ".join(missing) + ")"
    return True, ""


def compile_dfp(model: Any, **kwargs: Any) -> Any:
    from memryx import NeuralCompiler

    return NeuralCompiler(models=model, **kwargs).run()


def loop_runner() -> Callable[[Any], Any]:
    """What the runtime's runner threads use: uvloop when installed, else asyncio."""
    try:
        import uvloop

        return uvloop.run  # type: ignore[no-any-return]
    except ImportError:  # pragma: no cover
        return asyncio.run


#: The output callbacks note the process's CPU time every this many frames.
CPU_MARK_EVERY = 32


class Stamps:
    """Input / output timestamps of one run (outputs are FIFO, so they pair up).

    ``cpu_marks`` holds ``(frames out, time, process CPU time)`` every
    ``CPU_MARK_EVERY`` outputs, for the CPU cost per frame in steady state.
    """

    def __init__(self) -> None:
        self.t_in: list[float] = []
        self.t_out: list[float] = []
        self.cpu_marks: list[tuple[int, float, float]] = []

    def fps(self, warmup_s: float) -> float:
        return steady_fps(self.t_out, warmup_s)

    def cpu_us_per_frame(self, warmup_s: float) -> float:
        """Process CPU time (all threads) per frame in steady state, in microseconds."""
        marks = self.cpu_marks
        if len(marks) < 3 or not self.t_out:
            return float("nan")
        t0 = self.t_out[0] + warmup_s
        first = next((m for m in marks if m[1] >= t0), marks[0])
        last = marks[-1]
        if last[0] <= first[0]:
            first = marks[0]
        return (last[2] - first[2]) / (last[0] - first[0]) * 1e6

    def latency(self, warmup_s: float) -> list[float]:
        t0 = (self.t_out[0] if self.t_out else 0.0) + warmup_s
        skip = next((i for i, t in enumerate(self.t_out) if t >= t0), 0)
        return latencies_ms(self.t_in, self.t_out, skip)


def feeder(frame: np.ndarray, duration: float, stamps: Stamps,
           work: Callable[[], None] | None = None) -> Callable[[], np.ndarray | None]:
    """An input callback returning ``frame`` until ``duration`` s after its first call."""
    clock = time.perf_counter
    deadline = [0.0]
    t_in = stamps.t_in

    def input_callback() -> np.ndarray | None:
        now = clock()
        if not deadline[0]:
            deadline[0] = now + duration
        elif now >= deadline[0]:
            return None
        if work is not None:
            work()
        t_in.append(clock())
        return frame

    return input_callback


def paced_feeder(frame: np.ndarray, rate: float, duration: float, stamps: Stamps
                 ) -> Callable[[], np.ndarray | None]:
    """An input callback like a camera: one frame every ``1 / rate`` s (it sleeps until due)."""
    clock = time.perf_counter
    state = {"t0": 0.0, "i": 0}

    def input_callback() -> np.ndarray | None:
        now = clock()
        if not state["t0"]:
            state["t0"] = now
        due = state["t0"] + state["i"] / rate
        if due - state["t0"] >= duration:
            return None
        if due > now:
            time.sleep(due - now)
        state["i"] += 1
        stamps.t_in.append(clock())
        return frame

    return input_callback


def sink(stamps: Stamps, work: Callable[[], None] | None = None) -> Callable[..., None]:
    """An output callback stamping each frame's arrival (then doing ``work``)."""
    clock = time.perf_counter
    cpu = time.process_time
    t_out = stamps.t_out
    marks = stamps.cpu_marks

    def output_callback(*outputs: Any) -> None:
        now = clock()
        t_out.append(now)
        if not len(t_out) % CPU_MARK_EVERY:
            marks.append((len(t_out), now, cpu()))
        if work is not None:
            work()

    return output_callback


def run_async_callbacks(dfp: Any, frame: np.ndarray, duration: float, **options: Any
                        ) -> Stamps:
    """``dfp`` fed by an ``async def`` input callback (:func:`feeder`) and drained by an
    ``async def`` output callback (:func:`sink`) on the app's loop, in an ``AsyncAccl``
    made with ``options``: no thread hop for the callbacks."""
    from memryx import AsyncAccl

    stamps = Stamps()
    produce = feeder(frame, duration, stamps)
    consume = sink(stamps)

    async def input_callback() -> np.ndarray | None:
        return produce()

    async def output_callback(*outputs: Any) -> None:
        consume(*outputs)

    async def main() -> None:
        async with AsyncAccl(dfp, **options) as accl:
            accl.connect_output(output_callback)
            accl.connect_input(input_callback)
            await accl.await_done()

    loop_runner()(main())
    return stamps


# -- stage work -------------------------------------------------------------------------------
_local = threading.local()


def sleep_work(ms: float) -> Callable[[], None]:
    def work() -> None:
        time.sleep(ms / 1e3)

    work.__name__ = f"sleep_{ms:g}ms"
    return work


def numpy_work(ms: float) -> Callable[[], None]:
    """Busy numpy ufunc work (which releases the GIL) for ``ms`` of wall time."""
    seconds = ms / 1e3
    clock = time.perf_counter

    def work() -> None:
        buf = getattr(_local, "buf", None)
        if buf is None:
            buf = _local.buf = np.ones(1 << 16, np.float32)  # ~20-40 us per pass
        end = clock() + seconds
        while clock() < end:
            np.multiply(buf, 1.0000001, out=buf)
            np.sqrt(buf, out=buf)

    work.__name__ = f"numpy_{ms:g}ms"
    return work


# -- the machine ----------------------------------------------------------------------------
def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _ram_gib() -> str:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return f"{int(line.split()[1]) / 2**20:.1f} GiB"
    except OSError:
        pass
    return "unknown"


def _version(dist: str) -> str:
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


def _openvino_version() -> str:
    try:
        import openvino

        return str(openvino.get_version())
    except Exception:
        return "not installed"


def _git() -> str:
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                             capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "memryx"], cwd=ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return f"{rev}{' + uncommitted changes in memryx/' if dirty else ''}" if rev else "?"
    except Exception:
        return "?"


def machine() -> dict[str, str]:
    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover
        affinity = os.cpu_count() or 0
    load = " / ".join(f"{x:.2f}" for x in os.getloadavg())
    return {
        "cpu": _cpu_model(),
        "cores": f"{os.cpu_count()} logical ({affinity} usable by this process)",
        "ram": _ram_gib(),
        "os": f"{platform.system()} {platform.release()}",
        "load average at start (1/5/15 min)": load,
        "python": platform.python_version(),
        "numpy": _version("numpy"),
        "onnxruntime": _version("onnxruntime"),
        "openvino": _openvino_version(),
        "anyio": _version("anyio"),
        "uvloop": _version("uvloop"),
        "memryx": f"{_version('memryx')} (git {_git()})",
        "date": _dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
    }


# -- a stand-in paced device ------------------------------------------------------------------
class PacedDevice:
    """A bench-side stand-in for the MX3 timing model (a ``memryx.device.Device``).

    Each model is an identity pipeline in which a frame occupies the device for
    ``period_s`` (so throughput is ``1 / period_s``) and leaves it ``latency_s``
    after it started. Pacing is on a schedule (start of frame i+1 = start of
    frame i + period while frames are waiting), so late timer wake-ups do not
    accumulate. It lets the pipelining benchmark measure the runtime's core
    while the simulated device has no timed mode; it is not the goal's subject.
    """

    name = "bench-paced"

    def __init__(self, period_s: float, latency_s: float, depth: int = 4) -> None:
        self.period_s = period_s
        self.latency_s = latency_s
        self.depth = depth
        self._models: list[dict[str, Any]] = []

    async def open(self, dfp: Any, group_id: int) -> None:
        for _ in dfp.models:
            self._models.append({"next": 0.0, "in": 0, "outn": 0, "timers": set()})

    def limits(self, model_idx: int) -> Any:
        from memryx.device.base import Limits

        return Limits(in_queue=self.depth, in_chip=1, out_queue=self.depth, batch=1)

    def submit(self, model_idx: int, frames: list[list[np.ndarray]]) -> Any:
        loop = asyncio.get_running_loop()
        m = self._models[model_idx]
        fut = loop.create_future()
        done = 0.0
        for _ in frames:
            now = time.perf_counter()
            start = max(now, m["next"])
            m["next"] = start + self.period_s
            done = start + max(self.latency_s, self.period_s)
        m["in"] += len(frames)
        outputs = [[np.array(a, copy=True) for a in f] for f in frames]

        def resolve() -> None:
            m["timers"].discard(handle)
            if not fut.done():
                m["outn"] += len(frames)
                fut.set_result(outputs)

        handle = loop.call_later(max(0.0, done - time.perf_counter()), resolve)
        m["timers"].add(handle)
        return fut

    def statistics(self) -> dict[str, Any]:
        return {"device": self.name, "mode": "paced",
                "models": [{"model_idx": i, "frames_in": m["in"], "frames_out": m["outn"]}
                           for i, m in enumerate(self._models)]}

    async def aclose(self) -> None:
        for m in self._models:
            for handle in m["timers"]:
                handle.cancel()
        self._models.clear()
