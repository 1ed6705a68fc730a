"""MultiStreamAsyncAccl: many streams on one model."""

from __future__ import annotations

import threading
import time
from collections import defaultdict

import numpy as np
import pytest

import memryx as mx
from memryx import testing
from tests.conftest import frames, reference


class Cameras:
    """``count`` streams of ``n`` frames each; frame value encodes (stream, index)."""

    def __init__(self, count: int, n: int) -> None:
        self.n = n
        self.next = [0] * count
        self.outputs: dict[int, list[int]] = defaultdict(list)
        self.active: dict[int, int] = defaultdict(int)
        self.overlap = False
        self.lock = threading.Lock()

    def source(self, stream_idx: int):
        with self.lock:
            self.active[stream_idx] += 1
            self.overlap |= self.active[stream_idx] > 1
        try:
            i = self.next[stream_idx]
            if i == self.n:
                return None
            self.next[stream_idx] += 1
            time.sleep(0.0005 * (stream_idx % 3))  # streams of different speeds
            return np.full((1, 4), stream_idx * 100_000 + i, np.float32)
        finally:
            with self.lock:
                self.active[stream_idx] -= 1

    def sink(self, stream_idx: int, y: np.ndarray) -> None:
        self.outputs[stream_idx].append(int(y[0, 0]))


def test_each_stream_in_order_none_lost(identity_dfp):
    cams = Cameras(8, 250)
    accl = mx.MultiStreamAsyncAccl(identity_dfp)
    accl.connect_streams(cams.source, cams.sink, 8)
    accl.wait()
    assert sorted(cams.outputs) == list(range(8))
    for s in range(8):
        assert cams.outputs[s] == [s * 100_000 + i for i in range(250)]
    assert not cams.overlap


def test_outputs_equal_onnxruntime_per_stream(mobilenet, mobilenet_dfp):
    data = {s: frames(6, (3, 64, 64), seed=s) for s in range(3)}
    pos = [0, 0, 0]
    got = defaultdict(list)

    def source(s):
        if pos[s] == 6:
            return None
        pos[s] += 1
        return data[s][pos[s] - 1]

    accl = mx.MultiStreamAsyncAccl(mobilenet_dfp, stream_workers=2)
    accl.connect_streams(source, lambda s, p: got[s].append(p), 3)
    accl.wait()
    for s in range(3):
        for x, y in zip(data[s], got[s], strict=True):
            np.testing.assert_allclose(y, reference(mobilenet, x[None])[0], rtol=1e-5, atol=1e-6)


def test_streams_are_served_round_robin(identity_dfp):
    order = []
    count = [0] * 4

    def source(s):
        if count[s] == 50:
            return None
        count[s] += 1
        return np.full((1, 4), s, np.float32)

    accl = mx.MultiStreamAsyncAccl(identity_dfp)
    accl.connect_streams(source, lambda s, y: order.append(s), 4)
    accl.wait()
    # while all four are running, each gets its share: no stream runs ahead or starves
    # (frames of one stream may come a few at a time: one thread hop serves a few, and
    # over the fd device the socket adds its own bursts)
    counts = [order[:160].count(s) for s in range(4)]
    assert min(counts) >= 20, counts  # fair share is 40; a stream served last would have 0


def test_each_stream_ends_on_its_own_none(identity_dfp):
    lengths = [0, 3, 10, 1]
    cams = Cameras(4, 0)
    sent = [0] * 4

    def source(s):
        if sent[s] == lengths[s]:
            return None
        sent[s] += 1
        return np.full((1, 4), s * 100_000 + sent[s] - 1, np.float32)

    accl = mx.MultiStreamAsyncAccl(identity_dfp)
    accl.connect_streams(source, cams.sink, 4)
    accl.wait()
    for s in range(4):  # each stream's own frames, all of them, in order, and nothing more
        assert cams.outputs[s] == [s * 100_000 + i for i in range(lengths[s])]


