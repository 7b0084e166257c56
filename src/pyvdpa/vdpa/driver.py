"""vDPA drivers, and the simulated devices they drive.

Theory of operation (DPDK's vDPA drivers, e.g. ``drivers/vdpa/ifc``, and
Linux ``vdpa_sim``): a driver *probes* a device description, brings up the
"hardware", checks that it can do vDPA, and registers it with its operations
in a :class:`~pyvdpa.vdpa.registry.VdpaRegistry`; *remove* unregisters it and
releases the hardware.

The simulated hardware is a device model whose queues run apart from the
control plane, straight on the guest's rings, on the compiled engine:
:class:`~pyvdpa.dataplane.net.EngineNetDevice` and
:class:`~pyvdpa.dataplane.blk.EngineBlkDevice`.  The Python device models
(:class:`~pyvdpa.devices.net.NetDevice`, :class:`~pyvdpa.devices.blk.BlkDevice`),
which the tests hold the engine to, can be driven the same way.
:class:`SimDeviceOps` is the driver side of the ops table: ``dev_conf``
hands the hardware every ready ring, ``set_vring_state`` adds or removes one
ring while configured, ``dev_close`` takes them all back and resets the
hardware.  The hardware only ever runs between ``dev_conf`` and
``dev_close``: that is the vDPA contract.  The hardware's config listener is
the vhost device of the connection that last set features or configured
it, so a config change (``set_link``) reaches that front-end, as a DPDK
driver calls ``rte_vhost_backend_config_change`` for its ``vid``.
"""

from __future__ import annotations

import abc
import threading
from collections.abc import Callable, Mapping
from typing import ClassVar

from pyvdpa.dataplane import kernels as k
from pyvdpa.dataplane.blk import EngineBlkDevice
from pyvdpa.dataplane.net import NET_PROGRAMS, EngineNetDevice
from pyvdpa.device import RingSpec
from pyvdpa.devices.blk import BlkDevice
from pyvdpa.devices.net import DEFAULT_MAC, NetDevice
from pyvdpa.devices.stats import STAT_NAMES
from pyvdpa.errors import ConfigError
from pyvdpa.vdev import SIM_NET_MODES, VdevSpec, parse_bool, parse_int, parse_size
from pyvdpa.vdpa.device import VdpaDevice, VdpaError, VhostDevice
from pyvdpa.vdpa.registry import VdpaRegistry
from pyvdpa.vhost_user.protocol import ProtocolFeature
from pyvdpa.virtio.constants import DeviceId, VirtioFeature
from pyvdpa.virtio.net import parse_mac

__all__ = [
    "BLK_STAT_NAMES",
    "DRIVERS",
    "NET_STAT_NAMES",
    "SimBlkDriver",
    "SimDeviceOps",
    "SimDriver",
    "SimNetDriver",
    "VdpaDriver",
]

#: Per-queue counters of a simulated net device (DPDK's names, plus traffic).
NET_STAT_NAMES = STAT_NAMES

#: The two net data paths: the compiled engine, and the Python one.
NetHardware = NetDevice | EngineNetDevice

#: The two blk data paths: the compiled engine, and the Python reference.
BlkHardware = EngineBlkDevice | BlkDevice

#: Per-queue counters of a simulated blk device (DPDK's names).
BLK_STAT_NAMES = tuple(name for name in STAT_NAMES if name not in ("packets", "bytes"))


