"""An asyncio service classifying several cameras at once with one AsyncAccl.

Shows the async API (see docs/async-guide.md):

* ``async with AsyncAccl(dfp) as accl`` binds the accelerator to the app's
  running event loop; leaving the block closes it;
* camera tasks, each awaiting ``await accl.arun(frame)`` per frame: many tasks
  may ``arun`` at once, each gets exactly its own outputs;
* one camera fed through ``async for probs in accl.astream(frames)``, which
  keeps a window of frames in flight and yields outputs in order;
* a batch ``arun`` under ``asyncio.timeout``: cancelling the awaiting task
  drops that batch's frames and leaves every other user of the accelerator alone;
* results go into a bounded ``asyncio.Queue`` drained by a reporting task;
* a ticker task measures how late the event loop wakes it up: the loop stays
  responsive because the model, the pre/post-processing and the frame
  generation never run on the loop thread.

The model is ``memryx.testing.color_classifier``, which classifies the
dominant colour of a frame (red, green, blue), so every prediction is checked
against the colour the camera showed. The program exits with status 1 if a
result is missing, the accuracy is below 95 %, or the loop stalled.

Run it (on the simulated MX3, the default device)::

    python examples/async_service.py [--cameras 3] [--frames 40] [--fps 100]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import numpy as np

from memryx import AsyncAccl, NeuralCompiler, testing

SIZE = 64
LABELS = testing.COLOR_LABELS
MIN_ACCURACY = 0.95
#: A wake-up later than this means something blocked the event loop.
MAX_LOOP_LAG = 0.25
SNAPSHOT_FRAMES = 64


@dataclass(frozen=True)
class Result:
    camera: str
    frame: int
    truth: int
    probs: np.ndarray


async def camera(index: int, frames: int | None, fps: float
                 ) -> AsyncIterator[tuple[int, int, np.ndarray]]:
    """An async camera: yields ``(frame number, true colour, frame)`` at ``fps``.

    ``frames=None`` never ends. Frames are rendered on a worker thread so the
    loop is free while they are made.
    """
    k = 0
    next_due = time.monotonic()
    while frames is None or k < frames:
        truth = (index + k // 10) % len(LABELS)  # the scene changes every 10 frames
        img = await asyncio.to_thread(testing.synthetic_frame, truth, SIZE,
                                      index * 1_000_003 + k)
        next_due += 1.0 / fps
        await asyncio.sleep(max(0.0, next_due - time.monotonic()))
        yield k, truth, img
        k += 1


async def arun_camera(accl: AsyncAccl, index: int, frames: int, fps: float,
                      results: asyncio.Queue[Result | None]) -> None:
    """One frame at a time: ``await accl.arun(frame)`` returns that frame's outputs."""
    async for k, truth, img in camera(index, frames, fps):
        probs = await accl.arun(img)
        await results.put(Result(f"cam{index}/arun", k, truth, probs))


async def astream_camera(accl: AsyncAccl, index: int, frames: int, fps: float,
                         results: asyncio.Queue[Result | None]) -> None:
    """A whole stream: ``astream`` keeps several frames in flight, outputs in order."""
    truths: collections.deque[tuple[int, int]] = collections.deque()

    async def images() -> AsyncIterator[np.ndarray]:
        async for k, truth, img in camera(index, frames, fps):
            truths.append((k, truth))
            yield img

    async for probs in accl.astream(images(), window=4):
        k, truth = truths.popleft()  # outputs come back in input order
        await results.put(Result(f"cam{index}/astream", k, truth, probs))


async def snapshot(accl: AsyncAccl, index: int, deadline: float) -> str:
    """Ask for a burst of frames as one batch, with a deadline.

    ``arun`` with a list of frames pipelines the whole batch. If the deadline
    passes first, the awaiting task is cancelled: the runtime drops this
    batch's frames still in flight and nothing else; the other cameras carry on.
    """
    burst = await asyncio.to_thread(
        lambda: [testing.synthetic_frame(index % len(LABELS), SIZE, index * 1_000_003 + k)
                 for k in range(SNAPSHOT_FRAMES)])
    try:
        async with asyncio.timeout(deadline):
            outputs = await accl.arun(burst)
    except TimeoutError:
        return (f"snapshot of {SNAPSHOT_FRAMES} frames missed its {deadline * 1000:.0f} ms "
                "deadline: cancelled, its frames dropped, the service carried on")
    labels = {LABELS[int(np.argmax(o))] for o in outputs}
    return (f"snapshot of {len(outputs)} frames made its {deadline * 1000:.0f} ms deadline: "
            f"{', '.join(sorted(labels))}")


