"""Shared test setup.

* Every async test runs twice: on the default asyncio loop and on uvloop
  (pytest-asyncio's loop-factory hook).
* A task error that reaches a loop's exception handler fails the test.
* Threads and file descriptors must be back to their baseline after each test.
* Compiled DFPs of the test models are built once per session.
"""

from __future__ import annotations

import asyncio
import contextlib
import faulthandler
import os
import re
import tempfile
import threading
import time
import weakref
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import numpy as np
import pytest

import memryx as mx
from memryx import _lifecycle, testing
from memryx.pytest_plugin import ServerProcess

try:
    import uvloop
except ImportError:  # pragma: no cover
    uvloop = None

_loop_errors: list[dict[str, Any]] = []


def _recording(factory: Callable[[], asyncio.AbstractEventLoop]
               ) -> Callable[[], asyncio.AbstractEventLoop]:
    def make() -> asyncio.AbstractEventLoop:
        loop = factory()
        loop.set_exception_handler(lambda _loop, ctx: _loop_errors.append(ctx))
        return loop

    return make


def pytest_asyncio_loop_factories(config: Any, item: Any
                                  ) -> Mapping[str, Callable[[], asyncio.AbstractEventLoop]]:
    factories = {"asyncio": _recording(asyncio.new_event_loop)}
    if uvloop is not None:
        factories["uvloop"] = _recording(uvloop.new_event_loop)
    return factories


def fds() -> set[int]:
    try:
        return {int(x) for x in os.listdir("/proc/self/fd")}
    except FileNotFoundError:  # pragma: no cover - not Linux
        return set()


def settle(check: Callable[[], bool], seconds: float = 5.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.02)
    return check()


def threads_ended(before: set[threading.Thread], seconds: float = 10.0) -> bool:
    """Whether every thread started since ``before = set(threading.enumerate())`` has ended
    within ``seconds``. Once they have, nothing they ran (a user's callback) can happen any
    more: what a test saw by then is final, without waiting a fixed time for it."""
    return settle(lambda: not [t for t in threading.enumerate()
                               if t not in before and t.is_alive()], seconds)


async def asettle(check: Callable[[], bool], seconds: float = 10.0) -> bool:
    """:func:`settle` for a coroutine: polls without blocking the loop."""
    deadline = time.monotonic() + seconds
    while not check():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.01)
    return True


_MEMRYX_DIR = os.path.dirname(mx.__file__) + os.sep
_TESTS_DIR = os.path.dirname(__file__) + os.sep


_THREAD_LINE = re.compile(r"^(?:Current thread|Thread) (0x[0-9a-f]+)")
_FRAME_LINE = re.compile(r'^  File "(.*)", line \d+ in (.*)$')


def stacks() -> dict[int, list[tuple[str, str]]]:
    """``(filename, function)`` of every thread's Python frames, most recent first,
    read in one step. faulthandler writes them from C while this thread holds the GIL,
    so no other thread runs meanwhile. Walking another thread's frames from Python
    (``sys._current_frames()`` then ``f_back``) lets that thread run between two steps,
    and on CPython 3.11 reading ``f_back`` of a frame it has just left can crash the
    interpreter (seen: a segfault in tests/reliability after a few thousand polls)."""
    with tempfile.TemporaryFile("w+") as f:
        faulthandler.dump_traceback(f, all_threads=True)
        f.seek(0)
        lines = f.read().splitlines()
    found: dict[int, list[tuple[str, str]]] = {}
    frames: list[tuple[str, str]] = []
    for line in lines:
        if header := _THREAD_LINE.match(line):
            frames = found.setdefault(int(header.group(1), 16), [])
        elif frame := _FRAME_LINE.match(line):
            frames.append((frame.group(1), frame.group(2)))
    return found


def stack(thread: threading.Thread) -> list[tuple[str, str]]:
    """``(filename, function)`` of ``thread``'s frames, most recent first (see
    :func:`stacks`); empty for a thread that has ended or runs no Python code."""
    return stacks().get(thread.ident or 0, [])


async def loop_turns(n: int = 20) -> None:
    """Let the running loop turn ``n`` times: tasks on it reach the await they block on, and
    callbacks scheduled in between run. In-loop only: nothing here waits for a thread."""
    for _ in range(n):
        await asyncio.sleep(0)


def in_memryx_call(name: str, thread: threading.Thread | None = None) -> bool:
    """Whether ``thread`` (the main thread by default) is inside memryx's function
    ``name`` right now: blocked in ``wait()``, ``receive()``, ``run()``..."""
    return any(function == name and filename.startswith(_MEMRYX_DIR)
               for filename, function in stack(thread or threading.main_thread()))


#: Worker threads an event loop owns (its default executor, anyio's pool, memryx's
#: ``run_sync`` pool): they outlive an accelerator closed on that loop, idle, until the
#: loop closes.
_LOOP_WORKERS = re.compile(r"^(asyncio_\d+|uvloop_\d+|AnyIO worker thread|memryx-worker-\d+)$")
#: The one frame of memryx on an idle ``run_sync`` worker's stack: its wait for a job.
_IDLE_WORKER_FRAME = (os.path.join(_MEMRYX_DIR, "_core", "threads.py"), "_serve")


