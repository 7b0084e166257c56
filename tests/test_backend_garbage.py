"""Hostile front-ends: garbage on the socket and broken rings.

Every case checks: the request is refused (REPLY_ACK non-zero) or the
connection dropped, one log line names the problem, no fd leaks (the
process's fd count returns to where it was), and the socket keeps serving a
well-behaved front-end afterwards, and while the garbage flows.
"""

from __future__ import annotations

import logging
import os
import random
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from fds import fd_count, settled_fd_count
from pyvdpa.devices.net import NetDevice
from pyvdpa.drive.net import NetResult, run_net
from pyvdpa.drive.session import GPA_BASE, Session
from pyvdpa.memory import MemoryRegion, allocate_shared
from pyvdpa.vhost_user import codec
from pyvdpa.vhost_user.frontend import Frontend
from pyvdpa.vhost_user.protocol import HeaderFlags, ProtocolFeature, Request
from pyvdpa.vhost_user.server import BackendServer
from pyvdpa.virtio.constants import VirtioFeature
from pyvdpa.virtio.packed import PackedLayout
from pyvdpa.virtio.ring import DescFlag
from pyvdpa.virtio.split import SplitLayout

NEED_ACK = HeaderFlags.VERSION | HeaderFlags.NEED_REPLY


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[Path, NetDevice, BackendServer]]:
    path = tmp_path / "g.sock"
    device = NetDevice(mode="loopback")
    server = BackendServer(path, lambda: device)
    server.start()
    yield path, device, server
    server.stop()


