"""AsyncAccl: the API document's AsyncAccl example, made runnable.

Shows the callback API of ``AsyncAccl``: an input callback (here a generator
function) feeds camera-like frames, an output callback receives each frame's
outputs, and ``wait()`` blocks until the input has ended and every output was
delivered. Input and output callbacks run concurrently, so the accelerator is
pipelined.

The document compiles Keras' MobileNet and calls ``preprocess_input`` /
``decode_predictions`` by hand. Here the model is
``memryx.testing.mobilenet_like(preprocessing=True)``, an ONNX MobileNet-shaped
CNN (random weights, so its class indices carry no meaning) whose graph starts
with the preprocessing (uint8 HWC frame -> float NCHW in [-1, 1]) and ends with
a Softmax. ``NeuralCompiler(autocrop=True)`` crops both ends off into host-side
models, which ``set_preprocessing_model`` / ``set_postprocessing_model`` run
around the accelerator: the input callback yields raw uint8 frames and the
output callback gets probabilities.

Every output is checked against onnxruntime running the uncompiled model; the
program exits with status 1 if any output is wrong or missing.

Run it (on the simulated MX3, the default device)::

    python examples/async_accl.py
"""

from __future__ import annotations

import sys
from collections.abc import Iterator

import numpy as np
import onnxruntime as ort

from memryx import AsyncAccl, NeuralCompiler, testing

SIZE = 64
CLASSES = 10
FRAMES = 10

frames_sent: list[np.ndarray] = []
results: list[np.ndarray] = []


# define the callback that will return model input data
def data_source() -> Iterator[np.ndarray]:
    rng = np.random.default_rng(0)
    for _ in range(FRAMES):
        img = rng.integers(0, 256, size=(SIZE, SIZE, 3), dtype=np.uint8)  # a camera frame
        frames_sent.append(img)
        yield img


# define the callback that will process the outputs of the model
def output_processor(*outputs: np.ndarray) -> None:
    probs = np.squeeze(outputs[0], 0)
    best = np.argsort(probs)[::-1][:3]
    preds = ", ".join(f"class {int(i)} ({probs[i]:.3f})" for i in best)
    print(f"frame {len(results)}: {preds}")
    results.append(outputs[0])


def main() -> int:
    # Compile a MobileNet-like model for testing.
    # Typically, compilation needs to be done one time only.
    model = testing.mobilenet_like(input_size=SIZE, num_classes=CLASSES, preprocessing=True)
    nc = NeuralCompiler(models=model, autocrop=True)
    dfp = nc.run()
    print(f"compiled: accelerated part {dfp.models[0].inputs[0].layer!r} -> "
          f"{dfp.models[0].outputs[0].layer!r}; pre/post-processing cropped to the host")

    # Accelerate using the MemryX hardware (here the simulated MX3).
    accl = AsyncAccl(dfp)
    accl.set_preprocessing_model(nc.pre_models[0])  # uint8 frame -> normalised NCHW tensor
    accl.set_postprocessing_model(nc.post_models[0])  # logits -> softmax probabilities
    accl.connect_input(data_source)  # starts asynchronous execution of input generating callback
    accl.connect_output(output_processor)  # starts asynchronous execution of output callback
    accl.wait()  # wait for the accelerator to finish execution
    # wait() has released the accelerator. SDK-style teardown (accl.stop() or
    # accl.shutdown()) is harmless here, and a script that ends without any
    # teardown still exits promptly (docs/migrating.md).
    accl.shutdown()

    # Check every output against onnxruntime on the whole, uncompiled model.
    reference = ort.InferenceSession(model.SerializeToString(),
                                     providers=["CPUExecutionProvider"])
    if len(results) != FRAMES:
        print(f"FAILED: {len(results)} outputs for {FRAMES} frames")
        return 1
    for i, (img, got) in enumerate(zip(frames_sent, results, strict=True)):
        want = reference.run(None, {"frame": img[None]})[0]
        if got.shape != want.shape or not np.allclose(got, want, atol=1e-5):
            print(f"FAILED: frame {i}: output differs from onnxruntime")
            return 1
    print(f"OK: {FRAMES} frames, outputs in order and equal to onnxruntime's")
    return 0


if __name__ == "__main__":
    sys.exit(main())
