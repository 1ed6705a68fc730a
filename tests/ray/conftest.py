"""A real local Ray runtime for the memryx.ray tests, started once for the package.

``ray.init(num_cpus=2)`` on this machine, with four ``MX3`` custom resources
(the modules of a pretend host), in a temporary directory of its own so that
the teardown can check that no Ray process outlived ``ray.shutdown()``.
The tests skip when the ``ray`` extra is not installed.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import _loop_errors, fds, settle

#: MX3 modules the local test "cluster" has.
MX3_MODULES = 4


def pytest_collection_modifyitems(config: Any, items: list[Any]) -> None:
    """Ray's own warnings (from its modules, not ours) are not errors in tests/ray."""
    here = Path(__file__).parent
    for item in items:
        if here in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.filterwarnings(
                r"ignore::DeprecationWarning:(ray|google|grpc|pkg_resources)(\..*)?$"))
            item.add_marker(pytest.mark.filterwarnings(
                r"ignore::FutureWarning:(ray)(\..*)?$"))


def ray_processes(marker: str) -> list[int]:
    """PIDs of the processes whose command line mentions ``marker``."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
        except OSError:
            continue
        if marker.encode() in cmdline:
            pids.append(int(entry))
    return pids


@pytest.fixture(scope="package")
def ray_runtime() -> Iterator[Any]:
    """One Ray runtime for tests/ray, shut down (and checked gone) when they end."""
    ray = pytest.importorskip("ray")
    # short: Ray puts Unix sockets under it
    temp_dir = tempfile.mkdtemp(prefix="mxray", dir="/tmp")
    ray.init(address="local", num_cpus=2, resources={"MX3": MX3_MODULES},
             include_dashboard=False, log_to_driver=False, _temp_dir=temp_dir)
    try:
        yield ray
    finally:
        ray.shutdown()
        deadline = time.monotonic() + 20
        while ray_processes(temp_dir) and time.monotonic() < deadline:
            time.sleep(0.1)
        left = ray_processes(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)
        assert not left, f"Ray processes left behind after ray.shutdown(): {left}"




def _fds_that_are_not_sockets() -> set[int]:
    found = set()
    for fd in fds():
        try:
            if not os.readlink(f"/proc/self/fd/{fd}").startswith("socket:"):
                found.add(fd)
        except OSError:
            continue
    return found


@pytest.fixture(autouse=True)
def no_leaks(_warm_up: None) -> Iterator[None]:
    """The root suite's leak check, narrowed for Ray: Ray's core worker keeps
    gRPC connections to the worker processes it talked to (a restarted replica
    is a new process, so a new connection) for as long as the runtime lives;
    those sockets are Ray's and close at ``ray.shutdown()``. Threads, other
    fds and loop-handler errors are checked as everywhere else."""
    threads_before = set(threading.enumerate())
    fds_before = _fds_that_are_not_sockets()
    _loop_errors.clear()
    yield
    assert not _loop_errors, f"errors reached the loop's exception handler: {_loop_errors}"

    def new_threads() -> list[str]:
        return [t.name for t in threading.enumerate()
                if t not in threads_before and t.is_alive()]

    assert settle(lambda: not new_threads()), f"threads left behind: {new_threads()}"
    assert settle(lambda: not (_fds_that_are_not_sockets() - fds_before)), (
        f"fds left open: {_fds_that_are_not_sockets() - fds_before}")
