"""The paced modes' release schedule (catch-up after host stalls, batched release), sampled
mode's per-stream staleness, and attacks on the modes that compute little (issue 17)."""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import AsyncIterator
from typing import TypeVar

import numpy as np
import pytest

import memryx as mx
from memryx import testing
from memryx.device import Device, SimulatedDevice
from memryx.device._compute import ReuseCache, frame_key
from memryx.device._release import Pacer as _Pacer
from memryx.device.simulated import CHEAP_QUEUE_DEPTH, DEFAULT_QUEUE_DEPTH
from memryx.faults import FaultyDevice

D = TypeVar("D", bound=Device | FaultyDevice)

def identity(fps: float, latency_ms: float, shape: tuple[int, ...] = (1, 4)) -> mx.Dfp:
    return mx.NeuralCompiler(models=testing.identity_model(shape), fps=fps,
                             latency_ms=latency_ms).run()


@contextlib.asynccontextmanager
async def opened(dev: D, dfp: mx.Dfp) -> AsyncIterator[D]:
    """``dev`` opened on ``dfp`` (chip group 0) for the block, closed after it."""
    await dev.open(dfp, 0)
    try:
        yield dev
    finally:
        await dev.aclose()


# -- the pacer's schedule (pure: times are given) ---------------------------------------------
def _entries(pacer: _Pacer, arrivals: list[float]) -> list[float]:
    return [pacer.admit(t)[0] for t in arrivals]


def test_a_source_faster_than_the_chip_enters_one_frame_per_interval():
    p = _Pacer(interval=0.01, latency=0.005, slack=0.04)
    entries = _entries(p, [0.0] * 50)
    assert entries == pytest.approx([0.01 * i for i in range(50)])
    assert p.caught_up == 0


def test_a_stall_within_the_slack_is_caught_up_and_the_schedule_does_not_slip():
    p = _Pacer(interval=0.01, latency=0.0, slack=0.04)
    arrivals = [0.01 * i for i in range(10)]  # on time ...
    arrivals += [0.125] * 10  # ... then frames 10..19 come late at once (due 0.10..0.19)
    arrivals += [0.2 + 0.01 * i for i in range(10)]  # and on time again
    entries = _entries(p, arrivals)
    assert all(e >= a for e, a in zip(entries, arrivals, strict=True))  # never before it came
    assert entries[10:13] == pytest.approx([0.125] * 3)  # the late ones enter as they come ...
    assert entries[13:] == pytest.approx([0.01 * i for i in range(13, 30)])  # ... on schedule
    assert p.caught_up == 3  # frames 11, 12 (with 10) and 13 (half an interval after)


def test_a_stall_longer_than_the_slack_restarts_the_schedule():
    p = _Pacer(interval=0.01, latency=0.0, slack=0.04)
    entries = _entries(p, [0.0] * 5 + [1.0] * 5)
    assert entries[5:] == pytest.approx([1.0 + 0.01 * i for i in range(5)])
    assert p.caught_up == 0


@pytest.mark.parametrize("seed", range(5))
def test_the_pacer_never_runs_ahead_of_the_chip_and_bursts_at_most_the_slack(seed):
    # random arrivals: bursts, stalls of every length, a source sometimes slower
    rng = random.Random(seed)
    interval, slack = 0.001, 0.008
    p = _Pacer(interval=interval, latency=0.003, slack=slack)
    t, arrivals = 0.0, []
    for _ in range(3000):
        t += rng.choice([0.0, 0.0, interval * rng.random() * 3, interval * rng.random() * 30])
        arrivals.append(t)
    times = [p.admit(a) for a in arrivals]
    entries = [e for e, _ in times]
    releases = [r for _, r in times]
    assert all(e >= a - 1e-12 for e, a in zip(entries, arrivals, strict=True))
    assert releases == sorted(releases)
    burst = round(slack / interval) + 1
    for i in range(len(entries)):
        # frames entering within less than k intervals: at most k + the slack's worth
        for k in (1, 5, 50):
            j = i
            while j + 1 < len(entries) and entries[j + 1] - entries[i] < k * interval - 1e-12:
                j += 1
            assert j - i + 1 <= k + burst, (i, k, j - i + 1)
    # and over the whole run, not more than the chip could from the first frame on
    span = entries[-1] - entries[0]
    assert len(entries) <= span / interval + burst + 1



