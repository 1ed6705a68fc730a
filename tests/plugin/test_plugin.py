"""The pytest plugin, as a user meets it: their test files, run in-process by pytester,
on asyncio and uvloop (the user's conftest asks pytest-asyncio for both loops)."""

from __future__ import annotations

import pytest

INI = """
[pytest]
asyncio_mode = strict
asyncio_default_fixture_loop_scope = function
filterwarnings = error
timeout = 60
"""

CONFTEST = """
import asyncio
import uvloop

def pytest_asyncio_loop_factories(config, item):
    return {"asyncio": asyncio.new_event_loop, "uvloop": uvloop.new_event_loop}
"""

#: A small app: reads frames from a camera, classifies them, keeps the results; on a device
#: fault it is meant to stop cleanly and report how far it got.
APP = """
import asyncio
import memryx as mx

class Classifier:
    def __init__(self, accl):
        self.accl = accl
        self.results = []
        self.error = None

    async def run(self, camera):
        try:
            async for i, frame in camera:
                logits = await self.accl.arun(frame)
                self.results.append((i, int(logits.argmax())))
        except mx.DeviceError as exc:
            self.error = exc
        return len(self.results)
"""


@pytest.fixture
def user_project(pytester: pytest.Pytester) -> pytest.Pytester:
    pytester.makeini(INI)
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(app=APP)
    return pytester


def test_the_fixtures_work_on_asyncio_and_uvloop(user_project: pytest.Pytester) -> None:
    user_project.makepyfile(test_app="""
import numpy as np
import pytest
from app import Classifier

@pytest.mark.asyncio
async def test_keeps_up(mx_accl, mx_camera):
    app = Classifier(mx_accl)
    assert await app.run(mx_camera(fps=200, frames=20)) == 20
    assert [i for i, _ in app.results] == list(range(20))
    assert mx_accl.statistics()["models"][0]["frames_out"] == 20

@pytest.mark.asyncio(loop_scope="module")
async def test_module_loop(mx_accl):
    assert (await mx_accl.arun(np.zeros((1, 16), np.float32))).shape == (1, 10)

@pytest.mark.asyncio(loop_scope="module")
async def test_module_loop_again(mx_accl):
    assert (await mx_accl.arun(np.zeros((1, 16), np.float32))).shape == (1, 10)

def test_camera_is_reproducible(mx_camera):
    a, b = mx_camera(fps=0, frames=3, seed=5), mx_camera(fps=0, frames=3, seed=5)
    assert all((a.frame(i) == b.frame(i)).all() and a.number(a.frame(i)) == i for i in range(3))
    assert [a.read() is not None for _ in range(4)] == [True, True, True, False]
""")
    result = user_project.runpytest("-p", "no:cacheprovider", "-v")
    result.assert_outcomes(passed=7)
    result.stdout.fnmatch_lines(["*test_keeps_up?asyncio? PASSED*",
                                 "*test_keeps_up?uvloop? PASSED*",
                                 "*test_module_loop_again?uvloop? PASSED*"])


FAULT_TESTS = """
import pytest
import memryx as mx
from memryx.testing import DeviceFault, Faults, FaultyDevice
from app import Classifier

@pytest.fixture
def mx_device():
    return FaultyDevice(script=Faults(DeviceFault(after_frames=5)))

@pytest.mark.asyncio
async def test_survives_a_vanished_chip(mx_accl, mx_camera):
    app = Classifier(mx_accl)
    assert await app.run(mx_camera(fps=0, frames=20)) == 5
    assert isinstance(app.error, mx.DeviceError)
    assert mx_accl.statistics()["device"]["faults"]["device_faults"] == 1
"""


def test_a_fault_scenario_passes_when_the_app_handles_it(user_project: pytest.Pytester) -> None:
    user_project.makepyfile(test_app=FAULT_TESTS)
    user_project.runpytest("-p", "no:cacheprovider").assert_outcomes(passed=2)


