"""pyvdpa: vDPA (vhost data path acceleration) and vhost-user in Python.

The names here are what a device author needs: subclass :class:`Device`
(or :class:`ThreadedDevice`, whose ``process(ring)`` drains a
:class:`Virtqueue` with ``pop``, ``push`` and ``notify`` on a thread per
queue), describe it with the feature and device-id enums, and serve it on
a vhost-user socket with :func:`serve` or :class:`BackendServer`.
``examples/echo_net.py`` is a complete device written against them.

The package is layered (see ``docs/ARCHITECTURE.md``): :mod:`pyvdpa.virtio`
(spec constants, layouts, split and packed rings), :mod:`pyvdpa.memory`
(guest memory and the dirty log), :mod:`pyvdpa.device` (ring descriptions
and the device interface), :mod:`pyvdpa.vhost_user` (codec, transport,
back-end, front-end), :mod:`pyvdpa.devices` (simulated devices),
:mod:`pyvdpa.dataplane` (the compiled data path, imported only when used)
and :mod:`pyvdpa.drive` (traffic drivers behind ``pyvdpa drive``).
"""

from pyvdpa.device import (
    Device,
    RingPosition,
    RingSpec,
    ThreadedDevice,
    UnsupportedRequestError,
    Virtqueue,
)
from pyvdpa.errors import RingError
from pyvdpa.serving import serve
from pyvdpa.vhost_user.protocol import ProtocolFeature
from pyvdpa.vhost_user.server import BackendServer
from pyvdpa.virtio.constants import BlkFeature, DeviceId, NetFeature, VirtioFeature
from pyvdpa.virtio.ring import DescriptorChain

__version__ = "0.1.0"
__all__ = [
    "BackendServer",
    "BlkFeature",
    "DescriptorChain",
    "Device",
    "DeviceId",
    "NetFeature",
    "ProtocolFeature",
    "RingError",
    "RingPosition",
    "RingSpec",
    "ThreadedDevice",
    "UnsupportedRequestError",
    "VirtioFeature",
    "Virtqueue",
    "__version__",
    "serve",
]
