"""Moved: the runner thread and every other thread hop live in :mod:`memryx._core.threads`.

Kept so that ``from .runner import ...`` still works in modules other work is under
way in; new code imports from :mod:`.threads`.
"""

from __future__ import annotations

from .threads import (
    HAVE_UVLOOP,
    Runner,
    await_future,
    call_in_loop,
    check_not_on_loop,
    in_user_code,
    loop_running,
    on_loop_thread,
    run_sync,
    user_code,
    wait_interruptibly,
)

__all__ = ["HAVE_UVLOOP", "Runner", "await_future", "call_in_loop", "check_not_on_loop",
           "in_user_code", "loop_running", "on_loop_thread", "run_sync", "user_code",
           "wait_interruptibly"]