class SimDeviceOps:
    """The vDPA operations of a simulated device over its hardware model."""

    def __init__(self, hardware: NetHardware | BlkHardware) -> None:
        self.hardware = hardware
        if isinstance(hardware, NetHardware):
            self.device_type = DeviceId.NET
            self.stat_names = NET_STAT_NAMES
        else:
            self.device_type = DeviceId.BLOCK
            self.stat_names = BLK_STAT_NAMES
        self._configured = False
        self._running: dict[int, RingSpec] = {}
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ capabilities

    def get_queue_num(self) -> int:
        """Queue pairs of a net device, queues of a blk device."""
        hw = self.hardware
        return hw.queue_pairs if isinstance(hw, NetHardware) else hw.num_queues

    def get_features(self) -> int:
        """The hardware's feature bits; vDPA devices always take protocol features.

        ``VIRTIO_F_ACCESS_PLATFORM`` when the hardware can work behind an IOMMU.
        """
        features = int(self.hardware.features) | int(VirtioFeature.PROTOCOL_FEATURES)
        if self.hardware.access_platform:
            features |= int(VirtioFeature.ACCESS_PLATFORM)
        return features

    def get_protocol_features(self) -> ProtocolFeature:
        """The protocol features the hardware supports."""
        return self.hardware.protocol_features

    def get_dev_type(self) -> DeviceId:
        """Net or block."""
        return self.device_type

    # ------------------------------------------------------------------ control path

    def set_features(self, vhost: VhostDevice) -> None:
        """Program the negotiated features (they size the net header).

        The connection's vhost device becomes the hardware's config
        listener: a config change (a link going down) reaches its front-end.
        """
        self.hardware.config_listener = vhost.config_changed
        self.hardware.set_features(vhost.negotiated_features)

    def dev_conf(self, vhost: VhostDevice) -> None:
        """Apply the front-end's MTU and hand the hardware every ready ring."""
        with self._lock:
            hw = self.hardware
            hw.config_listener = vhost.config_changed
            if vhost.mtu is not None and isinstance(hw, NetHardware):
                hw.set_mtu(vhost.mtu)
            self._configured = True
            for spec in vhost.ready_vrings():
                self._start(spec)

    def dev_close(self, vhost: VhostDevice) -> None:
        """Take every ring back from the hardware and reset it."""
        with self._lock:
            self._configured = False
            for qid in list(self._running):
                self._stop(vhost, qid)
            self.hardware.reset()

    def set_vring_state(self, vhost: VhostDevice, qid: int, enable: bool) -> None:
        """While configured, start or stop the hardware queue of ring ``qid``."""
        with self._lock:
            if not enable:
                self._stop(vhost, qid)
                return
            spec = vhost.vring(qid)
            if self._configured and spec is not None:
                self._start(spec)

    def iotlb_updated(self, vhost: VhostDevice) -> None:
        """New IOTLB entries: the hardware's queues waiting for one retry."""
        self.hardware.iotlb_updated()

    def iotlb_invalidate(
        self, vhost: VhostDevice, iova: int, size: int, invalidate: Callable[[], None]
    ) -> bool:
        """Withdraw translations in the hardware's own queues, if it can."""
        return self.hardware.iotlb_invalidate(iova, size, invalidate)

    def migration_done(self, vhost: VhostDevice) -> None:
        """Announce the guest's MAC after live migration (net devices)."""
        hw = self.hardware
        if isinstance(hw, NetHardware) and vhost.rarp_mac is not None:
            hw.send_rarp(vhost.rarp_mac)

    def get_config(self, vhost: VhostDevice, offset: int, size: int) -> bytes:
        """Read the hardware's config space."""
        return self.hardware.get_config(offset, size)

    def set_config(self, vhost: VhostDevice, offset: int, data: bytes) -> None:
        """Write the hardware's config space."""
        self.hardware.set_config(offset, data)

    # ------------------------------------------------------------------ statistics

    def get_stats_names(self) -> tuple[str, ...]:
        """Names of the per-queue counters."""
        return self.stat_names

    def get_stats(self, qid: int) -> Mapping[str, int]:
        """Counters of queue ``qid``."""
        counters = self.hardware.stats[qid].as_dict()
        return {name: counters[name] for name in self.stat_names}

    def reset_stats(self, qid: int) -> None:
        """Zero the counters of queue ``qid``."""
        self.hardware.stats[qid].reset()

    # ------------------------------------------------------------------ hardware

    def close(self) -> None:
        """Release the hardware (TAP, disk); the device must be closed already."""
        self.hardware.close()

    def _start(self, spec: RingSpec) -> None:
        if spec.index not in self._running:
            self.hardware.start_queue(spec)
            self._running[spec.index] = spec

    def _stop(self, vhost: VhostDevice, qid: int) -> None:
        if self._running.pop(qid, None) is not None:
            vhost.ring_stopped(qid, self.hardware.stop_queue(qid))


class VdpaDriver(abc.ABC):
    """A vDPA driver: probes device descriptions and registers the devices."""

    #: The ``--vdev`` kind this driver probes.
    kind: ClassVar[str]

    @abc.abstractmethod
    def probe(self, spec: VdevSpec, registry: VdpaRegistry) -> VdpaDevice:
        """Bring up the device ``spec`` describes and register it."""

    @abc.abstractmethod
    def remove(self, device: VdpaDevice, registry: VdpaRegistry) -> None:
        """Unregister ``device`` and release its hardware."""


