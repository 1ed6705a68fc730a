"""(regression) `memryx serve` stops cleanly on Ctrl-C whenever it lands.

A CI run once saw `memryx serve` log "listening", then "stopped", then exit 130
("interrupted"): a SIGINT that landed after the socket existed but before the server had
put its own handlers in place went to asyncio's runner, which cancelled the server (the
clean stop ran) and then raised KeyboardInterrupt. The command now treats SIGINT and
SIGTERM as a stop request from the moment it starts; a second one during the stop is
absorbed by the stop already under way.

Each case runs a real `memryx serve` process, sends real signals, and checks exit 0, no
traceback and no socket left behind. (A signal that lands before the interpreter has
loaded memryx at all, its first few hundred milliseconds, is Python's own business: the
cases start at the first line the command logs.)
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import onnx
import pytest

from memryx import NeuralCompiler, testing

pytestmark = pytest.mark.timeout(600)

REPEATS = int(os.environ.get("MEMRYX_SIGINT_REPEATS", "6"))


class Serve:
    """A `memryx serve` process whose stderr is read by a thread (lines, with their time)."""

    def __init__(self, sock: Path, started: list[Serve], *args: str) -> None:
        self.sock = sock
        started.append(self)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "memryx", "serve", "--socket", str(sock), "--mode", "fast",
             *args],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            text=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        self.lines: list[str] = []
        self._seen = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            with self._seen:
                self.lines.append(line)
                self._seen.notify_all()
        with self._seen:
            self.lines.append("")  # EOF
            self._seen.notify_all()

    def wait_line(self, text: str, seconds: float = 60.0) -> None:
        with self._seen:
            ok = self._seen.wait_for(lambda: any(text in x for x in self.lines)
                                     or "" in self.lines, seconds)
            assert ok and any(text in x for x in self.lines), (text, self.lines)

    def wait_socket(self, seconds: float = 60.0) -> None:
        deadline = time.monotonic() + seconds
        while not self.sock.exists():  # spin: the moment the socket appears matters
            assert self.proc.poll() is None, self.stderr()
            assert time.monotonic() < deadline, "memryx serve did not start"

    def sigint(self) -> None:
        self.proc.send_signal(signal.SIGINT)

    def finish(self) -> tuple[int, str]:
        try:
            code = self.proc.wait(timeout=30)
        finally:
            self.end()
        return code, self.stderr()

    def end(self) -> None:
        """Kill the process if it still runs; join the reader (a test's clean-up)."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(30)
        self._reader.join(30)
        assert self.proc.stderr is not None
        self.proc.stderr.close()

    def stderr(self) -> str:
        with self._seen:
            return "".join(self.lines)


def check_clean(code: int, err: str, sock: Path, what: str) -> None:
    assert code == 0, f"{what}: exit {code}\n{err}"
    assert "Traceback" not in err and "interrupted" not in err, f"{what}:\n{err}"
    assert "KeyboardInterrupt" not in err, f"{what}:\n{err}"
    assert "stopped" in err, f"{what}:\n{err}"
    assert not sock.exists(), f"{what}: {sock} left behind\n{err}"


def sleep_ms(ms: float) -> None:
    end = time.perf_counter() + ms / 1000
    while time.perf_counter() < end:  # spin: sleep() is too coarse for 1 ms
        pass


@pytest.fixture
def servers() -> Iterator[list[Serve]]:
    started: list[Serve] = []
    yield started
    for server in started:
        server.end()


MOMENTS = ["on-start", "on-socket", "0ms", "1ms", "5ms", "20ms", "twice", "twice-on-socket",
           "again-when-stopped"]


@pytest.mark.parametrize("moment", MOMENTS)
def test_sigint_at_any_moment_is_a_clean_stop(tmp_path: Path, moment: str,
                                              servers: list[Serve]) -> None:
    for i in range(REPEATS):
        sock = tmp_path / f"s{i}.sock"
        server = Serve(sock, servers, *(["-vv"] if moment == "on-start" else []))
        if moment == "on-start":  # the command's first line (-vv): before it listens
            server.wait_line("starting")
        else:
            server.wait_socket()
            if moment.endswith("ms"):
                sleep_ms(float(moment[:-2]))
        server.sigint()
        if moment.startswith("twice"):
            server.sigint()
        if moment == "again-when-stopped":  # the process is on its way out
            server.wait_line("stopped")
            for _ in range(5):
                sleep_ms(1)
                server.sigint()
        code, err = server.finish()
        check_clean(code, err, sock, f"{moment} #{i}")
        if moment != "on-start":
            assert f"listening on {sock}" in err, err


@pytest.fixture(scope="module")
def dfp_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    where = tmp_path_factory.mktemp("serve-sigint")
    onnx.save(testing.mobilenet_like(), str(where / "model.onnx"))
    NeuralCompiler(models=str(where / "model.onnx"), dfp_fname=where / "model.dfp").run()
    return where / "model.dfp"


@pytest.fixture
def clients() -> Iterator[list[subprocess.Popen[str]]]:
    procs: list[subprocess.Popen[str]] = []
    yield procs
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.communicate(timeout=30)


@pytest.mark.parametrize("twice", [False, True])
def test_sigint_during_a_clients_run(tmp_path: Path, dfp_path: Path, twice: bool,
                                     clients: list[subprocess.Popen[str]],
                                     servers: list[Serve]) -> None:
    for i in range(max(2, REPEATS // 2)):
        sock = tmp_path / f"c{i}.sock"
        server = Serve(sock, servers)
        server.wait_socket()
        server.wait_line("listening")
        client = subprocess.Popen(
            [sys.executable, "-m", "memryx", "bench", str(dfp_path), "--frames", "1000000",
             "--device", f"unix:{sock}", "-q"],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        clients.append(client)
        server.wait_line("opened", 120)  # the client has opened its model: frames are flowing
        time.sleep(0.3)
        server.sigint()
        if twice:
            sleep_ms(2)
            server.sigint()
        code, err = server.finish()
        check_clean(code, err, sock, f"client run #{i}")
        # the client learns that the server went away: a one-line error, no hang
        _, cerr = client.communicate(timeout=60)
        assert client.returncode == 1, cerr
