"""The back-end under check: fresh connections, sessions, traffic, liveness.

Theory of operation: every case connects afresh (many back-ends serve one
front-end at a time, and a case that breaks its connection must not poison
the next), with a receive and send timeout on the socket so that a
back-end that stops answering fails the case instead of hanging the run.
A back-end that refuses a new front-end while it is still tearing the
previous one down (pyvdpa's own devices do) is given a few seconds.

:class:`CheckSession` is the driver session of :mod:`pyvdpa.drive` with
what the cases vary: the order of the SET_VRING_* requests and a kick
held back until the case says so.  :class:`Traffic` moves buffers through
a negotiated session: net frames sent on the TX ring (and, from a back-end
that sends them back, received on the RX ring and compared), blk sectors
written and read back.  :meth:`Target.probe` is the liveness check run
after every hostile case: a fresh connection negotiates and moves one
buffer.
"""

from __future__ import annotations

import contextlib
import enum
import os
import select
import socket
import struct
import time
from collections.abc import Iterator, Sequence

from pyvdpa.check.model import CaseFailedError, NotApplicableError, Offer
from pyvdpa.drive.info import infer_device_type
from pyvdpa.drive.net import FrameCheck, build_frame, check_frame
from pyvdpa.drive.session import DriverRing, Session
from pyvdpa.errors import ConfigError, PyvdpaError, TransportError
from pyvdpa.vhost_user import codec
from pyvdpa.vhost_user.frontend import Frontend
from pyvdpa.vhost_user.protocol import HeaderFlags, ProtocolFeature
from pyvdpa.vhost_user.transport import Channel, Frame, close_fds, connect
from pyvdpa.virtio.blk import SECTOR_SIZE, BlkRequestHeader
from pyvdpa.virtio.constants import BlkFeature, BlkStatus, BlkType, DeviceId, VirtioFeature
from pyvdpa.virtio.net import net_header_size

__all__ = ["BASE_FEATURES", "CheckSession", "RingOrder", "Target", "Traffic", "timed_out"]

#: What every session asks for when offered: the modern interface and protocol features.
BASE_FEATURES = VirtioFeature.VERSION_1 | VirtioFeature.PROTOCOL_FEATURES
#: Protocol features every session uses when offered.
BASE_PROTOCOL = (
    ProtocolFeature.MQ
    | ProtocolFeature.REPLY_ACK
    | ProtocolFeature.CONFIG
    | ProtocolFeature.CONFIGURE_MEM_SLOTS
)
#: Shared memory of one session: rings, buffers, indirect tables.
SESSION_MEMORY = 8 << 20
#: How long a back-end that refuses new front-ends may take to accept one again.
RECONNECT_SECONDS = 5.0
#: The sector the blk cases write and read (the first 4 KiB are left alone).
BLK_SECTOR = 64
_FRAME_SIZE = 128
_SLOT = 2048


def timed_out(exc: BaseException) -> bool:
    """Whether ``exc`` is a receive that hit the socket timeout."""
    return isinstance(exc, TransportError) and isinstance(exc.__cause__, BlockingIOError)


def _set_timeouts(channel: Channel, seconds: float) -> None:
    """Bound every receive and send on ``channel`` (SO_RCVTIMEO, SO_SNDTIMEO)."""
    whole = int(seconds)
    value = struct.pack("@ll", whole, int((seconds - whole) * 1e6))
    sock = socket.socket(fileno=os.dup(channel.fileno()))
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, value)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, value)
    finally:
        sock.close()


class RingOrder(enum.Enum):
    """The order of a ring's SET_VRING_* requests."""

    #: DPDK virtio-user: CALL, NUM, BASE, ADDR, KICK.
    DPDK = "dpdk"
    #: QEMU 7.2: NUM, BASE, ADDR, KICK, CALL.
    QEMU = "qemu"


