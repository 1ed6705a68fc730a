"""The async device interface every backend implements.

A device runs the models of one DFP. Each model is a FIFO: frames sent to it
come back from ``receive`` in the order they were sent. A *frame* is the list of
arrays for all of a model's input ports (its outputs: one array per output
port, in port order); ports of one model advance together, one frame per
inference, so the interface moves whole frames rather than single ports.

The device knows nothing of callbacks, streams or threads of the core above it.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from numpy.typing import NDArray

if TYPE_CHECKING:
    from ..dfp import Dfp

__all__ = ["DEVICE_ENV", "Device", "open_device"]

#: Environment variable naming the default device (``sim`` when unset).
DEVICE_ENV = "MEMRYX_DEVICE"


@runtime_checkable
class Device(Protocol):
    """What the core needs from an accelerator."""

    name: str

    async def open(self, dfp: Dfp, group_id: int) -> None:
        """Load ``dfp`` onto chip group ``group_id``; must run on the loop that uses it."""

    def capacity(self, model_idx: int) -> int:
        """How many frames of model ``model_idx`` may be in flight at once."""

    async def send(self, model_idx: int, frame: list[NDArray[Any]]) -> None:
        """Queue one frame; waits while the device's input buffer is full."""

    async def receive(self, model_idx: int) -> list[NDArray[Any]]:
        """The outputs of the oldest frame still in flight; raises DeviceError on a fault."""

    def statistics(self) -> dict[str, Any]:
        """Counters of the device (per model frames in/out, ...)."""

    async def aclose(self) -> None:
        """Release everything; frames in flight are dropped."""


def open_device(spec: str | Device | None = None, **options: Any) -> Device:
    """A device from an argument or ``$MEMRYX_DEVICE``.

    ``"sim"`` (or ``"sim:fast"``, ``"sim:shapes"``): the in-process simulated MX3;
    ``"unix:/run/memryx.sock"``: a device server (``memryx serve``) reached over
    that Unix socket; ``"tcp://HOST:PORT"`` / ``"tcps://HOST:PORT"``: one reached
    over TCP / TLS (the shared secret from ``token=`` or ``$MEMRYX_TOKEN``). The
    server devices take ``timeout=`` (seconds, see :mod:`memryx.device.fd`),
    ``token=`` and ``tls=`` (an ``ssl.SSLContext``). ``None`` reads
    ``$MEMRYX_DEVICE`` and falls back to ``"sim"``. A :class:`Device` instance is
    used as it is.
    """
    if spec is not None and not isinstance(spec, str):
        if isinstance(spec, Device):
            return spec
        raise TypeError(f"device must be a string or a Device, got {type(spec).__name__}")
    text = spec if spec is not None else os.environ.get(DEVICE_ENV, "sim")
    kind, _, arg = text.partition(":")
    if kind in ("sim", "simulated"):
        from .simulated import SimulatedDevice

        if arg:
            options.setdefault("mode", arg)
        return SimulatedDevice(**options)
    if (kind == "unix" and arg) or (kind in ("tcp", "tcps") and arg.startswith("//")):
        from .fd import FdDevice

        unknown = sorted(set(options) - {"timeout", "token", "tls"})
        if unknown:
            raise TypeError(f"the fd device takes no options; got {unknown} (only timeout=, "
                            "token= and tls=; set the mode and scheduler on the server: "
                            "memryx serve --help)")
        return FdDevice(text, **options)
    raise ValueError(f"unknown device {text!r}: expected 'sim', 'sim:MODE' (the simulated "
                     "MX3), 'unix:/path/to/socket', 'tcp://HOST:PORT' or 'tcps://HOST:PORT' "
                     "(a device server)")
