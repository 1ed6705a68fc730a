"""Replica faults on a real local Ray runtime: kills mid-stream, dead pools, lost devices."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import numpy as np
import pytest

pytest.importorskip("ray")

import memryx as mx
from memryx.ray import AcceleratorPool
from tests.conftest import asettle
from tests.ray.helpers import (
    Later,
    kill_pid,
    numbered,
    paced,
    positions,
    wait_dead,
    wait_for,
)

pytestmark = pytest.mark.timeout(120)


def states(pool: AcceleratorPool) -> list[str]:
    return [r["state"] for r in pool.statistics()["replicas"]]


def pid_of(pool: AcceleratorPool, index: int) -> int:
    return int(pool.statistics()["replicas"][index]["pid"])


def test_replicas_killed_mid_imap_deliver_every_frame_once_in_order(
        ray_runtime: Any, identity_dfp: mx.Dfp) -> None:
    """One replica's process is SIGKILLed, then the other is killed through Ray
    (``ray.kill(no_restart=False)``), both while frames are in flight."""
    ray = ray_runtime
    n = 300
    with AcceleratorPool(identity_dfp, replicas=2, max_restarts=2) as pool:
        victim = pid_of(pool, 0)
        at = {60: lambda: kill_pid(victim),
              180: lambda: ray.kill(pool.actors[1], no_restart=False)}
        outs = list(pool.imap(paced(numbered(n), at), window=16))
        assert positions(outs) == list(range(n))
        stats = pool.statistics()
        assert [r["faults"] for r in stats["replicas"]] == [1, 1]
        assert stats["frames"] == n
        # Ray restarts both replicas (new processes) and the pool takes them back
        assert wait_for(lambda: pool.run(numbered(1)[0]) is not None
                        and states(pool) == ["live", "live"])
        assert pid_of(pool, 0) != victim
        before = [r["frames"] for r in pool.statistics()["replicas"]]
        assert positions(list(pool.imap(numbered(64)))) == list(range(64))
        after = [r["frames"] for r in pool.statistics()["replicas"]]
        assert all(a > b for a, b in zip(after, before, strict=True)), (before, after)


@pytest.mark.asyncio
async def test_replica_killed_under_concurrent_arun(ray_runtime: Any,
                                                    identity_dfp: mx.Dfp) -> None:
    ray = ray_runtime
    async with AcceleratorPool(identity_dfp, replicas=2, max_restarts=2) as pool:
        frames = numbered(120)
        done = [0]

        async def one(frame: Any) -> Any:
            out = await pool.arun(frame)
            done[0] += 1
            return out

        async def killer() -> None:  # kill once outputs flow
            assert await asettle(lambda: done[0] >= 5, 20)
            ray.kill(pool.actors[0], no_restart=False)

        kill = asyncio.ensure_future(killer())
        outs = await asyncio.gather(*(one(f) for f in frames))
        await kill
        assert positions(outs) == list(range(120))
        got = [o async for o in pool.aimap(numbered(50))]
        assert positions(got) == list(range(50))


def test_pool_with_no_live_replica_raises_device_error_quickly(
        ray_runtime: Any, identity_dfp: mx.Dfp) -> None:
    ray = ray_runtime
    with AcceleratorPool(identity_dfp, replicas=2, max_restarts=0) as pool:
        for actor in pool.actors:
            ray.kill(actor, no_restart=True)
        assert all(wait_dead(ray, actor) for actor in pool.actors)
        start = time.monotonic()
        with pytest.raises(mx.DeviceError, match="dead"):
            pool.run(numbered(1)[0])
        with pytest.raises(mx.DeviceError):
            list(pool.imap(numbered(10)))
        assert time.monotonic() - start < 15
        assert states(pool) == ["dead", "dead"]


def test_lost_device_server_gives_device_error_within_the_timeout(
        ray_runtime: Any, identity_dfp: mx.Dfp, server: Any) -> None:
    with AcceleratorPool(identity_dfp, replicas=1, device=server.address,
                         unavailable_timeout=2) as pool:
        assert positions(list(pool.imap(numbered(20)))) == list(range(20))
        server.kill()
        start = time.monotonic()
        with pytest.raises(mx.DeviceError, match="no live replica"):
            pool.run(numbered(1)[0])
        assert time.monotonic() - start < 15
        assert states(pool) == ["down"]


def test_close_during_imap_from_another_thread(ray_runtime: Any,
                                               identity_dfp: mx.Dfp) -> None:
    pool = AcceleratorPool(identity_dfp, replicas=1)
    got = []
    closer = Later(lambda: wait_for(lambda: len(got) >= 10), pool.close)  # while outputs flow

    def endless() -> Any:
        i = 0
        while True:
            yield np.full((1, 4), i, np.float32)
            i += 1

    closer.start()
    start = time.monotonic()
    with pytest.raises(mx.ClosedError):
        for out in pool.imap(endless()):
            got.append(out)
    closer.join(10)
    assert time.monotonic() - start < 20
    assert positions(got) == list(range(len(got)))
    assert pool.closed


def test_close_while_a_replica_restarts(ray_runtime: Any, identity_dfp: mx.Dfp) -> None:
    pool = AcceleratorPool(identity_dfp, replicas=1)
    kill_pid(pid_of(pool, 0))
    pool.close()
    with pytest.raises(mx.ClosedError):
        pool.run(numbered(1)[0])
