"""sim-net's tap program on the data-plane engine, driven by pyvdpa's own front-end.

Each test creates a network namespace, an :class:`EngineNetDevice` in tap
mode inside it (so the TAP lives there), serves the device on a vhost-user
socket and drives it as a VMM would.  The far end of the wire is a raw packet
socket bound to the TAP: what the driver transmits is read from it, and what
another one sends is what the driver receives.  IPv6 is off on the TAP so that the
kernel adds no frames of its own.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import select
import shutil
import socket
import struct
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from peers.netns import NetNamespace
from pyvdpa.dataplane.engine import Engine
from pyvdpa.dataplane.net import EngineNetDevice
from pyvdpa.device import Device
from pyvdpa.drive.net import build_frame
from pyvdpa.drive.session import Session
from pyvdpa.memory import allocate_shared
from pyvdpa.vhost_user.frontend import Frontend
from pyvdpa.vhost_user.protocol import ProtocolFeature
from pyvdpa.vhost_user.server import BackendServer
from pyvdpa.virtio.constants import NetFeature, VirtioFeature
from test_dataplane_engine import HDR, SETTLE, Driven, _until
from test_vdpa_tap import icmp_echo, in_netns

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("ip") is None or not os.path.exists("/dev/net/tun"),
    reason="needs root, iproute2 and /dev/net/tun",
)

ETH_P_TEST = 0x88B5
TAP = "pvt0"
GUEST_MAC = bytes.fromhex("020000000002")
_NUM_BUFFERS = struct.Struct("<H")

LAYOUTS = [False, True]
LAYOUT_IDS = ["split", "packed"]


@dataclass
class Wired(Driven):
    """A tap-mode device served on a socket, a session driving it, and the TAP's far end."""

    netns: NetNamespace
    peer: socket.socket
    sender: socket.socket
    posted: dict[int, dict[int, tuple[int, int]]]

    def transmit(self, index: int, frame: bytes, pieces: int = 1) -> int:
        """Post one frame on TX ring ``index``, header and frame cut into ``pieces`` descriptors."""
        stream = bytes(HDR) + frame
        cuts = [len(stream) * i // pieces for i in range(pieces + 1)]
        buffers = []
        for start, end in itertools.pairwise(cuts):
            addr = self.session.alloc(end - start)
            self.session.memory.write(addr, stream[start:end])
            buffers.append((addr, end - start))
        ring = self.ring(index)
        ident = ring.queue.add(buffers, [])
        ring.kick()
        return ident

    def post_rx(self, index: int, size: int, count: int, split: int = 0) -> None:
        """Post ``count`` receive chains of ``size`` bytes (two descriptors when ``split``)."""
        ring = self.ring(index)
        for _ in range(count):
            addr = self.session.alloc(size)
            pieces = [(addr, split), (addr + split, size - split)] if split else [(addr, size)]
            self.posted.setdefault(index, {})[ring.queue.add([], pieces)] = (addr, size)
        ring.kick()

    def read_used(self, index: int, entries: list[tuple[int, int]]) -> list[bytes]:
        """The bytes the device wrote into each used chain (header included)."""
        memory = self.session.memory
        return [memory.read(self.posted[index][ident][0], length) for ident, length in entries]

    def received(self, index: int, count: int, timeout: float = SETTLE) -> list[bytes]:
        """``count`` frames from RX ring ``index``, merged buffers joined; checks each header."""
        streams: list[bytes] = []
        pending: list[tuple[int, int]] = []
        frames: list[bytes] = []
        deadline = time.monotonic() + timeout
        while len(frames) < count and time.monotonic() < deadline:
            pending += self.used(index)
            if not pending:
                time.sleep(0.005)
                continue
            streams += self.read_used(index, pending)
            pending = []
            while streams:
                head = streams[0]
                (buffers,) = _NUM_BUFFERS.unpack_from(head, 10)
                if len(streams) < buffers:
                    break
                assert head[:10] == bytes(10)
                frames.append(head[HDR:] + b"".join(streams[1:buffers]))
                streams = streams[buffers:]
        assert not streams
        return frames

    def inject(self, frame: bytes) -> None:
        """Send ``frame`` to the TAP: the host's way to the driver."""
        self.sender.send(frame)

    def captured(self, count: int, timeout: float = SETTLE) -> list[bytes]:
        """Frames the TAP received from the driver (only our test EtherType)."""
        frames: list[bytes] = []
        deadline = time.monotonic() + timeout
        while len(frames) < count:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.peer], [], [], left)[0]:
                break
            frame = self.peer.recv(65536)
            if struct.unpack_from("!H", frame, 12)[0] == ETH_P_TEST:
                frames.append(frame)
        return frames


