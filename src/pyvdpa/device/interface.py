"""The device interface: what every control plane drives and a device author implements.

Theory of operation: a device (a simulated NIC or disk, Python or compiled)
has an identity (:attr:`Device.device_id`), capabilities (feature bits,
queue count and size limit, optional abilities declared as attributes), a
config space, and queues that run between :meth:`Device.start_queue` and
:meth:`Device.stop_queue`.  A control plane — the vhost-user back-end, the
VDUSE device loop, the vDPA framework's adapter — validates what the driver
sent, describes each ready ring with a
:class:`~pyvdpa.device.ring.RingSpec` and calls the device; when the ring
must stop it calls :meth:`Device.stop_queue` and gets the exact
:class:`~pyvdpa.device.ring.RingPosition` back.

Optional abilities are declared, never discovered: :attr:`access_platform`
(queues work behind an IOMMU: IOVAs through the spec's address space,
translations requested through its notifiers) and :attr:`inflight_tracking`
(the device records taken and completed chains in the spec's inflight
record and resubmits what a previous device left undone).

Config changes go the other way: a device that changes its own config
space (a NIC's link going down) calls :meth:`Device.config_changed`, which
calls the :attr:`Device.config_listener` the control plane serving it set:
the VDUSE back-end writes the new bytes to the kernel and injects the config
interrupt, the vhost-user back-end sends CONFIG_CHANGE_MSG.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Mapping

from pyvdpa.device.ring import RingPosition, RingSpec
from pyvdpa.errors import PyvdpaError
from pyvdpa.vhost_user.protocol import ProtocolFeature
from pyvdpa.virtio.constants import DeviceId
from pyvdpa.virtio.ring import MAX_QUEUE_SIZE

__all__ = ["ConfigListener", "Device", "QueueNotRunningError", "UnsupportedRequestError"]

#: What a control plane gives :attr:`Device.config_listener`: called, from any
#: thread, once the device's config space changed.
ConfigListener = Callable[[], None]


class UnsupportedRequestError(PyvdpaError):
    """The device does not implement an optional request (e.g. GET_CONFIG)."""


class QueueNotRunningError(PyvdpaError):
    """``stop_queue`` of a ring the device does not run (it was closed meanwhile)."""


class Device(abc.ABC):
    """A virtio device whose queues any control plane can start and stop.

    Subclasses give their capabilities and process rings between
    :meth:`start_queue` and :meth:`stop_queue`.  Optional requests raise
    :class:`UnsupportedRequestError` by default.
    """

    #: virtio device type.
    device_id: DeviceId = DeviceId.NET
    #: bytes of the device config space (:meth:`get_config` serves them).
    config_size: int = 0
    #: virtio feature bits the device offers (device-specific and generic).
    features: int = 0
    #: vhost-user protocol features the device wants offered (masked by the back-end).
    protocol_features: ProtocolFeature = ProtocolFeature(0)
    #: number of virtqueues.
    num_queues: int = 1
    #: largest ring size accepted.
    max_queue_size: int = MAX_QUEUE_SIZE
    #: whether the queues work behind an IOMMU (offers ACCESS_PLATFORM).
    access_platform: bool = False
    #: whether the device records in-flight chains in ``RingSpec.inflight``.
    inflight_tracking: bool = False
    #: set by the control plane serving the device (one at a time), cleared
    #: when it stops: how :meth:`config_changed` reaches the driver.
    config_listener: ConfigListener | None = None

    def set_features(self, features: int) -> None:  # noqa: B027 - optional hook
        """The driver acknowledged ``features`` (a subset of :attr:`features`)."""

    def vring_state_changed(self, index: int, enabled: bool) -> None:  # noqa: B027
        """Ring ``index`` was enabled or disabled (every change, started or not)."""

    @abc.abstractmethod
    def start_queue(self, spec: RingSpec) -> None:
        """Begin processing the ring ``spec`` describes."""

    @abc.abstractmethod
    def stop_queue(self, index: int) -> RingPosition:
        """Stop processing ring ``index``; when this returns the ring is not touched.

        Returns where the ring stands: the position a restart resumes from.
        Raises :class:`QueueNotRunningError` for a ring it does not run.
        """

    def kick(self, index: int) -> None:  # noqa: B027 - optional hook
        """A kick arrived through the control plane (not an eventfd) for a running ring."""

    def iotlb_updated(self) -> None:  # noqa: B027 - optional hook
        """IOTLB entries were added: retry work that missed a translation."""

    def iotlb_invalidate(self, iova: int, size: int, invalidate: Callable[[], None]) -> bool:
        """Apply an IOTLB INVALIDATE of ``[iova, iova + size)`` without restarting rings.

        A device whose data path can drop translations in place calls
        ``invalidate`` once none of its queues can be using them, rebuilds
        what it holds, and returns True.  The default returns False: the
        control plane then stops the running rings, invalidates and restarts them.
        """
        return False

    def get_config(self, offset: int, size: int) -> bytes:
        """Read ``size`` bytes of the device config space at ``offset``."""
        raise UnsupportedRequestError("device has no config space")

    def set_config(self, offset: int, data: bytes) -> None:
        """Write the device config space."""
        raise UnsupportedRequestError("device config space is read-only")

    def config_changed(self) -> None:
        """Tell the control plane that the config space changed (devices call this).

        Without a listener nobody drives the device, and the driver reads
        the new config space when it next sets the device up.  Errors of the
        control plane (the driver could not be told) propagate.
        """
        listener = self.config_listener
        if listener is not None:
            listener()

    def send_rarp(self, mac: bytes) -> None:
        """Announce ``mac`` after migration (SEND_RARP)."""
        raise UnsupportedRequestError("device does not send RARP")

    def set_mtu(self, mtu: int) -> None:
        """The driver set the MTU (NET_SET_MTU)."""
        raise UnsupportedRequestError("device has no MTU")

    def queue_stats(self, index: int) -> Mapping[str, int]:
        """Counters of queue ``index`` (DPDK's names); none by default."""
        return {}

    def reset(self) -> None:  # noqa: B027 - optional hook
        """All queues are stopped and the device returns to its initial state."""
