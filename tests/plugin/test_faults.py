"""memryx.faults: each scripted fault, through the public API, on asyncio and uvloop."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import numpy as np
import pytest

import memryx as mx
from memryx.faults import (
    DeviceFault,
    FaultNotReachedWarning,
    Faults,
    FaultScriptError,
    FaultyDevice,
    Hang,
    Jitter,
    Stall,
    Throttle,
    fault,
)
from tests.conftest import asettle

FRAME = np.zeros((1, 4), np.float32)


async def run_frames(dfp: mx.Dfp, device: FaultyDevice, n: int) -> list[float]:
    """Send ``n`` frames one at a time; the time each output took (seconds)."""
    times = []
    async with mx.AsyncAccl(dfp, device=device) as accl:
        for i in range(n):
            t0 = time.monotonic()
            out = await accl.arun(np.full((1, 4), i, np.float32))
            assert float(out.flat[0]) == i
            times.append(time.monotonic() - t0)
    return times


@pytest.mark.asyncio
async def test_stall_delays_the_outputs_after_frame_k(identity_dfp: mx.Dfp) -> None:
    device = FaultyDevice(script=Faults(Stall(after_frame=3, ms=300)))
    times = await run_frames(identity_dfp, device, 6)
    assert times[3] >= 0.29  # frame 4 waits the stall out
    assert max(times[:3]) < 0.25 and max(times[4:]) < 0.25
    faults = device.statistics()["faults"]
    assert faults["stalls"] == 1 and faults["stalled_frames"] == 1


@pytest.mark.asyncio
async def test_device_fault_fails_in_flight_and_later_frames(identity_dfp: mx.Dfp) -> None:
    device = FaultyDevice(script=Faults(DeviceFault(after_frames=5)))
    async with mx.AsyncAccl(identity_dfp, device=device) as accl:
        for _ in range(5):
            await accl.arun(FRAME)
        with pytest.raises(mx.DeviceError, match="injected device fault") as info:
            await accl.arun(FRAME)
        assert info.value.lost_frames >= 1
        with pytest.raises(mx.DeviceError):
            await accl.arun(FRAME)
        stats = accl.statistics()
    assert stats["device"]["device"] == "faulty:sim"
    assert stats["device"]["faults"]["device_faults"] == 1
    assert stats["models"][0]["frames_out"] == 5


@pytest.mark.asyncio
async def test_device_fault_mid_stream_loses_the_frames_in_flight(identity_dfp: mx.Dfp) -> None:
    device = FaultyDevice(script=Faults(DeviceFault(after_frames=40)))
    got = []
    # the stream raises it, and closing the accelerator raises it again (as for a real fault)
    with pytest.raises(mx.DeviceError, match="in flight lost"):
        async with mx.AsyncAccl(identity_dfp, device=device) as accl:
            async for out in accl.astream(np.full((1, 4), i, np.float32) for i in range(100)):
                got.append(int(out.flat[0]))
    assert got == list(range(len(got))) and len(got) <= 40  # in order, none after the fault


@pytest.mark.asyncio
async def test_hang_never_answers_until_the_app_times_out(identity_dfp: mx.Dfp) -> None:
    device = FaultyDevice(script=Faults(Hang(after_frame=2)))
    accl = mx.AsyncAccl(identity_dfp, device=device)
    try:
        await accl.arun(FRAME)
        await accl.arun(FRAME)
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.3):
                await accl.arun(FRAME)
        assert device.statistics()["faults"]["hung_frames"] == 1
    finally:
        await accl.aclose()


@pytest.mark.asyncio
async def test_jitter_is_reproducible_and_keeps_order(identity_dfp: mx.Dfp) -> None:
    device = FaultyDevice(script=Faults(Jitter(ms=20, seed=7)))
    outs: list[int] = []
    async with mx.AsyncAccl(identity_dfp, device=device) as accl:
        async for out in accl.astream(np.full((1, 4), i, np.float32) for i in range(30)):
            outs.append(int(out.flat[0]))
    assert outs == list(range(30))
    assert device.statistics()["faults"]["jittered_frames"] == 30
    # the delays come from the seed: two devices with one seed draw the same ones
    a = FaultyDevice(script=Faults(Jitter(ms=20, seed=7)))
    b = FaultyDevice(script=Faults(Jitter(ms=20, seed=7)))
    assert [a._rng.random() for _ in range(5)] == [b._rng.random() for _ in range(5)]


async def stream_time(dfp: mx.Dfp, device: FaultyDevice, n: int) -> float:
    async with mx.AsyncAccl(dfp, device=device) as accl:
        await accl.arun(np.zeros((1, 3, 64, 64), np.float32))  # started: time the stream only
        t0 = time.monotonic()
        count = 0
        async for _ in accl.astream(np.zeros((1, 3, 64, 64), np.float32) for _ in range(n)):
            count += 1
        assert count == n
        return time.monotonic() - t0


@pytest.mark.asyncio
async def test_throttle_halves_the_rate_while_hot(mobilenet_dfp: mx.Dfp) -> None:
    n = 60
    ratios = []
    for _ in range(3):  # the host is shared: one clear measurement of three is enough
        cool = await stream_time(mobilenet_dfp, FaultyDevice(), n)
        hot = FaultyDevice(script=Faults(Throttle(above_c=50.0, start_c=99.0)))
        throttled = await stream_time(mobilenet_dfp, hot, n)
        faults = hot.statistics()["faults"]
        assert faults["throttled_frames"] == n + 1 and faults["throttling"] is True
        assert 50.0 < faults["temperature_c"] < 99.0  # cooling, still above the throttle point
        ratios.append(throttled / cool)
        if ratios[-1] > 1.3:  # half the rate is 2x the time: measured generously
            break
    else:
        pytest.fail(f"throttling did not slow the stream: time ratios {ratios}")
    # below the throttle point nothing is slowed
    mild = FaultyDevice(script=Faults(Throttle(above_c=100.0)))
    await stream_time(mobilenet_dfp, mild, 10)
    assert mild.statistics()["faults"]["throttled_frames"] == 0


@pytest.mark.asyncio
async def test_a_fault_past_the_end_is_reported_at_close(identity_dfp: mx.Dfp) -> None:
    device = FaultyDevice(script=Faults(Stall(after_frame=100, ms=1)))
    with pytest.warns(FaultNotReachedWarning, match=r"Stall\(after_frame=100.*saw only 2"):
        await run_frames(identity_dfp, device, 2)
    assert device.unfired() == [Stall(after_frame=100, ms=1)]


@pytest.mark.parametrize(("make", "match"), [
    (lambda: Stall(after_frame=-1, ms=5), "after_frame must be an int >= 0"),
    (lambda: Stall(after_frame=1, ms=-5), "Stall.ms must be a finite number >= 0"),
    (lambda: Stall(after_frame=1, ms=float("nan")), "Stall.ms"),
    (lambda: DeviceFault(after_frames=1.5), "after_frames must be an int"),
    (lambda: Jitter(ms=1, seed="x"), "seed must be an int"),
    (lambda: Throttle(above_c=-3), "above_c"),
    (lambda: Hang(after_frame=True), "after_frame"),
    (lambda: fault("explode", after=1), "unknown fault kind 'explode'"),
    (lambda: fault("stall", after=1), "fault 'stall'"),
    (lambda: Faults("stall"), "unknown fault 'stall'"),
    (lambda: Faults(Jitter(ms=1), Jitter(ms=2)), "at most one Jitter"),
    (lambda: FaultyDevice(script=[Hang()]), "script must be a Faults"),
])
def test_bad_scripts_are_typed_errors_at_setup(make: Any, match: str) -> None:
    with pytest.raises(FaultScriptError, match=match):
        make()
    assert issubclass(FaultScriptError, mx.UsageError) and issubclass(FaultScriptError, ValueError)


def test_fault_by_name() -> None:
    assert fault("stall", after_frame=3, ms=50) == Stall(after_frame=3, ms=50)
    assert fault("hang") == Hang()


@pytest.mark.asyncio
async def test_a_faulty_server_device_is_wrapped_too(identity_dfp: mx.Dfp, server: Any) -> None:
    device = FaultyDevice(mx.device.open_device(server.address),
                          Faults(DeviceFault(after_frames=2)))
    async with mx.AsyncAccl(identity_dfp, device=device) as accl:
        await accl.arun(FRAME)
        await accl.arun(FRAME)
        with pytest.raises(mx.DeviceError):
            await accl.arun(FRAME)


@pytest.mark.asyncio
async def test_cancelling_during_a_stall_and_closing_leaves_nothing_behind(
        identity_dfp: mx.Dfp) -> None:
    device = FaultyDevice(script=Faults(Stall(after_frame=1, ms=10_000)))
    async with mx.AsyncAccl(identity_dfp, device=device) as accl:
        await accl.arun(FRAME)
        task = asyncio.create_task(accl.arun(FRAME))
        # cancel once the second frame is at the stalled device
        assert await asettle(lambda: accl.statistics()["models"][0]["frames_in"] == 2)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        t0 = time.monotonic()
    assert time.monotonic() - t0 < 5  # closing does not wait the stall out
    with pytest.raises(mx.ClosedError):
        device.submit(0, [[FRAME]])


@pytest.mark.asyncio
async def test_jitter_delays_are_those_of_the_seed(identity_dfp: mx.Dfp) -> None:
    async def delays(seed: int) -> list[float]:
        device = FaultyDevice(script=Faults(Jitter(ms=40, seed=seed)))
        return await run_frames(identity_dfp, device, 8)

    # each frame takes at least the delay its seed draws (and the run is the same each time)
    expected = _draws(3, 8, 0.040)
    for got in (await delays(3), await delays(3)):
        assert all(t >= d * 0.9 for t, d in zip(got, expected, strict=True)), (got, expected)


def _draws(seed: int, n: int, spread: float) -> list[float]:
    import random

    rng = random.Random(seed)
    return [rng.uniform(0.0, spread) for _ in range(n)]
