"""Regression tests for the defects of issue 10, one (or more) per defect."""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import gc
import logging
import threading
import time
import tracemalloc
import warnings
import weakref
from typing import Any

import numpy as np
import pytest
import uvloop

import memryx as mx
from memryx import testing
from memryx._core.threads import run_sync
from memryx.device import SimulatedDevice
from tests.conftest import asettle, settle, threads_ended

X = np.zeros((1, 4), np.float32)


def ones(i: int) -> np.ndarray:
    return np.full((1, 4), i, np.float32)


# -- bounded error bookkeeping ---------------------------------------------------------------------
def test_timeouts_that_reach_the_caller_are_not_kept(identity_dfp):
    with mx.SyncAccl(identity_dfp) as accl:
        for _ in range(200):  # warm up allocations
            with pytest.raises(TimeoutError):
                accl.receive(timeout=0)
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            for _ in range(4000):
                with pytest.raises(TimeoutError):
                    accl.receive(timeout=0)
            gc.collect()
            grown = tracemalloc.get_traced_memory()[0] - before
        finally:
            tracemalloc.stop()
    assert grown < 1_000_000, f"{grown} bytes kept after 4000 timeouts"


# -- bind once under concurrency -------------------------------------------------------------------
class CountingDevice(SimulatedDevice):
    opened = 0

    async def open(self, dfp: mx.Dfp, group_id: int) -> None:
        type(self).opened += 1
        await asyncio.sleep(0.01)  # a slow open: the second arun arrives meanwhile
        await super().open(dfp, group_id)


@pytest.mark.asyncio
async def test_concurrent_aruns_on_a_fresh_accelerator_bind_it_once(identity_dfp):
    CountingDevice.opened = 0
    accl = mx.AsyncAccl(identity_dfp, device=CountingDevice(mode="fast"))
    a, b = await asyncio.gather(accl.arun([ones(1), ones(2)]), accl.arun(ones(3)))
    assert [int(o[0, 0]) for o in a] == [1, 2] and int(b[0, 0]) == 3
    assert CountingDevice.opened == 1
    await accl.aclose()


# -- cancellation neither loses nor duplicates frames ----------------------------------------------
@pytest.mark.asyncio
async def test_areceive_cancelled_by_a_timeout_loses_no_output(identity_dfp):
    n = 400
    async with mx.SyncAccl(identity_dfp) as accl:
        got: list[int] = []

        async def receiver() -> None:
            while len(got) < n:
                try:
                    async with asyncio.timeout(0.0005):
                        got.append(int((await accl.areceive())[0, 0]))
                except TimeoutError:
                    pass

        task = asyncio.create_task(receiver())
        for i in range(n):
            await accl.asend(ones(i))
        await asyncio.wait_for(task, 30)
    assert got == list(range(n))


@pytest.mark.asyncio
async def test_asend_that_times_out_was_not_sent(identity_dfp):
    async with mx.SyncAccl(identity_dfp) as accl:
        sent = 0
        while True:  # nobody receives: the pipeline fills, then asend waits
            try:
                await asyncio.wait_for(accl.asend(ones(sent)), 0.2)
            except TimeoutError:
                break
            sent += 1
            assert sent < 1000
        assert accl.statistics()["models"][0]["frames_in"] == sent
        got = [int((await accl.areceive(timeout=5000))[0, 0]) for _ in range(sent)]
        assert got == list(range(sent))
        with pytest.raises(TimeoutError):
            await accl.areceive(timeout=50)  # nothing more: the timed-out frame never went


# -- run() after pending sends ---------------------------------------------------------------------
def test_run_after_unreceived_sends_returns(identity_dfp):
    with mx.SyncAccl(identity_dfp) as accl:
        for i in range(20):
            accl.send(ones(i), timeout=5000)
        out = accl.run([ones(100 + i) for i in range(5)])
        assert [int(o[0, 0]) for o in out] == [100, 101, 102, 103, 104]
        assert [int(accl.receive(timeout=5000)[0, 0]) for _ in range(20)] == list(range(20))


# -- BaseException from callbacks ------------------------------------------------------------------
@pytest.mark.parametrize("exc_type", [KeyboardInterrupt, SystemExit])
def test_base_exception_from_a_sync_output_callback_is_reraised_as_itself(identity_dfp,
                                                                           exc_type):
    def output(y: Any) -> None:
        raise exc_type("from the callback")

    accl = mx.AsyncAccl(identity_dfp)
    accl.connect_input(lambda: X)
    accl.connect_output(output)
    with pytest.raises(exc_type, match="from the callback"):
        accl.wait()


