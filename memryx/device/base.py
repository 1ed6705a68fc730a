"""The async device interface every backend implements.

A device runs the models of one DFP. The core hands it *batches* of frames:
``submit(model_idx, frames)`` returns at once with a future of the batch's
outputs (one list of arrays per frame, in frame order). A *frame* is the list
of arrays for all of a model's input ports; its outputs are one array per
output port, in port order.

The device does not pair outputs with their senders and applies no
backpressure of its own: the core keeps ``(tags, future)`` in submission order
and bounds what is in flight by the *frame budget*, computed from the device's
:class:`Limits` (:func:`memryx._core.lane.frame_budget`). A device fault fails
the futures of the frames in flight with :class:`~memryx.DeviceError`.

The device knows nothing of callbacks or threads of the core above it. A device
whose class sets ``takes_streams = True`` is also told each frame's *stream*
(``submit(model_idx, frames, streams)``: one int per frame; a callback stream's
index, or a number below 0 per request receiver), for strategies that work per
stream (the simulated device's ``"sampled"`` mode); other devices are called
without it. Likewise a device whose class sets ``takes_ready = True`` is told when
the batch's last frame was ready on the host (``ready=``, on the device's clock):
the simulated device counts its modeled latency from then, so the core's own
hand-over is inside it (:meth:`memryx._core.lane.Lane.put_many`).

The core copies each frame it accepts (the app may reuse its arrays once its
callback returns). A device with a ``frame_taker(model_idx)`` method takes the
frames of that model itself: the method returns None (the core copies) or a
function ``take(frame, stream)`` that the core calls on the thread that produced the
frame, right after its checks, with the app's own arrays (``stream``: the callback
stream, None when not known there); what it returns is what ``submit`` gets. The
simulated device copies only the frames it may read later (:mod:`._taking`).
"""

from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from numpy.typing import NDArray

if TYPE_CHECKING:
    from ..dfp import Dfp

__all__ = ["DEVICE_ENV", "Device", "Limits", "open_device"]

#: Environment variable naming the default device (``sim`` when unset).
DEVICE_ENV = "MEMRYX_DEVICE"


@dataclass(frozen=True)
class Limits:
    """The queue depths of one model on a device, from which the core computes its
    frame budget (``in_queue + in_chip + out_queue``, capped)."""

    in_queue: int
    """Frames the device buffers on the way in, before its chip."""
    in_chip: int
    """Frames inside the (modeled) chip at once."""
    out_queue: int
    """Outputs the device buffers on the way out, for a host that is slow to take them."""
    batch: int
    """The most frames the core hands over in one ``submit``."""


@runtime_checkable
class Device(Protocol):
    """What the core needs from an accelerator."""

    name: str

    async def open(self, dfp: Dfp, group_id: int) -> None:
        """Load ``dfp`` onto chip group ``group_id``; must run on the loop that uses it."""

    def limits(self, model_idx: int) -> Limits:
        """The queue depths of model ``model_idx`` (see :class:`Limits`)."""

    def submit(self, model_idx: int, frames: list[list[NDArray[Any]]]
               ) -> asyncio.Future[list[list[NDArray[Any]]]]:
        """Start ``frames`` on model ``model_idx``; the future gives their outputs in order
        (or raises DeviceError). Never blocks; the core bounds what is in flight."""

    def statistics(self) -> dict[str, Any]:
        """Counters of the device (per model frames in/out, ...)."""

    async def aclose(self) -> None:
        """Release everything; the futures of frames in flight are cancelled."""


def open_device(spec: str | Device | None = None, **options: Any) -> Device:
    """A device from an argument or ``$MEMRYX_DEVICE``.

    ``"sim"``, ``"sim:MODE"`` or ``"sim:MODE:BACKEND"`` (``"sim:reuse"``,
    ``"sim:sampled:openvino"``; modes in :data:`memryx.device.simulated.MODES`): the
    in-process simulated MX3;
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

        mode, _, backend = arg.partition(":")
        if mode:
            options.setdefault("mode", mode)
        if backend:
            options.setdefault("backend", backend)
        return SimulatedDevice(**options)
    if (kind == "unix" and arg) or (kind in ("tcp", "tcps") and arg.startswith("//")):
        from .fd import FdDevice

        unknown = sorted(set(options) - {"timeout", "token", "tls", "scheduler"})
        if unknown:
            raise TypeError(f"the fd device takes no options; got {unknown} (only timeout=, "
                            "token=, tls= and scheduler=; set the mode on the server: "
                            "memryx serve --help)")
        return FdDevice(text, **options)
    raise ValueError(f"unknown device {text!r}: expected 'sim', 'sim:MODE' or "
                     "'sim:MODE:BACKEND' (the simulated MX3), 'unix:/path/to/socket', "
                     "'tcp://HOST:PORT' or 'tcps://HOST:PORT' "
                     "(a device server)")
