"""AcceleratorPool on a real local Ray runtime: results, order, routing, lifecycle."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

pytest.importorskip("ray")

import memryx as mx
from memryx import testing
from memryx.ray import AcceleratorPool
from tests.conftest import frames

pytestmark = pytest.mark.timeout(120)

SHAPE = (1, 3, 64, 64)


@pytest.fixture(scope="module")
def pool(ray_runtime: Any, mobilenet_dfp: mx.Dfp) -> Iterator[AcceleratorPool]:
    with AcceleratorPool(mobilenet_dfp, replicas=2) as p:
        yield p


@pytest.fixture(scope="module")
def inputs() -> list[np.ndarray]:
    return frames(64, SHAPE, seed=3)


@pytest.fixture(scope="module")
def expected(mobilenet_dfp: mx.Dfp, inputs: list[np.ndarray]) -> list[np.ndarray]:
    with mx.SyncAccl(mobilenet_dfp) as accl:
        return list(accl.run(inputs))


def frame_counts(pool: AcceleratorPool) -> list[int]:
    return [r["frames"] for r in pool.statistics()["replicas"]]


def test_run_one_frame_and_a_batch(pool: AcceleratorPool, inputs: list[np.ndarray],
                                   expected: list[np.ndarray]) -> None:
    out = pool.run(inputs[0])
    assert isinstance(out, np.ndarray) and out.shape == (1, 10)
    np.testing.assert_allclose(out, expected[0], rtol=1e-5, atol=1e-6)
    outs = pool.run(inputs[:10])
    assert isinstance(outs, list) and len(outs) == 10
    for got, want in zip(outs, expected[:10], strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert pool.run([]) == []


def test_imap_is_ordered_and_spreads_over_replicas(pool: AcceleratorPool,
                                                   inputs: list[np.ndarray],
                                                   expected: list[np.ndarray]) -> None:
    before = frame_counts(pool)
    outs = list(pool.imap(inputs))
    assert len(outs) == len(inputs)
    for got, want in zip(outs, expected, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    spread = [a - b for a, b in zip(frame_counts(pool), before, strict=True)]
    assert sum(spread) == len(inputs)
    assert all(n > 0 for n in spread), spread


def test_imap_in_chunks(pool: AcceleratorPool, inputs: list[np.ndarray],
                        expected: list[np.ndarray]) -> None:
    for chunk, window in ((4, None), (3, 5), (16, 4)):
        before = sum(frame_counts(pool))
        outs = list(pool.imap(iter(inputs[:30]), chunk=chunk, window=window))
        assert sum(frame_counts(pool)) - before == 30   # frames, not calls
        assert len(outs) == 30
        for got, want in zip(outs, expected[:30], strict=True):
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="chunk"):
        pool.imap(inputs, chunk=0)


def test_a_bad_frame_in_a_chunk_raises_at_its_position(pool: AcceleratorPool,
                                                       inputs: list[np.ndarray],
                                                       expected: list[np.ndarray]) -> None:
    bad = [*inputs[:6], np.zeros(SHAPE, np.float64), *inputs[6:12]]
    got = []
    with pytest.raises(mx.DtypeError):
        for out in pool.imap(bad, chunk=4):
            got.append(out)
    assert len(got) == 6
    for g, want in zip(got, expected[:6], strict=True):
        np.testing.assert_allclose(g, want, rtol=1e-5, atol=1e-6)
    with pytest.raises(mx.DtypeError):
        pool.run(bad)      # a batch goes in chunks too
    assert all(r["in_flight"] == 0 for r in pool.statistics()["replicas"])


def test_imap_bounds_frames_in_flight(pool: AcceleratorPool, inputs: list[np.ndarray]) -> None:
    taken = 0
    consumed = 0
    ahead: list[int] = []

    def source() -> Iterator[np.ndarray]:
        nonlocal taken
        for frame in inputs:
            taken += 1
            ahead.append(taken - consumed)
            yield frame

    for _ in pool.imap(source(), window=3):
        consumed += 1
    assert consumed == len(inputs)
    assert max(ahead) <= 3 + 1


def test_imap_stops_reading_when_left_early(pool: AcceleratorPool,
                                            inputs: list[np.ndarray]) -> None:
    taken = 0

    def source() -> Iterator[np.ndarray]:
        nonlocal taken
        for frame in inputs:
            taken += 1
            yield frame

    gen = pool.imap(source(), window=4)
    for i, _ in enumerate(gen):
        if i == 2:
            break
    gen.close()
    assert taken <= 3 + 4
    assert all(r["in_flight"] == 0 for r in pool.statistics()["replicas"])


def test_stream_affinity_keeps_a_stream_on_one_replica(pool: AcceleratorPool,
                                                       inputs: list[np.ndarray],
                                                       expected: list[np.ndarray]) -> None:
    for cam in ("cam-a", "cam-b", "cam-c", "cam-d"):
        before = frame_counts(pool)
        outs = list(pool.imap(inputs[:16], stream=cam))
        for got, want in zip(outs, expected[:16], strict=True):
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
        spread = [a - b for a, b in zip(frame_counts(pool), before, strict=True)]
        assert sorted(spread) == [0, 16], (cam, spread)
        assert pool.run(inputs[0], stream=cam) is not None
        assert [a - b for a, b in zip(frame_counts(pool), before, strict=True)] in (
            [spread[0] + 1, spread[1]] if spread[0] else [0, 17],
            [spread[0] + 1, spread[1]])


def test_a_bad_frame_raises_and_is_not_retried(pool: AcceleratorPool,
                                               inputs: list[np.ndarray]) -> None:
    stats = pool.statistics()
    with pytest.raises(mx.ShapeError, match=r"\(1, 3, 32, 32\)"):
        pool.run(np.zeros((1, 3, 32, 32), np.float32))
    with pytest.raises(mx.DtypeError):
        pool.run(np.zeros(SHAPE, np.float64))
    after = pool.statistics()
    assert after["resubmitted"] == stats["resubmitted"]
    assert [r["state"] for r in after["replicas"]] == ["live", "live"]
    assert [r["faults"] for r in after["replicas"]] == [r["faults"] for r in stats["replicas"]]
    # the pool keeps working
    assert pool.run(inputs[0]).shape == (1, 10)


def test_a_bad_frame_in_imap_raises_at_its_position(pool: AcceleratorPool,
                                                    inputs: list[np.ndarray],
                                                    expected: list[np.ndarray]) -> None:
    bad = [*inputs[:5], np.zeros((2, 2), np.float32), *inputs[5:10]]
    got = []
    with pytest.raises(mx.ShapeError):
        for out in pool.imap(bad):
            got.append(out)
    assert len(got) == 5
    for g, want in zip(got, expected[:5], strict=True):
        np.testing.assert_allclose(g, want, rtol=1e-5, atol=1e-6)
    assert all(r["in_flight"] == 0 for r in pool.statistics()["replicas"])


@pytest.mark.asyncio
async def test_arun_concurrent_callers_get_their_own_outputs(
        pool: AcceleratorPool, inputs: list[np.ndarray], expected: list[np.ndarray]) -> None:
    outs = await asyncio.gather(*(pool.arun(x) for x in inputs[:24]))
    for got, want in zip(outs, expected[:24], strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    batch = await pool.arun(inputs[:6])
    assert len(batch) == 6
    got = [out async for out in pool.aimap(inputs[:12], window=4)]
    for g, want in zip(got, expected[:12], strict=True):
        np.testing.assert_allclose(g, want, rtol=1e-5, atol=1e-6)
    got = [out async for out in pool.aimap(inputs[:13], chunk=4)]
    for g, want in zip(got, expected[:13], strict=True):
        np.testing.assert_allclose(g, want, rtol=1e-5, atol=1e-6)
    with pytest.raises(mx.ShapeError):
        async for _ in pool.aimap([inputs[0], np.zeros((2,), np.float32)], chunk=2):
            pass
    with pytest.raises(mx.ShapeError):
        await pool.arun(np.zeros((1, 3, 8, 8), np.float32))


@pytest.mark.asyncio
async def test_blocking_calls_on_a_loop_name_their_twins(pool: AcceleratorPool,
                                                         inputs: list[np.ndarray]) -> None:
    with pytest.raises(mx.LoopBlockingError, match="arun"):
        pool.run(inputs[0])
    with pytest.raises(mx.LoopBlockingError, match="aimap"):
        pool.imap(inputs)


def test_multi_input_model(ray_runtime: Any, add_dfp: mx.Dfp) -> None:
    a = np.ones(add_dfp.input_shapes[0], np.float32)
    b = np.full(add_dfp.input_shapes[1], 2, np.float32)
    with mx.SyncAccl(add_dfp) as accl:
        want = accl.run([a, b])
    with AcceleratorPool(add_dfp, replicas=1) as p:
        np.testing.assert_allclose(p.run([a, b]), want)
        batch = p.run([[a, b], [b, a]])
        assert len(batch) == 2
        np.testing.assert_allclose(batch[0], want)


def test_lifecycle_close_and_context_managers(ray_runtime: Any, identity_dfp: mx.Dfp) -> None:
    x = np.ones((1, 4), np.float32)
    with AcceleratorPool(identity_dfp, replicas=1) as p:
        np.testing.assert_array_equal(p.run(x), x)
        actors = p.actors
        assert len(actors) == 1
    assert p.closed
    with pytest.raises(mx.ClosedError):
        p.run(x)
    with pytest.raises(mx.ClosedError):
        list(p.imap([x]))
    p.close()   # idempotent
    # the actor is gone
    ray = ray_runtime
    with pytest.raises(ray.exceptions.RayActorError):
        ray.get(actors[0].ready.remote(), timeout=30)


@pytest.mark.asyncio
async def test_async_context_manager(ray_runtime: Any, identity_dfp: mx.Dfp) -> None:
    x = np.ones((1, 4), np.float32)
    async with AcceleratorPool(identity_dfp, replicas=1) as p:
        np.testing.assert_array_equal(await p.arun(x), x)
    assert p.closed
    with pytest.raises(mx.ClosedError):
        await p.arun(x)


def test_large_frames_go_through_the_object_store(ray_runtime: Any) -> None:
    """A 588 KiB frame is above Ray's inline limit: it travels through the object
    store (no pickled copy), and so do its outputs, which arrive read-only."""
    shape = (1, 3, 224, 224)
    dfp = mx.NeuralCompiler(models=testing.identity_model(shape)).run()
    x = np.random.default_rng(1).standard_normal(shape).astype(np.float32)
    with AcceleratorPool(dfp, replicas=1) as p:
        y = p.run(x)
        np.testing.assert_array_equal(y, x)
        assert not y.flags.writeable     # a view on the object store, not a copy
        outs = list(p.imap([x, x * 2], chunk=2))
        np.testing.assert_array_equal(outs[1], x * 2)
