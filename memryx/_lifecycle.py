"""Process lifecycle: a process that uses memryx exits promptly, closed or not.

Three things can keep a process from ending, or end it badly, and this module
handles each:

* **Accelerators nobody closed.** Every accelerator registers itself here
  (weakly). Before the interpreter joins its threads at exit, a hook stops each
  one still open, with a bounded wait, so that threads blocked in ``receive()``
  or ``wait()`` are released and no runner outlives the program. The hook is
  registered with :func:`threading._register_atexit` (it runs before
  non-daemon threads are joined); :mod:`atexit` is the fallback.
* **Native code still running at exit.** onnxruntime runs release the GIL. A
  run still in progress when the interpreter finalizes is ended by the
  interpreter with a forced thread exit through C++ frames, which aborts the
  process ("terminate called without an active exception"). Every session the
  runtime creates goes through :class:`GuardedSession`, which counts runs in
  progress and can ask onnxruntime to terminate them; the exit hook does so and
  waits (bounded) until none is left.
* **``__del__``.** It never blocks: it only schedules the close on the
  accelerator's own loop (see ``Runner.close_soon``).
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import signal
import threading
import time
import weakref
from collections.abc import Iterator
from typing import Any, Protocol

__all__ = [
    "EXIT_TIMEOUT_S",
    "GuardedSession",
    "native_call",
    "register",
    "runs_in_progress",
    "terminate_runs",
    "wait_runs",
]

log = logging.getLogger("memryx.lifecycle")

#: The longest the exit hook waits for all accelerators to stop and native runs to end.
EXIT_TIMEOUT_S = 5.0


class _Closable(Protocol):
    def _close_at_exit(self, deadline: float) -> None: ...


_live: weakref.WeakSet[Any] = weakref.WeakSet()
_lock = threading.Lock()
_runs: set[Any] = set()  # the RunOptions of onnxruntime runs in progress
_idle = threading.Condition(_lock)
_exiting = False
_hooked = False


def register(accl: _Closable) -> None:
    """Track ``accl`` so that it is stopped at interpreter exit if still open."""
    _install_hook()
    _live.add(accl)


def _install_hook() -> None:
    global _hooked
    if _hooked:
        return
    _hooked = True
    register_early = getattr(threading, "_register_atexit", None)
    try:
        if register_early is None:  # pragma: no cover - CPython has had it since 3.9
            raise RuntimeError
        register_early(_at_exit)
    except RuntimeError:  # pragma: no cover - already shutting down, or not CPython
        atexit.register(_at_exit)


def _at_exit() -> None:
    """Stop every open accelerator, then end native runs; bounded by EXIT_TIMEOUT_S.

    Ctrl-C is ignored while it runs (a few milliseconds usually, EXIT_TIMEOUT_S at
    most): an interrupted hook would leave native runs going into finalization.
    """
    global _exiting
    _exiting = True
    previous = None
    with contextlib.suppress(ValueError, TypeError, OSError):  # not the main thread: skip
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        _stop_everything()
    finally:
        if previous is not None:
            with contextlib.suppress(ValueError, TypeError, OSError):
                signal.signal(signal.SIGINT, previous)


def _stop_everything() -> None:
    deadline = time.monotonic() + EXIT_TIMEOUT_S
    for accl in list(_live):
        try:
            accl._close_at_exit(deadline)
        except BaseException as exc:  # never let an exit hook raise
            log.debug("closing %r at exit failed: %r", accl, exc)
    terminate_runs()
    if not wait_runs(max(0.0, deadline - time.monotonic()) + 1.0):
        log.warning("onnxruntime runs still in progress at exit")
    _release_stuck_callbacks()


# -- threads stuck in user callbacks ------------------------------------------------------

_in_user_code: dict[threading.Thread, int] = {}


def enter_user_code(thread: threading.Thread) -> None:
    with _lock:
        _in_user_code[thread] = _in_user_code.get(thread, 0) + 1


def leave_user_code(thread: threading.Thread) -> None:
    with _lock:
        n = _in_user_code.get(thread, 0) - 1
        if n > 0:
            _in_user_code[thread] = n
        else:
            _in_user_code.pop(thread, None)


def _release_stuck_callbacks() -> None:
    """Let the interpreter exit without joining worker threads still inside a user
    callback (the accelerators are stopped: nobody waits for those callbacks).

    Worker threads of a sync program are daemon threads already; those of an
    async app's loop (onnxruntime and user callbacks run on its default worker
    threads) are not, and one blocked forever in user code would hold the
    process at exit. CPython joins non-daemon threads through their state locks
    in ``threading._shutdown_locks``; a stuck callback's thread is taken out of
    that set, which makes it behave as a daemon thread from here on.
    """
    with _lock:
        stuck = [t for t in _in_user_code if t.is_alive() and not t.daemon]
    locks = getattr(threading, "_shutdown_locks", None)
    guard = getattr(threading, "_shutdown_locks_lock", None)
    if not stuck or locks is None or guard is None:
        return
    with guard:
        for thread in stuck:
            tstate = getattr(thread, "_tstate_lock", None)
            if tstate is not None:
                locks.discard(tstate)
                log.debug("not waiting at exit for %s, stuck in a callback", thread.name)


def exiting() -> bool:
    """Whether the exit hook has started."""
    return _exiting


# -- onnxruntime runs -------------------------------------------------------------------


class _Native:
    """Marks native work in progress that cannot be interrupted (a session being built)."""


@contextlib.contextmanager
def native_call() -> Iterator[None]:
    """Count the native call in this block, so that the exit hook waits for it."""
    token = _Native()
    with _lock:
        if _exiting:
            raise RuntimeError("the process is exiting; no new onnxruntime work")
        _runs.add(token)
    try:
        yield
    finally:
        with _lock:
            _runs.discard(token)
            if not _runs:
                _idle.notify_all()


class GuardedSession:
    """An onnxruntime session whose runs can be terminated from another thread.

    Build it with :meth:`create` so that the exit hook also waits for a session
    still being built (native code, like a run).
    """

    def __init__(self, session: Any) -> None:
        self._session = session

    @classmethod
    def create(cls, *args: Any, **kwargs: Any) -> GuardedSession:
        import onnxruntime as ort

        with native_call():
            return cls(ort.InferenceSession(*args, **kwargs))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._session, name)

    def run(self, output_names: Any, feeds: Any, run_options: Any = None) -> Any:
        import onnxruntime as ort

        options = run_options if run_options is not None else ort.RunOptions()
        with _lock:
            if _exiting:
                raise RuntimeError("the process is exiting; no new onnxruntime runs")
            _runs.add(options)
        try:
            return self._session.run(output_names, feeds, options)
        finally:
            with _lock:
                _runs.discard(options)
                if not _runs:
                    _idle.notify_all()


def runs_in_progress() -> int:
    with _lock:
        return len(_runs)


def terminate_runs() -> None:
    """Ask every onnxruntime run in progress to stop (it raises in its own thread)."""
    with _lock:
        for options in _runs:
            if not isinstance(options, _Native):
                options.terminate = True


def wait_runs(timeout: float) -> bool:
    """Wait until no onnxruntime run is in progress; False if some still run."""
    end = time.monotonic() + timeout
    with _lock:
        while _runs:
            left = end - time.monotonic()
            if left <= 0:
                return False
            _idle.wait(left)
    return True
