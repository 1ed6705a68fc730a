"""pytest fixtures for testing applications built on memryx, without the chip.

Installed with the package as a ``pytest11`` entry point: pytest loads it, but
it only defines fixtures (no hooks, nothing autouse), so it changes no test
that does not ask for one. See ``docs/testing-your-app.md``.

* ``mx_test_dfp``: a compiled test model (a small MLP, ``x`` [1, 16] -> ``logits``
  [1, 10]); override it to test with your own model.
* ``mx_device``: the device ``mx_accl`` runs on: the simulated MX3 in ``fast``
  mode; override it with a :class:`memryx.faults.FaultyDevice` for a fault scenario.
* ``mx_accl``: an :class:`~memryx.AsyncAccl` on ``mx_test_dfp`` and ``mx_device``,
  bound to the test's running loop (async tests only, any pytest-asyncio loop
  scope, asyncio or uvloop), closed after the test.
* ``mx_server``: a real ``memryx serve`` child process on a Unix socket in the
  test's ``tmp_path`` (a :class:`ServerProcess`); ``.address`` to connect, ``.text()`` its
  log, ``.pause()`` / ``.resume()``
  (SIGSTOP / SIGCONT: a server that stops answering), ``.kill()``; stopped after the test.
* ``mx_camera``: a factory of synthetic cameras: ``mx_camera(fps=30, frames=90)``
  gives numbered, reproducible frames for ``mx_test_dfp``'s input at that rate.
* ``mx_leak_check``: the leak checks alone, for tests that make their own accelerators.
* ``mx_virtual_clock``: a :class:`memryx.clock.VirtualClock` for the test. A test that
  asks for it gets ``mx_device`` in ``timed`` mode on that clock (the MX3's modeled
  rate and latency, in virtual time), and ``mx_camera`` paces its frames by it: a
  run of minutes of camera time takes seconds, with the same timestamps every run.

The fixtures fail the test (at teardown) when the app leaked an accelerator
(created during the test and left open), a thread, or frames (accepted by
``mx_accl`` and neither delivered nor dropped when the test ended), or when a
scripted fault never fired.
"""

from __future__ import annotations

import asyncio
import inspect
import os
import re
import signal
import subprocess
import sys
import threading
import time
import warnings
import weakref
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from numpy.typing import NDArray

import memryx as mx

from . import _lifecycle
from ._core.threads import call_soon, start_thread
from ._exceptions import UsageError
from .clock import REAL_CLOCK, Clock, VirtualClock, clock_of
from .device.base import Device
from .faults import FaultNotReachedWarning

__all__ = ["LeakCheck", "ServerProcess", "SyntheticCamera"]

#: How long teardown waits for threads the test started to end (seconds).
THREAD_GRACE_S = 5.0


def _needs_async_test(request: pytest.FixtureRequest, name: str) -> None:
    fn = getattr(request.node, "function", None)
    if fn is None or not inspect.iscoroutinefunction(fn):
        pytest.fail(
            f"the {name} fixture needs an event loop: use it from an async test "
            f"('async def {getattr(request.node, 'name', 'test_...')}' marked "
            "@pytest.mark.asyncio, or asyncio_mode = auto), not from a sync test", pytrace=False)


def _is_open(accl: Any) -> bool:
    state = getattr(accl, "_state", None)
    return state is not None and getattr(state, "name", "") != "CLOSED"


#: Threads of an event loop's default executor ("asyncio_0", "uvloop_0", ...): they belong
#: to the loop (a module-scoped one outlives the test), which joins them when it closes.
_LOOP_EXECUTOR = re.compile(r"^(asyncio|uvloop)_\d+$")


class _Recording(weakref.WeakSet[Any]):
    """The accelerator registry while checks run: also keeps what is added, so that an
    accelerator the app dropped without closing is still seen (and closed) after the test.
    Installed by the first active check, removed by the last (checks may nest)."""

    def __init__(self, data: Any) -> None:
        self.added: list[Any] = []
        self.active = 0
        super().__init__()
        for item in data:
            super().add(item)

    def add(self, item: Any) -> None:
        super().add(item)
        if self.active:
            self.added.append(item)


_recording: _Recording | None = None
_previous: Any = None


def _begin() -> tuple[_Recording, int]:
    global _recording, _previous
    if _recording is None or _lifecycle._live is not _recording:
        _previous = _lifecycle._live
        _recording = _Recording(_previous)
        _lifecycle._live = _recording
    _recording.active += 1
    return _recording, len(_recording.added)


