"""Attacks on the unpaced queues, the output thread's count and the close (a hostile
user's view): each test is a defect found that way, or a guarantee that held."""

from __future__ import annotations

import asyncio
import sys
import threading
import time
from typing import Any

import numpy as np
import pytest

import memryx as mx

X = np.zeros((1, 4), np.float32)


def _yield_inside_memryx_loops(frame: Any, event: str, arg: Any) -> Any:
    """A trace function: at every step of a generator expression of memryx, give the GIL
    away for a moment, as a thread switch there would (the loop thread then runs)."""
    if "memryx" not in frame.f_code.co_filename:
        return None
    if event == "line" and frame.f_code.co_name == "<genexpr>":
        time.sleep(0.0002)
    return _yield_inside_memryx_loops


def _statistics_switching(accl: Any) -> dict[str, Any]:
    before = sys.gettrace()
    sys.settrace(_yield_inside_memryx_loops)
    try:
        return accl.statistics()  # type: ignore[no-any-return]
    finally:
        sys.settrace(before)


@pytest.mark.timeout(60)
def test_statistics_read_from_another_thread_while_frames_flow_never_raises(
        identity_dfp: Any) -> None:
    # statistics() is read by the program's own thread (a progress line) while the loop
    # thread moves frames: its sums walked the loop's deques (the lane's batches on the
    # device, the simulated device's jobs) in Python and raised "deque mutated during
    # iteration" when a thread switch let the loop change them meanwhile
    accl = mx.MultiStreamAsyncAccl(identity_dfp, device="sim:fast")
    errors: list[BaseException] = []
    reads = 0
    try:
        accl.connect_streams(lambda i: X, lambda i, y: None, 8)
        deadline = time.monotonic() + 1.5
        while time.monotonic() < deadline:
            try:
                stats = _statistics_switching(accl)
            except Exception as exc:  # what a reader would see
                errors.append(exc)
                break
            reads += 1
            assert stats["models"][0]["in_flight"] >= 0
    finally:
        accl.close()
    assert not errors, errors
    assert reads > 5
    model = accl.statistics()["models"][0]
    assert model["frames_in"] == model["frames_out"] + model["dropped"]
    assert model["in_flight"] == 0


@pytest.mark.timeout(60)
@pytest.mark.parametrize("closer", ["another thread", "the output callback"])
def test_outputs_a_plain_callback_got_before_a_close_count_as_frames_out(
        identity_dfp: Any, closer: str) -> None:
    # The output thread reports a batch of outputs (up to 64) to the loop once the whole
    # batch is called back; a close in the middle of a batch (a slow callback, or the
    # callback closing the accelerator itself) lost that report: the outputs the callback
    # got were in no frames_out, and frames_in != frames_out + dropped after the close
    accl = mx.AsyncAccl(identity_dfp, device="sim:fast")
    calls = 0
    called = threading.Event()

    def output(y: np.ndarray) -> None:
        nonlocal calls
        calls += 1
        if calls == 5:
            called.set()
            if closer == "the output callback":
                accl.close()
        time.sleep(0.02)

    accl.connect_input(lambda: X)
    accl.connect_output(output)
    assert called.wait(20)
    if closer == "another thread":
        accl.close()
    else:
        accl.wait()  # returns once the callback's close stopped the pipeline
        accl.close()
    model = accl.statistics()["models"][0]
    assert calls >= 5
    assert model["frames_out"] == calls, (model, calls)
    assert model["frames_in"] == model["frames_out"] + model["dropped"], model
    assert model["in_flight"] == 0
    assert sum(s["frames_out"] for s in model["streams"].values()) == calls


@pytest.mark.timeout(60)
def test_outputs_an_async_callback_got_before_a_close_count_as_frames_out(
        identity_dfp: Any) -> None:
    # the same for an async output callback: it was counted delivered when it returned,
    # and a close while it awaited cancelled it before it was counted
    accl = mx.AsyncAccl(identity_dfp, device="sim:fast")
    calls = 0
    called = threading.Event()

    async def output(y: np.ndarray) -> None:
        nonlocal calls
        calls += 1
        if calls == 5:
            called.set()
        await asyncio.sleep(0.02)

    accl.connect_input(lambda: X)
    accl.connect_output(output)
    assert called.wait(20)
    accl.close()
    model = accl.statistics()["models"][0]
    assert model["frames_out"] == calls, (model, calls)
    assert model["frames_in"] == model["frames_out"] + model["dropped"], model
    assert sum(s["frames_out"] for s in model["streams"].values()) == calls


@pytest.mark.timeout(120)
def test_each_model_of_a_dfp_gets_its_own_unpaced_depth_and_a_given_depth_is_kept() -> None:
    # (held) the 4 MiB cap sums every input of a model with its dtype's size, per model,
    # per device of a MultiDevice; queue_depth= as given wins; a bad one is refused
    from memryx import testing
    from memryx.device.simulated import UNPACED_QUEUE_BYTES

    dfp = mx.NeuralCompiler(models=[
        testing.identity_model((1, 16)),                       # tiny: 16
        testing.identity_model((1, 3, 224, 224), np.float16),  # 301,056 B: 13 fit
        testing.add_model((1, 3, 300, 300), np.float64),       # 2 x 2.16 MB: the floor, 4
    ]).run()
    assert UNPACED_QUEUE_BYTES // (3 * 224 * 224 * 2) == 13

    def depths(**options: Any) -> tuple[list[int], list[list[int]]]:
        with mx.SyncAccl(dfp, device="sim:fast", **options) as accl:
            stats = accl.statistics()
            device = stats["device"]
            per = (device["devices"].values() if "devices" in device else [device])
            return ([m["frame_budget"] for m in stats["models"]],
                    [[m["queue_depth"] for m in d["models"]] for d in per])

    in_chip = mx.device.SimulatedDevice(mode="fast").concurrency  # frames computing at once
    budgets, queues = depths()
    assert queues == [[16, 13, 4]]
    assert budgets == [2 * q + in_chip for q in (16, 13, 4)]
    budgets, queues = depths(device_ids=[0, 1])
    assert queues == [[16, 13, 4]] * 2
    assert budgets == [2 * (2 * q + in_chip) for q in (16, 13, 4)]
    assert depths(queue_depth=3)[1] == [[3, 3, 3]]
    for bad in (0, -1, 2.5, True, "4"):
        with pytest.raises(ValueError, match="queue_depth"):
            depths(queue_depth=bad)