class RawPeer:
    """A front-end that writes whatever bytes and fds it is told to."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(str(path))
        self.sock.settimeout(5)

    def send(self, data: bytes, fds: list[int] | None = None) -> None:
        anc = []
        if fds:
            anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack(f"{len(fds)}i", *fds))]
        self.sock.sendmsg([data], anc)

    def request(
        self, request: int, body: bytes = b"", flags: int = NEED_ACK, fds: list[int] | None = None
    ) -> None:
        self.send(codec.HEADER.pack(request, flags, len(body)) + body, fds)

    def ack(self) -> int:
        """Read one REPLY_ACK and return its value."""
        header = self._read(12)
        _, flags, size = codec.HEADER.unpack(header)
        assert flags == HeaderFlags.VERSION | HeaderFlags.REPLY
        return int(struct.unpack("<Q", self._read(size))[0])

    def closed_by_peer(self) -> bool:
        try:
            return self.sock.recv(1) == b""
        except ConnectionResetError:
            # Closed with our unread bytes still queued: the kernel resets.
            return True
        except TimeoutError:
            return False

    def _read(self, n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = self.sock.recv(n - len(data))
            assert chunk, "connection closed"
            data += chunk
        return data

    def negotiate(self) -> None:
        """Enough of a handshake for REPLY_ACK and vring requests."""
        self.request(Request.GET_FEATURES, flags=HeaderFlags.VERSION)
        self._read(20)
        self.request(
            Request.SET_PROTOCOL_FEATURES,
            struct.pack("<Q", ProtocolFeature.REPLY_ACK | ProtocolFeature.MQ),
            flags=HeaderFlags.VERSION,
        )
        self.request(Request.SET_OWNER)
        assert self.ack() == 0
        features = VirtioFeature.VERSION_1 | VirtioFeature.PROTOCOL_FEATURES
        self.request(Request.SET_FEATURES, struct.pack("<Q", features))
        assert self.ack() == 0

    def close(self) -> None:
        self.sock.close()


def _still_serving(path: Path) -> None:
    with Session(Frontend.connect(path), memory_size=8 << 20) as session:
        result = run_net(session, mode="io", duration=0.2)
    assert result.rx_packets > 0 and result.rx_bad == 0


def _settle(before: int) -> int:
    # Connection threads close their fds asynchronously; on a loaded 2-core
    # machine that can take seconds.  The count must still come back exactly.
    return settled_fd_count(before, 15)


def _problem_logged(caplog: pytest.LogCaptureFixture, level: int, text: str) -> None:
    """Exactly one line at ``level`` or above, and it names the problem."""
    lines = [r for r in caplog.records if r.name.startswith("pyvdpa") and r.levelno >= level]
    assert len(lines) == 1, [r.getMessage() for r in lines]
    assert lines[0].levelno == level and text in lines[0].getMessage()


#: case -> (what the peer sends, level and words of the one log line).
DROPPING: dict[str, tuple[Callable[[RawPeer], None], int, str]] = {
    "short header then EOF": (
        lambda p: p.send(b"\x01\x00\x00"),
        logging.INFO,
        "peer disconnected mid-message: 3 of 12 header bytes",
    ),
    "wrong version": (
        lambda p: p.request(Request.GET_FEATURES, flags=0x2),
        logging.ERROR,
        "dropping connection: request 1: header version 2, expected 1",
    ),
    "reserved flag": (
        lambda p: p.request(Request.GET_FEATURES, flags=0x1 | 0x20),
        logging.ERROR,
        "dropping connection: request 1: reserved header flags 0x20 set",
    ),
    "oversized payload": (
        lambda p: p.send(codec.HEADER.pack(Request.SET_OWNER, 1, 1 << 20)),
        logging.ERROR,
        "dropping connection: request 3: payload size 1048576 exceeds 4096",
    ),
    "truncated payload then EOF": (
        lambda p: p.send(codec.HEADER.pack(Request.SET_FEATURES, 1, 8) + b"\x00\x00\x00"),
        logging.INFO,
        "peer disconnected mid-message: 3 of 8 request 2 payload bytes",
    ),
    "reply flag on a request": (
        lambda p: p.request(Request.GET_FEATURES, flags=0x5),
        logging.ERROR,
        "dropping connection: GET_FEATURES: REPLY flag set on a request",
    ),
    "reply flag on a request that has no reply": (
        lambda p: p.request(Request.SET_OWNER, flags=0x5 | 0x8),
        logging.ERROR,
        "dropping connection: SET_OWNER: REPLY flag set on a request",
    ),
    "a request that must be answered, refused": (
        lambda p: (
            p.request(Request.SET_OWNER, flags=1),
            p.request(Request.GET_VRING_BASE, struct.pack("<II", 200, 0), flags=1),
        ),
        logging.ERROR,
        "dropping connection: GET_VRING_BASE refused, and it must be answered: "
        "vring index 200 out of range",
    ),
}


def _feed(path: Path, case: str) -> None:
    """Send one stream-breaking case and check the back-end hung up without a word."""
    send = DROPPING[case][0]
    peer = RawPeer(path)
    send(peer)
    if "EOF" in case:
        peer.sock.shutdown(socket.SHUT_WR)
    # Dropped: the peer reads EOF, never a reply (not even a REPLY_ACK).
    assert peer.closed_by_peer()
    peer.close()


@pytest.mark.parametrize("case", sorted(DROPPING))
def test_stream_breaking_input_drops_the_connection(
    served: tuple[Path, NetDevice, BackendServer], case: str, caplog: pytest.LogCaptureFixture
) -> None:
    path, _, _ = served
    caplog.set_level(logging.INFO, logger="pyvdpa")
    before = fd_count()
    _feed(path, case)
    _, level, text = DROPPING[case]
    _problem_logged(caplog, level, text)
    assert _settle(before) == before
    _still_serving(path)


def _frames_moved(server: BackendServer) -> int:
    return sum(s.packets for c in list(server.connections) for s in c.device.stats)  # type: ignore[attr-defined]


def test_garbage_while_a_healthy_connection_moves_traffic(tmp_path: Path) -> None:
    """Each connection has its thread: hostile ones are dropped while a good one runs.

    Every front-end gets a device of its own, so the only thing the
    connections share is the server.
    """
    path = tmp_path / "c.sock"
    with BackendServer(path, lambda: NetDevice(mode="loopback")) as server:
        results: list[NetResult] = []

        def healthy() -> None:
            with Session(Frontend.connect(path), memory_size=8 << 20) as session:
                results.append(run_net(session, mode="io", duration=4.0))

        thread = threading.Thread(target=healthy, name="healthy-front-end")
        thread.start()
        try:
            deadline = time.monotonic() + 10
            while _frames_moved(server) == 0 and time.monotonic() < deadline:
                time.sleep(0.01)
            moved = _frames_moved(server)
            assert moved > 0
            rng = random.Random(99)
            for case in sorted(DROPPING):
                _feed(path, case)
                garbage = RawPeer(path)
                body = rng.randbytes(rng.choice([0, 8, 40]))
                garbage.send(codec.HEADER.pack(rng.randrange(50), 0xFF, len(body)) + body)
                assert garbage.closed_by_peer()
                garbage.close()
            assert thread.is_alive(), "the garbage outlasted the healthy run: lengthen it"
            assert _frames_moved(server) > moved
        finally:
            thread.join(30)
    assert len(results) == 1
    assert results[0].rx_packets > 0
    assert results[0].rx_bad == results[0].errors == 0


def _memfd(size: int) -> int:
    fd = os.memfd_create("garbage", os.MFD_CLOEXEC)
    os.ftruncate(fd, size)
    return fd


def _region(gpa: int, size: int, uva: int, offset: int = 0) -> bytes:
    return struct.pack("<QQQQ", gpa, size, uva, offset)


def _table(*regions: bytes) -> bytes:
    return struct.pack("<II", len(regions), 0) + b"".join(regions)


RefusalCase = Callable[[RawPeer, list[int]], None]


def _unknown_request(p: RawPeer, fds: list[int]) -> None:
    p.request(99)


def _fd_on_fdless_request(p: RawPeer, fds: list[int]) -> None:
    p.request(Request.SET_OWNER, fds=[fds[0]])


def _vring_index_out_of_range(p: RawPeer, fds: list[int]) -> None:
    p.request(Request.SET_VRING_NUM, struct.pack("<II", 200, 256))


def _vring_size_not_power_of_two(p: RawPeer, fds: list[int]) -> None:
    p.request(Request.SET_VRING_NUM, struct.pack("<II", 0, 100))


def _zero_sized_region(p: RawPeer, fds: list[int]) -> None:
    p.request(Request.SET_MEM_TABLE, _table(_region(0, 0, 0x1000)), fds=[fds[1]])


def _overlapping_regions(p: RawPeer, fds: list[int]) -> None:
    table = _table(_region(0, 1 << 20, 0x10000000), _region(1 << 19, 1 << 20, 0x20000000))
    p.request(Request.SET_MEM_TABLE, table, fds=[fds[1], fds[2]])


def _unmappable_fd(p: RawPeer, fds: list[int]) -> None:
    p.request(Request.SET_MEM_TABLE, _table(_region(0, 1 << 20, 0x1000)), fds=[fds[3]])


def _region_beyond_file(p: RawPeer, fds: list[int]) -> None:
    p.request(Request.SET_MEM_TABLE, _table(_region(0, 1 << 30, 0x1000)), fds=[fds[1]])


def _ring_outside_memory(p: RawPeer, fds: list[int]) -> None:
    p.request(Request.SET_MEM_TABLE, _table(_region(0, 1 << 20, 0x10000000)), fds=[fds[1]])
    assert p.ack() == 0
    p.request(Request.SET_VRING_NUM, struct.pack("<II", 0, 256))
    assert p.ack() == 0
    addr = struct.pack("<IIQQQQ", 0, 0, 0x10000000, 0x10000000 + (2 << 20), 0x10001000, 0)
    p.request(Request.SET_VRING_ADDR, addr)


def _wrong_fd_count(p: RawPeer, fds: list[int]) -> None:
    table = _table(_region(0, 1 << 20, 0x1000), _region(1 << 20, 1 << 20, 0x200000))
    p.request(Request.SET_MEM_TABLE, table, fds=[fds[1]])


def _features_not_offered(p: RawPeer, fds: list[int]) -> None:
    p.request(Request.SET_FEATURES, struct.pack("<Q", 1 << 63))


def _bad_enable_value(p: RawPeer, fds: list[int]) -> None:
    p.request(Request.SET_VRING_ENABLE, struct.pack("<II", 0, 7))


def _gated_request(p: RawPeer, fds: list[int]) -> None:
    p.request(Request.SET_INFLIGHT_FD, struct.pack("<QQHH4x", 4096, 0, 1, 256), fds=[fds[1]])


#: case -> (what the peer sends, words of the one ERROR line).
REFUSED: dict[str, tuple[RefusalCase, str]] = {
    "unknown request": (_unknown_request, "request 99 refused: unknown request 99"),
    "fd on a request that takes none": (
        _fd_on_fdless_request,
        "SET_OWNER refused: SET_OWNER: takes no fds, got 1",
    ),
    "vring index out of range": (
        _vring_index_out_of_range,
        "SET_VRING_NUM refused: vring index 200 out of range",
    ),
    "split ring size not a power of two": (
        _vring_size_not_power_of_two,
        "SET_VRING_NUM refused: SET_VRING_NUM: split ring size 100 is not a power of 2",
    ),
    "zero-sized region": (
        _zero_sized_region,
        "SET_MEM_TABLE refused: SET_MEM_TABLE: memory region at guest address 0x0 is empty",
    ),
    "overlapping regions": (
        _overlapping_regions,
        "SET_MEM_TABLE refused: memory region at GPA 0x80000 overlaps the region at GPA 0x0",
    ),
    "unmappable fd (a pipe)": (_unmappable_fd, "shared and writable"),
    "region beyond its file": (
        _region_beyond_file,
        "holds 1048576 bytes; cannot map 1073741824 bytes",
    ),
    "ring address outside the memory table": (
        _ring_outside_memory,
        "SET_VRING_ADDR refused: vring 0 used ring at 0x10200000+2054 is outside",
    ),
    "fewer fds than regions": (
        _wrong_fd_count,
        "SET_MEM_TABLE refused: SET_MEM_TABLE: got 1 fds, expected 2",
    ),
    "features not offered": (
        _features_not_offered,
        "SET_FEATURES refused: SET_FEATURES: bits 0x8000000000000000 were not offered",
    ),
    "SET_VRING_ENABLE value 7": (
        _bad_enable_value,
        "SET_VRING_ENABLE refused: SET_VRING_ENABLE: num 7 is not 0 or 1",
    ),
    "request gated by a protocol feature not negotiated": (
        _gated_request,
        "SET_INFLIGHT_FD refused: SET_INFLIGHT_FD: needs protocol feature INFLIGHT_SHMFD",
    ),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_bad_request_is_refused_and_connection_kept(
    served: tuple[Path, NetDevice, BackendServer], case: str, caplog: pytest.LogCaptureFixture
) -> None:
    path, _, _ = served
    r, w = os.pipe()
    fds = [os.eventfd(0), _memfd(1 << 20), _memfd(1 << 20), r]
    before = fd_count()
    peer = RawPeer(path)
    peer.negotiate()
    send, text = REFUSED[case]
    caplog.clear()
    send(peer, fds)
    assert peer.ack() != 0
    _problem_logged(caplog, logging.ERROR, text)
    # The connection still answers.
    peer.request(Request.GET_FEATURES, flags=HeaderFlags.VERSION)
    assert len(peer._read(20)) == 20
    peer.close()
    assert _settle(before) == before
    for fd in [*fds, w]:
        os.close(fd)
    _still_serving(path)


def test_too_many_fds_drop_the_connection(
    served: tuple[Path, NetDevice, BackendServer], caplog: pytest.LogCaptureFixture
) -> None:
    path, _, _ = served
    fds = [os.eventfd(0) for _ in range(12)]
    before = fd_count()
    peer = RawPeer(path)
    peer.request(Request.SET_VRING_CALL, struct.pack("<Q", 0), fds=fds)
    assert peer.closed_by_peer()
    _problem_logged(caplog, logging.ERROR, "dropping connection: message carried more than 8 fds")
    peer.close()
    assert _settle(before) == before
    for fd in fds:
        os.close(fd)
    _still_serving(path)


def test_disconnect_mid_message_and_mid_session(
    served: tuple[Path, NetDevice, BackendServer],
) -> None:
    path, _, server = served
    before = fd_count()
    for _ in range(5):
        peer = RawPeer(path)
        peer.negotiate()
        peer.send(codec.HEADER.pack(Request.SET_MEM_TABLE, 1, 40) + b"\x01\x00")
        peer.close()
    assert _settle(before) == before
    deadline = time.monotonic() + 3
    while server.connections and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not server.connections
    _still_serving(path)


def test_random_garbage_never_kills_the_server(
    served: tuple[Path, NetDevice, BackendServer],
) -> None:
    path, _, _ = served
    rng = random.Random(1234)
    before = fd_count()
    for _ in range(40):
        peer = RawPeer(path)
        request = rng.choice([*range(0, 50), 0xFFFFFFFF])
        body = rng.randbytes(rng.choice([0, 4, 8, 16, 40, 72, 300]))
        flags = rng.choice([1, 1 | 8, 0, 5, 0xFF])
        peer.send(codec.HEADER.pack(request, flags, len(body)) + body)
        peer.close()
    assert _settle(before) == before
    _still_serving(path)


# ---------------------------------------------------------------------- hostile rings


def _hostile_ring_session(path: Path, packed: bool) -> tuple[Session, int]:
    session = Session(Frontend.connect(path), memory_size=4 << 20)
    layout = VirtioFeature.RING_PACKED if packed else 0
    session.negotiate(VirtioFeature.VERSION_1 | VirtioFeature.PROTOCOL_FEATURES | layout, layout)
    err = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
    return session, err


_DESC = struct.Struct("<QIHH")
#: A packed descriptor made available in the driver's first lap (wrap counter 1).
_PACKED_AVAIL = 1 << 7


def _poison_split(desc: memoryview, avail: memoryview, buf: int, poison: str) -> None:
    if poison == "loop":
        _DESC.pack_into(desc, 0, buf, 64, DescFlag.NEXT, 1)
        _DESC.pack_into(desc, 16, buf, 64, DescFlag.NEXT, 0)
    elif poison == "next out of range":
        _DESC.pack_into(desc, 0, buf, 64, DescFlag.NEXT, 99)
    elif poison == "buffer outside memory":
        _DESC.pack_into(desc, 0, GPA_BASE + (64 << 20), 64, 0, 0)
    else:
        _DESC.pack_into(desc, 0, buf, 64, 0, 0)
    struct.pack_into("<H", avail, 4, 0)
    struct.pack_into("<H", avail, 2, 40 if poison == "avail jump" else 1)


def _poison_packed(desc: memoryview, buf: int, poison: str) -> None:
    # The head's flags are written last: until then the device sees no chain.
    if poison == "chain longer than the ring":
        for slot in reversed(range(16)):
            _DESC.pack_into(desc, 16 * slot, buf, 64, slot, _PACKED_AVAIL | DescFlag.NEXT)
    elif poison == "buffer id out of range":
        _DESC.pack_into(desc, 0, buf, 64, 99, _PACKED_AVAIL)
    else:
        _DESC.pack_into(desc, 0, GPA_BASE + (64 << 20), 64, 0, _PACKED_AVAIL)


@pytest.mark.parametrize(
    ("layout", "poison"),
    [
        ("split", "loop"),
        ("split", "next out of range"),
        ("split", "buffer outside memory"),
        ("split", "avail jump"),
        ("packed", "chain longer than the ring"),
        ("packed", "buffer id out of range"),
        ("packed", "buffer outside memory"),
    ],
)
def test_broken_ring_breaks_only_its_queue(
    served: tuple[Path, NetDevice, BackendServer], layout: str, poison: str
) -> None:
    """A hostile TX ring: typed error, queue broken, err fd signalled, others unharmed."""
    path, device, server = served
    packed = layout == "packed"
    session, err = _hostile_ring_session(path, packed)
    try:
        rx = session.setup_ring(0, 16)
        tx = session.setup_ring(1, 16)
        session.frontend.set_vring_err(1, err)
        session.enable_rings()
        desc: memoryview = tx.queue._desc  # type: ignore[attr-defined]
        buf = session.alloc(64)
        if packed:
            assert len(desc) == PackedLayout(16).desc_size
            _poison_packed(desc, buf, poison)
        else:
            assert len(desc) == SplitLayout(16).desc_size
            avail: memoryview = tx.queue._avail  # type: ignore[attr-defined]
            _poison_split(desc, avail, buf, poison)
            del avail
        os.eventfd_write(tx.kick_fd, 1)
        deadline = time.monotonic() + 3
        conn = server.connections[0]
        while not conn.vrings[1].broken and time.monotonic() < deadline:
            time.sleep(0.01)
        assert conn.vrings[1].broken
        assert os.eventfd_read(err) >= 1
        stats = device.stats[1]
        assert stats.bad_desc_errors + stats.invalid_buffer + stats.exceed_max_chain == 1
        assert not conn.vrings[0].broken
        del desc, rx
    finally:
        session.close()
        os.close(err)
    # Another connection to the same device works.
    _still_serving(path)


def test_driver_region_outside_memory_via_add_mem_reg(
    served: tuple[Path, NetDevice, BackendServer],
) -> None:
    """REM_MEM_REG of a region that does not exist is refused."""
    path, _, _ = served
    shared = allocate_shared(1 << 20)
    with Frontend.connect(path) as fe:
        fe.get_features()
        fe.set_protocol_features(ProtocolFeature.REPLY_ACK | ProtocolFeature.CONFIGURE_MEM_SLOTS)
        fe.set_owner()
        from pyvdpa.vhost_user.frontend import BackendRefusedError

        with pytest.raises(BackendRefusedError):
            fe.rem_mem_reg(MemoryRegion(0, 1 << 20, shared.address, 0))
    shared.close()