@pytest.fixture
def wire(sock_dir: Path) -> Iterator[Callable[..., Wired]]:
    """A tap-mode device in a fresh namespace, served and driven: ``wire(packed=..., ...)``."""
    stack = contextlib.ExitStack()

    def start(
        *,
        engine: str = "event",
        packed: bool = False,
        mrg_rxbuf: bool = True,
        queue_pairs: int = 1,
        ring_size: int = 64,
        tap_mtu: int = 1500,
        extra_features: int = 0,
        enabled: int | None = None,
    ) -> Wired:
        netns = stack.enter_context(NetNamespace(f"pyv-{uuid.uuid4().hex[:10]}"))
        eng = stack.enter_context(Engine(engine))
        device = in_netns(
            netns,
            lambda: EngineNetDevice(mode="tap", ifname=TAP, engine=eng, queue_pairs=queue_pairs),
        )
        stack.callback(device.close)
        netns.run(["sysctl", "-qw", f"net.ipv6.conf.{TAP}.disable_ipv6=1"])
        netns.run(["ip", "link", "set", TAP, "mtu", str(tap_mtu)])
        netns.link_up(TAP)

        def open_socket(protocol: int) -> socket.socket:
            sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(protocol))
            sock.bind((TAP, protocol))
            return sock

        peer = stack.enter_context(in_netns(netns, lambda: open_socket(ETH_P_TEST)))
        # Unbound to a protocol, it sends frames the kernel parses (and so
        # spreads over the TAP's queues by flow).
        sender = stack.enter_context(in_netns(netns, lambda: open_socket(0)))
        path = sock_dir / f"{uuid.uuid4().hex[:8]}.sock"

        def factory() -> Device:
            return device

        stack.enter_context(BackendServer(path, factory))
        session = stack.enter_context(Session(Frontend.connect(path), memory_size=16 << 20))
        wanted = VirtioFeature.VERSION_1 | VirtioFeature.PROTOCOL_FEATURES | extra_features
        wanted |= VirtioFeature.RING_EVENT_IDX
        if packed:
            wanted |= VirtioFeature.RING_PACKED
        if mrg_rxbuf:
            wanted |= NetFeature.MRG_RXBUF
        if queue_pairs > 1:
            wanted |= NetFeature.MQ
        session.negotiate(wanted, wanted)
        for index in range(2 * queue_pairs):
            session.setup_ring(index, ring_size)
        for index in range(2 * queue_pairs if enabled is None else enabled):
            session.frontend.set_vring_enable(index, True)
        return Wired(device, session, eng, netns, peer, sender, {})

    yield start
    stack.close()


def _frame(size: int, seq: int) -> bytes:
    return build_frame(size, seq, dst=GUEST_MAC)


# ---------------------------------------------------------------------- transmit


