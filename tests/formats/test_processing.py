"""set_preprocessing_model / set_postprocessing_model with Keras, SavedModel and TFLite models."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import memryx as mx

from .conftest import images, keras_cnn, to_tflite

pytestmark = pytest.mark.timeout(240)


@pytest.fixture(scope="module")
def parts(tf: Any) -> dict[str, Any]:
    """A logits core (compiled) plus a Keras pre model and a Keras post model."""
    core = keras_cnn(tf, name="core", softmax=False)
    inp = tf.keras.Input((32, 32, 3), name="raw")
    pre = tf.keras.Model(inp, tf.keras.layers.Rescaling(-1.0, offset=255.0, name="invert")(inp),
                         name="pre")
    logits = tf.keras.Input((10,), name="logits_in")
    half = tf.keras.layers.Rescaling(0.5, name="half")(logits)
    post = tf.keras.Model(logits, [tf.keras.layers.Softmax(name="p")(half)], name="post")
    return {"core": core, "pre": pre, "post": post,
            "dfp": mx.NeuralCompiler(models=core).run()}


def expected(parts: dict[str, Any], frame: np.ndarray) -> np.ndarray:
    x = parts["pre"](frame[None])
    return np.asarray(parts["post"](parts["core"](x, training=False)))


def check(parts: dict[str, Any], pre: Any, post: Any, n: int = 3) -> None:
    frames = images(n, seed=20)
    with mx.SyncAccl(parts["dfp"]) as accl:
        accl.set_preprocessing_model(pre)
        accl.set_postprocessing_model(post)
        for frame in frames:
            np.testing.assert_allclose(np.asarray(accl.run(frame)), expected(parts, frame),
                                       rtol=1e-4, atol=1e-6)


def test_keras_objects(parts: dict[str, Any]) -> None:
    check(parts, parts["pre"], parts["post"])


def test_keras_files(parts: dict[str, Any], tmp_path: Path) -> None:
    parts["pre"].save(str(tmp_path / "pre.keras"))
    parts["post"].save(str(tmp_path / "post.keras"))
    check(parts, tmp_path / "pre.keras", str(tmp_path / "post.keras"))


def test_saved_models(tf: Any, parts: dict[str, Any], tmp_path: Path) -> None:
    with contextlib.redirect_stdout(io.StringIO()):
        parts["pre"].export(str(tmp_path / "pre_sm"))
        parts["post"].export(str(tmp_path / "post_sm"))
    check(parts, tmp_path / "pre_sm", tf.saved_model.load(str(tmp_path / "post_sm")))


def test_tflite_paths_and_bytes_run_on_litert(tf: Any, parts: dict[str, Any],
                                              tmp_path: Path) -> None:
    pre_blob, post_blob = to_tflite(tf, parts["pre"]), to_tflite(tf, parts["post"])
    (tmp_path / "pre.tflite").write_bytes(pre_blob)
    check(parts, tmp_path / "pre.tflite", post_blob)
    check(parts, str(tmp_path / "pre.tflite"), bytearray(post_blob))


def test_tflite_post_model_under_async_load(tf: Any, parts: dict[str, Any]) -> None:
    """Many frames in flight through one LiteRT interpreter (it is not thread-safe)."""
    post_blob = to_tflite(tf, parts["post"])
    frames = images(24, seed=21)
    got: list[np.ndarray] = []
    it = iter(frames)
    accl = mx.AsyncAccl(parts["dfp"])
    try:
        accl.set_preprocessing_model(parts["pre"])
        accl.set_postprocessing_model(post_blob)
        accl.connect_input(lambda: next(it, None))
        accl.connect_output(lambda y: got.append(np.array(y)))
        accl.wait()
    finally:
        accl.close()
    assert len(got) == len(frames)
    for frame, y in zip(frames, got, strict=True):
        np.testing.assert_allclose(y, expected(parts, frame), rtol=1e-4, atol=1e-6)


def test_tflite_pre_model_checks_frames(tf: Any, parts: dict[str, Any]) -> None:
    with mx.SyncAccl(parts["dfp"]) as accl:
        accl.set_preprocessing_model(to_tflite(tf, parts["pre"]))
        with pytest.raises(mx.DtypeError, match="pre-processing model input"):
            accl.run(images(1)[0].astype(np.float64))
        with pytest.raises(mx.ShapeError, match="pre-processing model input"):
            accl.run(np.zeros((16, 16, 3), np.float32))
