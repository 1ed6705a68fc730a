"""The ``memryx`` command: compile, info, bench, serve.

Examples::

    memryx compile model.onnx -o model.dfp --autocrop
    memryx info model.dfp
    memryx bench model.dfp --frames 2000 --streams 4 [--mode timed|fast|shapes] [--json]
    memryx serve --socket /run/memryx.sock

This module writes to stdout/stderr because it is the command-line front end;
the library itself only logs.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import threading
import time
from collections.abc import Sequence
from typing import Any, TextIO

import numpy as np

from ._exceptions import MemryxError
from ._version import __version__
from .dfp import Dfp, PortInfo

__all__ = ["main"]


def _names(text: str | None) -> list[str] | None:
    return [n for n in text.split(",") if n] if text else None


def cmd_compile(args: argparse.Namespace, out: TextIO) -> int:
    from .compiler import NeuralCompiler

    models: Any = args.models if len(args.models) > 1 else args.models[0]
    nc = NeuralCompiler(models=models, dfp_fname=args.output, num_chips=args.num_chips,
                        verbose=args.verbose, inputs=_names(args.inputs),
                        outputs=_names(args.outputs), autocrop=args.autocrop,
                        fps=args.fps, latency_ms=args.latency_ms)
    dfp = nc.run()
    out.write(f"wrote {args.output}\n")
    _describe(dfp, out)
    return 0


def _port(p: PortInfo) -> str:
    return f"port {p.port:<3} {p.layer!r:24} {p.shape!s:20} {p.dtype.name}"


def _describe(dfp: Dfp, out: TextIO) -> None:
    out.write(f"DFP format v{dfp.version}, compiler {dfp.compiler_version}, "
              f"{dfp.num_chips} chip(s), {dfp.num_models} model(s)\n")
    for m in dfp.models:
        out.write(f"model {m.index}: {m.name}"
                  f"{' (+ pre-processing model)' if m.pre_model else ''}"
                  f"{' (+ post-processing model)' if m.post_model else ''}\n")
        for p in m.inputs:
            out.write(f"  in  {_port(p)}\n")
        for p in m.outputs:
            out.write(f"  out {_port(p)}\n")
        if m.perf:
            perf = m.perf
            out.write(f"  modeled MX3: {perf['fps']:.0f} fps ({perf.get('bound', '?')}-bound), "
                      f"latency {perf['latency_ms']:.2f} ms, "
                      f"{perf.get('macs', 0) / 1e9:.3f} GMAC, "
                      f"{perf.get('weights', 0) / 1e6:.2f}M weights\n")


def cmd_info(args: argparse.Namespace, out: TextIO) -> int:
    _describe(Dfp(args.dfp), out)
    return 0


def _random_frame(ports: Sequence[PortInfo], rng: np.random.Generator) -> Any:
    arrays = []
    for p in ports:
        if p.dtype.kind == "f":
            arrays.append(rng.standard_normal(p.shape).astype(p.dtype))
        elif p.dtype.kind == "b":
            arrays.append(rng.integers(0, 2, p.shape).astype(bool))
        else:
            info = np.iinfo(p.dtype)
            arrays.append(rng.integers(max(info.min, -128), min(info.max, 127) + 1, p.shape,
                                       dtype=p.dtype))
    return arrays[0] if len(arrays) == 1 else arrays


def run_bench(dfp: Dfp, *, frames: int, streams: int, mode: str, model_idx: int = 0,
              progress: TextIO | None = None, **device_options: Any) -> dict[str, Any]:
    """Run ``frames`` frames spread over ``streams`` streams; return the figures."""
    from .accl import MultiStreamAsyncAccl

    model = dfp.model(model_idx)
    rng = np.random.default_rng(0)
    pool = [_random_frame(model.inputs, rng) for _ in range(8)]
    quota = [frames // streams + (1 if s < frames % streams else 0) for s in range(streams)]
    sent = [0] * streams
    done = [0]
    lock = threading.Lock()
    last = [0.0]
    start = time.monotonic()

    def source(s: int) -> Any:
        if sent[s] >= quota[s]:
            return None
        sent[s] += 1
        return pool[(sent[s] + s) % len(pool)]

    def sink(s: int, *outputs: Any) -> None:
        with lock:
            done[0] += 1
            now = time.monotonic()
            if progress is not None and (now - last[0] > 0.25 or done[0] == frames):
                last[0] = now
                rate = done[0] / max(now - start, 1e-9)
                progress.write(f"\r{done[0]}/{frames} frames  {rate:,.0f} fps   ")
                progress.flush()

    accl = MultiStreamAsyncAccl(dfp, mode=mode, **device_options)
    try:
        accl.connect_streams(source, sink, streams, model_idx=model_idx)
        for other in range(dfp.num_models):
            if other != model_idx:  # models not under test get empty streams
                accl.connect_streams(lambda s: None, lambda s, *o: None, 1, model_idx=other)
        accl.wait()
    finally:
        accl.close()
    elapsed = time.monotonic() - start
    stats = accl.statistics()
    if progress is not None:
        progress.write("\n")
    m = stats["models"][model_idx]
    dev = stats["device"]["models"][model_idx]
    per_stream = {int(s): v["fps"] for s, v in m["streams"].items()}
    return {
        "model": model.name, "model_idx": model_idx, "mode": mode, "frames": m["frames_out"],
        "streams": streams, "elapsed_s": elapsed, "fps": m["fps"],
        "average_stream_fps": float(np.mean(list(per_stream.values()))) if per_stream else 0.0,
        "per_stream_fps": per_stream,
        "latency_ms": m["latency_ms"],
        "per_stream_latency_ms": {int(s): v["latency_ms"] for s, v in m["streams"].items()},
        "modeled_fps": dev.get("modeled_fps"), "modeled_latency_ms": dev.get("modeled_latency_ms"),
        "late_frames": dev.get("late_frames", 0),
        "input_callback_s": m["input_callback_s"], "output_callback_s": m["output_callback_s"],
        "device_wait_s": m["device_wait_s"],
    }


def cmd_bench(args: argparse.Namespace, out: TextIO) -> int:
    dfp = Dfp(args.dfp)
    options = {"concurrency": args.concurrency} if args.concurrency else {}
    result = run_bench(dfp, frames=args.frames, streams=args.streams, mode=args.mode,
                       model_idx=args.model_idx,
                       progress=None if args.quiet else sys.stderr, **options)
    if args.json:
        out.write(json.dumps(result, indent=2) + "\n")
        return 0
    lat = result["latency_ms"]
    out.write(f"model {result['model_idx']} ({result['model']}), {result['mode']} mode, "
              f"{result['frames']} frames, {result['streams']} stream(s), "
              f"{result['elapsed_s']:.2f} s\n")
    for s, fps in sorted(result["per_stream_fps"].items()):
        sl = result["per_stream_latency_ms"][s]
        out.write(f"  stream {s:<3} {fps:10,.1f} fps   latency p50 {sl['p50']:.2f} ms  "
                  f"p99 {sl['p99']:.2f} ms\n")
    out.write(f"total      {result['fps']:10,.1f} fps   (average per stream "
              f"{result['average_stream_fps']:,.1f} fps)\n")
    out.write(f"latency    p50 {lat['p50']:.2f} ms   p99 {lat['p99']:.2f} ms\n")
    if result["modeled_fps"]:
        out.write(f"modeled    {result['modeled_fps']:10,.1f} fps   latency "
                  f"{result['modeled_latency_ms']:.2f} ms")
        if result["late_frames"]:
            out.write(f"   ({result['late_frames']} frame(s) late: the host is slower than "
                      "the modeled chip)")
        out.write("\n")
    return 0


def cmd_serve(args: argparse.Namespace, out: TextIO) -> int:
    from .device.server import SchedulerOptions, serve

    options = SchedulerOptions(frame_limit=args.frame_limit, time_limit_ms=args.time_limit_ms,
                               ifmap_queue=args.ifmap_queue, ofmap_queue=args.ofmap_queue)
    serve(args.socket, mode=args.mode, options=options)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="memryx", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"memryx {__version__}")
    parser.add_argument("--log-level", default="WARNING",
                        choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("compile", help="compile ONNX model(s) into a DFP")
    p.add_argument("models", nargs="+", help="ONNX file(s); several make a multi-model DFP")
    p.add_argument("-o", "--output", required=True, help="the DFP file to write")
    p.add_argument("--num-chips", type=int, default=4)
    p.add_argument("--inputs", help="comma-separated tensor names where the accelerated "
                                    "part begins (one model)")
    p.add_argument("--outputs", help="comma-separated tensor names where it ends (one model)")
    p.add_argument("--autocrop", action="store_true")
    p.add_argument("--fps", type=float, help="override the modeled MX3 frames/s")
    p.add_argument("--latency-ms", type=float, help="override the modeled MX3 latency")
    p.add_argument("-v", "--verbose", action="count", default=0)
    p.set_defaults(func=cmd_compile)

    p = sub.add_parser("info", help="show a DFP's models, ports and modeled performance")
    p.add_argument("dfp")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("bench", help="run a DFP on the simulated device and measure it")
    p.add_argument("dfp")
    p.add_argument("--frames", type=int, default=1000)
    p.add_argument("--streams", type=int, default=1)
    p.add_argument("--mode", default="timed", choices=["timed", "fast", "shapes"])
    p.add_argument("--model-idx", type=int, default=0)
    p.add_argument("--concurrency", type=int, help="frames the simulated device runs at once")
    p.add_argument("--json", action="store_true", help="print the figures as JSON")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress line")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("serve", help="share one simulated MX3 among processes over a socket")
    p.add_argument("--socket", help="Unix socket path (default: $XDG_RUNTIME_DIR/memryx.sock "
                                    "or /tmp/memryx-UID.sock)")
    p.add_argument("--mode", default="timed", choices=["timed", "fast", "shapes"])
    p.add_argument("--frame-limit", type=int, default=20,
                   help="frames a model may send per turn on the chip")
    p.add_argument("--time-limit-ms", type=float, default=250.0,
                   help="how long a model's turn on the chip may last")
    p.add_argument("--ifmap-queue", type=int, default=16,
                   help="frames a client may have in flight per model")
    p.add_argument("--ofmap-queue", type=int, default=21,
                   help="outputs buffered per model for a slow client")
    p.set_defaults(func=cmd_serve)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(levelname)s %(name)s: %(message)s")
    if getattr(args, "frames", 1) < 1 or getattr(args, "streams", 1) < 1:
        parser.error("--frames and --streams must be at least 1")
    try:
        return int(args.func(args, sys.stdout))
    except (MemryxError, OSError, ValueError, TypeError) as exc:
        sys.stderr.write(f"memryx {args.command}: error: {exc}\n")
        return 1
    except KeyboardInterrupt:  # Ctrl-C: the accelerator is stopped already (its `finally`)
        sys.stderr.write(f"\nmemryx {args.command}: interrupted\n")
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