async def reporter(results: asyncio.Queue[Result | None], totals: dict[str, list[int]]
                   ) -> None:
    """Drain the queue: print predictions at scene changes and mistakes, count the rest."""
    while (r := await results.get()) is not None:
        p = np.squeeze(r.probs, 0)
        label = int(np.argmax(p))
        seen, correct = totals.setdefault(r.camera, [0, 0])
        totals[r.camera] = [seen + 1, correct + (label == r.truth)]
        if r.frame % 10 == 0 or label != r.truth:
            mark = "" if label == r.truth else "   <-- WRONG"
            print(f"{r.camera:14s} frame {r.frame:3d}: {LABELS[label]:5s} (class {label}, "
                  f"p={p[label]:.3f})  truth {LABELS[r.truth]}{mark}")


async def ticker(period: float, lags: list[float]) -> None:
    """Wake up every ``period`` seconds and record how late each wake-up was."""
    while True:
        due = time.monotonic() + period
        await asyncio.sleep(period)
        lags.append(time.monotonic() - due)


async def main(cameras: int, frames: int, fps: float) -> int:
    nc = NeuralCompiler(models=testing.color_classifier(SIZE), autocrop=True)
    dfp = await asyncio.to_thread(nc.run)  # compiling blocks: keep it off the loop

    results: asyncio.Queue[Result | None] = asyncio.Queue(maxsize=32)
    totals: dict[str, list[int]] = {}
    lags: list[float] = []
    start = time.perf_counter()
    async with AsyncAccl(dfp) as accl:  # bound to this loop; closed when the block ends
        accl.set_preprocessing_model(nc.pre_models[0])
        accl.set_postprocessing_model(nc.post_models[0])
        tick = asyncio.create_task(ticker(0.005, lags))
        report = asyncio.create_task(reporter(results, totals))
        async with asyncio.TaskGroup() as tg:
            for i in range(cameras):
                tg.create_task(arun_camera(accl, i, frames, fps, results))
            tg.create_task(astream_camera(accl, cameras, frames, fps, results))
            snap = tg.create_task(snapshot(accl, cameras + 1, deadline=0.005))
        await results.put(None)
        await report
        tick.cancel()
        stats = accl.statistics()["models"][0]
    elapsed = time.perf_counter() - start

    print()
    ok = True
    expected = {f"cam{i}/arun": frames for i in range(cameras)}
    expected[f"cam{cameras}/astream"] = frames
    for name, want in expected.items():
        seen, correct = totals.get(name, [0, 0])
        accuracy = correct / seen if seen else 0.0
        good = seen == want and accuracy >= MIN_ACCURACY
        ok &= good
        print(f"{name:14s}: {seen}/{want} results, accuracy {accuracy:.1%} "
              f"[{'ok' if good else 'FAIL'}]")
    print(snap.result())
    total = sum(seen for seen, _ in totals.values())
    worst = max(lags, default=0.0)
    print(f"\n{total} camera frames in {elapsed:.2f} s ({total / elapsed:.0f} frames/s); "
          f"runtime counters: {stats['frames_in']} frames in, {stats['frames_out']} out")
    print(f"event loop: {len(lags)} ticks of 5 ms, latest wake-up {worst * 1000:.1f} ms late")
    if worst > MAX_LOOP_LAG:
        print(f"the event loop stalled for more than {MAX_LOOP_LAG * 1000:.0f} ms")
        ok = False
    if not ok:
        print("FAILED")
        return 1
    print("OK: every camera classified, the loop stayed responsive")
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="asyncio service on the simulated MX3")
    parser.add_argument("--cameras", type=int, default=3,
                        help="cameras served with arun() tasks (default 3)")
    parser.add_argument("--frames", type=int, default=40, help="frames per camera (default 40)")
    parser.add_argument("--fps", type=float, default=100.0, help="camera frame rate (default 100)")
    args = parser.parse_args()
    if args.cameras < 0 or args.frames < 1 or args.fps <= 0:
        parser.error("--cameras must be >= 0, --frames >= 1 and --fps > 0")
    sys.exit(asyncio.run(main(args.cameras, args.frames, args.fps)))
