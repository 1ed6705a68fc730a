"""Regressions found by the third adversarial probe of 2026-11-30 (the ``ready`` time of
the simulated device, the data path under hostile use), each as a careless or hostile
user hit it."""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np
import pytest

import memryx as mx


# -- a Python post-processing callable that reuses its output buffer ------------------------------
def _reusing_post() -> Any:
    """A post-processing callable writing into one preallocated buffer (as fast numpy
    code does): the runtime hands its outputs out later, so it must own them."""
    buf = np.zeros((1, 4), np.float32)

    def post(y: np.ndarray) -> np.ndarray:
        buf[:] = y
        return buf

    return post


@pytest.mark.timeout(60)
@pytest.mark.parametrize("mode", ["fast", "timed"])
def test_run_of_a_batch_gives_each_frame_its_own_post_processed_outputs(identity_dfp: Any,
                                                                        mode: str) -> None:
    # SyncAccl.run(list) post-processed every frame into the callable's one buffer and
    # returned that buffer for every frame: all outputs were the last frame's, silently.
    frames = [np.full((1, 4), k, np.float32) for k in range(12)]
    with mx.SyncAccl(identity_dfp, device=f"sim:{mode}") as accl:
        accl.set_postprocessing_model(_reusing_post())
        outs = accl.run(frames)
    assert [float(o.ravel()[0]) for o in outs] == [float(k) for k in range(12)]


@pytest.mark.timeout(60)
@pytest.mark.asyncio
async def test_concurrent_aruns_each_get_their_own_post_processed_outputs(identity_dfp: Any
                                                                          ) -> None:
    async with mx.AsyncAccl(identity_dfp, device="sim:fast") as accl:
        accl.set_postprocessing_model(_reusing_post())
        outs = await asyncio.gather(*[accl.arun(np.full((1, 4), k, np.float32))
                                      for k in range(10)])
    assert [float(o.ravel()[0]) for o in outs] == [float(k) for k in range(10)]
