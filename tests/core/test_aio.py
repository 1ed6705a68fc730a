"""Unit tests of the core's async primitives: Channel, Budget, the thread bridge."""

from __future__ import annotations

import asyncio
import threading

import pytest

from memryx._core.aio import (
    END,
    Budget,
    Channel,
    ChannelClosed,
    TaskSet,
)
from memryx._core.workers import ThreadConsumer, ThreadProducer
from tests.conftest import in_memryx_call, loop_turns, settle, stack

pytestmark = pytest.mark.asyncio


# -- Channel ------------------------------------------------------------------------------------
async def test_channel_moves_batches_in_order():
    ch: Channel[int] = Channel(8)
    for i in range(5):
        assert ch.put_nowait(i)
    assert await ch.get(3) == [0, 1, 2]
    assert await ch.get(10) == [3, 4]
    assert len(ch) == 0


async def test_channel_is_bounded_and_put_waits_for_room():
    ch: Channel[int] = Channel(2)
    assert ch.put_nowait(1) and ch.put_nowait(2)
    assert not ch.put_nowait(3)
    putter = asyncio.create_task(ch.put(3))
    await loop_turns()
    assert not putter.done()
    assert await ch.get(1) == [1]
    await asyncio.wait_for(putter, 2)
    assert await ch.get(5) == [2, 3]


async def test_a_cancelled_get_takes_nothing():
    ch: Channel[int] = Channel(4)
    getter = asyncio.create_task(ch.get(4))
    await loop_turns()
    getter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await getter
    ch.put_nowait(7)
    assert await ch.get(4) == [7]


async def test_a_cancelled_put_puts_nothing():
    ch: Channel[int] = Channel(1)
    ch.put_nowait(1)
    putter = asyncio.create_task(ch.put(2))
    await loop_turns()
    putter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await putter
    assert await ch.get(4) == [1]
    assert ch.get_nowait(4) == []


async def test_close_lets_getters_drain_then_ends():
    ch: Channel[int] = Channel(4)
    ch.put_nowait(1)
    ch.close()
    with pytest.raises(ChannelClosed):
        ch.put_nowait(2)
    assert await ch.get(4) == [1]
    with pytest.raises(ChannelClosed):
        await ch.get(4)


async def test_close_wakes_a_waiting_getter():
    ch: Channel[int] = Channel(4)
    getter = asyncio.create_task(ch.get(4))
    await loop_turns()
    ch.close()
    with pytest.raises(ChannelClosed):
        await asyncio.wait_for(getter, 2)


async def test_abort_drops_items_and_counts_them():
    ch: Channel[int] = Channel(4)
    ch.put_many_nowait([1, 2, 3])
    assert ch.abort() == 3
    assert ch.dropped == 3
    with pytest.raises(ChannelClosed):
        await ch.get(1)


async def test_a_thread_producer_wakes_the_loop_once_per_batch(monkeypatch):
    ch: Channel[int] = Channel(1000)
    loop = asyncio.get_running_loop()
    wakeups = 0
    original = loop.call_soon_threadsafe

    def counting(*args, **kwargs):  # type: ignore[no-untyped-def]
        nonlocal wakeups
        wakeups += 1
        return original(*args, **kwargs)

    monkeypatch.setattr(loop, "call_soon_threadsafe", counting)
    getter = asyncio.create_task(ch.get(1000))
    await loop_turns()
    started = threading.Event()

    def produce() -> None:
        started.set()
        for i in range(500):
            assert ch.put_from_thread(i)

    t = threading.Thread(target=produce)
    t.start()
    t.join(5)
    got = await asyncio.wait_for(getter, 2)
    got += ch.get_nowait(1000)
    assert got == list(range(500))
    # the loop was busy elsewhere while the thread put 500 items: they rode one wake-up
    assert wakeups == 1


async def test_thread_side_blocks_when_full_and_gets_batches():
    ch: Channel[int] = Channel(3)
    out: list[list[int]] = []

    def consume() -> None:
        while batch := ch.get_from_thread(10):
            out.append(batch)

    t = threading.Thread(target=consume)
    t.start()
    for i in range(20):
        await ch.put(i)
    ch.close()
    await asyncio.to_thread(t.join, 5)
    assert [x for b in out for x in b] == list(range(20))
    assert all(len(b) <= 3 for b in out)