def _end(registry: _Recording, start: int) -> list[Any]:
    """The accelerators registered since ``start``; uninstalls after the last check."""
    global _recording
    found = registry.added[start:]
    registry.active = max(0, registry.active - 1)
    if not registry.active:
        registry.added.clear()
        if _lifecycle._live is registry:
            for a in registry:
                _previous.add(a)
            _lifecycle._live = _previous
        _recording = None
    return found


class LeakCheck:
    """Accelerators created and threads started during a test, to check after it."""

    def __init__(self) -> None:
        self.threads = set(threading.enumerate())
        self._registry, self._start = _begin()
        self._ended = False

    def leaked_accls(self) -> list[Any]:
        if self._ended:
            return []
        self._ended = True
        return [a for a in _end(self._registry, self._start) if _is_open(a)]

    def leaked_threads(self) -> list[threading.Thread]:
        deadline = time.monotonic() + THREAD_GRACE_S
        while True:
            extra = [t for t in threading.enumerate() if t not in self.threads and t.is_alive()
                     and not t.daemon and not _LOOP_EXECUTOR.match(t.name)]
            if not extra or time.monotonic() > deadline:
                return extra
            time.sleep(0.02)

    def problems(self, accls: list[Any]) -> list[str]:
        """What to report, once the leaked accelerators ``accls`` have been closed."""
        found = []
        if accls:
            found.append(f"{len(accls)} accelerator(s) created during the test were left open "
                         f"({', '.join(type(a).__name__ for a in accls)}): close them "
                         "(async with / aclose()); memryx closed them for you")
        threads = self.leaked_threads()
        if threads:
            found.append(f"thread(s) left running: {[t.name for t in threads]}")
        return found


@pytest.fixture
def mx_leak_check() -> Iterator[LeakCheck]:
    """Fail the test if it leaves accelerators open or threads running."""
    check = LeakCheck()
    yield check
    accls = check.leaked_accls()
    for accl in accls:
        accl.close()  # bound to a loop that is not running now, or to its own thread
    problems = check.problems(accls)
    if problems:
        pytest.fail("memryx leak check: " + "; ".join(problems), pytrace=False)


@pytest.fixture(scope="session")
def mx_test_dfp() -> mx.Dfp:
    """A compiled test model: a small MLP, ``x`` [1, 16] float32 -> ``logits`` [1, 10]."""
    from .testing import mlp_model

    return mx.NeuralCompiler(models=mlp_model()).run()


@pytest.fixture
def mx_virtual_clock() -> VirtualClock:
    """A virtual clock for this test: ``mx_device`` runs in ``timed`` mode on it and
    ``mx_camera`` paces by it (see :mod:`memryx.clock`)."""
    return VirtualClock()


def _test_clock(request: pytest.FixtureRequest) -> VirtualClock | None:
    if "mx_virtual_clock" not in request.fixturenames:
        return None
    clock = request.getfixturevalue("mx_virtual_clock")
    return clock if isinstance(clock, VirtualClock) else None


@pytest.fixture
def mx_device(request: pytest.FixtureRequest) -> Device:
    """The device ``mx_accl`` uses: the simulated MX3 in ``fast`` mode, or in ``timed``
    mode on ``mx_virtual_clock`` when the test uses that (override it)."""
    from .device.simulated import SimulatedDevice

    clock = _test_clock(request)
    if clock is not None:
        return SimulatedDevice(mode="timed", clock=clock)
    return SimulatedDevice(mode="fast")


try:
    import pytest_asyncio
except ImportError:  # pragma: no cover - the plugin loads without it; mx_accl says what to do
    pytest_asyncio = None  # type: ignore[assignment]