def test_multi_output_model_streams(split_dfp):
    got = defaultdict(list)
    sent = [0, 0]

    def source(s):
        if sent[s] == 5:
            return None
        sent[s] += 1
        return np.full((1, 8), s + 1, np.float32)

    accl = mx.MultiStreamAsyncAccl(split_dfp)
    accl.connect_streams(source, lambda s, double, neg: got[s].append((double, neg)), 2)
    accl.wait()
    for s in range(2):
        assert len(got[s]) == 5
        assert all(d[0, 0] == 2 * (s + 1) and n[0, 0] == -(s + 1) for d, n in got[s])


def test_a_failing_stream_is_reported_and_the_others_finish(identity_dfp):
    cams = Cameras(3, 20)

    def source(s):
        if s == 1 and cams.next[1] == 5:
            raise ConnectionError("camera 1 lost")
        return cams.source(s)

    accl = mx.MultiStreamAsyncAccl(identity_dfp)
    accl.connect_streams(source, cams.sink, 3)
    with pytest.raises(ConnectionError, match="camera 1 lost") as info:
        accl.wait()
    assert any("stream 1" in n for n in info.value.__notes__)
    for s, n in ((0, 20), (1, 5), (2, 20)):  # stream 1 keeps the frames it made before
        assert cams.outputs[s] == [s * 100_000 + i for i in range(n)]


def test_bad_arguments(identity_dfp, three_model_dfp):
    with mx.MultiStreamAsyncAccl(identity_dfp) as accl:
        with pytest.raises(ValueError, match="stream_count must be a positive int, got 0"):
            accl.connect_streams(lambda s: None, lambda s, y: None, 0)
        with pytest.raises(mx.CallbackSignatureError, match="1 positional argument"):
            accl.connect_streams(lambda: None, lambda s, y: None, 2)
        with pytest.raises(mx.CallbackSignatureError, match="2 positional arguments"):
            accl.connect_streams(lambda s: None, lambda y: None, 2)
        with pytest.raises(mx.ModelIndexError, match="model_idx 2 out of range"):
            accl.connect_streams(lambda s: None, lambda s, y: None, 2, model_idx=2)
    with pytest.raises(ValueError, match="stream_workers"):
        mx.MultiStreamAsyncAccl(identity_dfp, stream_workers=0)
    with mx.MultiStreamAsyncAccl(three_model_dfp) as accl:
        accl.connect_streams(lambda s: None, lambda s, y: None, 2, model_idx=0)
        with pytest.raises(mx.NotConnectedError, match="model 1 input, model 1 output"):
            accl.wait()


def test_several_models_each_with_streams(three_model_dfp):
    got = defaultdict(list)
    counts = defaultdict(int)
    shapes = {0: [(1, 16)], 1: [(1, 8), (1, 8)], 2: [(1, 8)]}

    def source_for(m):
        def source(s):
            if counts[m, s] == 10:
                return None
            counts[m, s] += 1
            i = counts[m, s] - 1
            arrays = [np.full(sh, 100 * s + i + k, np.float32) for k, sh in enumerate(shapes[m])]
            return arrays if len(arrays) > 1 else arrays[0]
        return source

    accl = mx.MultiStreamAsyncAccl(three_model_dfp)
    for m in range(3):
        accl.connect_streams(source_for(m), lambda s, *o, m=m: got[m, s].append(o), 2 + m,
                             model_idx=m)
    accl.wait()
    mlp = testing.mlp_model()
    for m in range(3):
        for s in range(2 + m):
            assert len(got[m, s]) == 10
            for i, outs in enumerate(got[m, s]):  # each stream's own frames, in order
                xs = [np.full(sh, 100 * s + i + k, np.float32) for k, sh in enumerate(shapes[m])]
                if m == 0:
                    np.testing.assert_allclose(outs[0], reference(mlp, xs[0])[0], rtol=1e-5)
                elif m == 1:
                    np.testing.assert_allclose(outs[0], xs[0] + xs[1])
                else:
                    np.testing.assert_allclose(outs[0], 2 * xs[0])
                    np.testing.assert_allclose(outs[1], -xs[0])


