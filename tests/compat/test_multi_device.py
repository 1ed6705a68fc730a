"""One accelerator over several devices (``device_ids=[0, 1, ...]``): outputs stay in
order, the work is spread, a failing device surfaces and nothing hangs."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import numpy as np
import pytest

import memryx as mx
from memryx.device.multi import MultiDevice
from memryx.device.simulated import SimulatedDevice
from memryx.faults import DeviceFault, Faults, FaultyDevice
from tests.conftest import ServerProcess, frames


def _reference(dfp: mx.Dfp, xs: list[np.ndarray]) -> list[Any]:
    with mx.SyncAccl(dfp) as accl:
        return list(accl.run(xs))


def test_run_over_three_devices_in_order(mlp_dfp):
    xs = frames(300, (1, 16))
    want = _reference(mlp_dfp, xs)
    with mx.SyncAccl(mlp_dfp, device_ids=[0, 1, 3]) as accl:
        assert accl.device_ids == [0, 1, 3] and accl.group_id == 0
        got = accl.run(xs)
        stats = accl.statistics()
        budget_one = None
        with mx.SyncAccl(mlp_dfp) as single:
            budget_one = single.statistics()["models"][0]["frame_budget"]
    for g, w in zip(got, want, strict=True):
        np.testing.assert_array_equal(g, w)
    dev = stats["device"]
    assert dev["device"] == "multi" and dev["device_ids"] == [0, 1, 3]
    per = dev["devices"]
    assert set(per) == {0, 1, 3}
    counts = [per[i]["frames_submitted"][0] for i in (0, 1, 3)]
    assert sum(counts) == 300 and all(c > 0 for c in counts), counts
    assert [per[i]["models"][0]["frames_out"] for i in (0, 1, 3)] == counts
    assert stats["models"][0]["frame_budget"] == min(256, 3 * budget_one)


def test_async_callbacks_positional_ids_keep_order(identity_dfp):
    xs = [np.full((1, 4), i, np.float32) for i in range(400)]
    it = iter(xs)
    out: list[np.ndarray] = []
    accl = mx.AsyncAccl(identity_dfp, [0, 1])
    accl.connect_input(lambda: next(it, None))
    accl.connect_output(out.append)
    accl.wait()
    accl.shutdown()
    assert [int(o.reshape(-1)[0]) for o in out] == list(range(400))


def test_multistream_over_two_devices(identity_dfp):
    n, streams = 120, 3
    got: dict[int, list[int]] = {s: [] for s in range(streams)}
    sent = [0] * streams

    def source(s: int) -> Any:
        if sent[s] >= n:
            return None
        sent[s] += 1
        return np.full((1, 4), sent[s] - 1, np.float32)

    def sink(s: int, y: np.ndarray) -> None:
        got[s].append(int(y.reshape(-1)[0]))

    accl = mx.MultiStreamAsyncAccl(identity_dfp, device_ids=[0, 1], stream_workers=-1)
    accl.connect_streams(source, sink, streams)
    accl.wait()
    per = accl.statistics()["device"]["devices"]
    accl.stop()
    accl.shutdown()
    assert all(got[s] == list(range(n)) for s in range(streams))
    assert all(per[i]["frames_submitted"][0] > 0 for i in (0, 1))


def test_modeled_telemetry_per_device(mlp_dfp):
    with mx.SyncAccl(mlp_dfp, device_ids=[0, 2]) as accl:
        accl.run(frames(50, (1, 16)))
        for i in (0, 2):
            assert accl.get_temperature(i) > 0
            assert accl.get_avg_power(i) >= 0
        with pytest.raises(mx.ModelIndexError, match=r"device_id 1 is not one of .*\[0, 2\]"):
            accl.get_pressure(1)


def test_several_ids_need_a_device_spec_not_an_object(mlp_dfp):
    with pytest.raises(mx.UsageError, match="a Device object is one device"):
        mx.SyncAccl(mlp_dfp, device_ids=[0, 1], device=SimulatedDevice(groups=2))


def test_one_device_failing_mid_run_surfaces_and_nothing_hangs(identity_dfp):
    bad = FaultyDevice(SimulatedDevice(mode="fast", groups=2),
                       Faults(DeviceFault(after_frames=30)))
    multi = MultiDevice([SimulatedDevice(mode="fast"), bad], [0, 1])
    accl = mx.AsyncAccl(identity_dfp, device=multi)
    accl.connect_input(lambda: np.zeros((1, 4), np.float32))  # endless
    accl.connect_output(lambda y: None)
    t0 = time.monotonic()
    with pytest.raises(mx.DeviceError):
        accl.wait()
    accl.shutdown()
    assert time.monotonic() - t0 < 20


def test_close_under_load_returns_promptly(identity_dfp):
    accl = mx.AsyncAccl(identity_dfp, device_ids=[0, 1, 2])
    accl.connect_input(lambda: np.zeros((1, 4), np.float32))
    accl.connect_output(lambda y: None)
    closer = threading.Timer(0.3, accl.stop)
    closer.start()
    t0 = time.monotonic()
    accl.wait()
    accl.shutdown()
    closer.join()
    assert time.monotonic() - t0 < 10


@pytest.mark.asyncio
async def test_arun_over_two_devices(mlp_dfp):
    xs = frames(64, (1, 16))
    want = await asyncio.to_thread(_reference, mlp_dfp, xs)
    async with mx.AsyncAccl(mlp_dfp, device_ids=[0, 1]) as accl:
        got = await asyncio.gather(*(accl.arun(x) for x in xs))
    for g, w in zip(got, want, strict=True):
        np.testing.assert_array_equal(g, w)


def test_over_a_device_server_one_connection_per_id(tmp_path, mlp_dfp):
    srv = ServerProcess(tmp_path, "--groups", "2")
    try:
        xs = frames(100, (1, 16))
        want = _reference(mlp_dfp, xs)
        with mx.SyncAccl(mlp_dfp, device_ids=[0, 1], device=srv.address) as accl:
            got = accl.run(xs)
            per = accl.statistics()["device"]["devices"]
        for g, w in zip(got, want, strict=True):
            np.testing.assert_array_equal(g, w)
        assert per[0]["device"] == "fd" and per[0]["frames_in"] > 0 and per[1]["frames_in"] > 0
        with pytest.raises(mx.ModelIndexError, match="group_id 2 out of range"):
            mx.SyncAccl(mlp_dfp, device_ids=[0, 2], device=srv.address)
    finally:
        srv.stop()


def test_server_killed_under_two_device_ids(tmp_path, identity_dfp):
    srv = ServerProcess(tmp_path, "--groups", "2")
    try:
        seen = threading.Event()
        accl = mx.AsyncAccl(identity_dfp, device_ids=[0, 1], device=srv.address, timeout=10)
        accl.connect_input(lambda: np.zeros((1, 4), np.float32))
        accl.connect_output(lambda y: seen.set())
        assert seen.wait(20)
        srv.kill()
        t0 = time.monotonic()
        with pytest.raises(mx.DeviceError):
            accl.wait()
        accl.shutdown()
        assert time.monotonic() - t0 < 20
    finally:
        srv.stop()
