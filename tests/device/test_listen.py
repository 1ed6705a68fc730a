"""One server per socket, who is on the other end, and the default socket path."""

from __future__ import annotations

import os
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest

import memryx as mx
from memryx.device import _listen
from memryx.device import protocol as p
from memryx.device.fd import _remote_error
from memryx.pytest_plugin import ServerProcess
from tests.conftest import frames
from tests.device.helpers import ROOT

pytestmark = pytest.mark.timeout(90)


def _serve(path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "memryx", "serve", "--socket", str(path), *args],
                          capture_output=True, text=True, timeout=60, cwd=ROOT)


def test_a_second_server_refuses_a_live_socket(tmp_path, mlp_dfp):
    first = ServerProcess(tmp_path)
    try:
        second = _serve(first.path)
        assert second.returncode == 3
        assert second.stderr.strip().splitlines() == [
            f"memryx serve: error: another memryx device server is already serving {first.path}"]
        with mx.SyncAccl(mlp_dfp, device=first.address) as accl:  # the first one still serves
            assert len(accl.run(frames(5, (1, 16)))) == 5
    finally:
        first.stop()
    assert not first.path.exists()


def test_a_stale_socket_is_replaced(tmp_path, mlp_dfp):
    path = tmp_path / "memryx.sock"
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(str(path))  # a socket file nobody listens on: its server died
    dead.close()
    srv = ServerProcess(tmp_path)
    try:
        with mx.SyncAccl(mlp_dfp, device=srv.address) as accl:
            assert len(accl.run(frames(3, (1, 16)))) == 3
    finally:
        srv.stop()


def test_a_file_that_is_not_a_socket_is_never_replaced(tmp_path):
    path = tmp_path / "memryx.sock"
    path.write_text("precious")
    out = _serve(path)
    assert out.returncode == 1 and "exists and is not a socket" in out.stderr
    assert path.read_text() == "precious"


def test_a_server_removes_only_the_socket_it_created(tmp_path):
    srv = ServerProcess(tmp_path)
    srv.path.unlink()  # someone removed it, and another socket took the path
    other = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        other.bind(str(srv.path))
        srv.stop()
        assert srv.path.exists() and stat.S_ISSOCK(os.lstat(srv.path).st_mode)
    finally:
        other.close()


def test_the_server_refuses_a_uid_outside_its_allow_list(tmp_path, mlp_dfp):
    srv = ServerProcess(tmp_path, "--allow-uid", "12345")
    try:
        with pytest.raises(mx.DeviceError, match=f"refused.*uid {os.getuid()} may not use"):
            mx.SyncAccl(mlp_dfp, device=srv.address, timeout=5)
    finally:
        srv.stop()


SQUATTER = textwrap.dedent("""
    import socket, sys
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(sys.argv[1]); srv.listen(1)
    print("listening", flush=True)
    conn, _ = srv.accept()
    conn.settimeout(3)
    got = b""
    try:
        while chunk := conn.recv(4096):
            got += chunk
    except OSError:
        pass
    print("received", len(got), flush=True)
""")


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to run a squatter as another user")
def test_the_client_refuses_a_socket_of_another_user(mlp_dfp):
    directory = Path(tempfile.mkdtemp(prefix="memryx-squat-"))
    directory.chmod(0o777)
    path = directory / "memryx.sock"
    python = "/usr/bin/python3"
    if not os.access(python, os.X_OK):
        pytest.skip("no system python3 for the squatter")
    squatter = subprocess.Popen([python, "-I", "-c", SQUATTER, str(path)], user=65534, group=65534,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert squatter.stdout is not None
        assert squatter.stdout.readline().strip() == "listening"
        with pytest.raises(mx.DeviceError, match="runs as uid 65534"):
            mx.SyncAccl(mlp_dfp, device=f"unix:{path}", timeout=5)
        out, _ = squatter.communicate(timeout=10)
        assert out.strip() == "received 0"  # not even HELLO reached it
    finally:
        if squatter.poll() is None:
            squatter.kill()
            squatter.communicate(timeout=10)
        shutil.rmtree(directory, ignore_errors=True)


def test_default_path_without_xdg_runtime_dir_is_in_a_private_directory(monkeypatch):
    monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
    path = _listen.default_socket_path(create=True)
    assert path == Path(f"/tmp/memryx-{os.getuid()}/memryx.sock")
    info = os.lstat(path.parent)
    assert stat.S_ISDIR(info.st_mode) and stat.S_IMODE(info.st_mode) == 0o700
    assert info.st_uid == os.getuid()
    monkeypatch.setenv("XDG_RUNTIME_DIR", "/run/user/1000")
    assert _listen.default_socket_path() == Path("/run/user/1000/memryx.sock")


def test_a_private_directory_made_by_someone_else_is_refused(tmp_path):
    open_dir = tmp_path / "open"
    open_dir.mkdir(mode=0o777)
    open_dir.chmod(0o777)
    with pytest.raises(PermissionError, match="open to other users"):
        _listen.private_dir(open_dir)
    link = tmp_path / "link"
    link.symlink_to(open_dir)
    with pytest.raises(PermissionError, match="symlink"):
        _listen.private_dir(link)
    if os.getuid() == 0:
        theirs = tmp_path / "theirs"
        theirs.mkdir(mode=0o700)
        os.chown(theirs, 65534, 65534)
        with pytest.raises(PermissionError, match="belongs to uid 65534"):
            _listen.private_dir(theirs)


@pytest.mark.parametrize(("code", "cls"), [
    ("ValueError", ValueError), ("TypeError", TypeError), ("DfpError", mx.DfpError),
    ("ModelIndexError", mx.ModelIndexError), ("KeyError", mx.DeviceError),
    ("DeviceError", mx.DeviceError), ("refused", mx.DeviceError),
])
def test_errors_cross_the_wire_with_their_type(code, cls):
    exc = _remote_error(p.Error(code, "what went wrong", True), "opening the DFP")
    assert type(exc) is cls
    assert "what went wrong" in str(exc)


@pytest.mark.asyncio
async def test_one_sha256_per_dfp_open(tmp_path, mlp_dfp, monkeypatch):
    """The client hashes the DFP once to name it; the server hashes what it receives once.
    (It used to be four times per open.)"""
    import hashlib

    from memryx.device.fd import FdDevice
    from memryx.device.server import DeviceServer

    calls: list[int] = []
    real = hashlib.sha256

    def counting(data: bytes = b"") -> object:
        calls.append(len(data))
        return real(data)

    monkeypatch.setattr(hashlib, "sha256", counting)
    server = DeviceServer(tmp_path / "memryx.sock", mode="shapes")
    await server.start()
    try:
        size = len(mlp_dfp.to_bytes())
        for expected in ([size, size], [size]):  # first open uploads; the second is cached
            calls.clear()
            device = FdDevice(server.path, timeout=10)
            await device.open(mlp_dfp, 0)
            await device.aclose()
            assert calls == expected
    finally:
        await server.aclose()
