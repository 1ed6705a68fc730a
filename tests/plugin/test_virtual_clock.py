"""The virtual clock: long paced runs in seconds, deterministic, on asyncio and uvloop."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import numpy as np
import pytest

import memryx as mx
from memryx.clock import REAL_CLOCK, VirtualClock, clock_of
from memryx.device.simulated import SimulatedDevice
from memryx.faults import Faults, FaultyDevice, Jitter, Stall, Throttle
from memryx.pytest_plugin import SyntheticCamera

TEN_MINUTES = 18_000  # frames of a 30 fps camera


async def camera_run(dfp: mx.Dfp, frames: int, fps: float = 30.0
                     ) -> tuple[list[float], dict[str, Any], VirtualClock]:
    """A 30 fps camera into a timed device on a fresh virtual clock: the virtual time each
    output came at, and the accelerator's statistics."""
    clock = VirtualClock()
    camera = SyntheticCamera((1, 16), fps=fps, frames=frames, clock=clock)
    stamps: list[float] = []
    async with mx.AsyncAccl(dfp, device=SimulatedDevice(mode="timed", clock=clock)) as accl:
        async for _, frame in camera:
            await accl.arun(frame)
            stamps.append(clock.now())
        stats = accl.statistics()
    return stamps, stats, clock


@pytest.mark.asyncio
@pytest.mark.timeout(240)  # a hang guard: two runs take ~10 s on a quiet 2-core host
async def test_thirty_fps_for_ten_minutes_in_seconds_and_deterministic(mx_test_dfp: mx.Dfp
                                                                        ) -> None:
    wall = time.monotonic()
    first, stats, clock = await camera_run(mx_test_dfp, TEN_MINUTES)
    second, again, _ = await camera_run(mx_test_dfp, TEN_MINUTES)
    assert time.monotonic() - wall < 200  # 20 minutes of camera time (generous: loaded CI)
    assert len(first) == TEN_MINUTES
    assert first == second  # identical timestamps, run after run
    model, device = stats["models"][0], stats["device"]["models"][0]
    latency_s = device["modeled_latency_ms"] / 1000
    # frame i is taken at i/30 s and its output leaves the modeled chip one latency later
    expected = np.arange(TEN_MINUTES) / 30.0 + latency_s
    assert np.allclose(first, expected, rtol=0, atol=1e-9)
    assert clock.now() == pytest.approx((TEN_MINUTES - 1) / 30 + latency_s)
    # statistics in virtual time: 10 minutes, 30 fps, the modeled latency; nothing late
    assert stats["elapsed_s"] == pytest.approx(clock.now())
    assert model["frames_out"] == TEN_MINUTES
    assert model["fps"] == pytest.approx(30.0)
    assert model["latency_ms"]["p50"] == pytest.approx(device["modeled_latency_ms"])
    assert model["latency_ms"]["p99"] == pytest.approx(device["modeled_latency_ms"])
    assert device["device_fps"] == pytest.approx(30.0)
    assert device["late_frames"] == 0 and not device["host_slower"]
    del again["elapsed_s"]
    stats.pop("elapsed_s")
    for s in (stats, again):
        for m in s["device"]["models"]:
            m.pop("compute_ms_per_frame")  # the host's CPU time: the one real measurement
        for m in s["models"]:
            m.pop("device_wait_s")
    assert stats == again


@pytest.mark.asyncio
async def test_fixtures_give_a_timed_device_and_a_camera_on_the_clock(
        mx_virtual_clock: VirtualClock, mx_accl: mx.AsyncAccl, mx_camera: Any) -> None:
    device = mx_accl.statistics()["device"]
    assert device["mode"] == "timed" and device["paced"]
    camera = mx_camera(fps=30, frames=300)
    assert camera.clock is mx_virtual_clock
    times = []
    async for _, frame in camera:
        await mx_accl.arun(frame)
        times.append(mx_virtual_clock.now())
    assert np.allclose(np.diff(times), 1 / 30)
    assert mx_accl.statistics()["models"][0]["fps"] == pytest.approx(30.0)


