"""Unit tests of the thread bridge (memryx/_core/threads.py): the one module that starts
threads and crosses between them."""

from __future__ import annotations

import asyncio
import contextvars
import threading
from typing import Any

import anyio
import pytest

from memryx._core.threads import (
    Runner,
    call_soon,
    loop_future,
    run_in_loop,
    run_sync,
    start_thread,
)


def test_start_thread_names_it_runs_it_and_makes_a_daemon() -> None:
    got: list[Any] = []
    t = start_thread("test-bridge-worker", lambda *a: got.append(a), 1, "two")
    t.join(10)
    assert t.name == "test-bridge-worker" and t.daemon
    assert got == [(1, "two")]


def test_start_thread_keeps_the_daemon_flag_it_is_given() -> None:
    flags: dict[str, bool] = {}

    def record(key: str) -> None:
        flags[key] = threading.current_thread().daemon

    start_thread("test-plain", record, "plain", daemon=False).join(10)
    # daemon=None inherits from the starting thread, as threading.Thread does
    start_thread("test-inherit-main", record, "from-main", daemon=None).join(10)

    def from_a_daemon() -> None:
        start_thread("test-inherit-daemon", record, "from-daemon", daemon=None).join(10)

    start_thread("test-daemon-parent", from_a_daemon).join(10)
    assert flags == {"plain": False, "from-main": False, "from-daemon": True}


def test_call_soon_on_a_closed_loop_raises_runtime_error() -> None:
    loop = asyncio.new_event_loop()
    loop.close()
    with pytest.raises(RuntimeError):
        call_soon(loop, print)


@pytest.mark.asyncio
async def test_call_soon_wakes_the_loop_from_another_thread() -> None:
    loop = asyncio.get_running_loop()
    woken = asyncio.Event()
    start_thread("test-waker", call_soon, loop, woken.set).join(10)
    await asyncio.wait_for(woken.wait(), 10)


@pytest.mark.asyncio
async def test_run_in_loop_and_loop_future_cross_to_a_runner_and_back() -> None:
    runner = Runner("test-bridge-runner")
    try:
        assert runner._loop is not None

        async def where() -> str:
            return threading.current_thread().name

        assert run_in_loop(runner._loop, where()).result(10).startswith("test-bridge-runner-")
        assert (await loop_future(run_in_loop(runner._loop, where()))).startswith(
            "test-bridge-runner-")
    finally:
        await run_sync(runner.close, abandon_on_cancel=False)


@pytest.mark.asyncio
@pytest.mark.parametrize("abandon", [True, False])
async def test_run_sync_cancelled_abandons_the_thread_or_waits_for_it(abandon: bool) -> None:
    release = threading.Event()
    entered = threading.Event()

    def blocking() -> None:
        entered.set()
        release.wait(10)

    async def timed_out() -> None:
        with anyio.move_on_after(0.05):
            await run_sync(blocking, abandon_on_cancel=abandon)

    task = asyncio.create_task(timed_out())
    try:
        assert await asyncio.to_thread(entered.wait, 10)
        if abandon:  # the cancellation returns at once, the thread goes on by itself
            await asyncio.wait_for(asyncio.shield(task), 10)
        else:  # the cancellation waits until the function has returned
            done, _ = await asyncio.wait([task], timeout=0.3)
            assert not done
    finally:
        release.set()
    await asyncio.wait_for(task, 10)


def test_ctrl_c_while_the_portal_hands_over_a_call_is_a_short_traceback(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """(regression) Ctrl-C landing while a blocking call was being handed to the runner's
    loop (inside anyio's portal, a frequent spot for a loop of small ``run`` calls) printed
    a traceback through anyio's internals; it now ends at the runtime's blocking call, as
    a Ctrl-C during the wait itself does."""
    runner = Runner("test-bridge-runner")
    try:
        def interrupted(*args: Any) -> Any:
            raise KeyboardInterrupt

        monkeypatch.setattr(runner._portal, "start_task_soon", interrupted)

        async def work() -> None:  # pragma: no cover - never handed over
            pass

        with pytest.raises(KeyboardInterrupt) as info:
            runner.call(work)
        assert info.value.__suppress_context__
        assert info.traceback[-1].name == "call"
        assert "interrupted" not in {entry.name for entry in info.traceback}
    finally:
        monkeypatch.undo()
        runner.close(10)


@pytest.mark.asyncio
async def test_run_sync_gives_back_results_and_every_exception_in_the_callers_context() -> None:
    var: contextvars.ContextVar[str] = contextvars.ContextVar("var")
    var.set("caller's")
    assert await run_sync(lambda a, b: (a + b, var.get()), 1, 2) == (3, "caller's")

    def raising(exc: BaseException) -> None:
        raise exc

    with pytest.raises(KeyError):
        await run_sync(raising, KeyError("k"))
    with pytest.raises(SystemExit):  # a BaseException reaches the caller too
        await run_sync(raising, SystemExit(3))
    with pytest.raises(RuntimeError, match="StopIteration"):  # a future cannot carry it
        await run_sync(raising, StopIteration())
    names = {await run_sync(lambda: threading.current_thread().name) for _ in range(3)}
    assert len(names) == 1, "an idle worker is reused"


@pytest.mark.asyncio
async def test_run_sync_not_abandoned_waits_for_the_function_on_a_plain_cancel() -> None:
    release = threading.Event()
    entered = threading.Event()

    def blocking() -> str:
        entered.set()
        release.wait(10)
        return "done"

    task = asyncio.create_task(run_sync(blocking, abandon_on_cancel=False))
    assert await asyncio.to_thread(entered.wait, 10)
    task.cancel()
    done, _ = await asyncio.wait([task], timeout=0.3)
    assert not done, "the cancellation did not wait for the function"
    release.set()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, 10)


def test_run_sync_workers_are_daemons_that_end_with_their_loop() -> None:
    """A worker left running a never-returning function keeps neither the loop's close
    nor the process waiting; an idle one ends as soon as its loop is closed."""
    release = threading.Event()
    seen: list[threading.Thread] = []

    async def main() -> None:
        await run_sync(lambda: seen.append(threading.current_thread()))
        with anyio.move_on_after(0.05):
            await run_sync(release.wait, 10)  # abandoned, still running

    try:
        with asyncio.Runner() as runner:
            runner.run(main())
        assert len(seen) == 1 and seen[0].daemon
        assert seen[0].is_alive()
    finally:
        release.set()
    seen[0].join(5)
    assert not seen[0].is_alive()
