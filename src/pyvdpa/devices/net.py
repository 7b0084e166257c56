"""A simulated virtio-net device on the Python slow path, and the control surface it shares.

Theory of operation (virtio 1.2, section 5.1.6; Linux ``vdpa_sim_net``):
queue ``2k`` is the driver's receive queue and ``2k + 1`` its transmit
queue.  Every transmitted buffer starts with a virtio-net header; what
follows is one Ethernet frame.

:class:`NetDevice` runs two of the programs of the compiled
:class:`~pyvdpa.dataplane.net.EngineNetDevice` with the step-by-step queues
of :mod:`pyvdpa.virtio`: a readable reference, and a device whose queues
run on plain threads for the vhost-user layer's own tests.  Modes:

* ``loopback`` — a frame sent on pair *k* is received on pair *k*, if it is
  broadcast, multicast or addressed to the device's MAC (others are
  counted as dropped), as ``vdpa_sim_net`` does.  Frames wait in a small
  per-pair backlog until the driver posts receive buffers.
* ``drop`` — transmitted frames are consumed and counted.

With MRG_RXBUF a frame may span several receive chains; the header's
``num_buffers`` says how many.  A hostile ring breaks only its queue.

Locking: each pair has a lock held while a thread touches that pair's
receive ring (the TX worker in loopback, the RX worker).  A receive ring
leaves :attr:`NetDevice._vrings` under that lock before its worker is
stopped, so once :meth:`NetDevice.stop_queue` returns no thread holds it
any more.

:class:`NetControl` is what every net device shares whatever runs its
queues: the checked configuration, the feature offer, the config space and
the MTU, and the link status: :meth:`NetControl.set_link` flips
VIRTIO_NET_S_LINK_UP and tells the control plane, which tells the driver
(the driver then reads the status, virtio 1.2 section 5.1.4.2; the data path
keeps running, as ``vdpa_sim_net`` keeps it).
"""

from __future__ import annotations

import struct
import threading
from collections import deque

from pyvdpa.device import (
    Device,
    RingPosition,
    ThreadedDevice,
    UnsupportedRequestError,
    Virtqueue,
)
from pyvdpa.devices.stats import QueueStats
from pyvdpa.errors import ConfigError, IotlbMissError, RingError
from pyvdpa.vhost_user.protocol import ProtocolFeature
from pyvdpa.virtio.constants import DeviceId, NetFeature, NetStatus, VirtioFeature
from pyvdpa.virtio.net import NET_CONFIG_SIZE, NetConfig, NetHeader, net_header_size
from pyvdpa.virtio.ring import BufferAddressError, ChainTooLongError, DescriptorChain

__all__ = [
    "BACKLOG",
    "DEFAULT_MAC",
    "NET_FEATURES",
    "NET_MODES",
    "NET_PROTOCOL_FEATURES",
    "NetControl",
    "NetDevice",
    "count_ring_error",
    "rarp_frame",
]

NET_MODES = ("loopback", "drop")
#: Frames a loopback pair keeps for the driver's next receive buffers.
BACKLOG = 256
#: The MAC a simulated NIC has unless told otherwise (a locally administered QEMU prefix).
DEFAULT_MAC = bytes.fromhex("525400123456")

_ETHER = struct.Struct("!6s6sH")
_RARP = struct.Struct("!HHBBH6s4s6s4s")
_ETH_P_RARP = 0x8035
_RARP_REQUEST_REVERSE = 3
_MIN_FRAME = 60

NET_FEATURES = (
    VirtioFeature.VERSION_1
    | VirtioFeature.RING_EVENT_IDX
    | VirtioFeature.RING_INDIRECT_DESC
    | VirtioFeature.RING_PACKED
    | VirtioFeature.IN_ORDER
    | VirtioFeature.LOG_ALL
    | NetFeature.MAC
    | NetFeature.MTU
    | NetFeature.STATUS
    | NetFeature.MRG_RXBUF
)

NET_PROTOCOL_FEATURES = (
    ProtocolFeature.MQ
    | ProtocolFeature.LOG_SHMFD
    | ProtocolFeature.RARP
    | ProtocolFeature.REPLY_ACK
    | ProtocolFeature.BACKEND_REQ
    | ProtocolFeature.NET_MTU
    | ProtocolFeature.CONFIG
    | ProtocolFeature.CONFIGURE_MEM_SLOTS
    | ProtocolFeature.RESET_DEVICE
    | ProtocolFeature.INBAND_NOTIFICATIONS
)


def count_ring_error(stats: QueueStats, error: RingError) -> None:
    """Count a ring error under the DPDK statistic that names it."""
    if isinstance(error, ChainTooLongError):
        stats.exceed_max_chain += 1
    elif isinstance(error, BufferAddressError):
        stats.invalid_buffer += 1
    else:
        stats.bad_desc_errors += 1