@pytest.mark.asyncio
async def test_pipelined_callbacks_see_modeled_release_times(mx_test_dfp: mx.Dfp) -> None:
    """Async input and output callbacks, many frames in flight, fps_target pacing the input:
    each output callback sees the virtual time its frame left the modeled chip."""
    async def run() -> tuple[list[float], dict[str, Any]]:
        clock = VirtualClock()
        device = SimulatedDevice(mode="timed", clock=clock)
        camera = SyntheticCamera((1, 16), fps=0, frames=2000, clock=clock)
        frames = iter(range(camera.frames))
        seen: list[float] = []

        async def source() -> Any:
            i = next(frames, None)
            return None if i is None else camera.frame(i)

        async def sink(*_outputs: Any) -> None:
            seen.append(clock.now())

        async with mx.AsyncAccl(mx_test_dfp, device=device,
                                client_options=mx.ClientOptions(fps_target=60.0)) as accl:
            accl.connect_input(source)
            accl.connect_output(sink)
            await accl.await_done()
            stats = accl.statistics()
        return seen, stats

    first, stats = await run()
    second, _ = await run()
    assert first == second and len(first) == 2000
    assert np.allclose(np.diff(first), 1 / 60)
    assert stats["models"][0]["fps"] == pytest.approx(60.0)
    assert stats["elapsed_s"] == pytest.approx(2000 / 60)  # the pacer waited for a 2001st slot


@pytest.mark.asyncio
async def test_sync_input_callback_paced_in_virtual_time(mx_test_dfp: mx.Dfp) -> None:
    """A plain input callback on its thread, paced by fps_target: virtual waits, no hang."""
    clock = VirtualClock()
    camera = SyntheticCamera((1, 16), fps=0, frames=600, clock=clock)
    seen: list[float] = []
    wall = time.monotonic()
    async with mx.AsyncAccl(mx_test_dfp, device=SimulatedDevice(mode="timed", clock=clock),
                            client_options=mx.ClientOptions(fps_target=30.0)) as accl:
        accl.connect_input(camera.read)
        accl.connect_output(lambda *_: seen.append(clock.now()))
        await accl.await_done()
    assert len(seen) == 600
    assert seen[-1] >= 599 / 30  # 20 s of virtual time ...
    assert time.monotonic() - wall < 20  # ... without waiting 20 s


@pytest.mark.asyncio
async def test_faults_run_in_virtual_time(mx_test_dfp: mx.Dfp) -> None:
    async def run(script: Faults) -> tuple[list[float], dict[str, Any]]:
        clock = VirtualClock()
        device = FaultyDevice(SimulatedDevice(mode="timed", clock=clock), script)
        assert device.clock is clock
        camera = SyntheticCamera((1, 16), fps=30, frames=60, clock=clock)
        stamps = []
        async with mx.AsyncAccl(mx_test_dfp, device=device) as accl:
            async for _, frame in camera:
                await accl.arun(frame)
                stamps.append(clock.now())
            stats = accl.statistics()["device"]["faults"]
        return stamps, stats

    plain, _ = await run(Faults())
    stalled, faults = await run(Faults(Stall(after_frame=10, ms=500)))
    assert faults["stalls"] == 1
    # frame 11 arrives at 10/30 s; its output waits out the 500 ms stall, exactly
    assert stalled[10] == pytest.approx(10 / 30 + 0.5)
    assert stalled[:10] == plain[:10]
    jittered, faults = await run(Faults(Jitter(ms=20, seed=3)))
    assert jittered == (await run(Faults(Jitter(ms=20, seed=3))))[0]  # the same delays
    delays = np.asarray(jittered) - np.asarray(plain)
    assert (delays >= 0).all() and (delays <= 0.020 + 1e-9).all() and delays.max() > 0
    assert faults["jittered_frames"] == 60


