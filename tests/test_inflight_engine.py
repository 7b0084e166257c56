"""Inflight I/O tracking by sim-blk on the compiled engine, over real sockets.

The front-end plays QEMU: it keeps the inflight region (GET_INFLIGHT_FD)
and hands it to each back-end it connects (SET_INFLIGHT_FD).  The engine
device must record what its kernel takes and completes in the layout
:mod:`pyvdpa.device.inflight` reads back, and serve, once each, the
requests a previous back-end left in flight: for split rings with the
available index QEMU sends after a crash (rewound to the used index), also
when the previous back-end completed requests out of order.
"""

from __future__ import annotations

import os
import select
import struct
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import pyvdpa.dataplane.blk as engine_blk
from pyvdpa.dataplane.blk import EngineBlkDevice
from pyvdpa.dataplane.engine import Engine
from pyvdpa.device import Virtqueue
from pyvdpa.device.inflight import InflightRegion
from pyvdpa.devices.blk import BlkDevice
from pyvdpa.drive.session import Session
from pyvdpa.vhost_user import codec
from pyvdpa.vhost_user.frontend import Frontend
from pyvdpa.vhost_user.protocol import ProtocolFeature
from pyvdpa.vhost_user.server import BackendServer
from pyvdpa.virtio.blk import BlkRequestHeader
from pyvdpa.virtio.constants import BlkType, VirtioFeature
from pyvdpa.virtio.packed import PackedDriverQueue, PackedLayout
from pyvdpa.virtio.split import SplitDriverQueue, SplitLayout

SIZE = 16
WRAP = 1 << 15
PROTOCOL = ProtocolFeature.REPLY_ACK | ProtocolFeature.INFLIGHT_SHMFD
SECTORS = 64
DESC = struct.Struct("<QIHH")

pytestmark = pytest.mark.usefixtures("no_fd_leak")


def _features(packed: bool) -> int:
    features = VirtioFeature.VERSION_1 | VirtioFeature.PROTOCOL_FEATURES
    return int(features | (VirtioFeature.RING_PACKED if packed else 0))


class StallingBlkDevice(BlkDevice):
    """A back-end about to die: it takes every request and completes none."""

    def process(self, vring: Virtqueue) -> None:
        while vring.pop() is not None:
            pass


class Driver:
    """A ring of either layout and blk requests in a session's shared memory."""

    def __init__(self, session: Session, *, packed: bool) -> None:
        self.session = session
        self.packed = packed
        self.queue: SplitDriverQueue | PackedDriverQueue
        if packed:
            layout = PackedLayout(SIZE)
            self.desc = session.alloc(layout.desc_size, 16)
            driver, device = session.alloc(4, 4), session.alloc(4, 4)
            self.queue = PackedDriverQueue(
                session.memory, SIZE, self.desc, driver, device, event_idx=False
            )
            areas = (self.desc, device, driver)
        else:
            split = SplitLayout(SIZE)
            self.desc = session.alloc(split.desc_size, 16)
            driver = session.alloc(split.avail_size, 2)
            device = session.alloc(split.used_size, 4)
            self.queue = SplitDriverQueue(
                session.memory, SIZE, self.desc, driver, device, event_idx=False
            )
            areas = (self.desc, device, driver)
        self.used_ring = device
        self.addr = codec.VringAddr(
            0, codec.VringAddrFlags(0), *(session.gpa_to_uva(a) for a in areas), 0
        )
        self.status: dict[int, int] = {}
        self.slots = 0
        self.kick = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self.call = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self.err = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)

    def write(self, sector: int, payload: bytes) -> int:
        """Post a write of ``payload`` at ``sector``; return its buffer id (split: head)."""
        mem = self.session.memory
        header, data, status = (
            self.session.alloc(16),
            self.session.alloc(len(payload)),
            self.session.alloc(1),
        )
        mem.write(header, BlkRequestHeader(BlkType.OUT, 0, sector).pack())
        mem.write(data, payload)
        mem.write(status, b"\xff")
        ident = self.queue.add([(header, 16), (data, len(payload))], [(status, 1)])
        self.status[ident] = status
        self.slots += 3
        return ident

    def start(self, fe: Frontend, base: int) -> None:
        fe.set_vring_call(0, self.call)
        fe.set_vring_err(0, self.err)
        fe.set_vring_num(0, SIZE)
        fe.set_vring_base(0, base)
        fe.set_vring_addr(self.addr)
        fe.set_vring_kick(0, self.kick)
        fe.set_vring_enable(0, True)

    def wait_used(self, count: int) -> list[tuple[int, int]]:
        """The next ``count`` used entries; then checks that no other one follows."""
        done: list[tuple[int, int]] = []
        deadline = time.monotonic() + 5
        while len(done) < count and time.monotonic() < deadline:
            used = self.queue.get_used()
            if used is None:
                time.sleep(0.005)
            else:
                done.append(used)
        time.sleep(0.05)
        extra = self.queue.get_used()
        assert extra is None, f"completed once more: {extra}"
        assert len(done) == count, f"{count - len(done)} requests never completed"
        return done

    def ok(self, ident: int) -> bool:
        return self.session.memory.read(self.status[ident], 1) == b"\x00"

    def close(self) -> None:
        for fd in (self.kick, self.call, self.err):
            os.close(fd)