class CheckSession(Session):
    """A driver session whose ring set-up the cases vary.

    ``order`` is the order of the SET_VRING_* requests; with ``hold_kick``
    no SET_VRING_KICK is sent until :meth:`send_kick`.
    """

    def __init__(
        self,
        frontend: Frontend,
        *,
        order: RingOrder = RingOrder.DPDK,
        hold_kick: bool = False,
        iommu: bool = False,
    ) -> None:
        super().__init__(frontend, memory_size=SESSION_MEMORY, iommu=iommu)
        self.order = order
        self.hold_kick = hold_kick
        #: Device addresses of each ring's areas (desc, avail or driver, used or device).
        self.areas: dict[int, tuple[int, int, int]] = {}

    def _describe_ring(self, ring: DriverRing, desc: int, avail: int, used: int) -> None:
        self.areas[ring.index] = (desc, avail, used)
        fe = self.frontend
        if self.order is RingOrder.DPDK:
            fe.set_vring_call(ring.index, ring.call_fd)
        fe.set_vring_num(ring.index, ring.queue.size)
        fe.set_vring_base(ring.index, 0x8000 if self.packed else 0)
        fe.set_vring_addr(self.vring_addr(ring.index, desc, avail, used))
        if not self.hold_kick:
            self.send_kick(ring)
        if self.order is RingOrder.QEMU:
            fe.set_vring_call(ring.index, ring.call_fd)

    def vring_addr(
        self, index: int, desc: int, avail: int, used: int, log: int | None = None
    ) -> codec.VringAddr:
        """SET_VRING_ADDR's payload for areas at device addresses (``log``: log used writes)."""
        flags = codec.VringAddrFlags.LOG if log is not None else codec.VringAddrFlags(0)
        return codec.VringAddr(
            index,
            flags,
            self.ring_address(desc),
            self.ring_address(used),
            self.ring_address(avail),
            log or 0,
        )

    def send_kick(self, ring: DriverRing) -> None:
        """SET_VRING_KICK with the ring's eventfd."""
        self.frontend.set_vring_kick(ring.index, ring.kick_fd)


class Target:
    """The back-end listening at ``path``, checked with ``timeout`` on every receive."""

    def __init__(self, path: str, device: DeviceId | None, *, timeout: float = 5.0) -> None:
        self.path = path
        self.timeout = timeout
        self._device = device
        self._offer: Offer | None = None

    @property
    def offer(self) -> Offer:
        """What the back-end offered (read by :meth:`discover`)."""
        if self._offer is None:
            raise ConfigError("the back-end's offer is not known yet")
        return self._offer

    @property
    def device(self) -> DeviceId:
        """The device type checked."""
        return self.offer.device

    # ------------------------------------------------------------------ connections

    def channel(self) -> Channel:
        """A new connection with timeouts (the caller closes it)."""
        channel = connect(self.path, timeout=self.timeout)
        _set_timeouts(channel, self.timeout)
        return channel

    def connect(self) -> Frontend:
        """A fresh front-end whose GET_FEATURES was answered.

        Retries for :data:`RECONNECT_SECONDS` while the back-end closes new
        connections at once (it is still done with the previous one).
        """
        deadline = time.monotonic() + RECONNECT_SECONDS
        while True:
            frontend = Frontend(self.channel())
            try:
                frontend.get_features()
            except TransportError as exc:
                frontend.close()
                if timed_out(exc) or time.monotonic() >= deadline:
                    raise
                time.sleep(0.1)
                continue
            except BaseException:
                frontend.close()
                raise
            return frontend

    @contextlib.contextmanager
    def session(
        self,
        *,
        order: RingOrder = RingOrder.DPDK,
        hold_kick: bool = False,
        iommu: bool = False,
    ) -> Iterator[CheckSession]:
        """A fresh :class:`CheckSession`, closed on exit."""
        session = CheckSession(self.connect(), order=order, hold_kick=hold_kick, iommu=iommu)
        with session:
            yield session

    def negotiate(
        self,
        session: Session,
        extra: int = 0,
        *,
        protocol: ProtocolFeature = BASE_PROTOCOL,
    ) -> int:
        """Negotiate the base features and ``extra`` (each must be offered)."""
        wanted = BASE_FEATURES | (BlkFeature.BLK_SIZE if self.device == DeviceId.BLOCK else 0)
        return session.negotiate(wanted, extra, protocol=protocol)

    # ------------------------------------------------------------------ discovery and liveness

    def discover(self) -> Offer:
        """Ask what the back-end offers, and whether a net back-end returns frames."""
        with contextlib.closing(self.connect()) as frontend:
            features = frontend.get_features()
            offered = bool(features & VirtioFeature.PROTOCOL_FEATURES)
            protocol = frontend.get_protocol_features() if offered else ProtocolFeature(0)
            queues = None
            if protocol & ProtocolFeature.MQ:
                frontend.set_protocol_features(ProtocolFeature.MQ)
                queues = frontend.get_queue_num()
        device = self._device if self._device is not None else infer_device_type(features)
        if device is None:
            raise ConfigError("cannot tell the device type from the features offered: give --type")
        self._offer = Offer(device, features, protocol, offered, queues, loopback=False)
        loopback = False
        if device == DeviceId.NET:
            # A back-end whose data path does not work at all fails the cases
            # that use it, one by one, rather than this question.
            with contextlib.suppress(CaseFailedError), self.session() as session:
                self.negotiate(session)
                traffic = Traffic(self, session)
                traffic.start()
                loopback = traffic.returns_frames()
        self._offer = Offer(device, features, protocol, offered, queues, loopback)
        return self._offer

    def probe(self) -> None:
        """The back-end still serves: a fresh connection negotiates and moves one buffer."""
        with self.session() as session:
            self.negotiate(session)
            traffic = Traffic(self, session)
            traffic.start()
            traffic.move(1)


