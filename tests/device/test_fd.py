"""The fd device and the device server, with real processes: sharing, faults, garbage."""

from __future__ import annotations

import contextlib
import os
import socket
import stat
import struct
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest

import memryx as mx
from memryx import testing
from memryx.device import protocol as p
from memryx.pytest_plugin import ServerProcess
from tests.conftest import frames, reference, settle

CLIENT = textwrap.dedent("""
    import sys, numpy as np, memryx as mx
    from memryx import testing
    import onnxruntime as ort
    seed, n = int(sys.argv[2]), int(sys.argv[3])
    model = testing.mlp_model(seed=seed)
    dfp = mx.NeuralCompiler(models=model).run()
    sess = ort.InferenceSession(model.SerializeToString())
    rng = np.random.default_rng(seed)
    xs = [rng.standard_normal((1, 16)).astype(np.float32) for _ in range(n)]
    with mx.SyncAccl(dfp, device=sys.argv[1]) as accl:
        outs = accl.run(xs)
    bad = sum(not np.allclose(o, sess.run(None, {"x": x})[0], rtol=1e-5, atol=1e-6)
              for o, x in zip(outs, xs))
    print(f"client {seed}: {len(outs)} outputs, {bad} wrong")
    sys.exit(1 if bad or len(outs) != n else 0)
""")

ENDLESS_CLIENT = textwrap.dedent("""
    import sys, numpy as np, memryx as mx
    from memryx import testing
    dfp = mx.NeuralCompiler(models=testing.identity_model((1, 4))).run()
    accl = mx.AsyncAccl(dfp, device=sys.argv[1])
    accl.connect_input(lambda: np.zeros((1, 4), np.float32))
    accl.connect_output(lambda y: print("out", flush=True))
    accl.wait()
""")


def test_socket_is_owner_only(server):
    assert stat.S_IMODE(os.stat(server.path).st_mode) == 0o600
    assert stat.S_ISSOCK(os.stat(server.path).st_mode)


