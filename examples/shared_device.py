"""Shared mode: several processes run models on one device server at once.

Starts ``memryx serve`` on a private socket (unless ``--socket`` names a server
that is already running), then runs three client processes at the same time:
two classify colour frames with ``MultiStreamAsyncAccl``, one runs an MLP with
``SyncAccl``. Every output is checked against onnxruntime running the same
model in the client; the program exits 1 if any is wrong or missing.

Run it::

    python examples/shared_device.py [--socket /run/memryx.sock] [--frames 120]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

import memryx as mx
from memryx import testing


def colour_client(address: str, name: str, frames: int, queue: mp.Queue) -> None:
    nc = mx.NeuralCompiler(models=testing.color_classifier(), autocrop=True)
    dfp = nc.run()
    truth = [(i * 7) % 3 for i in range(frames)]
    sent = [0, 0]
    got: list[list[int]] = [[], []]

    def source(stream: int) -> np.ndarray | None:
        i = sent[stream]
        if i >= frames // 2:
            return None
        sent[stream] += 1
        return testing.synthetic_frame(truth[stream * (frames // 2) + i], seed=i)

    def sink(stream: int, probs: np.ndarray) -> None:
        got[stream].append(int(np.argmax(probs)))

    accl = mx.MultiStreamAsyncAccl(dfp, device=address)
    accl.set_preprocessing_model(nc.pre_models[0])
    accl.set_postprocessing_model(nc.post_models[0])
    accl.connect_streams(source, sink, 2)
    accl.wait()
    predicted = got[0] + got[1]
    right = sum(p == t for p, t in zip(predicted, truth, strict=False))
    queue.put((name, len(predicted), right, frames))


def mlp_client(address: str, name: str, frames: int, queue: mp.Queue) -> None:
    model = testing.mlp_model(seed=3)
    dfp = mx.NeuralCompiler(models=model).run()
    sess = ort.InferenceSession(model.SerializeToString())
    rng = np.random.default_rng(3)
    xs = [rng.standard_normal((1, 16)).astype(np.float32) for _ in range(frames)]
    with mx.SyncAccl(dfp, device=address) as accl:
        outs = accl.run(xs)
    right = sum(np.allclose(o, sess.run(None, {"x": x})[0], rtol=1e-5, atol=1e-6)
                for o, x in zip(outs, xs, strict=True))
    queue.put((name, len(outs), right, frames))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--socket", help="use a server that is already running")
    parser.add_argument("--frames", type=int, default=120)
    args = parser.parse_args()

    server = None
    tmp = tempfile.TemporaryDirectory()
    path = Path(args.socket) if args.socket else Path(tmp.name) / "memryx.sock"
    if not args.socket:
        server = subprocess.Popen([sys.executable, "-m", "memryx", "serve", "--socket",
                                   str(path)])
        deadline = time.monotonic() + 20
        while not path.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        print(f"started a device server on {path}")
    address = f"unix:{path}"
    try:
        queue: mp.Queue = mp.Queue()
        workers = [
            mp.Process(target=colour_client, args=(address, "cameras-A", args.frames, queue)),
            mp.Process(target=colour_client, args=(address, "cameras-B", args.frames, queue)),
            mp.Process(target=mlp_client, args=(address, "mlp", args.frames, queue)),
        ]
        start = time.monotonic()
        for w in workers:
            w.start()
        results = [queue.get(timeout=120) for _ in workers]
        for w in workers:
            w.join(30)
        elapsed = time.monotonic() - start
    finally:
        if server is not None:
            server.terminate()
            server.wait(10)
        tmp.cleanup()

    ok = True
    for name, outputs, right, expected in sorted(results):
        good = outputs == expected and right == expected
        ok &= good
        print(f"{name:10} {outputs}/{expected} outputs, {right} correct  "
              f"[{'ok' if good else 'WRONG'}]")
    print(f"3 processes shared one device server for {elapsed:.1f} s")
    print("OK: every process got all its outputs, all correct" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