def rarp_frame(mac: bytes) -> bytes:
    """The RARP announcement a migrated NIC broadcasts so switches learn ``mac``."""
    body = _RARP.pack(1, 0x0800, 6, 4, _RARP_REQUEST_REVERSE, mac, bytes(4), mac, bytes(4))
    frame = _ETHER.pack(b"\xff" * 6, mac, _ETH_P_RARP) + body
    return frame.ljust(_MIN_FRAME, b"\0")


class NetControl(Device):
    """The virtio-net control surface every net data path shares.

    The config space (MAC, link status, queue pairs, MTU) is read-only for the
    driver; NET_SET_MTU changes the MTU, :meth:`set_link` the link status.
    """

    #: virtio device type and config space size (the device interface's).
    device_id = DeviceId.NET
    config_size = NET_CONFIG_SIZE

    mac: bytes
    mtu: int
    queue_pairs: int
    num_queues: int
    features: int
    protocol_features: ProtocolFeature
    negotiated: int
    #: VIRTIO_NET_S_LINK_UP in the config status.
    link_up: bool

    def _init_net(self, *, mac: bytes, mtu: int, queue_pairs: int, status_feature: bool) -> None:
        """Check the configuration and set the config space and the feature offer."""
        if not 1 <= queue_pairs <= 128:
            raise ConfigError(f"queue pairs must be 1..128, not {queue_pairs}")
        if not 68 <= mtu <= 65535:
            raise ConfigError(f"MTU must be 68..65535, not {mtu}")
        if len(mac) != 6:
            raise ConfigError(f"a MAC address has 6 bytes, not {len(mac)}")
        self.mac = mac
        self.mtu = mtu
        self.queue_pairs = queue_pairs
        self.num_queues = 2 * queue_pairs
        self.features = NET_FEATURES | (NetFeature.MQ if queue_pairs > 1 else 0)
        self.protocol_features = NET_PROTOCOL_FEATURES
        if status_feature:
            self.protocol_features |= ProtocolFeature.STATUS
        self.negotiated = 0
        self.link_up = True

    def config(self) -> NetConfig:
        """The config space as it stands."""
        status = NetStatus.LINK_UP if self.link_up else NetStatus(0)
        return NetConfig(self.mac, status, self.queue_pairs, self.mtu)

    def set_link(self, up: bool) -> None:
        """Set or clear VIRTIO_NET_S_LINK_UP, then tell the control plane (:meth:`config_changed`).

        The config space changes even when the control plane fails to tell
        the driver (its error propagates); setting the status it has already
        tells the driver again.
        """
        self.link_up = up
        self.config_changed()

    def get_config(self, offset: int, size: int) -> bytes:
        """Read the virtio-net config space."""
        return self.config().read(offset, size)

    def set_config(self, offset: int, data: bytes) -> None:
        """The net config space is read-only for the driver."""
        raise UnsupportedRequestError("virtio-net config space is read-only")

    def set_mtu(self, mtu: int) -> None:
        """Accept the MTU the front-end chose."""
        self.mtu = mtu


