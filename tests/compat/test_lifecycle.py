"""A process using memryx ends promptly, closed or not, and Ctrl-C is a clean interrupt.

Every test runs a user's script in a real child process.
"""

from __future__ import annotations

import signal
import textwrap
from pathlib import Path

import pytest

from .scripts import EXIT_BOUND_S, SIGINT_BOUND_S, run_script

pytestmark = pytest.mark.timeout(240)

INTERRUPTED = (-signal.SIGINT, 130)


def _feeding(heavy_dfp: Path) -> str:
    """A script's start: an AsyncAccl feeding ``heavy_dfp`` in sim:fast from callbacks; it
    prints READY at its first output (``n[0]`` counts them)."""
    return textwrap.dedent(f"""
        import numpy as np
        from memryx import AsyncAccl
        accl = AsyncAccl({str(heavy_dfp)!r}, device="sim:fast")
        x = np.ones(accl.dfp.input_shapes[0], np.float32)
        n = [0]
        def out(*o):
            n[0] += 1
            if n[0] == 1:
                print("READY", flush=True)
        accl.connect_input(lambda: x)
        accl.connect_output(out)
    """)


def _exited(res) -> None:  # type: ignore[no-untyped-def]
    """The script ended by itself, cleanly and well within the exit bound."""
    res.check_clean()
    assert res.rc == 0, res.err
    assert res.exit_s < EXIT_BOUND_S / 2


def test_never_closed_sync_run_exits(tmp_path: Path) -> None:
    """The vendor's validation-script pattern: run, print, never close."""
    res = run_script(tmp_path, """
        import time
        import numpy as np
        from memryx import NeuralCompiler, SyncAccl, testing
        accl = SyncAccl(NeuralCompiler(models=testing.mobilenet_like()).run())
        print(accl.run(np.zeros(accl.dfp.input_shapes[0], np.float32)).shape)
        print("END", time.time())
    """)
    res.check_clean()
    assert res.rc == 0, res.err
    assert "(1, 10)" in res.out
    assert res.exit_s < EXIT_BOUND_S / 2


def test_never_closed_with_callbacks_running(tmp_path: Path, heavy_dfp: Path) -> None:
    """The script ends while callbacks feed a heavy model and frames are in flight."""
    res = run_script(tmp_path, f"""
        import threading, time
        import numpy as np
        from memryx import AsyncAccl
        accl = AsyncAccl({str(heavy_dfp)!r}, device="sim:fast")
        x = np.ones(accl.dfp.input_shapes[0], np.float32)
        got = threading.Event()
        accl.connect_input(lambda: x)
        accl.connect_output(lambda *o: got.set())
        got.wait(60)
        print("END", time.time())
    """)
    _exited(res)


def test_exception_before_close_exits(tmp_path: Path, light_dfp: Path) -> None:
    res = run_script(tmp_path, f"""
        import time
        import numpy as np
        from memryx import SyncAccl
        accl = SyncAccl({str(light_dfp)!r})
        for _ in range(8):
            accl.send(np.zeros(accl.dfp.input_shapes[0], np.float32))
        print("END", time.time())
        raise ValueError("the user's own bug")
    """)
    res.check_clean()
    assert res.rc == 1 and "the user's own bug" in res.err
    assert res.exit_s < EXIT_BOUND_S / 2


def test_thread_blocked_in_receive_does_not_hold_exit(tmp_path: Path, light_dfp: Path) -> None:
    """A non-daemon thread blocked in receive() is released when the program ends."""
    res = run_script(tmp_path, f"""
        import threading, time
        from memryx import SyncAccl
        accl = SyncAccl({str(light_dfp)!r})
        def reader():
            try:
                accl.receive()
            except Exception as exc:
                print("reader ended:", type(exc).__name__, flush=True)
        from scripthelp import inside, wait_until
        t = threading.Thread(target=reader)
        t.start()
        wait_until(lambda: inside("receive", t))  # the reader blocks in receive()
        print("END", time.time())
    """)
    res.check_clean()
    assert res.rc == 0, res.err
    assert "reader ended: ClosedError" in res.out
    assert res.exit_s < EXIT_BOUND_S / 2


def test_blocked_callback_does_not_hold_exit(tmp_path: Path, light_dfp: Path) -> None:
    res = run_script(tmp_path, f"""
        import threading, time
        from memryx import AsyncAccl
        accl = AsyncAccl({str(light_dfp)!r})
        entered = threading.Event()
        def stuck():
            entered.set()
            time.sleep(3600)  # stuck for good: the behaviour under test
        accl.connect_input(stuck)
        accl.connect_output(lambda *o: None)
        assert entered.wait(30)
        print("END", time.time())
    """)
    _exited(res)


