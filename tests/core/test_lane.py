"""Unit tests of the lane: batching into submit(), in-order pairing, the frame budget."""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np
import pytest

from memryx._core.aio import TaskSet
from memryx._core.lane import MAX_FRAME_BUDGET, Lane, frame_budget
from memryx.device.base import Limits
from tests.conftest import loop_turns

pytestmark = pytest.mark.asyncio


class FakeDevice:
    """Answers every submit with a future the test resolves by hand."""

    name = "fake"

    def __init__(self, batch: int) -> None:
        self.batch = batch
        self.submits: list[tuple[list[Any], asyncio.Future[list[Any]]]] = []

    def limits(self, model_idx: int) -> Limits:
        return Limits(in_queue=2, in_chip=1, out_queue=1, batch=self.batch)

    def submit(self, model_idx: int, frames: list[Any]) -> asyncio.Future[list[Any]]:
        fut: asyncio.Future[list[Any]] = asyncio.get_running_loop().create_future()
        self.submits.append((frames, fut))
        return fut

    def answer(self, i: int) -> None:
        frames, fut = self.submits[i]
        fut.set_result([[f[0] * 10] for f in frames])


class Collect:
    def __init__(self) -> None:
        self.got: list[tuple[int, Any]] = []
        self.failed: list[BaseException] = []

    def deliver(self, key: int, outputs: Any) -> None:
        self.got.append((key, int(outputs[0][0, 0])))

    def fail(self, exc: BaseException) -> None:
        self.failed.append(exc)


def frame(i: int) -> list[np.ndarray]:
    return [np.full((1, 4), i, np.float32)]


async def make(identity_dfp: Any, batch: int = 8
               ) -> tuple[Lane, FakeDevice, TaskSet, list[BaseException]]:
    device = FakeDevice(batch)
    faults: list[BaseException] = []
    lane = Lane(identity_dfp.models[0], device, device.limits(0), faults.append)  # type: ignore[arg-type]
    tasks = TaskSet("test", faults.append)
    lane.start(tasks)
    return lane, device, tasks, faults


async def test_the_frame_budget_is_the_sum_of_the_queue_depths_capped():
    assert frame_budget(Limits(16, 0, 21, 1)) == 37
    assert frame_budget(Limits(4, 100_001, 4, 1)) == MAX_FRAME_BUDGET
    assert frame_budget(Limits(0, 0, 0, 1)) == 1


async def test_frames_queued_together_go_in_one_submit(identity_dfp):
    lane, device, tasks, _ = await make(identity_dfp, batch=8)
    sink = Collect()
    assert lane.budget.total == 4
    for i in range(3):
        assert lane.budget.take_nowait(1) == 1
        lane.put((sink, i, 0.0), frame(i))
    await asyncio.sleep(0)
    assert [len(f) for f, _ in device.submits] == [3]  # one wake-up, one submit
    await tasks.aclose()


async def test_a_batch_larger_than_the_device_takes_is_split(identity_dfp):
    lane, device, tasks, _ = await make(identity_dfp, batch=2)
    sink = Collect()
    lane.put_many([(sink, i, 0.0) for i in range(4)], [frame(i) for i in range(4)])
    await asyncio.sleep(0)
    assert [len(f) for f, _ in device.submits] == [2, 2]
    await tasks.aclose()


async def test_outputs_are_paired_in_submission_order_even_if_answered_out_of_order(
        identity_dfp):
    lane, device, tasks, _ = await make(identity_dfp, batch=1)
    a, b = Collect(), Collect()
    assert lane.budget.take_nowait(4) == 4
    for i, sink in enumerate([a, b, a, b]):
        lane.put((sink, i, 0.0), frame(i))
    await asyncio.sleep(0)
    assert len(device.submits) == 4
    for i in (3, 1, 2):  # later frames done first: nothing may be delivered yet
        device.answer(i)
    await loop_turns()
    assert a.got == b.got == []
    device.answer(0)
    await loop_turns()
    assert a.got == [(0, 0), (2, 20)] and b.got == [(1, 10), (3, 30)]
    assert lane.budget.free == 4  # every unit came back with its output
    assert lane.in_flight == 0
    await tasks.aclose()


