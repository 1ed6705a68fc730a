"""Hostile clients: a well-behaved client's throughput and latency beside hogs on one server.

Everything is a real process: one ``memryx serve`` (``--mode timed``, default
scheduler: 20 frames or 250 ms per turn, ``--stall-timeout 5``), the measured
client (``AsyncAccl`` over the Unix socket, a MobileNetV1-like model compiled
with ``fps=300, latency_ms=5`` so that the chip, not the 2-core host, is the
bottleneck and the scheduler's fairness is what shows; input as fast as the
runtime asks, every frame stamped in and out), and its neighbours:

* alone: nobody else (the reference, measured in the same run);
* honest: a second, identical well-behaved client (the fair-share reference);
* flood: a client that opens a DFP of 786 KB frames, sends as fast as the
  server takes them and never reads an output; it reconnects whenever cut off;
* sleepers: three clients that send the capacity's worth of such frames and
  then read nothing, reconnecting when cut off;
* slowloris: 20 connections dripping a HELLO one byte per second, plus 20
  that connect and say nothing, reconnecting when cut off.

Goals (chip-bound configuration): beside any hog, the measured client keeps
>= 0.9x the throughput it has alone (a hog that does not read gets no chip
time), and its p99 latency stays within one scheduler turn (250 ms) of its p99
alone. The same is measured *host-bound* (the model without the fps override,
so the 2-core host's CPU is the bottleneck) without goals: there every
neighbour, honest or not, takes CPU from the measured client, and the honest
neighbour is the reference to compare a hog with.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import _common as c

HOG = c.ROOT / "tests" / "device" / "hog.py"
TURN_MS = 250.0

CLIENT = """
import json, sys, time, numpy as np, memryx as mx
from memryx import testing
pace = dict(fps=300, latency_ms=5) if sys.argv[3] == "chip" else {}
dfp = mx.NeuralCompiler(models=testing.mobilenet_like(), **pace).run()
frame = np.random.default_rng(0).standard_normal((1, 3, 64, 64)).astype(np.float32)
duration, warmup = float(sys.argv[2]), 1.0
t_in, t_out = [], []
accl = mx.AsyncAccl(dfp, device=sys.argv[1], timeout=30)
start = time.perf_counter()
def feed():
    now = time.perf_counter()
    if now - start > duration + warmup:
        return None
    t_in.append(now)
    return frame
