"""The vhost device of one connection, bound to a vDPA device.

Theory of operation (DPDK ``lib/vhost/vhost_user.c``, ``vhost_user_msg_handler``
and ``vhost_destroy_device_notify``): every front-end connection on a port
gets a :class:`VhostAdapter`.  The back-end connection
(:class:`~pyvdpa.vhost_user.backend.BackendConnection`) drives it through the
:class:`~pyvdpa.vhost_user.device.Device` interface, and it turns
those calls into the vDPA device's operations with DPDK's semantics:

============================================  ==================================
back-end event                                 vDPA operations
============================================  ==================================
SET_FEATURES                                   ``set_features``
a ring becomes ready (started, enabled,        ``set_vring_state(qid, True)``, then
configured)                                    ``dev_conf`` once the device is ready
a ring is disabled                             ``set_vring_state(qid, False)``
GET_VRING_BASE, RESET_OWNER / RESET_DEVICE,    ``dev_close`` (if configured), then
disconnect, a ring re-set-up while running     ``set_vring_state(qid, False)``
(new memory table, dirty log, address, kick)
SEND_RARP                                      ``migration_done``
IOTLB_MSG UPDATE                               ``iotlb_updated``
IOTLB_MSG INVALIDATE                           ``iotlb_invalidate`` (in place), or
                                               as a ring re-set-up
============================================  ==================================

The device is *ready* when, for a net device, queues 0 and 1 are ready (the
first pair, as DPDK's built-in net rule), and otherwise when at least one
queue is ready and every enabled queue is.  ``dev_conf`` runs once per
ready period: after ``dev_close`` the device is configured again when it is
next ready.  The ports' ``new_device`` / ``destroy_device`` callbacks (DPDK's
``rte_vhost_device_ops``) bracket the same period.

A ring re-set-up while it runs is handled as DPDK handles a new memory
table: the hardware lets go of every ring (``dev_close``) and is configured
again once the new rings are ready, because the ring objects it was given
are replaced.

What the connection offers is the device's capabilities intersected with
the port's: feature bits, protocol features (never in-band notifications:
kicks go to the device's data path, not through the control plane) and the
queue count.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable
from typing import Protocol

from pyvdpa.device import Device, QueueNotRunningError, RingPosition, RingSpec
from pyvdpa.errors import PyvdpaError
from pyvdpa.vdpa.device import VdpaDevice
from pyvdpa.vhost_user.protocol import ProtocolFeature
from pyvdpa.virtio.constants import DeviceId, VirtioFeature

__all__ = [
    "UNSUPPORTED_PROTOCOL_FEATURES",
    "DeviceCallback",
    "PortSettings",
    "VhostAdapter",
]

log = logging.getLogger(__name__)

#: Protocol features a vDPA device is never offered with.
UNSUPPORTED_PROTOCOL_FEATURES = ProtocolFeature.INBAND_NOTIFICATIONS

#: An application callback on a vhost device (``new_device``, ``destroy_device``).
DeviceCallback = Callable[["VhostAdapter"], None]

_vids = itertools.count()


class PortSettings(Protocol):
    """What a connection takes from its port (a :class:`~pyvdpa.vdpa.port.VdpaPort`)."""

    path: str
    queue_num: int | None
    features: int | None
    protocol_features: ProtocolFeature
    new_device: DeviceCallback | None
    destroy_device: DeviceCallback | None


class VhostAdapter(Device):
    """One front-end's vhost device, bound to :attr:`device` through ``port``.

    Drivers read the connection's state from it: :attr:`vid`,
    :attr:`ifname`, :attr:`negotiated_features`, :attr:`mtu`,
    :attr:`rarp_mac` and the ready vrings (:meth:`vring`,
    :meth:`ready_vrings`).
    """

    def __init__(self, device: VdpaDevice, port: PortSettings) -> None:
        caps = device.capabilities()
        self.device = device
        self.vid = next(_vids)
        self.ifname = port.path
        self.queue_num = caps.queue_num
        if port.queue_num is not None:
            self.queue_num = min(self.queue_num, port.queue_num)
        self.num_queues = (
            2 * self.queue_num if device.device_type is DeviceId.NET else self.queue_num
        )
        features = caps.features if port.features is None else caps.features & port.features
        # The back-end connection offers ACCESS_PLATFORM itself, and only when
        # the protocol features let IOTLB messages through.
        self.access_platform = bool(features & VirtioFeature.ACCESS_PLATFORM)
        self.features = features & ~VirtioFeature.ACCESS_PLATFORM
        self.protocol_features = (
            caps.protocol_features & port.protocol_features & ~UNSUPPORTED_PROTOCOL_FEATURES
        )
        self.negotiated_features = 0
        self.mtu: int | None = None
        self.rarp_mac: bytes | None = None
        #: ``dev_conf`` succeeded and ``dev_close`` has not run since.
        self.configured = False
        #: ``new_device`` was called and ``destroy_device`` has not been since.
        self.running = False
        self._new_device = port.new_device
        self._destroy_device = port.destroy_device
        self._ready: dict[int, RingSpec] = {}
        self._enabled: dict[int, bool] = {}
        # Where the hardware left rings it stopped while the connection kept them.
        self._positions: dict[int, RingPosition] = {}

    def __repr__(self) -> str:
        return f"VhostAdapter(vid={self.vid}, {self.ifname!r}, device={self.device.name!r})"

    # ------------------------------------------------------------------ for drivers

    def vring(self, qid: int) -> RingSpec | None:
        """Ring ``qid`` if it is ready (resuming where the hardware last left it), else ``None``."""
        spec = self._ready.get(qid)
        position = self._positions.get(qid)
        if spec is None or position is None:
            return spec
        return spec.resumed_at(position)

    def ready_vrings(self) -> list[RingSpec]:
        """The ready rings, by index."""
        rings = (self.vring(qid) for qid in sorted(self._ready))
        return [ring for ring in rings if ring is not None]

    def ring_stopped(self, qid: int, position: RingPosition) -> None:
        """The hardware stopped ring ``qid`` at ``position`` (drivers call this)."""
        if qid in self._ready:
            self._positions[qid] = position

    def is_ready(self) -> bool:
        """Whether the device as a whole is ready for ``dev_conf``."""
        if self.device.device_type is DeviceId.NET:
            return 0 in self._ready and 1 in self._ready
        return bool(self._ready) and all(
            qid in self._ready for qid, enabled in self._enabled.items() if enabled
        )

    # ------------------------------------------------------------------ Device

    def set_features(self, features: int) -> None:
        """SET_FEATURES: record them and tell the device."""
        self.negotiated_features = features
        self._call("set_features", self.device.ops.set_features, self)

    def vring_state_changed(self, index: int, enabled: bool) -> None:
        """An enable change may complete (or hold back) the device's readiness."""
        self._enabled[index] = enabled
        self._maybe_configure()

    def start_queue(self, spec: RingSpec) -> None:
        """The ring is ready: ``set_vring_state(qid, True)``, then ``dev_conf`` if due."""
        self._enabled[spec.index] = True
        self._ready[spec.index] = spec
        self._positions.pop(spec.index, None)
        self._call("set_vring_state", self.device.ops.set_vring_state, self, spec.index, True)
        self._maybe_configure()

    def stop_queue(self, index: int) -> RingPosition:
        """The ring stops being ready; unless merely disabled, the device is closed first."""
        spec = self._ready.get(index)
        if spec is None:
            raise QueueNotRunningError(f"ring {index} is not running")
        if self._enabled.get(index, False):
            self._close_device()
        self._call("set_vring_state", self.device.ops.set_vring_state, self, index, False)
        del self._ready[index]
        return self._positions.pop(index, spec.position)

    def reset(self) -> None:
        """RESET_OWNER, RESET_DEVICE or disconnect: close the device, forget the rings."""
        self._close_device()
        self._ready.clear()
        self._enabled.clear()
        self._positions.clear()
        self.negotiated_features = 0

    def send_rarp(self, mac: bytes) -> None:
        """SEND_RARP: live migration finished; ``migration_done`` if the device has it."""
        self.rarp_mac = mac
        if self.device.supports("migration_done"):
            self._call("migration_done", self.device.migration_done, self)

    def iotlb_updated(self) -> None:
        """IOTLB entries were added: ``iotlb_updated`` if the device has it."""
        if self.device.supports("iotlb_updated"):
            self._call("iotlb_updated", self.device.iotlb_updated, self)

    def iotlb_invalidate(self, iova: int, size: int, invalidate: Callable[[], None]) -> bool:
        """IOTLB INVALIDATE in place through the device's ``iotlb_invalidate``, if it has it.

        Otherwise the back-end restarts the rings, which closes the device
        (``dev_close``) and configures it again.
        """
        if not self.device.supports("iotlb_invalidate"):
            return False
        return self.device.iotlb_invalidate(self, iova, size, invalidate)

    def set_mtu(self, mtu: int) -> None:
        """NET_SET_MTU: recorded for the driver (read it in ``dev_conf``)."""
        self.mtu = mtu

    def get_config(self, offset: int, size: int) -> bytes:
        """GET_CONFIG through the device's ``get_config``."""
        return self.device.get_config(self, offset, size)

    def set_config(self, offset: int, data: bytes) -> None:
        """SET_CONFIG through the device's ``set_config``."""
        self.device.set_config(self, offset, data)

    # ------------------------------------------------------------------ internals

    def _maybe_configure(self) -> None:
        if self.configured or not self.is_ready():
            return
        if not self.running and self._new_device is not None:
            self._callback(self._new_device)
        self.running = True
        if self._call("dev_conf", self.device.ops.dev_conf, self):
            self.configured = True

    def _close_device(self) -> None:
        if self.running and self._destroy_device is not None:
            self._callback(self._destroy_device)
        self.running = False
        if self.configured:
            self.configured = False
            self._call("dev_close", self.device.ops.dev_close, self)

    def _call(self, op: str, method: Callable[..., object], *args: object) -> bool:
        """Run a device operation; a failure is logged, as the vhost library logs it."""
        try:
            method(*args)
        except PyvdpaError as exc:
            log.error("%s: %s: %s failed: %s", self.ifname, self.device.name, op, exc)
            return False
        return True

    def _callback(self, callback: DeviceCallback) -> None:
        try:
            callback(self)
        except PyvdpaError as exc:
            log.error("%s: application callback failed: %s", self.ifname, exc)
