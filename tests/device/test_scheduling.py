"""Per-client scheduler options on a real device server (``memryx serve`` child process).

Turn lengths are read from the server's own statistics (frames per turn, why each
turn ended), never from wall-clock speed.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from typing import Any

import numpy as np
import pytest

import memryx as mx
from memryx.device import protocol as p
from memryx.device.fd import FdDevice
from tests.conftest import ServerProcess

X = [np.zeros((1, 16), np.float32)]


@pytest.fixture
def fast_server(tmp_path: Any) -> Any:
    srv = ServerProcess(tmp_path, "--mode", "fast", "--max-time-limit-ms", "400")
    yield srv
    srv.stop()


async def _pump(dev: FdDevice, frames: int, in_flight: int | None = None) -> None:
    """Keep ``in_flight`` frames (default: the capacity) on the server until ``frames``."""
    window = in_flight or dev.limits(0).batch
    pending: set[asyncio.Future[Any]] = set()
    sent = 0
    while sent < frames or pending:
        while sent < frames and len(pending) < window:
            pending.add(dev.submit(0, [X]))
            sent += 1
        done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
        for fut in done:
            fut.result()


async def _open(address: str, dfp: mx.Dfp, **scheduler: Any) -> FdDevice:
    dev = FdDevice(address, timeout=20, scheduler=scheduler or None)
    await dev.open(dfp, 0)
    return dev


@pytest.mark.asyncio
@pytest.mark.timeout(120)
async def test_two_clients_turns_follow_their_own_frame_limit(fast_server, mlp_dfp):
    small = await _open(fast_server.address, mlp_dfp, frame_limit=2, time_limit=400)
    big = await _open(fast_server.address, mlp_dfp, frame_limit=8, time_limit=400)
    try:
        assert small.schedule is not None and small.schedule["frame_limit"] == 2
        assert big.schedule is not None and big.schedule["frame_limit"] == 8
        await asyncio.gather(_pump(small, 600), _pump(big, 600))
        s_small = (await small.server_statistics())["models"][0]
        s_big = (await big.server_statistics())["models"][0]
    finally:
        await small.aclose()
        await big.aclose()
    assert s_small["frames_out"] == 600 and s_big["frames_out"] == 600
    # a turn never exceeds the client's own frame limit ...
    assert 1 <= s_small["turn_frames_max"] <= 2
    assert 1 <= s_big["turn_frames_max"] <= 8
    # ... and under contention turns do end there: the big one's turns are longer
    assert s_small["turn_ends"]["frame_limit"] > 0
    assert s_big["turn_ends"]["frame_limit"] > 0
    assert s_big["turn_frames_max"] > 2


@pytest.mark.asyncio
@pytest.mark.timeout(120)
async def test_effective_options_are_capped_and_reported(fast_server, mlp_dfp):
    dev = await _open(fast_server.address, mlp_dfp, frame_limit=5, time_limit=10**9,
                      ifmap_queue_size=1000, ofmap_queue_size=3, stop_on_empty=True)
    try:
        want = {"frame_limit": 5, "time_limit": 400.0, "stop_on_empty": True,
                "ifmap_queue_size": 16, "ofmap_queue_size": 3}
        assert dev.schedule == want
        assert dev.statistics()["scheduler"] == want
        assert dev.limits(0).batch == 16  # the capacity the server announced
        await _pump(dev, 50)
        stats = await dev.server_statistics()
        assert stats["schedule"] == want
        assert stats["models"][0]["frames_out"] == 50
    finally:
        await dev.aclose()
    zero = await _open(fast_server.address, mlp_dfp, time_limit=0, ifmap_queue_size=2)
    try:
        assert zero.schedule is not None
        assert zero.schedule["time_limit"] == 400.0  # 0: the server's longest turn
        assert zero.limits(0).batch == 2
        await _pump(zero, 20)
    finally:
        await zero.aclose()


@pytest.mark.asyncio
@pytest.mark.timeout(120)
async def test_a_client_that_asks_nothing_gets_the_servers_options(fast_server, mlp_dfp):
    dev = await _open(fast_server.address, mlp_dfp)
    try:
        assert dev.schedule == {"frame_limit": 20, "time_limit": 250.0, "stop_on_empty": True,
                                "ifmap_queue_size": 16, "ofmap_queue_size": 21}
        await _pump(dev, 40)
    finally:
        await dev.aclose()


@pytest.mark.asyncio
@pytest.mark.timeout(120)
async def test_hold_the_chip_when_empty_unless_stop_on_empty(fast_server, mlp_dfp):
    """A client with one frame in flight runs out of frames after each one: with
    stop_on_empty its turns are one frame long; without, it keeps the chip (another
    client waits) and its turns reach its frame limit."""
    results = {}
    for stop in (True, False):
        lone = await _open(fast_server.address, mlp_dfp, frame_limit=4, time_limit=400,
                           stop_on_empty=stop)
        # one frame of the hog on the chip at a time: it always has frames waiting
        hog = await _open(fast_server.address, mlp_dfp, frame_limit=4, time_limit=400,
                          ofmap_queue_size=1)
        try:
            await asyncio.gather(_pump(lone, 60, in_flight=1), _pump(hog, 400))
            results[stop] = (await lone.server_statistics())["models"][0]
        finally:
            await lone.aclose()
            await hog.aclose()
    assert results[True]["turn_frames_max"] == 1
    assert results[False]["turn_frames_max"] > 1
    assert results[False]["turn_frames_max"] <= 4


@pytest.mark.asyncio
@pytest.mark.timeout(120)
async def test_a_greedy_client_does_not_starve_another(tmp_path, mlp_dfp):
    """Absurd frame and time limits are capped by the server's longest turn: the other
    client still gets its turns, and the greedy one's turns end by time."""
    srv = ServerProcess(tmp_path, "--mode", "timed", "--time-limit-ms", "50",
                        "--max-time-limit-ms", "100")
    try:
        greedy = await _open(srv.address, mlp_dfp, frame_limit=2**31 - 1, time_limit=10**12,
                             stop_on_empty=False)
        modest = await _open(srv.address, mlp_dfp, frame_limit=4)
        try:
            assert greedy.schedule is not None and greedy.schedule["time_limit"] == 100.0
            task = asyncio.ensure_future(_pump(greedy, 10**9))
            await asyncio.sleep(0.3)
            # finishes although greedy never stops sending (a starved client would not)
            await asyncio.wait_for(_pump(modest, 40), 60)
            stats = (await greedy.server_statistics())["models"][0]
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            mine = (await modest.server_statistics())["models"][0]
        finally:
            await greedy.aclose()
            await modest.aclose()
        assert mine["frames_out"] == 40 and mine["turns"] >= 1
        # the greedy turns were cut at the server's longest turn (generous: a loaded host)
        assert stats["turn_ms_max"] < 1000, stats
    finally:
        srv.stop()


