"""Keras / TensorFlow / TFLite models for the format tests (need ``memryx[tf]``).

Every model here is built in the test session (nothing is downloaded). The
session fixture imports TensorFlow and runs one conversion and one LiteRT
interpreter before the per-test thread/fd leak checks start, since both create
process-wide resources once.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def tf_or_skip() -> Any:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pytest.importorskip("tensorflow", reason="needs the tf extra: "
                                   "pip install 'memryx[tf]'")


def keras_cnn(tf: Any, *, name: str = "tiny", size: int = 32, softmax: bool = True) -> Any:
    """A small NHWC CNN: rescaling, conv, batch-norm, pooling, dense (+ softmax)."""
    inp = tf.keras.Input((size, size, 3), name="image")
    x = tf.keras.layers.Rescaling(1 / 127.5, offset=-1.0)(inp)
    x = tf.keras.layers.Conv2D(8, 3, strides=2, padding="same", name="conv1")(x)
    x = tf.keras.layers.BatchNormalization(name="bn1")(x)
    x = tf.keras.layers.ReLU()(x)
    x = tf.keras.layers.DepthwiseConv2D(3, padding="same", name="dw")(x)
    x = tf.keras.layers.Conv2D(16, 1, activation="relu", name="pw")(x)
    x = tf.keras.layers.GlobalAveragePooling2D()(x)
    x = tf.keras.layers.Dense(10, name="logits")(x)
    if softmax:
        x = tf.keras.layers.Softmax(name="probs")(x)
    model = tf.keras.Model(inp, x, name=name)
    # Non-trivial batch-norm statistics, so a wrong conversion cannot hide behind identity.
    rng = np.random.default_rng(7)
    bn = model.get_layer("bn1")
    bn.set_weights([rng.uniform(0.5, 1.5, 8).astype(np.float32),
                    rng.normal(0, 0.1, 8).astype(np.float32),
                    rng.normal(0, 0.1, 8).astype(np.float32),
                    rng.uniform(0.5, 1.5, 8).astype(np.float32)])
    return model


def to_tflite(tf: Any, model: Any) -> bytes:
    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()):  # the converter prints its SavedModel
        return bytes(tf.lite.TFLiteConverter.from_keras_model(model).convert())


def litert(blob: bytes, *arrays: np.ndarray) -> list[np.ndarray]:
    """What the LiteRT interpreter itself computes for one frame."""
    from ai_edge_litert.interpreter import Interpreter

    interp = Interpreter(model_content=blob)
    interp.allocate_tensors()
    for detail, arr in zip(interp.get_input_details(), arrays, strict=True):
        interp.set_tensor(detail["index"], arr.reshape(detail["shape"]))
    interp.invoke()
    return [np.array(interp.get_tensor(d["index"])) for d in interp.get_output_details()]


@pytest.fixture(scope="session")
def tf() -> Any:
    return tf_or_skip()


@pytest.fixture(scope="session", autouse=True)
def _warm_tf(_warm_up: None) -> Iterator[None]:
    """Create TensorFlow's, tf2onnx's and LiteRT's process-wide threads/fds up front."""
    try:
        tf = tf_or_skip()
    except pytest.skip.Exception:
        yield
        return
    import memryx as mx

    model = keras_cnn(tf, size=8)
    mx.NeuralCompiler(models=model).run()
    blob = to_tflite(tf, model)
    mx.NeuralCompiler(models=blob).run()
    litert(blob, np.zeros((1, 8, 8, 3), np.float32))
    yield


@pytest.fixture(scope="session")
def cnn(tf: Any) -> Any:
    return keras_cnn(tf)


@pytest.fixture(scope="session")
def cnn_tflite(tf: Any, cnn: Any) -> bytes:
    return to_tflite(tf, cnn)


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("models")


def images(n: int, size: int = 32, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.uniform(0, 255, (size, size, 3)).astype(np.float32) for _ in range(n)]