def _handshake(fe: Frontend, session: Session, packed: bool) -> None:
    fe.get_features()
    fe.set_protocol_features(PROTOCOL)
    fe.set_owner()
    fe.set_features(_features(packed))
    fe.set_mem_table([(session.region, session.shared.fd)])


def _payload(seed: int) -> bytes:
    return bytes([seed & 0xFF]) * 512


@pytest.fixture
def engine() -> Iterator[Engine]:
    with Engine("event") as eng:
        yield eng


@pytest.fixture
def disk(tmp_path: Path) -> Path:
    path = tmp_path / "disk.img"
    path.write_bytes(bytes(SECTORS * 512))
    return path


@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
def test_engine_records_every_request_and_clears_it(
    tmp_path: Path, engine: Engine, disk: Path, packed: bool
) -> None:
    device = EngineBlkDevice(path=disk, engine=engine)
    sock = tmp_path / "vu.sock"
    with (
        BackendServer(sock, lambda: device),
        Session(Frontend.connect(sock), memory_size=1 << 20) as session,
    ):
        fe = session.frontend
        _handshake(fe, session, packed)
        info, fd = fe.get_inflight_fd(1, SIZE)
        region = InflightRegion.from_fd(fd, info.mmap_size, 0, 1, SIZE, packed=packed)
        driver = Driver(session, packed=packed)
        try:
            fe.set_inflight_fd(info, fd)
            driver.start(fe, WRAP if packed else 0)
            for burst in range(3):
                idents = [driver.write(burst * 4 + i, _payload(burst * 4 + i)) for i in range(4)]
                os.eventfd_write(driver.kick, 1)
                done = driver.wait_used(4)
                assert sorted(i for i, _ in done) == sorted(idents)
                assert all(driver.ok(i) for i in idents)
            if packed:
                tracker = region.packed_queue(0)
                assert tracker.inflight_chains() == []
                assert tracker.used_idx == tracker.old_used_idx == 36 - SIZE * 2
                assert tracker.used_wrap_counter == tracker.old_used_wrap_counter == 1
                assert tracker.free_head == tracker.old_free_head
                raw = region.buffer
                counters = [struct.unpack_from("=Q", raw, 32 + 32 * i + 8)[0] for i in range(SIZE)]
                assert max(counters) == 12
            else:
                tracker_split = region.split_queue(0)
                assert tracker_split.inflight_heads() == []
                assert tracker_split.used_idx == 12
                raw = region.buffer
                counters = [
                    struct.unpack_from("=Q", raw, 16 + 16 * head + 8)[0] for head in range(SIZE)
                ]
                # The region's counters start at 1; heads are reused, the last
                # request on each head left its counter.
                assert sorted(counters)[-4:] == [9, 10, 11, 12]
            contents = disk.read_bytes()
            assert all(contents[s * 512 : s * 512 + 512] == _payload(s) for s in range(12))
        finally:
            driver.close()
            region.close()
            os.close(fd)
    device.close()


