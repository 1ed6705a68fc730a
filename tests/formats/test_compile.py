"""NeuralCompiler on Keras, SavedModel, frozen graphs, tf.functions and TFLite.

Each DFP runs on the simulated device and its outputs are compared with the
source framework's own result (Keras ``model(x)``, the LiteRT interpreter).
"""

from __future__ import annotations

import contextlib
import io
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest

import memryx as mx
from memryx import testing

from .conftest import images, keras_cnn, litert, to_tflite

pytestmark = pytest.mark.timeout(240)


def run_all(dfp: mx.Dfp, frames: list[np.ndarray], model_idx: int = 0) -> list[np.ndarray]:
    with mx.SyncAccl(dfp) as accl:
        return [np.asarray(accl.run(f, model_idx=model_idx)) for f in frames]


def keras_ref(model: Any, frame: np.ndarray) -> np.ndarray:
    return np.asarray(model(frame[None], training=False))


def test_keras_in_memory_keeps_nhwc_and_matches_keras(cnn: Any) -> None:
    dfp = mx.NeuralCompiler(models=cnn).run()
    (inp,), (out,) = dfp.input_ports, dfp.output_ports
    assert (inp.layer, inp.shape, inp.dtype) == ("image", (1, 32, 32, 3), np.dtype("float32"))
    assert (out.layer, out.shape) == ("probs", (1, 10))
    assert dfp.model(0).name == "tiny"
    frames = images(4)
    for frame, got in zip(frames, run_all(dfp, frames), strict=True):  # batchless frames
        assert got.shape == (1, 10)
        np.testing.assert_allclose(got, keras_ref(cnn, frame), rtol=1e-4, atol=1e-5)