@pytest.mark.asyncio
async def test_throttle_in_virtual_time_and_get_temperature(mx_test_dfp: mx.Dfp) -> None:
    """A hot module throttles: outputs at half the modeled rate, and get_temperature() (the
    public API a thermal handler reads) reports the scenario's temperature."""
    clock = VirtualClock()
    device = FaultyDevice(SimulatedDevice(mode="timed", clock=clock),
                          Faults(Throttle(above_c=90.0, start_c=120.0)))
    async with mx.AsyncAccl(mx_test_dfp, device=device) as accl:
        assert accl.get_temperature() == pytest.approx(120.0, abs=0.5)
        assert accl.get_pressure() == 1.0
        interval = 1 / accl.statistics()["device"]["models"][0]["modeled_fps"]
        frame = np.zeros((1, 16), np.float32)
        await asyncio.gather(*(accl.arun(frame) for _ in range(20)))
        faults = accl.statistics()["device"]["faults"]
        assert faults["throttling"] and faults["throttled_frames"] == 20
        assert accl.get_temperature() == faults["temperature_c"]
        assert accl.statistics()["models"][0]["fps"] == pytest.approx(
            1 / (2 * interval), rel=0.01)  # half the modeled rate
        # the module cools in virtual time: minutes of idling pass in no time
        await clock.sleep(600.0)
        assert accl.get_temperature() < 90.0
        assert not accl.statistics()["device"]["faults"]["throttling"]


@pytest.mark.asyncio
async def test_get_temperature_reads_the_throttle_scenario_on_the_real_clock(
        mx_test_dfp: mx.Dfp) -> None:
    device = FaultyDevice(script=Faults(Throttle(start_c=110.0)))
    async with mx.AsyncAccl(mx_test_dfp, device=device) as accl:
        assert accl.get_temperature() == pytest.approx(110.0, abs=0.5)
        assert accl.get_temperature() == pytest.approx(  # (real time: it cools meanwhile)
            accl.statistics()["device"]["faults"]["temperature_c"], abs=0.1)


# -- bad input and edge cases -------------------------------------------------------------------
def test_clock_of() -> None:
    clock = VirtualClock()
    assert clock_of(SimulatedDevice(mode="timed", clock=clock)) is clock
    assert clock_of(SimulatedDevice()) is REAL_CLOCK
    assert clock_of(FaultyDevice(SimulatedDevice(clock=clock))) is clock
    assert clock_of(object()) is REAL_CLOCK


def test_bad_clock_arguments() -> None:
    with pytest.raises(TypeError, match="clock must be a memryx.clock.Clock"):
        SimulatedDevice(clock=time.monotonic)  # type: ignore[arg-type]
    with pytest.raises(mx.UsageError, match="'sampled' cannot run on a VirtualClock"):
        SimulatedDevice(mode="sampled", clock=VirtualClock())
    with pytest.raises(ValueError, match="finite"):
        VirtualClock(start=float("nan"))
    with pytest.raises(ValueError, match="seconds must be"):
        VirtualClock().advance(-1)
    with pytest.raises(mx.UsageError, match="without a hold"):
        VirtualClock().release()
    with pytest.raises(mx.UsageError, match="before an event loop"):
        VirtualClock().wait(1.0, threading.Event())


@pytest.mark.asyncio
async def test_zero_frames(mx_test_dfp: mx.Dfp) -> None:
    stamps, stats, clock = await camera_run(mx_test_dfp, 0)
    assert stamps == [] and clock.now() == 0.0 and clock.jumps == 0
    assert stats["models"][0]["frames_out"] == 0 and stats["elapsed_s"] == 0.0


@pytest.mark.asyncio
async def test_manual_advance_and_sleep() -> None:
    clock = VirtualClock(start=100.0)
    fired: list[float] = []
    clock.call_later(2.0, lambda: fired.append(clock.now()))
    clock.call_later(1.0, lambda: fired.append(clock.now()))
    cancelled = clock.call_later(1.5, lambda: fired.append(-1.0))
    cancelled.cancel()
    clock.advance(1.2)
    assert fired == [101.0] and clock.now() == 101.2
    await clock.sleep(5.0)  # the remaining timer fires on the way
    assert fired == [101.0, 102.0] and clock.now() == 106.2
    await clock.sleep(0)
    assert clock.now() == 106.2