def test_dropped_reference_does_not_block(tmp_path: Path, light_dfp: Path) -> None:
    """`__del__` of a running accelerator returns at once; the close happens on its loop."""
    res = run_script(tmp_path, f"""
        import gc, threading, time
        import numpy as np
        from memryx import AsyncAccl, SyncAccl
        for _ in range(3):
            accl = AsyncAccl({str(light_dfp)!r})
            x = np.zeros(accl.dfp.input_shapes[0], np.float32)
            flowing = threading.Event()
            accl.connect_input(lambda: x)
            accl.connect_output(lambda *o: flowing.set())
            assert flowing.wait(30)  # dropped while frames flow
            t0 = time.monotonic()
            del accl
            gc.collect()
            print("del took", round(time.monotonic() - t0, 3))
        s = SyncAccl({str(light_dfp)!r}); s.run(x); del s; gc.collect()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and any(
                t.name.startswith("memryx-runner") for t in threading.enumerate()):
            time.sleep(0.05)
        print("runners left", [t.name for t in threading.enumerate()
                                if t.name.startswith("memryx-runner")])
        print("END", time.time())
    """)
    res.check_clean()
    assert res.rc == 0, res.err
    took = [float(line.split()[-1]) for line in res.out.splitlines() if line.startswith("del")]
    assert len(took) == 3 and max(took) < 0.5, res.out
    assert "runners left []" in res.out


# -- Ctrl-C -----------------------------------------------------------------------------------

def _cli_interrupted(res, message: str) -> None:  # type: ignore[no-untyped-def]
    """A command interrupted by Ctrl-C: exit status 130 and ``message``, no traceback."""
    res.check_clean()
    assert res.rc == 130, (res.rc, res.err)
    assert "Traceback" not in res.err and message in res.err
    assert res.exit_s < SIGINT_BOUND_S


def _interrupted(res, where: str) -> None:  # type: ignore[no-untyped-def]
    res.check_clean()
    assert res.rc in INTERRUPTED, (res.rc, res.err)
    assert "KeyboardInterrupt" in res.err
    assert where in res.err, res.err
    assert res.exit_s < SIGINT_BOUND_S, res.exit_s


@pytest.mark.parametrize("delay", [0.0, 0.35])
def test_sigint_in_wait_heavy_model(tmp_path: Path, heavy_dfp: Path, delay: float) -> None:
    """Ctrl-C during wait() on a ResNet-50 in sim:fast: KeyboardInterrupt, no abort."""
    res = run_script(tmp_path, _feeding(heavy_dfp) + "accl.wait()\n",
                     sigint_on="READY", sigint_delay=delay)  # the moment of Ctrl-C: what varies
    _interrupted(res, "accl.wait()")


def test_sigint_caught_stops_the_pipeline(tmp_path: Path, heavy_dfp: Path) -> None:
    """A script that catches the KeyboardInterrupt goes on; the pipeline has stopped."""
    res = run_script(tmp_path, _feeding(heavy_dfp) + textwrap.dedent("""
        from scripthelp import threads_ended
        try:
            accl.wait()
        except KeyboardInterrupt:
            seen = n[0]
            threads_ended()  # then no output can come any more: the count is final
            print("interrupted; outputs after:", n[0] - seen, "closed:",
                  accl._state.value, flush=True)
    """), sigint_on="READY")
    res.check_clean()
    assert res.rc == 0, res.err
    assert "interrupted; outputs after: 0 closed: closed" in res.out


def test_sigint_in_sync_run(tmp_path: Path, heavy_dfp: Path) -> None:
    res = run_script(tmp_path, f"""
        import numpy as np
        from memryx import SyncAccl
        from scripthelp import ready_inside
        accl = SyncAccl({str(heavy_dfp)!r}, device="sim:fast")
        x = np.ones(accl.dfp.input_shapes[0], np.float32)
        done = [0]
        def post(y):
            done[0] += 1
            return y
        accl.set_postprocessing_model(post)
        accl.run(x)
        ready_inside("run", lambda: done[0] > 2)  # in a batch, frames done
        while True:
            accl.run([x] * 64)
    """, sigint_on="READY")
    _interrupted(res, "accl.run(")


def test_sigint_in_receive(tmp_path: Path, light_dfp: Path) -> None:
    res = run_script(tmp_path, f"""
        from memryx import SyncAccl
        from scripthelp import ready_inside
        accl = SyncAccl({str(light_dfp)!r})
        ready_inside("receive")
        accl.receive()  # nothing sent: blocks until Ctrl-C
    """, sigint_on="READY")
    _interrupted(res, "accl.receive()")


def test_sigint_in_arun(tmp_path: Path, heavy_dfp: Path) -> None:
    res = run_script(tmp_path, f"""
        import asyncio
        import numpy as np
        from memryx import AsyncAccl

        async def main():
            async with AsyncAccl({str(heavy_dfp)!r}, device="sim:fast") as accl:
                x = np.ones(accl.dfp.input_shapes[0], np.float32)
                done = [0]
                def post(y):
                    done[0] += 1
                    if done[0] == 3:  # a batch is in progress: Ctrl-C now
                        print("READY", flush=True)
                    return y
                accl.set_postprocessing_model(post)
                await accl.arun(x)
                while True:
                    await accl.arun([x] * 64)

        asyncio.run(main())
    """, sigint_on="READY")
    _interrupted(res, "asyncio.run(main())")


