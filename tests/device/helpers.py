"""Hostile clients as real processes, for the tests of tests/device (the servers are the
pytest plugin's ``memryx.pytest_plugin.ServerProcess``)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HOG = Path(__file__).with_name("hog.py")
ROOT = Path(__file__).resolve().parents[2]


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
