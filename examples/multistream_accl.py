"""MultiStreamAsyncAccl: the API document's MultiStreamAsyncAccl example, made runnable.

Shows several input streams (cameras) sharing one model: one input callback
``data_source(stream_idx)`` and one output callback
``output_processor(stream_idx, *outputs)`` serve all streams; the runtime
interleaves the streams round-robin, never runs one stream's callback
concurrently with itself, and hands each stream its outputs in that stream's
order. ``connect_streams`` starts the streams, ``wait()`` blocks until every
stream has returned ``None`` and every output was delivered.

As in ``async_accl.py`` the model is ``memryx.testing.mobilenet_like`` with
its preprocessing and Softmax in the graph, cropped off by
``NeuralCompiler(autocrop=True)`` and run on the host with
``set_preprocessing_model`` / ``set_postprocessing_model`` (random weights, so
class indices carry no meaning). Each stream's outputs are checked, in order,
against onnxruntime running the uncompiled model; the program exits with
status 1 if any output is wrong, missing or out of order.

Run it (on the simulated MX3, the default device)::

    python examples/multistream_accl.py [--streams N] [--frames N]
"""

from __future__ import annotations

import argparse
import logging
import sys
import time

import numpy as np
import onnxruntime as ort

from memryx import MultiStreamAsyncAccl, NeuralCompiler, testing

SIZE = 64
CLASSES = 10


class Application:
    # define the callback that will return model input data
    def __init__(self, stream_count: int, frames: int) -> None:
        self.streams: list[list[np.ndarray]] = []
        self.streams_idx: list[int] = []
        self.outputs: list[list[np.ndarray]] = []
        rng = np.random.default_rng(0)
        for _ in range(stream_count):
            self.streams.append([rng.integers(0, 256, size=(SIZE, SIZE, 3), dtype=np.uint8)
                                 for _ in range(frames)])
            self.streams_idx.append(0)
            self.outputs.append([])

    def data_source(self, stream_idx: int) -> np.ndarray | None:
        # generate inputs based on stream_idx
        if self.streams_idx[stream_idx] == len(self.streams[stream_idx]):
            return None
        self.streams_idx[stream_idx] += 1
        return self.streams[stream_idx][self.streams_idx[stream_idx] - 1]

    # define the callback that will process the outputs of the model
    def output_processor(self, stream_idx: int, *outputs: np.ndarray) -> None:
        # route outputs based on stream_idx
        self.outputs[stream_idx].append(outputs[0])


def top3(probs: np.ndarray) -> str:
    p = np.squeeze(probs, 0)
    best = np.argsort(p)[::-1][:3]
    return ", ".join(f"class {int(i)} ({p[i]:.3f})" for i in best)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", type=int, default=2, help="number of streams (default 2)")
    parser.add_argument("--frames", type=int, default=10, help="frames per stream (default 10)")
    args = parser.parse_args()
    if args.streams < 1 or args.frames < 1:
        parser.error("--streams and --frames must be >= 1")

    # verbose=1 makes the compiler log its progress on the "memryx.compiler" logger.
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    logging.getLogger("memryx.compiler").setLevel(logging.INFO)

    # Compile a MobileNet-like model for testing.
    # Typically, compilation needs to be done one time only.
    model = testing.mobilenet_like(input_size=SIZE, num_classes=CLASSES, preprocessing=True)
    nc = NeuralCompiler(models=model, autocrop=True, verbose=1)
    dfp = nc.run()

    # Accelerate using the MemryX hardware (here the simulated MX3).
    app = Application(args.streams, args.frames)
    start = time.perf_counter()
    accl = MultiStreamAsyncAccl(dfp)
    accl.set_preprocessing_model(nc.pre_models[0])
    accl.set_postprocessing_model(nc.post_models[0])
    # starts asynchronous execution of input output callback pair associated with the streams
    accl.connect_streams(app.data_source, app.output_processor, args.streams)
    accl.wait()  # wait for the accelerator to finish execution
    # wait() has released the accelerator. SDK-style teardown (accl.stop() or
    # accl.shutdown()) is harmless here, and a script that ends without any
    # teardown still exits promptly (docs/migrating.md).
    accl.shutdown()
    elapsed = time.perf_counter() - start

    reference = ort.InferenceSession(model.SerializeToString(),
                                     providers=["CPUExecutionProvider"])
    failures = 0
    for s, (frames, outputs) in enumerate(zip(app.streams, app.outputs, strict=True)):
        wrong = sum(
            1 for img, got in zip(frames, outputs, strict=False)
            if not np.allclose(got, reference.run(None, {"frame": img[None]})[0], atol=1e-5)
        )
        status = "ok" if wrong == 0 and len(outputs) == len(frames) else "WRONG"
        failures += status != "ok"
        last = top3(outputs[-1]) if outputs else "-"
        print(f"stream {s}: {len(outputs)}/{len(frames)} outputs, {wrong} differ from "
              f"onnxruntime [{status}]; last frame: {last}")
    total = sum(len(o) for o in app.outputs)
    print(f"{total} frames from {args.streams} streams in {elapsed:.2f} s "
          f"({total / elapsed:.0f} frames/s on the simulated MX3)")
    if failures:
        print(f"FAILED: {failures} stream(s) with wrong or missing outputs")
        return 1
    print("OK: every stream got all its outputs, in order, equal to onnxruntime's")
    return 0


if __name__ == "__main__":
    sys.exit(main())