def test_base_exception_from_a_sync_input_callback_is_reraised_as_itself(identity_dfp):
    def source() -> np.ndarray:
        raise KeyboardInterrupt("from the input")

    accl = mx.AsyncAccl(identity_dfp)
    accl.connect_input(source)
    accl.connect_output(lambda y: None)
    with pytest.raises(KeyboardInterrupt, match="from the input"):
        accl.wait()


@pytest.mark.asyncio
async def test_cancelled_error_raised_by_an_async_callback_is_reraised_as_itself(identity_dfp):
    async def output(y: Any) -> None:
        raise asyncio.CancelledError("from the callback")

    accl = mx.AsyncAccl(identity_dfp)
    async with accl:
        accl.connect_input(lambda: X)
        accl.connect_output(output)
        with pytest.raises(asyncio.CancelledError, match="from the callback"):
            await accl.await_done()


def test_cancelled_error_from_an_async_callback_in_a_sync_program(identity_dfp):
    n = 0

    async def source() -> np.ndarray:
        nonlocal n
        n += 1
        if n > 3:
            raise asyncio.CancelledError("from the input")
        return X

    accl = mx.AsyncAccl(identity_dfp)
    accl.connect_input(source)
    accl.connect_output(lambda y: None)
    with pytest.raises(asyncio.CancelledError, match="from the input"):
        accl.wait()


# -- partials and callable objects of coroutine functions ------------------------------------------
class AsyncSink:
    def __init__(self) -> None:
        self.got: list[int] = []

    async def __call__(self, y: np.ndarray) -> None:
        await asyncio.sleep(0)
        self.got.append(int(y[0, 0]))


def test_partial_and_callable_objects_of_async_functions_are_awaited(identity_dfp):
    got: list[int] = []

    async def output(dest: list[int], y: np.ndarray) -> None:
        await asyncio.sleep(0)
        dest.append(int(y[0, 0]))

    for callback, dest in ((functools.partial(output, got), got),
                           (obj := AsyncSink(), obj.got)):
        items = iter(range(30))
        accl = mx.AsyncAccl(identity_dfp)
        accl.connect_input(lambda it=items: (ones(next(it, -1)) if True else None))
        accl.connect_output(callback)
        # the source never ends on its own: stop after 30 outputs arrived
        assert settle(lambda dest=dest: len(dest) >= 30, 10), dest
        accl.stop()
        assert dest[:30] == list(range(30))
        dest.clear()


def test_a_sync_callback_returning_a_coroutine_is_an_error_not_a_silent_loss(identity_dfp):
    async def output(y: np.ndarray) -> None:  # pragma: no cover - never awaited
        pass

    frames = iter([X, X])
    accl = mx.AsyncAccl(identity_dfp)
    accl.connect_input(lambda: next(frames, None))
    accl.connect_output(lambda y: output(y))  # a lambda hides the coroutine function
    with pytest.raises(mx.UsageError, match="awaitable"):
        accl.wait()


# -- StopIteration in an async input callback ------------------------------------------------------
def test_stop_iteration_ends_an_async_input_stream(identity_dfp):
    frames = iter([ones(i) for i in range(5)])
    got: list[int] = []

    async def source() -> np.ndarray:
        return next(frames)  # raises StopIteration at the end, as the docs allow

    accl = mx.AsyncAccl(identity_dfp)
    accl.connect_input(source)
    accl.connect_output(lambda y: got.append(int(y[0, 0])))
    accl.wait()
    assert got == list(range(5))


# -- modeled figures validated at load -------------------------------------------------------------
@pytest.mark.parametrize("perf", [
    {"fps": 0, "latency_ms": 1.0}, {"fps": -5.0, "latency_ms": 1.0},
    {"fps": float("nan"), "latency_ms": 1.0}, {"fps": 1e-12, "latency_ms": 1.0},
    {"fps": "fast", "latency_ms": 1.0}, {"fps": 100.0, "latency_ms": float("inf")},
    {"fps": 100.0, "latency_ms": -1.0},
])
def test_bad_modeled_figures_are_refused_at_load(identity_dfp, perf):
    bad = mx.Dfp(identity_dfp.to_bytes())
    bad._models = tuple(dataclasses.replace(m, perf=perf) for m in bad.models)
    with pytest.raises(mx.DfpError, match="modeled"):
        mx.Dfp(bad.to_bytes())


