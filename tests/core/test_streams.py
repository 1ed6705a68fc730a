"""The worker pool that serves plain input callbacks of many streams (memryx/_core/streams.py)."""

from __future__ import annotations

import asyncio
import threading
import time
from collections import defaultdict
from typing import Any

import numpy as np
import pytest

import memryx as mx
from memryx._core import streams as pool_mod


def val(s: int, i: int) -> np.ndarray:
    return np.full((1, 4), s * 100_000 + i, np.float32)


class Streams:
    """``count`` streams of ``n`` frames each; records order, overlap and peak concurrency."""

    def __init__(self, count: int, n: int | list[int]) -> None:
        self.n = n if isinstance(n, list) else [n] * count
        self.next = [0] * count
        self.got: dict[int, list[int]] = defaultdict(list)
        self.lock = threading.Lock()
        self.active: dict[int, int] = defaultdict(int)
        self.running = 0
        self.peak = 0
        self.overlap = False
        self.threads: set[str] = set()
        self.ended: set[int] = set()
        self.after_end = 0

    def source(self, s: int) -> np.ndarray | None:
        with self.lock:
            self.active[s] += 1
            self.overlap |= self.active[s] > 1
            self.running += 1
            self.peak = max(self.peak, self.running)
            self.threads.add(threading.current_thread().name)
        try:
            i = self.next[s]
            if i >= self.n[s]:
                self.after_end += s in self.ended  # called again after it returned None
                self.ended.add(s)
                return None
            self.next[s] += 1
            return val(s, i)
        finally:
            with self.lock:
                self.active[s] -= 1
                self.running -= 1

    def sink(self, s: int, y: np.ndarray) -> None:
        self.got[s].append(int(y[0, 0]))

    def check(self, streams: range | list[int]) -> None:
        for s in streams:
            assert self.got[s] == [s * 100_000 + i for i in range(self.n[s])], s
        assert not self.overlap
        assert not self.after_end


def stats(accl: Any) -> dict[str, Any]:
    return accl.statistics()["models"][0]


@pytest.mark.parametrize("count", [1, 3, 64])
def test_every_stream_in_order_none_lost_budget_returned(identity_dfp, count):
    src = Streams(count, 40)
    accl = mx.MultiStreamAsyncAccl(identity_dfp)
    accl.connect_streams(src.source, src.sink, count)
    accl.wait()
    src.check(range(count))
    st = stats(accl)
    assert st["in_flight"] == 0 and st["dropped"] == 0
    assert st["frames_in"] == st["frames_out"] == 40 * count
    assert all(m["frames_in"] == 40 for m in st["streams"].values())
    accl.close()


def test_workers_are_a_bounded_pool_not_a_thread_per_stream(identity_dfp):
    src = Streams(32, 30)
    accl = mx.MultiStreamAsyncAccl(identity_dfp)
    accl.connect_streams(src.source, src.sink, 32)
    accl.wait()
    accl.close()
    src.check(range(32))
    # BASE_WORKERS on a quiet machine; a worker preempted for STUCK_S on a loaded one
    # looks stuck and may add one, but never a thread per stream
    assert len(src.threads) < 32 // 2, src.threads


def test_stream_workers_bounds_the_pool_and_concurrent_calls(identity_dfp):
    src = Streams(8, 50)
    accl = mx.MultiStreamAsyncAccl(identity_dfp, stream_workers=1)
    accl.connect_streams(src.source, src.sink, 8)
    accl.wait()
    accl.close()
    src.check(range(8))
    assert src.peak == 1 and len(src.threads) == 1


