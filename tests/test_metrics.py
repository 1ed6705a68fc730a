"""Prometheus metrics of the device server: a real `memryx serve --metrics`, real HTTP GETs."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

import memryx as mx
from memryx import testing

pytest.importorskip("prometheus_client")

from memryx.device import _metrics


class Served:
    def __init__(self, proc: subprocess.Popen[str], socket: Path, url: str) -> None:
        self.proc, self.socket, self.url = proc, socket, url

    @property
    def address(self) -> str:
        return f"unix:{self.socket}"

    def scrape(self) -> str:
        with urllib.request.urlopen(self.url, timeout=10) as reply:
            assert reply.status == 200
            assert reply.headers["Content-Type"].startswith("text/plain")
            return str(reply.read().decode())


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Served]:
    sock = tmp_path / "s.sock"
    proc = subprocess.Popen([sys.executable, "-m", "memryx", "serve", "--socket", str(sock),
                             "--mode", "fast", "--metrics", "127.0.0.1:0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()  # printed once the HTTP server listens
        match = re.fullmatch(r"metrics on (http://127\.0\.0\.1:\d+/metrics)\n", line)
        assert match, (line, proc.stderr.read() if proc.poll() is not None else "")
        deadline = time.monotonic() + 30
        while not sock.exists():
            assert proc.poll() is None and time.monotonic() < deadline, "the server died"
            time.sleep(0.05)
        yield Served(proc, sock, match.group(1))
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:  # pragma: no cover - a hang is a failure
                proc.kill()
                proc.wait()
                pytest.fail("memryx serve did not stop on SIGINT")
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()


def value(text: str, name: str, **labels: str) -> float:
    """The sample ``name{labels}`` of an exposition text (labels matched as a subset)."""
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        m = re.fullmatch(r"([a-zA-Z_:][\w:]*)(?:\{(.*)\})? (\S+)", line)
        if not m or m.group(1) != name:
            continue
        have = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', m.group(2) or ""))
        if all(have.get(k) == v for k, v in labels.items()):
            return float(m.group(3))
    raise KeyError(f"{name}{labels} not in the scrape")


@pytest.mark.timeout(120)
def test_serve_metrics_counts_frames_clients_and_latency(served):
    before = served.scrape()
    assert value(before, "memryx_clients_connected") == 0
    assert value(before, "memryx_chip_utilization") == 0
    dfp = mx.NeuralCompiler(models=testing.mobilenet_like()).run()
    frames = [np.random.default_rng(i).standard_normal((1, 3, 64, 64)).astype(np.float32)
              for i in range(4)]
    with mx.SyncAccl(dfp, device=served.address) as accl:
        outs = accl.run(frames * 25)
        assert len(outs) == 100
        during = served.scrape()
        assert value(during, "memryx_clients_connected") == 1
    assert value(during, "memryx_model_frames_in_total", model="0") == 100
    assert value(during, "memryx_model_frames_out_total", model="0") == 100
    client = re.search(r'memryx_client_frames_in_total\{client="([^"]+)"', during)
    assert client and f"pid {os.getpid()}" in client.group(1)
    assert value(during, "memryx_client_frames_out_total", client=client.group(1)) == 100
    assert value(during, "memryx_frames_in_flight", client=client.group(1), model="0") == 0
    assert value(during, "memryx_frame_latency_seconds_count", model="0") == 100
    assert value(during, "memryx_frame_latency_seconds_sum", model="0") > 0
    assert value(during, "memryx_chip_busy_seconds_total") == pytest.approx(
        100 / dfp.model(0).perf["fps"], rel=1e-6)
    # the Grafana dashboard in docs/ asks only for series the server exposes
    dashboard = json.loads((Path(__file__).parent.parent / "docs" /
                            "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    assert exprs
    for name in {n for e in exprs for n in re.findall(r"memryx_\w+", e)}:
        assert re.search(rf"^{name}[{{ ]", during, re.M), f"dashboard uses {name}: not exposed"
    # after the client left: connected back to 0, its per-client series gone, totals kept
    deadline = time.monotonic() + 10
    while value(after := served.scrape(), "memryx_clients_connected") != 0:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert value(after, "memryx_client_connections_total") == 1
    assert "memryx_client_frames_in_total{" not in after
    assert value(after, "memryx_model_frames_out_total", model="0") == 100


@pytest.mark.timeout(120)
def test_serve_prints_where_it_listens_and_scheduler_switches_count(served):
    dfp = mx.NeuralCompiler(models=[testing.mobilenet_like(), testing.mlp_model()]).run()
    with mx.SyncAccl(dfp, device=served.address) as accl:
        for _ in range(3):  # two models take turns on the one chip
            accl.run(np.zeros((1, 3, 64, 64), np.float32), model_idx=0)
            accl.run(np.zeros(dfp.model(1).inputs[0].shape, np.float32), model_idx=1)
    assert value(served.scrape(), "memryx_scheduler_switches_total") >= 5
    served.proc.send_signal(signal.SIGINT)
    served.proc.wait(timeout=15)
    assert served.proc.returncode == 0
    assert served.proc.stderr is not None
    err = served.proc.stderr.read()
    assert f"listening on {served.socket}" in err and "Traceback" not in err


def test_recorder_is_a_no_op_until_enabled():
    rec = _metrics.recorder()
    assert not isinstance(rec, _metrics.Metrics)
    rec.frame_in(0, "x")  # costs a call, records nothing, needs no prometheus
    rec.frame_out(0, "x")


def test_dropped_frames_of_a_client_that_left():
    m = _metrics.Metrics()
    dfp = mx.NeuralCompiler(models=testing.identity_model((1, 4))).run()
    session = type("Session", (), {"peer": "app pid 1"})()
    m.client_connected(session)
    m.model_opened(session, dfp)
    for _ in range(3):
        m.frame_in(0, session)
    m.frame_out(0, session)
    text = m.text().decode()
    assert value(text, "memryx_frames_in_flight", client="app pid 1", model="0") == 2
    m.client_disconnected(session)
    text = m.text().decode()
    assert value(text, "memryx_model_frames_dropped_total", model="0") == 2
    assert "memryx_frames_in_flight{" not in text
    assert value(text, "memryx_clients_connected") == 0