def test_stop_while_streams_block(identity_dfp):
    release = threading.Event()
    blocked = threading.Event()
    flowing = threading.Event()

    def source(s):
        if s == 0:
            blocked.set()
            release.wait(10)
            return None
        return np.zeros((1, 4), np.float32)

    accl = mx.MultiStreamAsyncAccl(identity_dfp)
    accl.connect_streams(source, lambda s, y: flowing.set(), 4)
    # stop while stream 0 blocks in its callback and the others' frames flow
    assert blocked.wait(10) and flowing.wait(10), "the streams never ran"
    t0 = time.monotonic()
    accl.stop()
    assert time.monotonic() - t0 < 1.0
    release.set()


def test_color_classifier_streams_predict_the_truth():
    nc = mx.NeuralCompiler(models=testing.color_classifier(), autocrop=True)
    dfp = nc.run()
    truth = {s: [(s + i) % 3 for i in range(12)] for s in range(3)}
    pos = [0, 0, 0]
    got = defaultdict(list)

    def source(s):
        if pos[s] == 12:
            return None
        pos[s] += 1
        return testing.synthetic_frame(truth[s][pos[s] - 1], seed=pos[s])

    accl = mx.MultiStreamAsyncAccl(dfp)
    accl.set_preprocessing_model(nc.pre_models[0])
    accl.set_postprocessing_model(nc.post_models[0])
    accl.connect_streams(source, lambda s, probs: got[s].append(int(np.argmax(probs))), 3)
    accl.wait()
    assert dict(got) == truth


@pytest.mark.timeout(60)
def test_a_stream_count_past_the_limit_is_refused_at_once(identity_dfp):
    # connect_streams(..., 10**6) used to take 30 s and 2.3 GB before the first frame.
    limit = mx.MultiStreamAsyncAccl.MAX_STREAMS
    assert limit == 4096
    x = np.ones((1, 4), np.float32)
    with mx.MultiStreamAsyncAccl(identity_dfp) as accl:
        t0 = time.monotonic()
        with pytest.raises(mx.StreamCountError,
                           match=r"stream_count 1000000: model 0 may have at most 4096 "
                                 r"streams \(MultiStreamAsyncAccl.MAX_STREAMS\)") as info:
            accl.connect_streams(lambda s: None, lambda s, y: None, 10**6)
        assert time.monotonic() - t0 < 5  # refused, not connected and then refused
        assert isinstance(info.value, ValueError) and isinstance(info.value, mx.UsageError)
        # nothing was connected: the model takes streams up to the limit, and they run
        left = dict.fromkeys(range(limit - 6), 1)
        added = threading.Event()

        def source(s):
            if s == 0:  # runs until the last streams are added (so that some stream is open)
                left[0] = left[0] - 1
                return None if added.is_set() and left[0] < 0 else x
            if left.get(s, 0) <= 0:
                return None
            left[s] -= 1
            return x

        got = defaultdict(int)
        accl.connect_streams(source, lambda s, y: got.__setitem__(s, got[s] + 1), limit - 6)
        # added streams count towards the limit, which the message says
        with pytest.raises(mx.StreamCountError, match=r"stream_count 7: .* at most 4096 "
                                                      r"streams .*; it has 4090 already"):
            accl.connect_streams(lambda s: None, lambda s, y: None, 7)
        left.update(dict.fromkeys(range(limit - 6, limit), 2))
        accl.connect_streams(source, lambda s, y: got.__setitem__(s, got[s] + 1), 6)  # fits
        added.set()
        accl.wait()
    assert got[0] >= 1 and len(got) == limit and got[limit - 1] == 2
    assert sum(got.values()) == got[0] + (limit - 7) + 12


@pytest.mark.timeout(60)
@pytest.mark.asyncio
async def test_a_stream_count_past_the_limit_is_refused_in_async_code(identity_dfp):
    async def source(s):
        return None

    async def sink(s, y):
        pass

    async with mx.MultiStreamAsyncAccl(identity_dfp) as accl:
        with pytest.raises(mx.StreamCountError, match="at most 4096 streams"):
            accl.connect_streams(source, sink, 4097)
        accl.connect_streams(source, sink, 4096)
        await accl.await_done()
