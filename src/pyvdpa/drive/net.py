"""Net traffic over any net device, vhost-user or vhost-vdpa (like DPDK testpmd).

Theory of operation (virtio 1.2, section 5.1.6): queue ``2k`` receives and
``2k + 1`` transmits.  A transmitted packet is one readable buffer holding
the virtio-net header and the frame; a receive buffer is one writable
buffer the device fills with a header and a frame (with MRG_RXBUF the
header's ``num_buffers`` says how many buffers one frame took).

Modes follow testpmd: ``txonly`` sends generated frames and recycles
completed buffers; ``rxonly`` keeps the receive rings full and counts what
arrives; ``io`` sends a first burst and then retransmits every received
frame (testpmd's ``start tx_first`` with io forwarding).  Each generated
frame carries a sequence number and a checksum of its payload, so received
frames are checked: a corrupted one is counted in ``rx_bad`` (and in io
mode replaced by a fresh frame rather than sent on); frames some other
sender made (a peer generating its own traffic) are counted in
``rx_foreign`` and are not errors.

A back-end that breaks the ring protocol is counted in ``errors``: a
receive buffer returned with a used length no frame can have (shorter than
the virtio-net header or longer than the buffer) is dropped and reposted;
a used entry naming a chain that is not in flight ends the run, since the
ring's state can no longer be trusted.
"""

from __future__ import annotations

import enum
import logging
import struct
import time
import zlib
from collections import deque
from collections.abc import Sequence
from dataclasses import asdict, dataclass

from pyvdpa.drive import compiled
from pyvdpa.drive.compiled import CompiledQueue
from pyvdpa.drive.session import DriverRing, DriverSession, Session
from pyvdpa.drive.vhost_vdpa import VdpaSession
from pyvdpa.errors import ConfigError, RingError
from pyvdpa.virtio.constants import DeviceId, NetFeature, VirtioFeature
from pyvdpa.virtio.net import net_header_size

__all__ = [
    "COMPILED_MODES",
    "ENGINES",
    "FrameCheck",
    "NetResult",
    "build_frame",
    "check_frame",
    "compiled_gap",
    "run_net",
]

log = logging.getLogger(__name__)

_ETH = struct.Struct("!6s6sH")
_TAG = struct.Struct("!4sQI")  # magic, sequence, crc32 of the rest
_MAGIC = b"PYVD"
_MIN_FRAME = _ETH.size + _TAG.size
SRC_MAC = bytes.fromhex("02a0a0000001")
BROADCAST = b"\xff" * 6
RX_BUFFER = 2048 + 12
BURST = 32
#: Seconds the back-end gets, once the run ends, to take the frames posted.
QUIESCE_SECONDS = 1.0
#: The drivers ``run_net`` can run: compiled kernels without the GIL, or this module's loop.
ENGINES = ("compiled", "python")
#: The modes the compiled driver runs.
COMPILED_MODES = ("txonly", "rxonly", "io")


def build_frame(size: int, seq: int, dst: bytes = BROADCAST, src: bytes = SRC_MAC) -> bytes:
    """An Ethernet frame of ``size`` bytes carrying ``seq`` and a payload checksum."""
    if size < _MIN_FRAME:
        raise ConfigError(f"frame size {size} below the minimum of {_MIN_FRAME} bytes")
    fill = bytes((seq + i) & 0xFF for i in range(size - _MIN_FRAME))
    tag = _TAG.pack(_MAGIC, seq, zlib.crc32(fill))
    return _ETH.pack(dst, src, 0x88B5) + tag + fill


class FrameCheck(enum.Enum):
    """What :func:`check_frame` found."""

    INTACT = "intact"
    CORRUPT = "corrupt"
    FOREIGN = "foreign"


def check_frame(frame: bytes) -> FrameCheck:
    """Whether ``frame`` is one :func:`build_frame` made and is intact."""
    if len(frame) < _MIN_FRAME or frame[_ETH.size : _ETH.size + len(_MAGIC)] != _MAGIC:
        return FrameCheck.FOREIGN
    _, _, crc = _TAG.unpack_from(frame, _ETH.size)
    if zlib.crc32(frame[_MIN_FRAME:]) == crc:
        return FrameCheck.INTACT
    return FrameCheck.CORRUPT


