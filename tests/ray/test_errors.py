"""Misuse and bad input of AcceleratorPool: clear typed errors within a bounded time."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import time
from typing import Any

import numpy as np
import pytest

pytest.importorskip("ray")

import memryx as mx
from memryx.ray import AcceleratorPool
from tests.ray.conftest import MX3_MODULES
from tests.ray.helpers import wait_for

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def unloadable_dfp(identity_dfp: mx.Dfp) -> mx.Dfp:
    """A well-formed DFP container whose graph onnxruntime cannot load."""
    model = dataclasses.replace(identity_dfp.models[0], graph=b"not an onnx graph")
    return mx.Dfp.build([model], num_chips=identity_dfp.num_chips)


def free_mx3(ray: Any) -> float:
    return float(ray.available_resources().get("MX3", 0))


def test_more_replicas_than_the_cluster_has_fails_at_once(ray_runtime: Any,
                                                          identity_dfp: mx.Dfp) -> None:
    start = time.monotonic()
    with pytest.raises(mx.UsageError, match=rf"replicas=5 need 5 'MX3' but the Ray cluster "
                                            rf"has {MX3_MODULES}"):
        AcceleratorPool(identity_dfp, replicas=MX3_MODULES + 1)
    with pytest.raises(mx.UsageError, match="'MX7'"):
        AcceleratorPool(identity_dfp, replicas=1, resources={"MX7": 1})
    assert time.monotonic() - start < 5


def test_resources_held_by_another_pool_fail_within_start_timeout(
        ray_runtime: Any, identity_dfp: mx.Dfp) -> None:
    x = np.ones((1, 4), np.float32)
    # one replica holding all the modules but one
    with AcceleratorPool(identity_dfp, replicas=1,
                         resources={"MX3": MX3_MODULES - 1}) as holder:
        start = time.monotonic()
        # the one replica that fits may not even start in time on a loaded machine
        with pytest.raises(mx.DeviceError, match=r"only [01] of 2 replicas started"):
            AcceleratorPool(identity_dfp, replicas=2, start_timeout=3)
        assert time.monotonic() - start < 20
        np.testing.assert_array_equal(holder.run(x), x)
    # every replica of both pools gave its module back
    assert wait_for(lambda: free_mx3(ray_runtime) == MX3_MODULES)


def test_a_dfp_that_fails_to_load_raises_at_creation(ray_runtime: Any,
                                                     unloadable_dfp: mx.Dfp) -> None:
    with pytest.raises(mx.DfpError, match="cannot be loaded"):
        AcceleratorPool(unloadable_dfp, replicas=1)


def test_an_unreachable_device_raises_at_creation(ray_runtime: Any, identity_dfp: mx.Dfp,
                                                  tmp_path: Any) -> None:
    with pytest.raises(mx.DeviceError):
        AcceleratorPool(identity_dfp, replicas=1, device=f"unix:{tmp_path}/nothing.sock")


@pytest.mark.asyncio
async def test_created_in_a_coroutine_the_error_comes_at_async_with(
        ray_runtime: Any, unloadable_dfp: mx.Dfp) -> None:
    pool = AcceleratorPool(unloadable_dfp, replicas=1)
    with pytest.raises(mx.DfpError):
        async with pool:
            pass
    assert pool.closed
    with pytest.raises(mx.ClosedError):
        await pool.arun(np.ones((1, 4), np.float32))


def test_bad_arguments(ray_runtime: Any, identity_dfp: mx.Dfp) -> None:
    for replicas in (0, -1, True, 1.5, "2"):
        with pytest.raises(ValueError, match="replicas"):
            AcceleratorPool(identity_dfp, replicas=replicas)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="window"):
        AcceleratorPool(identity_dfp, window=0)
    with pytest.raises(ValueError, match="start_timeout"):
        AcceleratorPool(identity_dfp, start_timeout=0)
    with pytest.raises(TypeError, match="device"):
        AcceleratorPool(identity_dfp, device=3)  # type: ignore[arg-type]
    with pytest.raises(mx.DfpError):
        AcceleratorPool(b"not a dfp")
    with pytest.raises(TypeError):
        AcceleratorPool(3.5)
    # none of these started a replica (the earlier tests' replicas are gone too)
    assert wait_for(lambda: free_mx3(ray_runtime) == MX3_MODULES)


def test_a_pool_needs_ray_init(identity_dfp: mx.Dfp, tmp_path: Any) -> None:
    path = identity_dfp.write(tmp_path / "m.dfp")
    script = (
        "import memryx as mx\n"
        "from memryx.ray import AcceleratorPool\n"
        "try:\n"
        f"    AcceleratorPool({str(path)!r})\n"
        "except mx.UsageError as e:\n"
        "    print('OK', e)\n")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    assert "OK" in out.stdout and "ray.init" in out.stdout