def test_sigint_in_bench(tmp_path: Path, heavy_dfp: Path) -> None:
    """`memryx bench`: a one-line message and exit status 130, no traceback."""
    import sys

    res = run_script(tmp_path, f"""
        import sys
        from memryx.cli import main
        from scripthelp import ready_inside
        ready_inside("wait")  # frames flow: the bench waits for its run to end
        sys.exit(main(["bench", {str(heavy_dfp)!r}, "--mode", "fast", "--frames", "100000",
                       "-q"]))
    """, sigint_on="READY")
    _cli_interrupted(res, "interrupted")
    del sys


def test_async_app_with_a_stuck_callback_exits(tmp_path: Path, light_dfp: Path) -> None:
    """An asyncio app whose sync callback never returns: the loop's worker thread
    (not a daemon) must not hold the process at exit."""
    res = run_script(tmp_path, f"""
        import asyncio, time
        from memryx import AsyncAccl

        async def main():
            async with AsyncAccl({str(light_dfp)!r}) as accl:
                entered = asyncio.Event()
                loop = asyncio.get_running_loop()
                def stuck():
                    loop.call_soon_threadsafe(entered.set)
                    time.sleep(3600)  # stuck for good: the behaviour under test
                accl.connect_input(stuck)
                accl.connect_output(lambda *o: None)
                await entered.wait()
            # and one never closed, bound to the loop that is about to end
            accl2 = AsyncAccl({str(light_dfp)!r})
            await accl2.arun(__import__("numpy").zeros((1, 3, 64, 64), "float32"))

        asyncio.run(main())
        print("END", time.time())
    """)
    _exited(res)


def test_sigint_in_blocked_send(tmp_path: Path, light_dfp: Path) -> None:
    res = run_script(tmp_path, f"""
        import numpy as np
        from memryx import SyncAccl
        from scripthelp import ready_inside
        accl = SyncAccl({str(light_dfp)!r})
        x = np.zeros(accl.dfp.input_shapes[0], np.float32)
        sent = [0]
        def blocked():  # in send(), its frame not taken, all before it computed and waiting
            model = accl.statistics()["models"][0]
            return (sent[0] > model["frame_budget"] and model["in_flight"] == 0
                    and model["frames_in"] == model["frames_out"] == sent[0])
        ready_inside("send", blocked)
        while True:
            accl.send(x)  # nobody receives: send blocks once the buffers are full
            sent[0] += 1
    """, sigint_on="READY")
    _interrupted(res, "accl.send(x)")


@pytest.mark.parametrize("gap", [0.0, 0.01, 0.03])
def test_sigint_twice(tmp_path: Path, heavy_dfp: Path, gap: float) -> None:
    """A second Ctrl-C while the first one is stopping the pipeline (or while the exit
    hook runs) still ends cleanly: no abort, no hang."""
    import signal as sig
    import subprocess
    import sys
    import time

    script = tmp_path / "script.py"
    script.write_text(_feeding(heavy_dfp) + "accl.wait()\n")
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: sig.signal(sig.SIGINT, sig.SIG_DFL))
    try:
        assert proc.stdout is not None
        assert "READY" in proc.stdout.readline()
        proc.send_signal(sig.SIGINT)
        time.sleep(gap)  # the gap between the two Ctrl-Cs: what varies
        if proc.poll() is None:
            proc.send_signal(sig.SIGINT)
        _, err = proc.communicate(timeout=EXIT_BOUND_S)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()  # reap it and close the pipes, also after a failure
    assert "terminate called" not in err and proc.returncode in INTERRUPTED, (proc.returncode,
                                                                               err)


def test_sigint_in_mx_bench(tmp_path: Path, heavy_dfp: Path) -> None:
    res = run_script(tmp_path, f"""
        import sys
        from memryx._tools import mx_bench
        from scripthelp import ready_inside
        ready_inside("run")  # frames flow: the benchmark runs its batch
        sys.exit(mx_bench(["-d", {str(heavy_dfp)!r}, "-f", "100000"]))
    """, sigint_on="READY")
    _cli_interrupted(res, "mx_bench: interrupted")


def test_new_accelerator_per_iteration_never_closed(tmp_path: Path, light_dfp: Path) -> None:
    """A validation loop that makes a new SyncAccl each time and never closes any:
    dropped ones stop on their own (threads do not pile up) and the script exits."""
    res = run_script(tmp_path, f"""
        import threading, time
        import numpy as np
        from memryx import SyncAccl
        x = np.zeros((1, 3, 64, 64), np.float32)
        peak = 0
        for i in range(20):
            accl = SyncAccl({str(light_dfp)!r})
            accl.run(x)
            peak = max(peak, threading.active_count())
        print("peak threads", peak, flush=True)
        print("END", time.time())
    """)
    res.check_clean()
    assert res.rc == 0, res.err
    peak = int(res.out.split("peak threads")[1].split()[0])
    assert peak <= 8, res.out  # one runner (and its workers) at a time, not twenty
    assert res.exit_s < EXIT_BOUND_S / 2