async def _mx_accl(request: pytest.FixtureRequest, mx_test_dfp: mx.Dfp,
                  mx_device: Device) -> AsyncIterator[mx.AsyncAccl]:
    """An AsyncAccl on ``mx_test_dfp`` and ``mx_device``, closed after the test."""
    _needs_async_test(request, "mx_accl")
    clock = _test_clock(request)
    if clock is not None and clock_of(mx_device) is not clock:
        pytest.fail(
            f"the test uses mx_virtual_clock but mx_device ({getattr(mx_device, 'name', '?')!r}, "
            f"{type(mx_device).__name__}) does not keep its time: only the in-process "
            "simulated device runs on a virtual clock (SimulatedDevice(clock=mx_virtual_clock),"
            " or a FaultyDevice wrapping one); a device server or an fd device keeps real "
            "time", pytrace=False)
    check = LeakCheck()
    accl = mx.AsyncAccl(mx_test_dfp, device=mx_device)
    try:
        yield accl
    finally:
        problems = []
        in_flight = 0
        if _is_open(accl):
            with warnings.catch_warnings(record=True):
                stats = accl.statistics()
            in_flight = sum(int(m.get("in_flight", 0)) for m in stats["models"])
            # frames a device fault lost are accounted for by the DeviceError the app saw
            faults = stats.get("device", {}).get("faults", {})
            in_flight = max(0, in_flight - int(faults.get("lost_frames", 0)))
        if in_flight:
            problems.append(
                f"{in_flight} frame(s) accepted by mx_accl were neither delivered nor dropped "
                "when the test ended (await the app's outputs, or close the accelerator to "
                "drop them)")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", FaultNotReachedWarning)
            await _close_on_its_loop(accl)
        problems += [f"scripted fault never fired: {w.message}" for w in caught
                     if issubclass(w.category, FaultNotReachedWarning)]
        leaked = [a for a in check.leaked_accls() if a is not accl]
        for other in leaked:
            await _close_on_its_loop(other)
        problems += check.problems(leaked)
        if problems:
            pytest.fail("memryx leak check: " + "; ".join(problems), pytrace=False)


if pytest_asyncio is not None:
    mx_accl = pytest_asyncio.fixture(_mx_accl, name="mx_accl")
else:  # pragma: no cover
    @pytest.fixture(name="mx_accl")
    def _no_asyncio() -> None:
        raise UsageError("the mx_accl fixture needs pytest-asyncio: pip install pytest-asyncio")


async def _close_on_its_loop(accl: Any) -> None:
    loop = getattr(accl, "_loop", None)
    running = asyncio.get_running_loop()
    if loop is None or loop is running or loop.is_closed():
        await accl.aclose()
        return
    # bound to another loop (a module-scoped loop that is idle now): close from a thread
    done = asyncio.Event()
    running_loop = asyncio.get_running_loop()

    def close() -> None:
        try:
            accl.close()
        finally:
            call_soon(running_loop, done.set)

    start_thread("mx_accl-close", close, daemon=None)
    await done.wait()


# -- device server -------------------------------------------------------------------------------
class ServerProcess:
    """A ``memryx serve`` child process (the ``mx_server`` fixture).

    Listens on the Unix socket ``directory/memryx.sock`` (``unix=False``: not at all, for
    a server reached only over ``--tcp``); extra ``args`` as on the command line; ``env``
    adds to the child's environment. Ready when the server has logged one ``listening on``
    line per listener it was asked for (its own readiness line, not a probing connection);
    ``wait=False`` returns at once, for a test of a server that cannot start.
    """

    def __init__(self, directory: Path, *args: str, start_timeout: float = 30.0,
                 unix: bool = True, env: Mapping[str, str] | None = None,
                 wait: bool = True) -> None:
        self.path = directory / "memryx.sock"
        # one log per server: a test may start several in one directory (a restart)
        self.log_path = directory / f"memryx-server-{time.monotonic_ns()}.log"
        self.tcp_port = 0
        self._tls = False
        cmd = [sys.executable, "-m", "memryx", "--log-level", "INFO", "serve",
               *(["--socket", str(self.path)] if unix else []), *args]
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                         env={**os.environ, **(env or {})})
        if not wait:
            return
        want = int(unix) + int("--tcp" in args)
        deadline = time.monotonic() + start_timeout
        while self.text().count("listening on") < want:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"memryx serve did not start: {self.text()}")
            time.sleep(0.02)
        found = re.search(r"listening on (tcps?)://\S+?:(\d+)", self.text())
        if found:
            self._tls, self.tcp_port = found.group(1) == "tcps", int(found.group(2))

    def text(self) -> str:
        """What the server has logged so far."""
        return self.log_path.read_text(errors="replace")

    def wait_for(self, text: str, seconds: float = 20.0) -> bool:
        """Whether the server logs ``text`` within ``seconds`` (returns as soon as it does)."""
        deadline = time.monotonic() + seconds
        while text not in self.text():
            if time.monotonic() > deadline:
                return False
            time.sleep(0.05)
        return True

    @property
    def address(self) -> str:
        """The ``device=`` string of this server: ``unix:/path/to/memryx.sock``."""
        return f"unix:{self.path}"

    @property
    def tcp(self) -> str:
        """The ``device=`` string of its TCP listener: ``tcp://127.0.0.1:PORT`` (or tcps)."""
        return f"{'tcps' if self._tls else 'tcp'}://127.0.0.1:{self.tcp_port}"

    def pause(self) -> None:
        """SIGSTOP: the server stops answering (its clients' deadlines fire)."""
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        """SIGCONT: the paused server answers again."""
        self.proc.send_signal(signal.SIGCONT)

    def kill(self) -> None:
        """SIGKILL: the server vanishes (its clients see DeviceError)."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)

    def stop(self) -> None:
        """SIGTERM (after SIGCONT, in case it is paused), then SIGKILL if it lingers."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:  # pragma: no cover - ignores SIGTERM
                self.kill()