def test_an_app_that_mishandles_a_device_fault_fails_clearly(
        user_project: pytest.Pytester) -> None:
    # the app catches only TimeoutError: the DeviceError escapes its run()
    user_project.makepyfile(app=APP.replace("except mx.DeviceError", "except TimeoutError"))
    user_project.makepyfile(test_app=FAULT_TESTS)
    result = user_project.runpytest("-p", "no:cacheprovider", "-ra")
    result.assert_outcomes(failed=2)
    result.stdout.fnmatch_lines([
        "app.py:*: in run", "    logits = await self.accl.arun(frame)",
        "E   *memryx._exceptions.DeviceError: injected device fault: the chip stopped "
        "responding (after 5 frame(s); 1 frame(s) in flight lost)",
        "FAILED test_app.py::test_survives_a_vanished_chip[[]asyncio[]] - memryx._exceptio*",
        "FAILED test_app.py::test_survives_a_vanished_chip[[]uvloop[]] - memryx._exceptio*"])


def test_leaks_fail_the_test(user_project: pytest.Pytester) -> None:
    user_project.makepyfile(test_app="""
import asyncio
import numpy as np
import pytest
import memryx as mx
from memryx.testing import Faults, FaultyDevice, Hang, Stall

@pytest.mark.asyncio
async def test_forgets_to_close(mx_test_dfp, mx_leak_check):
    accl = mx.AsyncAccl(mx_test_dfp, device="sim:fast")
    await accl.arun(np.zeros((1, 16), np.float32))

@pytest.mark.asyncio
async def test_closes(mx_test_dfp, mx_leak_check):
    async with mx.AsyncAccl(mx_test_dfp, device="sim:fast") as accl:
        await accl.arun(np.zeros((1, 16), np.float32))

class TestHang:
    @pytest.fixture
    def mx_device(self):
        return FaultyDevice(script=Faults(Hang(after_frame=1)))

    @pytest.mark.asyncio
    async def test_abandons_frames(self, mx_accl):
        await mx_accl.arun(np.zeros((1, 16), np.float32))
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.2):
                await mx_accl.arun(np.zeros((1, 16), np.float32))

    @pytest.mark.asyncio
    async def test_drops_them_knowingly(self, mx_accl):
        await mx_accl.arun(np.zeros((1, 16), np.float32))
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.2):
                await mx_accl.arun(np.zeros((1, 16), np.float32))
        await mx_accl.aclose()

class TestPastTheEnd:
    @pytest.fixture
    def mx_device(self):
        return FaultyDevice(script=Faults(Stall(after_frame=50, ms=10)))

    @pytest.mark.asyncio
    async def test_short_run(self, mx_accl):
        await mx_accl.arun(np.zeros((1, 16), np.float32))
""")
    result = user_project.runpytest("-p", "no:cacheprovider")
    # each test runs on both loops; a leak is an error at teardown (the call itself passed)
    result.assert_outcomes(passed=10, errors=6)
    result.stdout.fnmatch_lines([
        "*ERROR at teardown of test_forgets_to_close*",
        "memryx leak check: 1 accelerator(s) created during the test were left open (AsyncAccl)*",
        "*ERROR at teardown of TestHang.test_abandons_frames*",
        "memryx leak check: 1 frame(s) accepted by mx_accl were neither delivered nor dropped*",
        "*ERROR at teardown of TestPastTheEnd.test_short_run*",
        "memryx leak check: scripted fault never fired: fault(s) Stall(after_frame=50, ms=10) "
        "never fired: the device saw only 1 frame(s)*"])


def test_checks_nest_and_restore_the_registry(user_project: pytest.Pytester) -> None:
    user_project.makepyfile(test_app="""
import numpy as np
import pytest
import memryx as mx
from memryx import _lifecycle

@pytest.mark.asyncio
async def test_nested(mx_leak_check, mx_accl, mx_test_dfp):
    accl = mx.AsyncAccl(mx_test_dfp, device="sim:fast")  # left open
    await accl.arun(np.zeros((1, 16), np.float32))
    await mx_accl.arun(np.zeros((1, 16), np.float32))

def test_sync_app_closes(mx_leak_check, mx_test_dfp):
    with mx.SyncAccl(mx_test_dfp, device="sim:fast") as accl:
        accl.run(np.zeros((1, 16), np.float32))

def test_the_registry_is_restored():
    assert type(_lifecycle._live).__name__ == "WeakSet"  # the recording one is gone
""")
    result = user_project.runpytest("-p", "no:cacheprovider")
    result.assert_outcomes(passed=4, errors=2)  # the leak reported once per loop
    reports = [line for line in result.stdout.lines  # the summary may repeat them (-r)
               if line.startswith("memryx leak check: 1 accelerator(s) created during the test")]
    assert len(reports) == 2


