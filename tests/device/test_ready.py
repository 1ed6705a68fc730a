"""The modeled latency counts from when the core had a frame ready, not from when its
hand-over reached the device (``submit(..., ready=)``): the runtime's own thread switch
and loop iteration are inside the modeled latency, as a chip's transfer is inside its
host-measured latency."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import numpy as np
import pytest

import memryx as mx
from memryx import testing
from memryx._core.lane import Lane
from memryx.clock import VirtualClock
from memryx.device import SimulatedDevice
from memryx.faults import Faults, FaultyDevice

pytestmark = pytest.mark.timeout(60)


def identity(fps: float, latency_ms: float) -> mx.Dfp:
    return mx.NeuralCompiler(models=testing.identity_model((1, 4)), fps=fps,
                             latency_ms=latency_ms).run()


X = [[np.zeros((1, 4), np.float32)]]


async def released_after(dev: Any, clock: VirtualClock, handed_over_s: float,
                         latency_ms: float) -> float:
    """Open ``dev`` on a 100 fps model, submit one frame ``handed_over_s`` after it was
    ready, and return how long after ready its outputs were released."""
    await dev.open(identity(fps=100, latency_ms=latency_ms), 0)
    try:
        t0 = clock.now()
        await clock.sleep(handed_over_s)
        await asyncio.wait_for(asyncio.shield(dev.submit(0, X, ready=t0)), 10)
        return clock.now() - t0
    finally:
        await dev.aclose()


@pytest.mark.asyncio
async def test_a_frame_ready_before_submit_is_released_latency_after_it_was_ready():
    clock = VirtualClock()
    dev = SimulatedDevice(mode="shapes", clock=clock)
    assert await released_after(dev, clock, 0.005, 20) == pytest.approx(0.020, abs=1e-9)
    lat = dev.statistics()["models"][0]["device_latency_ms"]
    assert lat["p50"] == pytest.approx(20.0, abs=1e-6)  # counted from ready, too


@pytest.mark.asyncio
async def test_a_frame_whose_hand_over_outlasted_its_latency_is_released_at_once_and_late():
    clock = VirtualClock()
    dev = SimulatedDevice(mode="shapes", clock=clock)
    # a host stall of 50 ms between ready and submit: released at once, not at 52 ms
    assert await released_after(dev, clock, 0.050, 2) == pytest.approx(0.050, abs=1e-9)
    assert dev.statistics()["models"][0]["late_frames"] == 1  # the host made it late


@pytest.mark.asyncio
async def test_the_fault_wrapper_passes_ready_through():
    clock = VirtualClock()
    dev = FaultyDevice(SimulatedDevice(mode="shapes", clock=clock), Faults())
    assert dev.takes_ready
    assert await released_after(dev, clock, 0.005, 20) == pytest.approx(0.020, abs=1e-9)


@pytest.mark.asyncio
async def test_ready_never_moves_a_frame_earlier_than_the_schedule_or_later_than_now():
    clock = VirtualClock()
    dev = SimulatedDevice(mode="shapes", clock=clock)
    await dev.open(identity(fps=100, latency_ms=20), 0)  # a frame every 10 ms
    try:
        t0 = clock.now()
        first = dev.submit(0, X, ready=t0)
        # the second frame was ready at once too, but the chip takes one every 10 ms
        second = dev.submit(0, X, ready=t0)
        # a "ready" in the future (a clock mix-up) counts as now
        third = dev.submit(0, X, ready=t0 + 5.0)
        done = []
        for fut in (first, second, third):
            await asyncio.wait_for(asyncio.shield(fut), 10)
            done.append(clock.now() - t0)
        assert done == pytest.approx([0.020, 0.030, 0.040], abs=1e-9)
    finally:
        await dev.aclose()


@pytest.mark.asyncio
@pytest.mark.parametrize("bad", [float("nan"), float("-inf"), float("inf")])
async def test_a_ready_time_that_is_not_finite_is_refused(bad: float):
    dev = SimulatedDevice(mode="shapes", clock=VirtualClock())
    await dev.open(identity(fps=100, latency_ms=20), 0)
    try:
        with pytest.raises(ValueError, match="ready must be a finite time"):
            dev.submit(0, X, ready=bad)
        fut = dev.submit(0, X, ready=None)  # the device still takes frames
        await asyncio.wait_for(asyncio.shield(fut), 10)
    finally:
        await dev.aclose()


@pytest.mark.parametrize("kind", ["plain", "async", "multistream", "two devices"])
def test_the_runtimes_hand_over_is_inside_the_modeled_latency(monkeypatch: Any, kind: str):
    """End to end on the real clock: a hand-over slowed by 150 ms (between the input
    callback's return and the device) does not add to a modeled latency of 300 ms. The
    bounds are generous (a loaded host): without ``ready`` the latency is >= 450 ms."""
    put_many = Lane.put_many
    put = Lane.put

    def slow_put_many(self: Lane, *args: Any, **kw: Any) -> None:
        time.sleep(0.15)
        put_many(self, *args, **kw)

    def slow_put(self: Lane, *args: Any, **kw: Any) -> None:
        time.sleep(0.15)
        put(self, *args, **kw)

    monkeypatch.setattr(Lane, "put_many", slow_put_many)
    monkeypatch.setattr(Lane, "put", slow_put)
    dfp = identity(fps=100, latency_ms=300)
    sent: list[float] = []
    got: list[float] = []

    def frame() -> Any:
        if len(sent) == 3:
            return None
        sent.append(time.monotonic())
        return np.full((1, 4), len(sent), np.float32)

    def frames() -> Any:
        time.sleep(0.4)  # one frame at a time: none waits for another
        return frame()

    async def aframes() -> Any:
        await asyncio.sleep(0.4)
        return frame()

    def out(y: np.ndarray) -> None:
        got.append(time.monotonic())

    accl: Any
    if kind == "multistream":
        accl = mx.MultiStreamAsyncAccl(dfp, device="sim:shapes")
    else:
        accl = mx.AsyncAccl(dfp, [0, 1] if kind == "two devices" else None, device="sim:shapes")
    try:
        if kind == "multistream":  # the stream pool's workers make the frames
            accl.connect_streams(lambda s: frames(), lambda s, y: out(y), 1)
        else:
            accl.connect_output(out)
            accl.connect_input(aframes if kind == "async" else frames)
        accl.wait()
        stats = accl.statistics()
    finally:
        accl.close()
    assert len(got) == 3
    latencies = [b - a for a, b in zip(sent, got, strict=True)]
    assert all(0.299 <= lat < 0.43 for lat in latencies), latencies
    devices = stats["device"].get("devices", {0: stats["device"]}).values()
    assert sum(d["models"][0]["late_frames"] for d in devices) == 0
