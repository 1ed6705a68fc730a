"""Regressions found by the second adversarial probe of 2026-11-30 (the vendor-SDK user's
path, paced modes and ``memryx bench``, the shared device server, several device ids),
each as a careless or hostile user hit it."""

from __future__ import annotations

import asyncio
import gc
from typing import Any

import numpy as np
import pytest

import memryx as mx
from memryx.device.fd import FdDevice
from memryx.pytest_plugin import ServerProcess


# -- the fd device: failed futures nobody reads ---------------------------------------------------
@pytest.mark.timeout(60)
@pytest.mark.asyncio
async def test_fd_device_failures_nobody_reads_are_not_loop_errors(identity_dfp: Any,
                                                                   server: ServerProcess
                                                                   ) -> None:
    # AsyncAccl(dfp, [0, 1], device="unix:...") on a server that died printed "Future
    # exception was never retrieved" at exit: the lane raises the first device's error and
    # drops the rest, but the fd device failed the other connection's batches (and every
    # batch submitted after its fault) unread, unlike the simulated device.
    loop = asyncio.get_running_loop()
    seen: list[dict[str, Any]] = []
    old = loop.get_exception_handler()
    loop.set_exception_handler(lambda _loop, ctx: seen.append(ctx))
    frame = [np.ones(identity_dfp.model(0).inputs[0].shape, np.float32)]
    device = FdDevice(server.path, timeout=10)
    try:
        await device.open(identity_dfp, 0)
        await asyncio.wait_for(device.submit(0, [frame]), 20)
        server.kill()
        with pytest.raises(mx.DeviceError):
            for _ in range(200):  # until the device has seen the connection end
                await asyncio.wait_for(device.submit(0, [frame]), 20)
                await asyncio.sleep(0.05)
        device.submit(0, [frame])  # failed at once; the caller never reads it
        gc.collect()
        await asyncio.sleep(0)
    finally:
        await device.aclose()
        loop.set_exception_handler(old)
    assert not [c for c in seen if "never retrieved" in str(c.get("message"))], seen
