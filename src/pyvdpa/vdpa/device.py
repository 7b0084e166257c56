"""vDPA devices: the operations a driver implements, and the device handle.

Theory of operation (DPDK ``rte_vdpa_dev_ops``, ``lib/vhost/vdpa_driver.h``):
a vDPA driver describes each device it probed with a table of operations.
Seven are mandatory and let the vhost library drive the device:

* ``get_queue_num``, ``get_features``, ``get_protocol_features`` state its
  capabilities (queue pairs for a net device, queues otherwise, as DPDK's
  drivers and the ``vdpa`` example's ``list`` report them);
* ``set_features`` is called on every SET_FEATURES;
* ``set_vring_state(vhost, qid, enable)`` whenever queue ``qid`` becomes
  ready or stops being ready (enabled by the front-end, rings and kick fd
  configured), as DPDK's ``vhost_user_notify_queue_state`` does;
* ``dev_conf`` once the whole device is ready: the hardware takes the rings
  over; ``dev_close`` when it must let them go.

A device that can work behind an IOMMU reports ``VIRTIO_F_ACCESS_PLATFORM``
in ``get_features`` (as DPDK's report ``VIRTIO_F_IOMMU_PLATFORM``); it is
offered only when the connection can carry IOTLB messages, and the
optional ``iotlb_updated(vhost)`` tells the device that new translations
arrived, so that queues waiting for one retry, and the optional
``iotlb_invalidate(vhost, iova, size, invalidate)`` lets it withdraw
translations without its rings being stopped and set up again.

The optional ones (``migration_done``, ``iotlb_updated``, ``get_notify_area``,
``get_stats_names``, ``get_stats``, ``reset_stats``, ``get_config``,
``set_config``, ``get_dev_type``, ``get_vfio_group_fd``,
``get_vfio_device_fd``) may be absent: calling one through
:class:`VdpaDevice` then raises :class:`OpNotSupportedError`, which names it.
A device without ``get_dev_type`` is a net device, as in DPDK.

Per-connection operations receive the :class:`VhostDevice`
bound to the device (DPDK passes its ``vid``): the negotiated features, the
ready vrings, the MTU.  Device-wide ones (capabilities, statistics) take no
connection.  Everything a driver returns is checked here, so a faulty driver
is reported as such rather than corrupting the vhost-user state.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from pyvdpa.errors import PyvdpaError
from pyvdpa.vhost_user.protocol import ProtocolFeature
from pyvdpa.virtio.constants import DeviceId

if TYPE_CHECKING:
    from pyvdpa.device import RingPosition, RingSpec

__all__ = [
    "MANDATORY_OPS",
    "OPTIONAL_OPS",
    "SUPPORTED_DEVICE_TYPES",
    "Attachment",
    "OpNotSupportedError",
    "VdpaCapabilities",
    "VdpaDevice",
    "VdpaDeviceOps",
    "VdpaError",
    "VhostDevice",
    "device_type_of",
]

#: Operations every device must implement (registration refuses it otherwise).
MANDATORY_OPS = (
    "get_queue_num",
    "get_features",
    "get_protocol_features",
    "dev_conf",
    "dev_close",
    "set_vring_state",
    "set_features",
)

#: Operations a device may leave out.
OPTIONAL_OPS = (
    "migration_done",
    "iotlb_updated",
    "iotlb_invalidate",
    "get_notify_area",
    "get_stats_names",
    "get_stats",
    "reset_stats",
    "get_config",
    "set_config",
    "get_dev_type",
    "get_vfio_group_fd",
    "get_vfio_device_fd",
)

#: Device types the vhost-user side can serve (DPDK: net and blk).
SUPPORTED_DEVICE_TYPES = (DeviceId.NET, DeviceId.BLOCK)


class Attachment(Protocol):
    """Where a device is attached (a :class:`~pyvdpa.vdpa.port.VdpaPort`)."""

    @property
    def path(self) -> str:
        """The socket path."""
        ...


class VhostDevice(Protocol):
    """What per-connection operations receive: one front-end's view of the device.

    :class:`~pyvdpa.vdpa.vhost.VhostAdapter` is the implementation (DPDK
    passes its ``vid``).
    """

    vid: int
    ifname: str
    negotiated_features: int
    mtu: int | None
    rarp_mac: bytes | None

    def vring(self, qid: int) -> RingSpec | None:
        """Ring ``qid`` if it is ready."""
        ...

    def ready_vrings(self) -> list[RingSpec]:
        """The ready rings, by index."""
        ...

    def ring_stopped(self, qid: int, position: RingPosition) -> None:
        """The hardware stopped ring ``qid`` at ``position``."""
        ...

    def config_changed(self) -> None:
        """The device's config space changed: tell the front-end (CONFIG_CHANGE_MSG)."""
        ...