@dataclass
class NetResult:
    """What a net run measured (``--json`` prints these keys).

    ``errors`` counts what the back-end did wrong (impossible used lengths,
    a completed chain that was not in flight); ``rx_bad`` counts corrupted
    frames.  Either makes ``pyvdpa drive`` exit with status 1.
    """

    mode: str
    duration: float
    tx_packets: int = 0
    tx_bytes: int = 0
    rx_packets: int = 0
    rx_bytes: int = 0
    rx_bad: int = 0
    rx_foreign: int = 0
    errors: int = 0
    tx_pps: float = 0.0
    rx_pps: float = 0.0
    tx_bps: float = 0.0
    rx_bps: float = 0.0
    #: IOTLB misses the back-end sent and the session answered (``--iommu``).
    iotlb_misses: int = 0
    #: Mappings the session withdrew and gave again during the run (vhost-vdpa ``--iommu``).
    iotlb_remaps: int = 0

    def finish(self, elapsed: float) -> None:
        """Compute rates over ``elapsed`` seconds."""
        self.duration = elapsed
        if elapsed > 0:
            self.tx_pps = self.tx_packets / elapsed
            self.rx_pps = self.rx_packets / elapsed
            self.tx_bps = self.tx_bytes * 8 / elapsed
            self.rx_bps = self.rx_bytes * 8 / elapsed

    def as_dict(self) -> dict[str, object]:
        """The figures as a JSON-ready dict."""
        return asdict(self)


NET_WANTED = (
    VirtioFeature.VERSION_1
    | VirtioFeature.RING_EVENT_IDX
    | VirtioFeature.RING_INDIRECT_DESC
    | VirtioFeature.PROTOCOL_FEATURES
    | VirtioFeature.IN_ORDER
    | NetFeature.MAC
    | NetFeature.STATUS
)


class _TxPath:
    """One transmit ring with preallocated buffers."""

    def __init__(self, session: DriverSession, ring: DriverRing, hdr: int, frame: bytes) -> None:
        self.session = session
        self.ring = ring
        self.hdr = hdr
        size = ring.queue.size
        self.slot = hdr + max(len(frame), 1518)
        base = session.alloc(self.slot * size, 64)
        self.free = deque(base + i * self.slot for i in range(size))
        self.busy: dict[int, int] = {}
        self.frame_size = len(frame)

    def reclaim(self) -> None:
        while (used := self.ring.get_used()) is not None:
            self.free.append(self.busy.pop(used[0]))

    def send(self, frame: bytes) -> bool:
        if not self.free or self.ring.queue.num_free == 0:
            return False
        addr = self.free.popleft()
        self.session.memory.write(addr, bytes(self.hdr) + frame)
        head = self.ring.add([(addr, self.hdr + len(frame))], [])
        self.busy[head] = addr
        return True


class _RxPath:
    """One receive ring kept full of buffers."""

    def __init__(self, session: DriverSession, ring: DriverRing, hdr: int) -> None:
        self.session = session
        self.ring = ring
        self.hdr = hdr
        size = ring.queue.size
        base = session.alloc(RX_BUFFER * size, 64, device_writes=True)
        self.busy: dict[int, int] = {}
        for i in range(size):
            self._post(base + i * RX_BUFFER)

    def _post(self, addr: int) -> None:
        head = self.ring.add([], [(addr, RX_BUFFER)])
        self.busy[head] = addr

    def receive(self, result: NetResult) -> list[bytes]:
        """The frames the back-end delivered; impossible used lengths count as errors."""
        frames: list[bytes] = []
        queue = self.ring.queue
        taken = 0
        # At most one ring's worth: a back-end refilling as fast as buffers
        # are reposted would otherwise keep this loop, and the run, going.
        while taken < queue.size and (used := self.ring.get_used()) is not None:
            taken += 1
            head, length = used
            addr = self.busy.pop(head)
            if self.hdr <= length <= RX_BUFFER:
                frames.append(self.session.memory.read(addr + self.hdr, length - self.hdr))
            else:
                result.errors += 1
                log.error(
                    "vring %d: used length %d for a %d-byte receive buffer (header %d)",
                    self.ring.index, length, RX_BUFFER, self.hdr,
                )  # fmt: skip
            self._post(addr)
        if taken:
            self.ring.kick()
        return frames