def test_absurd_modeled_latency_is_bounded_by_the_frame_budget():
    dfp = mx.NeuralCompiler(models=testing.identity_model((1, 4)), fps=100000,
                            latency_ms=1000).run()
    with mx.SyncAccl(dfp) as accl:
        budget = accl.statistics()["models"][0]["frame_budget"]
        assert budget <= 256
        out = accl.run([ones(i) for i in range(3)])
        assert [int(o[0, 0]) for o in out] == [0, 1, 2]


# -- accelerators whose loop ended -----------------------------------------------------------------
def test_close_after_the_loop_ended_is_quiet(identity_dfp, caplog):
    caplog.set_level(logging.ERROR, logger="asyncio")

    async def main() -> mx.AsyncAccl:
        accl = mx.AsyncAccl(identity_dfp)
        await accl.arun(X)
        return accl

    accl = asyncio.run(main())
    t0 = time.monotonic()
    accl.close()
    assert time.monotonic() - t0 < 2
    assert not [r for r in caplog.records if "destroyed" in r.getMessage()]


def test_a_collected_accelerator_of_an_ended_loop_is_quiet(identity_dfp, caplog):
    caplog.set_level(logging.ERROR, logger="asyncio")
    before = set(threading.enumerate())
    made: list[weakref.ref[mx.AsyncAccl]] = []

    async def main() -> None:
        accl = mx.AsyncAccl(identity_dfp)
        made.append(weakref.ref(accl))
        await accl.__aenter__()  # bound, never closed
        flowing = threading.Event()
        accl.connect_output(lambda y: flowing.set())
        accl.connect_input(lambda: X)  # an endless source on a thread of its own
        assert await asettle(flowing.is_set)  # the loop ends while frames flow

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)  # unclosed: it says so, rightly
        loop = asyncio.new_event_loop()
        try:
            loop.run_until_complete(main())
        finally:
            loop.close()
        # collected here, inside the filter: its threads end (one may hold it a moment
        # longer), then the collector takes it. Collected later, it would warn "unclosed
        # AsyncAccl" in whichever test ran next
        assert threads_ended(before), "its threads did not end once the loop was gone"
        gc.collect()
        assert made[0]() is None, "the dropped accelerator was not collected"
    assert not [r for r in caplog.records if "destroyed but it is pending" in r.getMessage()]


@pytest.mark.parametrize("loop_kind", ["asyncio", "uvloop"])
def test_a_worker_thread_started_as_the_loop_ends_ends_with_the_loop(loop_kind, caplog):
    """(regression) ``run_sync`` used anyio's worker threads, each bound to a "root task":
    a call made in the loop's last turn, after ``run_until_complete``'s coroutine was done
    (a device's compute task, frames still flowing), started a thread bound to the
    calling task instead, which never ended once the loop closed with it pending; being
    non-daemon, it also held the interpreter's exit. Seen once in a full run as "AnyIO
    worker thread" left behind. The coroutine ends a few turns after the call, for each
    of the turns that used to leak, on both loops."""
    caplog.set_level(logging.CRITICAL, logger="asyncio")  # the late task is left pending
    new_loop = uvloop.new_event_loop if loop_kind == "uvloop" else asyncio.new_event_loop
    for turns in range(8):
        before = set(threading.enumerate())

        async def late() -> None:
            await run_sync(time.sleep, 0)

        async def main(turns: int = turns) -> None:
            asyncio.get_running_loop().create_task(late())
            for _ in range(turns):
                await asyncio.sleep(0)

        loop = new_loop()
        try:
            loop.run_until_complete(main())
        finally:
            loop.close()
        assert threads_ended(before, 3), f"a worker outlived the loop ({turns} turns)"
        del loop
        gc.collect()


# -- Dfp.write with concurrent writers -------------------------------------------------------------
def test_concurrent_writers_never_expose_a_torn_dfp(tmp_path, identity_dfp, mlp_dfp):
    path = tmp_path / "model.dfp"
    identity_dfp.write(path)
    stop = threading.Event()
    errors: list[BaseException] = []

    def writer(dfp: mx.Dfp) -> None:
        try:
            while not stop.is_set():
                dfp.write(path)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(d,))
               for d in (identity_dfp, mlp_dfp, identity_dfp, mlp_dfp)]
    for t in threads:
        t.start()
    try:
        names = set()
        for _ in range(200):
            names.add(mx.Dfp(path).models[0].name)  # always a whole file
    finally:
        stop.set()
        for t in threads:
            t.join(10)
    assert not errors
    assert names <= {identity_dfp.models[0].name, mlp_dfp.models[0].name}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.dfp"]  # no temp files left