def test_blocking_streams_do_not_stall_the_others(identity_dfp):
    """More streams block than the pool has workers: the pool grows, the others go on."""
    blocked = pool_mod.BASE_WORKERS + 2
    release = threading.Event()
    src = Streams(12, 200)

    def source(s: int) -> np.ndarray | None:
        if s < blocked:
            release.wait(20)
            return None
        return src.source(s)

    accl = mx.MultiStreamAsyncAccl(identity_dfp)
    accl.connect_streams(source, src.sink, 12)
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:  # the others finish while the first ones block
            if all(len(src.got[s]) == 200 for s in range(blocked, 12)):
                break
            time.sleep(0.01)
        assert not release.is_set()
        src.check(range(blocked, 12))
    finally:
        release.set()
    accl.wait()
    accl.close()


def test_one_slow_stream_keeps_its_order_and_the_others_their_pace(identity_dfp):
    src = Streams(6, 60)

    def source(s: int) -> np.ndarray | None:
        if s == 0:
            time.sleep(0.01)
        return src.source(s)

    accl = mx.MultiStreamAsyncAccl(identity_dfp)
    accl.connect_streams(source, src.sink, 6)
    accl.wait()
    accl.close()
    src.check(range(6))


def test_streams_share_the_budget_fairly(identity_dfp):
    count, stop = 16, threading.Event()
    made = [0] * count
    order: list[int] = []

    def source(s: int) -> np.ndarray | None:
        if stop.is_set():
            return None
        made[s] += 1
        return val(s, made[s])

    def sink(s: int, y: np.ndarray) -> None:
        order.append(s)
        if len(order) == 3200:
            stop.set()

    accl = mx.MultiStreamAsyncAccl(identity_dfp)
    accl.connect_streams(source, sink, count)
    accl.wait()
    accl.close()
    counts = [order[:3200].count(s) for s in range(count)]
    assert min(counts) >= 150 and max(counts) <= 250, counts  # fair share: 200


def test_a_raising_stream_ends_alone_and_is_reraised(identity_dfp):
    src = Streams(5, 30)

    def source(s: int) -> np.ndarray | None:
        if s == 2 and src.next[2] == 7:
            raise KeyError("camera 2 unplugged")
        return src.source(s)

    accl = mx.MultiStreamAsyncAccl(identity_dfp)
    accl.connect_streams(source, src.sink, 5)
    with pytest.raises(KeyError, match="camera 2 unplugged") as info:
        accl.wait()
    assert any("stream 2" in note for note in info.value.__notes__)
    accl.close()
    src.check([0, 1, 3, 4])
    assert src.got[2] == [200_000 + i for i in range(7)]


@pytest.mark.parametrize("rep", range(5))
def test_streams_ending_early_and_at_once(identity_dfp, rep):
    """Regression: a stream whose end the loop had not seen yet was granted units and
    called again after it returned None (and its end counted twice)."""
    lengths = [0, 1, 0, 5, 2, 0, 30, 1] * 4
    src = Streams(32, lengths)
    accl = mx.MultiStreamAsyncAccl(identity_dfp)
    accl.connect_streams(src.source, src.sink, 32)
    accl.wait()
    accl.close()
    src.check(range(32))


def test_generator_and_stop_iteration_streams(identity_dfp):
    def gen(s: int) -> Any:
        for i in range(25):
            yield val(s, i)

    got: dict[int, list[int]] = defaultdict(list)
    accl = mx.MultiStreamAsyncAccl(identity_dfp)
    accl.connect_streams(gen, lambda s, y: got[s].append(int(y[0, 0])), 4)
    accl.wait()
    accl.close()
    assert got == {s: [s * 100_000 + i for i in range(25)] for s in range(4)}

    count = [0] * 3

    def stopper(s: int) -> np.ndarray:
        if count[s] == 4 + s:
            raise StopIteration
        count[s] += 1
        return val(s, count[s] - 1)

    got.clear()
    accl = mx.MultiStreamAsyncAccl(identity_dfp)
    accl.connect_streams(stopper, lambda s, y: got[s].append(int(y[0, 0])), 3)
    accl.wait()
    accl.close()
    assert got == {s: [s * 100_000 + i for i in range(4 + s)] for s in range(3)}


