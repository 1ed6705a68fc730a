"""The ``memryx`` command: compile, info, bench, serve.

Examples::

    memryx compile model.onnx -o model.dfp --autocrop
    memryx info model.dfp
    memryx bench model.dfp --frames 2000 --streams 4 [--mode timed|reuse|sampled|...] [--json]
    memryx bench model.dfp --plot bench.png --html bench.html --trace bench.json
    memryx serve --socket /run/memryx.sock [--tcp 127.0.0.1:10000 --token-file PATH]
    memryx serve --socket /run/memryx.sock --metrics 127.0.0.1:9464

This module writes to stdout/stderr because it is the command-line front end;
the library itself only logs. Every user error is one line on stderr, exit 1
(2 for a bad argument), and no file is left half-written.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, TextIO

from ._bench import Timeline, run_bench
from ._exceptions import DfpError, MemryxError
from ._progress import LogHandler, progress, progress_mode
from ._version import __version__
from .device._compute import BACKENDS
from .device.simulated import MODES
from .dfp import Dfp, PortInfo

if TYPE_CHECKING:
    from .device.server import StopSignals

__all__ = ["Timeline", "main", "run_bench"]

log = logging.getLogger("memryx.cli")

EXAMPLES = """examples:
  memryx compile model.onnx -o model.dfp --autocrop
  memryx info model.dfp
  memryx bench model.dfp --frames 2000 --streams 4 --rate 30
  memryx bench model.dfp --plot bench.png --html bench.html --trace bench.json
  memryx serve --socket /run/memryx.sock --metrics 127.0.0.1:9464

'memryx COMMAND --help' describes each command's options."""


