"""Device backends behind one small async interface (see :mod:`memryx.device.base`)."""

from ._compute import BackendError as BackendError
from .base import Device as Device
from .base import open_device as open_device
from .simulated import SimulatedDevice as SimulatedDevice

__all__ = ["BackendError", "Device", "SimulatedDevice", "open_device"]