def test_packed_copies_are_the_ring_descriptors(tmp_path: Path, engine: Engine, disk: Path) -> None:
    """A packed chain's entry holds its ring descriptors as the driver wrote them."""
    device = EngineBlkDevice(path=disk, engine=engine)
    sock = tmp_path / "vu.sock"
    with (
        BackendServer(sock, lambda: device),
        Session(Frontend.connect(sock), memory_size=1 << 20) as session,
    ):
        fe = session.frontend
        _handshake(fe, session, True)
        info, fd = fe.get_inflight_fd(1, SIZE)
        region = InflightRegion.from_fd(fd, info.mmap_size, 0, 1, SIZE, packed=True)
        driver = Driver(session, packed=True)
        try:
            ident = driver.write(0, _payload(1))
            ring = [DESC.unpack(session.memory.read(driver.desc + 16 * i, 16)) for i in range(3)]
            fe.set_inflight_fd(info, fd)
            driver.start(fe, WRAP)
            driver.wait_used(1)
            assert driver.ok(ident)
            # Entries 0..2 hold the copies (addr, len, id, flags), the free list behind them.
            copies = [
                struct.unpack_from("=HHIQ", region.buffer, 32 + 32 * i + 16) for i in range(3)
            ]
            assert [(a, n, i, f) for i, f, n, a in copies] == ring
        finally:
            driver.close()
            region.close()
            os.close(fd)
    device.close()


@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
def test_requests_a_dead_backend_took_are_served_once(
    tmp_path: Path, engine: Engine, disk: Path, packed: bool
) -> None:
    """Requests taken and never completed are written by the engine device, once each."""
    stalling = StallingBlkDevice(size=SECTORS * 512)
    device = EngineBlkDevice(path=disk, engine=engine)
    first, second = tmp_path / "first.sock", tmp_path / "second.sock"
    with (
        BackendServer(first, lambda: stalling),
        Session(Frontend.connect(first), memory_size=1 << 20) as session,
    ):
        fe = session.frontend
        _handshake(fe, session, packed)
        info, fd = fe.get_inflight_fd(1, SIZE)
        region = InflightRegion.from_fd(fd, info.mmap_size, 0, 1, SIZE, packed=packed)
        driver = Driver(session, packed=packed)
        try:
            idents = [driver.write(s, _payload(s + 1)) for s in range(3)]
            fe.set_inflight_fd(info, fd)
            driver.start(fe, WRAP if packed else 0)
            os.eventfd_write(driver.kick, 1)
            for _ in range(500):
                taken = (
                    region.packed_queue(0).inflight_chains()
                    if packed
                    else region.split_queue(0).inflight_heads()
                )
                if len(taken) == 3:
                    break
                time.sleep(0.01)
            else:
                raise AssertionError("the first back-end did not take the requests")
            fe.close()
            # After a crash QEMU sends the used index for a split ring (0 here);
            # a packed ring's available position is past the chains.
            base = WRAP | driver.slots if packed else 0
            with BackendServer(second, lambda: device), Frontend.connect(second) as again:
                _handshake(again, session, packed)
                again.set_inflight_fd(info, fd)
                driver.start(again, base)
                done = driver.wait_used(3)
                assert sorted(i for i, _ in done) == sorted(idents)
                assert all(driver.ok(i) for i in idents)
                # The ring goes on after them: the next request is served once.
                later = driver.write(10, _payload(77))
                os.eventfd_write(driver.kick, 1)
                assert [i for i, _ in driver.wait_used(1)] == [later]
            contents = disk.read_bytes()
            for s in range(3):
                assert contents[s * 512 : s * 512 + 512] == _payload(s + 1)
            assert contents[10 * 512 : 11 * 512] == _payload(77)
            assert device.stats[0].completed_desc == 4
        finally:
            driver.close()
            region.close()
            os.close(fd)
    stalling.close()
    device.close()


