"""The simulated device takes its frames itself in the modes that compute little (copies
only of the frames it may read later, memryx.device._taking), and mode "sampled"'s
bookkeeping of what it computes (memryx.device._compute.Sampler)."""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest

import memryx as mx
from memryx import testing
from memryx.device import SimulatedDevice
from memryx.device._compute import Sampler
from memryx.device._taking import Answered, Borrowed, Keyed

SHAPE = (1, 3, 64, 64)


@pytest.fixture(scope="module")
def cnn() -> mx.Dfp:
    return mx.NeuralCompiler(models=testing.mobilenet_like(), fps=5000, latency_ms=1).run()


def contents(n: int, distinct: int) -> list[np.ndarray]:
    rng = np.random.default_rng(7)
    pool = [rng.standard_normal(SHAPE).astype(np.float32) for _ in range(distinct)]
    return [pool[i % distinct] for i in range(n)]


def exact(dfp: mx.Dfp, xs: list[np.ndarray]) -> list[np.ndarray]:
    with mx.SyncAccl(dfp, mode="fast") as accl:
        return [np.asarray(o) for o in accl.run(xs)]


def run_with_one_buffer(dfp: mx.Dfp, xs: list[np.ndarray], mode: str) -> tuple[
        list[np.ndarray], dict[str, object]]:
    """An app that captures every frame into the same array (the next call overwrites
    what the last one returned, while that frame is still in flight)."""
    buf = np.empty(SHAPE, np.float32)
    sent = [0]
    got: list[np.ndarray] = []

    def source() -> np.ndarray | None:
        if sent[0] == len(xs):
            return None
        buf[...] = xs[sent[0]]
        sent[0] += 1
        return buf

    accl = mx.AsyncAccl(dfp, mode=mode)
    try:
        accl.connect_input(source)
        accl.connect_output(lambda out: got.append(out.copy()))
        accl.wait()
        stats = accl.statistics()["device"]["models"][0]
    finally:
        accl.close()
    return got, stats


def slowed(dev: SimulatedDevice, seconds: float, fails: float | None = None) -> None:
    """Make model 0's computation take ``seconds`` (and raise for frames whose first
    value exceeds ``fails``): finished after its frame is due."""
    model = dev._models[0]
    run = model.run
    assert run is not None

    def slow(frame: list[np.ndarray]) -> list[np.ndarray]:
        time.sleep(seconds)
        if fails is not None and frame[0].flat[0] > fails:
            raise ValueError("a frame this model fails on")
        return run(frame)

    model.run = slow


def source_index(out: np.ndarray, want: list[np.ndarray]) -> int:
    matches = [j for j, w in enumerate(want) if np.allclose(out, w, rtol=1e-5, atol=1e-6)]
    assert matches, "an output is no frame's real output"
    return matches[-1]


# -- what each mode keeps ------------------------------------------------------------------
@pytest.mark.asyncio
async def test_each_mode_copies_only_what_it_may_read_later(cnn):
    x = contents(1, 1)[0]
    for mode, kept in (("shapes", Borrowed), ("shapes-unpaced", Borrowed),
                       ("timed", None), ("fast", None)):
        dev = SimulatedDevice(mode=mode)
        await dev.open(cnn, 0)
        try:
            take = dev.frame_taker(0)
            if kept is None:
                assert take is None  # every frame is computed: the core copies
            else:
                assert take is not None
                frame = take([x], 0)
                assert type(frame) is kept and frame[0] is x  # the app's own, not copied
                out = await asyncio.wait_for(dev.submit(0, [frame]), 10)
                assert out[0][0].shape == (1, 10)
        finally:
            await dev.aclose()


