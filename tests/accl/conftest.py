"""The accelerator suite runs twice: on the in-process simulated device and over
the fd device (a `memryx serve` process reached through a Unix socket)."""

from __future__ import annotations

from typing import Any

import pytest


@pytest.fixture(params=["sim", "fd"], autouse=True)
def device(request: Any, monkeypatch: pytest.MonkeyPatch) -> str:
    if request.param == "fd":
        server = request.getfixturevalue("shared_server")
        monkeypatch.setenv("MEMRYX_DEVICE", server.address)
    else:
        monkeypatch.setenv("MEMRYX_DEVICE", "sim")
    return request.param