def test_split_restart_after_out_of_order_completion(
    tmp_path: Path, engine: Engine, disk: Path
) -> None:
    """Three requests taken, the second completed: the restart serves the first and third.

    The used ring's index (1) is what QEMU sends after the crash; the
    available index resumes past all three.
    """
    device = EngineBlkDevice(path=disk, engine=engine)
    sock = tmp_path / "vu.sock"
    with (
        BackendServer(sock, lambda: device),
        Session(Frontend.connect(sock), memory_size=1 << 20) as session,
        InflightRegion.allocate(1, SIZE, packed=False) as region,
    ):
        fe = session.frontend
        _handshake(fe, session, False)
        driver = Driver(session, packed=False)
        try:
            a, b, c = (driver.write(s, _payload(s + 30)) for s in range(3))
            # What a dead back-end left: a, b, c taken; b completed and published.
            tracker = region.split_queue(0)
            for head in (a, b, c):
                tracker.mark_inflight(head)
            tracker.record_batch((b,))
            session.memory.write(driver.used_ring + 4, struct.pack("<II", b, 1))
            session.memory.write(driver.used_ring + 2, struct.pack("<H", 1))
            tracker.commit_batch((b,), 1)
            assert driver.queue.get_used() == (b, 1)
            fe.set_inflight_fd(codec.Inflight(region.mmap_size, 0, 1, SIZE), region.fd)
            driver.start(fe, 1)
            done = driver.wait_used(2)
            assert sorted(i for i, _ in done) == sorted((a, c))
            later = driver.write(5, _payload(99))
            os.eventfd_write(driver.kick, 1)
            assert [i for i, _ in driver.wait_used(1)] == [later]
            contents = disk.read_bytes()
            assert contents[0:512] == _payload(30)
            assert contents[1024:1536] == _payload(32)
            # b was the dead back-end's: it is not written again.
            assert contents[512:1024] == bytes(512)
            assert contents[5 * 512 : 6 * 512] == _payload(99)
            assert tracker.inflight_heads() == []
        finally:
            driver.close()
    device.close()


def _hostile_split(region: InflightRegion) -> None:
    # A used index far behind the used ring: more completions than the queue holds.
    struct.pack_into("=H", region.buffer, 14, 0x8000)


def _hostile_packed(region: InflightRegion) -> None:
    # The chain's second descriptor lies outside the queue's entries.
    struct.pack_into("=H", region.buffer, 32 + 2, 40)


@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
def test_hostile_region_breaks_only_the_ring(
    tmp_path: Path, engine: Engine, disk: Path, packed: bool
) -> None:
    device = EngineBlkDevice(path=disk, engine=engine)
    sock = tmp_path / "vu.sock"
    with (
        BackendServer(sock, lambda: device) as server,
        Session(Frontend.connect(sock), memory_size=1 << 20) as session,
        InflightRegion.allocate(1, SIZE, packed=packed) as region,
    ):
        fe = session.frontend
        _handshake(fe, session, packed)
        driver = Driver(session, packed=packed)
        try:
            ident = driver.write(0, _payload(5))
            raw = [DESC.unpack(session.memory.read(driver.desc + 16 * i, 16)) for i in range(3)]
            if packed:
                from pyvdpa.device.inflight import InflightDescriptor

                region.packed_queue(0).mark_inflight([InflightDescriptor(*d) for d in raw])
                _hostile_packed(region)
            else:
                region.split_queue(0).mark_inflight(ident)
                _hostile_split(region)
            fe.set_inflight_fd(codec.Inflight(region.mmap_size, 0, 1, SIZE), region.fd)
            driver.start(fe, WRAP | 3 if packed else 1)
            ready, _, _ = select.select([driver.err], [], [], 2.0)
            assert ready
            assert server.connections[0].vrings[0].broken
            assert driver.queue.get_used() is None
            assert fe.get_features() & VirtioFeature.VERSION_1
            assert disk.read_bytes() == bytes(SECTORS * 512)
        finally:
            driver.close()
    device.close()