def test_a_loop_fixture_in_a_sync_test_is_an_error_at_setup(
        user_project: pytest.Pytester) -> None:
    user_project.makepyfile(test_app="""
def test_sync(mx_accl):
    pass
""")
    result = user_project.runpytest("-p", "no:cacheprovider")
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*ERROR at setup of test_sync*",
                                 "the mx_accl fixture needs an event loop: use it from an async "
                                 "test*not from a sync test"])


def test_the_server_fixture_runs_a_real_server(user_project: pytest.Pytester) -> None:
    user_project.makepyfile(test_app="""
import os
import numpy as np
import pytest
import memryx as mx

@pytest.mark.asyncio
async def test_over_the_socket_and_a_server_that_stops_answering(mx_server, mx_test_dfp):
    assert os.path.exists(mx_server.path)
    async with mx.AsyncAccl(mx_test_dfp, device=mx_server.address, timeout=1.0) as accl:
        assert (await accl.arun(np.zeros((1, 16), np.float32))).shape == (1, 10)
        mx_server.pause()  # SIGSTOP: the server stops answering
        try:
            with pytest.raises((mx.DeviceError, TimeoutError)):
                await accl.arun(np.zeros((1, 16), np.float32))
        finally:
            mx_server.resume()
""")
    result = user_project.runpytest("-p", "no:cacheprovider")
    result.assert_outcomes(passed=2)


VIRTUAL_CLOCK_TESTS = """
import numpy as np
import pytest
from app import Classifier
from memryx.device.base import open_device
from memryx.device.simulated import SimulatedDevice
from memryx.testing import Faults, FaultyDevice, Stall

@pytest.mark.asyncio
async def test_a_minute_at_30_fps(mx_virtual_clock, mx_accl, mx_camera):
    app = Classifier(mx_accl)
    assert await app.run(mx_camera(fps=30, frames=1_800)) == 1_800
    stats = mx_accl.statistics()
    assert stats["elapsed_s"] == pytest.approx(60, abs=0.1)
    assert stats["models"][0]["fps"] == pytest.approx(30.0)

class TestStallInVirtualTime:
    @pytest.fixture
    def mx_device(self, mx_virtual_clock):
        inner = SimulatedDevice(mode="timed", clock=mx_virtual_clock)
        return FaultyDevice(inner, Faults(Stall(after_frame=100, ms=2_000)))

    @pytest.mark.asyncio
    async def test_a_two_second_stall(self, mx_virtual_clock, mx_accl, mx_camera):
        app = Classifier(mx_accl)
        assert await app.run(mx_camera(fps=30, frames=300)) == 300
        stats = mx_accl.statistics()
        assert stats["device"]["faults"]["stalled_frames"] == 1
        assert stats["models"][0]["latency_ms"]["mean"] > 6.0  # one frame of 300 waited 2 s ...
        assert mx_virtual_clock.now() == pytest.approx(299 / 30, abs=0.01)  # ... then caught up

class TestOnAServer:
    @pytest.fixture
    def mx_device(self, mx_server):
        return open_device(mx_server.address)

    @pytest.mark.asyncio
    async def test_cannot(self, mx_virtual_clock, mx_accl):
        pass
"""


def test_virtual_clock_fixture(user_project: pytest.Pytester) -> None:
    user_project.makepyfile(test_app=VIRTUAL_CLOCK_TESTS)
    result = user_project.runpytest("-p", "no:cacheprovider")
    result.assert_outcomes(passed=4, errors=2)
    result.stdout.fnmatch_lines([
        "*ERROR at setup of TestOnAServer.test_cannot*",
        "the test uses mx_virtual_clock but mx_device ('fd'*) does not keep its time: only "
        "the in-process simulated device runs on a virtual clock*"])
