"""Device servers and hostile clients as real processes, for the tests of tests/device."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HOG = Path(__file__).with_name("hog.py")
ROOT = Path(__file__).resolve().parents[2]


class Server:
    """``memryx serve`` in a child process; waits until every listener it asked for is up.

    ``unix``: listen on ``directory/memryx.sock``; extra ``args`` as on the command line.
    """

    def __init__(self, directory: Path, *args: str, unix: bool = True,
                 env: dict[str, str] | None = None, wait: bool = True) -> None:
        self.path = directory / "memryx.sock"
        self.log = directory / f"server-{time.monotonic_ns()}.log"
        cmd = [sys.executable, "-m", "memryx", "--log-level", "INFO", "serve",
               *(["--socket", str(self.path)] if unix else []), *args]
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                         env={**os.environ, **(env or {})}, cwd=ROOT)
        self.tcp_port = 0
        self._tls = False
        if not wait:
            return
        want = int(unix) + int("--tcp" in args)
        deadline = time.monotonic() + 30
        while self.text().count("listening on") < want:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"device server did not start: {self.text()}")
            time.sleep(0.02)
        found = re.search(r"listening on (tcps?)://\S+?:(\d+)", self.text())
        if found:
            self._tls, self.tcp_port = found.group(1) == "tcps", int(found.group(2))

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    @property
    def address(self) -> str:
        return f"unix:{self.path}"

    @property
    def tcp(self) -> str:
        return f"{'tcps' if self._tls else 'tcp'}://127.0.0.1:{self.tcp_port}"

    def wait_for(self, text: str, seconds: float = 20.0) -> bool:
        deadline = time.monotonic() + seconds
        while text not in self.text():
            if time.monotonic() > deadline:
                return False
            time.sleep(0.05)
        return True

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:  # pragma: no cover - stopped (SIGSTOP) server
                self.proc.kill()
                self.proc.wait(10)


def hog(mode: str, address: str, *args: str, env: dict[str, str] | None = None
        ) -> subprocess.Popen[str]:
    """A hostile client process (see hog.py)."""
    return subprocess.Popen([sys.executable, str(HOG), mode, address, *args],
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, cwd=ROOT,
                            env={**os.environ, **(env or {})})


def wait_line(proc: subprocess.Popen[str], text: str, seconds: float = 60.0) -> str:
    """Read ``proc``'s output until a line containing ``text`` (the lines seen so far)."""
    assert proc.stdout is not None
    seen = ""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        seen += line
        if text in line:
            return seen
    raise AssertionError(f"{text!r} not seen in the output: {seen!r}")


def end(proc: subprocess.Popen[Any]) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait(10)
    if proc.stdout is not None:
        proc.stdout.close()


def raw_unix(path: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(10)
    sock.connect(str(path))
    return sock