async def test_a_failed_batch_is_a_fault_of_the_lane(identity_dfp):
    lane, device, tasks, faults = await make(identity_dfp)
    lane.put((Collect(), 0, 0.0), frame(0))
    await asyncio.sleep(0)
    device.submits[0][1].set_exception(RuntimeError("chip on fire"))
    await loop_turns()
    assert [str(f) for f in faults] == ["chip on fire"]
    await tasks.aclose()


async def test_a_device_that_refuses_a_submit_is_a_fault(identity_dfp):
    lane, device, tasks, faults = await make(identity_dfp)

    def refuse(model_idx: int, frames: list[Any]) -> Any:
        raise RuntimeError("closed")

    device.submit = refuse  # type: ignore[method-assign]
    lane.put((Collect(), 0, 0.0), frame(0))
    await asyncio.sleep(0)
    assert [str(f) for f in faults] == ["closed"]
    await tasks.aclose()


async def test_a_collector_cancelled_while_it_waits_leaves_the_device_future_alone(
        identity_dfp):
    """The collector waits for the oldest batch without awaiting its future: cancelling
    the collector neither cancels the device's future nor leaves a callback on it."""
    lane, device, tasks, faults = await make(identity_dfp, batch=1)
    sink = Collect()
    lane.put((sink, 0, 0.0), frame(0))
    await asyncio.sleep(0.01)
    (_, fut), = device.submits
    assert len(fut._callbacks) == 1  # type: ignore[attr-defined]  # the collector's wait
    await tasks.aclose()
    assert not fut.cancelled() and not fut.done()
    assert not fut._callbacks  # type: ignore[attr-defined]
    device.answer(0)  # answered after the stop: nothing is delivered, nothing fails
    await asyncio.sleep(0.01)
    assert sink.got == [] and faults == []


class TaggedDevice(FakeDevice):
    """A device that tells streams apart: records the stream tags it is given."""

    takes_streams = True

    def __init__(self, batch: int) -> None:
        super().__init__(batch)
        self.streams: list[list[int]] = []

    def submit(self, model_idx: int, frames: list[Any], streams: list[int] | None = None
               ) -> asyncio.Future[list[Any]]:
        assert streams is not None and len(streams) == len(frames)
        self.streams.append(list(streams))
        return super().submit(model_idx, frames)


class SlottedSink:
    """A receiver that cannot be weakly referenced."""

    __slots__ = ("got",)

    def __init__(self) -> None:
        self.got: list[int] = []

    def deliver(self, key: int, outputs: Any) -> None:
        self.got.append(key)

    def fail(self, exc: BaseException) -> None:  # pragma: no cover - not failed here
        raise exc


async def test_a_device_that_takes_streams_gets_each_frames_stream(identity_dfp):
    device = TaggedDevice(batch=16)
    faults: list[BaseException] = []
    lane = Lane(identity_dfp.models[0], device, device.limits(0), faults.append)  # type: ignore[arg-type]
    tasks = TaskSet("test", faults.append)
    lane.start(tasks)
    a, b, slotted = Collect(), Collect(), SlottedSink()
    # callback frames carry their stream index; each receiver is a stream of its own (< 0)
    lane.put_many([(None, 3, 0.0), (a, 0, 0.0), (b, 0, 0.0), (a, 1, 0.0), (None, 5, 0.0),
                   (slotted, 0, 0.0), (slotted, 1, 0.0)], [frame(i) for i in range(7)])
    await asyncio.sleep(0)
    (tags,) = device.streams
    assert tags[0] == 3 and tags[4] == 5
    assert tags[1] == tags[3] < 0 and tags[2] < 0 and tags[2] != tags[1]
    assert tags[5] == tags[6] < 0 and tags[5] not in (tags[1], tags[2])
    assert not faults
    await tasks.aclose()


class CallbackSink:
    """Stands for a plain output callback's deliverer: outputs handed over as the device
    future resolves (``deliver_now``) or by the collector (``deliver``)."""

    hands_over_now = True

    def __init__(self, lane: Lane) -> None:
        self.lane = lane
        self.got: list[tuple[str, int, int]] = []
        self.handed = 0

    def deliver_now(self, items: list[Any]) -> None:
        self._take("now", items)

    async def deliver(self, items: list[Any]) -> None:
        self._take("collector", items)

    def _take(self, how: str, items: list[Any]) -> None:
        for stream, outs, _, _, _ in items:
            self.got.append((how, stream, int(outs[0][0, 0])))
            self.handed += 1
            self.lane.meter.frames_out += 1
        self.lane.budget.give(len(items))


