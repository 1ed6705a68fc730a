"""A multi-camera "NVR" on the simulated MX3: the main demo.

Several synthetic cameras stream frames into one model through
``MultiStreamAsyncAccl``; the model really classifies each frame's dominant
colour (red, green or blue), so every prediction can be checked against the
colour the camera actually showed. It shows:

* compiling an ONNX model with ``NeuralCompiler(autocrop=True)``, which crops
  the uint8 -> float conversion / NHWC -> NCHW transpose and the final Softmax
  off into host-side models (``nc.pre_models[0]`` / ``nc.post_models[0]``);
* running those around the accelerator with ``set_preprocessing_model`` /
  ``set_postprocessing_model``, so cameras hand in raw uint8 frames and the
  output callback gets probabilities;
* ``connect_streams(input_callback, output_callback, stream_count)`` with one
  pair of callbacks serving every camera, and per-camera output order (the
  output callback pairs each output with the frame it came from by counting).

Each camera shows a coloured scene that changes every ``--scene`` frames. The
program prints the prediction at every scene change, then per-camera accuracy
and the throughput, and exits with status 1 if a frame was lost or any
camera's accuracy is below 95 %.

The model is ``memryx.testing.color_classifier``: a 1x1 convolution with
hand-set weights (per-pixel evidence such as R - (G + B) / 2), ReLU, global
average pooling and Softmax; no training, no downloads.

Run it (on the simulated MX3, the default device)::

    python examples/demo.py [--cameras 4] [--frames 60] [--scene 15] [--fps 0]
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from dataclasses import dataclass, field

import numpy as np

from memryx import MultiStreamAsyncAccl, NeuralCompiler, testing

SIZE = 64
MIN_ACCURACY = 0.95
LABELS = testing.COLOR_LABELS


@dataclass
class Camera:
    """One synthetic camera and what came back for it."""

    index: int
    frames: int
    scene: int
    fps: float
    sent: int = 0
    received: int = 0
    correct: int = 0
    next_due: float = 0.0
    log: list[str] = field(default_factory=list)

    def truth(self, k: int) -> int:
        """The colour camera ``index`` shows in its frame ``k``."""
        return (self.index + k // self.scene) % len(LABELS)

    def next_frame(self) -> np.ndarray | None:
        """The camera's next frame, NHWC uint8, or None when the recording ends."""
        if self.sent == self.frames:
            return None
        if self.fps > 0:  # pace like a real camera
            now = time.monotonic()
            if self.next_due > now:
                time.sleep(self.next_due - now)
            self.next_due = max(now, self.next_due) + 1.0 / self.fps
        frame = testing.synthetic_frame(self.truth(self.sent), SIZE,
                                        seed=self.index * 1_000_003 + self.sent)
        self.sent += 1
        return frame


class Nvr:
    """The application: camera sources in, classified frames out."""

    def __init__(self, cameras: int, frames: int, scene: int, fps: float) -> None:
        self.cameras = [Camera(i, frames, scene, fps) for i in range(cameras)]
        self.lock = threading.Lock()

    # input callback: called with the camera (stream) index when the model is ready
    def capture(self, stream_idx: int) -> np.ndarray | None:
        return self.cameras[stream_idx].next_frame()

    # output callback: called with the camera index and the post-processed outputs
    def classified(self, stream_idx: int, probs: np.ndarray) -> None:
        cam = self.cameras[stream_idx]
        k = cam.received  # outputs come back in each camera's own order
        p = np.squeeze(probs, 0)
        label = int(np.argmax(p))
        truth = cam.truth(k)
        cam.received += 1
        cam.correct += label == truth
        if k % cam.scene == 0 or label != truth:
            mark = "" if label == truth else "   <-- WRONG"
            line = (f"cam {stream_idx} frame {k:4d}: {LABELS[label]:5s} (class {label}, "
                    f"p={p[label]:.3f})  truth {LABELS[truth]}{mark}")
            with self.lock:
                print(line, flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description="Multi-camera colour NVR on the simulated MX3")
    parser.add_argument("--cameras", type=int, default=4, help="number of cameras (default 4)")
    parser.add_argument("--frames", type=int, default=60, help="frames per camera (default 60)")
    parser.add_argument("--scene", type=int, default=15,
                        help="frames per scene before a camera's colour changes (default 15)")
    parser.add_argument("--fps", type=float, default=0.0,
                        help="pace each camera at this frame rate (default 0: as fast as "
                             "the accelerator takes frames)")
    args = parser.parse_args()
    if args.cameras < 1 or args.frames < 1 or args.scene < 1 or args.fps < 0:
        parser.error("--cameras, --frames and --scene must be >= 1 and --fps >= 0")

    # Compile once: autocrop moves the uint8/transposing front and the Softmax to the host.
    nc = NeuralCompiler(models=testing.color_classifier(SIZE), autocrop=True)
    dfp = nc.run()
    core = dfp.models[0]
    print(f"compiled {core.name!r}: accelerator runs {core.inputs[0].layer!r} "
          f"{core.inputs[0].shape} -> {core.outputs[0].layer!r} {core.outputs[0].shape}; "
          f"pre/post-processing on the host")
    print(f"{args.cameras} cameras x {args.frames} frames, colours {', '.join(LABELS)}\n")

    nvr = Nvr(args.cameras, args.frames, args.scene, args.fps)
    start = time.perf_counter()
    accl = MultiStreamAsyncAccl(dfp)
    accl.set_preprocessing_model(nc.pre_models[0])
    accl.set_postprocessing_model(nc.post_models[0])
    accl.connect_streams(nvr.capture, nvr.classified, len(nvr.cameras))
    accl.wait()  # every camera ended and every output was delivered; releases the accelerator
    elapsed = time.perf_counter() - start
    stats = accl.statistics()["models"][0]

    print()
    ok = True
    for cam in nvr.cameras:
        lost = cam.sent - cam.received
        accuracy = cam.correct / cam.received if cam.received else 0.0
        good = lost == 0 and accuracy >= MIN_ACCURACY
        ok &= good
        print(f"cam {cam.index}: {cam.received}/{cam.sent} frames classified, {lost} lost, "
              f"accuracy {accuracy:.1%} [{'ok' if good else 'FAIL'}]")
    total = sum(cam.received for cam in nvr.cameras)
    print(f"\n{total} frames in {elapsed:.2f} s: {total / elapsed:.0f} frames/s "
          f"(runtime counters: {stats['frames_in']} in, {stats['frames_out']} out)")
    if stats["frames_in"] != stats["frames_out"]:
        ok = False
    if not ok:
        print(f"FAILED: frames lost or accuracy below {MIN_ACCURACY:.0%}")
        return 1
    print("OK: no frame lost, every camera above "
          f"{MIN_ACCURACY:.0%} accuracy")
    return 0


if __name__ == "__main__":
    sys.exit(main())
