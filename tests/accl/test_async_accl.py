"""AsyncAccl through the sync facade: callbacks, wait, stop, errors, pre/post."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

import memryx as mx
from memryx import testing
from tests.conftest import frames, reference, threads_ended


def run_callbacks(dfp, inputs, **kw):
    got = []
    accl = mx.AsyncAccl(dfp, **kw)
    it = iter(inputs)
    accl.connect_input(lambda: next(it, None))
    accl.connect_output(lambda *outs: got.append(outs))
    accl.wait()
    return got


def test_outputs_equal_onnxruntime(mobilenet, mobilenet_dfp):
    xs = frames(20, (3, 64, 64))
    got = run_callbacks(mobilenet_dfp, xs)
    assert len(got) == 20
    for x, (out,) in zip(xs, got, strict=True):
        assert out.shape == (1, 10)
        np.testing.assert_allclose(out, reference(mobilenet, x[None])[0], rtol=1e-5, atol=1e-6)


def test_generator_callback_and_thousands_of_frames_in_order(identity_dfp):
    n = 3000

    def source():
        for i in range(n):
            yield np.full((1, 4), i, np.float32)

    got = []
    accl = mx.AsyncAccl(identity_dfp)
    accl.connect_input(source)
    accl.connect_output(lambda y: got.append(int(y[0, 0])))
    accl.wait()
    assert got == list(range(n))


def test_callbacks_run_on_worker_threads_not_the_loop(identity_dfp):
    names = set()
    count = iter(range(5))

    def source():
        names.add(threading.current_thread().name)
        i = next(count, None)
        return None if i is None else np.zeros((1, 4), np.float32)

    def sink(y):
        names.add(threading.current_thread().name)

    accl = mx.AsyncAccl(identity_dfp)
    accl.connect_input(source)
    accl.connect_output(sink)
    runner = accl._runner.name
    accl.wait()
    assert runner not in names
    assert threading.current_thread().name not in names


def test_stop_iteration_ends_the_stream(identity_dfp):
    left = [np.zeros((1, 4), np.float32)] * 3

    def source():
        if not left:
            raise StopIteration
        return left.pop()

    got = []
    accl = mx.AsyncAccl(identity_dfp)
    accl.connect_input(source)
    accl.connect_output(got.append)
    accl.wait()
    assert len(got) == 3


def test_input_callback_exception_ends_stream_and_is_reraised_once(identity_dfp):
    sent = iter(range(5))

    def source():
        i = next(sent)
        if i == 3:
            raise KeyError("camera unplugged")
        return np.full((1, 4), i, np.float32)

    got = []
    accl = mx.AsyncAccl(identity_dfp)
    accl.connect_input(source)
    accl.connect_output(lambda y: got.append(int(y[0, 0])))
    with pytest.raises(KeyError, match="camera unplugged") as info:
        accl.wait()
    assert got == [0, 1, 2]  # frames before the error are all delivered
    assert any("input callback of model 0" in n for n in info.value.__notes__)
    assert info.traceback[-1].name == "source"  # the callback's own traceback
    accl.close()  # already raised: not again
    accl.stop()


def test_output_callback_exception_is_reraised(identity_dfp):
    def sink(y):
        raise ValueError("bad sink")

    accl = mx.AsyncAccl(identity_dfp)
    accl.connect_input(lambda: np.zeros((1, 4), np.float32))  # endless source
    accl.connect_output(sink)
    with pytest.raises(ValueError, match="bad sink") as info:
        accl.wait()
    assert any("output callback of model 0" in n for n in info.value.__notes__)


def test_input_callback_with_parameters_is_refused(identity_dfp):
    with mx.AsyncAccl(identity_dfp) as accl:
        with pytest.raises(RuntimeError, match="takes no parameters|positional"):
            accl.connect_input(lambda frame_no: None)
        with pytest.raises(mx.CallbackSignatureError):
            accl.connect_input(lambda a, b: None)


def test_output_callback_with_wrong_arity_is_refused(split_dfp):
    with mx.AsyncAccl(split_dfp) as accl:
        with pytest.raises(mx.CallbackSignatureError, match="2 positional"):
            accl.connect_output(lambda only_one: None)
        accl.connect_output(lambda *outs: None)  # *fmaps is fine


def test_wait_refuses_unconnected_ports(identity_dfp, three_model_dfp):
    with mx.AsyncAccl(identity_dfp) as accl:
        with pytest.raises(RuntimeError, match="model 0 input, model 0 output"):
            accl.wait()
        accl.connect_output(lambda y: None)
        with pytest.raises(mx.NotConnectedError, match="model 0 input"):
            accl.wait()
    with mx.AsyncAccl(three_model_dfp) as accl:
        accl.connect_input(lambda: None)
        accl.connect_output(lambda y: None)
        with pytest.raises(mx.NotConnectedError, match="model 1 input"):
            accl.wait()


def test_stop_returns_promptly_while_input_callback_blocks(identity_dfp):
    release = threading.Event()
    entered = threading.Event()
    calls = []
    before = set(threading.enumerate())

    def source():
        calls.append(1)
        entered.set()
        release.wait(10)
        return None

    accl = mx.AsyncAccl(identity_dfp)
    accl.connect_input(source)
    accl.connect_output(lambda y: calls.append("out"))
    assert entered.wait(5), "the input callback never ran"
    t0 = time.monotonic()
    accl.stop()
    assert time.monotonic() - t0 < 1.0
    n = len(calls)
    release.set()
    # released, the abandoned callback returns and its thread ends: by then any call after
    # stop() would have been made
    assert threads_ended(before), "the accelerator's threads did not end once released"
    assert len(calls) == n  # nothing called after stop returned


def test_no_callback_after_stop_under_load(identity_dfp):
    after = []
    stopped = threading.Event()
    flowing = threading.Event()
    seen = 0
    before = set(threading.enumerate())

    def sink(y):
        nonlocal seen
        seen += 1
        if seen == 100:
            flowing.set()
        if stopped.is_set():
            after.append(y)

    accl = mx.AsyncAccl(identity_dfp)
    accl.connect_input(lambda: np.zeros((1, 4), np.float32))
    accl.connect_output(sink)
    assert flowing.wait(10), "outputs never flowed"  # under load: stop while frames flow
    accl.stop()
    stopped.set()
    assert threads_ended(before), "the accelerator's threads did not end"  # after is final
    assert after == []
    assert accl.statistics()["models"][0]["frames_out"] > 0


def test_wrong_shape_from_callback_names_model_port_layer(identity_dfp):
    accl = mx.AsyncAccl(identity_dfp)
    accl.connect_input(lambda: np.zeros((1, 5), np.float32))
    accl.connect_output(lambda y: None)
    with pytest.raises(ValueError,
                       match=r"model 0, input port 0 \(layer 'x'\).*\(1, 4\).*got \(1, 5\)"):
        accl.wait()


def test_wrong_dtype_from_callback_is_a_type_error(identity_dfp):
    accl = mx.AsyncAccl(identity_dfp)
    accl.connect_input(lambda: np.zeros((1, 4), np.float64))
    accl.connect_output(lambda y: None)
    with pytest.raises(TypeError, match="expected dtype float32, got float64"):
        accl.wait()


def test_bad_model_idx_and_group_id(identity_dfp):
    with pytest.raises(mx.ModelIndexError, match="model_idx 1 out of range"):
        with mx.AsyncAccl(identity_dfp) as accl:
            accl.connect_input(lambda: None, model_idx=1)
    with pytest.raises(IndexError, match="group_id 3 out of range"):
        mx.AsyncAccl(identity_dfp, group_id=3)
    with pytest.raises(TypeError, match="group_id must be an int"):
        mx.AsyncAccl(identity_dfp, group_id="0")


def test_dfp_forms(identity_dfp, tmp_path):
    path = identity_dfp.write(tmp_path / "m.dfp")
    for form in (str(path), path, identity_dfp.to_bytes(), bytearray(identity_dfp.to_bytes()),
                 identity_dfp):
        with mx.SyncAccl(form) as accl:
            assert accl.run(np.ones((1, 4), np.float32)).tolist() == [[1, 1, 1, 1]]


def test_port_assignments(three_model_dfp):
    with mx.AsyncAccl(three_model_dfp) as accl:
        assert accl.inport_assignment(0) == {0: "x"}
        assert accl.inport_assignment(1) == {1: "a", 2: "b"}
        assert accl.outport_assignment(1) == {1: "sum"}
        assert accl.outport_assignment(2) == {2: "double", 3: "neg"}
        with pytest.raises(mx.ModelIndexError):
            accl.outport_assignment(3)


def test_three_models_at_once(three_model_dfp):
    mlp, add = testing.mlp_model(), testing.add_model()
    xs = frames(30, (1, 16))
    ab = [(a, b) for a, b in zip(frames(30, (1, 8), 1), frames(30, (1, 8), 2), strict=True)]
    ss = frames(30, (1, 8), 3)
    got = {0: [], 1: [], 2: []}
    its = [iter(xs), iter(ab), iter(ss)]
    accl = mx.AsyncAccl(three_model_dfp)
    for m in range(3):
        accl.connect_input(lambda it=its[m]: next(it, None), model_idx=m)
        accl.connect_output(lambda *o, m=m: got[m].append(o), model_idx=m)
    accl.wait()
    for x, (y,) in zip(xs, got[0], strict=True):
        np.testing.assert_allclose(y, reference(mlp, x)[0], rtol=1e-5)
    for (a, b), (y,) in zip(ab, got[1], strict=True):
        np.testing.assert_allclose(y, reference(add, a, b)[0])
    for x, (d, n) in zip(ss, got[2], strict=True):
        np.testing.assert_allclose(d, 2 * x)
        np.testing.assert_allclose(n, -x)


def counting_source(n):
    """An input callback returning frames 0..n-1 (filled with their number), then None."""
    it = iter(range(n))

    def source():
        i = next(it, None)
        return None if i is None else np.full((1, 4), i, np.float32)

    return source


def test_outputs_are_the_callees_to_keep(identity_dfp):
    kept = []
    accl = mx.AsyncAccl(identity_dfp)
    accl.connect_input(counting_source(50))
    accl.connect_output(kept.append)
    accl.wait()
    assert [int(k[0, 0]) for k in kept] == list(range(50))
    assert len({id(k) for k in kept}) == 50
    assert all(k.flags.writeable for k in kept)


def test_input_buffer_reused_by_callback_is_copied(identity_dfp):
    buf = np.zeros((1, 4), np.float32)
    n = iter(range(20))

    def camera():
        i = next(n, None)
        if i is None:
            return None
        buf[:] = i  # a driver reusing one buffer
        return buf

    got = []
    accl = mx.AsyncAccl(identity_dfp)
    accl.connect_input(camera)
    accl.connect_output(lambda y: got.append(int(y[0, 0])))
    accl.wait()
    assert got == list(range(20))


def test_context_manager_releases_threads_and_reraises_unseen_errors(identity_dfp):
    raised = threading.Event()

    def source():
        raised.set()
        raise OSError("no camera")

    with pytest.raises(OSError, match="no camera"):
        with mx.AsyncAccl(identity_dfp) as accl:
            accl.connect_input(source)
            accl.connect_output(lambda y: None)
            assert raised.wait(10), "the input callback never ran"
    with pytest.raises(mx.ClosedError, match="closed"):
        accl.connect_input(lambda: None)


def test_preprocessing_and_postprocessing_models(tmp_path):
    full = testing.mobilenet_like(preprocessing=True)
    nc = mx.NeuralCompiler(models=full, inputs=["image"], outputs=["logits"],
                           dfp_fname=tmp_path / "m.dfp")
    dfp = nc.run()
    raw = [np.random.default_rng(i).integers(0, 255, (64, 64, 3), dtype=np.uint8)
           for i in range(8)]
    got = []
    accl = mx.AsyncAccl(dfp)
    accl.set_preprocessing_model(tmp_path / "model_0_mobilenet_like_pre.onnx")
    accl.set_postprocessing_model(nc.post_models[0])
    it = iter(raw)
    accl.connect_input(lambda: next(it, None))
    accl.connect_output(lambda probs: got.append(probs))
    accl.wait()
    for frame, probs in zip(raw, got, strict=True):
        np.testing.assert_allclose(probs, reference(full, frame[None])[0], rtol=1e-5, atol=1e-6)


def test_python_callable_pre_and_post(identity_dfp):
    got = []
    with mx.AsyncAccl(identity_dfp) as accl:
        accl.set_preprocessing_model(lambda x: (x * 2).astype(np.float32))
        accl.set_postprocessing_model(lambda y: (y + 1, y.sum()))
        accl.connect_input(counting_source(5))
        accl.connect_output(lambda y, s: got.append((y[0, 0], float(s))))
        accl.wait()
    assert got == [(2 * i + 1, 8.0 * i) for i in range(5)]


def test_preprocessing_after_connect_is_refused(identity_dfp):
    with mx.AsyncAccl(identity_dfp) as accl:
        accl.connect_input(lambda: None)
        with pytest.raises(mx.UsageError, match="before connecting its input"):
            accl.set_preprocessing_model(lambda x: x)


def test_connect_input_twice_is_refused(identity_dfp):
    with mx.AsyncAccl(identity_dfp) as accl:
        accl.connect_input(lambda: None)
        with pytest.raises(mx.UsageError, match="already connected"):
            accl.connect_input(lambda: None)