async def test_outputs_for_a_plain_callback_are_handed_over_as_the_future_resolves(
        identity_dfp):
    """The head batch goes to the output thread from the future's own callback (no
    collector wake-up in between); order and exactly-once hold whichever path a batch
    takes, and a batch with a request frame always goes through the collector."""
    lane, device, tasks, faults = await make(identity_dfp, batch=1)
    sink = CallbackSink(lane)
    lane.set_callback_sink(sink)
    request = Collect()
    assert lane.budget.take_nowait(4) == 4  # the whole budget
    for i in range(3):
        lane.put((None, 7, 0.0), frame(i))
    lane.put((request, 3, 0.0), frame(3))
    await asyncio.sleep(0)
    assert len(device.submits) == 4
    for i in (2, 1):  # later batches done first: nothing may be delivered yet
        device.answer(i)
    await loop_turns()
    assert sink.got == []
    device.answer(0)  # the collector waits for this one: handed over as it resolves
    await loop_turns()
    assert [(s, v) for _, s, v in sink.got] == [(7, 0), (7, 10), (7, 20)]
    assert sink.got[0][0] == "now"
    assert request.got == []
    device.answer(3)
    await loop_turns()
    assert request.got == [(3, 30)]
    assert lane.budget.free == 4 and lane.in_flight == 0 and not faults
    await tasks.aclose()


async def test_a_failed_batch_is_not_handed_over(identity_dfp):
    lane, device, tasks, faults = await make(identity_dfp, batch=1)
    sink = CallbackSink(lane)
    lane.set_callback_sink(sink)
    lane.put((None, 0, 0.0), frame(0))
    await asyncio.sleep(0)
    device.submits[0][1].set_exception(RuntimeError("chip on fire"))
    await loop_turns()
    assert sink.got == [] and [str(f) for f in faults] == ["chip on fire"]
    await tasks.aclose()


class HandOver:
    """A plain output callback's deliverer: takes batches on the loop (deliver_now)."""

    hands_over_now = True

    def __init__(self) -> None:
        self.batches: list[list[Any]] = []

    def deliver_now(self, items: list[Any]) -> None:
        self.batches.append([(key, int(outs[0][0, 0])) for key, outs, _, _, _ in items])

    async def deliver(self, items: list[Any]) -> None:
        self.deliver_now(items)


async def test_batches_for_a_plain_output_callback_are_handed_over_without_waking_the_collector(
        identity_dfp: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    # Each batch that resolves is handed over from its future's own callback, which then
    # waits on the next batch itself: the collector sleeps through them (it used to wake,
    # and wait anew, once per batch). A batch that cannot be handed over that way (a
    # request's) wakes it; the order stays the submission order.
    waits = [0]
    original = Lane._until_done

    async def counted(self: Lane, fut: Any) -> None:
        waits[0] += 1
        await original(self, fut)

    monkeypatch.setattr(Lane, "_until_done", counted)
    lane, device, tasks, faults = await make(identity_dfp, batch=1)
    out = HandOver()
    lane.set_callback_sink(out)
    requests = Collect()
    try:
        for i in range(4):
            assert lane.budget.take_nowait(1) == 1
            lane.put((None, 0, 0.0), frame(i))
        await loop_turns(3)
        assert len(device.submits) == 4
        for i in range(4):  # resolved one by one, each after the loop has run
            device.answer(i)
            await loop_turns(3)
        assert out.batches == [[(0, 0)], [(0, 10)], [(0, 20)], [(0, 30)]]
        assert waits[0] == 1  # one wait for all four batches
        lane.budget.give(4)
        lane.put((None, 0, 0.0), frame(4))
        assert lane.budget.take_nowait(2) == 2
        lane.put((requests, 7, 0.0), frame(5))  # a request's frame: the collector delivers it
        lane.put((None, 0, 0.0), frame(6))
        await loop_turns(3)
        for i in (6, 5, 4):  # resolved out of order: delivered in order all the same
            device.answer(i)
        await loop_turns(6)
        assert out.batches[4:] == [[(0, 40)], [(0, 60)]]
        assert requests.got == [(7, 50)]
        assert not faults
    finally:
        await tasks.aclose()
