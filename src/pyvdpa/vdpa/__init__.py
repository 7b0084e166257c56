"""The vDPA framework: device operations, the device table, ports, drivers.

Theory of operation: DPDK's vDPA framework (``lib/vhost/vdpa.c``,
``rte_vdpa.h``, ``rte_vhost.h``) in Python.  A :class:`VdpaDriver` probes a
device and registers it, with its :class:`VdpaDeviceOps`, in a bounded
:class:`VdpaRegistry`; an application attaches a registered
:class:`VdpaDevice` to a :class:`VdpaPort` (a vhost-user socket) and starts
it; every front-end that connects gets a :class:`VhostAdapter` that turns
vhost-user requests into the device's operations.  The device's data path
runs on the guest's rings; the control path stays here.
"""

from pyvdpa.vdpa.device import (
    MANDATORY_OPS,
    OPTIONAL_OPS,
    OpNotSupportedError,
    VdpaCapabilities,
    VdpaDevice,
    VdpaDeviceOps,
    VdpaError,
    VhostDevice,
)
from pyvdpa.vdpa.driver import (
    DRIVERS,
    SimBlkDriver,
    SimDeviceOps,
    SimDriver,
    SimNetDriver,
    VdpaDriver,
)
from pyvdpa.vdpa.port import VdpaPort
from pyvdpa.vdpa.registry import MAX_VDPA_DEVICES, VdpaRegistry
from pyvdpa.vdpa.vhost import VhostAdapter

__all__ = [
    "DRIVERS",
    "MANDATORY_OPS",
    "MAX_VDPA_DEVICES",
    "OPTIONAL_OPS",
    "OpNotSupportedError",
    "SimBlkDriver",
    "SimDeviceOps",
    "SimDriver",
    "SimNetDriver",
    "VdpaCapabilities",
    "VdpaDevice",
    "VdpaDeviceOps",
    "VdpaDriver",
    "VdpaError",
    "VdpaPort",
    "VdpaRegistry",
    "VhostAdapter",
    "VhostDevice",
]