@pytest.mark.parametrize("seed", range(3))
def test_admitting_a_batch_at_once_gives_the_same_schedule_as_frame_by_frame(seed):
    # admit_many (one call per batch, the device's hot path) is admit, n times
    rng = random.Random(seed)
    one = _Pacer(interval=0.001, latency=0.003, slack=0.008)
    many = _Pacer(interval=0.001, latency=0.003, slack=0.008)
    t = 0.0
    for _ in range(500):
        t += rng.choice([0.0, 0.0005, 0.003, 0.02, 0.2])
        n = rng.randint(1, 9)
        assert many.admit_many(t, n) == [one.admit(t) for _ in range(n)]
        assert (many.slot, many.last_entry, many.last_release, many.caught_up) == \
            (one.slot, one.last_entry, one.last_release, one.caught_up)


# -- the device: defaults, batched release, never ahead of the chip --------------------------------
def test_the_modes_that_compute_little_get_deeper_default_queues():
    # and so do the unpaced ones (throughput, no modeled latency to keep): a batch of a
    # fast model then carries more frames per thread wake-up
    assert SimulatedDevice(mode="timed").queue_depth == DEFAULT_QUEUE_DEPTH == 4
    for mode in ("reuse", "sampled", "shapes", "fast", "shapes-unpaced"):
        assert SimulatedDevice(mode=mode).queue_depth == CHEAP_QUEUE_DEPTH == 16
    assert SimulatedDevice(mode="shapes", queue_depth=3).queue_depth == 3
    with pytest.raises(ValueError, match="queue_depth must be an int >= 1, got 0"):
        SimulatedDevice(mode="shapes", queue_depth=0)


@pytest.mark.asyncio
async def test_a_fast_model_in_the_modes_that_compute_little_buffers_4_ms_of_frames():
    # 16 frames of a model at 20,000 fps ride out 0.8 ms of host stall: less than a busy
    # host's thread waits for a core. By default those modes buffer 4 ms of such a
    # model's frames each way (at most 96); a slower model keeps 16, an explicit
    # queue_depth is kept as given, and timed keeps 4.
    from memryx.device.simulated import CHEAP_QUEUE_S, MAX_CHEAP_QUEUE_DEPTH

    async def depth(fps: float, **options: object) -> tuple[int, int, float]:
        dev = SimulatedDevice(**options)  # type: ignore[arg-type]
        await dev.open(identity(fps=fps, latency_ms=0.5), 0)
        try:
            limits = dev.limits(0)
            assert limits.in_queue == limits.out_queue
            stats = dev.statistics()["models"][0]
            assert stats["queue_depth"] == limits.in_queue
            pacer = dev._models[0].pacer
            return limits.in_queue, limits.batch, pacer.slack if pacer else 0.0
        finally:
            await dev.aclose()

    for mode in ("reuse", "sampled", "shapes"):
        q, batch, slack = await depth(20000, mode=mode)
        assert q == round(CHEAP_QUEUE_S * 20000) == 80
        assert slack == pytest.approx(80 / 20000)  # the catch-up follows the queue
        assert batch == 7  # the release tick's frames, as before
        assert (await depth(1000, mode=mode))[0] == CHEAP_QUEUE_DEPTH
        assert (await depth(1e6, mode=mode))[0] == MAX_CHEAP_QUEUE_DEPTH
        assert (await depth(20000, mode=mode, queue_depth=16))[0] == 16
    assert (await depth(20000, mode="timed"))[0] == DEFAULT_QUEUE_DEPTH
    for mode in ("fast", "shapes-unpaced"):  # unpaced: no modeled rate to scale by
        assert (await depth(20000, mode=mode))[0] == CHEAP_QUEUE_DEPTH

