"""The sans-I/O device protocol: framing, tensor packs, JSON payloads and the state machine."""

from __future__ import annotations

import json
import struct
import tracemalloc
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from memryx._exceptions import MemryxError
from memryx.device import protocol as p
from memryx.device.protocol import (
    HEADER,
    HEADER_SIZE,
    MAGIC,
    PROTOCOL_VERSION,
    Bye,
    Close,
    Closed,
    Connection,
    DfpData,
    Error,
    Event,
    Frame,
    Hello,
    Kind,
    NeedDfp,
    Open,
    Opened,
    OpenedModel,
    Output,
    ProtocolError,
    Role,
    State,
    Stats,
    StatsReply,
    Welcome,
    dfp_digest,
    pack_arrays,
    unpack_arrays,
)

DFP = b"not really a dfp, but bytes all the same" * 10
Chunker = Callable[[bytes], Iterable[bytes]]


def whole(data: bytes) -> list[bytes]:
    return [data]


def bytewise(data: bytes) -> list[bytes]:
    return [data[i: i + 1] for i in range(len(data))]


def pump(src: Connection, dst: Connection, *events: Event, chunks: Chunker = whole
         ) -> list[Event]:
    """Send ``events`` from ``src`` and feed the bytes to ``dst`` in ``chunks``."""
    data = b"".join(src.send_bytes(e) for e in events)
    out: list[Event] = []
    for chunk in chunks(data):
        out.extend(dst.receive_data(chunk))
    return out


def handshake(chunks: Chunker = whole, **kw: Any) -> tuple[Connection, Connection]:
    client, server = Connection(Role.CLIENT, **kw), Connection(Role.SERVER, **kw)
    assert pump(client, server, Hello("test", 42), chunks=chunks) == [Hello("test", 42)]
    welcome = Welcome("sim", server.max_payload)
    assert pump(server, client, welcome, chunks=chunks) == [welcome]
    return client, server


def opened(n_models: int = 2, chunks: Chunker = whole, **kw: Any) -> tuple[Connection, Connection]:
    client, server = handshake(chunks, **kw)
    pump(client, server, Open(dfp_digest(DFP), 0), chunks=chunks)
    models = Opened(tuple(OpenedModel(4) for _ in range(n_models)))
    assert pump(server, client, models, chunks=chunks) == [models]
    return client, server


def header(kind: int, length: int = 0, *, model: int = 0, seq: int = 0,
           magic: bytes = MAGIC, version: int = 1) -> bytes:
    return HEADER.pack(magic, version, kind, model, seq, length)


def message(kind: int, payload: bytes = b"", **kw: Any) -> bytes:
    return header(kind, len(payload), **kw) + payload


def js(obj: Any) -> bytes:
    return json.dumps(obj).encode()


def same_arrays(got: Sequence[np.ndarray], want: Sequence[np.ndarray]) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        assert g.dtype == w.dtype and g.shape == w.shape
        np.testing.assert_array_equal(g, w)


def sample_arrays() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [
        rng.standard_normal((1, 3, 4, 4)).astype(np.float32),
        np.arange(7, dtype=np.int64),
        np.array(2.5, np.float16),
        np.zeros((0, 5), np.uint8),
        np.array([[True, False], [False, True]]),
    ]


def raises(conn: Connection, data: bytes, match: str) -> ProtocolError:
    with pytest.raises(ProtocolError, match=match) as info:
        conn.receive_data(data)
    assert conn.broken
    return info.value


# -- round trips ------------------------------------------------------------------------------
@pytest.mark.parametrize("chunks", [whole, bytewise], ids=["whole", "bytewise"])
def test_every_event_round_trips(chunks: Chunker) -> None:
    client, server = handshake(chunks)
    assert {client.state, server.state} == {State.IDLE}
    assert client.send_limit == server.max_payload

    op = Open(dfp_digest(DFP), 3)
    assert pump(client, server, op, chunks=chunks) == [op]
    assert pump(server, client, NeedDfp(), chunks=chunks) == [NeedDfp()]
    got = pump(client, server, DfpData(DFP), chunks=chunks)
    assert got == [DfpData(DFP)] and isinstance(got[0], DfpData) and type(got[0].data) is bytes
    assert server.state is State.LOADING
    models = Opened((OpenedModel(4), OpenedModel(1)))
    assert pump(server, client, models, chunks=chunks) == [models]
    assert client.models == server.models == models.models
    assert {client.state, server.state} == {State.OPEN}

    arrays = sample_arrays()
    (frame,) = pump(client, server, Frame(1, 77, arrays), chunks=chunks)
    assert isinstance(frame, Frame) and (frame.model, frame.seq) == (1, 77)
    same_arrays(frame.arrays, arrays)
    (out,) = pump(server, client, Output(1, 77, frame.arrays), chunks=chunks)
    assert isinstance(out, Output) and (out.model, out.seq) == (1, 77)
    same_arrays(out.arrays, arrays)

    assert pump(client, server, Stats(9), chunks=chunks) == [Stats(9)]
    reply = StatsReply(9, {"frames": {"0": 1}, "name": "sim ✓", "load": 0.5, "x": None})
    assert pump(server, client, reply, chunks=chunks) == [reply]
    err = Error("bad-frame", "frame 77 failed", False, model=1, seq=77)
    assert pump(server, client, err, chunks=chunks) == [err]
    assert pump(client, server, Error("oops", "client side", False), chunks=chunks) == [
        Error("oops", "client side", False)]

    assert pump(client, server, Close(), chunks=chunks) == [Close()]
    assert client.local_done and server.remote_done
    # outputs still in flight after CLOSE are fine, then BYE
    assert len(pump(server, client, Output(0, 78, []), chunks=chunks)) == 1
    assert pump(server, client, Bye(), chunks=chunks) == [Bye()]
    assert client.remote_done and server.local_done
    assert client.receive_data(b"") == [Closed()]
    assert server.receive_data(memoryview(b"")) == [Closed()]
    assert client.peer_closed and not client.broken