def test_keras_dfp_on_async_accl(cnn: Any) -> None:
    dfp = mx.NeuralCompiler(models=cnn).run()
    frames = images(6, seed=1)
    got: list[np.ndarray] = []
    it = iter(frames)
    accl = mx.AsyncAccl(dfp)
    accl.connect_input(lambda: next(it, None))
    accl.connect_output(lambda y: got.append(np.array(y)))
    accl.wait()
    accl.close()
    assert len(got) == len(frames)
    for frame, y in zip(frames, got, strict=True):
        np.testing.assert_allclose(y, keras_ref(cnn, frame), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("suffix", [".keras", ".h5"])
def test_keras_files(cnn: Any, model_dir: Path, suffix: str) -> None:
    path = model_dir / f"cnn{suffix}"
    if not path.exists():
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # .h5 is "legacy" to Keras 3
            cnn.save(str(path))
    dfp = mx.NeuralCompiler(models=path).run()
    frame = images(1, seed=2)[0]
    np.testing.assert_allclose(run_all(dfp, [frame])[0], keras_ref(cnn, frame),
                               rtol=1e-4, atol=1e-5)


@pytest.fixture(scope="module")
def saved_model(tf: Any, cnn: Any, model_dir: Path) -> Path:
    path = model_dir / "cnn_savedmodel"
    with contextlib.redirect_stdout(io.StringIO()):
        cnn.export(str(path))  # writes 'serve' and its alias 'serving_default'
    return path


def test_saved_model_dir_and_object(tf: Any, cnn: Any, saved_model: Path) -> None:
    frame = images(1, seed=3)[0]
    for source in (saved_model, str(saved_model), saved_model / "saved_model.pb",
                   tf.saved_model.load(str(saved_model))):
        dfp = mx.NeuralCompiler(models=source).run()
        assert dfp.input_ports[0].shape == (1, 32, 32, 3)
        np.testing.assert_allclose(run_all(dfp, [frame])[0], keras_ref(cnn, frame),
                                   rtol=1e-4, atol=1e-5)


def test_concrete_function_and_frozen_graph(tf: Any, cnn: Any, model_dir: Path) -> None:
    from tensorflow.python.framework.convert_to_constants import (
        convert_variables_to_constants_v2,
    )

    fn = tf.function(lambda x: cnn(x, training=False)).get_concrete_function(
        tf.TensorSpec([None, 32, 32, 3], tf.float32, name="x"))
    frame = images(1, seed=4)[0]
    dfp = mx.NeuralCompiler(models=fn).run()
    np.testing.assert_allclose(run_all(dfp, [frame])[0], keras_ref(cnn, frame),
                               rtol=1e-4, atol=1e-5)

    frozen = convert_variables_to_constants_v2(fn).graph.as_graph_def()
    path = model_dir / "frozen.pb"
    path.write_bytes(frozen.SerializeToString())
    for source in (path, frozen):
        dfp = mx.NeuralCompiler(models=source).run()
        assert dfp.input_ports[0].shape == (1, 32, 32, 3)
        np.testing.assert_allclose(run_all(dfp, [frame])[0], keras_ref(cnn, frame),
                                   rtol=1e-4, atol=1e-5)


def test_tflite_file_and_bytes_match_litert(cnn_tflite: bytes, model_dir: Path) -> None:
    path = model_dir / "cnn.tflite"
    path.write_bytes(cnn_tflite)
    frames = images(3, seed=5)
    for source in (path, str(path), cnn_tflite, bytearray(cnn_tflite)):
        dfp = mx.NeuralCompiler(models=source).run()
        (inp,), (out,) = dfp.input_ports, dfp.output_ports
        assert inp.shape == (1, 32, 32, 3) and out.shape == (1, 10)
        assert (inp.layer, out.layer) == ("image", "output_0")  # the signature's names
        for frame, got in zip(frames, run_all(dfp, frames), strict=True):
            np.testing.assert_allclose(got, litert(cnn_tflite, frame[None])[0],
                                       rtol=1e-4, atol=1e-5)


def test_int8_tflite_keeps_quantized_ports(tf: Any, cnn: Any) -> None:
    def representative() -> Any:
        for frame in images(8, seed=6):
            yield [frame[None]]

    conv = tf.lite.TFLiteConverter.from_keras_model(cnn)
    conv.optimizations = [tf.lite.Optimize.DEFAULT]
    conv.representative_dataset = representative
    conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    conv.inference_input_type = tf.uint8
    conv.inference_output_type = tf.uint8
    import warnings

    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TF's own notice about quantized input statistics
        blob = bytes(conv.convert())
    dfp = mx.NeuralCompiler(models=blob).run()
    assert dfp.input_ports[0].dtype == np.dtype("uint8")
    assert dfp.output_ports[0].dtype == np.dtype("uint8")
    frames = [f.astype(np.uint8) for f in images(4, seed=7)]
    for frame, got in zip(frames, run_all(dfp, frames), strict=True):
        want = litert(blob, frame[None])[0]
        # Integer kernels differ in rounding between LiteRT and onnxruntime, and a step of
        # one layer can carry into the next: 2 steps at most (seen: 2 in one full run).
        assert np.abs(got.astype(int) - want.astype(int)).max() <= 2


def test_list_mixing_formats(cnn: Any, cnn_tflite: bytes, saved_model: Path) -> None:
    onnx_model = testing.mlp_model()
    dfp = mx.NeuralCompiler(models=[onnx_model, cnn, cnn_tflite, saved_model]).run()
    assert dfp.num_models == 4
    assert [p.model_idx for p in dfp.input_ports] == [0, 1, 2, 3]
    frame = images(1, seed=8)[0]
    x = np.random.default_rng(0).standard_normal(dfp.input_ports[0].shape).astype(np.float32)
    with mx.SyncAccl(dfp) as accl:
        np.testing.assert_allclose(np.asarray(accl.run(x, model_idx=0)), _ort(onnx_model, x),
                                   rtol=1e-5, atol=1e-6)
        want = keras_ref(cnn, frame)
        for idx in (1, 2, 3):
            np.testing.assert_allclose(np.asarray(accl.run(frame, model_idx=idx)), want,
                                       rtol=1e-4, atol=1e-5)


def _ort(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return np.asarray(sess.run(None, {sess.get_inputs()[0].name: x})[0])


# -- autocrop ----------------------------------------------------------------------------------
def test_keras_autocrop_writes_onnx_parts(cnn: Any, tmp_path: Path) -> None:
    nc = mx.NeuralCompiler(models=cnn, autocrop=True, dfp_fname=tmp_path / "tiny")
    dfp = nc.run()
    assert (tmp_path / "tiny.dfp").is_file()  # .dfp appended
    post = tmp_path / "model_0_tiny_post.onnx"
    assert post in nc.cropped_files and post.is_file()
    core_ops = {n.op_type for n in onnx.load_model_from_string(dfp.model(0).graph).graph.node}
    assert "Softmax" not in core_ops
    frames = images(3, seed=9)
    with mx.SyncAccl(dfp) as accl:
        for f in nc.cropped_files:
            if f.name.endswith("_pre.onnx"):
                accl.set_preprocessing_model(f)
        accl.set_postprocessing_model(post)
        for frame in frames:
            np.testing.assert_allclose(np.asarray(accl.run(frame)), keras_ref(cnn, frame),
                                       rtol=1e-4, atol=1e-5)


def test_tflite_autocrop_writes_tflite_parts(tf: Any, tmp_path: Path) -> None:
    # A model whose input is cast and normalised on the way in and soft-maxed on the way out.
    inp = tf.keras.Input((16, 16, 3), name="frame")
    x = tf.keras.layers.Lambda(lambda t: (t - 127.5) * (1 / 127.5), name="norm")(inp)
    x = tf.keras.layers.Conv2D(4, 3, name="conv")(x)
    x = tf.keras.layers.Flatten()(x)
    x = tf.keras.layers.Dense(5, name="logits")(x)
    out = tf.keras.layers.Softmax(name="probs")(x)
    blob = to_tflite(tf, tf.keras.Model(inp, out, name="norm_net"))
    src = tmp_path / "net.tflite"
    src.write_bytes(blob)
    nc = mx.NeuralCompiler(models=src, autocrop=True, dfp_fname=tmp_path / "net.dfp")
    dfp = nc.run()
    names = sorted(p.name for p in nc.cropped_files)
    assert "model_0_net_post.tflite" in names
    assert all(n.endswith(".tflite") for n in names)
    core = onnx.load_model_from_string(dfp.model(0).graph)
    assert "Softmax" not in {n.op_type for n in core.graph.node}
    frames = images(3, size=16, seed=10)
    with mx.SyncAccl(dfp) as accl:
        for f in nc.cropped_files:
            if f.name.endswith("_pre.tflite"):
                accl.set_preprocessing_model(f)
            else:
                accl.set_postprocessing_model(f)
        for frame in frames:
            np.testing.assert_allclose(np.asarray(accl.run(frame)),
                                       litert(blob, frame[None])[0], rtol=1e-4, atol=1e-5)
    # The ONNX forms of the parts ride in the DFP too.
    assert dfp.model(0).post_model is not None
    assert nc.post_models[0] is not None


def test_tflite_explicit_crop_points_are_tflite_names(cnn_tflite: bytes, tmp_path: Path) -> None:
    from memryx.formats import tflite

    _ins, outs = tflite.io_names(cnn_tflite)
    cut = tflite.autocrop(cnn_tflite)[1]
    nc = mx.NeuralCompiler(models=cnn_tflite, outputs=cut, dfp_fname=tmp_path / "c.dfp")
    dfp = nc.run()
    assert dfp.output_ports[0].layer == cut[0] != outs[0]
    assert [p.name for p in nc.cropped_files] == ["model_0_model0_post.tflite"]
    with pytest.raises(mx.CompilerError, match="not tensors of the TFLite model"):
        mx.NeuralCompiler(models=cnn_tflite, outputs=["no/such:0"]).run()


def test_keras_model_with_two_inputs_and_outputs(tf: Any) -> None:
    a = tf.keras.Input((4, 4, 2), name="left")
    b = tf.keras.Input((4, 4, 2), name="right")
    s = tf.keras.layers.Add(name="sum")([a, b])
    c = tf.keras.layers.Conv2D(3, 1, name="mix")(s)
    g = tf.keras.layers.GlobalMaxPooling2D(name="peak")(c)
    model = tf.keras.Model([a, b], [c, g], name="two")
    dfp = mx.NeuralCompiler(models=model).run()
    assert [p.layer for p in dfp.input_ports] == ["left", "right"]
    assert [p.shape for p in dfp.output_ports] == [(1, 4, 4, 3), (1, 3)]
    rng = np.random.default_rng(11)
    x = [rng.standard_normal((4, 4, 2)).astype(np.float32) for _ in range(2)]
    with mx.SyncAccl(dfp) as accl:
        got = accl.run(x)
    want = model([x[0][None], x[1][None]])
    for g_, w in zip(got, want, strict=True):
        np.testing.assert_allclose(np.asarray(g_), np.asarray(w), rtol=1e-4, atol=1e-5)


def test_keras_model_from_a_keras_cnn_helper_is_not_trivial(tf: Any) -> None:
    """Guard the guard: two differently initialised models really differ."""
    a, b = keras_cnn(tf, name="a"), keras_cnn(tf, name="b")
    frame = images(1)[0]
    assert not np.allclose(keras_ref(a, frame), keras_ref(b, frame))
    assert isinstance(to_tflite(tf, a), bytes)
