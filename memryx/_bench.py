"""``memryx bench``: a DFP through ``MultiStreamAsyncAccl`` with random frames, measured
through the public API only (the callbacks' own clock readings and ``statistics()``)."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ._exceptions import UsageError
from ._progress import Progress
from .dfp import Dfp, PortInfo

__all__ = ["Timeline", "run_bench", "verdict"]

#: Delivered frames/s within this fraction of the target count as keeping it.
KEPT = 0.98


def random_arrays(ports: Sequence[PortInfo], rng: np.random.Generator) -> list[Any]:
    """One random array per port, of its shape and dtype (the frames both benchmarks use)."""
    arrays: list[Any] = []
    for p in ports:
        if p.dtype.kind == "f":
            arrays.append(rng.standard_normal(p.shape).astype(p.dtype))
        elif p.dtype.kind == "b":
            arrays.append(rng.integers(0, 2, p.shape).astype(bool))
        else:
            info = np.iinfo(p.dtype)
            arrays.append(rng.integers(max(info.min, -128), min(info.max, 127) + 1, p.shape,
                                       dtype=p.dtype))
    return arrays


def _random_frame(ports: Sequence[PortInfo], rng: np.random.Generator) -> Any:
    arrays = random_arrays(ports, rng)
    return arrays[0] if len(arrays) == 1 else arrays


class Timeline:
    """Per-frame times seen through the public API, per stream (``time.monotonic``).

    ``sent[s][k]``: the input callback of stream ``s`` returned frame ``k``;
    ``received[s][k]``: the output callback got its outputs. Outputs come in
    order per stream, so ``received[s][k] - sent[s][k]`` is frame ``k``'s latency
    through the runtime (queues, device, post-processing).
    """

    def __init__(self, streams: int) -> None:
        self.start = 0.0
        self.sent: list[list[float]] = [[] for _ in range(streams)]
        self.received: list[list[float]] = [[] for _ in range(streams)]

    def latencies_ms(self, stream: int) -> np.ndarray[Any, np.dtype[np.float64]]:
        n = len(self.received[stream])
        received = np.asarray(self.received[stream], dtype=np.float64)
        sent = np.asarray(self.sent[stream][:n], dtype=np.float64)
        return (received - sent) * 1000.0


def _written_since(path: Path, since: float) -> bool:
    try:
        return path.stat().st_mtime >= since - 1.0  # coarse file-system clocks
    except OSError:
        return False


def _device_spec(device: str | None) -> str:
    """``device``, else ``$MEMRYX_DEVICE``, else ``"sim"``."""
    from .device.base import DEVICE_ENV

    return device if device is not None else os.environ.get(DEVICE_ENV, "sim")


def _server_spec(device: str | None) -> str | None:
    """The device server ``device`` (else ``$MEMRYX_DEVICE``) names, or None: simulated."""
    spec = _device_spec(device)
    return None if spec.partition(":")[0] in ("sim", "simulated") else spec


def _sim_mode(device: str | None, mode: str | None) -> str:
    """The simulated device's mode: ``mode``, else the one a ``"sim:MODE"`` spec names.

    ``mode`` contradicting ``device`` is refused; ``mode`` wins over ``$MEMRYX_DEVICE``.
    A spec's mode used to be overwritten by the default ``"timed"``: ``--device sim:reuse``
    (or ``MEMRYX_DEVICE=sim:reuse``) ran and reported timed mode, and ``sim:bogus`` ran too.
    """
    spec = _device_spec(device)
    named = spec.partition(":")[2].partition(":")[0]
    if mode is not None and named and named != mode and device is not None:
        raise UsageError(f"mode {mode!r} contradicts the device {spec!r}, which names mode "
                         f"{named!r}: give the mode once")
    return mode or named or "timed"  # an explicit mode wins over $MEMRYX_DEVICE's


def run_bench(dfp: Dfp, *, frames: int, streams: int, mode: str | None = None,
              model_idx: int = 0, progress: Progress | None = None,
              timeline: Timeline | None = None, trace: Path | None = None,
              trace_frames: int = 10_000, rate: float | None = None,
              device: str | None = None, **device_options: Any) -> dict[str, Any]:
    """Run ``frames`` frames spread over ``streams`` streams; return the figures.

    ``rate``: frames/s each stream offers, like a camera (None: as fast as taken).
    ``device``: a device spec (default ``$MEMRYX_DEVICE``, else the simulated MX3);
    ``mode`` (default ``"timed"``) and ``device_options`` configure the simulated
    device. A device server computes in its own mode (``memryx serve --mode``), so
    with one ``mode`` and the simulator's options are refused, and the result's
    ``mode`` is ``"server"``.

    ``timeline`` (a :class:`Timeline`) is filled from the callbacks' own clock
    readings when given; ``trace``: the engine's own trace of the last
    ``trace_frames`` frames (``accl.trace``) is written there.
    """
    from .accl import MultiStreamAsyncAccl

    if frames < 2 * streams:  # a stream of 0 frames has no latency, of 1 frame no rate
        raise UsageError(f"{frames} frame(s) over {streams} stream(s): every stream needs at "
                         f"least 2 frames to have a rate (give at least {2 * streams} frames "
                         "or fewer streams)")
    server = _server_spec(device)
    if server is not None:
        given = ([f"mode={mode!r}"] if mode is not None else []) + sorted(device_options)
        if given:
            raise UsageError(f"{', '.join(given)}: these set up the simulated device, but the "
                             f"benchmark runs on the device server {server}, which computes "
                             "in its own mode (memryx serve --mode); leave them out")
        accl_options: dict[str, Any] = {"device": server}
    else:
        accl_options = {"mode": _sim_mode(device, mode), **device_options}
        if device is not None:
            accl_options["device"] = device
    model = dfp.model(model_idx)
    rng = np.random.default_rng(0)
    pool = [_random_frame(model.inputs, rng) for _ in range(8)]
    quota = [frames // streams + (1 if s < frames % streams else 0) for s in range(streams)]
    sent = [0] * streams
    done = [0]
    received = [0] * streams
    lock = threading.Lock()
    tl = timeline if timeline is not None else Timeline(streams)
    clock = time.monotonic

    def source(s: int) -> Any:
        if sent[s] >= quota[s]:
            return None
        if rate is not None:  # a camera: frame k of each stream is ready at start + k / rate
            delay = tl.start + sent[s] / rate - clock()
            if delay > 0:
                time.sleep(delay)
        frame = pool[(sent[s] + s) % len(pool)]
        sent[s] += 1
        tl.sent[s].append(clock())
        return frame

    def sink(s: int, *outputs: Any) -> None:
        received[s] += 1
        tl.received[s].append(clock())
        with lock:
            done[0] += 1
            count = done[0]
        if progress is not None:
            progress.update(count)

    accl = MultiStreamAsyncAccl(dfp, **accl_options)
    cpu = time.process_time()
    tl.start = time.monotonic()
    try:
        if trace is not None:
            accl.trace(trace, frames=trace_frames)  # written when wait() releases it
        accl.connect_streams(source, sink, streams, model_idx=model_idx)
        for other in range(dfp.num_models):
            if other != model_idx:  # models not under test get empty streams
                accl.connect_streams(lambda s: None, lambda s, *o: None, 1, model_idx=other)
        started_wall = time.time()
        accl.wait()
    finally:
        accl.close()
    if trace is not None and not _written_since(trace, started_wall):
        raise OSError(f"--trace {trace}: the trace could not be written (see the log)")
    elapsed = time.monotonic() - tl.start
    cpu = time.process_time() - cpu
    stats = accl.statistics()
    m = stats["models"][model_idx]
    models = stats["device"].get("models")  # a device server's are its own
    dev = models[model_idx] if models else {}
    mode = "server" if server is not None else accl_options["mode"]
    per_stream = {int(s): v["fps"] for s, v in m["streams"].items()}
    result: dict[str, Any] = {
        "model": model.name, "model_idx": model_idx, "mode": mode, "frames": m["frames_out"],
        "streams": streams, "rate": rate, "elapsed_s": elapsed, "fps": m["fps"],
        "average_stream_fps": float(np.mean(list(per_stream.values()))) if per_stream else 0.0,
        "per_stream_fps": per_stream,
        "latency_ms": m["latency_ms"],
        "per_stream_latency_ms": {int(s): v["latency_ms"] for s, v in m["streams"].items()},
        "modeled_fps": dev.get("modeled_fps"), "modeled_latency_ms": dev.get("modeled_latency_ms"),
        "late_frames": dev.get("late_frames", 0),
        "input_callback_s": m["input_callback_s"], "output_callback_s": m["output_callback_s"],
        "device_wait_s": m["device_wait_s"],
        "steady_fps": _steady_fps(tl),
        "host_cpu_ms_per_frame": cpu * 1000 / max(1, m["frames_out"]),
        "paced": stats["device"].get("paced"), "backend": stats["device"].get("backend"),
        "host_slower": dev.get("host_slower", False), "max_late_ms": dev.get("max_late_ms"),
        "device_latency_ms": dev.get("device_latency_ms"),
        "suggested_mode": stats["device"].get("suggested_mode"),
        "reuse": dev.get("reuse"), "sampled": dev.get("sampled"),
    }
    result["verdict"] = verdict(result)
    return result


def _steady_fps(tl: Timeline) -> float:
    """Outputs per second over the second half of the run (all streams): the rate this
    host sustained once warm (first computations, caches filling) and before the drain."""
    times = sorted(t for s in tl.received for t in s)
    half = times[len(times) // 2:]
    if len(half) < 2 or half[-1] <= half[0]:
        return 0.0
    return (len(half) - 1) / (half[-1] - half[0])


def verdict(r: dict[str, Any]) -> dict[str, Any]:
    """Which side bounded a bench run: ``{"bound", "text", "suggested_mode"}``.

    ``bound`` is ``"chip"`` (the modeled MX3 rate was kept), ``"source"`` (the streams'
    ``rate`` asked for less), ``"host-processing"`` (the device kept chip timing but the
    host side did not take the outputs that fast), ``"host-simulation"`` (this host
    cannot compute the model at the chip's rate in this mode: ``suggested_mode`` keeps
    it), ``"unpaced"`` (a mode without chip timing: the frames/s is this host's) or
    ``"server"`` (a device server: its own mode paces the chip).
    Judged on ``steady_fps``, the rate of the second half of the run.
    """
    from .device.simulated import KEEPS_TIMING

    fps, modeled, mode = r.get("steady_fps") or r["fps"], r.get("modeled_fps"), r["mode"]
    if mode == "server":
        return {"bound": "server", "suggested_mode": None,
                "text": f"device server: {fps:,.1f} fps through the socket; the server's own "
                        "mode paces the chip (memryx serve --mode), and the figures include "
                        "the round trip to it"}
    if not r.get("paced") or not modeled:
        return {"bound": "unpaced", "suggested_mode": None,
                "text": f"unpaced: {mode} mode has no chip timing, so {fps:,.1f} fps is what "
                        "this host computes; use a paced mode (timed, reuse, sampled, shapes) "
                        "for the chip's"}
    late = r.get("late_frames", 0)
    offered = r["rate"] * r["streams"] if r.get("rate") else None
    target = min(modeled, offered) if offered else modeled
    if fps >= KEPT * target:
        if offered is not None and offered < modeled:
            return {"bound": "source", "suggested_mode": None,
                    "text": f"source-bound: the streams offered {offered:,.1f} fps, below "
                            f"the modeled chip's {modeled:,.1f} fps, and got them all"}
        warm = f" ({late} frame(s) late while warming up)" if late else ""
        return {"bound": "chip", "suggested_mode": None,
                "text": f"chip-bound: this host sustained the modeled {modeled:,.1f} fps"
                        f"{warm}"}
    if r.get("host_slower"):
        nxt = r.get("suggested_mode") or KEEPS_TIMING.get(mode, (None, ""))[0]
        use = f" — use mode {nxt}" if nxt else " — even without computing (shapes mode)"
        return {"bound": "host-simulation", "suggested_mode": nxt,
                "text": f"host-bound: simulation compute{use} (this host computes the "
                        f"model slower than the modeled {modeled:,.1f} fps; {late} frame(s) "
                        "late)"}
    return {"bound": "host-processing", "suggested_mode": None,
            "text": "host-bound: your pre/post-processing (the device kept chip timing, "
                    f"but this host sustained only {fps:,.1f} of {target:,.1f} fps: callbacks, "
                    "pre/post-processing or the runtime on this host)"}
