"""A short soak for CI: several streams on several models at once, plus SyncAccl.run
batches on another accelerator at the same time, ~50k frames (25k over the fd
device). Every frame carries its model, stream and sequence number in its
values (identity-like models: identity, add, split), so a frame lost, duplicated,
reordered or corrupted in any stream is seen. Afterwards threads, fds and RSS are
back to their baseline.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import numpy as np
import pytest

import memryx as mx
from memryx import testing
from tests.conftest import reference

from .helpers import Baseline, assert_usable

MODELS = 3          # identity (1, 4); add: two (1, 8) -> sum; split: (1, 8) -> (2x, -x)
OFFSET = 1000.0     # the add model's second input: a constant the output must carry
BATCH = 200         # frames per SyncAccl.run call on the side accelerator


@pytest.fixture(scope="module")
def soak_dfp() -> mx.Dfp:
    return mx.NeuralCompiler(models=[testing.identity_model((1, 4)), testing.add_model(),
                                     testing.split_model()]).run()


def encode(model: int, stream: int, seq: int) -> Any:
    if model == 0:
        return np.array([[model, stream, seq, -seq]], np.float32)
    x = np.zeros((1, 8), np.float32)
    x[0, :4] = (model, stream, seq, -seq)
    x[0, 4:] = np.arange(4) + stream
    if model == 1:
        return [x, np.full((1, 8), OFFSET, np.float32)]
    return x


def decode(model: int, outputs: tuple[Any, ...]) -> tuple[int, int]:
    """(stream, seq) of one frame's outputs, after checking every value."""
    if model == 0:
        (y,) = outputs
        x = y
    elif model == 1:
        (y,) = outputs
        x = y - OFFSET
    else:
        double, neg = outputs
        x = -neg
        np.testing.assert_array_equal(double, 2 * x)
    stream, seq = int(x[0, 1]), int(x[0, 2])
    np.testing.assert_array_equal(x, encode(model, stream, seq)[0] if model == 1
                                  else encode(model, stream, seq))
    return stream, seq


class Streams:
    """Inputs and outputs of ``streams`` streams on each model, ``frames`` frames each."""

    def __init__(self, streams: int, frames: int) -> None:
        self.streams, self.frames = streams, frames
        self.next_seq = [[0] * streams for _ in range(MODELS)]
        self.seen: list[dict[int, list[int]]] = [{} for _ in range(MODELS)]

    def input(self, model: int) -> Any:
        def inp(stream: int) -> Any:
            seq = self.next_seq[model][stream]
            if seq == self.frames:
                return None
            self.next_seq[model][stream] = seq + 1
            return encode(model, stream, seq)
        return inp

    def output(self, model: int) -> Any:
        def out(stream: int, *outputs: Any) -> None:
            got_stream, seq = decode(model, outputs)
            assert got_stream == stream, f"model {model}: stream {stream} got {got_stream}'s"
            self.seen[model].setdefault(stream, []).append(seq)
        return out

    def check(self) -> None:
        for model in range(MODELS):
            assert sorted(self.seen[model]) == list(range(self.streams)), model
            for stream, seqs in self.seen[model].items():
                if seqs != list(range(self.frames)):
                    lost = self.frames - len(set(seqs))
                    dup = len(seqs) - len(set(seqs))
                    raise AssertionError(f"model {model} stream {stream}: {lost} lost, {dup} "
                                         f"duplicated, in order: {seqs == sorted(seqs)}")


def side_batches(dfp: mx.Dfp, device: str, batches: int, errors: list[BaseException],
                 counted: list[int], **options: Any) -> None:
    """SyncAccl.run batches of the mlp model (a real computation) on another accelerator."""
    try:
        mlp = testing.mlp_model()
        rng = np.random.default_rng(7)
        pool = [rng.standard_normal((1, 16)).astype(np.float32) for _ in range(BATCH)]
        expected = [reference(mlp, x)[0] for x in pool]
        with mx.SyncAccl(dfp, device=device, **options) as accl:
            for b in range(batches):
                order = np.roll(np.arange(BATCH), b)  # a reordering would show
                outs = accl.run([pool[i] for i in order])
                assert len(outs) == BATCH
                for i, y in zip(order, outs, strict=True):
                    np.testing.assert_allclose(y, expected[i], rtol=1e-5, atol=1e-6)
                counted[0] += BATCH
    except BaseException as exc:  # reported by the main thread
        errors.append(exc)


@pytest.mark.slow
@pytest.mark.timeout(240)  # its own: the run takes 10-40 s here, more on a loaded machine
@pytest.mark.parametrize(("where", "streams", "frames", "batches"), [
    ("sim", 8, 1700, 45),   # 3 x 8 x 1700 + 45 x 200 = 49,800 frames
    ("fd", 6, 1150, 20),    # 3 x 6 x 1150 + 20 x 200 = 24,700 frames
])
def test_soak_streams_and_batches_on_several_models(soak_dfp, three_model_dfp, request,
                                                    where, streams, frames, batches):
    if where == "fd":
        device, options = str(request.getfixturevalue("shared_server").address), {}
    else:
        device, options = "sim", {"mode": "fast"}
    assert_usable(soak_dfp, device)  # warm-up: onnxruntime, allocator pools
    base = Baseline()
    t0 = time.monotonic()

    errors: list[BaseException] = []
    counted = [0]
    side = threading.Thread(target=side_batches, name="soak-side",
                            args=(three_model_dfp, device, batches, errors, counted),
                            kwargs=options)
    side.start()
    load = Streams(streams, frames)
    accl = mx.MultiStreamAsyncAccl(soak_dfp, device=device, **options)
    try:
        for model in range(MODELS):
            accl.connect_streams(load.input(model), load.output(model), streams,
                                 model_idx=model)
        accl.wait()
    finally:
        side.join(60)
    elapsed = time.monotonic() - t0
    assert not side.is_alive()
    if errors:
        raise errors[0]

    load.check()
    assert counted[0] == batches * BATCH
    for model, stats in enumerate(accl.statistics()["models"]):
        assert stats["frames_in"] == stats["frames_out"] == streams * frames, (model, stats)
        assert stats["in_flight"] == 0
        assert all(s["frames_out"] == frames for s in stats["streams"].values())
    total = MODELS * streams * frames + counted[0]
    growth = base.assert_back(rss_growth_mb=50)
    print(f"\nsoak {where}: {total} frames in {elapsed:.1f} s "
          f"({total / elapsed:.0f} frames/s), RSS {growth:+.1f} MB")


@pytest.mark.parametrize("where", ["sim", "fd"])
def test_a_slow_consumer_keeps_what_is_in_flight_bounded(identity_dfp, request, where):
    """16 endless fast sources, one slow output callback: the frames in flight stay
    bounded by the pipeline's queues (they do not grow with the run time)."""
    device = "sim" if where == "sim" else str(request.getfixturevalue("shared_server").address)
    frame = np.zeros((1, 4), np.float32)
    accl = mx.MultiStreamAsyncAccl(identity_dfp, device=device)
    # the slow consumer (its sleep is the behaviour under test)
    accl.connect_streams(lambda i: frame, lambda i, y: time.sleep(0.002), 16)
    samples = []
    try:
        t0 = time.monotonic()
        while time.monotonic() - t0 < 1.5:
            samples.append(accl.statistics()["models"][0]["in_flight"])
            time.sleep(0.03)  # the sampling period
    finally:
        accl.stop()
    half = len(samples) // 2
    assert max(samples) <= 200, max(samples)
    assert max(samples[half:]) <= max(samples[:half]) + 16, samples
