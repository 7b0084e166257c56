"""The vDPA device table: where drivers register what they probed.

Theory of operation (DPDK ``rte_vdpa_register_device`` /
``rte_vdpa_unregister_device`` / ``rte_vdpa_find_device_by_name``): a driver
that probed a device registers it under a unique name with its operations.
Registration is the framework's gate, so it refuses, each with its own
message:

* operations missing any of :data:`~pyvdpa.vdpa.device.MANDATORY_OPS`;
* a device without what vDPA needs — the virtio 1.0 interface
  (``VERSION_1``), at least one queue, a type the vhost-user side serves —
  reported as "not enough capabilities" as DPDK's drivers do;
* a name already taken, or not usable on a command line;
* a full table (it is bounded, like DPDK's).

A device attached to a port cannot be unregistered: detach it first.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator

from pyvdpa.vdpa.device import (
    MANDATORY_OPS,
    SUPPORTED_DEVICE_TYPES,
    VdpaDevice,
    VdpaDeviceOps,
    VdpaError,
    device_type_of,
)
from pyvdpa.virtio.constants import VirtioFeature

__all__ = ["MAX_VDPA_DEVICES", "NAME_MAX", "VdpaRegistry"]

#: Default bound of the device table.
MAX_VDPA_DEVICES = 128

#: Longest device name (DPDK's ``RTE_DEV_NAME_MAX_LEN`` less the NUL).
NAME_MAX = 63


class VdpaRegistry:
    """A bounded, thread-safe table of vDPA devices, in registration order."""

    def __init__(self, max_devices: int = MAX_VDPA_DEVICES) -> None:
        if max_devices < 1:
            raise ValueError(f"max_devices must be positive, not {max_devices}")
        self.max_devices = max_devices
        self._devices: dict[str, VdpaDevice] = {}
        self._lock = threading.Lock()

    def register(self, name: str, ops: VdpaDeviceOps) -> VdpaDevice:
        """Register a device named ``name`` driven by ``ops``; return its handle."""
        _check_name(name)
        missing = [op for op in MANDATORY_OPS if not callable(getattr(ops, op, None))]
        if missing:
            raise VdpaError(f"{name}: cannot register: missing mandatory ops {', '.join(missing)}")
        device = VdpaDevice(name, ops, device_type_of(name, ops))
        _check_capabilities(device)
        with self._lock:
            if name in self._devices:
                raise VdpaError(f"{name}: cannot register: a device of that name exists")
            if len(self._devices) >= self.max_devices:
                raise VdpaError(
                    f"{name}: cannot register: device table full ({self.max_devices} devices)"
                )
            device.registered = True
            self._devices[name] = device
        return device

    def unregister(self, device: VdpaDevice | str) -> None:
        """Remove a device; refused while it is attached to a port."""
        name = device if isinstance(device, str) else device.name
        with self._lock:
            found = self._devices.get(name)
            if found is None or (isinstance(device, VdpaDevice) and found is not device):
                raise VdpaError(f"{name}: cannot unregister: no such device")
            port = found.port
            if port is not None:
                raise VdpaError(f"{name}: cannot unregister: attached to {port.path}")
            found.registered = False
            del self._devices[name]

    def find(self, name: str) -> VdpaDevice | None:
        """The device named ``name``, or ``None``."""
        with self._lock:
            return self._devices.get(name)

    def get(self, name: str) -> VdpaDevice:
        """The device named ``name``; :class:`VdpaError` if there is none."""
        device = self.find(name)
        if device is None:
            raise VdpaError(f"no vDPA device named {name!r}")
        return device

    def __iter__(self) -> Iterator[VdpaDevice]:
        with self._lock:
            return iter(list(self._devices.values()))

    def __len__(self) -> int:
        with self._lock:
            return len(self._devices)

    def __contains__(self, name: object) -> bool:
        with self._lock:
            return name in self._devices


def _check_name(name: str) -> None:
    if not name or len(name.encode()) > NAME_MAX or not name.isprintable() or " " in name:
        raise VdpaError(
            f"invalid vDPA device name {name!r}: 1..{NAME_MAX} printable bytes, no spaces"
        )


def _check_capabilities(device: VdpaDevice) -> None:
    """Probe what the device can do; refuse one that cannot be a vDPA device."""
    caps = device.capabilities()
    lacking = []
    if not caps.features & VirtioFeature.VERSION_1:
        lacking.append("no VERSION_1")
    if caps.queue_num == 0:
        lacking.append("no queues")
    if device.device_type not in SUPPORTED_DEVICE_TYPES:
        lacking.append(f"device type {device.device_type.name} not served over vhost-user")
    if lacking:
        raise VdpaError(
            f"{device.name}: cannot register: not enough capabilities ({', '.join(lacking)})"
        )