class _Parser(argparse.ArgumentParser):
    """Argument errors in one line, naming the command and the value."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def _at_least(low: int) -> Any:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
        return value

    return parse


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not (value > 0 and value != float("inf")):
        raise argparse.ArgumentTypeError(f"must be a positive finite number, got {text}")
    return value


def _host_port(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT (e.g. 127.0.0.1:9464), got {text!r}")
    return host.strip("[]") or "0.0.0.0", int(port)


def _names(text: str | None) -> list[str] | None:
    return [n for n in text.split(",") if n] if text else None


def _output_path(path: str, what: str) -> Path:
    """Check, before any work is done, that ``path`` can be written as a file."""
    target = Path(path)
    if target.is_dir():
        raise IsADirectoryError(f"{what} {path}: is a directory; give a file name")
    parent = target.parent
    if not parent.is_dir():
        raise FileNotFoundError(f"{what} {path}: the directory {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise PermissionError(f"{what} {path}: the directory {parent} is not writable")
    return target


@contextmanager
def _no_leftovers(*targets: Path) -> Iterator[None]:
    """On failure, remove the temporary files an atomic write left beside ``targets``."""
    temps = [t.with_name(t.name + ".tmp") for t in targets]
    before = {t for t in temps if t.exists()}
    try:
        yield
    except BaseException:
        for t in temps:
            if t not in before and t.is_file():
                t.unlink()
        raise


# -- compile ----------------------------------------------------------------------------------
def cmd_compile(args: argparse.Namespace, out: TextIO) -> int:
    from .compiler import NeuralCompiler

    target = _output_path(args.output, "-o")
    for path in args.models:
        if Path(path).exists() and Path(path).resolve() == target.resolve():
            raise ValueError(f"-o {args.output}: is the input model {path}; the DFP would "
                             "overwrite it")
    with progress(2, "compile", mode=args.progress, plain=False) as bar:
        bar.step(f"compiling {len(args.models)} model(s)")
        # the compiler reads every format itself (ONNX with external weights, TFLite, Keras,
        # SavedModel, frozen .pb) and names a missing or unreadable file
        models: Any = args.models if len(args.models) > 1 else args.models[0]
        nc = NeuralCompiler(models=models, dfp_fname=target, num_chips=args.num_chips,
                            verbose=args.verbose, inputs=_names(args.inputs),
                            outputs=_names(args.outputs), autocrop=args.autocrop,
                            fps=args.fps, latency_ms=args.latency_ms)
        written = Path(nc.dfp_fname or target)
        with _no_leftovers(written):
            dfp = nc.run()
        bar.step(f"wrote {written}")
    out.write(f"wrote {written}\n")
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
            fps = perf["fps"]  # a slow override (0.5 fps) must not read "0 fps"
            shown = f"{fps:.0f}" if fps >= 10 else f"{fps:.2g}"
            out.write(f"  modeled MX3: {shown} fps ({perf.get('bound', '?')}-bound), "
                      f"latency {perf['latency_ms']:.2f} ms, "
                      f"{perf.get('macs', 0) / 1e9:.3f} GMAC, "
                      f"{perf.get('weights', 0) / 1e6:.2f}M weights\n")


def _open_dfp(path: str) -> Dfp:
    try:
        return Dfp(path)
    except DfpError as exc:
        if path in str(exc):
            raise
        raise DfpError(f"{path}: {exc}") from exc


def cmd_info(args: argparse.Namespace, out: TextIO) -> int:
    _describe(_open_dfp(args.dfp), out)
    return 0


# -- bench ------------------------------------------------------------------------------------
def cmd_bench(args: argparse.Namespace, out: TextIO) -> int:
    # everything that can be refused is refused before the run, not after it
    plot = _output_path(args.plot, "--plot") if args.plot else None
    html = _output_path(args.html, "--html") if args.html else None
    trace = _output_path(args.trace, "--trace") if args.trace else None
    if plot or html:
        from ._plot import require_matplotlib

        require_matplotlib()
    from .accl import MultiStreamAsyncAccl

    if args.streams > MultiStreamAsyncAccl.MAX_STREAMS:
        raise MemryxError(f"--streams {args.streams}: at most "
                          f"{MultiStreamAsyncAccl.MAX_STREAMS} streams per model")
    dfp = _open_dfp(args.dfp)
    if not 0 <= args.model_idx < dfp.num_models:
        raise MemryxError(f"--model-idx {args.model_idx}: {args.dfp} has {dfp.num_models} "
                          f"model(s), numbered 0..{dfp.num_models - 1}")
    options = {k: v for k, v in (("concurrency", args.concurrency), ("backend", args.backend),
                                 ("cache_size", args.cache_size)) if v is not None}
    timeline = Timeline(args.streams)
    with progress(args.frames, "bench", unit="frame",
                  mode=args.progress) as bar:
        result = run_bench(dfp, frames=args.frames, streams=args.streams, mode=args.mode,
                           model_idx=args.model_idx, progress=bar, timeline=timeline,
                           trace=trace, trace_frames=args.trace_frames, rate=args.rate,
                           device=args.device, **options)
    if plot or html:
        from ._plot import bench_figure, write_html

        fig = bench_figure(timeline, title=f"{Path(args.dfp).name}: model {args.model_idx} "
                           f"({result['model']}), {result['mode']} mode, {args.streams} "
                           "stream(s)")
        if plot is not None:
            with _no_leftovers(plot):
                fig.save_png(plot)
        if html is not None:
            with _no_leftovers(html):
                write_html(html, fig, result)
    if args.json:
        out.write(json.dumps(result, indent=2) + "\n")
    else:
        _report(result, out)
    for path, what in ((trace, "trace"), (plot, "plot"), (html, "report")):
        if path is not None and not args.json:
            out.write(f"wrote {what} {path}\n")
    return 0


def _report(result: dict[str, Any], out: TextIO) -> None:
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
                  f"{result['modeled_latency_ms']:.2f} ms   (the MX3, from the DFP)\n")
    dev = result.get("device_latency_ms") or {}
    out.write(f"this host  {result['steady_fps']:10,.1f} fps   (second half of the run)")
    if dev.get("p50") is not None:
        out.write(f"   device latency p50 {dev['p50']:.2f} ms")
    out.write(f"\nhost CPU   {result['host_cpu_ms_per_frame']:10.2f} ms/frame (all threads)\n")
    if result.get("late_frames"):
        out.write(f"late       {result['late_frames']} frame(s), up to "
                  f"{result['max_late_ms']:.1f} ms (ready after the chip would have "
                  "delivered them)\n")
    if result.get("reuse"):
        ru = result["reuse"]
        out.write(f"reuse      {ru['hits']} hit(s), {ru['misses']} miss(es), "
                  f"{ru['evictions']} eviction(s), cache {ru['entries']}/{ru['size']}\n")
    if result.get("sampled"):
        sa = result["sampled"]
        mean = sa["staleness_mean"] or 0.0
        out.write(f"sampled    {sa['fresh']} fresh, {sa['stale']} stale output(s); "
                  f"staleness mean {mean:.1f}, max {sa['staleness_max']} frame(s)\n")
    out.write(f"verdict    {result['verdict']['text']}\n")


# -- serve ------------------------------------------------------------------------------------
def cmd_serve(args: argparse.Namespace, out: TextIO) -> int:
    import os

    from .device._auth import TOKEN_ENV, read_token_file
    from .device.server import (
        SchedulerOptions,
        ServerLimits,
        ServerRunningError,
        serve,
        tls_server_context,
    )

    log.debug("memryx device server starting (pid %d)", os.getpid())

    options = SchedulerOptions(frame_limit=args.frame_limit, time_limit_ms=args.time_limit_ms,
                               ifmap_queue=args.ifmap_queue, ofmap_queue=args.ofmap_queue,
                               max_time_limit_ms=args.max_time_limit_ms)
    uids = frozenset(int(u) for u in args.allow_uid.split(",") if u) if args.allow_uid else None
    limits = ServerLimits(
        max_connections=args.max_connections,
        max_message_bytes=int(args.max_message_mb * 1024 * 1024),
        max_buffered_bytes=int(args.max_buffered_mb * 1024 * 1024),
        handshake_timeout=args.handshake_timeout, idle_timeout=args.idle_timeout,
        stall_timeout=args.stall_timeout,
        **({"allowed_uids": uids} if uids is not None else {}))
    token = read_token_file(args.token_file) if args.token_file else (
        os.environ.get(TOKEN_ENV, "").strip() or None)
    if (args.tls_cert is None) != (args.tls_key is None):
        raise ValueError("--tls-cert and --tls-key go together")
    tls = tls_server_context(args.tls_cert, args.tls_key) if args.tls_cert else None
    exporter = None
    if args.metrics is not None:
        from .device import _metrics

        host, port = args.metrics
        try:
            exporter = _metrics.start_exporter(host, port)
        except OSError as exc:
            raise OSError(f"--metrics {host}:{port}: {exc.strerror or exc}") from exc
        out.write(f"metrics on http://{exporter.host_for_url}:{exporter.port}/metrics\n")
        out.flush()
    try:
        serve(args.socket, mode=args.mode, options=options, limits=limits, tcp=args.tcp,
              token=token, insecure=args.insecure, tls=tls, groups=args.groups,
              signals=args.stop_signals)
    except ServerRunningError as exc:
        sys.stderr.write(f"memryx serve: error: {exc}\n")
        return 3
    finally:
        if exporter is not None:
            exporter.close()
    return 0


# -- the parser -------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    common = _Parser(add_help=False)
    common.add_argument("-v", "--verbose", action="count", default=0,
                        help="log more: -v shows INFO, -vv DEBUG")
    common.add_argument("-q", "--quiet", action="store_true",
                        help="only errors; no progress bar")

    parser = _Parser(prog="memryx", formatter_class=argparse.RawDescriptionHelpFormatter,
                     description="Compile ONNX models for the MemryX MX3, inspect DFPs, "
                                 "benchmark them and share a (simulated) device.",
                     epilog=EXAMPLES)
    parser.add_argument("--version", action="version", version=f"memryx {__version__}")
    parser.add_argument("--log-level", choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                        help="log level of the memryx loggers (overrides -v/-q)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("compile", parents=[common], help="compile model(s) into a DFP",
                       description="Compile model(s) into a DFP for the MX3.")
    p.add_argument("models", nargs="+", metavar="MODEL",
                   help="model file(s): ONNX (weights may be in a .data file beside it), "
                        "TFLite, Keras .h5/.keras, SavedModel directory, frozen .pb (all but "
                        "ONNX need memryx[tf]); several make a multi-model DFP")
    p.add_argument("-o", "--output", required=True, metavar="OUT.dfp",
                   help="the DFP file to write (written atomically; *_pre.onnx / "
                        "*_post.onnx beside it when the model is cropped)")
    p.add_argument("--num-chips", type=_at_least(1), default=4, metavar="N",
                   help="MX3 chips the DFP targets, 1..16 (default: 4)")
    p.add_argument("--inputs", metavar="NAMES",
                   help="comma-separated tensor names where the accelerated part begins "
                        "(one model)")
    p.add_argument("--outputs", metavar="NAMES",
                   help="comma-separated tensor names where it ends (one model)")
    p.add_argument("--autocrop", action="store_true",
                   help="move leading/trailing pre- and post-processing off the accelerator")
    p.add_argument("--fps", type=_positive_float,
                   help="override the modeled MX3 frames/s")
    p.add_argument("--latency-ms", type=_positive_float, metavar="MS",
                   help="override the modeled MX3 latency in milliseconds")
    p.set_defaults(func=cmd_compile)

    p = sub.add_parser("info", parents=[common],
                       help="show a DFP's models, ports and modeled performance",
                       description="Show a DFP's models, ports and modeled MX3 performance.")
    p.add_argument("dfp", metavar="FILE.dfp", help="the DFP file to describe")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("bench", parents=[common],
                       help="run a DFP on the simulated device (or a device server) and measure it",
                       description="Run a DFP on the simulated MX3 with random frames and "
                                   "report frames/s and latency per stream.")
    p.add_argument("dfp", metavar="FILE.dfp", help="the DFP file to run")
    p.add_argument("--frames", type=_at_least(1), default=1000, metavar="N",
                   help="frames to run, over all streams (default: 1000)")
    p.add_argument("--streams", type=_at_least(1), default=1, metavar="N",
                   help="input streams sharing the model (default: 1)")
    p.add_argument("--device", metavar="SPEC",
                   help="where to run: a device server (unix:PATH, tcp://HOST:PORT) or "
                        "sim (default: $MEMRYX_DEVICE, else the simulated MX3); a server "
                        "computes in its own mode (memryx serve --mode)")
    p.add_argument("--mode", default=None, choices=MODES,
                   help="simulated device only; paced like the MX3: timed (every frame "
                        "computed, default), reuse "
                        "(each distinct frame computed once), sampled (frames the host "
                        "cannot compute get recent real outputs), shapes (zeros); unpaced: "
                        "fast (every frame, as fast as this host computes), shapes-unpaced")
    p.add_argument("--backend", choices=BACKENDS,
                   help="what computes the model on this host (default: "
                        "$MEMRYX_SIM_BACKEND or onnxruntime)")
    p.add_argument("--cache-size", type=_at_least(1), metavar="N",
                   help="reuse mode: distinct frames whose outputs are kept (default: 1024)")
    p.add_argument("--model-idx", type=_at_least(0), default=0, metavar="I",
                   help="the model of the DFP to measure (default: 0)")
    p.add_argument("--rate", type=_positive_float, metavar="FPS",
                   help="frames/s each stream offers, like a camera (default: as fast as "
                        "the runtime takes them; latency then includes queueing)")
    p.add_argument("--concurrency", type=_at_least(1), metavar="N",
                   help="frames the simulated device computes at once (default: the cores)")
    p.add_argument("--json", action="store_true", help="print the figures as JSON")
    p.add_argument("--plot", metavar="OUT.png",
                   help="draw throughput over time and the latency distribution per stream "
                        "(needs memryx[plot])")
    p.add_argument("--html", metavar="OUT.html",
                   help="write a self-contained HTML report with the figures "
                        "(needs memryx[plot])")
    p.add_argument("--trace", metavar="OUT.json",
                   help="write a Chrome/Perfetto trace of the frames' life (open it in "
                        "ui.perfetto.dev or chrome://tracing)")
    p.add_argument("--trace-frames", type=_at_least(1), default=10_000, metavar="N",
                   help="frames kept in the trace: the last N (default: 10000)")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("serve", parents=[common],
                       help="share one simulated MX3 among processes (Unix socket and/or TCP)",
                       description="Run a device server: one simulated MX3 shared by the "
                                   "processes that connect to its Unix socket or TCP address. "
                                   "Stop it with Ctrl-C or SIGTERM.")
    p.add_argument("--socket", help="Unix socket path (default: $XDG_RUNTIME_DIR/memryx.sock "
                                    "or /tmp/memryx-UID/memryx.sock; none when only --tcp)")
    p.add_argument("--tcp", metavar="HOST:PORT",
                   help="also (or only) listen on TCP; needs --token-file or MEMRYX_TOKEN")
    p.add_argument("--token-file", help="file holding the shared secret of TCP clients")
    p.add_argument("--insecure", action="store_true",
                   help="allow TCP without a token (trusted networks only)")
    p.add_argument("--tls-cert", help="PEM certificate chain: TCP clients connect with tcps://")
    p.add_argument("--tls-key", help="PEM private key of --tls-cert")
    p.add_argument("--allow-uid", help="comma-separated uids that may use the Unix socket "
                                       "(default: the server's own)")
    p.add_argument("--mode", default="timed", choices=MODES,
                   help="how the shared device computes (default: timed; see memryx bench "
                        "--help)")
    p.add_argument("--groups", type=int, default=1, metavar="N",
                   help="chip groups (devices) clients may open: group_id / device_ids "
                        "0..N-1, each a chip of its own (default: 1)")
    p.add_argument("--frame-limit", type=int, default=20,
                   help="frames a model may send per turn on the chip")
    p.add_argument("--time-limit-ms", type=float, default=250.0,
                   help="how long a model's turn on the chip may last")
    p.add_argument("--max-time-limit-ms", type=float, default=None,
                   help="the longest turn a client may ask for (its SchedulerOptions); "
                        "default: 1000 or --time-limit-ms, the larger")
    p.add_argument("--ifmap-queue", type=int, default=16,
                   help="frames a client may have in flight per model (also the most a "
                        "client may ask for)")
    p.add_argument("--ofmap-queue", type=int, default=21,
                   help="frames of one model on the chip at once (also the most a client "
                        "may ask for)")
    p.add_argument("--metrics", type=_host_port, metavar="HOST:PORT",
                   help="serve Prometheus metrics at http://HOST:PORT/metrics "
                        "(needs memryx[metrics]; port 0 picks a free one)")
    p.add_argument("--max-connections", type=int, default=64, help="clients at once")
    p.add_argument("--max-message-mb", type=float, default=256.0,
                   help="largest DFP or frame a client may send, in MiB (any size: it "
                        "travels in chunks)")
    p.add_argument("--max-buffered-mb", type=float, default=64.0,
                   help="frame MiB one client may have queued before the server stops "
                        "reading it")
    p.add_argument("--handshake-timeout", type=float, default=10.0,
                   help="seconds a client has from connect to OPEN")
    p.add_argument("--idle-timeout", type=float, default=300.0,
                   help="seconds a client with nothing in flight may stay silent")
    p.add_argument("--stall-timeout", type=float, default=30.0,
                   help="seconds a client may take none of its waiting outputs before it is "
                        "cut off")
    p.set_defaults(func=cmd_serve)
    return parser


def _configure_logging(args: argparse.Namespace) -> logging.Handler:
    """The CLI is an application: it shows the library's log on stderr."""
    if args.log_level:
        level = getattr(logging, args.log_level)
    elif args.quiet:
        level = logging.ERROR
    elif args.verbose >= 2:
        level = logging.DEBUG
    elif args.verbose == 1 or args.command == "serve":  # a service logs its life by default
        level = logging.INFO
    else:
        level = logging.WARNING
    handler = LogHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    logger = logging.getLogger("memryx")
    logger.addHandler(handler)
    logger.setLevel(level)
    return handler