def test_test_only_switch_records_nothing(
    tmp_path: Path, engine: Engine, disk: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``PYVDPA_TEST_NO_INFLIGHT``: the feature stays offered, the region stays untouched."""
    monkeypatch.setattr(engine_blk, "TEST_NO_INFLIGHT", True)
    device = EngineBlkDevice(path=disk, engine=engine)
    sock = tmp_path / "vu.sock"
    with (
        BackendServer(sock, lambda: device),
        Session(Frontend.connect(sock), memory_size=1 << 20) as session,
    ):
        fe = session.frontend
        assert fe.get_protocol_features() & ProtocolFeature.INFLIGHT_SHMFD
        _handshake(fe, session, False)
        info, fd = fe.get_inflight_fd(1, SIZE)
        region = InflightRegion.from_fd(fd, info.mmap_size, 0, 1, SIZE, packed=False)
        fresh = bytes(region.buffer)
        driver = Driver(session, packed=False)
        try:
            fe.set_inflight_fd(info, fd)
            driver.start(fe, 0)
            ident = driver.write(0, _payload(3))
            os.eventfd_write(driver.kick, 1)
            driver.wait_used(1)
            assert driver.ok(ident)
            assert bytes(region.buffer) == fresh
        finally:
            driver.close()
            region.close()
            os.close(fd)
    device.close()


def test_kernel_layout_is_the_region_layout() -> None:
    """The kernels' literal offsets (their cache keys on their own files) are the region's."""
    from pyvdpa.dataplane.kernels import spec
    from pyvdpa.device import inflight as region

    buffer_at = region._PACKED_BUFFER_AT
    expected = {
        "SPLIT_HEADER": region._SPLIT_HEADER_SIZE,
        "SPLIT_DESC": region._SPLIT_DESC_SIZE,
        "SPLIT_LAST_BATCH_HEAD": region._SPLIT_LAST_BATCH_HEAD,
        "SPLIT_USED_IDX": region._SPLIT_USED_IDX,
        "SPLIT_INFLIGHT": region._SPLIT_INFLIGHT,
        "SPLIT_NEXT": region._SPLIT_NEXT,
        "SPLIT_COUNTER": region._SPLIT_COUNTER,
        "PACKED_HEADER": region._PACKED_HEADER_SIZE,
        "PACKED_DESC": region._PACKED_DESC_SIZE,
        "PACKED_FREE_HEAD": region._PACKED_FREE_HEAD,
        "PACKED_OLD_FREE_HEAD": region._PACKED_OLD_FREE_HEAD,
        "PACKED_USED_IDX": region._PACKED_USED_IDX,
        "PACKED_OLD_USED_IDX": region._PACKED_OLD_USED_IDX,
        "PACKED_USED_WRAP": region._PACKED_USED_WRAP,
        "PACKED_OLD_USED_WRAP": region._PACKED_OLD_USED_WRAP,
        "PACKED_INFLIGHT": region._PACKED_INFLIGHT,
        "PACKED_NEXT": region._PACKED_NEXT,
        "PACKED_LAST": region._PACKED_LAST,
        "PACKED_NUM": region._PACKED_NUM,
        "PACKED_COUNTER": region._PACKED_COUNTER,
        # _PACKED_BUFFER: id u16, flags u16, len u32, addr u64.
        "PACKED_ID": buffer_at,
        "PACKED_FLAGS": buffer_at + 2,
        "PACKED_LEN": buffer_at + 4,
        "PACKED_ADDR": buffer_at + 8,
    }
    assert region._PACKED_BUFFER.format == "=HHIQ"
    found = {
        n.removeprefix("INFLIGHT_"): getattr(spec, n)
        for n in dir(spec)
        if n.startswith("INFLIGHT_")
    }
    assert found == expected
