"""A simulated virtio-net device on the Python slow path.

Theory of operation (virtio 1.2, section 5.1.6; Linux ``vdpa_sim_net``):
queue ``2k`` is the driver's receive queue and ``2k + 1`` its transmit
queue.  Every transmitted buffer starts with a virtio-net header; what
follows is one Ethernet frame.

Modes:

* ``loopback`` — a frame sent on pair *k* is received on pair *k*, if it is
  broadcast, multicast or addressed to the device's MAC (others are
  counted as dropped), as ``vdpa_sim_net`` does.  Frames wait in a small
  per-pair backlog until the driver posts receive buffers.
* ``tap`` — the device is a NIC wired to a TAP interface
  (:mod:`pyvdpa.devices.tap`): transmitted frames are written to the TAP,
  and a reader thread per pair moves the frames the host stack sends to the
  TAP into receive buffers.  When the driver posts no receive buffers the
  reader stops reading, so the kernel's TAP queue absorbs the burst; frames
  arriving while the receive ring is not running are dropped, as a NIC with
  its link down drops them.  The TAP queue of every pair but the first is
  attached only while the pair's receive ring runs, so that the kernel
  spreads the host's frames over the pairs the driver uses (a guest with
  fewer CPUs than pairs enables only some), as QEMU's own TAP back-end does.
* ``drop`` — transmitted frames are consumed and counted.

With MRG_RXBUF a frame may span several receive chains; the header's
``num_buffers`` says how many.  A hostile ring breaks only its queue.

Locking: each pair has a lock held while a thread touches that pair's
receive ring (the TX worker in loopback, the TAP reader, the RX worker).
A receive ring leaves :attr:`NetDevice._vrings` under that lock before its
worker is stopped, so once :meth:`NetDevice.stop_queue` returns no thread
holds it any more.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import struct
import threading
from collections import deque
from collections.abc import Sequence

from pyvdpa.devices.stats import QueueStats
from pyvdpa.devices.tap import TAP_FRAME_MAX, Tap
from pyvdpa.errors import ConfigError, RingError
from pyvdpa.vhost_user.device import ThreadedDevice, UnsupportedRequestError, Vring
from pyvdpa.vhost_user.protocol import ProtocolFeature
from pyvdpa.virtio.constants import NetFeature, NetStatus, VirtioFeature
from pyvdpa.virtio.net import NetConfig, NetHeader, net_header_size
from pyvdpa.virtio.ring import (
    BufferAddressError,
    ChainTooLongError,
    DescriptorChain,
    Segment,
)

__all__ = [
    "NET_MODES",
    "NetControl",
    "NetDevice",
    "count_ring_error",
    "rarp_frame",
]

log = logging.getLogger(__name__)

NET_MODES = ("loopback", "tap", "drop")
BACKLOG = 256
#: Frames a TAP reader takes per wake-up before it delivers them.
TAP_BATCH = 64
#: Default TAP name template; the kernel fills in ``%d``.
TAP_NAME = "pyvdpa%d"

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


class NetControl:
    """The virtio-net control surface every net data path shares.

    The config space (MAC, link status, queue pairs, MTU) is read-only for the
    driver; NET_SET_MTU changes the MTU.
    """

    mac: bytes
    mtu: int
    queue_pairs: int

    def config(self) -> NetConfig:
        """The config space as it stands."""
        return NetConfig(self.mac, NetStatus.LINK_UP, self.queue_pairs, self.mtu)

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
    """A virtio-net device looping frames back, wired to a TAP, or dropping them.

    ``ifname`` names the TAP in ``tap`` mode (a ``%d`` template lets the
    kernel choose); the TAP is created here, so a name that cannot be used
    is a :class:`ConfigError` at once.  :meth:`close` releases it.
    """

    def __init__(
        self,
        *,
        mode: str = "loopback",
        mac: bytes = bytes.fromhex("525400123456"),
        mtu: int = 1500,
        queue_pairs: int = 1,
        status_feature: bool = False,
        ifname: str | None = None,
    ) -> None:
        super().__init__()
        if mode not in NET_MODES:
            raise ConfigError(f"unknown sim-net mode {mode!r} ({', '.join(NET_MODES)})")
        if not 1 <= queue_pairs <= 128:
            raise ConfigError(f"queue pairs must be 1..128, not {queue_pairs}")
        if not 68 <= mtu <= 65535:
            raise ConfigError(f"MTU must be 68..65535, not {mtu}")
        if ifname is not None and mode != "tap":
            raise ConfigError(f"ifname={ifname} needs mode=tap, not mode={mode}")
        self.mode = mode
        self.mac = mac
        self.mtu = mtu
        self.queue_pairs = queue_pairs
        self.num_queues = 2 * queue_pairs
        self.features = NET_FEATURES | (NetFeature.MQ if queue_pairs > 1 else 0)
        self.protocol_features = NET_PROTOCOL_FEATURES
        if status_feature:
            self.protocol_features |= ProtocolFeature.STATUS
        self.negotiated = 0
        self.stats = [QueueStats() for _ in range(self.num_queues)]
        self.dropped = 0
        self._vrings: dict[int, Vring] = {}
        self._backlog: list[deque[bytes]] = [deque() for _ in range(queue_pairs)]
        self._pair_locks = [threading.Lock() for _ in range(queue_pairs)]
        self.tap: Tap | None = None
        self._wakes: list[int] = []
        self._readers: list[threading.Thread] = []
        self._closing = False
        if mode == "tap":
            self._open_tap(ifname or TAP_NAME)

    def _open_tap(self, ifname: str) -> None:
        tap = Tap(ifname, queues=self.queue_pairs)
        self.tap = tap
        for pair in range(1, self.queue_pairs):
            tap.set_queue_attached(pair, False)
        for pair in range(self.queue_pairs):
            self._wakes.append(os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK))
            reader = threading.Thread(
                target=self._tap_reader, args=(pair,), name=f"tap-{tap.name}-{pair}", daemon=True
            )
            self._readers.append(reader)
            reader.start()

    def close(self) -> None:
        """Stop the TAP readers and release the TAP (``tap`` mode)."""
        self._closing = True
        for wake in self._wakes:
            os.eventfd_write(wake, 1)
        for reader in self._readers:
            reader.join()
        self._readers.clear()
        for wake in self._wakes:
            os.close(wake)
        self._wakes.clear()
        if self.tap is not None:
            self.tap.close()

    # ------------------------------------------------------------------ control

    def set_features(self, features: int) -> None:
        """Remember the negotiated features (they size the header)."""
        self.negotiated = features

    def send_rarp(self, mac: bytes) -> None:
        """Announce ``mac`` on the TAP; in other modes there is no switch to tell."""
        if self.tap is not None:
            self._tap_send(0, [rarp_frame(mac)])

    def start_queue(self, vring: Vring) -> None:
        """Track the ring, then start its worker."""
        with self._pair_locks[vring.index // 2]:
            self._vrings[vring.index] = vring
            self._steer(vring, True)
        super().start_queue(vring)

    def stop_queue(self, vring: Vring) -> None:
        """Forget the ring (under its pair's lock), then stop its worker."""
        with self._pair_locks[vring.index // 2]:
            self._vrings.pop(vring.index, None)
            self._steer(vring, False)
        super().stop_queue(vring)

    def _steer(self, vring: Vring, running: bool) -> None:
        """Let the kernel send to a pair's TAP queue only while its receive ring runs."""
        pair = vring.index // 2
        if self.tap is None or vring.index % 2 or pair == 0:
            return
        self.tap.set_queue_attached(pair, running)
        # The reader polls the queue only while it is attached.
        os.eventfd_write(self._wakes[pair], 1)

    def reset(self) -> None:
        """Drop pending frames (a TAP reader waiting for room reads again)."""
        for backlog in self._backlog:
            backlog.clear()
        for wake in self._wakes:
            os.eventfd_write(wake, 1)

    # ------------------------------------------------------------------ data path

    def process(self, vring: Vring) -> None:
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

    def _transmit(self, vring: Vring, pair: int) -> None:
        queue = vring.queue
        assert queue is not None
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
            if chain is None:
                break
            stats.received_desc += 1
            length = chain.readable_len() - hdr
            if length < 0:
                stats.invalid_buffer += 1
            else:
                stats.packets += 1
                stats.bytes += length
                if self.tap is not None:
                    self._tap_send(pair, _skip(chain.readable, hdr))
                else:
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
        if rx is None or rx.queue is None or rx.broken or not backlog:
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
        if delivered:
            rx.notify()
            if self._wakes:
                # The TAP reader may be waiting for room in the backlog.
                os.eventfd_write(self._wakes[pair], 1)

    # ------------------------------------------------------------------ TAP

    def _tap_send(self, pair: int, buffers: Sequence[memoryview | bytes]) -> None:
        tap = self.tap
        assert tap is not None
        try:
            tap.write(pair, buffers)
        except OSError:
            # The interface is down or the frame malformed: the wire drops it.
            self.dropped += 1

    def _tap_reader(self, pair: int) -> None:
        """Move frames from the TAP into the pair's receive ring until :meth:`close`."""
        tap = self.tap
        assert tap is not None
        wake = self._wakes[pair]
        backlog = self._backlog[pair]
        buffer = memoryview(bytearray(TAP_FRAME_MAX))
        poller = select.poll()
        poller.register(wake, select.POLLIN)
        reading = False
        while not self._closing:
            # A detached queue polls as an error: wait for it to be attached.
            wanted = len(backlog) < BACKLOG and tap.attached[pair]
            if wanted != reading:
                if wanted:
                    poller.register(tap.fds[pair], select.POLLIN)
                else:
                    poller.unregister(tap.fds[pair])
                reading = wanted
            poller.poll()
            with contextlib.suppress(BlockingIOError):
                os.eventfd_read(wake)
            if self._closing:
                return
            try:
                self._tap_receive(pair, buffer)
            except OSError as exc:
                log.error("TAP %s: read failed: %s", tap.name, exc)
                return
            with self._pair_locks[pair]:
                self._deliver(pair)

    def _tap_receive(self, pair: int, buffer: memoryview) -> None:
        tap = self.tap
        assert tap is not None
        backlog = self._backlog[pair]
        for _ in range(TAP_BATCH):
            if len(backlog) >= BACKLOG:
                return
            length = tap.read_into(pair, buffer)
            if length is None:
                return
            if 2 * pair in self._vrings:
                backlog.append(bytes(buffer[:length]))
            else:
                self.dropped += 1

    def _receive_one(self, rx: Vring, frame: bytes, stats: QueueStats) -> bool:
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
            chain = queue.pop()
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


def _skip(segments: tuple[Segment, ...], count: int) -> list[memoryview]:
    """The views of ``segments`` without their first ``count`` bytes."""
    views = []
    for segment in segments:
        view = segment.view
        if count >= len(view):
            count -= len(view)
            continue
        views.append(view[count:])
        count = 0
    return views