@pytest.mark.asyncio
async def test_reuse_answers_cached_frames_when_taken_and_copies_only_misses(cnn):
    x = contents(1, 1)[0]
    want = (await asyncio.to_thread(exact, cnn, [x]))[0]
    dev = SimulatedDevice(mode="reuse")
    await dev.open(cnn, 0)
    try:
        take = dev.frame_taker(0)
        assert take is not None
        first = take([x], 0)
        assert type(first) is Keyed and first[0] is not x  # a miss: a private copy
        np.testing.assert_array_equal(first[0], x)
        (out,) = await asyncio.wait_for(dev.submit(0, [first]), 10)
        np.testing.assert_allclose(out[0], want, rtol=1e-5, atol=1e-6)
        second = take([x], 0)
        assert type(second) is Answered and second[0] is x  # answered: never read again
        x2 = x.copy()
        second[0][...] = 0  # the app's array changes: the answer does not
        (out2,) = await asyncio.wait_for(dev.submit(0, [second]), 10)
        np.testing.assert_allclose(out2[0], want, rtol=1e-5, atol=1e-6)
        out2[0][...] = -1  # and the receiver's outputs are its own
        x[...] = x2
        (out3,) = await asyncio.wait_for(dev.submit(0, [take([x], 0)]), 10)
        np.testing.assert_allclose(out3[0], want, rtol=1e-5, atol=1e-6)
        reuse = dev.statistics()["models"][0]["reuse"]
        assert (reuse["hits"], reuse["misses"]) == (2, 1)  # each frame counted once
    finally:
        await dev.aclose()


@pytest.mark.asyncio
async def test_reuse_batches_of_answered_keyed_and_plain_frames_together(cnn):
    xs = contents(3, 3)
    want = (await asyncio.to_thread(exact, cnn, xs))
    dev = SimulatedDevice(mode="reuse")
    await dev.open(cnn, 0)
    try:
        take = dev.frame_taker(0)
        assert take is not None
        await asyncio.wait_for(dev.submit(0, [take([xs[0]], 0)]), 10)  # cached now
        batch = [take([xs[0]], 0), take([xs[1]], 0), [xs[2].copy()]]  # answered, keyed, plain
        assert [type(f) for f in batch] == [Answered, Keyed, list]
        outs = await asyncio.wait_for(dev.submit(0, batch), 10)
        for out, w in zip(outs, want, strict=True):
            np.testing.assert_allclose(out[0], w, rtol=1e-5, atol=1e-6)
        again = await asyncio.wait_for(dev.submit(0, [take([x], 0) for x in xs]), 10)
        for out, w in zip(again, want, strict=True):
            np.testing.assert_allclose(out[0], w, rtol=1e-5, atol=1e-6)
        reuse = dev.statistics()["models"][0]["reuse"]
        assert reuse["hits"] + reuse["misses"] == 7 and reuse["misses"] == 3
    finally:
        await dev.aclose()


@pytest.mark.parametrize("mode", ["reuse", "sampled", "timed"])
def test_an_app_that_reuses_one_buffer_gets_the_outputs_of_what_it_sent(cnn, mode):
    xs = contents(120, distinct=6 if mode == "reuse" else 120)
    want = exact(cnn, xs)
    got, stats = run_with_one_buffer(cnn, xs, mode)
    assert len(got) == len(xs)
    if mode == "sampled":  # a real output of the frame itself or an earlier one, never later
        staleness = [i - source_index(o, want[: i + 1]) for i, o in enumerate(got)]
        assert min(staleness) >= 0
        sampled = stats["sampled"]
        assert isinstance(sampled, dict)
        assert sampled["fresh"] + sampled["stale"] == len(xs)
    else:
        for o, w in zip(got, want, strict=True):
            np.testing.assert_allclose(o, w, rtol=1e-5, atol=1e-6)
    if mode == "reuse":
        reuse = stats["reuse"]
        assert isinstance(reuse, dict)
        assert reuse["hits"] + reuse["misses"] == len(xs) and reuse["misses"] >= 6