@pytest.mark.asyncio
async def test_one_clock_one_loop(mx_test_dfp: mx.Dfp) -> None:
    clock = VirtualClock()
    await clock.sleep(0.5)
    errors: list[BaseException] = []

    def other_loop() -> None:
        async def use() -> None:
            await SimulatedDevice(mode="timed", clock=clock).open(mx_test_dfp, 0)
        try:
            asyncio.run(use())
        except BaseException as exc:
            errors.append(exc)

    t = threading.Thread(target=other_loop)
    t.start()
    t.join(30)
    assert len(errors) == 1 and isinstance(errors[0], mx.UsageError)
    assert "another event loop" in str(errors[0])


# -- attacks ------------------------------------------------------------------------------------
async def paced_source(clock: VirtualClock, camera: SyntheticCamera) -> Any:
    """An async input callback reading ``camera`` at its rate on ``clock``."""
    it = aiter(camera)

    async def source() -> Any:
        item = await anext(it, None)
        return None if item is None else item[1]
    return source


@pytest.mark.asyncio
async def test_stop_mid_run(mx_test_dfp: mx.Dfp) -> None:
    clock = VirtualClock()
    camera = SyntheticCamera((1, 16), fps=30, frames=10_000, clock=clock)
    seen: list[float] = []
    async with mx.AsyncAccl(mx_test_dfp, device=SimulatedDevice(mode="timed", clock=clock)
                            ) as accl:
        accl.connect_input(await paced_source(clock, camera))

        def sink(*_: Any) -> None:
            seen.append(clock.now())
            if len(seen) == 100:
                accl.stop()
        accl.connect_output(sink)
        await asyncio.wait_for(accl.await_done(), 30)
    assert 100 <= len(seen) < 10_000
    assert seen[:100] == pytest.approx(list(np.arange(100) / 30 + seen[0]))


@pytest.mark.asyncio
async def test_callbacks_that_block_on_wall_time(mx_test_dfp: mx.Dfp) -> None:
    """A callback's own time.sleep is wall time: virtual time does not move meanwhile (and the
    run does not hang); an async callback's asyncio.sleep is not a virtual wait either."""
    clock = VirtualClock()
    camera = SyntheticCamera((1, 16), fps=30, frames=20, clock=clock)
    seen: list[tuple[float, float]] = []
    async with mx.AsyncAccl(mx_test_dfp, device=SimulatedDevice(mode="timed", clock=clock)
                            ) as accl:
        accl.connect_input(await paced_source(clock, camera))

        def sink(*_: Any) -> None:
            before = clock.now()
            time.sleep(0.02)
            seen.append((before, clock.now()))
        accl.connect_output(sink)
        await asyncio.wait_for(accl.await_done(), 30)
    assert len(seen) == 20
    stamps = [b for b, _ in seen]
    assert stamps == sorted(stamps) and stamps[-1] >= 19 / 30

    clock = VirtualClock()
    camera = SyntheticCamera((1, 16), fps=30, frames=20, clock=clock)
    got = 0
    async with mx.AsyncAccl(mx_test_dfp, device=SimulatedDevice(mode="timed", clock=clock)
                            ) as accl:
        accl.connect_input(await paced_source(clock, camera))

        async def asink(*_: Any) -> None:
            nonlocal got
            await asyncio.sleep(0.005)  # real time: the app's, not the device's
            got += 1
        accl.connect_output(asink)
        await asyncio.wait_for(accl.await_done(), 30)
    assert got == 20