@pytest.mark.asyncio
async def test_the_unpaced_modes_queue_at_most_4_mib_of_big_frames():
    # 16 frames each way pay for small frames; big ones get as many as fit in
    # UNPACED_QUEUE_BYTES, never fewer than timed mode's 4 (4K float32 frames in
    # flight would otherwise hold gigabytes)
    from memryx.device.simulated import UNPACED_QUEUE_BYTES

    async def depth(shape: tuple[int, ...], **options: object) -> int:
        dev = SimulatedDevice(mode="fast", **options)  # type: ignore[arg-type]
        await dev.open(identity(fps=1000, latency_ms=1, shape=shape), 0)
        try:
            assert dev.limits(0).in_queue == dev.statistics()["models"][0]["queue_depth"]
            return dev.limits(0).in_queue
        finally:
            await dev.aclose()

    assert UNPACED_QUEUE_BYTES == 4 << 20
    assert await depth((1, 16)) == CHEAP_QUEUE_DEPTH
    assert await depth((1, 3, 224, 224)) == 6  # 602,112 bytes: 6 fit in 4 MiB
    assert await depth((1, 3, 1024, 1024)) == DEFAULT_QUEUE_DEPTH  # 12 MiB: the floor
    assert await depth((1, 3, 1024, 1024), queue_depth=9) == 9  # as given


def test_the_timed_frame_budget_is_unchanged():
    dfp = identity(fps=500, latency_ms=2)
    with mx.SyncAccl(dfp) as accl:  # the latency goal (bench_latency) is about this budget
        assert accl.statistics()["models"][0]["frame_budget"] == 4 + 2 + 4


@pytest.mark.asyncio
async def test_frames_due_together_are_released_by_one_wake_up_never_early():
    dfp = identity(fps=2000, latency_ms=5)
    async with opened(SimulatedDevice(mode="shapes"), dfp) as dev:
        done: list[tuple[int, float]] = []
        t0 = time.monotonic()
        futs = []
        for i in range(40):
            fut = dev.submit(0, [[np.zeros((1, 4), np.float32)]])
            fut.add_done_callback(lambda _f, i=i: done.append((i, time.monotonic())))
            futs.append(fut)
        await asyncio.wait_for(asyncio.gather(*futs), 10)
        # (futures of separate submits may complete out of order when the host stalls the
        # test between two of them; the core pairs outputs in submission order anyway)
        assert sorted(i for i, _ in done) == list(range(40))
        for i, t in done:  # frame i is due at t0 + i/2000 + 5 ms; the loop may wake 2.5 ms early
            assert t - t0 >= i / 2000 + 0.005 - 0.0025, (i, t - t0)
        stats = dev.statistics()["models"][0]
        assert stats["frames_out"] == 40


@pytest.mark.asyncio
async def test_a_source_stall_is_caught_up_and_costs_no_throughput():
    fps = 1000.0
    dfp = identity(fps=fps, latency_ms=2)
    # 64 ms of slack: a loaded host may oversleep the stall below by tens of milliseconds
    async with opened(SimulatedDevice(mode="shapes", queue_depth=64), dfp) as dev:
        x = [[np.zeros((1, 4), np.float32)]]
        futs = [dev.submit(0, x) for _ in range(20)]  # 20 ms of work queued
        await asyncio.sleep(0.030)  # the source stalls: the chip ran dry 10 ms ago
        futs += [dev.submit(0, x) for _ in range(40)]
        await asyncio.wait_for(asyncio.gather(*futs), 10)
        stats = dev.statistics()["models"][0]
        # the late frames entered as they came, catching up on the schedule
        assert stats["caught_up_frames"] > 0
        assert stats["frames_out"] == 60


@pytest.mark.asyncio
async def test_close_with_frames_waiting_for_their_release_cancels_them_and_its_timer():
    dfp = identity(fps=100, latency_ms=50)
    dev = SimulatedDevice(mode="shapes")
    await dev.open(dfp, 0)
    futs = [dev.submit(0, [[np.zeros((1, 4), np.float32)]]) for _ in range(10)]
    await asyncio.sleep(0)
    await dev.aclose()
    assert all(f.cancelled() for f in futs)
    releases = dev._models[0].releases
    assert releases is not None and releases.timer is None and not releases.due
    with pytest.raises(mx.ClosedError):
        dev.submit(0, [[np.zeros((1, 4), np.float32)]])


