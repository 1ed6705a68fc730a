"""Stream tags: each FRAME names its stream when both ends agree (HELLO / WELCOME), so the
device server's per-stream modes ("sampled") tell a client's streams apart."""

from __future__ import annotations

import json
import os
import struct
import threading
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import memryx as mx
from memryx import testing
from memryx.device import protocol as p
from memryx.device.protocol import (
    HEADER,
    MAGIC,
    PROTOCOL_VERSION,
    Connection,
    Frame,
    Hello,
    Kind,
    Opened,
    OpenedModel,
    Output,
    ProtocolError,
    Role,
    Welcome,
    dfp_digest,
    pack_arrays,
)
from memryx.pytest_plugin import ServerProcess
from tests.conftest import frames
from tests.device.helpers import raw_unix

pytestmark = pytest.mark.timeout(120)

I64_MIN, I64_MAX = -(1 << 63), (1 << 63) - 1


def _pump(src: Connection, dst: Connection, *events: Any, step: int = 0) -> list[Any]:
    data = b"".join(src.send_bytes(e) for e in events)
    if not step:
        return dst.receive_data(data)
    out: list[Any] = []
    for i in range(0, len(data), step):
        out.extend(dst.receive_data(data[i: i + step]))
    return out


def _opened(ask: bool = True, agree: bool = True, **kw: Any) -> tuple[Connection, Connection]:
    """A client and a server with one model open; ``ask``: the client's HELLO asks for
    stream tags; ``agree``: the server's WELCOME takes them (when asked)."""
    client, server = Connection(Role.CLIENT, **kw), Connection(Role.SERVER, **kw)
    (hello,) = _pump(client, server, Hello("c", 1, stream_tags=ask))
    assert isinstance(hello, Hello) and hello.stream_tags is ask
    (welcome,) = _pump(server, client, Welcome("s", server.max_payload,
                                               stream_tags=agree and hello.stream_tags))
    assert isinstance(welcome, Welcome)
    _pump(client, server, p.Open(dfp_digest(b"dfp"), 0))
    _pump(server, client, Opened((OpenedModel(8),)))
    assert client.stream_tags is server.stream_tags is (ask and agree)
    return client, server


def _raw(kind: int, payload: bytes, *, model: int = 0, seq: int = 0) -> bytes:
    return HEADER.pack(MAGIC, PROTOCOL_VERSION, kind, model, seq, len(payload)) + payload


# -- the protocol ---------------------------------------------------------------------------------
@pytest.mark.parametrize("step", [0, 1, 7])
@pytest.mark.parametrize("stream", [0, 3, -1, -12345, I64_MIN, I64_MAX])
def test_a_tagged_frame_round_trips_its_stream_and_arrays(stream: int, step: int) -> None:
    client, server = _opened()
    arrays = [np.arange(6, dtype=np.float32).reshape(2, 3), np.array([1, 2, 3], np.int64)]
    (frame,) = _pump(client, server, Frame(0, 9, arrays, stream), step=step)
    assert isinstance(frame, Frame) and (frame.model, frame.seq, frame.stream) == (0, 9, stream)
    for got, want in zip(frame.arrays, arrays, strict=True):
        np.testing.assert_array_equal(got, want)
        assert got.flags.writeable and got.ctypes.data % 8 == 0  # still 8-byte aligned


def test_the_tag_is_an_i64_before_the_tensor_pack() -> None:
    client, _ = _opened()
    arrays = [np.ones((1, 4), np.float32)]
    data = client.send_bytes(Frame(0, 1, arrays, -7))
    pack = b"".join(pack_arrays(arrays))
    assert data == HEADER.pack(MAGIC, PROTOCOL_VERSION, Kind.FRAME, 0, 1, 8 + len(pack)) \
        + struct.pack("<q", -7) + pack


def test_a_chunked_tagged_frame_arrives_whole() -> None:
    client, server = _opened(chunk_size=5, max_payload=1 << 20)
    big = np.arange(1000, dtype=np.float32)
    (frame,) = _pump(client, server, Frame(0, 2, [big], 41))
    assert isinstance(frame, Frame) and frame.stream == 41
    np.testing.assert_array_equal(frame.arrays[0], big)


