"""examples/ray_serve.py: the Serve deployment called over loopback HTTP."""

from __future__ import annotations

import concurrent.futures
import importlib.util
import socket
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest

pytest.importorskip("ray")
pytest.importorskip("ray.serve")

import memryx as mx
from memryx import testing

pytestmark = pytest.mark.timeout(150)

EXAMPLE = Path(__file__).parents[2] / "examples" / "ray_serve.py"


def load_example() -> ModuleType:
    spec = importlib.util.spec_from_file_location("ray_serve_example", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def served(ray_runtime: Any) -> Iterator[tuple[ModuleType, str]]:
    from ray import serve

    example = load_example()
    dfp = mx.NeuralCompiler(models=testing.color_classifier()).run().to_bytes()
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        serve.run(example.build_app(dfp, replicas=2), route_prefix="/classify")
        yield example, f"http://127.0.0.1:{port}/classify"
    finally:
        serve.shutdown()
        sys.modules.pop("ray_serve_example", None)


def test_serve_classifies_frames_over_http(served: tuple[ModuleType, str]) -> None:
    example, url = served
    truths = [i % 3 for i in range(24)]
    # concurrent requests, so that serve.batch really batches
    with concurrent.futures.ThreadPoolExecutor(8) as executor:
        answers = list(executor.map(
            lambda i: example.post_frame(url, testing.synthetic_frame(truths[i], seed=i)),
            range(len(truths))))
    for (status, answer), truth in zip(answers, truths, strict=True):
        assert status == 200, answer
        assert answer["label"] == testing.COLOR_LABELS[truth]
        assert len(answer["scores"]) == 3
    # a bad frame fails its own request with the runtime's error, and nothing else
    status, answer = example.post_frame(url, np.zeros((8, 8, 3), np.uint8))
    assert status == 400 and "ShapeError" in answer["error"]
    status, answer = example.post_frame(url, np.zeros((64, 64, 3), np.float32))
    assert status == 400 and "DtypeError" in answer["error"]
    status, answer = example.post_frame(url, testing.synthetic_frame(2, seed=99))
    assert status == 200 and answer["label"] == "blue"