@pytest.mark.asyncio
async def test_cancelled_while_waiting_on_the_clock(mx_test_dfp: mx.Dfp) -> None:
    clock = VirtualClock()
    camera = SyntheticCamera((1, 16), fps=1, frames=1000, clock=clock)
    outputs = 0
    five = asyncio.Event()
    async with mx.AsyncAccl(mx_test_dfp, device=SimulatedDevice(mode="timed", clock=clock)
                            ) as accl:
        async def app() -> None:
            nonlocal outputs
            async for _, frame in camera:
                await accl.arun(frame)
                outputs += 1
                if outputs == 5:
                    five.set()
        task = asyncio.ensure_future(app())
        await five.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await asyncio.sleep(0.05)  # the frame on the modeled chip still leaves it
        stopped_at = clock.now()
        await asyncio.sleep(0.05)
        assert clock.now() == stopped_at  # nothing left waiting: time stands still
        assert "timers=0" in repr(clock)
        await accl.arun(camera.frame(0))  # the accelerator still works
    assert outputs in (5, 6)


@pytest.mark.asyncio
async def test_two_accelerators_share_one_clock(mx_test_dfp: mx.Dfp) -> None:
    async def run() -> tuple[list[float], list[float]]:
        clock = VirtualClock()
        results: tuple[list[float], list[float]] = ([], [])

        async def one(fps: float, frames: int, out: list[float]) -> None:
            camera = SyntheticCamera((1, 16), fps=fps, frames=frames, clock=clock)
            device = SimulatedDevice(mode="timed", clock=clock)
            async with mx.AsyncAccl(mx_test_dfp, device=device) as accl:
                async for _, frame in camera:
                    await accl.arun(frame)
                    out.append(clock.now())
        await asyncio.gather(one(30, 300, results[0]), one(25, 250, results[1]))
        return results

    first = await run()
    assert first == await run()
    assert np.allclose(np.diff(first[0]), 1 / 30) and np.allclose(np.diff(first[1]), 1 / 25)
    assert first[0][-1] == pytest.approx(first[1][-1] - 249 / 25 + 299 / 30)


@pytest.mark.asyncio
async def test_closing_while_outputs_are_due(mx_test_dfp: mx.Dfp) -> None:
    """Close with frames on the modeled chip and timers pending: no hang, nothing fires late."""
    clock = VirtualClock()
    device = SimulatedDevice(mode="timed", clock=clock)
    accl = mx.AsyncAccl(mx_test_dfp, device=device)
    await accl.__aenter__()
    frame = np.zeros((1, 16), np.float32)
    pending = [asyncio.ensure_future(accl.arun(frame)) for _ in range(50)]
    await asyncio.sleep(0)
    await asyncio.wait_for(accl.aclose(), 10)
    results = await asyncio.gather(*pending, return_exceptions=True)
    assert all(isinstance(r, (np.ndarray, mx.ClosedError, asyncio.CancelledError))
               for r in results)
    await asyncio.sleep(0.05)
    assert "timers=0" in repr(clock)


@pytest.mark.asyncio
async def test_hold_keeps_time_still() -> None:
    clock = VirtualClock()
    clock.hold()
    slept = asyncio.ensure_future(clock.sleep(1.0))
    await asyncio.sleep(0.05)
    assert not slept.done() and clock.now() == 0.0
    threading.Thread(target=clock.release).start()  # released from another thread
    await asyncio.wait_for(slept, 5)
    assert clock.now() == 1.0


@pytest.mark.asyncio
async def test_smoothing_on_the_virtual_clock(mx_test_dfp: mx.Dfp) -> None:
    clock = VirtualClock()
    camera = SyntheticCamera((1, 16), fps=0, frames=300, clock=clock)
    seen: list[float] = []
    async with mx.AsyncAccl(mx_test_dfp, device=SimulatedDevice(mode="timed", clock=clock),
                            client_options=mx.ClientOptions(smoothing=True, fps_target=100)
                            ) as accl:
        accl.connect_input(await paced_source(clock, camera))

        async def sink(*_: Any) -> None:
            seen.append(clock.now())
        accl.connect_output(sink)
        await asyncio.wait_for(accl.await_done(), 30)
    assert len(seen) == 300 and seen == sorted(seen)
    assert np.median(np.diff(seen)) == pytest.approx(0.01, rel=0.1)