class NetDevice(NetControl, ThreadedDevice):
    """A virtio-net device looping frames back or dropping them, its queues run by Python.

    Works behind an IOMMU (``VIRTIO_F_ACCESS_PLATFORM``): a frame whose
    receive buffers miss a translation waits in the backlog.
    """

    access_platform = True

    def __init__(
        self,
        *,
        mode: str = "loopback",
        mac: bytes = DEFAULT_MAC,
        mtu: int = 1500,
        queue_pairs: int = 1,
        status_feature: bool = False,
    ) -> None:
        super().__init__()
        if mode not in NET_MODES:
            raise ConfigError(f"unknown sim-net mode {mode!r} ({', '.join(NET_MODES)})")
        self._init_net(mac=mac, mtu=mtu, queue_pairs=queue_pairs, status_feature=status_feature)
        self.mode = mode
        self.stats = [QueueStats() for _ in range(self.num_queues)]
        self.dropped = 0
        self._vrings: dict[int, Virtqueue] = {}
        self._backlog: list[deque[bytes]] = [deque() for _ in range(queue_pairs)]
        self._pair_locks = [threading.Lock() for _ in range(queue_pairs)]

    def close(self) -> None:
        """Nothing to release: the device holds no host resource."""

    # ------------------------------------------------------------------ control

    def set_features(self, features: int) -> None:
        """Remember the negotiated features (they size the header)."""
        self.negotiated = features

    def send_rarp(self, mac: bytes) -> None:
        """Nothing to announce to: a simulated device has no upstream switch."""

    def ring_starting(self, ring: Virtqueue) -> None:
        """Let the pair deliver into the ring before its worker starts."""
        with self._pair_locks[ring.index // 2]:
            self._vrings[ring.index] = ring

    def stop_queue(self, index: int) -> RingPosition:
        """Forget the ring (under its pair's lock), then stop its worker."""
        with self._pair_locks[index // 2]:
            self._vrings.pop(index, None)
        return super().stop_queue(index)

    def reset(self) -> None:
        """Drop pending frames."""
        for backlog in self._backlog:
            backlog.clear()

    # ------------------------------------------------------------------ data path

    def process(self, vring: Virtqueue) -> None:
        """Drain a TX ring, or deliver waiting frames into a newly refilled RX ring."""
        pair = vring.index // 2
        with self._pair_locks[pair]:
            if vring.index % 2:
                self._transmit(vring, pair)
            if self.mode != "drop":
                self._deliver(pair)

    def _accepts(self, frame: bytes) -> bool:
        dst = frame[:6]
        return len(frame) >= 14 and (dst[0] & 1 == 1 or dst == self.mac)

    def _transmit(self, vring: Virtqueue, pair: int) -> None:
        queue = vring.queue
        stats = self.stats[vring.index]
        hdr = net_header_size(self.negotiated)
        backlog = self._backlog[pair]
        pushed = False
        while True:
            try:
                chain = queue.pop()
            except RingError as exc:
                count_ring_error(stats, exc)
                raise
            except IotlbMissError:
                # Frames taken before the missing translation are signalled now.
                if pushed:
                    vring.notify()
                raise
            if chain is None:
                break
            stats.received_desc += 1
            length = chain.readable_len() - hdr
            if length < 0:
                stats.invalid_buffer += 1
            else:
                stats.packets += 1
                stats.bytes += length
                frame = chain.read_all()[hdr:]
                if self.mode == "loopback" and self._accepts(frame) and len(backlog) < BACKLOG:
                    backlog.append(frame)
                else:
                    self.dropped += 1
            queue.push(chain, 0)
            stats.completed_desc += 1
            pushed = True
        if pushed:
            vring.notify()

    def _deliver(self, pair: int) -> None:
        rx = self._vrings.get(2 * pair)
        backlog = self._backlog[pair]
        if rx is None or rx.broken or not backlog:
            return
        stats = self.stats[rx.index]
        delivered = False
        try:
            while backlog:
                if not self._receive_one(rx, backlog[0], stats):
                    break
                backlog.popleft()
                delivered = True
        except RingError as exc:
            count_ring_error(stats, exc)
            rx.fail(exc)
        except IotlbMissError:
            if delivered:
                rx.notify()
            raise
        if delivered:
            rx.notify()

    def _receive_one(self, rx: Virtqueue, frame: bytes, stats: QueueStats) -> bool:
        """Write one frame into receive chains; False when no buffer is available."""
        queue = rx.queue
        assert queue is not None
        hdr_size = net_header_size(self.negotiated)
        mergeable = bool(self.negotiated & NetFeature.MRG_RXBUF)
        payload = frame
        chains: list[tuple[DescriptorChain, int]] = []
        remaining = hdr_size + len(payload)
        header_len = hdr_size
        while remaining > 0:
            try:
                chain = queue.pop()
            except IotlbMissError:
                # The frame stays in the backlog for when the translation
                # arrives; buffers already taken go back empty.
                for held, _ in chains:
                    queue.push(held, 0)
                raise
            if chain is None:
                if chains:
                    # Not enough buffers yet: the frame is lost, the chains are returned empty.
                    for held, _ in chains:
                        queue.push(held, 0)
                    self.dropped += 1
                    return True
                return False
            stats.received_desc += 1
            capacity = chain.writable_len()
            if capacity < (header_len if not chains else 1):
                stats.invalid_buffer += 1
                if chains and queue.in_order:
                    # In order, the chains held go back first: the frame is lost.
                    for held, _ in chains:
                        queue.push(held, 0)
                    queue.push(chain, 0)
                    stats.completion_errors += 1
                    self.dropped += 1
                    return True
                queue.push(chain, 0)
                stats.completion_errors += 1
                continue
            take = min(capacity, remaining)
            chains.append((chain, take))
            remaining -= take
            if not mergeable and remaining > 0:
                stats.invalid_buffer += 1
                queue.push(chain, 0)
                self.dropped += 1
                return True
        stream = NetHeader(num_buffers=len(chains)).pack(hdr_size) + payload
        offset = 0
        for chain, take in chains:
            written = chain.write(stream[offset : offset + take])
            offset += take
            queue.push(chain, written)
            stats.completed_desc += 1
        stats.packets += 1
        stats.bytes += len(frame)
        return True
