"""Serve a compiled model over HTTP with Ray Serve, on accelerator pool replicas.

Each Serve replica of the ``Classifier`` deployment holds one
:class:`memryx.ray.AcceleratorPool` replica (an actor that owns one MX3
module of its node, placed with the ``MX3`` custom resource). Requests are
batched by ``serve.batch``; the frames of a batch are pipelined on the
accelerator, each request getting its own answer.

The HTTP interface: ``POST /classify`` with a frame as an ``.npy`` body (a
``uint8`` array of shape ``(64, 64, 3)``, the colour classifier of
``memryx.testing``) answers ``{"label": "red", "scores": [...]}``; a frame of
the wrong shape or dtype answers 400 with the error.

Run it (a local Ray runtime with two pretend MX3 modules; needs
``pip install 'memryx[ray]'``)::

    python examples/ray_serve.py [--port 8000] [--replicas 2] [--requests 30]

On a cluster, deploy ``build_app(dfp_bytes)`` with ``serve run`` or
``serve.run`` after ``ray.init(address="auto")`` (see docs/scale-out.md).
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import sys
import urllib.error
import urllib.request
from typing import Any

import numpy as np
import ray
from ray import serve
from starlette.requests import Request
from starlette.responses import JSONResponse

import memryx as mx
from memryx import testing
from memryx.ray import AcceleratorPool

#: The largest batch Serve hands to one call of ``Classifier.classify``.
MAX_BATCH = 8


@serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=4 * MAX_BATCH)
class Classifier:
    """One Serve replica: one accelerator replica and a batching front."""

    def __init__(self, dfp: bytes, device: str | None = None) -> None:
        self.pool = AcceleratorPool(dfp, replicas=1, device=device)
        self.labels = testing.COLOR_LABELS

    @serve.batch(max_batch_size=MAX_BATCH, batch_wait_timeout_s=0.005)
    async def classify(self, frames: list[np.ndarray]) -> list[dict[str, Any]]:
        # one arun per frame: they are pipelined on the accelerator, and a bad
        # frame fails its own request only
        results = await asyncio.gather(*(self.pool.arun(f) for f in frames),
                                       return_exceptions=True)
        answers: list[dict[str, Any]] = []
        for result in results:
            if isinstance(result, mx.UsageError):
                answers.append({"error": f"{type(result).__name__}: {result}"})
            elif isinstance(result, BaseException):
                raise result
            else:
                scores = np.asarray(result).ravel()
                answers.append({"label": self.labels[int(np.argmax(scores))],
                                "scores": [float(s) for s in scores]})
        return answers

    async def __call__(self, request: Request) -> JSONResponse:
        try:
            frame = np.load(io.BytesIO(await request.body()), allow_pickle=False)
        except (ValueError, OSError, EOFError) as exc:
            return JSONResponse({"error": f"the body is not an .npy array: {exc}"},
                                status_code=400)
        answer = await self.classify(frame)
        return JSONResponse(answer, status_code=400 if "error" in answer else 200)


def build_app(dfp: bytes, replicas: int = 1, device: str | None = None) -> Any:
    """The Serve application: ``replicas`` Serve replicas, each with its accelerator."""
    return Classifier.options(num_replicas=replicas).bind(dfp, device)


def post_frame(url: str, frame: np.ndarray, timeout: float = 30.0) -> tuple[int, dict[str, Any]]:
    """POST one frame as .npy; the HTTP status and the JSON answer."""
    body = io.BytesIO()
    np.save(body, frame, allow_pickle=False)
    request = urllib.request.Request(url, data=body.getvalue(), method="POST",
                                     headers={"Content-Type": "application/octet-stream"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, json.loads(exc.read())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--requests", type=int, default=30)
    args = parser.parse_args()

    dfp = mx.NeuralCompiler(models=testing.color_classifier()).run().to_bytes()
    ray.init(resources={"MX3": args.replicas}, include_dashboard=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": args.port})
        serve.run(build_app(dfp, args.replicas), route_prefix="/classify")
        url = f"http://127.0.0.1:{args.port}/classify"
        wrong = 0
        for i in range(args.requests):
            truth = i % 3
            status, answer = post_frame(url, testing.synthetic_frame(truth, seed=i))
            ok = status == 200 and answer["label"] == testing.COLOR_LABELS[truth]
            wrong += not ok
            print(f"request {i:3d}: {status} {answer.get('label', answer)}"
                  f"{'' if ok else '  <- WRONG'}")
        status, answer = post_frame(url, np.zeros((8, 8, 3), np.uint8))
        print(f"a frame of the wrong shape: {status} {answer['error']}")
        print(f"{args.requests - wrong}/{args.requests} answered correctly")
        return 1 if wrong else 0
    finally:
        serve.shutdown()
        ray.shutdown()


if __name__ == "__main__":
    sys.exit(main())
