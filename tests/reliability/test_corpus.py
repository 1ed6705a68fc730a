"""The fuzz regression corpus (tests/reliability/corpus, made by make_corpus.py there):
handcrafted nasty DFP files and protocol streams. Every file must come out as a
``DfpError`` / ``ProtocolError`` (``DeviceError`` on a client whose server sends it),
with bounded memory, and must hurt no one else: the live device server keeps
serving, and this process stays usable.

The hypothesis fuzzers in tests/test_dfp.py and tests/device/test_protocol.py
explore around valid inputs; this corpus pins the worst cases found or feared.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import socket
import threading
import tracemalloc
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import memryx as mx
from memryx.device import protocol as p

from .helpers import PROBE, assert_usable

CORPUS = Path(__file__).resolve().parent / "corpus"
DFP_FILES = sorted(CORPUS.glob("*.dfp"))
CLIENT_STREAMS = sorted(CORPUS.glob("*.c2s.bin"))
SERVER_STREAMS = sorted(CORPUS.glob("*.s2c.bin"))
MEMORY_LIMIT = 8 << 20  # bytes a parser may allocate for files of at most a few tens of KiB

#: Corpus files that show a library bug not fixed yet: {file name: xfail mark}.
KNOWN_BUGS: dict[str, Any] = {}


def files(paths: list[Path]) -> list[Any]:
    return [pytest.param(path, id=path.name, marks=KNOWN_BUGS.get(path.name, ()))
            for path in paths]


def make_corpus() -> Any:
    spec = importlib.util.spec_from_file_location("make_corpus", CORPUS / "make_corpus.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_corpus_is_what_make_corpus_builds():
    built = make_corpus().build()
    on_disk = {f.name: f.read_bytes() for f in CORPUS.iterdir() if f.suffix in (".dfp", ".bin")}
    assert sorted(on_disk) == sorted(built), "re-run tests/reliability/corpus/make_corpus.py"
    assert all(on_disk[name] == data for name, data in built.items())
    assert len(DFP_FILES) >= 10 and len(CLIENT_STREAMS) >= 8 and len(SERVER_STREAMS) >= 3


@contextlib.contextmanager
def bounded_memory(limit: int = MEMORY_LIMIT) -> Iterator[None]:
    tracemalloc.start()
    try:
        yield
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < limit, f"parsing allocated {peak} bytes"


# -- DFP files ---------------------------------------------------------------------------------
@pytest.fixture(params=["sim", "fd"])
def device_kind(request: Any) -> str:
    return str(request.param)


@pytest.mark.parametrize("path", files(DFP_FILES))
def test_dfp_file_is_only_a_dfp_error(path, device_kind, request):
    """Loaded and opened (by path, on sim and over fd): only DfpError, bounded memory."""
    device = "sim" if device_kind == "sim" else request.getfixturevalue("shared_server").address
    with bounded_memory(), contextlib.suppress(mx.DfpError):
        mx.Dfp(path.read_bytes())  # parsing alone may accept a DFP the device refuses
    with pytest.raises(mx.DfpError) as info:
        with mx.SyncAccl(path, device=device) as accl:  # opening it is where it must fail
            port = accl.dfp.models[0].inputs[0]
            accl.run(np.zeros(port.shape, port.dtype))
    assert type(info.value) is mx.DfpError
    assert_usable(mx.Dfp(make_corpus().HANDSHAKE_DFP), device)


# -- protocol streams, parsed in process -----------------------------------------------------
def chunked(data: bytes, how: str) -> Iterator[bytes]:
    size = {"whole": len(data) or 1, "bytewise": 1, "7": 7}[how]
    for i in range(0, len(data), size):
        yield data[i: i + size]


def try_send(conn: p.Connection, *events: p.Event) -> None:
    for event in events:
        with contextlib.suppress(p.ProtocolError):
            conn.send(event)


def answer_as_server(conn: p.Connection, events: list[p.Event]) -> None:
    for ev in events:
        if isinstance(ev, p.Hello):
            try_send(conn, p.Welcome("corpus", conn.max_payload))
        elif isinstance(ev, p.Open):
            try_send(conn, p.NeedDfp())
        elif isinstance(ev, p.DfpData):
            try_send(conn, p.Opened((p.OpenedModel(4),)))
        elif isinstance(ev, p.Frame):
            try_send(conn, p.Output(ev.model, ev.seq, ev.arrays))
        elif isinstance(ev, p.Stats):
            try_send(conn, p.StatsReply(ev.seq, {}))
        elif isinstance(ev, p.Close):
            try_send(conn, p.Bye())


CLIENT_DFP = b"any bytes: the client under test names them in OPEN"


def answer_as_client(conn: p.Connection, events: list[p.Event]) -> None:
    for ev in events:
        if isinstance(ev, p.Welcome):
            try_send(conn, p.Open(hashlib.sha256(CLIENT_DFP).digest(), 0))
        elif isinstance(ev, p.NeedDfp):
            try_send(conn, p.DfpData(CLIENT_DFP))


def feed(conn: p.Connection, data: bytes, how: str, answer: Any) -> None:
    for chunk in chunked(data, how):
        answer(conn, conn.receive_data(chunk))
    conn.receive_data(b"")  # end of file: a stream cut mid-message fails here


@pytest.mark.parametrize("how", ["whole", "bytewise", "7"])
@pytest.mark.parametrize("path", files(CLIENT_STREAMS))
def test_client_stream_is_only_a_protocol_error(path, how):
    server = p.Connection(p.Role.SERVER)
    with bounded_memory(), pytest.raises(p.ProtocolError) as info:
        feed(server, path.read_bytes(), how, answer_as_server)
    assert type(info.value) is p.ProtocolError
    assert server.broken
    with pytest.raises(p.ProtocolError, match="broken"):
        server.receive_data(b"MX")


@pytest.mark.parametrize("how", ["whole", "bytewise", "7"])
@pytest.mark.parametrize("path", files(SERVER_STREAMS))
def test_server_stream_is_only_a_protocol_error(path, how):
    client = p.Connection(p.Role.CLIENT)
    client.send(p.Hello("corpus", 1))
    with bounded_memory(), pytest.raises(p.ProtocolError) as info:
        feed(client, path.read_bytes(), how, answer_as_client)
    assert type(info.value) is p.ProtocolError
    assert client.broken


# -- protocol streams against real processes -------------------------------------------------
def messages(data: bytes) -> list[tuple[int, bytes]]:
    """Split well-framed bytes into (kind, payload); stops at the first incomplete one."""
    out, pos = [], 0
    while pos + p.HEADER_SIZE <= len(data):
        _, _, kind, _, _, length = p.HEADER.unpack_from(data, pos)
        end = pos + p.HEADER_SIZE + length
        if end > len(data):
            break
        out.append((kind, data[pos + p.HEADER_SIZE: end]))
        pos = end
    return out


def replay(server: Any, data: bytes) -> bytes:
    """Send ``data`` on a raw connection to ``server``; what it answers until it hangs up."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(10)  # a server that never hangs up fails the test here
    try:
        sock.connect(str(server.path))
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)
        reply = b""
        with contextlib.suppress(ConnectionResetError):
            while chunk := sock.recv(65536):
                reply += chunk
        return reply
    finally:
        sock.close()