@pytest.mark.parametrize(("ask", "agree"), [(False, False), (True, False)])
def test_without_agreement_frames_travel_untagged_as_before(ask: bool, agree: bool) -> None:
    # an old server ignores HELLO's field (no tags in WELCOME); an old client never asks
    client, server = _opened(ask, agree)
    arrays = [np.ones((1, 4), np.float32)]
    data = client.send_bytes(Frame(0, 1, arrays, 5))
    assert data[p.HEADER_SIZE:] == b"".join(pack_arrays(arrays))  # the version-1 layout
    (frame,) = server.receive_data(data)
    assert isinstance(frame, Frame) and frame.stream == 0
    # outputs never carry a tag
    (out,) = _pump(server, client, Output(0, 1, frame.arrays))
    assert isinstance(out, Output)


def test_a_welcome_agreeing_to_tags_nobody_asked_for_is_refused() -> None:
    client, server = Connection(Role.CLIENT), Connection(Role.SERVER)
    _pump(client, server, Hello("c", 1))
    with pytest.raises(ProtocolError, match="stream tags that HELLO did not ask for"):
        server.send(Welcome("s", 1024, stream_tags=True))
    assert not server.broken  # local misuse: nothing changed
    welcome = _raw(Kind.WELCOME, json.dumps({"protocol": 1, "server": "s", "max_payload": 64,
                                             "stream_tags": True}).encode())
    with pytest.raises(ProtocolError, match="stream tags that HELLO did not ask for"):
        client.receive_data(welcome)
    assert client.broken


@pytest.mark.parametrize("value", ["yes", 1, None, [True], {"on": True}])
def test_a_stream_tags_field_that_is_not_a_bool_is_refused(value: Any) -> None:
    server = Connection(Role.SERVER)
    hello = json.dumps({"protocol": 1, "client": "c", "pid": 1, "stream_tags": value}).encode()
    with pytest.raises(ProtocolError, match="HELLO.stream_tags: expected true or false"):
        server.receive_data(_raw(Kind.HELLO, hello))
    client = Connection(Role.CLIENT)
    client.send(Hello("c", 1, stream_tags=True))
    welcome = json.dumps({"protocol": 1, "server": "s", "max_payload": 64,
                          "stream_tags": value}).encode()
    with pytest.raises(ProtocolError, match="WELCOME.stream_tags: expected true or false"):
        client.receive_data(_raw(Kind.WELCOME, welcome))


@pytest.mark.parametrize("size", range(8))
def test_a_tagged_frame_shorter_than_its_tag_is_refused(size: int) -> None:
    _, server = _opened()
    with pytest.raises(ProtocolError, match=f"FRAME payload truncated: {size} bytes, its "
                                            "stream tag alone needs 8"):
        server.receive_data(_raw(Kind.FRAME, b"\x01" * size, seq=1))
    assert server.broken


def test_a_tag_followed_by_a_bad_pack_is_refused() -> None:
    _, server = _opened()
    with pytest.raises(ProtocolError, match="tensor pack truncated"):
        server.receive_data(_raw(Kind.FRAME, struct.pack("<q", 3) + b"\x01", seq=1))


@pytest.mark.parametrize("stream", [1 << 63, I64_MIN - 1, 1.5, "0", True])
def test_a_stream_the_wire_cannot_carry_is_refused_on_send(stream: Any) -> None:
    client, server = _opened()
    with pytest.raises(ProtocolError, match="FRAME.stream: expected an integer"):
        client.send(Frame(0, 1, [np.zeros(2, np.float32)], stream))
    assert not client.broken  # nothing was sent: the connection goes on
    (frame,) = _pump(client, server, Frame(0, 1, [np.zeros(2, np.float32)], 2))
    assert isinstance(frame, Frame) and frame.stream == 2


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.binary(max_size=200), cut=st.integers(1, 300))
def test_fuzz_tagged_frame_payloads(data: bytes, cut: int) -> None:
    _, server = _opened()
    raw = _raw(Kind.FRAME, data, seq=1)
    try:  # any split (an empty piece would be end of file)
        events = [e for piece in (raw[:cut], raw[cut:]) if piece
                  for e in server.receive_data(piece)]
    except ProtocolError:
        assert server.broken
        return
    (frame,) = events
    assert isinstance(frame, Frame)
    assert frame.stream == struct.unpack_from("<q", data)[0]


