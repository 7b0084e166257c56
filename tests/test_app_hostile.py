"""A hostile guest against ``pyvdpa run``: one device's broken ring harms nothing else.

Theory of operation: the vDPA example application runs as its own process
with a sim-net and a sim-blk device on a file, exactly as a user starts it.
A front-end then breaks one device's ring (virtio 1.2, section 2.1.2: the
device may stop using a queue the driver broke): the application must log
one clear line naming the fault, signal the queue's error eventfd, count it
in the queue's statistics, and leave the other device, the other queues and
every byte of the disk image as they were.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import select
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest

from peers.app import PyvdpaRun
from pyvdpa.drive.blk import run_blk
from pyvdpa.drive.net import run_net
from pyvdpa.drive.session import GPA_BASE, DriverRing, Session
from pyvdpa.vhost_user.frontend import Frontend
from pyvdpa.virtio.blk import BlkRequestHeader
from pyvdpa.virtio.constants import BlkType, VirtioFeature
from pyvdpa.virtio.ring import DescFlag

DISK_SIZE = 4 << 20
RING = 16
_DESC = struct.Struct("<QIHH")


@pytest.fixture
def app(sock_dir: Path) -> Iterator[tuple[PyvdpaRun, Path]]:
    disk = sock_dir / "disk.img"
    disk.write_bytes(os.urandom(DISK_SIZE))
    vdevs = ["sim-net,name=net0", f"sim-blk,name=blk0,path={disk}"]
    with PyvdpaRun(vdevs, sock_dir / "vdpa") as run:
        yield run, disk


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@contextlib.contextmanager
def _hostile(path: str, rings: int, watched: int) -> Iterator[tuple[Session, int]]:
    """A session with ``rings`` running rings, ring ``watched`` reporting to an error eventfd."""
    session = Session(Frontend.connect(path), memory_size=4 << 20)
    err = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
    try:
        session.negotiate(VirtioFeature.VERSION_1 | VirtioFeature.PROTOCOL_FEATURES, 0)
        for index in range(rings):
            session.setup_ring(index, RING)
        session.frontend.set_vring_err(watched, err)
        session.enable_rings()
        yield session, err
    finally:
        session.close()
        os.close(err)


def _publish(ring: DriverRing, head: int) -> None:
    avail: memoryview = ring.queue._avail  # type: ignore[attr-defined]
    struct.pack_into("<H", avail, 4, head)
    struct.pack_into("<H", avail, 2, 1)
    del avail
    os.eventfd_write(ring.kick_fd, 1)


def _signalled(fd: int, timeout: float = 10.0) -> bool:
    ready, _, _ = select.select([fd], [], [], timeout)
    return bool(ready)


def _net_still_loops_back(run: PyvdpaRun) -> None:
    with Session(Frontend.connect(run.sockets[0]), memory_size=4 << 20) as session:
        result = run_net(session, mode="io", duration=0.5)
    assert result.rx_packets > 0
    assert result.errors == 0


def _blk_still_serves(run: PyvdpaRun, disk: Path, before: bytes) -> None:
    """Verified writes to the first MiB work; the rest of the image is unchanged."""
    with Session(Frontend.connect(run.sockets[1]), memory_size=8 << 20) as session:
        result = run_blk(session, rw="randwrite", verify=True, size=1 << 20, ios=256, iodepth=8)
    assert result.ios >= 256
    assert result.errors == 0
    assert result.verify_errors == 0
    assert disk.read_bytes()[1 << 20 :] == before[1 << 20 :]


def test_broken_net_ring_leaves_the_disk_and_the_app_alone(
    app: tuple[PyvdpaRun, Path],
) -> None:
    run, disk = app
    before = disk.read_bytes()
    with _hostile(run.sockets[0], rings=2, watched=1) as (session, err):
        tx = session.rings[1]
        buf = session.alloc(64)
        desc: memoryview = tx.queue._desc  # type: ignore[attr-defined]
        # A chain that loops on itself.
        _DESC.pack_into(desc, 0, buf, 64, DescFlag.NEXT, 1)
        _DESC.pack_into(desc, 16, buf, 64, DescFlag.NEXT, 0)
        del desc
        _publish(tx, 0)
        assert _signalled(err), "the broken queue's error eventfd was not signalled"
        stats = run.stats("net0")
        assert stats[1]["bad_desc_errors"] == 1
        assert stats[0]["bad_desc_errors"] == 0
    broken = f"{run.sockets[0]}: vring 1 broken: chain revisits a descriptor"
    run.wait_for(re.compile(re.escape(broken)), timeout=5)
    _net_still_loops_back(run)
    _blk_still_serves(run, disk, before)
    assert run.stats("blk0")[0]["bad_desc_errors"] == 0


def _post_write_request(session: Session, ring: DriverRing, *, poison: str) -> None:
    """A 4 KiB OUT request at sector 0, made hostile as ``poison`` says."""
    header = session.alloc(16)
    data = session.alloc(4096)
    status = session.alloc(1)
    session.memory.write(header, BlkRequestHeader(BlkType.OUT, 0).pack())
    session.memory.write(data, b"\xa5" * 4096)
    status_flags = DescFlag.WRITE
    if poison == "data outside memory":
        data = GPA_BASE + (64 << 20)
    elif poison == "no status byte":
        status_flags = DescFlag(0)
    desc: memoryview = ring.queue._desc  # type: ignore[attr-defined]
    _DESC.pack_into(desc, 0, header, 16, DescFlag.NEXT, 1)
    _DESC.pack_into(desc, 16, data, 4096, DescFlag.NEXT, 2)
    _DESC.pack_into(desc, 32, status, 1, status_flags, 0)
    del desc
    _publish(ring, 0)


def test_broken_blk_ring_writes_nothing(app: tuple[PyvdpaRun, Path]) -> None:
    """A buffer outside guest memory breaks the queue before any byte is written."""
    run, disk = app
    before = disk.read_bytes()
    with _hostile(run.sockets[1], rings=1, watched=0) as (session, err):
        _post_write_request(session, session.rings[0], poison="data outside memory")
        assert _signalled(err), "the broken queue's error eventfd was not signalled"
        counters = run.stats("blk0")[0]
        assert counters["invalid_buffer"] == 1
        assert counters["completed_desc"] == 0
    assert _digest(disk.read_bytes()) == _digest(before)
    broken = f"{run.sockets[1]}: vring 0 broken: guest address range"
    run.wait_for(re.compile(re.escape(broken)), timeout=5)
    _net_still_loops_back(run)
    _blk_still_serves(run, disk, before)


def test_blk_request_without_status_byte_is_refused_unserved(app: tuple[PyvdpaRun, Path]) -> None:
    """No writable status byte: the request is handed back unserved, the queue goes on."""
    run, disk = app
    before = disk.read_bytes()
    with _hostile(run.sockets[1], rings=1, watched=0) as (session, err):
        ring = session.rings[0]
        _post_write_request(session, ring, poison="no status byte")
        assert session.wait_call(10), "the request was never completed"
        used_ring: memoryview = ring.queue._used  # type: ignore[attr-defined]
        # used.idx, then the first element: id and bytes written.
        assert struct.unpack_from("<HII", used_ring, 2) == (1, 0, 0)
        del used_ring
        counters = run.stats("blk0")[0]
        assert counters["invalid_buffer"] == 1
        assert counters["completed_desc"] == 1
        assert not _signalled(err, timeout=0)
    assert _digest(disk.read_bytes()) == _digest(before)
    _net_still_loops_back(run)
    _blk_still_serves(run, disk, before)


def test_chain_out_of_ring_order_breaks_only_its_ring(app: tuple[PyvdpaRun, Path]) -> None:
    """With IN_ORDER negotiated, a TX chain that skips descriptors is a broken ring."""
    run, disk = app
    before = disk.read_bytes()
    session = Session(Frontend.connect(run.sockets[0]), memory_size=4 << 20)
    err = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
    try:
        wanted = VirtioFeature.VERSION_1 | VirtioFeature.PROTOCOL_FEATURES
        features = session.negotiate(wanted | VirtioFeature.IN_ORDER, 0)
        assert features & VirtioFeature.IN_ORDER
        for index in range(2):
            session.setup_ring(index, RING)
        session.frontend.set_vring_err(1, err)
        session.enable_rings()
        tx = session.rings[1]
        frame = session.alloc(64)
        desc: memoryview = tx.queue._desc  # type: ignore[attr-defined]
        avail: memoryview = tx.queue._avail  # type: ignore[attr-defined]
        # In ring order: descriptor 0, then the chain at descriptor 1 (here at 4).
        _DESC.pack_into(desc, 0, frame, 64, 0, 0)
        _DESC.pack_into(desc, 4 * 16, frame, 64, 0, 0)
        struct.pack_into("<HH", avail, 4, 0, 4)
        struct.pack_into("<H", avail, 2, 2)
        del desc, avail
        os.eventfd_write(tx.kick_fd, 1)
        assert _signalled(err), "the broken queue's error eventfd was not signalled"
        stats = run.stats("net0")
        assert stats[1]["bad_desc_errors"] == 1
        assert stats[1]["received_desc"] == 1
        assert stats[0]["bad_desc_errors"] == 0
    finally:
        session.close()
        os.close(err)
    broken = f"{run.sockets[0]}: vring 1 broken: in-order ring: chain names 4 where ring order"
    run.wait_for(re.compile(re.escape(broken)), timeout=5)
    _net_still_loops_back(run)
    _blk_still_serves(run, disk, before)
