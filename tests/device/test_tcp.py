"""The device server over TCP: the shared secret, TLS, limits (loopback only)."""

from __future__ import annotations

import os
import shutil
import socket
import ssl
import subprocess
import sys
import time

import numpy as np
import pytest

import memryx as mx
from memryx import testing
from memryx.device import protocol as p
from memryx.device._auth import preamble
from memryx.pytest_plugin import ServerProcess
from tests.conftest import frames, reference
from tests.device.helpers import ROOT, end, hog, wait_line

pytestmark = pytest.mark.timeout(90)
LOOPBACK = "127.0.0.1:0"


@pytest.fixture
def token_file(tmp_path):
    path = tmp_path / "token"
    path.write_text("s3cret-of-the-box\n")
    path.chmod(0o600)
    return path


@pytest.fixture
def tcp_server(tmp_path, token_file):
    srv = ServerProcess(tmp_path, "--tcp", LOOPBACK, "--token-file", str(token_file), unix=False)
    yield srv
    srv.stop()


def test_tcp_client_with_the_token_runs_frames_correctly(tcp_server, monkeypatch):
    monkeypatch.setenv("MEMRYX_TOKEN", "s3cret-of-the-box")
    model = testing.mlp_model()
    xs = frames(50, (1, 16))
    with mx.SyncAccl(mx.NeuralCompiler(models=model).run(), device=tcp_server.tcp) as accl:
        outs = accl.run(xs)
    for x, y in zip(xs, outs, strict=True):
        np.testing.assert_allclose(y, reference(model, x)[0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("token", ["wrong", "", "s3cret-of-the-box-and-more"])
def test_a_wrong_token_is_a_clear_device_error_at_once(tcp_server, mlp_dfp, token):
    t0 = time.monotonic()
    with pytest.raises(mx.DeviceError, match="refused the connection.*wrong token"):
        mx.SyncAccl(mlp_dfp, device=tcp_server.tcp, token=token, timeout=10)
    assert time.monotonic() - t0 < 5
    assert "wrong token" in tcp_server.text()


def test_nothing_but_a_token_is_read_before_the_token(tcp_server):
    """A HELLO (or a huge length claim) before the token is refused, not parsed."""
    with socket.create_connection(("127.0.0.1", tcp_server.tcp_port), timeout=10) as sock:
        sock.sendall(p.HEADER.pack(b"MX", 1, 1, 0, 0, 0xFFFFFFF0))
        reply = b""
        while chunk := sock.recv(4096):
            reply += chunk
    assert b"no token preamble" in reply
    with socket.create_connection(("127.0.0.1", tcp_server.tcp_port), timeout=10) as sock:
        sock.sendall(b"MXTK\xff\xff")  # a token claiming 64 KiB
        reply = sock.recv(4096)
    assert b"at most 1024" in reply


def test_a_tcp_server_refuses_to_start_without_a_secret(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "MEMRYX_TOKEN"}
    out = subprocess.run([sys.executable, "-m", "memryx", "serve", "--tcp", LOOPBACK],
                         capture_output=True, text=True, timeout=60, cwd=ROOT, env=env)
    assert out.returncode == 1
    assert "needs a shared secret" in out.stderr and "--insecure" in out.stderr


def test_insecure_tcp_beside_a_unix_socket(tmp_path, mlp_dfp, monkeypatch):
    monkeypatch.delenv("MEMRYX_TOKEN", raising=False)
    srv = ServerProcess(tmp_path, "--tcp", LOOPBACK, "--insecure")
    try:
        assert "INSECURE" in srv.text()
        for address in (srv.tcp, srv.address):
            with mx.SyncAccl(mlp_dfp, device=address) as accl:
                assert len(accl.run(frames(5, (1, 16)))) == 5
    finally:
        srv.stop()


def test_server_token_from_the_environment(tmp_path, mlp_dfp):
    srv = ServerProcess(tmp_path, "--tcp", LOOPBACK, unix=False, env={"MEMRYX_TOKEN": "from-env"})
    try:
        with mx.SyncAccl(mlp_dfp, device=srv.tcp, token="from-env") as accl:
            assert len(accl.run(frames(5, (1, 16)))) == 5
    finally:
        srv.stop()


def test_a_hog_over_tcp_does_not_stall_a_unix_client(tmp_path, token_file, mlp_dfp):
    srv = ServerProcess(tmp_path, "--tcp", LOOPBACK, "--token-file", str(token_file),
                 "--stall-timeout", "3")
    flood = hog("flood", f"tcp://127.0.0.1:{srv.tcp_port}",
                env={"MEMRYX_TOKEN": "s3cret-of-the-box"})
    try:
        wait_line(flood, "opened")
        with mx.SyncAccl(mlp_dfp, device=srv.address, timeout=10) as accl:
            for i in range(20):
                t0 = time.monotonic()
                assert len(accl.run(frames(10, (1, 16), seed=i))) == 10
                assert time.monotonic() - t0 < 5
        # cut off for one reason or the other, depending on how much the kernel buffers
        assert srv.wait_for(f"hog pid {flood.pid} (")
        deadline = time.monotonic() + 20
        while not ("outputs left unread for 3 s" in srv.text()
                    or "more than 16 frames in flight" in srv.text()):
            assert time.monotonic() < deadline, srv.text()
            time.sleep(0.1)
    finally:
        end(flood)
        srv.stop()


# -- TLS --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def certificate(tmp_path_factory):
    """A self-signed certificate for 127.0.0.1, made here with the openssl command."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("the openssl command is not installed")
    directory = tmp_path_factory.mktemp("tls")
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run([openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-keyout", str(key), "-out", str(cert), "-subj", "/CN=memryx-test",
                    "-addext", "subjectAltName=IP:127.0.0.1"],
                   check=True, capture_output=True, timeout=60)
    return cert, key


@pytest.fixture
def tls_server(tmp_path, token_file, certificate):
    cert, key = certificate
    srv = ServerProcess(tmp_path, "--tcp", LOOPBACK, "--token-file", str(token_file),
                 "--tls-cert", str(cert), "--tls-key", str(key), unix=False)
    yield srv
    srv.stop()


def test_tls_client_trusting_the_certificate(tls_server, certificate, mlp_dfp):
    assert tls_server.tcp.startswith("tcps://")
    ctx = ssl.create_default_context(cafile=str(certificate[0]))
    model = testing.mlp_model()
    xs = frames(100, (1, 16))
    with mx.SyncAccl(mlp_dfp, device=tls_server.tcp, tls=ctx, token="s3cret-of-the-box") as accl:
        outs = accl.run(xs)
        big = accl.run([np.ones((1, 16), np.float32)] * 3)
    assert len(big) == 3
    for x, y in zip(xs, outs, strict=True):
        np.testing.assert_allclose(y, reference(model, x)[0], rtol=1e-5, atol=1e-6)


def test_tls_large_frames_cross_in_many_records(tls_server, certificate):
    ctx = ssl.create_default_context(cafile=str(certificate[0]))
    dfp = mx.NeuralCompiler(models=testing.identity_model((1, 512, 1024))).run()  # 2 MiB
    xs = frames(6, (1, 512, 1024))
    with mx.SyncAccl(dfp, device=tls_server.tcp, tls=ctx, token="s3cret-of-the-box") as accl:
        outs = accl.run(xs)
    for x, y in zip(xs, outs, strict=True):
        np.testing.assert_array_equal(x, y)


def test_tls_client_that_does_not_trust_the_certificate(tls_server, mlp_dfp):
    with pytest.raises(mx.DeviceError, match="cannot reach.*(CERTIFICATE_VERIFY_FAILED|certif)"):
        mx.SyncAccl(mlp_dfp, device=tls_server.tcp, token="s3cret-of-the-box", timeout=10)


def test_tls_wrong_token(tls_server, certificate, mlp_dfp):
    ctx = ssl.create_default_context(cafile=str(certificate[0]))
    with pytest.raises(mx.DeviceError, match="wrong token"):
        mx.SyncAccl(mlp_dfp, device=tls_server.tcp, tls=ctx, token="nope", timeout=10)


def test_plain_tcp_client_against_a_tls_server_fails_within_the_deadline(tls_server, mlp_dfp):
    t0 = time.monotonic()
    with pytest.raises(mx.DeviceError):
        mx.SyncAccl(mlp_dfp, device=f"tcp://127.0.0.1:{tls_server.tcp_port}",
                    token="s3cret-of-the-box", timeout=2)
    assert time.monotonic() - t0 < 2 + 3


def test_preamble_bytes_are_what_the_docs_say():
    assert preamble("ab") == b"MXTK\x02\x00ab"


@pytest.mark.parametrize("tls", [False, True], ids=["tcp", "tls"])
def test_a_stopped_tcp_server_is_a_device_error_within_the_deadline(tmp_path, token_file,
                                                                     certificate, mlp_dfp, tls):
    import signal

    cert, key = certificate
    extra = ["--tls-cert", str(cert), "--tls-key", str(key)] if tls else []
    srv = ServerProcess(tmp_path, "--tcp", LOOPBACK, "--token-file", str(token_file), *extra,
                 unix=False)
    ctx = ssl.create_default_context(cafile=str(cert)) if tls else None
    try:
        accl = mx.SyncAccl(mlp_dfp, device=srv.tcp, token="s3cret-of-the-box", tls=ctx,
                           timeout=2)
        assert len(accl.run(frames(3, (1, 16)))) == 3
        os.kill(srv.proc.pid, signal.SIGSTOP)
        t0 = time.monotonic()
        with pytest.raises(mx.DeviceError, match="has not answered for"):
            accl.run(frames(10, (1, 16)))
        assert time.monotonic() - t0 < 2 + 3
        t0 = time.monotonic()
        accl.close()
        assert time.monotonic() - t0 < 2
        t0 = time.monotonic()  # and a new connection to the stopped server
        with pytest.raises(mx.DeviceError, match="no answer within|did not answer|not answered"):
            mx.SyncAccl(mlp_dfp, device=srv.tcp, token="s3cret-of-the-box", tls=ctx, timeout=2)
        assert time.monotonic() - t0 < 2 + 3
    finally:
        os.kill(srv.proc.pid, signal.SIGCONT)
        srv.stop()
