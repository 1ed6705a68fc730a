"""The asyncio-native API: async with, arun, astream, async callbacks, cancellation.

Every test here runs on the asyncio loop and on uvloop (see conftest).
"""

from __future__ import annotations

import asyncio
import itertools
import threading
import time

import numpy as np
import pytest

import memryx as mx
from memryx import testing
from tests.conftest import asettle, frames, quiescent, reference

pytestmark = pytest.mark.asyncio


def val(i: int) -> np.ndarray:
    return np.full((1, 4), i, np.float32)


async def test_arun_forms_match_syncaccl_run(mlp_dfp, add_dfp, split_dfp):
    mlp = testing.mlp_model()
    xs = frames(20, (1, 16))
    async with mx.AsyncAccl(mlp_dfp) as accl:
        one = await accl.arun(xs[0])
        np.testing.assert_allclose(one, reference(mlp, xs[0])[0], rtol=1e-5)
        batch = await accl.arun(xs)
        assert len(batch) == 20
        for x, y in zip(xs, batch, strict=True):
            np.testing.assert_allclose(y, reference(mlp, x)[0], rtol=1e-5)
        with pytest.raises(mx.ShapeError, match="stacked"):
            await accl.arun(np.zeros((4, 16), np.float32))
    a, b = frames(2, (1, 8))
    async with mx.SyncAccl(add_dfp) as accl:
        np.testing.assert_allclose(await accl.arun([a, b]), a + b)
        assert len(await accl.arun([[a, b], [b, a]])) == 2
    async with mx.SyncAccl(split_dfp) as accl:
        d, n = await accl.arun(a)
        np.testing.assert_allclose(d, 2 * a)
        np.testing.assert_allclose(n, -a)


async def test_many_tasks_arun_at_once_each_gets_its_own(identity_dfp):
    async with mx.AsyncAccl(identity_dfp) as accl:

        async def worker(w: int) -> list[int]:
            outs = await accl.arun([val(w * 1000 + i) for i in range(40)])
            single = await accl.arun(val(w * 1000 + 999))
            return [int(o[0, 0]) for o in outs] + [int(single[0, 0])]

        results = await asyncio.gather(*(worker(w) for w in range(12)))
    for w, got in enumerate(results):
        assert got == [w * 1000 + i for i in range(40)] + [w * 1000 + 999]