def test_stop_in_the_middle_of_a_paced_run_returns_promptly_and_delivers_no_more():
    dfp = identity(fps=200, latency_ms=20)
    got: list[float] = []
    accl = mx.AsyncAccl(dfp, mode="reuse")
    try:
        accl.connect_output(lambda out: got.append(float(out[0, 0])))
        accl.connect_input(lambda: np.zeros((1, 4), np.float32))  # never ends
        deadline = time.monotonic() + 10
        while len(got) < 20 and time.monotonic() < deadline:
            time.sleep(0.01)
        t0 = time.monotonic()
        accl.stop()
        assert time.monotonic() - t0 < 5
        n = len(got)
        time.sleep(0.1)
        assert len(got) == n  # nothing after stop() returned
    finally:
        accl.close()
    assert n >= 20


# -- sampled: staleness per stream ---------------------------------------------------------
@pytest.mark.parametrize("device_ids", [None, [0, 1]], ids=["one device", "two devices"])
def test_sampled_streams_get_only_their_own_streams_outputs(device_ids: list[int] | None):
    # identity model: an output is the frame it was computed from; stream s sends s*1000 + k
    # (over two devices each one tells the streams apart: the stream tags pass through)
    dfp = identity(fps=5000, latency_ms=1)
    n_streams, per_stream = 6, 60
    sent = [0] * n_streams
    got: dict[int, list[float]] = {s: [] for s in range(n_streams)}

    def source(s: int) -> np.ndarray | None:
        sent[s] += 1
        k = sent[s]
        return np.full((1, 4), s * 1000 + k, np.float32) if k <= per_stream else None

    def sink(s: int, out: np.ndarray) -> None:
        got[s].append(float(out[0, 0]))

    accl = mx.MultiStreamAsyncAccl(dfp, device_ids, mode="sampled")
    try:
        accl.connect_streams(source, sink, n_streams)
        accl.wait()
        dev = accl.statistics()["device"]
    finally:
        accl.close()
    for s, values in got.items():
        assert len(values) == per_stream
        for k, v in enumerate(values, start=1):
            assert s * 1000 < v <= s * 1000 + k  # its own stream's, never a later frame's
    if device_ids is not None:
        return  # each device counts the staleness of the frames it answered
    sampled = dev["models"][0]["sampled"]
    for s, values in got.items():
        staleness = [s * 1000 + k - v for k, v in enumerate(values, start=1)]
        per = sampled["streams"][s]
        assert per["frames"] == per_stream
        assert per["staleness_max"] == max(staleness)
        assert per["staleness_mean"] == pytest.approx(sum(staleness) / per_stream)
    assert sum(sampled["staleness_histogram"].values()) == n_streams * per_stream
    assert sampled["fresh"] + sampled["stale"] == n_streams * per_stream


@pytest.mark.asyncio
async def test_sampled_stale_outputs_come_from_the_same_stream_when_the_host_is_slow():
    dfp = identity(fps=2000, latency_ms=1)
    async with opened(SimulatedDevice(mode="sampled"), dfp) as dev:
        real = dev._models[0].run
        assert real is not None

        def slow(frame: list[np.ndarray]) -> list[np.ndarray]:
            time.sleep(0.01)  # 20 modeled frames per computation: most frames are stale
            return real(frame)

        dev._models[0].run = slow
        futs = [(s, k, dev.submit(0, [[np.full((1, 4), s * 1000 + k, np.float32)]], [s]))
                for k in range(60) for s in (1, 2, 3)]
        await asyncio.wait_for(asyncio.gather(*(f for _, _, f in futs)), 20)
        for s, k, fut in futs:
            v = float(fut.result()[0][0][0, 0])
            assert s * 1000 <= v <= s * 1000 + k, (s, k, v)
        sampled = dev.statistics()["models"][0]["sampled"]
        assert sampled["stale"] > 0
        assert all(sampled["streams"][s]["frames"] == 60 for s in (1, 2, 3))


