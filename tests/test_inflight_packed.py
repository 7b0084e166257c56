"""Inflight I/O tracking for packed rings, over real sockets.

The front-end plays QEMU after a back-end died: it keeps the inflight region
(GET_INFLIGHT_FD) and hands it to the next back-end (SET_INFLIGHT_FD) with
SET_VRING_BASE already past the chains the dead one took.  Hostile region
contents keep the ring from running (its err eventfd fires) and leave the
connection serving.
"""

from __future__ import annotations

import os
import select
import struct
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from pyvdpa.device import Virtqueue
from pyvdpa.device.inflight import InflightDescriptor, InflightRegion
from pyvdpa.devices.blk import BlkDevice
from pyvdpa.drive.session import Session
from pyvdpa.memory import MemoryRegion
from pyvdpa.vhost_user import codec
from pyvdpa.vhost_user.frontend import Frontend
from pyvdpa.vhost_user.protocol import ProtocolFeature
from pyvdpa.vhost_user.server import BackendServer
from pyvdpa.virtio.blk import BlkRequestHeader
from pyvdpa.virtio.constants import BlkType, VirtioFeature
from pyvdpa.virtio.packed import PackedDriverQueue

FEATURES = int(
    VirtioFeature.VERSION_1 | VirtioFeature.PROTOCOL_FEATURES | VirtioFeature.RING_PACKED
)
PROTOCOL = ProtocolFeature.REPLY_ACK | ProtocolFeature.INFLIGHT_SHMFD
SIZE = 16
WRAP = 1 << 15
DESC = struct.Struct("<QIHH")
# Packed region: header fields, then 32-byte entries from offset 32.
USED_IDX, OLD_USED_IDX = 16, 18
ENTRY, ENTRY_SIZE = 32, 32
NEXT, NUM, COUNTER, ID, ADDR = 2, 6, 8, 16, 24


pytestmark = pytest.mark.usefixtures("no_fd_leak")


class StallingBlkDevice(BlkDevice):
    """A back-end about to die: it takes every request and completes none."""

    def process(self, vring: Virtqueue) -> None:
        while vring.pop() is not None:
            pass


class Driver:
    """A packed ring and GET_ID requests in a session's shared memory."""

    def __init__(self, session: Session) -> None:
        self.session = session
        self.desc = session.alloc(16 * SIZE, 16)
        driver, device = session.alloc(4, 4), session.alloc(4, 4)
        self.queue = PackedDriverQueue(
            session.memory, SIZE, self.desc, driver, device, event_idx=False
        )
        self.addr = codec.VringAddr(
            0,
            codec.VringAddrFlags(0),
            session.gpa_to_uva(self.desc),
            session.gpa_to_uva(device),
            session.gpa_to_uva(driver),
            0,
        )
        self.data: dict[int, int] = {}
        self.slots = 0
        self.kick = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self.call = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self.err = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)

    def get_id(self) -> tuple[int, list[InflightDescriptor]]:
        """Post a GET_ID request; return its buffer id and its ring descriptors."""
        mem = self.session.memory
        header, data, status = self.session.alloc(16), self.session.alloc(20), self.session.alloc(1)
        mem.write(header, BlkRequestHeader(BlkType.GET_ID, 0, 0).pack())
        buffer_id = self.queue.add([(header, 16)], [(data, 20), (status, 1)])
        self.data[buffer_id] = data
        first, self.slots = self.slots, self.slots + 3
        raw = [DESC.unpack(mem.read(self.desc + 16 * (first + i), 16)) for i in range(3)]
        return buffer_id, [InflightDescriptor(*desc) for desc in raw]

    def start(self, fe: Frontend, base: int) -> None:
        fe.set_vring_call(0, self.call)
        fe.set_vring_err(0, self.err)
        fe.set_vring_num(0, SIZE)
        fe.set_vring_base(0, base)
        fe.set_vring_addr(self.addr)
        fe.set_vring_kick(0, self.kick)
        fe.set_vring_enable(0, True)

    def wait_used(self) -> tuple[int, int]:
        for _ in range(500):
            used = self.queue.get_used()
            if used is not None:
                return used
            time.sleep(0.01)
        raise AssertionError("no request completed")

    def close(self) -> None:
        for fd in (self.kick, self.call, self.err):
            os.close(fd)


def _handshake(fe: Frontend, region: MemoryRegion, fd: int) -> None:
    fe.get_features()
    fe.set_protocol_features(PROTOCOL)
    fe.set_owner()
    fe.set_features(FEATURES)
    fe.set_mem_table([(region, fd)])


