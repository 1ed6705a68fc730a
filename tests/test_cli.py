"""The memryx command: compile, info, bench, serve; piped and on a terminal."""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import pty
import select
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import numpy as np
import onnx
import pytest

from memryx import testing
from memryx.cli import build_parser, main


def test_compile_info_bench(tmp_path, capsys):
    model = tmp_path / "m.onnx"
    onnx.save(testing.mobilenet_like(preprocessing=True), str(model))
    dfp = tmp_path / "m.dfp"
    assert main(["compile", str(model), "-o", str(dfp), "--autocrop"]) == 0
    assert (tmp_path / "model_0_m_pre.onnx").exists()
    assert (tmp_path / "model_0_m_post.onnx").exists()
    out = capsys.readouterr().out
    assert "wrote" in out and "'image'" in out and "modeled MX3" in out

    assert main(["info", str(dfp)]) == 0
    out = capsys.readouterr().out
    assert "model 0: mobilenet_like (+ pre-processing model) (+ post-processing model)" in out
    assert "(1, 3, 64, 64)" in out and "fps" in out

    assert main(["bench", str(dfp), "--frames", "60", "--streams", "3"]) == 0
    captured = capsys.readouterr()
    assert "stream 2" in captured.out and "latency" in captured.out
    assert "60/60 frames" in captured.err  # the progress line (plain: not a terminal)

    assert main(["bench", str(dfp), "--frames", "40", "--streams", "2", "--mode", "fast",
                 "--json", "-q"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["frames"] == 40 and result["mode"] == "fast"
    assert set(result["per_stream_fps"]) == {"0", "1"}
    assert result["latency_ms"]["p99"] >= result["latency_ms"]["p50"] > 0


def test_errors_are_reported_not_raised(tmp_path, capsys):
    assert main(["info", str(tmp_path / "missing.dfp")]) == 1
    assert "not found" in capsys.readouterr().err
    bad = tmp_path / "bad.dfp"
    bad.write_bytes(b"not a dfp at all, really")
    assert main(["bench", str(bad)]) == 1
    assert "not a memryx DFP" in capsys.readouterr().err
    assert main(["compile", str(tmp_path / "none.onnx"), "-o", str(tmp_path / "x.dfp")]) == 1
    assert "no ONNX file" in capsys.readouterr().err
    # more streams than one model may have: refused before the DFP is even read
    assert main(["bench", str(bad), "--streams", "4097"]) == 1
    err = capsys.readouterr().err
    assert err == "memryx bench: error: --streams 4097: at most 4096 streams per model\n", err


# -- a quiet library ------------------------------------------------------------------------
QUIET_SCRIPT = """
import numpy as np
from memryx import NeuralCompiler, SyncAccl, testing
# a modeled chip far faster than any host: frames sent together fall behind it (a model
# whose computation, not the runtime's path, is what the host is slowest at)
dfp = NeuralCompiler(models=testing.mobilenet_like(128, width=16), fps=1e6,
                     latency_ms=0.01).run()
with SyncAccl(dfp) as accl:
    accl.run([np.zeros((1, 3, 128, 128), np.float32)] * 200)
    print(accl.statistics()["device"]["models"][0]["late_frames"])
"""


def test_library_prints_nothing_unless_logging_is_configured(tmp_path):
    script = tmp_path / "app.py"
    script.write_text(QUIET_SCRIPT)
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                          timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    assert int(done.stdout) > 0  # the slow host was detected ...
    assert done.stderr == ""     # ... and nothing reached the user's terminal
    # an app that configures logging sees the report
    script.write_text("import logging\nlogging.basicConfig(level=logging.INFO)\n" + QUIET_SCRIPT)
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                          timeout=60, check=False)
    assert "slower than the modeled MX3" in done.stderr


# -- the command as a user runs it ----------------------------------------------------------
def memryx(*args: str, cwd: Path, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """``memryx ARGS`` in a subprocess, stdout and stderr piped."""
    return subprocess.run([sys.executable, "-m", "memryx", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout, check=False)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("cli")
    onnx.save(testing.mobilenet_like(preprocessing=True), str(d / "m.onnx"))
    assert main(["compile", str(d / "m.onnx"), "-o", str(d / "m.dfp"), "--autocrop", "-q"]) == 0
    return d


def one_line_error(done: subprocess.CompletedProcess[str], code: int, *needles: str) -> str:
    assert done.returncode == code, (done.stdout, done.stderr)
    err = done.stderr
    assert err.count("\n") == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, err
    return err


@pytest.mark.parametrize(("args", "needles"), [
    (["bench", "m.dfp", "--concurrency", "0"], ["memryx bench:", "--concurrency", "0"]),
    (["bench", "m.dfp", "--frames", "0"], ["memryx bench:", "--frames", "at least 1"]),
    (["bench", "m.dfp", "--streams", "-3"], ["--streams", "-3"]),
    (["bench", "m.dfp", "--frames", "many"], ["--frames", "'many'"]),
    (["bench", "m.dfp", "--model-idx", "-1"], ["--model-idx"]),
    (["compile", "m.onnx", "-o", "x.dfp", "--fps", "0"], ["memryx compile:", "--fps"]),
    (["compile", "m.onnx", "-o", "x.dfp", "--num-chips", "0"], ["--num-chips"]),
    (["serve", "--metrics", "localhost"], ["memryx serve:", "HOST:PORT", "'localhost'"]),
])
def test_bad_arguments_are_one_line_naming_the_value(workdir, args, needles):
    one_line_error(memryx(*args, cwd=workdir), 2, *needles)


@pytest.mark.parametrize(("args", "needles"), [
    (["info", "missing.dfp"], ["memryx info:", "missing.dfp"]),
    (["bench", "m.onnx"], ["memryx bench:", "m.onnx"]),          # not a DFP
    (["bench", "m.dfp", "--model-idx", "4"], ["--model-idx 4", "1 model(s)"]),
    (["bench", "m.dfp", "--plot", "nodir/p.png"], ["--plot nodir/p.png", "does not exist"]),
    (["compile", "nothere.onnx", "-o", "x.dfp"], ["nothere.onnx"]),
    (["compile", "m.dfp", "-o", "x.dfp"], ["m.dfp"]),                  # not ONNX
    (["compile", "m.onnx", "-o", "adir"], ["-o adir", "directory"]),
    (["compile", "m.onnx", "-o", "nodir/x.dfp"], ["nodir", "does not exist"]),
    (["compile", "m.onnx", "-o", "x.dfp", "--num-chips", "99"], ["num_chips"]),
    (["compile", "m.onnx", "-o", "./m.onnx"], ["-o ./m.onnx", "input model"]),
])
def test_user_errors_are_one_line_and_leave_nothing_behind(workdir, args, needles):
    (workdir / "adir").mkdir(exist_ok=True)
    before = set(workdir.rglob("*"))
    one_line_error(memryx(*args, cwd=workdir), 1, *needles)
    assert set(workdir.rglob("*")) == before  # no .tmp, no half-written file


def test_every_flag_has_help():
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, p in [("memryx", parser), *sub.choices.items()]:
        for action in p._actions:
            if isinstance(action, argparse._SubParsersAction):
                continue
            assert action.help, f"{name} {action.option_strings or action.dest} has no help"


def test_piped_output_is_plain_lines(workdir):
    done = memryx("bench", "m.dfp", "--frames", "200", "--streams", "2", "--mode", "fast",
                  cwd=workdir)
    assert done.returncode == 0, done.stderr
    assert "\r" not in done.stderr and "\x1b" not in done.stderr and "\r" not in done.stdout
    assert "bench: 200/200 frames" in done.stderr
    assert "stream 1" in done.stdout
    quiet = memryx("bench", "m.dfp", "--frames", "50", "--mode", "fast", "-q", cwd=workdir)
    assert quiet.returncode == 0 and quiet.stderr == ""
    assert memryx("compile", "m.onnx", "-o", "c.dfp", cwd=workdir).stderr == ""


def test_bench_rate_paces_the_sources_like_cameras(workdir):
    done = memryx("bench", "m.dfp", "--frames", "40", "--streams", "2", "--rate", "50",
                  "--mode", "fast", "--json", "-q", cwd=workdir)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["rate"] == 50 and result["frames"] == 40
    # 20 frames per stream at 50 frames/s: the last is offered 19/50 s after the start
    assert result["elapsed_s"] >= 19 / 50


def test_a_reader_that_goes_away_is_not_an_error(workdir):
    proc = subprocess.Popen([sys.executable, "-m", "memryx", "info", "m.dfp"], cwd=workdir,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()  # like `memryx info m.dfp | head -0`
    try:
        assert proc.wait(timeout=60) == 141
        assert proc.stderr.read() == b""
    finally:
        proc.stderr.close()


def test_verbose_shows_info_logs(workdir):
    done = memryx("compile", "m.onnx", "-o", "v.dfp", "-v", cwd=workdir)
    assert done.returncode == 0, done.stderr
    assert "INFO memryx.compiler" in done.stderr and "wrote" in done.stderr
    done = memryx("info", "v.dfp", "-vv", cwd=workdir)
    assert done.returncode == 0


def run_on_pty(args: list[str], cwd: Path, timeout: float = 60) -> tuple[int, str]:
    """Run ``memryx ARGS`` with stdin/stdout/stderr on a pseudo-terminal; return its output."""
    main_fd, child_fd = pty.openpty()
    # a terminal of 30 x 100 (a fresh pty is 0 x 0, and progress bars draw nothing on it)
    fcntl.ioctl(child_fd, termios.TIOCSWINSZ, struct.pack("HHHH", 30, 100, 0, 0))
    try:
        proc = subprocess.Popen([sys.executable, "-m", "memryx", *args], cwd=cwd,
                                stdin=child_fd, stdout=child_fd, stderr=child_fd)
    finally:
        os.close(child_fd)
    chunks = []
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([main_fd], [], [], 0.5)
            if ready:
                try:
                    data = os.read(main_fd, 65536)
                except OSError:  # EIO: the child closed the terminal
                    break
                if not data:
                    break
                chunks.append(data)
            elif proc.poll() is not None:
                break
        code = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(main_fd)
    return code, b"".join(chunks).decode(errors="replace")


def test_progress_bar_on_a_terminal(workdir):
    code, text = run_on_pty(["bench", "m.dfp", "--frames", "400", "--mode", "fast"], workdir)
    assert code == 0, text
    bar = text.split("model 0 (")[0]
    assert "\rbench:" in bar and "/400 [" in bar and "frame/s" in bar  # redrawn in place
    assert "bench: 400/400 frames" not in text  # not the plain lines
    assert "total" in text and "latency" in text
    code, text = run_on_pty(["compile", "m.onnx", "-o", "t.dfp"], workdir)
    assert code == 0, text
    assert "\rcompile" in text and "wrote t.dfp" in text
    code, text = run_on_pty(["bench", "m.dfp", "--frames", "50", "-q"], workdir)
    assert code == 0 and "frames/s" not in text and "frame/s" not in text


# -- bench --plot / --html / --trace ----------------------------------------------------------
def test_bench_writes_plot_html_and_trace(workdir):
    pytest.importorskip("matplotlib")
    done = memryx("bench", "m.dfp", "--frames", "300", "--streams", "3", "--mode", "fast",
                  "--plot", "b.png", "--html", "b.html", "--trace", "b.json",
                  "--trace-frames", "50", cwd=workdir, timeout=120)
    assert done.returncode == 0, done.stderr
    for name in ("b.png", "b.html", "b.json"):
        assert f" {name}\n" in done.stdout
    assert (workdir / "b.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    page = (workdir / "b.html").read_text()
    assert "data:image/png;base64," in page and "<td>2</td>" in page  # stream 2's row
    doc = json.loads((workdir / "b.json").read_text())
    spans = [e for e in doc["traceEvents"] if e["ph"] == "X"]
    assert {e["tid"] for e in spans if e["pid"] == 1} == {1, 2, 3}  # one track per stream
    frame_spans = [e for e in spans if e["pid"] == 1]  # the model; the device's row apart
    assert {e["name"] for e in frame_spans} == {"input callback", "pre-processing", "queued",
                                                "device", "post-processing", "output callback"}
    assert {e["tid"] for e in spans if e["pid"] != 1} == {1}  # the device's busy row
    assert len({(e["tid"], e["args"]["frame"]) for e in frame_spans}) <= 50 * 8  # the ring
    assert not list(workdir.glob("*.tmp"))


def test_plot_without_matplotlib_names_the_extra(workdir):
    # a Python where matplotlib cannot be imported
    code = ("import sys; sys.modules['matplotlib'] = None; from memryx.cli import main; "
            "sys.exit(main(sys.argv[1:]))")
    done = subprocess.run([sys.executable, "-c", code, "bench", "m.dfp", "--plot", "x.png"],
                          cwd=workdir, capture_output=True, text=True, timeout=60, check=False)
    one_line_error(done, 1, "pip install 'memryx[plot]'")
    assert not (workdir / "x.png").exists()


def test_metrics_without_prometheus_names_the_extra(workdir):
    code = ("import sys; sys.modules['prometheus_client'] = None; from memryx.cli import main; "
            "sys.exit(main(sys.argv[1:]))")
    done = subprocess.run([sys.executable, "-c", code, "serve", "--socket", "s.sock",
                           "--metrics", "127.0.0.1:0"], cwd=workdir, capture_output=True,
                          text=True, timeout=60, check=False)
    one_line_error(done, 1, "pip install 'memryx[metrics]'")


@pytest.fixture(scope="module")
def matplotlib_fonts() -> None:
    """matplotlib keeps its font files open for the life of the process: open them
    before the per-test fd check takes its baseline."""
    pytest.importorskip("matplotlib")
    from memryx._plot import series_figure

    series_figure("warm-up", {"a": (["x"], [1.0])}, "frames/s").png()


def test_bench_figure_marks_p50_and_p99_per_stream(matplotlib_fonts):
    from memryx._plot import bench_figure
    from memryx.cli import Timeline

    tl = Timeline(2)
    tl.start = 100.0
    rng = np.random.default_rng(1)
    for s in range(2):
        sent = 100.0 + np.arange(500) * 0.002
        lat = rng.exponential(0.005 * (s + 1), 500)
        tl.sent[s] = list(sent)
        tl.received[s] = list(sent + lat)
    fig = bench_figure(tl, "title")
    ax_tp, ax_lat = fig.figure.axes
    for s, row in enumerate(fig.summary):
        want = np.percentile(tl.latencies_ms(s), [50, 99])
        assert (row["p50_ms"], row["p99_ms"]) == pytest.approx(tuple(want))
        marks = [line.get_xdata()[0] for line in ax_lat.lines
                 if line.get_color() == f"C{s}"]
        assert marks == pytest.approx(list(want))
        assert row["frames"] == 500
    assert len(ax_tp.lines) == 2  # a throughput curve per stream
    assert fig.png()[:4] == b"\x89PNG"


# -- statistics that add up -------------------------------------------------------------------
def test_model_callback_times_are_the_sum_of_their_streams_and_within_wall_time():
    """Callback times are the wall time spent inside the callbacks (each call timed from
    its own start), the model's are the sum of its streams', and none exceeds the run's
    wall time per stream (nor per model for the one output callback)."""
    import memryx as mx

    dfp = mx.NeuralCompiler(models=testing.mobilenet_like()).run()
    sent = [0, 0, 0]

    def source(s: int) -> object:
        if sent[s] >= 60:
            return None
        sent[s] += 1
        time.sleep(0.001)  # time spent in the callback: what the statistics must add up
        return np.zeros((1, 3, 64, 64), np.float32)

    def sink(s: int, *outputs: object) -> None:
        time.sleep(0.002)  # likewise

    accl = mx.MultiStreamAsyncAccl(dfp, mode="fast")
    try:
        accl.connect_streams(source, sink, 3)
        accl.wait()
    finally:
        accl.close()
    stats = accl.statistics()
    m = stats["models"][0]
    streams = m["streams"].values()
    assert m["frames_out"] == 180
    for key in ("input_callback_s", "output_callback_s"):
        assert m[key] == pytest.approx(sum(s[key] for s in streams), rel=0.01), key
        for s in streams:
            assert 0 < s[key] <= stats["elapsed_s"], key
    # one output callback at a time per model: its total fits in the run's wall time
    assert m["output_callback_s"] <= stats["elapsed_s"]
    assert m["output_callback_s"] >= 180 * 0.002 * 0.9


# -- bench against a device server ----------------------------------------------------------
def test_bench_runs_on_a_device_server(workdir, tmp_path):
    from tests.conftest import ServerProcess

    srv = ServerProcess(tmp_path, "--mode", "fast")
    try:
        env_run = subprocess.run(
            [sys.executable, "-m", "memryx", "bench", "m.dfp", "--frames", "60", "--streams",
             "2", "--json", "-q"], cwd=workdir, capture_output=True, text=True, timeout=120,
            check=False, env={**os.environ, "MEMRYX_DEVICE": srv.address})
        assert env_run.returncode == 0, env_run.stderr
        result = json.loads(env_run.stdout)
        assert result["frames"] == 60 and result["mode"] == "server"
        assert result["verdict"]["bound"] == "server"
        text = memryx("bench", "m.dfp", "--frames", "30", "--device", srv.address, "-q",
                      cwd=workdir, timeout=120)
        assert text.returncode == 0, text.stderr
        assert "server mode" in text.stdout and "verdict    device server" in text.stdout
        # the simulator's options make no sense there: said in one line, no traceback
        done = memryx("bench", "m.dfp", "--frames", "10", "--device", srv.address,
                      "--mode", "reuse", cwd=workdir)
        one_line_error(done, 1, "mode='reuse'", "memryx serve --mode")
    finally:
        srv.stop()
