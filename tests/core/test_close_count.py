"""A stop while the output thread is about to call the output callback: the frame is
counted either delivered (the callback is called) or dropped (by the close), never both."""

from __future__ import annotations

import threading
import time
from typing import Any

import numpy as np
import pytest

import memryx as mx
from memryx._core.lane import Lane

X = np.zeros((1, 4), np.float32)


@pytest.mark.timeout(60)
def test_a_frame_the_output_thread_takes_as_the_close_counts_is_counted_once(
        identity_dfp: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    # The output thread checked the stop, then counted the frame handed to the callback;
    # a close counting the frames in flight between the two counted it dropped as well.
    # Here the count on the output thread is slowed down, and the close runs meanwhile.
    entered, armed, counted = threading.Event(), threading.Event(), threading.Event()

    def get(self: Lane) -> int:
        return int(self.__dict__.get("_handed_n", 0))

    def set_(self: Lane, n: int) -> None:
        slowed = armed.is_set() and threading.current_thread().name.startswith("memryx-output")
        if slowed:
            armed.clear()
            entered.set()
            time.sleep(0.3)  # the close counts now
        self.__dict__["_handed_n"] = n
        if slowed:
            counted.set()

    monkeypatch.setattr(Lane, "handed", property(get, set_), raising=False)
    accl = mx.AsyncAccl(identity_dfp, device="sim:fast")
    flowing = threading.Event()
    accl.connect_output(lambda y: flowing.set())
    accl.connect_input(lambda: X)
    assert flowing.wait(10)
    lane = accl._engine.lanes[0]
    armed.set()
    assert entered.wait(10)
    accl.close()
    assert counted.wait(10)
    delivered = max(lane.meter.frames_out, lane.handed)
    assert delivered + lane.dropped == lane.meter.frames_in, (
        delivered, lane.dropped, lane.meter.frames_in)