def test_packed_request_is_resubmitted_by_the_next_backend(tmp_path: Path) -> None:
    """A packed request taken by a back-end that disconnected is served by the next one."""
    first, second = tmp_path / "first.sock", tmp_path / "second.sock"
    stalling = StallingBlkDevice(size=1 << 20, serial="lost")
    device = BlkDevice(size=1 << 20, serial="resubmitted")
    with (
        BackendServer(first, lambda: stalling),
        Session(Frontend.connect(first), memory_size=1 << 20) as session,
    ):
        fe = session.frontend
        _handshake(fe, session.region, session.shared.fd)
        info, fd = fe.get_inflight_fd(1, SIZE)
        region = InflightRegion.from_fd(fd, info.mmap_size, 0, 1, SIZE, packed=True)
        driver = Driver(session)
        try:
            buffer_id, descriptors = driver.get_id()
            fe.set_inflight_fd(info, fd)
            driver.start(fe, WRAP)
            tracker = region.packed_queue(0)
            for _ in range(500):
                if tracker.inflight_chains():
                    break
                time.sleep(0.01)
            [taken] = tracker.inflight_chains()
            assert taken.descriptors == tuple(descriptors)
            # The back-end's connection ends without GET_VRING_BASE.
            fe.close()
            with BackendServer(second, lambda: device), Frontend.connect(second) as again:
                _handshake(again, session.region, session.shared.fd)
                again.set_inflight_fd(info, fd)
                driver.start(again, WRAP | 3)
                assert driver.wait_used() == (buffer_id, 21)
                assert session.memory.read(driver.data[buffer_id], 11) == b"resubmitted"
                assert tracker.inflight_chains() == []
                # The ring goes on from where the resubmitted chain left it.
                next_id, _ = driver.get_id()
                os.eventfd_write(driver.kick, 1)
                assert driver.wait_used() == (next_id, 21)
        finally:
            driver.close()
            region.close()
            os.close(fd)
    stalling.close()
    device.close()


def _write(fmt: str, offset: int, value: int) -> Callable[[InflightRegion], None]:
    def corrupt(region: InflightRegion) -> None:
        struct.pack_into(fmt, region.buffer, offset, value)

    return corrupt


def _entry(index: int, field: int) -> int:
    return ENTRY + ENTRY_SIZE * index + field


def _both_used_positions(value: int) -> Callable[[InflightRegion], None]:
    def corrupt(region: InflightRegion) -> None:
        struct.pack_into("=HH", region.buffer, USED_IDX, value, value)

    return corrupt


HOSTILE = {
    "buffer-id-out-of-range": _write("=H", _entry(2, ID), 999),
    "used-position-out-of-range": _both_used_positions(500),
    "used-position-not-behind-the-chain": _both_used_positions(1),
    "chain-of-no-descriptor": _write("=H", _entry(0, NUM), 0),
    "chain-longer-than-the-queue": _write("=H", _entry(0, NUM), SIZE + 1),
    "chain-leaves-the-region": _write("=H", _entry(0, NEXT), 40),
    "chain-continues-past-its-end": _write("=H", _entry(2, 18), 0x81),
    "buffer-outside-guest-memory": _write("=Q", _entry(0, ADDR), 0x7_0000_0000),
}


def _served_with(
    tmp_path: Path,
    corrupt: Callable[[InflightRegion], None] | None,
    *,
    requests: int = 1,
) -> tuple[bool, list[tuple[int, int]]]:
    """Start a ring over a hand-made region; return (err fired, completions)."""
    sock = tmp_path / "vu.sock"
    device = BlkDevice(size=1 << 20, serial="resubmitted")
    done: list[tuple[int, int]] = []
    with (
        BackendServer(sock, lambda: device) as server,
        Session(Frontend.connect(sock), memory_size=1 << 20) as session,
        InflightRegion.allocate(1, SIZE, packed=True) as region,
    ):
        fe = session.frontend
        _handshake(fe, session.region, session.shared.fd)
        driver = Driver(session)
        try:
            for _ in range(requests):
                _, descriptors = driver.get_id()
                region.packed_queue(0).mark_inflight(descriptors)
            if corrupt is not None:
                corrupt(region)
            fe.set_inflight_fd(codec.Inflight(region.mmap_size, 0, 1, SIZE), region.fd)
            driver.start(fe, WRAP | driver.slots)
            ready, _, _ = select.select([driver.err], [], [], 2.0)
            for _ in range(50):
                used = driver.queue.get_used()
                if used is None:
                    break
                done.append(used)
            # The connection still serves, whatever the region held.
            assert fe.get_features() & VirtioFeature.RING_PACKED
            if ready:
                assert server.connections[0].vrings[0].broken
        finally:
            driver.close()
    device.close()
    return bool(ready), done


def test_handmade_region_is_served(tmp_path: Path) -> None:
    fired, done = _served_with(tmp_path, None, requests=2)
    assert not fired
    assert sorted(done) == [(0, 21), (1, 21)]


@pytest.mark.parametrize("name", list(HOSTILE))
def test_hostile_region_breaks_only_the_ring(tmp_path: Path, name: str) -> None:
    fired, done = _served_with(tmp_path, HOSTILE[name])
    assert fired
    assert done == []


def test_duplicate_buffer_id_in_flight(tmp_path: Path) -> None:
    """Two resubmitted chains under one buffer id could not be told apart: the ring breaks."""
    second_last = _entry(5, ID)
    fired, done = _served_with(tmp_path, _write("=H", second_last, 0), requests=2)
    assert fired
    assert done == []


def test_largest_counter_wraps(tmp_path: Path) -> None:
    """A region holding the largest fetch counter still records the next fetch."""
    fired, done = _served_with(tmp_path, _write("=Q", _entry(0, COUNTER), (1 << 64) - 1))
    assert not fired
    assert done == [(0, 21)]