accl.connect_input(feed)
accl.connect_output(lambda *y: t_out.append(time.perf_counter()))
accl.wait()
accl.close()
json.dump({"t_in": t_in, "t_out": t_out, "warmup": warmup}, sys.stdout)
"""


def _server(directory: Path) -> tuple[subprocess.Popen[bytes], Path, Path]:
    path, log = directory / "memryx.sock", directory / "server.log"
    with open(log, "ab") as out:
        proc = subprocess.Popen([sys.executable, "-m", "memryx", "--log-level", "INFO", "serve",
                                 "--socket", str(path), "--stall-timeout", "5"],
                                stdout=out, stderr=out, stdin=subprocess.DEVNULL, cwd=c.ROOT)
    deadline = time.monotonic() + 30
    while "listening on" not in log.read_text():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"server did not start: {log.read_text()}")
        time.sleep(0.05)
    return proc, path, log


def _spawn(args: list[str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL, cwd=c.ROOT)


def _neighbours(kind: str, address: str, duration: float, bound: str
                ) -> list[subprocess.Popen[bytes]]:
    if kind == "alone":
        return []
    if kind == "honest":
        return [_spawn(["-c", CLIENT, address, str(duration + 4), bound])]
    if kind == "flood":
        return [_spawn([str(HOG), "flood+", address])]
    if kind == "sleepers":
        return [_spawn([str(HOG), "sleep+", address]) for _ in range(3)]
    if kind == "slowloris":
        return ([_spawn([str(HOG), "slowloris+", address]) for _ in range(20)]
                + [_spawn([str(HOG), "idle+", address]) for _ in range(20)])
    raise ValueError(kind)


def _measure(address: str, kind: str, duration: float, bound: str) -> dict[str, float]:
    others = _neighbours(kind, address, duration, bound)
    try:
        time.sleep(2.0 if others else 0.0)  # let the hogs open their DFPs and start
        out = subprocess.run([sys.executable, "-c", CLIENT, address, str(duration), bound],
                             capture_output=True, text=True, timeout=duration + 120, cwd=c.ROOT)
        if out.returncode:
            raise RuntimeError(f"measured client failed: {out.stderr[-2000:]}")
        data = json.loads(out.stdout)
    finally:
        for proc in others:
            proc.kill()
        for proc in others:
            proc.wait(10)
    t_in, t_out = data["t_in"], data["t_out"]
    t0 = t_in[0] + data["warmup"]
    skip = next((i for i, t in enumerate(t_in) if t >= t0), 0)
    lat = c.latencies_ms(t_in, t_out, skip)
    return {"fps": c.steady_fps(t_out, data["warmup"]), "p50": c.percentile(lat, 50),
            "p99": c.percentile(lat, 99), "max": max(lat) if lat else float("nan"),
            "frames": len(t_out)}


KINDS = ("alone", "honest", "flood", "sleepers", "slowloris")


BOUNDS = {"chip": "MobileNetV1-like at a modeled 300 fps (chip-bound)",
          "host": "MobileNetV1-like unpaced (host-bound)"}


def _stats(runs: list[dict[str, float]]) -> dict[str, float]:
    return {m: c.median([r[m] for r in runs]) for m in ("fps", "p50", "p99", "max")}


def run(quick: bool) -> dict[str, Any]:
    duration, repeats = (3.0, 1) if quick else (8.0, 3)
    runs: dict[str, dict[str, list[dict[str, float]]]] = {
        b: {k: [] for k in KINDS} for b in BOUNDS}
    with tempfile.TemporaryDirectory() as tmp:
        proc, path, log = _server(Path(tmp))
        try:
            for _ in range(repeats):  # interleaved: every case once per round
                for bound in BOUNDS:
                    for kind in KINDS:
                        runs[bound][kind].append(_measure(f"unix:{path}", kind, duration, bound))
            server_log = log.read_text()
        finally:
            proc.terminate()
            proc.wait(20)
    med = {b: {k: _stats(v) for k, v in kinds.items()} for b, kinds in runs.items()}
    tables, goals = [], []
    for bound, title in BOUNDS.items():
        alone = med[bound]["alone"]
        rows = []
        for kind in KINDS:
            m = med[bound][kind]
            rows.append([kind, c.fmt(m["fps"]), c.ratio(m["fps"] / alone["fps"]),
                         c.fmt(m["p50"]), c.fmt(m["p99"]), c.fmt(m["max"])])
        tables.append(c.table(f"Measured client, {title}: median of {repeats} x {duration:g} s",
                              ["neighbours", "frames/s", "vs alone", "p50 ms", "p99 ms",
                               "max ms"], rows))
    alone = med["chip"]["alone"]
    for kind in ("flood", "sleepers", "slowloris"):
        m = med["chip"][kind]
        share = m["fps"] / alone["fps"]
        goals.append(c.goal(f"chip-bound, beside {kind}: throughput >= 0.9x alone",
                            c.ratio(share), share >= 0.9, c.shortfall(share, 0.9, c.ratio)))
        extra = m["p99"] - alone["p99"]
        goals.append(c.goal(f"chip-bound, beside {kind}: p99 latency <= alone + {TURN_MS:g} ms",
                            f"{c.fmt(m['p99'])} ms ({extra:+.1f} ms)", extra <= TURN_MS,
                            c.excess(extra, TURN_MS, lambda x: f"{x:.1f} ms")))
    cut = {"stalled (outputs unread)": server_log.count("outputs left unread"),
           "too many frames in flight": server_log.count("frames in flight for model"),
           "handshake timeout": server_log.count("no DFP opened within"),
           "refused as busy": server_log.count("refused a client")}
    tables.append(c.table("Hostile connections the server cut off, whole run",
                          ["reason", "count"], [[k, v] for k, v in cut.items()]))
    return c.result("hostile", "Hostile clients beside a well-behaved one (shared mode)",
                    __doc__ or "", tables=tables, goals=goals,
                    raw={"runs": runs, "median": med, "cut_off": cut})


if __name__ == "__main__":
    c.main(run)