def _hello(sock: socket.socket, conn: p.Connection, raw: bytes) -> list[Any]:
    sock.sendall(raw)
    events: list[Any] = []
    with contextlib.suppress(ConnectionResetError, TimeoutError):
        while not events:
            data = sock.recv(65536)
            events += conn.receive_data(data)
    return events


def _raw_hello(obj: dict[str, Any]) -> bytes:
    import json

    text = json.dumps(obj)
    raw = obj.get("scheduler")
    if isinstance(raw, str) and raw.startswith("RAW:"):  # a number JSON can spell: 1e999
        text = text.replace(json.dumps(raw), '{"time_limit": ' + raw[4:] + "}")
    payload = text.encode()
    return p.HEADER.pack(p.MAGIC, 1, p.Kind.HELLO, 0, 0, len(payload)) + payload


@pytest.mark.parametrize(("scheduler", "says"), [
    ({"frame_limit": -5}, "frame_limit must be an integer in [1, 2147483647], got -5"),
    ({"frame_limit": 0}, "frame_limit must be an integer"),
    ({"frame_limit": 10**30}, "frame_limit must be an integer"),
    ({"frame_limit": 2.5}, "frame_limit must be an integer"),
    ({"frame_limit": True}, "frame_limit must be an integer"),
    ({"time_limit": -1}, "time_limit must be a number of milliseconds >= 0, got -1"),
    ({"time_limit": "250"}, "time_limit must be a number"),
    ({"time_limit": 1e999}, "holds Infinity, which is not valid JSON"),
    ("RAW:1e999", "time_limit must be a number of milliseconds >= 0, got inf"),
    ({"stop_on_empty": "yes"}, "stop_on_empty must be true or false"),
    ({"ifmap_queue_size": 0}, "ifmap_queue_size must be an integer"),
    ({"ofmap_queue_size": -(10**20)}, "ofmap_queue_size must be an integer"),
    ({"ofmap_queue_size": None}, "ofmap_queue_size must be an integer"),
    ([1, 2], "HELLO.scheduler: expected an object"),
    ("fast please", "HELLO.scheduler: expected an object"),
], ids=lambda v: str(v)[:30])
def test_hostile_options_are_refused_to_that_client_only(server, mlp_dfp, scheduler, says):
    with mx.SyncAccl(mlp_dfp, device=server.address) as bystander:
        before = bystander.run(X[0])
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(10)
        sock.connect(str(server.path))
        try:
            conn = p.Connection(p.Role.CLIENT)
            conn.send(p.Hello("hostile", os.getpid()))  # the state machine: HELLO sent
            events = _hello(sock, conn, _raw_hello(
                {"protocol": 1, "client": "hostile", "pid": os.getpid(),
                 "scheduler": scheduler}))
        finally:
            sock.close()
        assert len(events) == 1 and isinstance(events[0], p.Error), events
        assert events[0].fatal
        assert says in events[0].message
        np.testing.assert_array_equal(bystander.run(X[0]), before)