@pytest.mark.parametrize("packed", LAYOUTS, ids=LAYOUT_IDS)
@pytest.mark.parametrize("engine", ["poll", "event"])
def test_transmitted_frames_reach_the_tap_byte_identical(
    packed: bool, engine: str, wire: Callable[..., Wired]
) -> None:
    wired = wire(packed=packed, engine=engine)
    sizes = [60, 61, 1000, 1514, 300, 1514]
    frames = [_frame(size, seq) for seq, size in enumerate(sizes)]
    # One descriptor, or several: the header alone, split, or shared with the frame.
    for pieces, frame in zip([1, 7, 2, 3, 4, 1], frames, strict=True):
        wired.transmit(1, frame, pieces)
    assert wired.captured(len(frames)) == frames
    assert _until(lambda: wired.device.stats[1].completed_desc == len(frames))
    tx = wired.device.stats[1]
    assert (tx.packets, tx.bytes, tx.dropped) == (len(frames), sum(map(len, frames)), 0)
    assert [length for _, length in wired.wait_used(1, len(frames))] == [0] * len(frames)


def test_frames_the_tap_refuses_are_dropped_and_completed(wire: Callable[..., Wired]) -> None:
    wired = wire()
    # Shorter than an Ethernet header, and empty.
    wired.transmit(1, bytes(5))
    wired.transmit(1, b"")
    wired.transmit(1, _frame(100, 2))
    assert wired.captured(1) == [_frame(100, 2)]
    assert _until(lambda: wired.device.stats[1].completed_desc == 3)
    assert wired.device.stats[1].dropped == 2
    assert len(wired.wait_used(1, 3)) == 3


# ---------------------------------------------------------------------- receive


@pytest.mark.parametrize("packed", LAYOUTS, ids=LAYOUT_IDS)
@pytest.mark.parametrize("mrg_rxbuf", [True, False], ids=["mrg", "nomrg"])
def test_frames_from_the_tap_arrive_intact(
    packed: bool, mrg_rxbuf: bool, wire: Callable[..., Wired]
) -> None:
    wired = wire(packed=packed, mrg_rxbuf=mrg_rxbuf)
    # Header alone in a descriptor (read straight past it), split across two
    # (through the bounce buffer), and the plain single buffer.
    wired.post_rx(0, 2048, 4, split=HDR)
    wired.post_rx(0, 2048, 4, split=4)
    wired.post_rx(0, 2048, 8)
    frames = [_frame(60 + 96 * seq, seq) for seq in range(16)]
    for frame in frames:
        wired.inject(frame)
    assert wired.received(0, len(frames)) == frames
    rx = wired.device.stats[0]
    assert (rx.packets, rx.bytes) == (len(frames), sum(map(len, frames)))
    assert rx.received_desc == rx.completed_desc == len(frames)
    assert rx.dropped == rx.invalid_buffer == 0


@pytest.mark.parametrize("packed", LAYOUTS, ids=LAYOUT_IDS)
def test_frame_longer_than_a_buffer_spans_merged_buffers(
    packed: bool, wire: Callable[..., Wired]
) -> None:
    wired = wire(packed=packed, tap_mtu=9000)
    big = _frame(3000, 1)
    small = _frame(200, 2)
    # One buffer is too few for the big frame: it waits, nothing is taken.
    wired.post_rx(0, 1024, 1)
    wired.inject(big)
    wired.inject(small)
    time.sleep(0.3)
    assert wired.used(0) == []
    wired.post_rx(0, 1024, 3)
    entries = wired.wait_used(0, 4)
    assert len(entries) == 4
    streams = wired.read_used(0, entries)
    assert [length for _, length in entries] == [1024, 1024, HDR + 3000 - 2048, HDR + 200]
    assert _NUM_BUFFERS.unpack_from(streams[0], 10)[0] == 3
    assert b"".join(streams[:3])[HDR:] == big
    assert _NUM_BUFFERS.unpack_from(streams[3], 10)[0] == 1
    assert streams[3][HDR:] == small
    rx = wired.device.stats[0]
    assert (rx.packets, rx.bytes, rx.dropped) == (2, 3200, 0)