def test_cached_dfp_skips_need_dfp() -> None:
    client, _server = opened(n_models=1)
    assert client.state is State.OPEN and client.models == (OpenedModel(4),)


def test_server_may_refuse_hello_with_a_fatal_error() -> None:
    client, server = Connection(Role.CLIENT), Connection(Role.SERVER)
    pump(client, server, Hello("c", 1))
    err = Error("busy", "too many clients", True)
    assert pump(server, client, err) == [err]
    assert client.remote_done and server.local_done


def test_many_messages_in_one_chunk_and_split_anywhere() -> None:
    client, server = opened()
    frames = [Frame(i % 2, i, [np.full((2, 3), i, np.int32)]) for i in range(50)]
    tail: list[Event] = [Stats(1), Close()]
    data = b"".join(client.send_bytes(f) for f in [*frames, *tail])
    assert len(server.receive_data(data)) == 52
    for cut in (1, 15, 16, 17, len(data) // 2, len(data) - 1):
        _, fresh = opened()
        events = fresh.receive_data(data[:cut]) + fresh.receive_data(data[cut:])
        assert len(events) == 52 and events[-2:] == [Stats(1), Close()]
        for i, ev in enumerate(events[:50]):
            assert isinstance(ev, Frame) and ev.seq == i and ev.model == i % 2
            same_arrays(ev.arrays, [np.full((2, 3), i, np.int32)])


def test_received_arrays_are_zero_copy_and_independent_of_later_data() -> None:
    client, server = opened()
    (first,) = pump(client, server, Frame(0, 1, [np.arange(4, dtype=np.float32)]))
    (second,) = pump(client, server, Frame(0, 2, [np.full(4, 9, np.float32)]))
    assert isinstance(first, Frame) and isinstance(second, Frame)
    np.testing.assert_array_equal(first.arrays[0], np.arange(4, dtype=np.float32))
    assert not np.shares_memory(first.arrays[0], second.arrays[0])
    assert first.arrays[0].flags.writeable  # the event owns its buffer alone
    first.arrays[0][0] = 5
    np.testing.assert_array_equal(second.arrays[0], np.full(4, 9, np.float32))


def test_send_does_not_copy_frame_or_dfp_data() -> None:
    client, _server = opened()
    big = np.arange(1000, dtype=np.float64)
    pieces = client.send(Frame(0, 0, [big]))
    views = [x for x in pieces if isinstance(x, memoryview)]
    assert len(views) == 1 and np.shares_memory(np.frombuffer(views[0], np.uint8), big)
    # header, count, code + ndim + one dim (already 8-aligned), data
    assert sum(len(x) if isinstance(x, bytes) else x.nbytes for x in pieces) == (
        HEADER.size + 2 + 6 + big.nbytes)

    c2, s2 = handshake()
    pump(c2, s2, Open(dfp_digest(DFP), 0))
    pump(s2, c2, NeedDfp())
    dfp = bytearray(DFP)
    views = [x for x in c2.send(DfpData(dfp)) if isinstance(x, memoryview)]
    assert len(views) == 1 and views[0].obj is dfp


def test_receive_data_takes_any_buffer() -> None:
    _, server = opened()
    data = opened()[0].send_bytes(Stats(4)) + opened()[0].send_bytes(Stats(5))  # 32 bytes
    words = np.frombuffer(data, np.uint32).reshape(2, 4)  # a 2-d, non-byte buffer
    assert server.receive_data(words.data) == [Stats(4), Stats(5)]
    assert server.receive_data(bytearray(opened()[0].send_bytes(Stats(6)))) == [Stats(6)]


def test_frame_events_compare_by_identity() -> None:
    f = Frame(0, 0, [np.zeros(2)])
    assert f == f and f != Frame(0, 0, [np.zeros(2)])


# -- tensor pack ------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [dt.name for dt in p.DTYPE_CODES.values()])
@pytest.mark.parametrize("shape", [(), (0,), (3, 0, 2), (5,), (2, 3, 4), (1,) * 8])
def test_pack_unpack_every_dtype(dtype: str, shape: tuple[int, ...]) -> None:
    a = np.random.default_rng(1).integers(0, 100, shape).astype(dtype)
    buf = b"".join(pack_arrays([a, a]))
    for copy in (True, False):
        got = unpack_arrays(memoryview(buf), copy=copy)
        same_arrays(got, [a, a])


def test_pack_layout_is_aligned_and_little_endian() -> None:
    arrays: list[np.ndarray] = [np.array([1], np.uint8), np.array([1.0], np.float64),
                                np.ones((2, 2, 2), np.int16)]
    buf = b"".join(pack_arrays(arrays))
    assert buf[:2] == struct.pack("<H", 3)
    # array 0: code, ndim, one dim -> 8 bytes in, already aligned
    assert buf[2:8] == struct.pack("<BBI", 4, 1, 1) and buf[8] == 1
    # array 1 header at 9: 6 bytes -> 15, padded to 16
    assert buf[9:15] == struct.pack("<BBI", 3, 1, 1) and buf[15] == 0
    assert buf[16:24] == struct.pack("<d", 1.0)
    for got in (unpack_arrays(buf, copy=False), unpack_arrays(bytearray(buf), copy=False)):
        same_arrays(got, arrays)


def test_pack_is_zero_copy_for_contiguous_arrays() -> None:
    a = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    views = [x for x in pack_arrays([a]) if isinstance(x, memoryview)]
    assert len(views) == 1 and views[0].nbytes == a.nbytes
    assert np.shares_memory(np.frombuffer(views[0], np.uint8), a)


@pytest.mark.parametrize("make", [
    lambda a: a[:, ::2], lambda a: a.T, lambda a: np.asfortranarray(a), lambda a: a[::-1],
    lambda a: a.astype(">f4"),
], ids=["strided", "transposed", "fortran", "reversed", "big-endian"])
def test_pack_makes_odd_arrays_contiguous(make: Callable[[np.ndarray], np.ndarray]) -> None:
    a = make(np.arange(30, dtype=np.float32).reshape(5, 6))
    (got,) = unpack_arrays(b"".join(pack_arrays([a])))
    assert got.dtype == np.dtype("<f4") and got.flags.c_contiguous
    np.testing.assert_array_equal(got, a)


def test_unpack_copy_false_gives_read_only_views() -> None:
    a = np.arange(10, dtype=np.int32)
    buf = bytearray(b"".join(pack_arrays([a])))
    (view,) = unpack_arrays(memoryview(buf), copy=False)
    assert not view.flags.writeable
    assert np.shares_memory(view, np.frombuffer(buf, np.uint8))
    with pytest.raises(ValueError, match="read-only"):
        view[0] = 1
    buf[-4:] = struct.pack("<i", 99)  # a view, not a copy
    assert view[-1] == 99
    (owned,) = unpack_arrays(memoryview(buf), copy=True)
    assert owned.flags.writeable and owned.flags.owndata
    assert not np.shares_memory(owned, np.frombuffer(buf, np.uint8))


def test_unpack_takes_any_byte_buffer() -> None:
    a = np.arange(6, dtype=np.int16)
    buf = b"".join(pack_arrays([a, a]))
    words = np.frombuffer(buf, np.int8).reshape(2, -1)  # signed, 2-d
    same_arrays(unpack_arrays(words.data, copy=False), [a, a])


def test_empty_pack() -> None:
    assert unpack_arrays(b"".join(pack_arrays([]))) == []


@pytest.mark.parametrize(("arrays", "match"), [
    ([np.zeros(2, np.complex64)], "dtype complex64"),
    ([np.array(["x"])], "dtype <U1"),
    ([np.zeros(2, dtype=[("a", "<i4")])], "dtype"),
    ([np.zeros((1,) * 9, np.uint8)], "9 dimensions"),
    ([np.zeros(1, np.uint8)] * (p.MAX_ARRAYS + 1), "1025 arrays"),
])
def test_pack_rejects(arrays: list[np.ndarray], match: str) -> None:
    with pytest.raises(ProtocolError, match=match):
        pack_arrays(arrays)


def test_pack_rejects_non_arrays() -> None:
    with pytest.raises(TypeError, match="not an ndarray"):
        pack_arrays([[1, 2]])  # type: ignore[list-item]


def pack_raw(*arrays: tuple[int, int, Sequence[int], bytes], count: int | None = None,
             pad: bytes | None = None) -> bytes:
    out = bytearray(struct.pack("<H", len(arrays) if count is None else count))
    for code, ndim, dims, data in arrays:
        out += struct.pack(f"<BB{len(dims)}I", code, ndim, *dims)
        n = -len(out) % 8
        out += (pad or bytes(n))[:n]
        out += data
    return bytes(out)


@pytest.mark.parametrize(("buf", "match"), [
    (b"", "truncated"),
    (b"\x01", "truncated"),
    (struct.pack("<H", 1025), "1025 arrays"),
    (struct.pack("<H", 1), "truncated"),
    (pack_raw((0, 1, [1], b"\0")), "unknown dtype code 0"),
    (pack_raw((11, 1, [1], b"\0")), "unknown dtype code 11"),
    (pack_raw((255, 0, [], b"\0")), "unknown dtype code 255"),
    (pack_raw((4, 9, [1] * 9, b"\0")), "9 dimensions"),
    (pack_raw((4, 3, [1], b"")), "dims missing"),
    (pack_raw((4, 8, [0xFFFFFFFF] * 8, b"")), "overflow"),
    (pack_raw((1, 4, [0, 0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF], b"")), "overflow"),
    (pack_raw((9, 2, [0xFFFF, 0xFFFF], b"\0" * 64)), f"needs {8 * 0xFFFF**2} bytes, only 64"),
    (pack_raw((1, 1, [2], b"\0" * 7)), "needs 8 bytes, only 7"),
    (pack_raw((1, 1, [2], b"\0" * 9)), "1 unexpected trailing bytes"),
    (pack_raw((4, 1, [1], b"\0"), count=2), "truncated"),
    (pack_raw((4, 0, [], b"\0"), pad=b"\1" * 8), "non-zero padding"),
    (pack_raw((4, 0, [], b"\0"))[:5], "padding missing"),
    (pack_raw((10, 1, [3], b"\0\1\2")), "bool.* other than 0 or 1"),
])
def test_unpack_rejects(buf: bytes, match: str) -> None:
    for copy in (True, False):
        with pytest.raises(ProtocolError, match=match):
            unpack_arrays(buf, copy=copy)


def test_unpack_accepts_empty_arrays_with_large_dims() -> None:
    (a,) = unpack_arrays(pack_raw((1, 3, [0, 0xFFFFFFFF, 4], b"")))
    assert a.shape == (0, 0xFFFFFFFF, 4) and a.size == 0


def test_every_prefix_of_a_pack_is_rejected() -> None:
    buf = b"".join(pack_arrays(sample_arrays()))
    for n in range(len(buf)):
        with pytest.raises(ProtocolError):
            unpack_arrays(buf[:n])


# -- header rejections ------------------------------------------------------------------------
def test_bad_magic_is_caught_on_its_first_byte() -> None:
    server = Connection(Role.SERVER)
    raises(server, b"G", r"bad magic b'G', expected b'MX'")
    raises(Connection(Role.SERVER), b"MY" + bytes(14), "bad magic b'MY'")
    raises(Connection(Role.SERVER), b"GET / HTTP/1.1\r\n", "bad magic")


@pytest.mark.parametrize("version", [0, 2, 255])
def test_unknown_version(version: int) -> None:
    raises(Connection(Role.SERVER), header(Kind.HELLO, version=version)[:3],
           f"unsupported protocol version {version}")


@pytest.mark.parametrize("kind", [0, 15, 200, 255])
def test_unknown_kind(kind: int) -> None:
    raises(Connection(Role.SERVER), header(kind)[:4], f"unknown message kind {kind}")


def test_oversized_length_is_rejected_without_allocating() -> None:
    tracemalloc.start()
    try:
        server = Connection(Role.SERVER)
        _client, srv = opened()
        tracemalloc.reset_peak()
        raises(server, header(Kind.HELLO, 0xFFFFFFFF), "HELLO payload length 4294967295 "
               "exceeds max_payload 67108864")
        raises(srv, header(Kind.FRAME, p.DEFAULT_MAX_PAYLOAD + 1),
               f"FRAME payload length {p.DEFAULT_MAX_PAYLOAD + 1} exceeds max_payload")
        # within the limit: the buffer grows with the bytes received, not with the claim
        _c2, s2 = opened()
        s2.receive_data(header(Kind.FRAME, p.DEFAULT_MAX_PAYLOAD) + bytes(1000))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 256 * 1024, peak


def test_max_payload_is_configurable() -> None:
    client, server = opened(max_payload=4096)
    assert client.send_limit == 4096
    with pytest.raises(ProtocolError, match="exceeds the limit of 4096"):
        client.send(Frame(0, 0, [np.zeros(1024, np.float32)]))  # 4096 + pack header
    client.send(Frame(0, 0, [np.zeros(1000, np.float32)]))
    raises(server, header(Kind.FRAME, 4097), "exceeds max_payload 4096")
    for bad in (0, -1, 2**51, True, 1.5):
        with pytest.raises(ValueError, match="max_payload"):
            Connection(Role.CLIENT, max_payload=bad)  # type: ignore[arg-type]


def test_client_obeys_the_servers_announced_limit() -> None:
    client, server = Connection(Role.CLIENT), Connection(Role.SERVER, max_payload=10_000)
    pump(client, server, Hello("c", 1))
    with pytest.raises(ProtocolError, match="WELCOME.max_payload"):
        server.send(Welcome("s", 10_001))  # more than it accepts itself
    pump(server, client, Welcome("s", 2000))
    assert client.send_limit == 2000


@pytest.mark.parametrize(("kind", "length", "match"), [
    (Kind.CLOSE, 1, "CLOSE payload length 1, must be 0"),
    (Kind.STATS, 4, "STATS payload length 4, must be 0"),
    (Kind.OPEN, 35, "OPEN payload length 35, must be 36"),
    (Kind.OPEN, 37, "OPEN payload length 37, must be 36"),
    (Kind.STATS_REPLY, p.MAX_JSON_BYTES + 1, "exceeds the JSON limit"),
])
def test_lengths_a_kind_cannot_have(kind: Kind, length: int, match: str) -> None:
    client, server = handshake()
    pump(client, server, Stats(7))
    if kind is Kind.STATS_REPLY:
        raises(client, header(kind, length, seq=7), match)
    else:
        raises(server, header(kind, length), match)


def test_unused_header_fields_must_be_zero() -> None:
    _, server = handshake()
    raises(server, header(Kind.CLOSE, model=1), "header model must be 0")
    _, server = handshake()
    raises(server, header(Kind.CLOSE, seq=1), "header seq must be 0")


# -- JSON payloads ----------------------------------------------------------------------------
def deep(n: int) -> bytes:
    return b'{"a":' * n + b"1" + b"}" * n


@pytest.mark.parametrize(("payload", "match"), [
    (b"\xff\xfe{}", "not valid UTF-8 JSON"),
    (b'{"protocol": 1,', "not valid UTF-8 JSON"),
    (b"[1, 2]", "must be a JSON object, got list"),
    (b"7", "must be a JSON object, got int"),
    (b'"x"', "must be a JSON object, got str"),
    (b"null", "must be a JSON object, got NoneType"),
    (deep(17), "nested deeper than 16"),
    (deep(100_000), "nested deeper than 16"),
    (b'{"protocol": 1, "client": "c", "pid": NaN}', "NaN"),
    (js({"protocol": 2, "client": "c", "pid": 1}), "protocol 2 is not supported"),
    (js({"protocol": True, "client": "c", "pid": 1}), "protocol True is not supported"),
    (js({"protocol": 1, "pid": 1}), "HELLO.client: expected a string"),
    (js({"protocol": 1, "client": "c", "pid": True}), "HELLO.pid"),
    (js({"protocol": 1, "client": "c", "pid": -1}), "HELLO.pid"),
])
def test_bad_hello_payloads(payload: bytes, match: str) -> None:
    raises(Connection(Role.SERVER), message(Kind.HELLO, payload), match)


def test_json_at_the_depth_limit_is_fine() -> None:
    server = Connection(Role.SERVER)
    obj = b'{"protocol": 1, "client": "c", "pid": 1, "x": ' + deep(15) + b"}"
    assert server.receive_data(message(Kind.HELLO, obj)) == [Hello("c", 1)]


@pytest.mark.parametrize(("payload", "match"), [
    (js({"models": []}), "1..256 models"),
    (js({"models": [{"capacity": 0}]}), "capacity"),
    (js({"models": [{}]}), "capacity"),
    (js({"models": [3]}), r"models\[0\]: expected an object"),
    (js({}), "models"),
])
def test_bad_opened_payloads(payload: bytes, match: str) -> None:
    client, server = handshake()
    pump(client, server, Open(dfp_digest(DFP), 0))
    raises(client, message(Kind.OPENED, payload), match)


@pytest.mark.parametrize(("payload", "match"), [
    (js({"code": 1, "message": "m", "fatal": False}), "ERROR.code"),
    (js({"code": "c", "message": "m", "fatal": 0}), "ERROR.fatal"),
    (js({"code": "c", "fatal": True}), "ERROR.message"),
])
def test_bad_error_payloads(payload: bytes, match: str) -> None:
    client, _server = handshake()
    raises(client, message(Kind.ERROR, payload), match)


def test_welcome_payload_is_checked() -> None:
    client = Connection(Role.CLIENT)
    client.send(Hello("c", 1))
    raises(client, message(Kind.WELCOME, js({"protocol": 1, "server": "s", "max_payload": 0})),
           "WELCOME.max_payload")


def test_unencodable_json_is_refused_on_send() -> None:
    client, server = opened()
    pump(client, server, Stats(1))
    cases: list[tuple[dict[str, Any], str]] = [
        ({"x": object()}, "cannot be encoded"),
        ({"x": float("nan")}, "cannot be encoded"),
        ({"x": [[[[[[[[[[[[[[[[[1]]]]]]]]]]]]]]]]]}, "nested deeper"),
        ({"x": "a" * p.MAX_JSON_BYTES}, "at most"),
    ]
    for data, match in cases:
        with pytest.raises(ProtocolError, match=match):
            server.send(StatsReply(1, data))
    assert not server.broken
    assert pump(server, client, StatsReply(1, {"ok": True})) == [StatsReply(1, {"ok": True})]


# -- DFP upload -------------------------------------------------------------------------------
def test_dfp_hash_mismatch() -> None:
    client, server = handshake()
    pump(client, server, Open(dfp_digest(DFP), 0))
    pump(server, client, NeedDfp())
    # the sender is not re-checked (it named the hash it computed: one hash per open) ...
    data = client.send_bytes(DfpData(DFP + b"x"))
    # ... the receiver is
    with pytest.raises(ProtocolError, match="does not match the hash named by OPEN"):
        server.receive_data(data)


def test_open_payload_checks_on_send() -> None:
    client, _ = handshake()
    with pytest.raises(ProtocolError, match="32 bytes"):
        client.send(Open(b"short", 0))
    with pytest.raises(ProtocolError, match="group_id"):
        client.send(Open(dfp_digest(DFP), -1))


# -- end of file ------------------------------------------------------------------------------
def test_truncated_close_mid_header_and_mid_payload() -> None:
    client, server = opened()
    data = client.send_bytes(Frame(0, 0, [np.zeros(10, np.float32)]))
    server.receive_data(data[:7])
    raises(server, b"", "truncated header, 7 of 16")
    client, server = opened()
    server.receive_data(data[:30])
    raises(server, b"", "truncated FRAME, 14 of")


def test_clean_close_then_no_more_data() -> None:
    _client, server = opened()
    assert server.receive_data(b"") == [Closed()]
    with pytest.raises(ProtocolError, match="after the peer closed"):
        server.receive_data(b"MX")


# -- roles and states -------------------------------------------------------------------------
@pytest.mark.parametrize(("role", "kind", "match"), [
    (Role.SERVER, Kind.OUTPUT, "only the server sends OUTPUT"),
    (Role.SERVER, Kind.WELCOME, "only the server sends WELCOME"),
    (Role.SERVER, Kind.BYE, "only the server sends BYE"),
    (Role.CLIENT, Kind.FRAME, "only the client sends FRAME"),
    (Role.CLIENT, Kind.HELLO, "only the client sends HELLO"),
    (Role.CLIENT, Kind.DFP, "only the client sends DFP"),
])
def test_wrong_role_kinds_are_rejected(role: Role, kind: Kind, match: str) -> None:
    client, server = opened()
    conn = server if role is Role.SERVER else client
    raises(conn, header(kind, 4), match)  # rejected at the header, before any payload


def test_wrong_role_sends_are_refused() -> None:
    client, server = opened()
    with pytest.raises(ProtocolError, match="cannot send OUTPUT: a client never sends it"):
        client.send(Output(0, 0, []))
    with pytest.raises(ProtocolError, match="cannot send FRAME: a server never sends it"):
        server.send(Frame(0, 0, []))
    with pytest.raises(TypeError, match="not a sendable"):
        client.send(Closed())
    assert not client.broken and not server.broken


def test_wrong_state_sends_are_refused_and_change_nothing() -> None:
    client, server = Connection(Role.CLIENT), Connection(Role.SERVER)
    with pytest.raises(ProtocolError, match="OPEN from the client is not allowed in state "
                                            "AWAIT_HELLO"):
        client.send(Open(dfp_digest(DFP), 0))
    with pytest.raises(ProtocolError, match="first message must be HELLO"):
        client.send(Error("x", "y", True))
    with pytest.raises(ProtocolError, match="WELCOME from the server is not allowed"):
        server.send(Welcome("s", 10))
    pump(client, server, Hello("c", 1))
    with pytest.raises(ProtocolError, match="HELLO from the client is not allowed"):
        client.send(Hello("c", 1))
    with pytest.raises(ProtocolError, match="must be fatal"):
        server.send(Error("x", "y", False))
    with pytest.raises(ProtocolError, match="CLOSE from the client is not allowed"):
        client.send(Close())
    pump(server, client, Welcome("s", 1 << 20))
    with pytest.raises(ProtocolError, match="FRAME from the client is not allowed in state IDLE"):
        client.send(Frame(0, 0, []))
    with pytest.raises(ProtocolError, match="DFP from the client is not allowed"):
        client.send(DfpData(DFP))
    with pytest.raises(ProtocolError, match="BYE answers the client's CLOSE"):
        server.send(Bye())
    with pytest.raises(ProtocolError, match="no STATS request 5 is pending"):
        server.send(StatsReply(5, {}))
    pump(client, server, Open(dfp_digest(DFP), 0))
    with pytest.raises(ProtocolError, match="OPEN from the client is not allowed in state OPENING"):
        client.send(Open(dfp_digest(DFP), 0))
    pump(server, client, Opened((OpenedModel(1),)))
    with pytest.raises(ProtocolError, match="model 1: the DFP has 1 model"):
        client.send(Frame(1, 0, []))
    with pytest.raises(ProtocolError, match="OPENED from the server is not allowed"):
        server.send(Opened((OpenedModel(1),)))
    pump(client, server, Stats(5))
    with pytest.raises(ProtocolError, match="request id 5 is already pending"):
        client.send(Stats(5))
    pump(client, server, Close())
    with pytest.raises(ProtocolError, match="after its CLOSE"):
        client.send(Frame(0, 1, []))
    pump(server, client, StatsReply(5, {}), Bye())
    with pytest.raises(ProtocolError, match="after its BYE"):
        server.send(Output(0, 0, []))
    assert not client.broken and not server.broken


def test_a_side_sends_nothing_after_its_fatal_error() -> None:
    client, server = opened()
    pump(server, client, Error("fault", "device fault", True))
    with pytest.raises(ProtocolError, match="after its fatal ERROR"):
        server.send(Output(0, 0, []))
    # the client may still talk (the server is closing anyway) ...
    assert pump(client, server, Frame(0, 1, [])) != []
    # ... but anything more from the server is a violation
    raises(client, message(Kind.OUTPUT, b"\0\0"), "OUTPUT from the server after its fatal ERROR")


@pytest.mark.parametrize(("setup", "target", "data", "match"), [
    # server: nothing but HELLO first
    ("fresh", "server", message(Kind.OPEN, bytes(36)), "OPEN from the client is not allowed in "
                                                        "state AWAIT_HELLO"),
    ("fresh", "server", message(Kind.ERROR, js({"code": "a", "message": "b", "fatal": True})),
     "first message must be HELLO"),
    # server has not sent WELCOME yet
    ("hello", "server", message(Kind.OPEN, bytes(36)), "not allowed in state AWAIT_WELCOME"),
    ("hello", "client", message(Kind.OPENED, js({"models": [{"capacity": 1}]})),
     "OPENED from the server is not allowed in state AWAIT_WELCOME"),
    ("hello", "client", message(Kind.ERROR, js({"code": "a", "message": "b", "fatal": False})),
     "must be fatal"),
    ("handshake", "client", message(Kind.OUTPUT, b"\0\0"), "OUTPUT from the server is not allowed "
                                                           "in state IDLE"),
    ("handshake", "server", message(Kind.FRAME, b"\0\0"), "not allowed in state IDLE"),
    ("handshake", "client", message(Kind.BYE), "BYE answers the client's CLOSE"),
    ("handshake", "client", message(Kind.STATS_REPLY, b"{}", seq=3), "no STATS request 3"),
    ("handshake", "client", message(Kind.WELCOME, js({"protocol": 1, "server": "s",
                                                     "max_payload": 9})), "not allowed in state"),
    ("open", "server", message(Kind.FRAME, b"\0\0", model=2), "model 2: the DFP has 2 model"),
    ("open", "client", message(Kind.OUTPUT, b"\0\0", model=9), "model 9"),
    ("open", "server", message(Kind.OPEN, bytes(36)), "not allowed in state OPEN"),
    ("closed", "server", message(Kind.FRAME, b"\0\0"), "FRAME from the client after its CLOSE"),
    ("bye", "client", message(Kind.OUTPUT, b"\0\0"), "OUTPUT from the server after its BYE"),
])
def test_wrong_state_receives(setup: str, target: str, data: bytes, match: str) -> None:
    client, server = Connection(Role.CLIENT), Connection(Role.SERVER)
    if setup == "hello":
        pump(client, server, Hello("c", 1))
    elif setup == "handshake":
        client, server = handshake()
    elif setup in ("open", "closed", "bye"):
        client, server = opened()
    if setup in ("closed", "bye"):
        pump(client, server, Close())
    if setup == "bye":
        pump(server, client, Bye())
    raises(client if target == "client" else server, data, match)


def test_use_after_broken() -> None:
    _client, server = opened()
    first = raises(server, b"XX", "bad magic")
    for call in (lambda: server.receive_data(b""), lambda: server.receive_data(b"MX"),
                 lambda: server.send(Output(0, 0, [])), lambda: server.send_bytes(Bye())):
        with pytest.raises(ProtocolError, match="connection is broken: bad magic") as info:
            call()
        assert info.value.__cause__ is first
    assert isinstance(first, MemryxError)


def test_events_before_a_bad_message_in_the_same_chunk_are_lost_with_the_connection() -> None:
    client, server = opened()
    data = client.send_bytes(Stats(1)) + b"XX"
    raises(server, data, "bad magic")


# -- fuzzing ----------------------------------------------------------------------------------
def client_stream() -> bytes:
    """Everything a client sends in a full conversation, recorded from a real one."""
    client, server = Connection(Role.CLIENT), Connection(Role.SERVER)
    out = bytearray()

    def c(event: Event) -> None:
        data = client.send_bytes(event)
        out.extend(data)
        server.receive_data(data)

    def s(event: Event) -> None:
        client.receive_data(server.send_bytes(event))

    c(Hello("fuzz", 7))
    s(Welcome("sim", server.max_payload))
    c(Open(dfp_digest(DFP), 1))
    s(NeedDfp())
    c(DfpData(DFP))
    s(Opened((OpenedModel(2), OpenedModel(2))))
    for i, arrays in enumerate([sample_arrays()[:2], [np.arange(3, dtype=np.uint16)], []]):
        c(Frame(i % 2, i, arrays))
    c(Stats(11))
    c(Error("warn", "just saying", False, seq=3))
    c(Close())
    return bytes(out)


def try_send(conn: Connection, *events: Event) -> bytes:
    """Send what the state allows; a refused send (local misuse) leaves the connection usable."""
    out = bytearray()
    for event in events:
        try:
            out += conn.send_bytes(event)
        except ProtocolError:
            assert not conn.broken
    return bytes(out)


def serve(server: Connection, events: list[Event]) -> None:
    """A scripted server: answers every event it may answer."""
    for ev in events:
        if isinstance(ev, Hello):
            try_send(server, Welcome("sim", server.max_payload))
        elif isinstance(ev, Open):
            try_send(server, NeedDfp())
        elif isinstance(ev, DfpData):
            try_send(server, Opened((OpenedModel(2), OpenedModel(2))))
        elif isinstance(ev, Frame):
            try_send(server, Output(ev.model, ev.seq, ev.arrays))
        elif isinstance(ev, Stats):
            try_send(server, StatsReply(ev.seq, {"n": 1}))
        elif isinstance(ev, Close):
            try_send(server, Bye())


def server_stream() -> bytes:
    """Everything a server sends in a full conversation, recorded from a real one."""
    client, server = Connection(Role.CLIENT), Connection(Role.SERVER)
    out = bytearray()

    def s(*events: Event) -> None:
        for event in events:
            data = server.send_bytes(event)
            out.extend(data)
            answer(client, client.receive_data(data), server)

    server.receive_data(client.send_bytes(Hello("fuzz", 7)))
    s(Welcome("sim", server.max_payload))  # the client answers OPEN
    s(NeedDfp())  # DFP
    s(Opened((OpenedModel(3),)))  # a FRAME, STATS 21 and CLOSE
    s(Output(0, 0, sample_arrays()), Output(0, 1, [np.ones((2, 2), np.float16)]),
      Error("slow", "queue full", False, model=0, seq=1),
      StatsReply(21, {"clients": 1, "models": [{"in": 2}]}), Bye())
    return bytes(out)


def answer(client: Connection, events: list[Event], server: Connection | None = None) -> None:
    """A scripted client: answers every event it may answer."""
    for ev in events:
        if isinstance(ev, Welcome):
            data = try_send(client, Open(dfp_digest(DFP), 0))
        elif isinstance(ev, NeedDfp):
            data = try_send(client, DfpData(DFP))
        elif isinstance(ev, Opened):
            data = try_send(client, Frame(0, 0, [np.zeros(2, np.float32)]), Stats(21), Close())
        else:
            continue
        if server is not None:
            server.receive_data(data)


CLIENT_STREAM = client_stream()
SERVER_STREAM = server_stream()


def test_recorded_streams_replay_cleanly() -> None:
    server = Connection(Role.SERVER)
    got: list[Event] = []
    for b in bytewise(CLIENT_STREAM):
        evs = server.receive_data(b)
        serve(server, evs)
        got.extend(evs)
    assert [type(e) for e in got] == [Hello, Open, DfpData, Frame, Frame, Frame, Stats, Error,
                                      Close]
    client = Connection(Role.CLIENT)
    client.send(Hello("fuzz", 7))
    got = []
    for b in bytewise(SERVER_STREAM):
        evs = client.receive_data(b)
        answer(client, evs)
        got.extend(evs)
    assert [type(e) for e in got] == [Welcome, NeedDfp, Opened, Output, Output, Error, StatsReply,
                                      Bye]


def test_recorded_client_stream_is_rejected_without_answers() -> None:
    """The server must answer HELLO before the client's OPEN may arrive."""
    with pytest.raises(ProtocolError, match="OPEN from the client is not allowed in state "
                                            "AWAIT_WELCOME"):
        Connection(Role.SERVER).receive_data(CLIENT_STREAM)


mutation = st.tuples(st.sampled_from(["flip", "set", "insert", "delete", "truncate"]),
                     st.floats(0, 1, exclude_max=True), st.integers(0, 255))


def mutate(data: bytes, mutations: list[tuple[str, float, int]]) -> bytes:
    buf = bytearray(data)
    for op, where, value in mutations:
        if not buf:
            break
        i = int(where * len(buf))
        if op == "flip":
            buf[i] ^= 1 << (value % 8)
        elif op == "set":
            buf[i] = value
        elif op == "insert":
            buf.insert(i, value)
        elif op == "delete":
            del buf[i]
        else:
            del buf[i:]
    return bytes(buf)


def chunked(data: bytes, sizes: list[int]) -> list[bytes]:
    out, pos = [], 0
    for size in sizes:
        out.append(data[pos: pos + size])
        pos += size
    out.append(data[pos:])
    return [c for c in out if c]


def feed_fuzzed(conn: Connection, chunks: list[bytes],
                respond: Callable[[Connection, list[Event]], None]) -> None:
    try:
        for chunk in chunks:
            events = conn.receive_data(chunk)
            for ev in events:
                assert isinstance(ev, (Hello, Welcome, Open, NeedDfp, DfpData, Opened, Frame,
                                       Output, Stats, StatsReply, Error, Close, Bye))
                if isinstance(ev, (Frame, Output)):
                    for a in ev.arrays:
                        assert a.dtype in p.DTYPE_CODES.values() and a.ndim <= p.MAX_NDIM
            respond(conn, events)
        assert conn.receive_data(b"") == [Closed()]
    except ProtocolError:
        assert conn.broken
        with pytest.raises(ProtocolError, match="broken"):
            conn.receive_data(b"x")


fuzz = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@fuzz
@given(mutations=st.lists(mutation, max_size=4),
       sizes=st.lists(st.integers(1, 64), max_size=40))
def test_fuzz_server_receiving_mutated_client_streams(
        mutations: list[tuple[str, float, int]], sizes: list[int]) -> None:
    feed_fuzzed(Connection(Role.SERVER), chunked(mutate(CLIENT_STREAM, mutations), sizes), serve)


@fuzz
@given(mutations=st.lists(mutation, max_size=4),
       sizes=st.lists(st.integers(1, 64), max_size=40))
def test_fuzz_client_receiving_mutated_server_streams(
        mutations: list[tuple[str, float, int]], sizes: list[int]) -> None:
    client = Connection(Role.CLIENT)
    client.send(Hello("fuzz", 7))
    feed_fuzzed(client, chunked(mutate(SERVER_STREAM, mutations), sizes),
                lambda c, evs: answer(c, evs))


@fuzz
@given(data=st.binary(max_size=200), sizes=st.lists(st.integers(1, 32), max_size=10))
def test_fuzz_random_bytes_after_a_valid_prefix(data: bytes, sizes: list[int]) -> None:
    _client, server = opened()
    head = HEADER.pack(MAGIC, 1, Kind.FRAME, 0, 0, len(data))
    feed_fuzzed(server, chunked(head + data, sizes), serve)


@fuzz
@given(data=st.binary(max_size=300))
def test_fuzz_unpack_arrays(data: bytes) -> None:
    for copy in (True, False):
        try:
            arrays = unpack_arrays(data, copy=copy)
        except ProtocolError:
            continue
        assert b"".join(pack_arrays(arrays)) == data  # a valid pack has one encoding


# -- chunks -----------------------------------------------------------------------------------
def test_a_payload_above_the_chunk_size_travels_in_chunks_and_arrives_whole() -> None:
    client, server = opened(chunk_size=1000, max_payload=1 << 20)
    x = np.arange(3000, dtype=np.float32)  # 12 KiB: 13 messages
    pieces = client.send(Frame(0, 5, [x]))
    data = b"".join(bytes(piece) for piece in pieces)
    kinds = [Kind(b) for b in _header_kinds(data)]
    assert kinds.count(Kind.CHUNK) == len(kinds) - 1 and kinds[-1] is Kind.FRAME
    for split in (whole, bytewise) if len(data) < 20000 else (whole,):
        _, srv = opened(chunk_size=1000, max_payload=1 << 20)
        events = [e for chunk in split(data) for e in srv.receive_data(chunk)]
        assert len(events) == 1 and isinstance(events[0], Frame) and events[0].seq == 5
        np.testing.assert_array_equal(events[0].arrays[0], x)
    del server


def _header_kinds(data: bytes) -> list[int]:
    kinds, pos = [], 0
    while pos < len(data):
        _, _, kind, _, _, length = HEADER.unpack_from(data, pos)
        kinds.append(kind)
        pos += HEADER_SIZE + length
    return kinds


def test_chunked_dfp_upload_checks_the_hash_of_the_whole() -> None:
    client, server = handshake(chunk_size=7)
    pump(client, server, Open(dfp_digest(DFP), 0))
    pump(server, client, NeedDfp())
    assert pump(client, server, DfpData(DFP)) == [DfpData(DFP)]


def test_chunk_limits_are_checked_at_each_header() -> None:
    _, server = opened(max_payload=100)
    chunk = HEADER.pack(MAGIC, PROTOCOL_VERSION, Kind.CHUNK, Kind.FRAME, 0, 60)
    server.receive_data(chunk + b"\0" * 60)
    raises(server, HEADER.pack(MAGIC, PROTOCOL_VERSION, Kind.CHUNK, Kind.FRAME, 0, 60),
           "chunked FRAME payload length 120 exceeds max_payload 100")


@pytest.mark.parametrize(("first", "second", "match"), [
    ((Kind.CHUNK, Kind.HELLO, 0, 4), None, "only DFP, FRAME, OUTPUT|only .* payloads are chunked"),
    ((Kind.CHUNK, Kind.FRAME, 3, 4), None, "seq must be 0"),
    ((Kind.CHUNK, Kind.FRAME, 0, 0), None, "not empty"),
    ((Kind.CHUNK, Kind.FRAME, 0, 4), (Kind.STATS, 0, 1, 0), "STATS in the middle of a chunked"),
    ((Kind.CHUNK, Kind.FRAME, 0, 4), (Kind.CHUNK, Kind.DFP, 0, 4), "in the middle of a chunked"),
    ((Kind.CHUNK, Kind.OUTPUT, 0, 4), None, "only the server sends OUTPUT"),
    ((Kind.CHUNK, Kind.DFP, 0, 4), None, "not allowed in state OPEN"),
])
def test_bad_chunks_are_refused(first, second, match) -> None:
    _, server = opened()
    data = HEADER.pack(MAGIC, PROTOCOL_VERSION, *first) + b"\0" * first[3]
    if second is not None:
        data += HEADER.pack(MAGIC, PROTOCOL_VERSION, *second)
    raises(server, data, match)


def test_end_of_file_inside_a_chunked_message_is_a_truncation() -> None:
    _, server = opened()
    server.receive_data(HEADER.pack(MAGIC, PROTOCOL_VERSION, Kind.CHUNK, Kind.FRAME, 0, 4)
                        + b"\0" * 4)
    raises(server, b"", "truncated FRAME")