async def quiescent(before: set[threading.Thread], seconds: float = 10.0) -> bool:
    """Whether, within ``seconds``, nothing is left on this loop that could still call a
    user's callback: no task but the caller's, no thread started since ``before`` except
    the loop's own idle workers (none with memryx or test code on its stack). The async
    twin of :func:`threads_ended`: what a test saw by then is final."""
    me = asyncio.current_task()

    def idle(thread: threading.Thread) -> bool:
        return bool(_LOOP_WORKERS.match(thread.name)) and not any(
            filename.startswith((_MEMRYX_DIR, _TESTS_DIR)) and frame != _IDLE_WORKER_FRAME
            for frame in stack(thread) for filename, _ in [frame])

    def check() -> bool:
        if any(task is not me and not task.done() for task in asyncio.all_tasks()):
            return False
        return all(t in before or not t.is_alive() or idle(t) for t in threading.enumerate())

    return await asettle(check, seconds)


@pytest.fixture(scope="session", autouse=True)
def _warm_up() -> None:
    """Let once-per-process resources (uvloop's global pipe, onnxruntime's
    environment) come into being before the per-test leak checks start."""
    dfp = mx.NeuralCompiler(models=testing.identity_model((1, 4))).run()
    with mx.SyncAccl(dfp) as accl:
        accl.run(np.zeros((1, 4), np.float32))
    for factory in pytest_asyncio_loop_factories(None, None).values():
        loop = factory()
        loop.run_until_complete(asyncio.sleep(0))
        loop.close()


def _open_accelerators(before: weakref.WeakSet[Any]) -> list[Any]:
    """Accelerators made since ``before`` and running, unclosed (the states in which one
    warns "unclosed" when collected). Weakly held: a dropped one that the garbage collector
    took is not counted; one that a failed test's traceback holds is."""
    return [a for a in list(_lifecycle._live) if a not in before
            and getattr(getattr(a, "_state", None), "name", "") in ("SYNC", "ASYNC")]


@pytest.fixture(autouse=True)
def no_leaks(_warm_up: None) -> Iterator[None]:
    """Fail a test that leaves accelerators open, threads, fds or loop-handler errors behind.

    An accelerator the test left open is closed here and named, so it cannot be collected
    (and warn "unclosed") in whichever later test happens to run the garbage collector."""
    accls_before: weakref.WeakSet[Any] = weakref.WeakSet(_lifecycle._live)
    threads_before = set(threading.enumerate())
    fds_before = fds()
    _loop_errors.clear()
    yield
    left = _open_accelerators(accls_before)
    for accl in left:
        with contextlib.suppress(Exception):  # what it raises was the test's to see
            accl.close()
    assert not left, f"accelerator(s) left open by the test: {[type(a).__name__ for a in left]}"
    assert not _loop_errors, f"errors reached the loop's exception handler: {_loop_errors}"

    def no_new_threads() -> bool:
        return not [t for t in threading.enumerate() if t not in threads_before and t.is_alive()]

    assert settle(no_new_threads), (
        f"threads left behind: {[t.name for t in threading.enumerate() if t not in threads_before]}"
    )
    assert settle(lambda: not (fds() - fds_before)), f"fds left open: {fds() - fds_before}"


# -- compiled models ------------------------------------------------------------------------
@pytest.fixture(scope="session")
def mobilenet() -> Any:
    return testing.mobilenet_like()


@pytest.fixture(scope="session")
def mobilenet_dfp(mobilenet: Any) -> mx.Dfp:
    return mx.NeuralCompiler(models=mobilenet).run()


@pytest.fixture(scope="session")
def mlp_dfp() -> mx.Dfp:
    return mx.NeuralCompiler(models=testing.mlp_model()).run()


@pytest.fixture(scope="session")
def add_dfp() -> mx.Dfp:
    """A two-input model."""
    return mx.NeuralCompiler(models=testing.add_model()).run()


@pytest.fixture(scope="session")
def split_dfp() -> mx.Dfp:
    """A two-output model."""
    return mx.NeuralCompiler(models=testing.split_model()).run()


@pytest.fixture(scope="session")
def three_model_dfp() -> mx.Dfp:
    """mlp (1 in / 1 out), add (2 in), split (2 out), as models 0, 1, 2."""
    return mx.NeuralCompiler(
        models=[testing.mlp_model(), testing.add_model(), testing.split_model()]).run()


@pytest.fixture(scope="session")
def identity_dfp() -> mx.Dfp:
    return mx.NeuralCompiler(models=testing.identity_model((1, 4))).run()


def reference(model: Any, *arrays: np.ndarray) -> list[np.ndarray]:
    """What onnxruntime itself computes for ``model`` on one frame."""
    import onnxruntime as ort

    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [i.name for i in sess.get_inputs()]
    return [np.asarray(o) for o in sess.run(None, dict(zip(names, arrays, strict=True)))]


def frames(n: int, shape: tuple[int, ...], seed: int = 0, dtype: Any = np.float32
           ) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(shape).astype(dtype) for _ in range(n)]


# -- device servers ---------------------------------------------------------------------------
@pytest.fixture(scope="session")
def shared_server(tmp_path_factory: Any) -> Iterator[ServerProcess]:
    """One device server for the whole session (the accelerator suite over fd)."""
    server = ServerProcess(tmp_path_factory.mktemp("server"))
    yield server
    server.stop()


@pytest.fixture
def server(tmp_path: Any) -> Iterator[ServerProcess]:
    """A device server of this test's own (for fault tests that kill it)."""
    srv = ServerProcess(tmp_path)
    yield srv
    srv.stop()
