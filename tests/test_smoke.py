from __future__ import annotations

import numpy as np
import pytest

import memryx as mx
from tests.conftest import frames, reference


def test_syncaccl_run_matches_onnxruntime(mobilenet, mobilenet_dfp):
    x = frames(1, (1, 3, 64, 64))[0]
    with mx.SyncAccl(mobilenet_dfp) as accl:
        out = accl.run(x)
    assert np.allclose(out, reference(mobilenet, x)[0], atol=1e-5)


@pytest.mark.asyncio
async def test_arun_matches_onnxruntime(mobilenet, mobilenet_dfp):
    x = frames(1, (1, 3, 64, 64))[0]
    async with mx.SyncAccl(mobilenet_dfp) as accl:
        out = await accl.arun(x)
    assert np.allclose(out, reference(mobilenet, x)[0], atol=1e-5)