@pytest.fixture
def mx_server(tmp_path: Path) -> Iterator[ServerProcess]:
    """A real ``memryx serve`` for this test, stopped after it."""
    server = ServerProcess(tmp_path)
    try:
        yield server
    finally:
        server.stop()


# -- synthetic camera ------------------------------------------------------------------------------
class SyntheticCamera:
    """Numbered, reproducible frames at ``fps`` (the ``mx_camera`` fixture).

    ``frame(i)`` is the same array for the same ``(i, seed)`` on every run: values
    from a generator seeded with ``(seed, i)``, with the frame number in its first
    element. ``async for i, frame in camera`` yields ``frames`` of them, paced
    at ``fps`` on the loop's clock (``fps=0``: as fast as taken); iterating again
    starts again at frame 0. ``read()`` is the SDK-style input callback: the next
    frame, or None after the last. ``clock``: a :class:`memryx.clock.VirtualClock` to
    pace by (``mx_camera`` passes ``mx_virtual_clock`` when the test uses it); frame
    ``i`` is then due at ``start + i / fps`` in virtual time.
    """

    def __init__(self, shape: tuple[int, ...], dtype: Any = np.float32, *, fps: float = 30.0,
                 frames: int = 30, seed: int = 0, clock: Clock | None = None) -> None:
        if isinstance(fps, bool) or not isinstance(fps, (int, float)) or \
                not 0 <= fps <= 1.7976931348623157e308:  # (an int beyond a float's range too)
            raise ValueError(f"fps must be a finite number >= 0, got {fps!r:.60}")
        if isinstance(frames, bool) or not isinstance(frames, int) or frames < 0:
            raise ValueError(f"frames must be an int >= 0, got {frames!r}")
        self.shape = tuple(shape)
        self.dtype = np.dtype(dtype)
        self.fps = float(fps)
        self.frames = frames
        self.seed = seed
        self.clock = clock
        self._next = 0

    def frame(self, index: int) -> NDArray[Any]:
        """Frame number ``index`` (reproducible)."""
        rng = np.random.default_rng((self.seed, index))
        arr = rng.uniform(-1.0, 1.0, self.shape).astype(self.dtype)
        arr.flat[0] = index
        return arr

    @staticmethod
    def number(frame: NDArray[Any]) -> int:
        """The frame number a frame (or an output that keeps it) carries in its first element."""
        return int(frame.flat[0])

    def read(self) -> NDArray[Any] | None:
        if self._next >= self.frames:
            return None
        self._next += 1
        return self.frame(self._next - 1)

    async def __aiter__(self) -> AsyncIterator[tuple[int, NDArray[Any]]]:
        clock = self.clock or REAL_CLOCK
        start = clock.now()
        for i in range(self.frames):
            if self.fps:
                delay = start + i / self.fps - clock.now()
                if delay > 0:
                    await clock.sleep(delay)
            yield i, self.frame(i)


@pytest.fixture
def mx_camera(request: pytest.FixtureRequest, mx_test_dfp: mx.Dfp
              ) -> Callable[..., SyntheticCamera]:
    """A factory: ``mx_camera(fps=30, frames=30, seed=0, shape=None, dtype=None)``; the shape
    and dtype default to ``mx_test_dfp``'s first input port; paced by ``mx_virtual_clock``
    when the test uses it."""
    port = mx_test_dfp.models[0].inputs[0]
    clock = _test_clock(request)

    def make(fps: float = 30.0, frames: int = 30, *, seed: int = 0,
             shape: tuple[int, ...] | None = None, dtype: Any = None) -> SyntheticCamera:
        return SyntheticCamera(shape if shape is not None else tuple(port.shape),
                               dtype if dtype is not None else port.dtype,
                               fps=fps, frames=frames, seed=seed, clock=clock)

    return make