class Traffic:
    """Buffers through a negotiated session (see the module)."""

    def __init__(
        self,
        target: Target,
        session: CheckSession,
        *,
        ring_size: int = 32,
        indirect: bool = False,
    ) -> None:
        self.target = target
        self.session = session
        self.ring_size = ring_size
        self.indirect = indirect
        self.net = target.device == DeviceId.NET
        self.rings: list[DriverRing] = []
        self._seq = 0
        self._rx_posted: dict[int, int] = {}
        self._rx_free: list[int] = []
        self._tx_slots: list[int] = []
        self._blk_slot = 0
        #: Chains completed out of the order they were made available.
        self.out_of_order = 0
        #: ``num_buffers`` of every frame received (net, 12-byte header).
        self.num_buffers: list[int] = []
        #: Device addresses of the buffers the back-end wrote.
        self.written: list[int] = []
        #: Used-buffer notifications (call eventfd signals) seen, by ring index.
        self.calls: dict[int, int] = {}
        #: Chains made available, by ring index.
        self.made: dict[int, int] = {}
        #: Descriptors those chains took, by ring index (a packed ring's index counts these).
        self.slots: dict[int, int] = {}

    # ------------------------------------------------------------------ set-up

    def setup(self) -> list[DriverRing]:
        """Allocate and describe the rings (RX and TX for net, one for blk)."""
        session = self.session
        indirect = self.indirect
        if self.net:
            self.rings = [
                session.setup_ring(0, self.ring_size, indirect_area=indirect),
                session.setup_ring(1, self.ring_size, indirect_area=indirect),
            ]
            self._rx_free = [session.alloc(_SLOT, 64) for _ in range(self.ring_size)]
            self._tx_slots = [session.alloc(_SLOT, 64) for _ in range(self.ring_size)]
        else:
            self.rings = [session.setup_ring(0, self.ring_size, indirect_area=indirect)]
            self._blk_slot = session.alloc(512 + 4096 + 1, 4096)
        return self.rings

    def start(self) -> None:
        """Set up the rings, enable them and give a net back-end receive buffers."""
        self.setup()
        self.session.enable_rings()
        self.post_rx()

    def post_rx(self) -> None:
        """Fill the RX ring (net) and kick it."""
        if not self.net:
            return
        rx = self.rings[0]
        while self._rx_free and rx.queue.num_free:
            addr = self._rx_free.pop()
            head = self._add(rx, [], [(addr, _SLOT)])
            self._rx_posted[head] = addr
        rx.kick()

    @property
    def tx(self) -> DriverRing:
        """The ring buffers are sent on (net TX, blk's only ring)."""
        return self.rings[1] if self.net else self.rings[0]

    def _add(
        self,
        ring: DriverRing,
        readable: Sequence[tuple[int, int]],
        writable: Sequence[tuple[int, int]],
    ) -> int:
        self.made[ring.index] = self.made.get(ring.index, 0) + 1
        slots = 1 if self.indirect else len(readable) + len(writable)
        self.slots[ring.index] = self.slots.get(ring.index, 0) + slots
        return ring.queue.add(readable, writable, indirect=self.indirect)

    # ------------------------------------------------------------------ moving buffers

    def move(self, count: int) -> str:
        """Move ``count`` buffers, one ring's worth at most at a time; raise if one is lost."""
        done = 0
        while done < count:
            batch = min(count - done, max(1, self.ring_size // 2))
            if self.net:
                self._net_batch(batch)
            else:
                for _ in range(batch):
                    self._blk_roundtrip()
            done += batch
        return f"{count} buffer(s) moved"

    def wait_call(self, ring: DriverRing, timeout: float) -> bool:
        """Wait up to ``timeout`` for ``ring``'s call eventfd; count and consume it."""
        if ring.call_fd is None or not select.select([ring.call_fd], [], [], timeout)[0]:
            return False
        with contextlib.suppress(BlockingIOError):
            os.eventfd_read(ring.call_fd)
        self.calls[ring.index] = self.calls.get(ring.index, 0) + 1
        return True

    def wait_used(self, ring: DriverRing, expected: list[int], what: str) -> list[tuple[int, int]]:
        """Wait until the chains ``expected`` (in this order) are used; return (id, len)."""
        got: list[tuple[int, int]] = []
        deadline = time.monotonic() + self.target.timeout
        pending = list(expected)
        while pending:
            used = ring.queue.get_used()
            if used is None:
                if time.monotonic() >= deadline:
                    raise CaseFailedError(
                        f"{len(pending)} of {len(expected)} {what} not used within "
                        f"{self.target.timeout:g} s"
                    )
                self.wait_call(ring, 0.02)
                continue
            if used[0] not in pending:
                raise CaseFailedError(f"{what}: used id {used[0]} was not in flight")
            if used[0] != pending[0]:
                self.out_of_order += 1
            pending.remove(used[0])
            got.append(used)
        return got

    def _net_batch(self, count: int) -> None:
        frames = self.send_frames(count)
        if self.target.offer.loopback:
            self._receive(frames, net_header_size(self.session.features))

    def send_frames(self, count: int) -> list[bytes]:
        """Send ``count`` frames on TX and wait until the back-end used them all."""
        heads, frames = self.post_frames(count)
        self.wait_used(self.tx, heads, "TX chains")
        return frames

    def post_frames(self, count: int) -> tuple[list[int], list[bytes]]:
        """Make ``count`` frames available on TX and kick; return their chain ids and frames."""
        session, tx = self.session, self.tx
        hdr = net_header_size(session.features)
        heads, frames = [], []
        for i in range(count):
            frame = build_frame(_FRAME_SIZE, self._seq)
            self._seq += 1
            addr = self._tx_slots[i]
            session.memory.write(addr, bytes(hdr) + frame)
            heads.append(self._add(tx, [(addr, hdr + len(frame))], []))
            frames.append(frame)
        tx.kick()
        return heads, frames

    def _receive(self, frames: list[bytes], hdr: int) -> None:
        rx = self.rings[0]
        deadline = time.monotonic() + self.target.timeout
        wanted = set(frames)
        while wanted:
            used = rx.queue.get_used()
            if used is None:
                if time.monotonic() >= deadline:
                    raise CaseFailedError(
                        f"{len(wanted)} of {len(frames)} frames never came back on RX"
                    )
                self.wait_call(rx, 0.02)
                continue
            head, length = used
            addr = self._rx_posted.pop(head, None)
            if addr is None:
                raise CaseFailedError(f"RX: used id {head} was not in flight")
            self._rx_free.append(addr)
            if not hdr <= length <= _SLOT:
                raise CaseFailedError(f"RX: used length {length} for a {_SLOT}-byte buffer")
            self.written.append(addr)
            header = self.session.memory.read(addr, hdr)
            if hdr >= 12:
                self.num_buffers.append(int.from_bytes(header[10:12], "little"))
            frame = self.session.memory.read(addr + hdr, length - hdr)
            verdict = check_frame(frame)
            if verdict is FrameCheck.CORRUPT:
                raise CaseFailedError("RX: a frame came back corrupted")
            wanted.discard(frame)
        self.post_rx()

    def _blk_roundtrip(self) -> None:
        session, ring = self.session, self.tx
        mem = session.memory
        header, data, status = self._blk_slot, self._blk_slot + 512, self._blk_slot + 512 + 4096
        payload = bytes((self._seq + i) & 0xFF for i in range(SECTOR_SIZE))
        self._seq += 1
        writable = not session.features & BlkFeature.RO
        if writable:
            mem.write(header, BlkRequestHeader(BlkType.OUT, 0, BLK_SECTOR).pack())
            mem.write(data, payload)
            mem.write(status, b"\xff")
            head = self._add(ring, [(header, 16), (data, SECTOR_SIZE)], [(status, 1)])
            ring.kick()
            self.wait_used(ring, [head], "blk write")
            if mem.read(status, 1)[0] != BlkStatus.OK:
                raise CaseFailedError(
                    f"blk write of sector {BLK_SECTOR}: status {mem.read(status, 1)[0]}"
                )
        mem.write(header, BlkRequestHeader(BlkType.IN, 0, BLK_SECTOR).pack())
        mem.write(data, bytes(SECTOR_SIZE))
        mem.write(status, b"\xff")
        head = self._add(ring, [(header, 16)], [(data, SECTOR_SIZE), (status, 1)])
        ring.kick()
        ((_, length),) = self.wait_used(ring, [head], "blk read")
        self.written.append(data)
        if mem.read(status, 1)[0] != BlkStatus.OK:
            raise CaseFailedError(
                f"blk read of sector {BLK_SECTOR}: status {mem.read(status, 1)[0]}"
            )
        if writable and mem.read(data, SECTOR_SIZE) != payload:
            raise CaseFailedError(
                f"blk sector {BLK_SECTOR} read back differs from what was written"
            )
        if length < 1:
            raise CaseFailedError(f"blk read: used length {length}")

    def returns_frames(self) -> bool:
        """Whether the net back-end sends back a frame it is given (within a second)."""
        hdr = net_header_size(self.session.features)
        frame = build_frame(_FRAME_SIZE, 0xFFFF)
        addr = self._tx_slots[0]
        self.session.memory.write(addr, bytes(hdr) + frame)
        head = self._add(self.tx, [(addr, hdr + len(frame))], [])
        self.tx.kick()
        self.wait_used(self.tx, [head], "TX chains")
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline:
            if self.rings[0].queue.get_used() is not None:
                return True
            self.session.wait_call(0.02)
        return False

    def quiet(self, ring: DriverRing, seconds: float = 0.5) -> bool:
        """Whether ``ring`` completes nothing for ``seconds``."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if ring.queue.get_used() is not None:
                return False
            self.session.wait_call(0.02)
        return True


class RawPeer:
    """A connection that sends whatever frames it is told to, built with the codec.

    For the hostile cases: :meth:`send` writes a header and body as given;
    :meth:`answer` says what came back.
    """

    def __init__(self, target: Target) -> None:
        self.target = target
        self.frontend = target.connect()
        self.reply_ack = False

    def handshake(self) -> None:
        """SET_PROTOCOL_FEATURES (REPLY_ACK when offered) and SET_OWNER."""
        offer = self.target.offer
        if offer.protocol_offered:
            wanted = offer.protocol_features & (ProtocolFeature.REPLY_ACK | ProtocolFeature.MQ)
            self.frontend.set_protocol_features(ProtocolFeature(wanted))
            self.reply_ack = bool(wanted & ProtocolFeature.REPLY_ACK)
        self.frontend.set_owner()

    def send(
        self, request: int, body: bytes = b"", fds: Sequence[int] = (), flags: int | None = None
    ) -> None:
        """One frame: ``request``, ``flags`` (VERSION, NEED_REPLY with REPLY_ACK), ``body``."""
        if flags is None:
            flags = HeaderFlags.VERSION | (HeaderFlags.NEED_REPLY if self.reply_ack else 0)
        self.frontend.channel.send(codec.HEADER.pack(request, flags, len(body)) + body, fds)

    def send_bytes(self, data: bytes) -> None:
        """Raw bytes on the socket."""
        self.frontend.channel.send(data)

    def answer(self) -> str:
        """What the back-end did with the last frame sent.

        ``refused`` (a non-zero REPLY_ACK), ``accepted`` (REPLY_ACK 0),
        ``closed`` (the connection is gone), ``silent`` (no reply but the
        connection answers a GET_FEATURES after it), or ``hung`` (nothing).
        """
        channel = self.frontend.channel
        try:
            if self.reply_ack:
                frame = channel.recv()
                close_fds(frame.fds)
                return _ack_verdict(frame)
            self.frontend.get_features()
            return "silent"
        except TransportError as exc:
            return "hung" if timed_out(exc) else "closed"
        except PyvdpaError:
            return "closed"

    def close(self) -> None:
        """Close the connection."""
        self.frontend.close()


def _ack_verdict(frame: Frame) -> str:
    if frame.header.flags & HeaderFlags.REPLY and len(frame.body) == 8:
        return "refused" if int.from_bytes(frame.body, "little") else "accepted"
    return "garbled"


def require_loopback(target: Target) -> None:
    """Raise :class:`NotApplicableError` when a net back-end returns no frames."""
    if target.device == DeviceId.NET and not target.offer.loopback:
        raise NotApplicableError("the back-end sends no frames back (not a loopback)")
