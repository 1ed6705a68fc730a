"""Bad models in the non-ONNX formats: each a CompilerError that says what and what to do."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import memryx as mx

pytestmark = pytest.mark.timeout(240)


def test_unknown_format(tmp_path: Path) -> None:
    path = tmp_path / "model.xyz"
    path.write_bytes(b"\x01\x02 definitely not a model \xff" * 10)
    with pytest.raises(mx.CompilerError) as info:
        mx.NeuralCompiler(models=path).run()
    msg = str(info.value)
    assert "unknown model format" in msg and "model.xyz" in msg
    assert ".tflite" in msg and "SavedModel" in msg  # what it does take


def test_unsupported_objects_name_their_type() -> None:
    class Net:  # what a PyTorch module looks like to the compiler
        pass

    Net.__module__ = "torch.nn.modules.module"
    with pytest.raises(mx.CompilerError, match=r"torch\.onnx\.export.*docs/models\.md"):
        mx.NeuralCompiler(models=Net()).run()
    with pytest.raises(mx.CompilerError, match="unsupported model type builtins.dict"):
        mx.NeuralCompiler(models={"a": 1}).run()  # type: ignore[arg-type]


@pytest.mark.parametrize("cut", [8, 100, -40])
def test_corrupt_tflite(tf: Any, cnn_tflite: bytes, tmp_path: Path, cut: int) -> None:
    broken = cnn_tflite[:cut]
    path = tmp_path / "broken.tflite"
    path.write_bytes(broken)
    for source in (path, broken):
        with pytest.raises(mx.CompilerError,
                           match=r"(not a valid TFLite model|not a TFLite model)"):
            mx.NeuralCompiler(models=source).run()
    dfp = mx.NeuralCompiler(models=cnn_tflite).run()
    with mx.SyncAccl(dfp) as accl, pytest.raises(mx.CompilerError, match="TFLite"):
        accl.set_postprocessing_model(path)


def test_tflite_suffix_on_other_bytes(tmp_path: Path) -> None:
    path = tmp_path / "oops.tflite"
    path.write_bytes(b"this was never a flatbuffer")
    with pytest.raises(mx.CompilerError, match=r"not a TFLite model \(no 'TFL3'"):
        mx.NeuralCompiler(models=path).run()


def test_keras_dynamic_spatial_dims(tf: Any) -> None:
    inp = tf.keras.Input((None, None, 3), name="any_size")
    out = tf.keras.layers.Conv2D(4, 3, name="conv")(inp)
    model = tf.keras.Model(inp, out)
    with pytest.raises(mx.CompilerError) as info:
        mx.NeuralCompiler(models=model).run()
    msg = str(info.value)
    assert "'any_size'" in msg and "(None, None, None, 3)" in msg and "axis 1, 2" in msg
    assert "keras.Input(shape=(224, 224, 3))" in msg  # what to do


def test_unbuilt_subclassed_keras_model(tf: Any) -> None:
    class Net(tf.keras.Model):  # type: ignore[misc]
        def __init__(self) -> None:
            super().__init__()
            self.dense = tf.keras.layers.Dense(3)

        def call(self, x: Any) -> Any:
            return self.dense(x)

    with pytest.raises(mx.CompilerError, match="no defined inputs"):
        mx.NeuralCompiler(models=Net()).run()


def test_saved_model_with_several_signatures(tf: Any, tmp_path: Path) -> None:
    class Two(tf.Module):  # type: ignore[misc]
        def __init__(self) -> None:
            super().__init__()
            self.w = tf.Variable(np.ones((4, 2), np.float32))

        @tf.function(input_signature=[tf.TensorSpec([1, 4], tf.float32)])
        def project(self, x: Any) -> Any:
            return tf.matmul(x, self.w)

        @tf.function(input_signature=[tf.TensorSpec([1, 4], tf.float32)])
        def scale(self, x: Any) -> Any:
            return x * 3.0

    obj = Two()
    path = tmp_path / "two_sigs"
    tf.saved_model.save(obj, str(path), signatures={"project": obj.project, "scale": obj.scale})
    with pytest.raises(mx.CompilerError) as info:
        mx.NeuralCompiler(models=path).run()
    msg = str(info.value)
    assert "2 signatures ['project', 'scale']" in msg
    assert ".signatures['project']" in msg  # what to do
    # ... and doing that works.
    sig = tf.saved_model.load(str(path)).signatures["scale"]
    dfp = mx.NeuralCompiler(models=sig).run()
    with mx.SyncAccl(dfp) as accl:
        x = np.arange(4, dtype=np.float32).reshape(1, 4)
        np.testing.assert_allclose(np.asarray(accl.run(x)), x * 3.0)


def test_saved_model_without_signatures(tf: Any, tmp_path: Path) -> None:
    path = tmp_path / "nosig"
    with contextlib.redirect_stdout(io.StringIO()):
        tf.saved_model.save(tf.Module(), str(path))
    with pytest.raises(mx.CompilerError, match="no signatures"):
        mx.NeuralCompiler(models=path).run()


def test_not_a_saved_model_directory(tmp_path: Path) -> None:
    with pytest.raises(mx.CompilerError, match="not a TensorFlow SavedModel"):
        mx.NeuralCompiler(models=tmp_path).run()


def test_broken_keras_file(tf: Any, tmp_path: Path) -> None:
    path = tmp_path / "model.keras"
    path.write_bytes(b"PK\x03\x04 truncated zip")
    with pytest.raises(mx.CompilerError, match=r"cannot load Keras model .*model\.keras"):
        mx.NeuralCompiler(models=path).run()