def test_added_streams_join_the_pool_and_a_new_pool_after_the_end(identity_dfp):
    src = Streams(6, [50, 50, 50, 20, 20, 20])
    accl = mx.MultiStreamAsyncAccl(identity_dfp)
    accl.connect_streams(src.source, src.sink, 3)
    accl.connect_streams(src.source, src.sink, 3)  # streams 3..5
    accl.wait()
    accl.close()
    src.check(range(6))


@pytest.mark.parametrize("when", [0.0, 0.02, 0.1])
def test_stop_mid_run_with_64_streams(identity_dfp, when):
    calls_after = []
    stopped = threading.Event()

    def source(s: int) -> np.ndarray:
        if stopped.is_set():
            calls_after.append(s)
        return val(s, 0)

    def sink(s: int, y: np.ndarray) -> None:
        if stopped.is_set():
            calls_after.append(-1 - s)

    accl = mx.MultiStreamAsyncAccl(identity_dfp)
    accl.connect_streams(source, sink, 64)
    time.sleep(when)
    t0 = time.monotonic()
    accl.stop()
    stopped.set()
    assert time.monotonic() - t0 < 5
    time.sleep(0.05)
    assert not calls_after
    st = stats(accl)
    assert st["in_flight"] == 0, st
    assert st["frames_in"] == st["frames_out"] + st["dropped"], st
    accl.close()


def test_close_during_load_with_blocked_and_busy_streams(identity_dfp):
    release = threading.Event()

    def source(s: int) -> np.ndarray:
        if s % 8 == 0:
            release.wait(10)
        return val(s, 0)

    accl = mx.MultiStreamAsyncAccl(identity_dfp)
    accl.connect_streams(source, lambda s, y: None, 64)
    time.sleep(0.1)
    t0 = time.monotonic()
    accl.close()
    assert time.monotonic() - t0 < 5
    release.set()


def test_an_output_callback_that_raises_stops_the_pool(identity_dfp):
    n = [0]

    def sink(s: int, y: np.ndarray) -> None:
        n[0] += 1
        if n[0] == 50:
            raise ValueError("sink broke")

    accl = mx.MultiStreamAsyncAccl(identity_dfp)
    accl.connect_streams(lambda s: val(s, 0), sink, 16)
    with pytest.raises(ValueError, match="sink broke"):
        accl.wait()
    st = stats(accl)
    assert st["in_flight"] == 0, st
    accl.close()


@pytest.mark.asyncio
async def test_plain_streams_on_the_apps_loop(identity_dfp):
    src = Streams(10, 40)
    async with mx.MultiStreamAsyncAccl(identity_dfp) as accl:
        accl.connect_streams(src.source, src.sink, 10)
        await accl.await_done()
    src.check(range(10))


@pytest.mark.asyncio
@pytest.mark.parametrize("delay", [0, 0.001, 0.01])
async def test_cancelled_await_done_stops_the_streams(identity_dfp, delay):
    calls = [0]
    accl = mx.MultiStreamAsyncAccl(identity_dfp)
    await accl.__aenter__()

    def source(s: int) -> np.ndarray:
        calls[0] += 1
        return val(s, 0)

    accl.connect_streams(source, lambda s, y: None, 16)
    waiter = asyncio.ensure_future(accl.await_done())
    await asyncio.sleep(delay)
    waiter.cancel()  # documented: a cancelled await_done closes the accelerator
    with pytest.raises(asyncio.CancelledError):
        await waiter
    seen = calls[0]
    await asyncio.sleep(0.05)
    assert calls[0] == seen
    st = accl.statistics()["models"][0]
    assert st["in_flight"] == 0, st
    await accl.aclose()