class VdpaError(PyvdpaError):
    """A vDPA framework rule was broken: registration, attach, a driver's answer."""


class OpNotSupportedError(VdpaError):
    """The device does not implement an optional operation."""


class VdpaDeviceOps(Protocol):
    """The mandatory operations of a vDPA device (DPDK ``rte_vdpa_dev_ops``).

    Optional operations, when present, have these signatures:

    * ``migration_done(vhost) -> None`` — SEND_RARP arrived (live migration ended);
    * ``get_notify_area(vhost, qid) -> (offset, size)`` — the doorbell of
      queue ``qid`` inside the region of ``get_vfio_device_fd``;
    * ``get_stats_names() -> Sequence[str]``, ``get_stats(qid) -> Mapping[str, int]``,
      ``reset_stats(qid) -> None`` — per-queue counters;
    * ``get_config(vhost, offset, size) -> bytes``,
      ``set_config(vhost, offset, data) -> None`` — the device config space;
    * ``get_dev_type() -> DeviceId``;
    * ``get_vfio_group_fd(vhost) -> int``, ``get_vfio_device_fd(vhost) -> int``.
    """

    def get_queue_num(self) -> int:
        """Queue pairs (net) or queues (other types) the device can serve."""

    def get_features(self) -> int:
        """virtio feature bits the device offers."""

    def get_protocol_features(self) -> ProtocolFeature:
        """vhost-user protocol features the device supports."""

    def dev_conf(self, vhost: VhostDevice) -> None:
        """The device is ready: take over the ready vrings of ``vhost``."""

    def dev_close(self, vhost: VhostDevice) -> None:
        """Stop touching every vring of ``vhost`` before this returns."""

    def set_vring_state(self, vhost: VhostDevice, qid: int, enable: bool) -> None:
        """Queue ``qid`` became ready (``enable``) or must no longer be touched."""

    def set_features(self, vhost: VhostDevice) -> None:
        """The front-end set ``vhost.negotiated_features``."""


@dataclass(frozen=True, slots=True)
class VdpaCapabilities:
    """What a device reports through its capability operations."""

    #: queue pairs for a net device, queues otherwise.
    queue_num: int
    features: int
    protocol_features: ProtocolFeature
    device_type: DeviceId

    @property
    def num_vrings(self) -> int:
        """Virtqueues the device serves (a net queue pair is two)."""
        return 2 * self.queue_num if self.device_type is DeviceId.NET else self.queue_num