async def test_arun_does_not_block_the_loop(mobilenet_dfp):
    ticks: list[float] = []
    stop = asyncio.Event()

    async def ticker() -> None:
        while not stop.is_set():
            await asyncio.sleep(0.005)  # the ticker's own period: what is measured
            ticks.append(time.monotonic())

    async with mx.AsyncAccl(mobilenet_dfp) as accl:
        t = asyncio.create_task(ticker())
        assert await asettle(lambda: len(ticks) >= 2), "the ticker never ticked"
        await accl.arun(frames(300, (1, 3, 64, 64)))
        stop.set()
        await t
    # the ticker kept running all along: it ticked at about its own rate (a run computing
    # its frames on the loop thread would make most gaps a batch's compute time), and no
    # stall was long (generous bounds, for a loaded machine)
    gaps = sorted(b - a for a, b in itertools.pairwise(ticks))
    assert len(gaps) >= 3, gaps
    assert gaps[len(gaps) // 2] < 0.05 and gaps[-1] < 0.5, gaps


async def test_async_callbacks_run_on_the_apps_loop_thread(identity_dfp):
    loop_thread = threading.get_ident()
    app_queue: asyncio.Queue[int] = asyncio.Queue()  # an object of the app's loop
    threads = set()
    n = iter(range(30))

    async def source():
        threads.add(threading.get_ident())
        await asyncio.sleep(0)
        i = next(n, None)
        return None if i is None else val(i)

    async def sink(y):
        threads.add(threading.get_ident())
        await app_queue.put(int(y[0, 0]))

    async with mx.AsyncAccl(identity_dfp) as accl:
        accl.connect_input(source)
        accl.connect_output(sink)
        await accl.await_done()
    assert threads == {loop_thread}
    assert [app_queue.get_nowait() for _ in range(30)] == list(range(30))


async def test_async_generator_source_and_sync_sink_on_a_worker(identity_dfp):
    loop_thread = threading.get_ident()
    sink_threads = set()
    got = []

    async def source():
        for i in range(50):
            await asyncio.sleep(0)
            yield val(i)

    def sink(y):
        sink_threads.add(threading.get_ident())
        got.append(int(y[0, 0]))

    async with mx.AsyncAccl(identity_dfp) as accl:
        accl.connect_input(source)
        accl.connect_output(sink)
        await accl.await_done()
    assert got == list(range(50))
    assert loop_thread not in sink_threads


async def test_await_done_reraises_async_callback_errors(identity_dfp):
    async def source():
        raise LookupError("no such camera")

    async with mx.AsyncAccl(identity_dfp) as accl:
        accl.connect_input(source)
        accl.connect_output(lambda y: None)
        with pytest.raises(LookupError, match="no such camera"):
            await accl.await_done()


async def test_multistream_with_async_callbacks(identity_dfp):
    got: dict[int, list[int]] = {0: [], 1: [], 2: []}
    sent = [0, 0, 0]

    async def source(s):
        if sent[s] == 20:
            return None
        sent[s] += 1
        return val(s * 100 + sent[s])

    async def sink(s, y):
        got[s].append(int(y[0, 0]))

    async with mx.MultiStreamAsyncAccl(identity_dfp) as accl:
        accl.connect_streams(source, sink, 3)
        await accl.await_done()
    assert got == {s: [s * 100 + i for i in range(1, 21)] for s in range(3)}


async def test_astream_sync_and_async_iterables_in_order(identity_dfp):
    async def agen():
        for i in range(100):
            yield val(i)

    async with mx.AsyncAccl(identity_dfp) as accl:
        out1 = [int(y[0, 0]) async for y in accl.astream(val(i) for i in range(100))]
        out2 = [int(y[0, 0]) async for y in accl.astream(agen(), window=3)]
    assert out1 == list(range(100))
    assert out2 == list(range(100))


async def test_astream_keeps_at_most_window_frames_in_flight(identity_dfp):
    produced = 0

    def source():
        nonlocal produced
        for i in range(200):
            produced += 1
            yield val(i)

    async with mx.AsyncAccl(identity_dfp) as accl:
        consumed = 0
        async for y in accl.astream(source(), window=4):
            await asyncio.sleep(0.001)  # a slow consumer
            consumed += 1
            assert int(y[0, 0]) == consumed - 1
            assert produced - consumed <= 4 + 1  # window + the one being prepared
            stats = accl.statistics()["models"][0]
            assert stats["in_flight"] <= 4


async def test_leaving_astream_early_leaves_the_accelerator_usable(identity_dfp):
    async with mx.AsyncAccl(identity_dfp) as accl:
        async for _ in accl.astream((val(i) for i in range(1000)), window=8):
            break
        assert int((await accl.arun(val(5)))[0, 0]) == 5
        assert [int(y[0, 0]) async for y in accl.astream([val(1), val(2)])] == [1, 2]


async def test_astream_bad_frame_raises_from_the_iterator(identity_dfp):
    async with mx.AsyncAccl(identity_dfp) as accl:
        seen = []
        with pytest.raises(mx.ShapeError, match="got \\(1, 3\\)"):
            async for y in accl.astream([val(0), val(1), np.zeros((1, 3), np.float32)]):
                seen.append(int(y[0, 0]))
        assert seen == [0, 1]


async def test_cancelling_arun_cancels_only_that_work(mobilenet_dfp, mobilenet):
    xs = frames(5, (1, 3, 64, 64))
    async with mx.AsyncAccl(mobilenet_dfp) as accl:
        big = asyncio.create_task(accl.arun(frames(2000, (1, 3, 64, 64))))
        small = asyncio.create_task(accl.arun(xs))
        # cancel the big batch while its frames are on their way (some already out)
        assert await asettle(lambda: accl.statistics()["models"][0]["frames_out"] > 0)
        assert not big.done()
        big.cancel()
        with pytest.raises(asyncio.CancelledError):
            await big
        outs = await small
        for x, y in zip(xs, outs, strict=True):
            np.testing.assert_allclose(y, reference(mobilenet, x)[0], rtol=1e-5, atol=1e-6)
        # the accelerator goes on after the cancelled batch drains
        assert len(await accl.arun(xs)) == 5


async def test_leaving_async_with_by_exception_stops_and_reraises(identity_dfp):
    calls = 0
    before = set(threading.enumerate())

    def source():
        nonlocal calls
        calls += 1
        return val(0)

    with pytest.raises(ZeroDivisionError):
        async with mx.AsyncAccl(identity_dfp) as accl:
            accl.connect_input(source)
            accl.connect_output(lambda y: None)
            assert await asettle(lambda: calls > 3), "the input callback never ran"
            1 / 0  # noqa: B018
    n = calls
    # once nothing is left that could call it, the count is final
    assert await quiescent(before), "the accelerator's tasks or threads did not end"
    assert calls == n
    with pytest.raises(mx.ClosedError):
        await accl.arun(val(0))


async def test_sync_calls_on_the_loop_raise_instead_of_deadlocking(identity_dfp):
    async with mx.SyncAccl(identity_dfp) as accl:
        with pytest.raises(mx.LoopBlockingError, match=r"await accl\.arun"):
            accl.run(val(0))
        with pytest.raises(RuntimeError, match=r"await accl\.areceive"):
            accl.receive()
        with pytest.raises(mx.LoopBlockingError, match=r"await accl\.asend"):
            accl.send(val(0))
        with pytest.raises(mx.LoopBlockingError, match=r"await accl\.aclose"):
            accl.close()
    async with mx.AsyncAccl(identity_dfp) as accl:
        accl.connect_input(lambda: None)
        accl.connect_output(lambda y: None)
        with pytest.raises(mx.LoopBlockingError, match=r"await accl\.await_done"):
            accl.wait()
        await accl.await_done()


@pytest.fixture
def threaded_accl(identity_dfp):
    """An accelerator created outside any loop: it runs on its own runner thread."""
    accl = mx.SyncAccl(identity_dfp)
    yield accl
    accl.close()


async def test_a_threaded_accelerator_refuses_blocking_calls_on_a_loop(threaded_accl):
    with pytest.raises(mx.LoopBlockingError, match="arun"):
        threaded_accl.run(val(1))
    # ... and its async twins hop to its thread without blocking this loop
    assert int((await threaded_accl.arun(val(3)))[0, 0]) == 3
    await threaded_accl.asend(val(4))
    assert int((await threaded_accl.areceive(timeout=2000))[0, 0]) == 4


async def test_asend_areceive_and_timeouts(identity_dfp):
    async with mx.SyncAccl(identity_dfp) as accl:
        with pytest.raises(TimeoutError, match="receive"):
            await accl.areceive(timeout=20)
        for i in range(5):
            await accl.asend(val(i))
        assert [int((await accl.areceive())[0, 0]) for _ in range(5)] == list(range(5))
        await accl.asend(val(9), timeout=0)  # room: a zero timeout succeeds at once
        # wait until its output is there (no fixed sleep: loaded CI)
        assert await asettle(lambda: accl.statistics()["models"][0]["frames_out"] == 6)
        assert int((await accl.areceive(timeout=0))[0, 0]) == 9


async def test_arun_without_async_with_binds_and_aclose_releases(identity_dfp):
    accl = mx.AsyncAccl(identity_dfp)  # created inside the loop: binds on first use
    assert int((await accl.arun(val(7)))[0, 0]) == 7
    await accl.aclose()
    await accl.aclose()
    with pytest.raises(mx.ClosedError):
        await accl.arun(val(7))


async def test_connect_in_a_loop_before_binding_points_to_async_with(identity_dfp):
    accl = mx.AsyncAccl(identity_dfp)
    with pytest.raises(mx.UsageError, match="async with AsyncAccl"):
        accl.connect_input(lambda: None)
    await accl.aclose()


async def test_close_while_arun_is_submitting_raises_closed_error(identity_dfp):
    accl = mx.AsyncAccl(identity_dfp)
    task = asyncio.create_task(accl.arun([val(i) for i in range(5000)]))
    # close while it submits: frames are going in, far from all 5000
    assert await asettle(lambda: sum(m["frames_in"] for m in accl.statistics()["models"]) > 0)
    await accl.aclose()
    with pytest.raises(mx.ClosedError):
        await task
