"""SyncAccl: send / receive / run."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

import memryx as mx
from memryx import testing
from tests.conftest import frames, in_memryx_call, reference, settle


def test_run_one_frame_with_or_without_batch_dim(mlp_dfp):
    mlp = testing.mlp_model()
    x = frames(1, (1, 16))[0]
    with mx.SyncAccl(mlp_dfp) as accl:
        full = accl.run(x)
        bare = accl.run(x[0])
    assert full.shape == (1, 10)
    np.testing.assert_allclose(full, reference(mlp, x)[0], rtol=1e-5)
    np.testing.assert_array_equal(full, bare)


def test_run_batch_is_ordered(mlp_dfp):
    mlp = testing.mlp_model()
    xs = frames(500, (1, 16))  # distinct random frames: a swapped pair would not match
    with mx.SyncAccl(mlp_dfp) as accl:
        outs = accl.run(xs)
    assert len(outs) == 500
    for x, y in zip(xs, outs, strict=True):
        np.testing.assert_allclose(y, reference(mlp, x)[0], rtol=1e-5)


def test_run_batch_is_pipelined():
    # A chip modeled with a long latency (25 ms) but a high rate (2000 fps): one frame at
    # a time, 80 frames take at least 80 x 25 ms = 2 s; pipelined, about 65 ms. The
    # bound sits at a third of the sequential time, far above the pipelined one.
    dfp = mx.NeuralCompiler(models=testing.identity_model((1, 4)), fps=2000,
                            latency_ms=25).run()
    xs = [np.full((1, 4), i, np.float32) for i in range(80)]
    with mx.SyncAccl(dfp) as accl:
        accl.run(xs[:2])  # warm up the session outside the measurement
        t0 = time.monotonic()
        outs = accl.run(xs)
        elapsed = time.monotonic() - t0
    assert [int(y[0, 0]) for y in outs] == list(range(80))
    assert elapsed < 80 * 0.025 / 3, f"80 frames took {elapsed:.2f} s: not pipelined"
    # and the pacer did hold each frame for its modeled latency at least
    assert elapsed >= 0.025


def test_run_multi_input_and_multi_output(add_dfp, split_dfp):
    a, b = frames(2, (1, 8))
    with mx.SyncAccl(add_dfp) as accl:
        np.testing.assert_allclose(accl.run([a, b]), a + b)
        batch = accl.run([[a, b], [b, b], [a, a]])
        assert len(batch) == 3
        np.testing.assert_allclose(batch[1], 2 * b)
        with pytest.raises(mx.InputCountError, match="1 array.*2 input port"):
            accl.run([[a]])
    with mx.SyncAccl(split_dfp) as accl:
        double, neg = accl.run(a)
        np.testing.assert_allclose(double, 2 * a)
        np.testing.assert_allclose(neg, -a)
        outs = accl.run([a, b])
        assert len(outs) == 2 and len(outs[1]) == 2


def test_stacked_batch_is_refused(mlp_dfp):
    with mx.SyncAccl(mlp_dfp) as accl:
        with pytest.raises(ValueError, match="stacked batch of 5 frames"):
            accl.run(np.zeros((5, 16), np.float32))
        with pytest.raises(mx.ShapeError, match="stacked"):
            accl.run(np.zeros((3, 1, 16), np.float32))


def test_wrong_shape_and_dtype(mlp_dfp):
    with mx.SyncAccl(mlp_dfp) as accl:
        with pytest.raises(ValueError, match=r"model 0, input port 0 \(layer 'x'\): expected shape "
                                             r"\(1, 16\) or \(16,\), got \(1, 15\)"):
            accl.run(np.zeros((1, 15), np.float32))
        with pytest.raises(TypeError, match="expected dtype float32, got int64"):
            accl.run(np.zeros((1, 16), np.int64))
        with pytest.raises(TypeError, match="numpy.ndarray"):
            accl.send([[0.0] * 16])
        # nothing half-sent: the accelerator still works
        assert accl.run(np.zeros((1, 16), np.float32)).shape == (1, 10)


def test_bad_frame_in_a_batch_sends_nothing(mlp_dfp):
    good = np.zeros((1, 16), np.float32)
    with mx.SyncAccl(mlp_dfp) as accl:
        with pytest.raises(mx.ShapeError, match="got \\(2, 2\\)"):
            accl.run([good, good, np.zeros((2, 2), np.float32)])
        assert accl.statistics()["models"][0]["frames_in"] == 0


def test_send_receive_on_two_threads(mlp_dfp):
    mlp = testing.mlp_model()
    xs = frames(400, (1, 16))
    got = []
    with mx.SyncAccl(mlp_dfp) as accl:
        def receiver():
            for _ in xs:
                got.append(accl.receive(timeout=5000))

        t = threading.Thread(target=receiver)
        t.start()
        for x in xs:
            accl.send(x, timeout=5000)
        t.join(10)
    assert len(got) == 400
    for x, y in zip(xs, got, strict=True):
        np.testing.assert_allclose(y, reference(mlp, x)[0], rtol=1e-5)


def test_receive_timeout(mlp_dfp):
    with mx.SyncAccl(mlp_dfp) as accl:
        t0 = time.monotonic()
        with pytest.raises(TimeoutError, match="receive\\(\\) from model 0.*50 ms"):
            accl.receive(timeout=50)
        assert time.monotonic() - t0 < 2
        with pytest.raises(TimeoutError):
            accl.receive(timeout=0)


def test_send_timeout_when_nobody_receives(mlp_dfp):
    x = np.zeros((1, 16), np.float32)
    with mx.SyncAccl(mlp_dfp) as accl:
        with pytest.raises(TimeoutError, match="send\\(\\) to model 0: no space"):
            for _ in range(10_000):  # the buffers are bounded: send must block
                accl.send(x, timeout=100)
        sent = accl.statistics()["models"][0]["frames_in"]
        assert sent < 100
        for _ in range(sent):  # every frame sent is still delivered, in order
            accl.receive(timeout=5000)


def test_bad_timeout_values(mlp_dfp):
    with mx.SyncAccl(mlp_dfp) as accl:
        with pytest.raises(ValueError, match="timeout"):
            accl.receive(timeout=-1)
        with pytest.raises(ValueError, match="timeout"):
            accl.send(np.zeros((1, 16), np.float32), timeout="soon")


def test_run_and_send_do_not_steal_each_others_outputs(identity_dfp):
    with mx.SyncAccl(identity_dfp) as accl:
        accl.send(np.full((1, 4), 7, np.float32))
        out = accl.run([np.full((1, 4), i, np.float32) for i in range(3)])
        assert [int(o[0, 0]) for o in out] == [0, 1, 2]
        assert int(accl.receive(timeout=2000)[0, 0]) == 7


def test_multi_model_dfp_by_model_idx(three_model_dfp):
    a, b = frames(2, (1, 8))
    with mx.SyncAccl(three_model_dfp) as accl:
        assert accl.run(np.zeros((1, 16), np.float32), model_idx=0).shape == (1, 10)
        np.testing.assert_allclose(accl.run([a, b], model_idx=1), a + b)
        d, n = accl.run(a, model_idx=2)
        np.testing.assert_allclose(d, 2 * a)
        np.testing.assert_allclose(n, -a)
        with pytest.raises(mx.ModelIndexError, match="model_idx 3 out of range.*3 model"):
            accl.run(a, model_idx=3)
        with pytest.raises(IndexError):
            accl.send(a, model_idx=-1)


def test_use_after_close(mlp_dfp):
    accl = mx.SyncAccl(mlp_dfp)
    accl.close()
    accl.close()  # idempotent
    with pytest.raises(mx.ClosedError, match="closed"):
        accl.run(np.zeros((1, 16), np.float32))
    with pytest.raises(RuntimeError):
        accl.receive()


def test_receive_unblocks_with_error_on_close(mlp_dfp):
    accl = mx.SyncAccl(mlp_dfp)
    errors = []

    def receiver():
        try:
            accl.receive()
        except Exception as exc:
            errors.append(exc)

    t = threading.Thread(target=receiver)
    t.start()
    assert settle(lambda: in_memryx_call("receive", t)), "receive() was never entered"
    accl.close()
    t.join(5)
    assert not t.is_alive()
    assert isinstance(errors[0], mx.ClosedError)


def test_unclosed_accelerator_warns(mlp_dfp):
    accl = mx.SyncAccl(mlp_dfp)
    with pytest.warns(ResourceWarning, match="unclosed SyncAccl"):
        accl.__del__()
    accl._state = accl._state.CLOSED