def test_reuse_counts_each_frame_once_on_every_input_path(cnn):
    xs = contents(60, distinct=4)
    want = exact(cnn, xs)
    with mx.SyncAccl(cnn, mode="reuse") as accl:  # requests: the stream is not known
        got = accl.run(xs)
        reuse = accl.statistics()["device"]["models"][0]["reuse"]
    for o, w in zip(got, want, strict=True):
        np.testing.assert_allclose(o, w, rtol=1e-5, atol=1e-6)
    assert reuse["hits"] + reuse["misses"] == 60 and reuse["misses"] == 4

    async def main() -> dict[str, object]:
        it = iter(xs)

        async def source() -> np.ndarray | None:
            return next(it, None)

        outs: list[np.ndarray] = []

        async def sink(o: np.ndarray) -> None:
            outs.append(o)

        async with mx.AsyncAccl(cnn, mode="reuse") as accl:
            accl.connect_input(source)
            accl.connect_output(sink)
            await accl.await_done()
            stats: dict[str, object] = accl.statistics()["device"]["models"][0]["reuse"]
        assert len(outs) == 60
        return stats

    reuse = asyncio.run(main())
    assert reuse["hits"] == 56 and reuse["misses"] == 4


# -- sampled: which frames are copied -----------------------------------------------------
def test_a_frame_is_borrowed_only_while_the_slots_are_busy_and_its_stream_has_outputs():
    s = Sampler(slots=1)
    assert not s.borrow(0)  # a slot is free: it may be computed
    [(_, _, computed)] = s.admit_many([0], [True])
    assert computed and not s.borrow(0)  # slot busy, but stream 0 has no output yet
    assert not s.borrow(1)  # a new stream needs its own first outputs
    s.computed_one(0, 0, [np.zeros(2)])
    assert not s.borrow(0)  # a slot is free again
    s.admit_many([0], [True])  # slot busy again; stream 0 has an output
    assert s.borrow(0)
    [(_, seq, computed)] = s.admit_many([0], [False])  # numbered: never computed
    assert not computed and s.can_answer(0, seq)
    assert s._streams[0].borrowed == 0


def test_a_stream_with_a_borrowed_frame_on_its_way_is_not_forgotten():
    s = Sampler(slots=1)
    s.admit_many([0], [True])
    s.computed_one(0, 0, [np.zeros(2)])
    s.outputs_for(0, 0)
    s.admit_many([5], [True])  # the slot busy (stream 5's computation)
    assert s.borrow(0)
    for stream in range(100, 100 + Sampler.MAX_STREAMS + 10):  # more streams than kept
        s.admit_many([stream], [True])
    assert 0 in s._streams
    [(_, seq, computed)] = s.admit_many([0], [False])
    assert not computed and s.can_answer(0, seq)


def test_outputs_a_pending_frame_needs_are_kept_and_no_others():
    s = Sampler(slots=2)
    s.admit_many([0], [True])  # seq 0: computed and answered
    s.computed_one(0, 0, [np.zeros(2)])
    s.outputs_for(0, 0)
    s.running = s.slots  # every slot busy from here: the next frame is not computed
    [(_, waiting, computed)] = s.admit_many([0], [True])
    assert not computed  # answered by seq 0's outputs when due
    s.running = 0
    for _ in range(100):  # later frames computed and answered first
        [(_, seq, computed)] = s.admit_many([0], [True])
        assert computed
        s.computed_one(0, seq, [np.full(2, seq)])
        s.outputs_for(0, seq)
    assert s.can_answer(0, waiting)  # seq 0's outputs were kept for it
    np.testing.assert_array_equal(s.outputs_for(0, waiting)[0], np.zeros(2))
    # nothing pending: only the newest output can answer a later frame, the rest went
    assert list(s._streams[0].done) == [seq]


