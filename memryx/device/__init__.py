"""Device backends behind one small async interface (see :mod:`memryx.device.base`)."""

from .base import Device as Device
from .base import open_device as open_device
from .simulated import SimulatedDevice as SimulatedDevice

__all__ = ["Device", "SimulatedDevice", "open_device"]