def test_unknown_option_names_are_ignored_and_not_reported(server, mlp_dfp):
    """A newer client's extra field does not break an older server: what applies comes
    back, without the field."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(10)
    sock.connect(str(server.path))
    try:
        conn = p.Connection(p.Role.CLIENT)
        conn.send(p.Hello("newer", os.getpid()))
        (welcome,) = _hello(sock, conn, _raw_hello(
            {"protocol": 1, "client": "newer", "pid": 1,
             "scheduler": {"frame_limit": 3, "priority": 9}}))
    finally:
        sock.close()
    assert isinstance(welcome, p.Welcome) and welcome.scheduler is not None
    assert welcome.scheduler["frame_limit"] == 3 and "priority" not in welcome.scheduler


def test_an_old_client_without_options_is_served(server, mlp_dfp):
    """A HELLO as runtimes before per-client options sent it (no scheduler field)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(10)
    sock.connect(str(server.path))
    try:
        conn = p.Connection(p.Role.CLIENT)
        conn.send(p.Hello("old", os.getpid()))
        (welcome,) = _hello(sock, conn, _raw_hello({"protocol": 1, "client": "old",
                                                    "pid": 1}))
        assert isinstance(welcome, p.Welcome)
        data = mlp_dfp.to_bytes()
        sock.sendall(conn.send_bytes(p.Open(p.dfp_digest(data), 0)))
        reply: list[Any] = []
        while not reply:
            reply = conn.receive_data(sock.recv(65536))
        if isinstance(reply[0], p.NeedDfp):
            sock.sendall(conn.send_bytes(p.DfpData(data)))
            reply = []
            while not reply:
                reply = conn.receive_data(sock.recv(65536))
        assert isinstance(reply[0], p.Opened)
        sock.sendall(conn.send_bytes(p.Frame(0, 1, X)))
        out: list[Any] = []
        while not out:
            out = conn.receive_data(sock.recv(65536))
        assert isinstance(out[0], p.Output) and out[0].seq == 1
    finally:
        sock.close()


def test_accelerator_options_reach_the_server(server, mlp_dfp):
    opts = mx.SchedulerOptions(frame_limit=7, time_limit=120, stop_on_empty=True,
                               ifmap_queue_size=4, ofmap_queue_size=2)
    with mx.SyncAccl(mlp_dfp, device=server.address, scheduler_options=opts) as accl:
        outs = accl.run([X[0]] * 30)
        stats = accl.statistics()
    assert len(outs) == 30
    assert stats["device"]["scheduler"] == {"frame_limit": 7, "time_limit": 120.0,
                                            "stop_on_empty": True, "ifmap_queue_size": 4,
                                            "ofmap_queue_size": 2}
    assert stats["models"][0]["frame_budget"] == 4  # the server's capacity for this client


def test_manager_addr_with_scheduler_options(server, mlp_dfp):
    opts = mx.SchedulerOptions(frame_limit=3)
    accl = mx.AsyncAccl(mlp_dfp, manager_addr=str(server.path), scheduler_options=opts)
    try:
        assert accl.statistics()["device"]["scheduler"]["frame_limit"] == 3
    finally:
        accl.shutdown()


def test_protocol_hello_and_welcome_carry_the_options_both_ways():
    client, server = p.Connection(p.Role.CLIENT), p.Connection(p.Role.SERVER)
    hello = p.Hello("c", 1, {"frame_limit": 4})
    assert server.receive_data(client.send_bytes(hello)) == [hello]
    welcome = p.Welcome("s", 1000, 0.0, {"frame_limit": 4, "time_limit": 250.0})
    assert client.receive_data(server.send_bytes(welcome)) == [welcome]
    # without them, as before (an old peer): None
    c2, s2 = p.Connection(p.Role.CLIENT), p.Connection(p.Role.SERVER)
    assert s2.receive_data(c2.send_bytes(p.Hello("c", 1)))[0].scheduler is None


def test_bad_options_then_open_in_the_same_write_get_one_error(server, mlp_dfp):
    """A hostile client pipelines OPEN behind a HELLO with bad options: one fatal error
    and nothing after it (no DFP requested, no device opened)."""
    data = mlp_dfp.to_bytes()
    conn = p.Connection(p.Role.CLIENT)
    conn.send(p.Hello("pipelined", os.getpid()))
    raw = _raw_hello({"protocol": 1, "client": "pipelined", "pid": 1,
                      "scheduler": {"frame_limit": -1}})
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(10)
    sock.connect(str(server.path))
    try:
        sock.sendall(raw + p.HEADER.pack(p.MAGIC, 1, p.Kind.OPEN, 0, 0, 36)
                     + p.dfp_digest(data) + bytes(4))
        rest = b""
        with contextlib.suppress(ConnectionResetError, TimeoutError):
            while chunk := sock.recv(65536):
                rest += chunk
    finally:
        sock.close()
    events = conn.receive_data(rest) if rest else []
    # one fatal error (the pipelined OPEN breaks the protocol before the HELLO is answered)
    assert len(events) == 1 and isinstance(events[0], p.Error) and events[0].fatal, events