@pytest.mark.asyncio
async def test_aclose_at_every_point_of_a_run(identity_dfp):
    for delay in (0, 0.001, 0.005, 0.02):
        async with mx.MultiStreamAsyncAccl(identity_dfp) as accl:
            accl.connect_streams(lambda s: val(s, 0), lambda s, y: None, 32)
            await asyncio.sleep(delay)
        st = accl.statistics()["models"][0]
        assert st["in_flight"] == 0, (delay, st)


def test_a_blocked_stream_within_stream_workers_does_not_slow_the_others(identity_dfp):
    """With the pool at its limit, one worker stuck in a blocking callback: the other
    one serves every other stream (a sleeping worker is woken by the loop's tick)."""
    release = threading.Event()
    src = Streams(4, 300)

    def source(s: int) -> np.ndarray | None:
        if s == 0:
            release.wait(30)
            return None
        return src.source(s)

    accl = mx.MultiStreamAsyncAccl(identity_dfp, stream_workers=2)
    accl.connect_streams(source, src.sink, 4)
    try:
        t0 = time.monotonic()
        while time.monotonic() - t0 < 15:
            if all(len(src.got[s]) == 300 for s in (1, 2, 3)):
                break
            time.sleep(0.01)
        src.check([1, 2, 3])
    finally:
        release.set()
    accl.wait()
    accl.close()


def test_base_exceptions_and_hidden_coroutines_from_a_stream_are_reraised_as_themselves(
        identity_dfp):
    src = Streams(4, 20)

    def source(s: int) -> np.ndarray | None:
        if s == 1:
            raise KeyboardInterrupt("stream 1 interrupted")
        return src.source(s)

    accl = mx.MultiStreamAsyncAccl(identity_dfp)
    accl.connect_streams(source, src.sink, 4)
    with pytest.raises(KeyboardInterrupt, match="stream 1 interrupted"):
        accl.wait()
    accl.close()
    src.check([0, 2, 3])

    async def frame_later() -> np.ndarray:
        return val(0, 0)

    accl = mx.MultiStreamAsyncAccl(identity_dfp)
    accl.connect_streams(lambda s: frame_later(), lambda s, y: None, 3)
    with pytest.raises(mx.UsageError, match="returned an awaitable"):
        accl.wait()
    accl.close()


def test_plain_and_async_streams_added_to_one_model(identity_dfp):
    src = Streams(6, 25)

    async def async_source(s: int) -> np.ndarray | None:
        return src.source(s)

    accl = mx.MultiStreamAsyncAccl(identity_dfp)
    accl.connect_streams(src.source, src.sink, 3)
    accl.connect_streams(async_source, src.sink, 3)  # streams 3..5 run on the loop
    accl.wait()
    accl.close()
    src.check(range(6))


def test_camera_like_streams_that_sleep_for_their_next_frame_keep_their_rate(identity_dfp):
    """Each callback blocks until its stream's next frame is due: the pool grows so that
    the streams wait in parallel, not one after the other."""
    count, rate, frames_each = 24, 100.0, 40  # 0.4 s of frames per stream
    sent, got = [0] * count, [0] * count
    start = [0.0]

    def source(s: int) -> np.ndarray | None:
        if sent[s] == frames_each:
            return None
        delay = start[0] + sent[s] / rate - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        sent[s] += 1
        return val(s, 0)

    def sink(s: int, y: np.ndarray) -> None:
        got[s] += 1

    accl = mx.MultiStreamAsyncAccl(identity_dfp)
    start[0] = time.monotonic()
    accl.connect_streams(source, sink, count)
    accl.wait()
    elapsed = time.monotonic() - start[0]
    accl.close()
    assert got == [frames_each] * count
    # one after the other they would take count x 0.4 s; in parallel about 0.4 s
    assert elapsed < count * frames_each / rate / 2, elapsed


