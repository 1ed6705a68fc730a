"""Attacks on AcceleratorPool: cancellation, closing under an async stream, an
abandoned pool, a camera's replica killed under it."""

from __future__ import annotations

import asyncio
import gc
from typing import Any

import numpy as np
import pytest

pytest.importorskip("ray")

import memryx as mx
from memryx.ray import AcceleratorPool
from tests.ray.conftest import MX3_MODULES
from tests.ray.helpers import kill_pid, numbered, paced, positions, wait_for

pytestmark = pytest.mark.timeout(120)


def in_flight(pool: AcceleratorPool) -> int:
    return sum(r["in_flight"] for r in pool.statistics()["replicas"])


def test_a_killed_replica_moves_its_stream_and_keeps_its_order(
        ray_runtime: Any, identity_dfp: mx.Dfp) -> None:
    with AcceleratorPool(identity_dfp, replicas=2) as pool:
        list(pool.imap(numbered(4), stream="cam0"))
        home = max(pool.statistics()["replicas"], key=lambda r: r["frames"])
        victim = int(home["pid"])
        outs = list(pool.imap(paced(numbered(200), {60: lambda: kill_pid(victim)}),
                              stream="cam0", window=8, chunk=3))
        assert positions(outs) == list(range(200))
        other = pool.statistics()["replicas"][1 - home["index"]]
        assert other["frames"] > 0    # the stream moved to the other replica


@pytest.mark.asyncio
async def test_cancelled_arun_and_aimap_release_their_frames(ray_runtime: Any,
                                                             identity_dfp: mx.Dfp) -> None:
    async with AcceleratorPool(identity_dfp, replicas=1) as pool:
        tasks = [asyncio.ensure_future(pool.arun(f)) for f in numbered(20)]
        await asyncio.sleep(0)
        for task in tasks[::2]:
            task.cancel()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        done = [r for r in results if not isinstance(r, BaseException)]
        assert all(isinstance(r, asyncio.CancelledError) for r in results[::2]
                   if isinstance(r, BaseException))
        assert positions(done) == sorted(positions(done))
        gen = pool.aimap(numbered(100), window=6)
        got = [await gen.__anext__() for _ in range(3)]
        await gen.aclose()
        assert positions(got) == [0, 1, 2]
        assert in_flight(pool) == 0
        assert positions([await pool.arun(f) for f in numbered(3)]) == [0, 1, 2]


@pytest.mark.asyncio
async def test_aclose_during_aimap_ends_it_with_closed_error(ray_runtime: Any,
                                                             identity_dfp: mx.Dfp) -> None:
    pool = AcceleratorPool(identity_dfp, replicas=1)
    async with pool:
        got = []
        twenty = asyncio.Event()

        def endless() -> Any:
            i = 0
            while True:
                yield np.full((1, 4), i, np.float32)
                i += 1

        async def consume() -> None:
            async for out in pool.aimap(endless()):
                got.append(out)
                if len(got) == 20:
                    twenty.set()

        task = asyncio.ensure_future(consume())
        await asyncio.wait_for(twenty.wait(), 30)
        await pool.aclose()
        with pytest.raises(mx.ClosedError):
            await asyncio.wait_for(task, 20)
        assert positions(got) == list(range(len(got)))


def test_an_abandoned_pool_warns_and_gives_its_modules_back(ray_runtime: Any,
                                                            identity_dfp: mx.Dfp) -> None:
    def abandon() -> None:
        pool = AcceleratorPool(identity_dfp, replicas=1)
        pool.run(numbered(1)[0])
        # the pool goes out of scope here, open

    with pytest.warns(ResourceWarning, match="unclosed"):
        abandon()
    gc.collect()
    assert wait_for(lambda: ray_runtime.available_resources().get("MX3", 0) == MX3_MODULES)


def test_window_and_stream_arguments(ray_runtime: Any, identity_dfp: mx.Dfp) -> None:
    with AcceleratorPool(identity_dfp, replicas=1) as pool:
        with pytest.raises(ValueError, match="window"):
            pool.imap(numbered(3), window=0)
        assert positions(pool.run(numbered(5), stream=("cam", 1))) == list(range(5))
        assert positions(list(pool.imap(iter(numbered(5)), window=1))) == list(range(5))
