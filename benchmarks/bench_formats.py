"""How the TensorFlow-family converters do: time to convert, agreement, host speed.

    python benchmarks/bench_formats.py       (needs memryx[tf])

MobileNet (Keras, 224x224, random weights at a trained network's scale: nothing can be
downloaded here) goes Keras -> ONNX with tf2onnx and Keras -> TFLite -> ONNX. It prints
the conversion times, the largest difference from Keras / LiteRT over 10 frames, and the
host time per frame of the same TFLite model in LiteRT and of its ONNX form in
onnxruntime (1 thread each, median of 30 after 5 warm-up runs). docs/models.md quotes it.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import platform
import statistics
import time
from datetime import UTC, datetime
from typing import Any

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def weights_like_trained(model: Any) -> None:
    rng = np.random.default_rng(0)
    for layer in model.layers:
        values = []
        for var, value in zip(layer.weights, layer.get_weights(), strict=True):
            tag = getattr(var, "path", var.name)
            if "gamma" in tag or "moving_variance" in tag:
                values.append(rng.uniform(0.5, 1.5, value.shape))
            elif "beta" in tag or "moving_mean" in tag or "bias" in tag:
                values.append(rng.normal(0.0, 0.2, value.shape))
            else:
                fan_in = np.prod(value.shape[:2] if "depthwise" in tag else value.shape[:-1])
                values.append(rng.normal(0.0, np.sqrt(2.0 / fan_in), value.shape))
        if values:
            layer.set_weights([v.astype(np.float32) for v in values])


def per_frame(fn: Any, runs: int = 30) -> float:
    for _ in range(5):
        fn()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def main() -> None:
    t0 = time.perf_counter()
    import tensorflow as tf
    import_s = time.perf_counter() - t0
    from ai_edge_litert.interpreter import Interpreter

    import memryx as mx
    from memryx._core.processing import new_session
    from memryx.formats import tflite as mx_tflite

    model = tf.keras.applications.MobileNet(weights=None)
    weights_like_trained(model)
    rng = np.random.default_rng(1)
    frames = [rng.uniform(-1, 1, (224, 224, 3)).astype(np.float32) for _ in range(10)]

    t0 = time.perf_counter()
    dfp = mx.NeuralCompiler(models=model).run()
    keras_compile_s = time.perf_counter() - t0
    with mx.SyncAccl(dfp) as accl:
        keras_diff = max(float(np.abs(np.asarray(accl.run(f)) -
                                      np.asarray(model(f[None], training=False))).max())
                         for f in frames)

    t0 = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        blob = tf.lite.TFLiteConverter.from_keras_model(model).convert()
    tflite_convert_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    onnx_model = mx_tflite.to_onnx(blob, "bench")
    tf2onnx_tflite_s = time.perf_counter() - t0

    interp = Interpreter(model_content=blob, num_threads=1)
    interp.allocate_tensors()
    (inp,), (out,) = interp.get_input_details(), interp.get_output_details()
    sess = new_session(onnx_model.SerializeToString(), threads=1)
    name = sess.get_inputs()[0].name
    diffs = []
    for f in frames:
        interp.set_tensor(inp["index"], f[None])
        interp.invoke()
        diffs.append(float(np.abs(interp.get_tensor(out["index"]) -
                                  sess.run(None, {name: f[None]})[0]).max()))

    def litert_run() -> None:
        interp.set_tensor(inp["index"], frames[0][None])
        interp.invoke()

    result = {
        "date": datetime.now(UTC).strftime("%Y-%m-%d"),
        "machine": f"{os.cpu_count()} cores, {platform.machine()}",
        "versions": {"tensorflow": tf.__version__, "tf2onnx": __import__("tf2onnx").__version__,
                     "onnxruntime": __import__("onnxruntime").__version__},
        "tensorflow_import_s": round(import_s, 1),
        "keras_to_dfp_s": round(keras_compile_s, 1),
        "keras_vs_dfp_max_abs_diff": keras_diff,
        "keras_to_tflite_s": round(tflite_convert_s, 1),
        "tflite_to_onnx_s": round(tf2onnx_tflite_s, 1),
        "litert_vs_onnx_max_abs_diff": max(diffs),
        "litert_ms_per_frame": round(per_frame(litert_run), 2),
        "onnxruntime_ms_per_frame": round(per_frame(
            lambda: sess.run(None, {name: frames[0][None]})), 2),
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
