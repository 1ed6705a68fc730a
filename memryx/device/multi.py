"""One accelerator over several devices: ``AsyncAccl(dfp, device_ids=[0, 1])``.

:class:`MultiDevice` is a :class:`~memryx.device.base.Device` made of several
devices of the same kind (one simulated MX3 per id, or one device-server
connection per id), each loaded with the whole DFP. Every ``submit`` goes to the
device with the fewest frames of that model in flight (ties: the next one round
the ring), and returns that device's future. The core keeps ``(tags, future)``
in submission order and awaits the oldest future first, so outputs stay in
order whichever device computed them; nothing else in the core changes.

The frame budget is the sum of the devices' queue depths, so every device can
be kept busy. A device that fails fails its own futures with its
:class:`~memryx.DeviceError`; the core reports the first one and stops the
accelerator (frames on the other devices are cancelled at close).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from numpy.typing import NDArray

from ..clock import clock_of
from .base import Device, Limits

if TYPE_CHECKING:
    from ..dfp import Dfp

__all__ = ["MultiDevice"]

Array = NDArray[Any]


class MultiDevice:
    """Several devices (``devices[i]`` is device id ``ids[i]``) as one (module docstring)."""

    name = "multi"

    def __init__(self, devices: Sequence[Device], ids: Sequence[int]) -> None:
        if len(devices) != len(ids) or len(devices) < 1:
            raise ValueError(f"MultiDevice needs one device per id, got {len(devices)} "
                             f"device(s) for ids {list(ids)}")
        self.devices = list(devices)
        self.ids = list(ids)
        self._in_flight: list[list[int]] = []  # [device][model] frames submitted, not done
        self._submitted: list[list[int]] = []
        self._next = 0
        # Per-frame streams and ready times go through when every device takes them (the
        # simulated device's "sampled" mode answers a frame with its own stream's outputs
        # only if it is told the streams); ready times only on the devices' one clock.
        self.takes_streams = all(getattr(d, "takes_streams", False) for d in self.devices)
        clocks = {id(clock_of(d)) for d in self.devices}
        self.clock = clock_of(self.devices[0])
        self.takes_ready = len(clocks) == 1 and all(getattr(d, "takes_ready", False)
                                                    for d in self.devices)

    async def open(self, dfp: Dfp, group_id: int) -> None:
        """Open every device on its own id (``group_id`` is the first id, unused)."""
        try:
            for dev, dev_id in zip(self.devices, self.ids, strict=True):
                try:
                    await dev.open(dfp, dev_id)
                except BaseException as exc:
                    exc.add_note(f"(opening device id {dev_id} of device_ids {self.ids})")
                    raise
        except BaseException:
            await self.aclose()
            raise
        n = dfp.num_models
        self._in_flight = [[0] * n for _ in self.devices]
        self._submitted = [[0] * n for _ in self.devices]

    def limits(self, model_idx: int) -> Limits:
        each = [dev.limits(model_idx) for dev in self.devices]
        return Limits(in_queue=sum(lim.in_queue for lim in each),
                      in_chip=sum(lim.in_chip for lim in each),
                      out_queue=sum(lim.out_queue for lim in each),
                      batch=min(lim.batch for lim in each))

    def _pick(self, model_idx: int) -> int:
        """The least busy device for ``model_idx``; ties go round the ring."""
        n = len(self.devices)
        start = self._next
        best = start
        load = self._in_flight[start][model_idx]
        for k in range(1, n):
            i = (start + k) % n
            if self._in_flight[i][model_idx] < load:
                best, load = i, self._in_flight[i][model_idx]
        self._next = (best + 1) % n
        return best

    def submit(self, model_idx: int, frames: list[list[Array]],
               streams: Sequence[int] | None = None, ready: float | None = None
               ) -> asyncio.Future[list[list[Array]]]:
        i = self._pick(model_idx)
        options: dict[str, Any] = {}
        if streams is not None and self.takes_streams:
            options["streams"] = streams
        if ready is not None and self.takes_ready:
            options["ready"] = ready
        fut = self.devices[i].submit(model_idx, frames, **options)
        count = len(frames)
        self._in_flight[i][model_idx] += count
        self._submitted[i][model_idx] += count

        def done(_: asyncio.Future[list[list[Array]]]) -> None:
            self._in_flight[i][model_idx] -= count

        fut.add_done_callback(done)
        return fut

    def statistics(self) -> dict[str, Any]:
        per = {}
        for i, (dev, dev_id) in enumerate(zip(self.devices, self.ids, strict=True)):
            stats = dict(dev.statistics())
            if self._submitted:
                stats["frames_submitted"] = list(self._submitted[i])
                stats["frames_in_flight"] = list(self._in_flight[i])
            per[dev_id] = stats
        first = self.devices[0].statistics()
        out: dict[str, Any] = {"device": self.name, "device_ids": list(self.ids),
                               "devices": per}
        for key in ("mode", "paced", "backend"):  # the same on every device
            if key in first:
                out[key] = first[key]
        return out

    async def aclose(self) -> None:
        for dev in self.devices:
            with contextlib.suppress(Exception):
                await dev.aclose()