def test_sampled_requests_of_different_calls_are_different_streams():
    dfp = identity(fps=5000, latency_ms=1)

    async def main() -> tuple[list[np.ndarray], list[np.ndarray]]:
        async with mx.AsyncAccl(dfp, mode="sampled") as accl:
            a = [np.full((1, 4), 100 + k, np.float32) for k in range(40)]
            b = [np.full((1, 4), 200 + k, np.float32) for k in range(40)]
            outs = await asyncio.gather(accl.arun(a), accl.arun(b))
            return outs[0], outs[1]

    got_a, got_b = asyncio.run(main())
    assert all(100 <= float(o[0, 0]) < 140 for o in got_a)
    assert all(200 <= float(o[0, 0]) < 240 for o in got_b)


@pytest.mark.asyncio
async def test_a_device_without_stream_tags_is_one_stream_and_the_faulty_device_passes_them():
    dfp = identity(fps=5000, latency_ms=1)
    async with opened(FaultyDevice(SimulatedDevice(mode="sampled")), dfp) as dev:
        assert dev.takes_streams
        futs = [dev.submit(0, [[np.full((1, 4), k, np.float32)]], [k % 2]) for k in range(10)]
        futs.append(dev.submit(0, [[np.full((1, 4), 99, np.float32)]]))  # no tags: stream 0
        await asyncio.wait_for(asyncio.gather(*futs), 10)
        streams = dev.statistics()["models"][0]["sampled"]["streams"]
        assert streams[0]["frames"] == 6 and streams[1]["frames"] == 5
        with pytest.raises(ValueError, match="2 stream tags for 1 frames"):
            dev.submit(0, [[np.zeros((1, 4), np.float32)]], [0, 1])


@pytest.mark.asyncio
async def test_a_stream_whose_only_computation_failed_gets_a_fresh_one_not_a_hang():
    dfp = identity(fps=2000, latency_ms=1)
    async with opened(SimulatedDevice(mode="sampled"), dfp) as dev:
        m = dev._models[0]
        real = m.run
        calls = [0]

        def flaky(frame: list[np.ndarray]) -> list[np.ndarray]:
            calls[0] += 1
            if calls[0] == 1:
                raise RuntimeError("first computation fails")
            assert real is not None
            return real(frame)

        m.run = flaky
        first = dev.submit(0, [[np.full((1, 4), 1, np.float32)]], [3])
        with pytest.raises(mx.DeviceError, match="first computation fails"):
            await asyncio.wait_for(first, 5)
        # stream 3 has nothing computed: its next frames must still be answered
        rest = [dev.submit(0, [[np.full((1, 4), k, np.float32)]], [3]) for k in range(2, 8)]
        outs = await asyncio.wait_for(asyncio.gather(*rest), 5)
        assert all(2 <= float(o[0][0][0, 0]) <= k for o, k in zip(outs, range(2, 8),
                                                                  strict=True))


# -- outputs kept by the device are never the receiver's to change -----------------------------
def test_sampled_outputs_belong_to_the_receiver_and_the_kept_ones_are_read_only():
    dfp = identity(fps=5000, latency_ms=1)
    with mx.SyncAccl(dfp, mode="sampled") as accl:
        outs = accl.run([np.full((1, 4), k, np.float32) for k in range(30)])
        for o in outs:
            assert o.flags.writeable
            o[...] = -1.0  # the receiver scribbles on every output ...
        again = accl.run([np.full((1, 4), 50 + k, np.float32) for k in range(5)])
    assert all(float(o[0, 0]) >= 0 for o in again)  # ... nothing kept was touched


def test_the_reuse_cache_keeps_read_only_arrays_and_hands_out_writeable_copies():
    cache = ReuseCache(4)
    x = [np.ones(3, np.float32)]
    first = cache.compute(lambda f: [f[0] * 2], [x])[0]
    hit = cache.cached([x])
    assert hit is not None
    kept = cache._entries[frame_key(x)][0]
    assert not kept.flags.writeable
    with pytest.raises(ValueError, match="read-only"):
        kept[0] = 5
    assert first[0].flags.writeable and hit[0][0].flags.writeable
    hit[0][0][...] = 9
    assert cache.cached([x])[0][0].tolist() == [2, 2, 2]  # type: ignore[index]