@pytest.mark.parametrize("count", [32, 64])
def test_many_streams_fair_shares_and_order(identity_dfp, count):
    """Every stream gets its share of the budget (round robin, one unit at a time) and its
    outputs in order, with more streams than the budget has units."""
    total, stop = 60 * count, threading.Event()
    made = [0] * count
    got: dict[int, list[int]] = defaultdict(list)
    n = [0]

    def source(s: int) -> np.ndarray | None:
        if stop.is_set():
            return None
        made[s] += 1
        return val(s, made[s])

    def sink(s: int, y: np.ndarray) -> None:
        got[s].append(int(y[0, 0]))
        n[0] += 1
        if n[0] == total:
            stop.set()

    accl = mx.MultiStreamAsyncAccl(identity_dfp)
    accl.connect_streams(source, sink, count)
    accl.wait()
    st = stats(accl)
    accl.close()
    for s in range(count):  # in order, none lost, none twice
        assert got[s] == [s * 100_000 + i for i in range(1, made[s] + 1)], s
    assert st["frames_out"] == sum(made) and st["dropped"] == 0 and st["in_flight"] == 0
    shares = [len(got[s]) for s in range(count)]
    assert max(shares) - min(shares) <= 0.25 * total / count, shares  # fair share: 60


def test_frames_made_before_a_quick_stream_blocks_are_not_held_back(identity_dfp):
    """A worker puts the frames of quick streams in one go; when a stream that was quick
    blocks, frames the worker made before it still reach the loop (the pool's tick takes
    them) and the other streams go on."""
    count, n, release = 8, 150, threading.Event()
    src = Streams(count, n)

    def source(s: int) -> np.ndarray | None:
        if s == 0 and src.next[0] == 20:
            release.wait(20)
        return src.source(s)

    accl = mx.MultiStreamAsyncAccl(identity_dfp)
    accl.connect_streams(source, src.sink, count)
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if all(len(src.got[s]) == n for s in range(1, count)):
                break
            time.sleep(0.01)
        assert not release.is_set()
        src.check(range(1, count))
        assert len(src.got[0]) == 20  # every frame it made before it blocked came out
    finally:
        release.set()
    accl.wait()
    accl.close()
    src.check(range(count))


def test_frames_of_a_stream_made_before_its_callback_blocks_come_out_and_are_counted(
        identity_dfp):
    """One stream holds many units; its callback returns three frames at once, then blocks:
    those three are not held behind the blocked call, and a stop while it blocks counts
    every frame it returned (delivered or dropped, never lost)."""
    release, got = threading.Event(), []
    calls = [0]

    def source(s: int) -> np.ndarray | None:
        calls[0] += 1
        if calls[0] == 4:
            release.wait(20)
            return None
        return val(s, calls[0])

    accl = mx.MultiStreamAsyncAccl(identity_dfp)
    accl.connect_streams(source, lambda s, y: got.append(int(y[0, 0])), 1)
    try:
        deadline = time.monotonic() + 10
        while len(got) < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert got == [1, 2, 3]
        accl.stop()
        st = stats(accl)
        assert st["frames_in"] == 3 and st["frames_out"] == 3, st
        assert st["dropped"] == 0 and st["in_flight"] == 0, st
    finally:
        release.set()
    accl.close()


@pytest.mark.parametrize("rep", range(4))
def test_a_stream_taken_up_by_another_worker_keeps_its_order(identity_dfp, rep):
    """A worker that made frames of stream A and went on to a slow callback of stream B
    still held A's frames (one put per pass); a second worker taking A up again put its
    frames of A first: A's outputs out of order (seen once in a soak run of 8 streams on
    several models). The frames another worker holds of a stream now go before it is
    taken up again."""
    src = Streams(8, 400)

    def source(s: int) -> np.ndarray | None:
        if s % 2 and src.next[s] % 3 == 0:
            time.sleep(0.001 * (1 + src.next[s] % 4))  # around a stuck worker's STUCK_S
        return src.source(s)

    accl = mx.MultiStreamAsyncAccl(identity_dfp, device="sim:fast")
    accl.connect_streams(source, src.sink, 8)
    accl.wait()
    accl.close()
    src.check(range(8))