class VdpaDevice:
    """A registered vDPA device: its name, its operations, its attachment.

    Made by :meth:`~pyvdpa.vdpa.registry.VdpaRegistry.register`; a device is
    attached to at most one :class:`~pyvdpa.vdpa.port.VdpaPort` at a time.
    """

    def __init__(self, name: str, ops: VdpaDeviceOps, device_type: DeviceId) -> None:
        self.name = name
        self.ops = ops
        self.device_type = device_type
        self.registered = False
        self._port: Attachment | None = None
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"VdpaDevice({self.name!r}, {self.device_type.name})"

    # ------------------------------------------------------------------ capabilities

    def capabilities(self) -> VdpaCapabilities:
        """Ask the driver for the device's capabilities, checking its answers."""
        queue_num = self._int("get_queue_num", self.ops.get_queue_num())
        features = self._int("get_features", self.ops.get_features())
        protocol = self._int("get_protocol_features", self.ops.get_protocol_features())
        return VdpaCapabilities(queue_num, features, ProtocolFeature(protocol), self.device_type)

    def supports(self, op: str) -> bool:
        """Whether the device implements operation ``op``."""
        return callable(getattr(self.ops, op, None))

    def _op(self, op: str) -> Callable[..., Any]:
        method = getattr(self.ops, op, None)
        if not callable(method):
            raise OpNotSupportedError(f"{self.name}: {op} not supported by this device")
        return method  # type: ignore[no-any-return]

    def _int(self, op: str, value: object) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise VdpaError(f"{self.name}: {op} returned {value!r}, not a non-negative int")
        return value

    def _check_qid(self, qid: int) -> None:
        count = self.capabilities().num_vrings
        if not 0 <= qid < count:
            raise VdpaError(f"{self.name}: queue {qid} out of range (device has {count} queues)")

    # ------------------------------------------------------------------ attachment

    @property
    def port(self) -> Attachment | None:
        """The port the device is attached to, if any."""
        return self._port

    def claim(self, port: Attachment) -> None:
        """Attach to ``port``; refused if the device is attached elsewhere or unregistered."""
        with self._lock:
            if not self.registered:
                raise VdpaError(f"{self.name}: device is not registered")
            if self._port is not None and self._port is not port:
                raise VdpaError(f"{self.name}: already attached to {self._port.path}")
            self._port = port

    def release(self, port: Attachment) -> None:
        """Detach from ``port`` (nothing happens if attached elsewhere)."""
        with self._lock:
            if self._port is port:
                self._port = None

    # ------------------------------------------------------------------ optional ops

    def migration_done(self, vhost: VhostDevice) -> None:
        """Tell the device that live migration finished (SEND_RARP)."""
        self._op("migration_done")(vhost)

    def iotlb_updated(self, vhost: VhostDevice) -> None:
        """Tell the device that IOTLB entries were added (queues that missed retry)."""
        self._op("iotlb_updated")(vhost)

    def iotlb_invalidate(
        self, vhost: VhostDevice, iova: int, size: int, invalidate: Callable[[], None]
    ) -> bool:
        """Let the device withdraw IOTLB translations in place; False if it cannot."""
        done = self._op("iotlb_invalidate")(vhost, iova, size, invalidate)
        if not isinstance(done, bool):
            raise VdpaError(f"{self.name}: iotlb_invalidate returned {done!r}, not a bool")
        return done

    def get_notify_area(self, vhost: VhostDevice, qid: int) -> tuple[int, int]:
        """The (offset, size) of queue ``qid``'s doorbell in the device fd's region."""
        area = self._op("get_notify_area")(vhost, qid)
        if (
            not isinstance(area, tuple)
            or len(area) != 2
            or not all(isinstance(v, int) and v >= 0 for v in area)
        ):
            raise VdpaError(f"{self.name}: get_notify_area returned {area!r}")
        return area[0], area[1]

    def get_stats_names(self) -> tuple[str, ...]:
        """Names of the per-queue counters, in display order."""
        names = self._op("get_stats_names")()
        if not isinstance(names, Sequence) or not all(isinstance(n, str) for n in names):
            raise VdpaError(f"{self.name}: get_stats_names returned {names!r}")
        return tuple(names)

    def get_stats(self, qid: int) -> dict[str, int]:
        """The counters of queue ``qid``, by name, in the order of :meth:`get_stats_names`."""
        get_stats = self._op("get_stats")
        names = self.get_stats_names()
        self._check_qid(qid)
        values = get_stats(qid)
        if not isinstance(values, Mapping):
            raise VdpaError(f"{self.name}: get_stats returned {values!r}")
        return {name: self._int("get_stats", values.get(name, 0)) for name in names}

    def reset_stats(self, qid: int) -> None:
        """Zero the counters of queue ``qid``."""
        reset = self._op("reset_stats")
        self._check_qid(qid)
        reset(qid)

    def get_config(self, vhost: VhostDevice, offset: int, size: int) -> bytes:
        """Read ``size`` bytes of the config space at ``offset``."""
        data = self._op("get_config")(vhost, offset, size)
        if not isinstance(data, bytes | bytearray) or len(data) != size:
            raise VdpaError(f"{self.name}: get_config returned {data!r}, {size} bytes asked")
        return bytes(data)

    def set_config(self, vhost: VhostDevice, offset: int, data: bytes) -> None:
        """Write the config space."""
        self._op("set_config")(vhost, offset, data)

    def get_vfio_group_fd(self, vhost: VhostDevice) -> int:
        """The VFIO group fd of the device."""
        return self._int("get_vfio_group_fd", self._op("get_vfio_group_fd")(vhost))

    def get_vfio_device_fd(self, vhost: VhostDevice) -> int:
        """The VFIO device fd of the device."""
        return self._int("get_vfio_device_fd", self._op("get_vfio_device_fd")(vhost))


def device_type_of(name: str, ops: VdpaDeviceOps) -> DeviceId:
    """The type ``ops`` reports (net without ``get_dev_type``), checked."""
    get_dev_type = getattr(ops, "get_dev_type", None)
    if not callable(get_dev_type):
        return DeviceId.NET
    value = get_dev_type()
    try:
        return DeviceId(value)
    except ValueError:
        raise VdpaError(
            f"{name}: get_dev_type returned {value!r}, not a virtio device id"
        ) from None
