"""One device model for every control plane: ring descriptions and the device interface."""

from pyvdpa.device.interface import (
    ConfigListener,
    Device,
    QueueNotRunningError,
    UnsupportedRequestError,
)
from pyvdpa.device.ring import (
    RingNotifiers,
    RingPosition,
    RingSetupError,
    RingSpec,
    Signal,
    describe_ring,
)
from pyvdpa.device.virtqueue import ThreadedDevice, Virtqueue

__all__ = [
    "ConfigListener",
    "Device",
    "QueueNotRunningError",
    "RingNotifiers",
    "RingPosition",
    "RingSetupError",
    "RingSpec",
    "Signal",
    "ThreadedDevice",
    "UnsupportedRequestError",
    "Virtqueue",
    "describe_ring",
]