def test_several_processes_share_one_server(server):
    procs = [subprocess.Popen([sys.executable, "-c", CLIENT, server.address, str(seed), "300"],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for seed in range(3)]
    # and this process too, at the same time
    model = testing.mobilenet_like()
    dfp = mx.NeuralCompiler(models=model).run()
    xs = frames(40, (1, 3, 64, 64))
    with mx.SyncAccl(dfp, device=server.address) as accl:
        outs = accl.run(xs)
    for x, y in zip(xs, outs, strict=True):
        np.testing.assert_allclose(y, reference(model, x)[0], rtol=1e-5, atol=1e-6)
    for proc in procs:
        out, _ = proc.communicate(timeout=60)
        assert proc.returncode == 0, out
        assert "0 wrong" in out


def test_server_killed_mid_run_raises_device_error_promptly(server, identity_dfp):
    accl = mx.AsyncAccl(identity_dfp, device=server.address)
    outputs = []
    accl.connect_input(lambda: np.zeros((1, 4), np.float32))
    accl.connect_output(outputs.append)
    assert settle(lambda: len(outputs) >= 50, 10), "outputs never flowed"
    server.kill()
    killed = time.monotonic()
    with pytest.raises(mx.DeviceError, match=r"frame\(s\) sent and never returned") as info:
        accl.wait()
    assert time.monotonic() - killed < 1.5
    assert info.value.lost_frames >= 0
    assert str(info.value.lost_frames) in str(info.value)


def test_server_killed_under_syncaccl_run(server, mlp_dfp):
    accl = mx.SyncAccl(mlp_dfp, device=server.address)
    accl.run(np.zeros((1, 16), np.float32))
    server.kill()
    with pytest.raises(mx.DeviceError, match="device server"):
        accl.run(frames(100, (1, 16)))
    accl.close()  # the error reached run() already: close does not raise it again


def test_new_accelerator_connects_after_a_server_restart(tmp_path, mlp_dfp):
    srv = ServerProcess(tmp_path)
    try:
        with mx.SyncAccl(mlp_dfp, device=srv.address) as accl:
            accl.run(np.zeros((1, 16), np.float32))
        srv.kill()
        with pytest.raises(mx.DeviceError, match="cannot reach the device server"):
            mx.SyncAccl(mlp_dfp, device=srv.address)
    finally:
        srv.stop()
    srv = ServerProcess(tmp_path)  # the stale socket file is replaced
    try:
        with mx.SyncAccl(mlp_dfp, device=srv.address) as accl:
            assert accl.run(np.zeros((1, 16), np.float32)).shape == (1, 10)
    finally:
        srv.stop()


def test_client_killed_mid_run_frees_its_resources(server, mlp_dfp):
    proc = subprocess.Popen([sys.executable, "-c", ENDLESS_CLIENT, server.address],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert proc.stdout is not None
        for _ in range(20):  # it is running: outputs flow
            assert proc.stdout.readline().startswith("out")
    finally:
        proc.kill()
        proc.wait(10)
        if proc.stdout:
            proc.stdout.close()
    # the server goes on serving others, and no longer counts the dead client
    with mx.SyncAccl(mlp_dfp, device=server.address) as accl:
        assert accl.run(np.zeros((1, 16), np.float32)).shape == (1, 10)
    # the server logged the killed client's disconnect, and its count ends at zero once
    # this test's second client has gone too (wait for those lines, not a fixed time)
    def killed_gone(lines: list[str]) -> bool:
        return any(f"pid {proc.pid} " in line and "disconnected" in line for line in lines)

    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        lines = [line for line in server.text().splitlines() if "connected (" in line]
        if killed_gone(lines) and "(0 connected)" in lines[-1]:
            break
        time.sleep(0.05)
    assert killed_gone(lines), lines
    assert "disconnected (0 connected)" in lines[-1], lines


def _raw(server: ServerProcess) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(5)
    sock.connect(str(server.path))
    return sock


def _read_all(sock: socket.socket) -> bytes:
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


@pytest.mark.parametrize("garbage", [
    b"GET / HTTP/1.1\r\n\r\n",                                   # another protocol
    p.HEADER.pack(b"MX", 1, 1, 0, 0, 0xFFFFFFF0),               # a HELLO claiming ~4 GiB
    p.HEADER.pack(b"MX", 99, 1, 0, 0, 0),                       # an unknown version
    p.HEADER.pack(b"MX", 1, 7, 0, 0, 8) + b"\0" * 8,            # a FRAME before the handshake
    p.HEADER.pack(b"MX", 1, 1, 0, 0, 3) + b"{x}",               # HELLO with bad JSON
    bytes(range(256)) * 8,
], ids=["http", "oversized", "version", "frame-first", "bad-json", "noise"])
def test_garbage_from_a_raw_socket_hurts_nobody_else(server, mlp_dfp, garbage):
    with mx.SyncAccl(mlp_dfp, device=server.address) as accl:
        before = accl.run(frames(20, (1, 16)))
        sock = _raw(server)
        try:
            sock.sendall(garbage)
            reply = _read_all(sock)  # the server answers with an error and hangs up
        finally:
            sock.close()
        conn = p.Connection(p.Role.CLIENT)
        conn.send(p.Hello("probe", 1))
        if reply:
            magic, _, kind, *_ = p.HEADER.unpack_from(reply)
            assert magic == b"MX" and kind == p.Kind.ERROR
            assert b"fatal" in reply
        after = accl.run(frames(20, (1, 16)))
    assert len(before) == len(after) == 20


def test_a_truncated_message_then_hang_up(server, mlp_dfp):
    sock = _raw(server)
    sock.sendall(p.HEADER.pack(b"MX", 1, 1, 0, 0, 100) + b'{"protocol"')
    sock.close()
    with mx.SyncAccl(mlp_dfp, device=server.address) as accl:
        assert accl.run(np.zeros((1, 16), np.float32)).shape == (1, 10)


def test_more_frames_than_the_capacity_is_refused(server, mlp_dfp):
    conn = p.Connection(p.Role.CLIENT)
    sock = _raw(server)
    try:
        def roundtrip(event):
            sock.sendall(conn.send_bytes(event))
            while True:
                events = conn.receive_data(sock.recv(65536))
                if events:
                    return events[0]

        roundtrip(p.Hello("flood", os.getpid()))
        data = mlp_dfp.to_bytes()
        reply = roundtrip(p.Open(p.dfp_digest(data), 0))
        if isinstance(reply, p.NeedDfp):
            reply = roundtrip(p.DfpData(data))
        assert isinstance(reply, p.Opened)
        cap = reply.models[0].capacity
        x = [np.zeros((1, 16), np.float32)]
        # a well-behaved client never has more than `cap` frames in flight; flood it
        for seq in range(cap * 50):
            try:
                sock.sendall(b"".join(bytes(b) for b in conn.send(p.Frame(0, seq, x))))
            except (BrokenPipeError, ConnectionResetError):
                break
        rest = b""
        with contextlib.suppress(ConnectionResetError, TimeoutError):
            rest = _read_all(sock)
        assert b"in flight" in rest or rest == b""
    finally:
        sock.close()


def test_scheduler_shares_the_chip_between_clients(tmp_path):
    srv = ServerProcess(tmp_path, "--frame-limit", "5", "--mode", "fast")
    try:
        dfps = [mx.NeuralCompiler(models=testing.mlp_model(seed=s)).run() for s in range(2)]
        results: dict[int, list[np.ndarray]] = {}

        def client(i: int) -> None:
            with mx.SyncAccl(dfps[i], device=srv.address) as accl:
                results[i] = accl.run(frames(200, (1, 16), seed=i))

        threads = [threading.Thread(target=client, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        for i in range(2):
            model = testing.mlp_model(seed=i)
            for x, y in zip(frames(200, (1, 16), seed=i), results[i], strict=True):
                np.testing.assert_allclose(y, reference(model, x)[0], rtol=1e-5, atol=1e-6)
    finally:
        srv.stop()


def test_wrong_group_id_over_fd_is_the_same_error(server, mlp_dfp):
    with pytest.raises(mx.ModelIndexError, match="group_id 2 out of range"):
        mx.SyncAccl(mlp_dfp, group_id=2, device=server.address)


def test_unreachable_server_is_a_clear_error(tmp_path, mlp_dfp):
    with pytest.raises(mx.DeviceError, match="cannot reach the device server at .*nowhere"):
        mx.SyncAccl(mlp_dfp, device=f"unix:{tmp_path / 'nowhere.sock'}")


def test_fd_device_takes_no_simulator_options(server, mlp_dfp):
    with pytest.raises(TypeError, match="takes no options"):
        mx.SyncAccl(mlp_dfp, device=server.address, mode="fast")


def test_header_struct_is_what_the_docs_say():
    assert p.HEADER.size == 16
    assert struct.calcsize("<2sBBIII") == 16