@pytest.mark.asyncio
async def test_a_borrowed_frame_gets_an_earlier_frames_outputs_whatever_its_buffer_holds(cnn):
    """The app refills its one buffer while the borrowed frame waits: its answer is the
    outputs of a frame computed before it, never those of what the buffer holds later."""
    a, b, c = contents(3, 3)
    want = await asyncio.to_thread(exact, cnn, [a, b, c])
    dev = SimulatedDevice(mode="sampled")
    await dev.open(cnn, 0)
    try:
        take = dev.frame_taker(0)
        assert take is not None
        await asyncio.wait_for(dev.submit(0, [take([a.copy()], 0)], streams=[0]), 10)
        model = dev._models[0]
        model.sampler.running = model.sampler.slots  # (every slot busy)
        buf = b.copy()
        frame = take([buf], 0)
        assert type(frame) is Borrowed
        model.sampler.running = 0
        fut = dev.submit(0, [frame], streams=[0])
        buf[...] = c  # the app reuses its buffer
        (out,) = await asyncio.wait_for(fut, 10)
        np.testing.assert_allclose(out[0], want[0], rtol=1e-5, atol=1e-6)  # a's, stale 1
        assert dev.statistics()["models"][0]["sampled"]["stale"] == 1
    finally:
        await dev.aclose()


def test_many_streams_with_reused_buffers_never_get_another_streams_outputs(cnn):
    """More streams than the sampler keeps, each refilling a buffer of its worker thread:
    every output is its own stream's (each stream always sends the same content)."""
    k, streams, per = 4, Sampler.MAX_STREAMS + 30, 3
    xs = contents(k, k)
    want = exact(cnn, xs)
    local, lock = threading.local(), threading.Lock()
    sent = [0] * streams
    wrong: list[int] = []
    count = [0]

    def source(stream: int) -> np.ndarray | None:
        with lock:
            if sent[stream] == per:
                return None
            sent[stream] += 1
        buf = getattr(local, "buf", None)
        if buf is None:
            buf = local.buf = np.empty(SHAPE, np.float32)
        buf[...] = xs[stream % k]
        return buf

    def sink(stream: int, out: np.ndarray) -> None:
        count[0] += 1
        if not np.allclose(out, want[stream % k], rtol=1e-5, atol=1e-6):
            wrong.append(stream)

    accl = mx.MultiStreamAsyncAccl(cnn, mode="sampled")
    try:
        accl.connect_streams(source, sink, streams)
        accl.wait()
    finally:
        accl.close()
    assert count[0] == streams * per and wrong == []


def test_long_latency_sampled_with_two_slots_delivers_every_frame(cnn):
    """Computed frames overtaking a waiting one by more than Sampler.KEEP used to leave
    it unanswerable: the run stopped for good."""
    dfp = mx.NeuralCompiler(models=testing.mobilenet_like(), fps=5000, latency_ms=100).run()
    xs = contents(3000, distinct=16)
    it = iter(xs)
    got = [0]
    accl = mx.AsyncAccl(dfp, device=SimulatedDevice(mode="sampled", concurrency=2))
    try:
        accl.connect_input(lambda: next(it, None))
        accl.connect_output(lambda o: got.__setitem__(0, got[0] + 1))
        accl.wait()  # (a hang: the test timeout)
        sampled = accl.statistics()["device"]["models"][0]["sampled"]
    finally:
        accl.close()
    assert got[0] == 3000 and sampled["fresh"] + sampled["stale"] == 3000


# -- reuse: hits counted where frames arrive ----------------------------------------------
def test_reuse_counts_no_hit_for_a_frame_refused_on_its_way(cnn):
    x = contents(1, 1)[0]
    with mx.SyncAccl(cnn, mode="reuse") as accl:
        accl.send(x)
        accl.receive()
        sent = 1
        for _ in range(300):
            try:
                accl.send(x, timeout=0)
                sent += 1
            except TimeoutError:
                pass
        for _ in range(sent - 1):
            accl.receive()
        model = accl.statistics()["device"]["models"][0]
    assert model["frames_in"] == sent
    assert (model["reuse"]["hits"], model["reuse"]["misses"]) == (sent - 1, 1)