@pytest.mark.asyncio
async def test_trace_in_virtual_time(mx_test_dfp: mx.Dfp, tmp_path: Any) -> None:
    import json

    clock = VirtualClock()
    camera = SyntheticCamera((1, 16), fps=30, frames=90, clock=clock)
    path = tmp_path / "trace.json"
    async with mx.AsyncAccl(mx_test_dfp, device=SimulatedDevice(mode="timed", clock=clock)
                            ) as accl:
        accl.trace(path)
        async for _, frame in camera:
            await accl.arun(frame)
    events = json.loads(path.read_text())
    events = events["traceEvents"] if isinstance(events, dict) else events
    device = [e for e in events if e.get("ph") == "X" and e.get("name") == "device"]
    assert len(device) == 90
    starts = sorted(e["ts"] for e in device)  # microseconds of virtual time
    assert np.allclose(np.diff(starts), 1e6 / 30, atol=1.0)


@pytest.mark.asyncio
async def test_sync_paced_input_stopped_mid_run(mx_test_dfp: mx.Dfp) -> None:
    """A plain input callback waiting on the virtual clock (fps_target) when the app stops:
    its wait ends, nothing hangs, no thread is left."""
    clock = VirtualClock()
    camera = SyntheticCamera((1, 16), fps=0, frames=100_000, clock=clock)
    seen = 0
    async with mx.AsyncAccl(mx_test_dfp, device=SimulatedDevice(mode="timed", clock=clock),
                            client_options=mx.ClientOptions(fps_target=1.0)) as accl:
        def sink(*_: Any) -> None:
            nonlocal seen
            seen += 1
            if seen == 3:
                accl.stop()
        accl.connect_input(camera.read)
        accl.connect_output(sink)
        await asyncio.wait_for(accl.await_done(), 30)
    assert 3 <= seen < 100


@pytest.mark.asyncio
async def test_streams_paced_in_virtual_time(mx_test_dfp: mx.Dfp) -> None:
    clock = VirtualClock()
    cameras = [SyntheticCamera((1, 16), fps=0, frames=60, seed=s, clock=clock) for s in (0, 1)]
    seen: dict[int, list[float]] = {0: [], 1: []}
    async with mx.MultiStreamAsyncAccl(
            mx_test_dfp, device=SimulatedDevice(mode="timed", clock=clock),
            client_options=mx.ClientOptions(fps_target=20.0)) as accl:
        async def source(stream: int) -> Any:
            return cameras[stream].read()

        async def sink(stream: int, *_: Any) -> None:
            seen[stream].append(clock.now())
        accl.connect_streams(source, sink, 2)
        await asyncio.wait_for(accl.await_done(), 30)
    for times in seen.values():
        assert len(times) == 60 and np.allclose(np.diff(times), 1 / 20)


@pytest.mark.asyncio
async def test_a_blocking_wait_on_the_loop_thread_is_refused() -> None:
    clock = VirtualClock()
    await clock.sleep(0.1)  # bound to this loop
    with pytest.raises(mx.UsageError, match="would block for ever"):
        clock.wait(1.0, threading.Event())


@pytest.mark.asyncio
async def test_an_app_with_its_own_tasks_and_queue_is_deterministic(mx_test_dfp: mx.Dfp
                                                                     ) -> None:
    """More hops than the core's own: a reader task feeding a bounded queue, two workers."""
    async def run() -> list[tuple[int, float]]:
        clock = VirtualClock()
        camera = SyntheticCamera((1, 16), fps=60, frames=600, clock=clock)
        queue: asyncio.Queue[Any] = asyncio.Queue(maxsize=4)
        done: list[tuple[int, float]] = []
        device = SimulatedDevice(mode="timed", clock=clock)
        async with mx.AsyncAccl(mx_test_dfp, device=device) as accl:
            async def reader() -> None:
                async for i, frame in camera:
                    await queue.put((i, frame))
                for _ in range(2):
                    await queue.put(None)

            async def worker() -> None:
                while (item := await queue.get()) is not None:
                    await accl.arun(item[1])
                    done.append((item[0], clock.now()))
            await asyncio.gather(reader(), worker(), worker())
        return done

    first = await run()
    assert len(first) == 600
    assert first == await run()