def test_frame_longer_than_a_buffer_without_mrg_rxbuf_is_dropped(
    wire: Callable[..., Wired],
) -> None:
    wired = wire(mrg_rxbuf=False, tap_mtu=9000)
    wired.post_rx(0, 1024, 2)
    wired.inject(_frame(3000, 1))
    wired.inject(_frame(200, 2))
    entries = wired.wait_used(0, 2)
    assert len(entries) == 2
    assert entries[0][1] == 0
    assert wired.read_used(0, entries[1:])[0][HDR:] == _frame(200, 2)
    rx = wired.device.stats[0]
    assert (rx.packets, rx.dropped, rx.invalid_buffer) == (1, 1, 1)


@pytest.mark.parametrize("engine", ["event", "adaptive", "poll"])
def test_frames_wait_in_the_tap_until_buffers_are_posted(
    engine: str, wire: Callable[..., Wired]
) -> None:
    wired = wire(engine=engine, ring_size=16)
    frames = [_frame(100, seq) for seq in range(100)]
    for frame in frames:
        wired.inject(frame)
    time.sleep(0.3)
    assert wired.device.stats[0].packets == 0
    received: list[bytes] = []
    while len(received) < len(frames):
        wired.post_rx(0, 2048, 16)
        got = wired.received(0, min(16, len(frames) - len(received)))
        assert got, f"stalled after {len(received)} frames"
        received += got
    assert received == frames
    assert wired.device.dropped == 0


def test_a_sleeping_worker_wakes_for_tap_input_only(wire: Callable[..., Wired]) -> None:
    wired = wire(engine="event")
    # Frames wait in the TAP with no receive buffer: the worker sleeps anyway.
    for seq in range(8):
        wired.inject(_frame(100, seq))
    used = time.process_time()
    time.sleep(1.0)
    assert time.process_time() - used < 0.3
    wired.post_rx(0, 2048, 8)
    assert wired.received(0, 8) == [_frame(100, seq) for seq in range(8)]
    # Buffers wait with an empty TAP: asleep again, and a frame wakes it.
    wired.post_rx(0, 2048, 8)
    time.sleep(0.2)
    used = time.process_time()
    time.sleep(1.0)
    assert time.process_time() - used < 0.3
    wired.inject(_frame(100, 99))
    assert wired.received(0, 1, timeout=1.0) == [_frame(100, 99)]


# ---------------------------------------------------------------------- queue pairs


@pytest.mark.parametrize("packed", LAYOUTS, ids=LAYOUT_IDS)
def test_tap_queues_follow_the_enabled_pairs(packed: bool, wire: Callable[..., Wired]) -> None:
    wired = wire(packed=packed, queue_pairs=2, enabled=2, ring_size=128)
    tap = wired.device.tap
    assert tap is not None
    assert tap.attached == [True, False]
    wired.post_rx(0, 2048, 64)
    flows = [
        icmp_echo(GUEST_MAC, GUEST_MAC, f"10.234.{flow}.1", "10.234.0.2", bytes(8))
        for flow in range(32)
    ]
    for frame in flows:
        wired.inject(frame)
    assert wired.received(0, len(flows)) == flows

    for index in (2, 3):
        wired.session.frontend.set_vring_enable(index, True)
    assert tap.attached == [True, True]
    wired.post_rx(0, 2048, 32)
    wired.post_rx(2, 2048, 32)
    for frame in flows:
        wired.inject(frame)
    assert _until(lambda: sum(wired.device.stats[i].packets for i in (0, 2)) == 2 * len(flows))
    first = wired.received(0, wired.device.stats[0].packets - len(flows))
    second = wired.received(2, wired.device.stats[2].packets)
    # The kernel spread the flows over both queues, each frame once.
    assert first and second
    assert sorted(first + second) == sorted(flows)
    frame = _frame(100, 7)
    wired.transmit(3, frame)
    assert wired.captured(1) == [frame]
    assert wired.device.stats[3].packets == 1

    wired.session.frontend.set_vring_enable(2, False)
    assert tap.attached == [True, False]
    wired.post_rx(0, 2048, 32)
    for frame in flows:
        wired.inject(frame)
    assert wired.received(0, len(flows)) == flows