# -- a real device server -------------------------------------------------------------------------
def _sampled_dfp() -> mx.Dfp:
    # a modeled chip far faster than this host: in sampled mode most frames are answered
    # with their stream's newest computed outputs
    return mx.NeuralCompiler(models=testing.identity_model((1, 4)), fps=1000000,
                             latency_ms=0.01).run()


def test_two_clients_with_two_streams_each_get_their_own_streams_outputs(tmp_path) -> None:
    """Sampled mode over ``memryx serve``: every output of a stream is one of that stream's
    own frames, for two clients at once, each with cameras 0 and 1 (the server must not
    take one client's camera 0 for the other's)."""
    dfp = _sampled_dfp()
    n_clients, n_streams, n_frames = 2, 2, 150
    srv = ServerProcess(tmp_path, "--mode", "sampled")
    try:
        accls = [mx.MultiStreamAsyncAccl(dfp, device=f"unix:{srv.path}")
                 for _ in range(n_clients)]
        lock = threading.Lock()
        sent = [[0] * n_streams for _ in range(n_clients)]
        got = [[0] * n_streams for _ in range(n_clients)]
        wrong: list[tuple[int, int, float]] = []

        def value(c: int, s: int) -> float:
            return 100.0 * (c * n_streams + s + 1)

        def source(c: int) -> Any:
            def src(s: int) -> Any:
                with lock:
                    if sent[c][s] >= n_frames:
                        return None
                    sent[c][s] += 1
                return np.full((1, 4), value(c, s), np.float32)
            return src

        def sink(c: int) -> Any:
            def out(s: int, y: Any) -> None:
                v = float(np.asarray(y).ravel()[0])
                with lock:
                    got[c][s] += 1
                    if v != value(c, s):
                        wrong.append((c, s, v))
            return out

        try:
            for c, accl in enumerate(accls):  # both clients stream at once
                accl.connect_streams(source(c), sink(c), n_streams)
            for accl in accls:
                accl.wait()
        finally:
            for accl in accls:
                accl.close()
    finally:
        srv.stop()
    assert got == [[n_frames] * n_streams] * n_clients
    assert wrong == []


def test_a_hostile_tagged_frame_ends_only_its_own_connection(tmp_path) -> None:
    """A client that asked for stream tags and sends a FRAME too short for its tag gets the
    protocol's fatal ERROR; the server goes on serving the others (an old, untagged raw
    client among them)."""
    dfp = mx.NeuralCompiler(models=testing.identity_model((1, 16))).run()
    data = dfp.to_bytes()
    srv = ServerProcess(tmp_path)
    try:
        def handshake(tags: bool) -> tuple[Any, Connection]:
            sock = raw_unix(srv.path)
            conn = Connection(Role.CLIENT)
            sock.sendall(conn.send_bytes(Hello("hostile", os.getpid(), stream_tags=tags)))
            (welcome,) = conn.receive_data(sock.recv(4096))
            assert isinstance(welcome, Welcome) and welcome.stream_tags is tags
            sock.sendall(conn.send_bytes(p.Open(dfp_digest(data), 0)))
            if isinstance(conn.receive_data(sock.recv(4096))[0], p.NeedDfp):
                sock.sendall(conn.send_bytes(p.DfpData(data)))
                conn.receive_data(sock.recv(4096))
            return sock, conn

        hostile, _ = handshake(True)
        try:
            hostile.sendall(_raw(Kind.FRAME, b"\xff\xff\xff", seq=1))
            reply = b""
            while chunk := hostile.recv(4096):  # the server says why, then hangs up
                reply += chunk
        finally:
            hostile.close()
        assert b"protocol" in reply and b"FRAME payload truncated" in reply

        old, conn = handshake(False)  # a client that predates stream tags
        try:
            x = np.full((1, 16), 3.0, np.float32)
            old.sendall(conn.send_bytes(Frame(0, 1, [x])))
            events: list[Any] = []
            while not events:
                events = conn.receive_data(old.recv(4096))
            (out,) = events
            assert isinstance(out, Output) and out.seq == 1
            np.testing.assert_array_equal(out.arrays[0], x)
        finally:
            old.close()

        with mx.SyncAccl(dfp, device=srv.address) as accl:
            assert len(accl.run(frames(3, (1, 16)))) == 3
    finally:
        srv.stop()