def compiled_gap(session: DriverSession, mode: str) -> str | None:
    """Why the compiled driver cannot run ``mode`` on ``session``; None when it can."""
    if mode not in COMPILED_MODES:
        return f"the compiled driver runs {', '.join(COMPILED_MODES)} only, not {mode}"
    if isinstance(session, Session) and session.inband:
        return "the compiled driver kicks through eventfds, not in-band messages"
    if isinstance(session, Session) and session.log_all:
        return "the dirty-log check (--log-all) reads the Python driver's record of its buffers"
    if isinstance(session, VdpaSession) and session.iommu:
        return "vhost-vdpa remapping (--iommu) needs the Python driver's record of buffers"
    return None


def _choose_engine(session: DriverSession, mode: str, engine: str | None) -> str:
    """The engine to run: ``engine`` if given (refused where it cannot run), else the best."""
    if engine is not None and engine not in ENGINES:
        raise ConfigError(f"unknown engine {engine!r} ({', '.join(ENGINES)})")
    gap = compiled_gap(session, mode)
    if engine == "compiled" and gap is not None:
        raise ConfigError(f"--engine compiled: {gap}")
    if engine is None and gap is not None:
        log.warning("%s: running the Python driver", gap)
        return "python"
    return engine or "compiled"


def run_net(
    session: DriverSession,
    *,
    mode: str = "txonly",
    frame_size: int = 64,
    queues: int = 1,
    packed: bool = False,
    mrg_rxbuf: bool = True,
    in_order: bool = True,
    ring_size: int = 256,
    duration: float = 5.0,
    packets: int | None = None,
    progress: bool = False,
    engine: str | None = None,
    burst: int = BURST,
    cpus: Sequence[int] = (),
) -> NetResult:
    """Negotiate a net device on ``session`` and run traffic; return the figures.

    ``in_order``: ask VIRTIO_F_IN_ORDER (used when the back-end offers it;
    the Python driver only).  ``engine`` is ``compiled`` or ``python``
    (:data:`ENGINES`); None runs the compiled driver where it covers the mode
    (:func:`compiled_gap`) and the Python one elsewhere, with a warning.
    ``cpus`` pins the compiled driver's threads, one per queue pair.
    """
    if mode not in ("txonly", "rxonly", "io"):
        raise ConfigError(f"unknown mode {mode!r} (txonly, rxonly, io)")
    if not 1 <= burst <= ring_size:
        raise ConfigError(f"burst {burst} outside 1..{ring_size} (the ring size)")
    chosen = _choose_engine(session, mode, engine)
    wanted = NET_WANTED | (NetFeature.MRG_RXBUF if mrg_rxbuf else 0)
    # The compiled driver reads every used entry: it does not batch them in order.
    if not in_order or chosen == "compiled":
        wanted &= ~VirtioFeature.IN_ORDER
    wanted |= NetFeature.MQ if queues > 1 else 0
    required = VirtioFeature.RING_PACKED if packed else 0
    features = session.negotiate(wanted, required, device=DeviceId.NET)
    if queues > 1:
        available = session.max_queues() // 2
        if not features & NetFeature.MQ or available < queues:
            raise ConfigError(f"back-end offers {max(available, 1)} queue pair(s), {queues} asked")
    hdr = net_header_size(features)
    frame = build_frame(frame_size, 0)
    rx_rings: list[DriverRing] = []
    tx_rings: list[DriverRing] = []
    for pair in range(queues):
        rx_rings.append(session.setup_ring(2 * pair, ring_size))
        tx_rings.append(session.setup_ring(2 * pair + 1, ring_size))
    fast: list[CompiledQueue] = []
    if chosen == "compiled" and mode != "txonly":
        # The kernel posts the receive buffers as it starts.
        rx_paths: list[_RxPath] = []
        fast = [CompiledQueue(session, ring, hdr, None, burst) for ring in rx_rings]
    else:
        rx_paths = [_RxPath(session, ring, hdr) for ring in rx_rings]
    if chosen == "compiled" and mode == "txonly":
        fast = [CompiledQueue(session, ring, hdr, frame, burst) for ring in tx_rings]
    elif chosen == "compiled" and mode == "io":
        for receiver, ring in zip(fast, tx_rings, strict=True):
            receiver.forward_to(CompiledQueue(session, ring, hdr, frame, burst, room=RX_BUFFER))
    elif chosen == "python":
        tx_paths = [_TxPath(session, ring, hdr, frame) for ring in tx_rings]
    if fast:
        compiled.load()
    session.enable_rings()
    for rx in rx_paths:
        rx.ring.kick()
    if chosen == "compiled":
        return _run_compiled(session, fast, mode, duration, packets, cpus, progress)
    result = NetResult(mode, duration)
    start = time.monotonic()
    deadline = start + duration
    next_report = start + 1.0
    seq = 0
    backlog: list[deque[bytes]] = [deque() for _ in range(queues)]
    if mode == "io":
        for pair_backlog in backlog:
            for _ in range(BURST):
                pair_backlog.append(build_frame(frame_size, seq))
                seq += 1
    broken = False
    while not broken:
        now = time.monotonic()
        if now >= deadline or (packets is not None and result.tx_packets >= packets):
            break
        session.tick()
        moved = False
        for pair in range(queues):
            tx, rx = tx_paths[pair], rx_paths[pair]
            try:
                tx.reclaim()
                received_frames = rx.receive(result) if mode != "txonly" else []
            except RingError as exc:
                result.errors += 1
                log.error("queue pair %d: the back-end broke the ring: %s", pair, exc)
                broken = True
                break
            for received in received_frames:
                moved = True
                result.rx_packets += 1
                result.rx_bytes += len(received)
                verdict = check_frame(received)
                if verdict is FrameCheck.CORRUPT:
                    result.rx_bad += 1
                    # Sent on, it would come back corrupt and be counted again.
                    received = build_frame(frame_size, seq)
                    seq += 1
                elif verdict is FrameCheck.FOREIGN:
                    result.rx_foreign += 1
                if mode == "io":
                    backlog[pair].append(received)
            sent = 0
            if mode == "txonly":
                while sent < burst and tx.send(frame):
                    sent += 1
                result.tx_bytes += sent * len(frame)
            elif mode == "io":
                queue = backlog[pair]
                while queue and tx.send(queue[0]):
                    result.tx_bytes += len(queue.popleft())
                    sent += 1
            if sent:
                moved = True
                result.tx_packets += sent
                tx.ring.kick()
        if progress and now >= next_report:
            next_report += 1.0
            print(
                f"  {now - start:5.1f}s  tx {result.tx_packets}  rx {result.rx_packets}",
                flush=True,
            )
        if not moved:
            session.wait_call(0.001)
    result.finish(time.monotonic() - start)
    if not broken:
        _quiesce(session, tx_paths)
    session.stop()
    result.iotlb_misses = session.iotlb_misses
    result.iotlb_remaps = session.iotlb_remaps
    return result