class SimDriver(VdpaDriver):
    """The driver of simulated devices: the hardware is a :mod:`pyvdpa.devices` model."""

    def __init__(self) -> None:
        self._ops: dict[str, SimDeviceOps] = {}
        self._lock = threading.Lock()

    def probe(self, spec: VdevSpec, registry: VdpaRegistry) -> VdpaDevice:
        """Build the hardware, register it, and keep its ops for :meth:`remove`."""
        if spec.kind != self.kind:
            raise ConfigError(f"{self.kind} driver cannot probe a {spec.kind} device")
        if spec.name in registry:
            raise VdpaError(f"{spec.name}: cannot register: a device of that name exists")
        ops = SimDeviceOps(self.build(spec))
        try:
            device = registry.register(spec.name, ops)
        except BaseException:
            ops.close()
            raise
        with self._lock:
            self._ops[device.name] = ops
        return device

    def hardware(self, device: VdpaDevice) -> NetHardware | BlkHardware:
        """The simulated hardware behind ``device`` (for control planes beside vhost-user)."""
        with self._lock:
            ops = self._ops.get(device.name)
        if ops is None or device.ops is not ops:
            raise VdpaError(f"{device.name}: not a device of the {self.kind} driver")
        return ops.hardware

    def remove(self, device: VdpaDevice, registry: VdpaRegistry) -> None:
        """Unregister ``device`` (refused while attached), then release its hardware."""
        with self._lock:
            ops = self._ops.get(device.name)
            if ops is None or device.ops is not ops:
                raise VdpaError(f"{device.name}: not a device of the {self.kind} driver")
            registry.unregister(device)
            del self._ops[device.name]
        ops.close()

    @abc.abstractmethod
    def build(self, spec: VdevSpec) -> NetHardware | BlkHardware:
        """Bring up the simulated hardware ``spec`` describes (on the compiled engine)."""

    @abc.abstractmethod
    def program(self, spec: VdevSpec) -> int:
        """The compiled data path program the device ``spec`` describes runs."""


class SimNetDriver(SimDriver):
    """Simulated virtio-net devices (like Linux ``vdpa_sim_net``)."""

    kind = "sim-net"

    @staticmethod
    def _mode(spec: VdevSpec) -> str:
        mode = spec.options.get("mode", "loopback")
        if mode not in SIM_NET_MODES:
            raise ConfigError(f"unknown sim-net mode {mode!r} ({', '.join(SIM_NET_MODES)})")
        return mode

    def program(self, spec: VdevSpec) -> int:
        """The program of the device's mode."""
        return NET_PROGRAMS[self._mode(spec)]

    def build(self, spec: VdevSpec) -> EngineNetDevice:
        """An engine net device; in ``tap`` mode with its TAP interface."""
        o, t = spec.options, spec.text
        mode = self._mode(spec)
        if "ifname" in o and mode != "tap":
            raise ConfigError(f"ifname={o['ifname']} needs mode=tap")
        if "frame-size" in o and mode != "gen":
            raise ConfigError(f"--vdev {t!r}: frame-size= needs mode=gen")
        return EngineNetDevice(
            mode=mode,
            ifname=o.get("ifname"),
            mac=parse_mac(o["mac"]) if "mac" in o else DEFAULT_MAC,
            mtu=parse_int(t, "mtu", o.get("mtu", "1500"), 68, 65535),
            queue_pairs=parse_int(t, "queues", o.get("queues", "1"), 1, 128),
            frame_size=parse_int(t, "frame-size", o.get("frame-size", "64"), 60, 9000),
            engine_mode=spec.engine,
            cpus=spec.cpus,
            burst=parse_int(t, "burst", o["burst"], 1, k.MAX_BURST) if "burst" in o else None,
        )


class SimBlkDriver(SimDriver):
    """Simulated virtio-blk devices (like Linux ``vdpa_sim_blk``)."""

    kind = "sim-blk"

    def program(self, spec: VdevSpec) -> int:
        """The blk program."""
        return k.P_BLK

    def build(self, spec: VdevSpec) -> EngineBlkDevice:
        """An engine blk device on a file or a RAM disk."""
        o, t = spec.options, spec.text
        return EngineBlkDevice(
            path=o.get("path"),
            size=parse_size(o["size"]) if "size" in o else None,
            readonly=parse_bool(t, "readonly", o.get("readonly", "off")),
            serial=o.get("serial", spec.name),
            queues=parse_int(t, "queues", o.get("queues", "1"), 1, 64),
            engine_mode=spec.engine,
            cpus=spec.cpus,
        )


#: The drivers ``--vdev`` kinds name.
DRIVERS: dict[str, type[SimDriver]] = {
    SimNetDriver.kind: SimNetDriver,
    SimBlkDriver.kind: SimBlkDriver,
}
