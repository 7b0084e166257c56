"""Hostile front-ends: garbage on the socket and broken rings.

Every case checks: the request is refused (REPLY_ACK non-zero) or the
connection dropped, no fd leaks (the process's fd count returns to where it
was), and the socket keeps serving a well-behaved front-end afterwards.
"""

from __future__ import annotations

import os
import socket
import struct
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from pyvdpa.devices.net import NetDevice
from pyvdpa.drive.net import run_net
from pyvdpa.drive.session import GPA_BASE, Session
from pyvdpa.memory import MemoryRegion, allocate_shared
from pyvdpa.vhost_user import codec
from pyvdpa.vhost_user.frontend import Frontend
from pyvdpa.vhost_user.protocol import HeaderFlags, ProtocolFeature, Request
from pyvdpa.vhost_user.server import BackendServer
from pyvdpa.virtio.constants import VirtioFeature
from pyvdpa.virtio.ring import DescFlag
from pyvdpa.virtio.split import SplitLayout

NEED_ACK = HeaderFlags.VERSION | HeaderFlags.NEED_REPLY


def _fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


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
    deadline = time.monotonic() + 15
    while _fd_count() > before and time.monotonic() < deadline:
        time.sleep(0.02)
    return _fd_count()


DROPPING = {
    "short header then EOF": lambda p: p.send(b"\x01\x00\x00"),
    "wrong version": lambda p: p.request(Request.GET_FEATURES, flags=0x2),
    "reserved flag": lambda p: p.request(Request.GET_FEATURES, flags=0x1 | 0x20),
    "oversized payload": lambda p: p.send(codec.HEADER.pack(Request.SET_OWNER, 1, 1 << 20)),
    "truncated payload then EOF": lambda p: p.send(
        codec.HEADER.pack(Request.SET_FEATURES, 1, 8) + b"\x00\x00\x00"
    ),
    "reply flag on a request": lambda p: p.request(Request.GET_FEATURES, flags=0x5),
}


@pytest.mark.parametrize("case", sorted(DROPPING))
def test_stream_breaking_input_drops_the_connection(
    served: tuple[Path, NetDevice, BackendServer], case: str
) -> None:
    path, _, _ = served
    before = _fd_count()
    peer = RawPeer(path)
    DROPPING[case](peer)
    if "EOF" in case:
        peer.sock.shutdown(socket.SHUT_WR)
    assert peer.closed_by_peer() or case == "reply flag on a request"
    peer.close()
    assert _settle(before) == before
    _still_serving(path)


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


REFUSED: dict[str, RefusalCase] = {
    "unknown request": _unknown_request,
    "fd on a request that takes none": _fd_on_fdless_request,
    "vring index out of range": _vring_index_out_of_range,
    "split ring size not a power of two": _vring_size_not_power_of_two,
    "zero-sized region": _zero_sized_region,
    "overlapping regions": _overlapping_regions,
    "unmappable fd (a pipe)": _unmappable_fd,
    "region beyond its file": _region_beyond_file,
    "ring address outside the memory table": _ring_outside_memory,
    "fewer fds than regions": _wrong_fd_count,
    "features not offered": _features_not_offered,
    "SET_VRING_ENABLE value 7": _bad_enable_value,
    "request gated by a protocol feature not negotiated": _gated_request,
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_bad_request_is_refused_and_connection_kept(
    served: tuple[Path, NetDevice, BackendServer], case: str
) -> None:
    path, _, _ = served
    r, w = os.pipe()
    fds = [os.eventfd(0), _memfd(1 << 20), _memfd(1 << 20), r]
    before = _fd_count()
    peer = RawPeer(path)
    peer.negotiate()
    REFUSED[case](peer, fds)
    assert peer.ack() != 0
    # The connection still answers.
    peer.request(Request.GET_FEATURES, flags=HeaderFlags.VERSION)
    assert len(peer._read(20)) == 20
    peer.close()
    assert _settle(before) == before
    for fd in [*fds, w]:
        os.close(fd)
    _still_serving(path)


def test_too_many_fds_drop_the_connection(
    served: tuple[Path, NetDevice, BackendServer],
) -> None:
    path, _, _ = served
    fds = [os.eventfd(0) for _ in range(12)]
    before = _fd_count()
    peer = RawPeer(path)
    peer.request(Request.SET_VRING_CALL, struct.pack("<Q", 0), fds=fds)
    assert peer.closed_by_peer()
    peer.close()
    assert _settle(before) == before
    for fd in fds:
        os.close(fd)
    _still_serving(path)


def test_disconnect_mid_message_and_mid_session(
    served: tuple[Path, NetDevice, BackendServer],
) -> None:
    path, _, server = served
    before = _fd_count()
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
    import random

    rng = random.Random(1234)
    before = _fd_count()
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


def _hostile_ring_session(path: Path) -> tuple[Session, int, int]:
    session = Session(Frontend.connect(path), memory_size=4 << 20)
    session.negotiate(VirtioFeature.VERSION_1 | VirtioFeature.PROTOCOL_FEATURES, 0)
    err = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
    return session, err, session.alloc(SplitLayout(16).desc_size, 16)


@pytest.mark.parametrize(
    "poison",
    ["loop", "next out of range", "buffer outside memory", "avail jump"],
)
def test_broken_ring_breaks_only_its_queue(
    served: tuple[Path, NetDevice, BackendServer], poison: str
) -> None:
    """A hostile TX ring: typed error, queue broken, err fd signalled, others unharmed."""
    path, device, server = served
    session, err, _ = _hostile_ring_session(path)
    try:
        rx = session.setup_ring(0, 16)
        tx = session.setup_ring(1, 16)
        session.frontend.set_vring_err(1, err)
        session.enable_rings()
        desc: memoryview = tx.queue._desc  # type: ignore[attr-defined]
        avail: memoryview = tx.queue._avail  # type: ignore[attr-defined]
        buf = session.alloc(64)
        entry = struct.Struct("<QIHH")
        if poison == "loop":
            entry.pack_into(desc, 0, buf, 64, DescFlag.NEXT, 1)
            entry.pack_into(desc, 16, buf, 64, DescFlag.NEXT, 0)
        elif poison == "next out of range":
            entry.pack_into(desc, 0, buf, 64, DescFlag.NEXT, 99)
        elif poison == "buffer outside memory":
            entry.pack_into(desc, 0, GPA_BASE + (64 << 20), 64, 0, 0)
        else:
            entry.pack_into(desc, 0, buf, 64, 0, 0)
        struct.pack_into("<H", avail, 4, 0)
        struct.pack_into("<H", avail, 2, 40 if poison == "avail jump" else 1)
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
        del desc, avail, rx
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