def test_reuse_counts_match_the_frames_that_reached_the_device_after_a_stop(cnn):
    xs = contents(2, 2)
    n = [0]

    def source() -> np.ndarray:
        n[0] += 1
        time.sleep(0.0002)
        return xs[n[0] % 2]

    accl = mx.AsyncAccl(cnn, mode="reuse")
    try:
        accl.connect_input(source)
        accl.connect_output(lambda o: None)
        time.sleep(0.3)
        accl.stop()
        model = accl.statistics()["device"]["models"][0]
    finally:
        accl.close()
    # a hit is counted when a frame reaches the device, not when it is taken (frames the
    # stop dropped on their way, or queued uncomputed, are in neither count)
    looked_up = model["reuse"]["hits"] + model["reuse"]["misses"]
    assert model["frames_out"] <= looked_up <= model["frames_in"]
    assert model["frames_out"] > 0


# -- sampled: the background threads ------------------------------------------------------
def test_sampled_computes_off_the_loop_on_the_runtimes_worker_threads(cnn):
    seen: set[str] = set()
    xs = contents(200, distinct=200)

    def sink(out: np.ndarray) -> None:
        seen.update(t.name for t in threading.enumerate())

    it = iter(xs)
    accl = mx.AsyncAccl(cnn, mode="sampled")
    try:
        accl.connect_input(lambda: next(it, None))
        accl.connect_output(sink)
        accl.wait()
        sampled = accl.statistics()["device"]["models"][0]["sampled"]
    finally:
        accl.close()
    assert any(name.startswith("memryx-worker-") for name in seen)
    assert sampled["computed"] >= 1 and sampled["fresh"] + sampled["stale"] == 200


@pytest.mark.asyncio
async def test_a_failure_handed_to_a_later_frame_leaves_nothing_pending(cnn):
    """A computation that fails after its frame was answered fails the next job instead;
    that job's frames are no longer pending, so the stream's kept outputs are trimmed."""
    good = contents(1, 1)[0]
    bad = good.copy()
    bad[0, 0, 0, 0] = 1e6
    dev = SimulatedDevice(mode="sampled")
    await dev.open(cnn, 0)
    try:
        model = dev._models[0]
        slowed(dev, 0.003, fails=1e5)
        take = dev.frame_taker(0)
        assert take is not None
        await asyncio.wait_for(dev.submit(0, [take([good], 0)], streams=[0]), 10)
        futs = []
        for i in range(120):
            futs.append(dev.submit(0, [take([bad if i % 2 else good], 0)], streams=[0]))
            await asyncio.sleep(0.001)
        for _ in range(200):
            futs.append(dev.submit(0, [take([good], 0)], streams=[0]))
            await asyncio.sleep(0.0005)
        results = await asyncio.wait_for(asyncio.gather(*futs, return_exceptions=True), 60)
        errors = [r for r in results if isinstance(r, BaseException)]
        assert errors and all(isinstance(e, mx.DeviceError) for e in errors)
        stream = model.sampler._streams[0]
        assert not stream.pending and len(stream.done) == 1
    finally:
        await dev.aclose()


@pytest.mark.asyncio
async def test_cancelling_the_caller_that_binds_does_not_cancel_the_others(cnn):
    x = contents(1, 1)[0]
    accl = mx.AsyncAccl(cnn, mode="sampled")
    try:
        first = asyncio.ensure_future(accl.arun([x]))
        second = asyncio.ensure_future(accl.arun([x]))
        await asyncio.sleep(0.001)
        first.cancel()
        with pytest.raises(asyncio.CancelledError):
            await first
        out = await asyncio.wait_for(second, 20)
        assert len(out) == 1
        assert len(await asyncio.wait_for(accl.arun([x]), 20)) == 1
    finally:
        await accl.aclose()
