"""Run user scripts in real child processes: exit, Ctrl-C, timing of both."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

#: How long a script may take to exit after it ended or got Ctrl-C (generous: catches hangs).
EXIT_BOUND_S = 20.0
#: Ctrl-C must end the script within this: generous, to catch hangs (typically 0.1-1.3 s
#: on the 2-core machine under load; the target is ~1 s).
SIGINT_BOUND_S = 10.0


@dataclass
class Result:
    rc: int
    out: str
    err: str
    #: seconds from the signal (or from the READY line) to the process's end
    exit_s: float

    def check_clean(self) -> None:
        """No abort, no native crash, no hang message."""
        assert "terminate called" not in self.err, self.err
        assert self.rc not in (-signal.SIGABRT, 134, -signal.SIGSEGV, 139), (self.rc, self.err)
        assert "Fatal Python error" not in self.err, self.err


def _restore_sigint() -> None:  # pragma: no cover - runs in the child
    # A child of a process that ignores SIGINT would inherit that; a user's shell does not.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


#: Written beside every script as ``scripthelp.py``: what a script waits on instead of
#: sleeping (``from scripthelp import ready_inside, inside, threads_ended``).
SCRIPT_HELP = '''
import faulthandler, re, tempfile, threading, time

def inside(name, thread=None):
    """Whether `thread` (the main one by default) is in memryx's function `name` now.
    The frames are read in one step by faulthandler (from C, holding the GIL): walking
    another thread's frames from Python can crash CPython 3.11 when it leaves one."""
    ident = (thread or threading.main_thread()).ident
    with tempfile.TemporaryFile("w+") as f:
        faulthandler.dump_traceback(f, all_threads=True)
        f.seek(0)
        text = f.read()
    mine = False
    for line in text.splitlines():
        header = re.match(r"^(?:Current thread|Thread) (0x[0-9a-f]+)", line)
        if header:
            mine = int(header.group(1), 16) == ident
        elif mine and re.match(r'^  File ".*memryx.*", line \\d+ in ' + re.escape(name) + "$",
                               line):
            return True
    return False

def wait_until(check, seconds=30.0):
    deadline = time.monotonic() + seconds
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError("the condition never came true")
        time.sleep(0.005)

def ready_inside(name, also=lambda: True):
    """Print READY (for the test to send Ctrl-C) once the main thread is inside memryx's
    `name` and `also()` holds."""
    def watch():
        wait_until(lambda: inside(name) and also())
        print("READY", flush=True)
    threading.Thread(target=watch, daemon=True).start()

def threads_ended(seconds=30.0):
    """Wait until no thread but this one (and daemons) is left."""
    me = threading.current_thread()
    wait_until(lambda: not [t for t in threading.enumerate()
                            if t is not me and not t.daemon and t.is_alive()], seconds)
'''


def run_script(tmp_path: Path, code: str, *, sigint_on: str | None = None,
               sigint_delay: float = 0.0, env: dict[str, str] | None = None,
               args: list[str] | None = None, timeout: float = 120.0) -> Result:
    """Run ``code`` as ``python script.py``; with ``sigint_on``, send SIGINT once
    the script prints a line containing that text (after ``sigint_delay`` s, where the
    moment is what a test varies; to wait for the script to be somewhere, it prints
    its line from there: see ``SCRIPT_HELP``)."""
    script = tmp_path / "script.py"
    script.write_text(textwrap.dedent(code))
    (tmp_path / "scripthelp.py").write_text(SCRIPT_HELP)
    child_env = {**os.environ, "MEMRYX_DEVICE": "sim", "PYTHONUNBUFFERED": "1"}
    child_env.update(env or {})
    cmd = [sys.executable, str(script)] if args is None else args
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=child_env,
                            cwd=tmp_path, text=True, preexec_fn=_restore_sigint)
    out_lines: list[str] = []
    start = time.monotonic()
    try:
        if sigint_on is not None:
            assert proc.stdout is not None
            deadline = time.monotonic() + timeout
            for line in proc.stdout:
                out_lines.append(line)
                if sigint_on in line:
                    break
                if time.monotonic() > deadline:
                    raise AssertionError(f"{sigint_on!r} never printed: {out_lines}")
            else:
                proc.wait(EXIT_BOUND_S)
                raise AssertionError(f"the script ended before {sigint_on!r}: "
                                     f"{''.join(out_lines)} {proc.stderr.read()}")  # type: ignore[union-attr]
            time.sleep(sigint_delay)
            start = time.monotonic()
            proc.send_signal(signal.SIGINT)
            out, err = proc.communicate(timeout=EXIT_BOUND_S)
        else:
            out, err = proc.communicate(timeout=timeout)
        ended_at = time.time()
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        raise AssertionError(f"the script hung; stdout={''.join(out_lines) + out!r} "
                             f"stderr={err!r}") from None
    finally:
        if proc.poll() is None:
            proc.kill()
        for pipe in (proc.stdout, proc.stderr):  # closed also when a check above failed
            if pipe is not None and not pipe.closed:
                pipe.close()
        proc.wait()
    elapsed = time.monotonic() - start
    text = "".join(out_lines) + out
    ended = [line for line in text.splitlines() if line.startswith("END ")]
    if sigint_on is None and ended:  # the script printed `END <time.time()>` as its last act
        elapsed = ended_at - float(ended[-1].split()[1])
    return Result(proc.returncode, text, err, elapsed)
