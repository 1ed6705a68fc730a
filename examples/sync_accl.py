"""SyncAccl: the API document's SyncAccl example, made runnable.

Shows the synchronous API: compile a model with the NeuralCompiler, then run
one frame with ``SyncAccl.run`` (blocking until the outputs are back), a batch
of frames with one ``run`` call (pipelined inside), and the same batch with
``send`` / ``receive`` on two threads, the pipelined way the document
recommends. The document compiles Keras' MobileNet; this project compiles ONNX,
so the model is ``memryx.testing.mobilenet_like`` (a small MobileNet-shaped
CNN with random weights, so its class indices carry no meaning), and
MobileNet's ``preprocess_input`` (scale to [-1, 1]) is done with numpy.

Every output is checked against onnxruntime running the uncompiled model; the
program exits with status 1 if any differs.

Run it (on the simulated MX3, the default device)::

    python examples/sync_accl.py
"""

from __future__ import annotations

import sys
import threading
from typing import Any

import numpy as np
import onnxruntime as ort

from memryx import NeuralCompiler, SyncAccl, testing

SIZE = 64
CLASSES = 10
BATCH = 8


def preprocess_input(img: np.ndarray) -> np.ndarray:
    """MobileNet's preprocessing: HWC pixels in [0, 1] -> NCHW float32 in [-1, 1]."""
    data = img * 2.0 - 1.0
    return np.ascontiguousarray(data.transpose(2, 0, 1), dtype=np.float32)


def top3(probs: np.ndarray) -> str:
    p = np.squeeze(probs, 0)
    best = np.argsort(p)[::-1][:3]
    return ", ".join(f"class {int(i)} ({p[i]:.3f})" for i in best)


def main() -> int:
    # Compile a MobileNet-like model for testing.
    # Typically, compilation needs to be done one time only.
    model = testing.mobilenet_like(input_size=SIZE, num_classes=CLASSES)
    nc = NeuralCompiler(models=model)
    dfp = nc.run()

    # A reference to check the accelerator's outputs against.
    reference = ort.InferenceSession(model.SerializeToString(),
                                     providers=["CPUExecutionProvider"])

    def expected(data: np.ndarray) -> Any:
        return reference.run(None, {"image": data[None]})[0]

    rng = np.random.default_rng(0)
    failures = 0

    def check(name: str, got: Any, data: np.ndarray) -> None:
        nonlocal failures
        want = expected(data)
        ok = isinstance(got, np.ndarray) and got.shape == want.shape and \
            np.allclose(got, want, atol=1e-5)
        print(f"{name}: {top3(got)}{'' if ok else '   <-- MISMATCH'}")
        if not ok:
            failures += 1

    # Prepare the input data.
    img = rng.random((SIZE, SIZE, 3)).astype(np.float32)
    data = preprocess_input(img)

    # Accelerate using the MemryX hardware (here the simulated MX3).
    with SyncAccl(dfp) as accl:
        print(f"input ports {accl.inport_assignment()}, output ports {accl.outport_assignment()}")

        # 1. One frame: run() sends it and waits for its outputs.
        outputs = accl.run(data)  # Run sequential acceleration on the input data.
        check("run(frame)        ", outputs, data)

        # 2. A batch: a list of frames, pipelined inside one run() call.
        batch = [preprocess_input(rng.random((SIZE, SIZE, 3)).astype(np.float32))
                 for _ in range(BATCH)]
        results = accl.run(batch)
        if len(results) != BATCH:
            print(f"run(batch) returned {len(results)} outputs for {BATCH} frames")
            failures += 1
        for i, (frame, out) in enumerate(zip(batch, results, strict=False)):
            check(f"run(batch)[{i}]     ", out, frame)

        # 3. send() and receive() on separate threads: the pipelined way.
        received: list[Any] = []

        def receiver() -> None:
            for _ in batch:
                received.append(accl.receive(timeout=10_000))

        thread = threading.Thread(target=receiver, name="receiver")
        thread.start()
        for frame in batch:
            accl.send(frame, timeout=10_000)
        thread.join()
        for i, (frame, out) in enumerate(zip(batch, received, strict=False)):
            check(f"send/receive[{i}]  ", out, frame)
        if len(received) != BATCH:
            print(f"receive() got {len(received)} outputs for {BATCH} frames")
            failures += 1

    if failures:
        print(f"FAILED: {failures} output(s) wrong or missing")
        return 1
    print(f"OK: {1 + 2 * BATCH} frames, every output matches onnxruntime")
    return 0


if __name__ == "__main__":
    sys.exit(main())