def _command(argv: Sequence[str]) -> str | None:
    """The command word of ``argv`` (the first word that is not an option or its value)."""
    words = iter(argv)
    for word in words:
        if word == "--log-level":
            next(words, None)
        elif not word.startswith("-"):
            return word
    return None


def main(argv: Sequence[str] | None = None) -> int:
    # `memryx serve` stops cleanly on SIGINT / SIGTERM: from here on, whatever it is doing
    # (parsing, starting, serving, stopping), a signal is a stop request, never a
    # KeyboardInterrupt, and once it has stopped, an ignored one.
    stop_signals: StopSignals | None = None
    if _command(sys.argv[1:] if argv is None else argv) == "serve":
        from .device.server import StopSignals

        with contextlib.suppress(ValueError):  # not the main thread: no signal handling
            stop_signals = StopSignals().install()
    try:
        return _main(argv, stop_signals)
    finally:
        if stop_signals is not None:
            if argv is not None:  # called in-process, not as the command: put them back
                stop_signals.restore()
            else:  # the process is on its way out, stopped cleanly: a late signal is
                # ignored (at finalization Python puts SIG_DFL back, which would kill it)
                stop_signals.ignore()


def _main(argv: Sequence[str] | None, stop_signals: StopSignals | None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.stop_signals = stop_signals
    args.progress = progress_mode(quiet=args.quiet)
    handler = _configure_logging(args)
    try:
        return int(args.func(args, sys.stdout))
    except BrokenPipeError:  # the reader of stdout went away (`memryx info x.dfp | head -1`)
        _silence_stdout()
        return 141  # as SIGPIPE would
    except (MemryxError, OSError, ValueError, TypeError, ImportError) as exc:
        sys.stderr.write(f"memryx {args.command}: error: {_one_line(exc)}\n")
        return 1
    except KeyboardInterrupt:  # Ctrl-C: the accelerator is stopped already (its `finally`)
        sys.stderr.write(f"\nmemryx {args.command}: interrupted\n")
        return 130
    finally:
        logger = logging.getLogger("memryx")
        logger.removeHandler(handler)
        logger.setLevel(logging.NOTSET)


def _silence_stdout() -> None:
    """Point stdout at /dev/null, so that the interpreter's last flush does not complain."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):  # no real stdout (captured): nothing to silence
        pass


def _one_line(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.filename is not None and exc.strerror:
        text = f"{exc.filename}: {exc.strerror}"
    else:
        text = str(exc) or type(exc).__name__
    return " ".join(text.split())


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