# ---------------------------------------------------------------------- hostile rings


def test_hostile_chains_break_only_their_queue(wire: Callable[..., Wired]) -> None:
    wired = wire()
    err = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
    try:
        wired.session.frontend.set_vring_err(1, err)
        # A transmit buffer far outside guest memory.
        wired.ring(1).queue.add([(0xDEAD_0000_0000, 64)], [])
        wired.ring(1).kick()
        assert select.select([err], [], [], SETTLE)[0] == [err]
        tx = wired.device.stats[1]
        assert (tx.invalid_buffer, tx.completed_desc, tx.packets) == (1, 0, 0)
        assert wired.captured(1, timeout=0.3) == []
        # The receive queue keeps working.
        wired.post_rx(0, 2048, 4)
        wired.inject(_frame(100, 1))
        assert wired.received(0, 1) == [_frame(100, 1)]
    finally:
        os.close(err)


def test_hostile_receive_chain_leaves_frames_in_the_tap(wire: Callable[..., Wired]) -> None:
    wired = wire()
    wired.ring(0).queue.add([], [(0xDEAD_0000_0000, 2048)])
    wired.ring(0).kick()
    wired.inject(_frame(100, 1))
    assert _until(lambda: wired.device.stats[0].invalid_buffer == 1)
    assert wired.device.stats[0].packets == 0
    # Transmit is unharmed.
    wired.transmit(1, _frame(100, 2))
    assert wired.captured(1) == [_frame(100, 2)]


# ---------------------------------------------------------------------- migration


@pytest.mark.parametrize("packed", LAYOUTS, ids=LAYOUT_IDS)
def test_dirty_log_covers_frames_read_from_the_tap(
    packed: bool, wire: Callable[..., Wired]
) -> None:
    wired = wire(packed=packed, extra_features=int(VirtioFeature.LOG_ALL), tap_mtu=9000)
    session = wired.session
    session.frontend.set_protocol_features(session.protocol_features | ProtocolFeature.LOG_SHMFD)
    region = session.region
    log = allocate_shared((region.guest_phys_addr + region.memory_size) // 4096 // 8, "dirty-log")
    try:
        session.frontend.set_log_base(log.fd, log.size)
        # Straight into one buffer, and through the bounce buffer into three.
        direct = session.alloc(8192, 4096)
        merged = [session.alloc(4096, 4096) for _ in range(3)]
        rx = wired.ring(0)
        rx.queue.add([], [(direct, 4096), (direct + 4096, 4096)])
        for addr in merged:
            rx.queue.add([], [(addr, 2048)])
        rx.kick()
        wired.inject(_frame(5000, 1))
        wired.inject(_frame(5000, 2))
        assert _until(lambda: wired.device.stats[0].packets == 2)
        bits = bytes(log.buf)
        dirty = {i << 12 for i in range(len(bits) * 8) if bits[i >> 3] >> (i & 7) & 1}
        assert {direct, direct + 4096, *merged} <= dirty
    finally:
        log.close()


# ---------------------------------------------------------------------- control


def test_reset_drops_the_frames_the_tap_holds(wire: Callable[..., Wired]) -> None:
    wired = wire()
    for seq in range(5):
        wired.inject(_frame(100, seq))
    time.sleep(0.2)
    assert wired.device.dropped == 0
    wired.session.frontend.reset_owner()
    assert wired.engine.ports == []
    assert wired.device.dropped == 5


def test_close_takes_the_rings_back_and_releases_the_tap(wire: Callable[..., Wired]) -> None:
    wired = wire()
    wired.device.close()
    assert wired.engine.ports == []
    assert wired.netns.run(["ip", "link", "show", TAP], check=False).returncode != 0
    wired.device.close()