@pytest.mark.parametrize("path", files(CLIENT_STREAMS))
def test_client_stream_to_the_live_server_hurts_nobody_else(path, shared_server, identity_dfp):
    """The server hangs up on that connection only and goes on serving the others."""
    with mx.SyncAccl(identity_dfp, device=shared_server.address) as other:
        reply = replay(shared_server, path.read_bytes())
        replies = messages(reply)
        if replies:  # whatever it answered ends with a fatal ERROR
            kind, payload = replies[-1]
            assert kind == p.Kind.ERROR, [k for k, _ in replies]
            assert b'"fatal":true' in payload
        assert_usable(identity_dfp, shared_server.address)  # a new client is served
        np.testing.assert_array_equal(other.run(PROBE), PROBE)  # an existing one too
        assert other.statistics()["device"]["fault"] is None


def test_the_live_server_answers_garbage_with_a_fatal_error(shared_server):
    silent = []
    for path in CLIENT_STREAMS:
        replies = messages(replay(shared_server, path.read_bytes()))
        if not replies or replies[-1][0] != p.Kind.ERROR:
            silent.append(path.name)
    assert silent == [], f"hung up without an ERROR on: {silent}"


class FakeServer:
    """A hostile device server: answers a real client with the bytes of a corpus file,
    pacing the handshake messages so they arrive when the client may receive them."""

    def __init__(self, path: Path, data: bytes) -> None:
        self.path = path
        self.data = data
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(str(path))
        self.listener.listen(1)
        self.listener.settimeout(10)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._serve, name="fake-server")
        self.thread.start()

    def _serve(self) -> None:
        try:
            conn, _ = self.listener.accept()
        except OSError as exc:
            self.error = exc
            return
        conn.settimeout(10)
        received = b""
        try:
            needs = {p.Kind.WELCOME: p.Kind.HELLO, p.Kind.NEED_DFP: p.Kind.OPEN,
                     p.Kind.OPENED: p.Kind.DFP}
            sent = 0
            for kind, payload in messages(self.data):
                want = needs.get(kind)
                while want is not None and want not in {k for k, _ in messages(received)}:
                    chunk = conn.recv(65536)
                    if not chunk:
                        return
                    received += chunk
                piece = self.data[sent: sent + p.HEADER_SIZE + len(payload)]
                conn.sendall(piece)
                sent += len(piece)
            conn.sendall(self.data[sent:])  # whatever is not a whole message
            while conn.recv(65536):  # until the client hangs up
                pass
        except OSError:
            pass
        finally:
            conn.close()

    def close(self) -> None:
        self.listener.close()
        self.thread.join(15)
        assert not self.thread.is_alive()


@pytest.mark.parametrize("path", files(SERVER_STREAMS))
def test_a_hostile_server_gives_the_client_only_device_errors(path, tmp_path, identity_dfp):
    server = FakeServer(tmp_path / "fake.sock", path.read_bytes())
    try:
        with pytest.raises(mx.DeviceError, match="malformed|closed|broke|lost") as info:
            with mx.SyncAccl(identity_dfp, device=f"unix:{server.path}") as accl:
                accl.run(PROBE)
        assert type(info.value) is mx.DeviceError
    finally:
        server.close()
    assert server.error is None
    assert_usable(identity_dfp)