# -- Budget -------------------------------------------------------------------------------------
async def test_budget_hands_out_batches_first_come_first_served():
    b = Budget(4)
    assert await b.take(3) == 3
    assert b.take_nowait(5) == 1
    assert b.used == 4
    first = asyncio.create_task(b.take(2))
    second = asyncio.create_task(b.take(2))
    await loop_turns()
    assert b.take_nowait(1) == 0  # queued waiters come first
    b.give(1)
    assert await asyncio.wait_for(first, 2) == 1
    assert not second.done()
    b.give(3)
    assert await asyncio.wait_for(second, 2) == 2
    assert b.free == 1


async def test_a_cancelled_budget_waiter_holds_nothing():
    b = Budget(1)
    await b.take(1)
    waiter = asyncio.create_task(b.take(1))
    await loop_turns()
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    b.give(1)
    assert b.free == 1


async def test_a_grant_racing_a_cancellation_is_handed_back():
    b = Budget(1)
    await b.take(1)
    waiter = asyncio.create_task(b.take(1))
    await loop_turns()
    b.give(1)  # granted to the waiter ...
    waiter.cancel()  # ... which is cancelled before it runs
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert b.free == 1


# -- TaskSet ------------------------------------------------------------------------------------
async def test_taskset_reports_a_failure_once_and_closes_the_rest():
    errors: list[BaseException] = []
    ts = TaskSet("t", errors.append)

    async def boom() -> None:
        raise ValueError("x")

    ts.spawn(boom(), "boom")
    ts.spawn(asyncio.sleep(10), "sleeper")
    await loop_turns()
    assert [type(e) for e in errors] == [ValueError]
    await ts.aclose()
    assert len(ts) == 0 and len(errors) == 1


# -- the thread bridge --------------------------------------------------------------------------
async def test_thread_producer_makes_one_item_per_credit_and_ends():
    stop = threading.Event()
    made = iter(range(7))

    def produce() -> object:
        return next(made, END)

    p: ThreadProducer[int] = ThreadProducer("test-producer", produce, 10, stop)
    p.grant(3)
    got = []
    while len(got) < 3:
        got += await asyncio.wait_for(p.items.get(10), 2)
    # its thread waits for credit (blocked in _run's wait): no credit, no call
    thread = next(t for t in threading.enumerate() if t.name.startswith("test-producer"))
    assert settle(lambda: in_memryx_call("_run", thread) and any(
        function == "wait" and filename == threading.__file__
        for filename, function in stack(thread)))
    assert got == [0, 1, 2] and len(p.items) == 0 and p.produced == 3
    p.grant(10)
    with pytest.raises(ChannelClosed):
        while True:
            got += await asyncio.wait_for(p.items.get(10), 2)
    assert got == list(range(7))
    assert p.produced == 7 and p.granted == 13 and p.error is None


async def test_thread_producer_keeps_the_error_as_itself():
    stop = threading.Event()

    def produce() -> object:
        raise KeyboardInterrupt

    p: ThreadProducer[int] = ThreadProducer("test-producer", produce, 4, stop)
    p.grant(1)
    with pytest.raises(ChannelClosed):
        await asyncio.wait_for(p.items.get(4), 2)
    assert isinstance(p.error, KeyboardInterrupt)


async def test_thread_producer_stops_without_credit():
    stop = threading.Event()
    p: ThreadProducer[int] = ThreadProducer("test-producer", lambda: 1, 4, stop)
    p.halt()
    with pytest.raises(ChannelClosed):
        await asyncio.wait_for(p.items.get(4), 2)


async def test_thread_consumer_reports_each_batch_on_the_loop():
    stop = threading.Event()
    loop_thread = threading.get_ident()
    seen: list[int] = []
    reports: list[tuple[int, int]] = []
    all_done = asyncio.Event()

    def consume(batch: list[int]) -> int:
        assert threading.get_ident() != loop_thread
        seen.extend(batch)
        return len(batch)

    def done(n: int) -> None:
        assert threading.get_ident() == loop_thread
        reports.append((n, len(seen)))
        if sum(k for k, _ in reports) == 50:
            all_done.set()

    c: ThreadConsumer[int] = ThreadConsumer("test-consumer", consume, done, 100, stop, 8)
    c.items.put_many_nowait(range(50))
    await asyncio.wait_for(all_done.wait(), 5)
    c.items.close()
    assert seen == list(range(50))
    assert sum(n for n, _ in reports) == 50 and all(n <= 8 for n, _ in reports)