# -- attacks on reuse ----------------------------------------------------------------------
def test_a_frame_changed_by_its_sender_after_send_gets_the_outputs_of_what_was_sent():
    dfp = identity(fps=2000, latency_ms=1)
    with mx.SyncAccl(dfp, mode="reuse") as accl:
        x = np.full((1, 4), 1.0, np.float32)
        accl.send(x)
        x[...] = 2.0  # the sender reuses its buffer at once
        accl.send(x)
        x[...] = 1.0
        accl.send(x)  # identical to the first: a hit, the first's outputs
        outs = [accl.receive() for _ in range(3)]
        reuse = accl.statistics()["device"]["models"][0]["reuse"]
    assert [float(o[0, 0]) for o in outs] == [1.0, 2.0, 1.0]
    assert reuse["hits"] == 1 and reuse["misses"] == 2


def test_frames_of_equal_bytes_but_other_dtypes_or_shapes_never_share_outputs():
    # the key covers dtype and shape; with them the bytes' length is fixed, so the encoding
    # is one-to-one: only a 128-bit hash collision could mix two frames up
    a = np.zeros(16, np.uint8)
    variants = [a, a.view(np.int8), a.view(np.float32), a.view(np.float64), a.reshape(4, 4),
                a.reshape(1, 16), a.view(">f4"), a.view("<f4").reshape(2, 2)]
    keys = {frame_key([v]) for v in variants}
    assert len(keys) == len(variants)
    pos, neg = np.zeros((1, 4), np.float32), np.full((1, 4), -0.0, np.float32)
    assert frame_key([pos]) != frame_key([neg])  # equal values, other bytes: computed apart


def test_reuse_with_a_full_cache_and_many_distinct_frames_in_flight_stays_exact():
    dfp = identity(fps=3000, latency_ms=1)
    n_streams, per_stream = 4, 40

    def source(s: int) -> np.ndarray | None:
        sent[s] += 1
        k = sent[s]
        return np.full((1, 4), s * 1000 + k % 7, np.float32) if k <= per_stream else None

    sent = [0] * n_streams
    got: dict[int, list[float]] = {s: [] for s in range(n_streams)}
    accl = mx.MultiStreamAsyncAccl(dfp, mode="reuse", cache_size=1)  # far too small
    try:
        accl.connect_streams(source, lambda s, o: got[s].append(float(o[0, 0])), n_streams)
        accl.wait()
        reuse = accl.statistics()["device"]["models"][0]["reuse"]
    finally:
        accl.close()
    for s, values in got.items():
        assert values == [s * 1000 + k % 7 for k in range(1, per_stream + 1)]
    assert reuse["entries"] <= 1 and reuse["evictions"] > 0
    assert reuse["hits"] + reuse["misses"] == n_streams * per_stream


@pytest.mark.asyncio
async def test_a_failed_stream_recomputed_on_the_loop_answers_every_parked_frame():
    # a graph cheap enough to run on the loop: the frame computed while answering parked
    # ones re-enters the parked queue's bookkeeping; no frame may be lost there
    dfp = identity(fps=5000, latency_ms=1)
    async with opened(SimulatedDevice(mode="sampled"), dfp) as dev:
        m = dev._models[0]
        real = m.run
        assert real is not None
        fails = {"n": 1}

        def flaky(frame: list[np.ndarray]) -> list[np.ndarray]:
            if fails["n"]:
                fails["n"] -= 1
                raise RuntimeError("boom")
            return real(frame)

        m.run, m.frame_cost, m.costed = flaky, 0.0, True  # computed inline, on the loop
        futs = [dev.submit(0, [[np.full((1, 4), k, np.float32)]], [k % 3]) for k in range(30)]
        results = await asyncio.wait_for(asyncio.gather(*futs, return_exceptions=True), 10)
        failed = [r for r in results if isinstance(r, BaseException)]
        assert len(failed) == 1 and "boom" in str(failed[0])
        for k, r in enumerate(results):
            if not isinstance(r, BaseException):
                v = float(r[0][0][0, 0])
                assert v % 3 == k % 3 and v <= k  # its own stream's, never a later frame's
        assert not m.parked