def _run_compiled(
    session: DriverSession,
    paths: list[CompiledQueue],
    mode: str,
    duration: float,
    packets: int | None,
    cpus: Sequence[int],
    progress: bool,
) -> NetResult:
    """Drive ``paths`` with the compiled kernels; the figures, as the Python loop reports them."""
    figures = compiled.run_queues(
        paths, duration=duration, packets=packets, cpus=cpus, progress=progress
    )
    result = NetResult(mode, duration)
    result.tx_packets = figures.tx_packets
    result.tx_bytes = figures.tx_bytes
    result.rx_packets = figures.rx_packets
    result.rx_bytes = figures.rx_bytes
    result.rx_bad = figures.rx_bad
    result.rx_foreign = figures.rx_foreign
    result.errors = len(figures.errors) + figures.rx_short
    result.finish(figures.elapsed)
    session.stop()
    result.iotlb_misses = session.iotlb_misses
    result.iotlb_remaps = session.iotlb_remaps
    return result


def _quiesce(session: DriverSession, tx_paths: list[_TxPath]) -> None:
    """Give the back-end a moment to take the frames already posted.

    GET_VRING_BASE stops a ring where it stands: frames posted but not yet
    taken would be counted as sent and never reach the back-end, as when a
    polling back-end was descheduled at the end of the run.
    """
    deadline = time.monotonic() + QUIESCE_SECONDS
    while True:
        for tx in tx_paths:
            tx.reclaim()
        if not any(tx.busy for tx in tx_paths) or time.monotonic() >= deadline:
            return
        session.wait_call(0.001)
