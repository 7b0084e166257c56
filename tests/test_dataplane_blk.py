"""sim-blk on the compiled engine, held request by request to the Python reference device.

Each test serves :class:`EngineBlkDevice` and :class:`BlkDevice` (each over
its own backing store) with :class:`BackendServer`, drives both with
pyvdpa's own front-end (:class:`~pyvdpa.drive.session.Session`) and feeds
them the same request chains: valid ones and every malformed request the
reference checks for.  Status bytes, used lengths, every byte of the
writable buffers, the per-queue counters and the backing store must match
exactly.  Multiqueue, event mode, a broken ring and dirty logging are
covered against the engine device alone.
"""

from __future__ import annotations

import contextlib
import os
import random
import select
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import pyvdpa.dataplane.blk as engine_blk
from pyvdpa.dataplane import kernels
from pyvdpa.dataplane.blk import EngineBlkDevice
from pyvdpa.dataplane.engine import Engine
from pyvdpa.device import Device
from pyvdpa.devices import blk as reference_blk
from pyvdpa.devices.blk import MAX_DISCARD_SECTORS, BlkDevice
from pyvdpa.devices.stats import STAT_NAMES
from pyvdpa.drive.session import WANTED_PROTOCOL_FEATURES, Session
from pyvdpa.memory import allocate_shared
from pyvdpa.vhost_user.frontend import Frontend
from pyvdpa.vhost_user.protocol import ProtocolFeature
from pyvdpa.vhost_user.server import BackendServer
from pyvdpa.virtio.blk import (
    BLK_CONFIG_SIZE,
    BLK_ID_BYTES,
    BLK_REQUEST_HEADER_SIZE,
    BLK_SEGMENT_SIZE,
    SECTOR_SHIFT,
    BlkRequestHeader,
    DiscardWriteZeroesSegment,
    SegmentFlag,
)
from pyvdpa.virtio.constants import BlkFeature, BlkStatus, BlkType, VirtioFeature
from pyvdpa.virtio.ring import QueueFullError

SETTLE = 5.0
SECTORS = 128
DISK_BYTES = SECTORS * 512 + 100  # a tail shorter than a sector is not part of the disk
SENTINEL = 0xA5
ARENA = 4 << 20
WANTED = (
    VirtioFeature.VERSION_1
    | VirtioFeature.PROTOCOL_FEATURES
    | VirtioFeature.RING_EVENT_IDX
    | VirtioFeature.RING_INDIRECT_DESC
    | VirtioFeature.LOG_ALL
    | BlkFeature.FLUSH
    | BlkFeature.DISCARD
    | BlkFeature.WRITE_ZEROES
    | BlkFeature.MQ
)
IN, OUT, FLUSH, GET_ID = BlkType.IN, BlkType.OUT, BlkType.FLUSH, BlkType.GET_ID
DISCARD, WRITE_ZEROES = BlkType.DISCARD, BlkType.WRITE_ZEROES
OK, IOERR, UNSUPP = BlkStatus.OK, BlkStatus.IOERR, BlkStatus.UNSUPP


def _until(condition: Callable[[], bool], timeout: float = SETTLE) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.001)
    return True


@dataclass(frozen=True)
class Request:
    """A request chain: the bytes of each readable descriptor, the length of each writable one."""

    readable: tuple[bytes, ...]
    writable: tuple[int, ...]


@dataclass(frozen=True)
class Outcome:
    """What the driver sees: the used length and every byte of the writable buffers."""

    written: int
    writable: bytes

    @property
    def status(self) -> int | None:
        return self.writable[-1] if self.writable else None


def header(kind: int, sector: int = 0, ioprio: int = 0) -> bytes:
    return BlkRequestHeader(kind, ioprio, sector).pack()


def segment(sector: int, num_sectors: int, flags: int = 0) -> bytes:
    return DiscardWriteZeroesSegment(sector, num_sectors, flags).pack()


def data(seed: int, size: int) -> bytes:
    return random.Random(seed).randbytes(size)


def request(readable: bytes | Sequence[bytes], writable: Sequence[int] = (1,)) -> Request:
    chunks = (readable,) if isinstance(readable, bytes) else tuple(readable)
    return Request(chunks, tuple(writable))


# (name, request, the status the reference answers, None when it writes none)
CASES: list[tuple[str, Request, int | None]] = [
    ("out", request(header(OUT, 5) + data(1, 512)), OK),
    ("out-two-sectors-scattered", request([header(OUT, 9), data(2, 100), data(3, 924)]), OK),
    ("out-header-split", request([header(OUT, 20)[:5], header(OUT, 20)[5:] + data(4, 512)]), OK),
    ("out-extra-writable", request(header(OUT, 30) + data(5, 512), (10, 1)), OK),
    ("out-no-data", request(header(OUT, SECTORS)), OK),
    ("out-last-sector", request(header(OUT, SECTORS - 1) + data(6, 512)), OK),
    ("out-odd-length", request(header(OUT, 40) + data(7, 500)), IOERR),
    ("out-past-capacity", request(header(OUT, SECTORS) + data(8, 512)), IOERR),
    ("out-straddling-end", request(header(OUT, SECTORS - 1) + data(9, 1024)), IOERR),
    ("out-sector-overflow", request(header(OUT, 2**64 - 1) + data(10, 512)), IOERR),
    ("out-sector-sign", request(header(OUT, 2**63) + data(11, 512)), IOERR),
    ("in", request(header(IN, 5), (512, 1)), OK),
    ("in-status-in-data-buffer", request(header(IN, 9), (1025,)), OK),
    ("in-scattered", request(header(IN, 9), (100, 300, 112, 1)), OK),
    ("in-many-buffers", request(header(IN, 0), (64,) * 16 + (1,)), OK),
    ("in-header-split", request([header(IN, 20)[:9], header(IN, 20)[9:]], (512, 1)), OK),
    ("in-extra-readable", request(header(IN, 20) + data(12, 77), (512, 1)), OK),
    ("in-nothing-at-capacity", request(header(IN, SECTORS)), OK),
    ("in-last-sector", request(header(IN, SECTORS - 1), (512, 1)), OK),
    ("in-past-capacity", request(header(IN, SECTORS), (512, 1)), IOERR),
    ("in-beyond-capacity", request(header(IN, SECTORS + 1)), IOERR),
    ("in-straddling-end", request(header(IN, SECTORS - 1), (1024, 1)), IOERR),
    ("in-sector-overflow", request(header(IN, 2**64 - 1), (512, 1)), IOERR),
    ("in-sector-sign", request(header(IN, 2**63), (512, 1)), IOERR),
    ("in-odd-length", request(header(IN, 0), (100, 1)), IOERR),
    ("flush", request(header(FLUSH)), OK),
    ("flush-with-junk", request(header(FLUSH, 999, 7) + data(13, 33), (7, 1)), OK),
    ("get-id", request(header(GET_ID), (20, 1)), OK),
    ("get-id-short", request(header(GET_ID), (8, 1)), OK),
    ("get-id-no-room", request(header(GET_ID)), OK),
    ("get-id-long", request(header(GET_ID), (40, 1)), OK),
    ("get-id-scattered", request(header(GET_ID), (3,) * 7 + (1,)), OK),
    ("discard", request(header(DISCARD) + segment(10, 4)), OK),
    (
        "discard-segment-split",
        request([header(DISCARD) + segment(2, 1)[:6], segment(2, 1)[6:]]),
        OK,
    ),
    ("discard-unmap-flag", request(header(DISCARD) + segment(10, 4, 1)), UNSUPP),
    ("discard-unknown-flag", request(header(DISCARD) + segment(10, 4, 4)), UNSUPP),
    ("discard-two-segments", request(header(DISCARD) + segment(1, 1) + segment(3, 1)), UNSUPP),
    ("discard-huge-list", request(header(DISCARD) + segment(1, 1) * 4096), UNSUPP),
    ("discard-no-segment", request(header(DISCARD)), UNSUPP),
    ("discard-partial-segment", request(header(DISCARD) + segment(1, 1)[:15]), UNSUPP),
    ("discard-too-long", request(header(DISCARD) + segment(0, MAX_DISCARD_SECTORS + 1)), IOERR),
    ("discard-past-capacity", request(header(DISCARD) + segment(SECTORS - 1, 2)), IOERR),
    ("discard-sector-overflow", request(header(DISCARD) + segment(2**64 - 1, 1)), IOERR),
    ("discard-nothing", request(header(DISCARD) + segment(5, 0)), IOERR),
    ("write-zeroes", request(header(WRITE_ZEROES) + segment(20, 4)), OK),
    ("write-zeroes-unmap", request(header(WRITE_ZEROES) + segment(30, 2, 1)), OK),
    ("write-zeroes-nothing", request(header(WRITE_ZEROES) + segment(5, 0)), OK),
    ("write-zeroes-bad-flag", request(header(WRITE_ZEROES) + segment(0, 1, 2)), UNSUPP),
    ("write-zeroes-past-capacity", request(header(WRITE_ZEROES) + segment(SECTORS, 1)), IOERR),
    ("unknown-type", request(header(99)), UNSUPP),
    ("unknown-type-2", request(header(2), (512, 1)), UNSUPP),
    ("unknown-type-max", request(header(0xFFFFFFFF)), UNSUPP),
    ("short-header", request(header(IN)[:8], (512, 1)), None),
    ("header-15-bytes", request([header(OUT)[:10], header(OUT)[10:15]]), None),
    ("no-status-byte", request(header(IN), ()), None),
    ("out-no-status-byte", request(header(OUT, 50) + data(14, 512), ()), None),
    ("read-back", request(header(IN, 0), (SECTORS * 512, 1)), OK),
]

READONLY_CASES: list[tuple[str, Request, int | None]] = [
    ("out", request(header(OUT, 5) + data(1, 512)), IOERR),
    ("out-bad-range", request(header(OUT, SECTORS) + data(1, 512)), IOERR),
    ("discard", request(header(DISCARD) + segment(1, 1)), IOERR),
    ("discard-malformed", request(header(DISCARD)), IOERR),
    ("write-zeroes", request(header(WRITE_ZEROES) + segment(1, 1)), IOERR),
    ("flush", request(header(FLUSH)), OK),
    ("get-id", request(header(GET_ID), (20, 1)), OK),
    ("in", request(header(IN, 3), (1024, 1)), OK),
    ("in-past-capacity", request(header(IN, SECTORS), (512, 1)), IOERR),
    ("unknown-type", request(header(7)), UNSUPP),
]


class Disk:
    """A blk device served on a socket, a session driving it, and a scratch arena."""

    def __init__(
        self,
        stack: contextlib.ExitStack,
        socket: Path,
        device: BlkDevice | EngineBlkDevice,
        *,
        packed: bool = False,
        inflight: bool = False,
    ) -> None:
        self.device = device
        stack.callback(device.close)

        def factory() -> Device:
            return device

        stack.enter_context(BackendServer(socket, factory))
        self.session = stack.enter_context(Session(Frontend.connect(socket), memory_size=16 << 20))
        wanted = int(WANTED | (VirtioFeature.RING_PACKED if packed else 0))
        protocol = WANTED_PROTOCOL_FEATURES
        if inflight:
            protocol |= ProtocolFeature.INFLIGHT_SHMFD
        self.session.negotiate(wanted, int(VirtioFeature.VERSION_1), protocol=protocol)
        if inflight:
            # The region lets the engine device complete file requests out of order.
            frontend = self.session.frontend
            info, fd = frontend.get_inflight_fd(device.num_queues, 256)
            frontend.set_inflight_fd(info, fd)
            os.close(fd)
        for index in range(device.num_queues):
            self.session.setup_ring(index, 256)
        self.session.enable_rings()
        self.arena = self.session.alloc(ARENA, 4096)

    def contents(self) -> bytes:
        """The whole backing store."""
        return os.pread(self.device.fd, 1 << 24, 0)

    def stats(self, ring: int) -> dict[str, int]:
        counters = self.device.stats[ring].as_dict()
        return {name: counters[name] for name in STAT_NAMES}

    def run(self, requests: Sequence[Request], ring: int = 0) -> list[Outcome]:
        """Post ``requests`` on ``ring``, kick once, and wait for all of them."""
        driver = self.session.rings[ring]
        memory = self.session.memory
        cursor = self.arena
        posted: list[tuple[int, list[tuple[int, int]]]] = []

        def place(size: int, content: bytes) -> int:
            nonlocal cursor
            addr = cursor
            cursor += (size + 63) & ~63
            assert cursor <= self.arena + ARENA
            memory.write(addr, content)
            return addr

        for req in requests:
            readable = [(place(len(chunk), chunk), len(chunk)) for chunk in req.readable]
            writable = [(place(n, bytes([SENTINEL]) * n), n) for n in req.writable]
            try:
                head = driver.queue.add(readable, writable)
            except QueueFullError:
                raise AssertionError("ring too small for the batch") from None
            posted.append((head, writable))
        driver.kick()
        used: dict[int, int] = {}

        def collect() -> bool:
            while (entry := driver.queue.get_used()) is not None:
                used[entry[0]] = entry[1]
            return len(used) == len(posted)

        assert _until(collect), f"{len(posted) - len(used)} requests never completed"
        return [
            Outcome(used[head], b"".join(memory.read(addr, n) for addr, n in writable))
            for head, writable in posted
        ]


@dataclass
class Pair:
    """The reference device and the engine device, over identical backing stores."""

    reference: Disk
    engine: Disk

    def compare(self, requests: Sequence[Request], ring: int = 0) -> list[Outcome]:
        expected = self.reference.run(requests, ring)
        got = self.engine.run(requests, ring)
        for i, (want, have) in enumerate(zip(expected, got, strict=True)):
            assert have == want, f"request {i}: engine {have} != reference {want}"
        assert self.engine.stats(ring) == self.reference.stats(ring)
        return got

    def same_disk(self) -> None:
        assert self.engine.contents() == self.reference.contents()


@pytest.fixture
def pair(sock_dir: Path, tmp_path: Path) -> Iterator[Callable[..., Pair]]:
    """``pair(backing="file"|"ram", readonly=, queues=, engine=, packed=)``."""
    stack = contextlib.ExitStack()
    count = iter(range(100))

    def make(
        *,
        backing: str = "file",
        readonly: bool = False,
        queues: int = 1,
        engine: str = "poll",
        packed: bool = False,
    ) -> Pair:
        eng = stack.enter_context(Engine(engine))
        n = next(count)
        paths: list[Path | None] = [None, None]
        size = None
        if backing == "file":
            content = data(n, DISK_BYTES)
            paths = [tmp_path / f"reference{n}.img", tmp_path / f"engine{n}.img"]
            for image in paths:
                assert image is not None
                image.write_bytes(content)
        else:
            size = DISK_BYTES
        serial = f"disk{n}"
        reference = BlkDevice(
            path=paths[0], size=size, readonly=readonly, queues=queues, serial=serial
        )
        device = EngineBlkDevice(
            path=paths[1], size=size, readonly=readonly, queues=queues, serial=serial, engine=eng
        )
        return Pair(
            Disk(stack, sock_dir / f"ref{n}.sock", reference, packed=packed),
            Disk(stack, sock_dir / f"eng{n}.sock", device, packed=packed),
        )

    with stack:
        yield make


# ---------------------------------------------------------------------- parity


@pytest.mark.parametrize(
    ("backing", "engine", "packed"),
    [("file", "poll", False), ("ram", "event", False), ("file", "adaptive", True)],
    ids=["file-poll-split", "ram-event-split", "file-adaptive-packed"],
)
def test_every_request_answered_as_the_reference_does(
    pair: Callable[..., Pair], backing: str, engine: str, packed: bool
) -> None:
    disks = pair(backing=backing, engine=engine, packed=packed)
    for name, req, status in CASES:
        (outcome,) = disks.compare([req])
        assert (outcome.status if outcome.written else None) == status, name
        disks.same_disk()
    assert disks.engine.session.stop() == disks.reference.session.stop()


def test_read_only_disk_answered_as_the_reference_does(pair: Callable[..., Pair]) -> None:
    disks = pair(readonly=True)
    before = disks.engine.contents()
    for name, req, status in READONLY_CASES:
        (outcome,) = disks.compare([req])
        assert outcome.status == status, name
    assert disks.engine.contents() == before
    disks.same_disk()


def test_config_space_is_the_reference_one(pair: Callable[..., Pair]) -> None:
    disks = pair(queues=3)
    read = [
        d.session.frontend.get_config(0, BLK_CONFIG_SIZE) for d in (disks.reference, disks.engine)
    ]
    assert read[0] == read[1]
    assert int.from_bytes(read[1][:8], "little") == SECTORS


def test_a_burst_of_requests_in_one_kick(pair: Callable[..., Pair]) -> None:
    disks = pair()
    batch = [req for _, req, _ in CASES if len(req.writable) < 8][:24]
    disks.compare(batch)
    disks.same_disk()


@st.composite
def requests(draw: st.DrawFn) -> Request:
    """A random request, well formed or not, cut into random descriptors."""
    kind = draw(st.sampled_from([IN, OUT, FLUSH, GET_ID, DISCARD, WRITE_ZEROES, 3, 99]))
    sector = draw(
        st.one_of(st.integers(0, SECTORS + 2), st.sampled_from([SECTORS - 1, 2**63, 2**64 - 1]))
    )
    length = draw(st.sampled_from([0, 1, 511, 512, 1024, 1536, 4096]))
    body = b""
    data_in = 0
    if kind in (DISCARD, WRITE_ZEROES):
        segments = draw(
            st.lists(
                st.tuples(
                    st.one_of(st.integers(0, SECTORS + 1), st.just(2**64 - 1)),
                    st.integers(0, 6),
                    st.sampled_from([0, 1, 2]),
                ),
                max_size=3,
            )
        )
        body = b"".join(segment(*s) for s in segments)
        body = body[: draw(st.sampled_from([len(body), max(len(body) - 1, 0)]))]
    elif kind == OUT:
        body = data(draw(st.integers(0, 1000)), length)
    else:
        data_in = length
    readable = header(kind, sector) + body
    readable = readable[: draw(st.sampled_from([len(readable), len(readable), 12]))]
    status = draw(st.sampled_from([1, 1, 1, 0, 3]))
    total_in = data_in + status
    cuts_r = sorted(draw(st.lists(st.integers(1, len(readable) - 1), max_size=3)))
    cuts_w = (
        sorted(draw(st.lists(st.integers(1, total_in - 1), max_size=3))) if total_in > 1 else []
    )
    chunks = [readable[a:b] for a, b in zip([0, *cuts_r], [*cuts_r, len(readable)], strict=True)]
    sizes = [b - a for a, b in zip([0, *cuts_w], [*cuts_w, total_in], strict=True)]
    return Request(
        tuple(c for c in chunks if c),
        tuple(n for n in sizes if n > 0),
    )


def test_random_request_mixes_match_the_reference(pair: Callable[..., Pair]) -> None:
    disks = pair(backing="ram")

    # One pair for every example: the disks evolve identically from one to the next.
    @settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(batch=st.lists(requests(), min_size=1, max_size=6))
    def check(batch: list[Request]) -> None:
        disks.compare(batch)
        disks.same_disk()

    check()


# ---------------------------------------------------------------------- engine device


def test_queues_are_served_apart(pair: Callable[..., Pair]) -> None:
    disks = pair(queues=2, engine="event")
    for ring in (0, 1, 0, 1):
        disks.compare([req for _, req, _ in CASES[ring * 5 : ring * 5 + 5]], ring)
    disks.same_disk()
    assert disks.engine.stats(0)["completed_desc"] == 10
    assert disks.engine.stats(1)["completed_desc"] == 10


def test_broken_ring_stops_only_its_queue(pair: Callable[..., Pair]) -> None:
    disks = pair(queues=2, engine="event")
    disk = disks.engine
    before = disk.contents()
    session = disk.session
    err = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
    try:
        session.frontend.set_vring_err(0, err)
        ring = session.rings[0]
        # A write whose data lies far outside guest memory, then a valid write behind it.
        head = session.alloc(16)
        session.memory.write(head, header(OUT, 3))
        status = session.alloc(1)
        ring.queue.add([(head, 16), (0xDEAD_0000_0000, 512)], [(status, 1)])
        ring.queue.add([(head, 16), (session.alloc(512), 512)], [(session.alloc(1), 1)])
        ring.kick()
        assert _until(lambda: disk.stats(0)["invalid_buffer"] == 1)
        assert select.select([err], [], [], SETTLE)[0] == [err]
        assert disk.stats(0)["completed_desc"] == 0
        assert disk.contents() == before
        (outcome,) = disk.run([request(header(OUT, 4) + data(99, 512))], ring=1)
        assert outcome == Outcome(1, bytes([OK]))
        assert disk.contents()[4 * 512 : 5 * 512] == data(99, 512)
        assert disk.contents()[3 * 512 : 4 * 512] == before[3 * 512 : 4 * 512]
    finally:
        os.close(err)


def test_dirty_log_covers_what_the_engine_writes(pair: Callable[..., Pair]) -> None:
    disk = pair().engine
    session = disk.session
    frontend = session.frontend
    frontend.set_protocol_features(session.protocol_features | ProtocolFeature.LOG_SHMFD)
    region = session.region
    log = allocate_shared((region.guest_phys_addr + region.memory_size) // 4096 // 8, "dirty-log")

    def dirty() -> set[int]:
        bits = bytes(log.buf)
        return {i << 12 for i in range(len(bits) * 8) if bits[i >> 3] >> (i & 7) & 1}

    try:
        frontend.set_log_base(log.fd, log.size)
        pages = [disk.arena, disk.arena + 4096, disk.arena + 8192]
        # Header and data at the arena's start, the status byte on its third page.
        (outcome,) = disk.run([request(header(OUT, 0) + data(5, 8192))])
        assert outcome.status == OK
        assert pages[2] in dirty() and not {pages[0], pages[1]} & dirty()
        (outcome,) = disk.run([request(header(IN, 0), (8192, 1))])
        assert outcome.status == OK
        assert set(pages) <= dirty()
    finally:
        log.close()


def test_inflight_tracking_is_offered_as_by_the_reference(pair: Callable[..., Pair]) -> None:
    disks = pair()
    offered = disks.engine.session.frontend.get_protocol_features()
    assert offered & ProtocolFeature.INFLIGHT_SHMFD
    assert disks.reference.session.frontend.get_protocol_features() & ProtocolFeature.INFLIGHT_SHMFD
    assert offered & ProtocolFeature.CONFIG and offered & ProtocolFeature.MQ
    assert disks.engine.device.inflight_tracking


def test_kernel_spec_values_are_the_shared_ones() -> None:
    """The kernels keep spec values literal (their cache depends on their file alone)."""
    assert [
        kernels._BLK_T_IN,
        kernels._BLK_T_OUT,
        kernels._BLK_T_FLUSH,
        kernels._BLK_T_GET_ID,
        kernels._BLK_T_DISCARD,
        kernels._BLK_T_WRITE_ZEROES,
        kernels._BLK_S_OK,
        kernels._BLK_S_IOERR,
        kernels._BLK_S_UNSUPP,
        kernels._BLK_HEADER,
        kernels._BLK_SEGMENT,
        kernels._BLK_ID_BYTES,
        kernels._BLK_UNMAP,
        kernels._SECTOR_SHIFT,
        kernels._SECTOR_MASK + 1,
        kernels._FALLOC_KEEP_SIZE,
        kernels._FALLOC_PUNCH_HOLE,
        kernels._FALLOC_ZERO_RANGE,
    ] == [
        IN,
        OUT,
        FLUSH,
        GET_ID,
        DISCARD,
        WRITE_ZEROES,
        OK,
        IOERR,
        UNSUPP,
        BLK_REQUEST_HEADER_SIZE,
        BLK_SEGMENT_SIZE,
        BLK_ID_BYTES,
        SegmentFlag.UNMAP,
        SECTOR_SHIFT,
        1 << SECTOR_SHIFT,
        reference_blk._FALLOC_FL_KEEP_SIZE,
        reference_blk._FALLOC_FL_PUNCH_HOLE,
        reference_blk._FALLOC_FL_ZERO_RANGE,
    ]


# ---------------------------------------------------------------------- asynchronous file I/O


def _post(disk: Disk, requests: Sequence[Request], ring: int = 0) -> list[int]:
    """Post ``requests`` on ``ring`` and kick; return their heads (no wait)."""
    driver = disk.session.rings[ring]
    memory = disk.session.memory
    heads = []
    for req in requests:
        readable = []
        for chunk in req.readable:
            addr = disk.session.alloc(len(chunk), 64)
            memory.write(addr, chunk)
            readable.append((addr, len(chunk)))
        writable = [(disk.session.alloc(n, 64), n) for n in req.writable]
        heads.append(driver.queue.add(readable, writable))
    driver.kick()
    return heads


def _used(disk: Disk, ring: int, count: int, timeout: float) -> list[int]:
    """The heads of the next ``count`` used entries of ``ring``, in the order used."""
    driver = disk.session.rings[ring]
    order: list[int] = []

    def collect() -> bool:
        while (entry := driver.queue.get_used()) is not None:
            order.append(entry[0])
        return len(order) >= count

    assert _until(collect, timeout), f"{count - len(order)} requests not completed in {timeout} s"
    return order


@pytest.fixture
def slow_disks(
    sock_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[Disk, Disk, Engine]]:
    """Two file disks on one engine worker; the first one's I/O pool sleeps 2 s per request."""
    with contextlib.ExitStack() as stack:
        engine = stack.enter_context(Engine("event", workers=1))
        images = []
        for name in ("slow", "fast"):
            image = tmp_path / f"{name}.img"
            image.write_bytes(data(len(name), DISK_BYTES))
            images.append(image)
        monkeypatch.setattr(engine_blk, "TEST_BLK_DELAY", (2000, 1))
        slow = EngineBlkDevice(path=images[0], engine=engine, serial="slow")
        monkeypatch.setattr(engine_blk, "TEST_BLK_DELAY", None)
        fast = EngineBlkDevice(path=images[1], engine=engine, serial="fast")
        yield (
            Disk(stack, sock_dir / "slow.sock", slow, inflight=True),
            Disk(stack, sock_dir / "fast.sock", fast, inflight=True),
            engine,
        )


def test_a_slow_file_request_does_not_stall_another_queue_on_the_worker(
    slow_disks: tuple[Disk, Disk, Engine],
) -> None:
    slow, fast, engine = slow_disks
    assert len(engine._workers) == 1
    started = time.monotonic()
    (slow_head,) = _post(slow, [request(header(IN, 0), (4096, 1))])
    assert _until(lambda: slow.stats(0)["received_desc"] == 1)
    writes = [request(header(OUT, 8 * i) + data(i, 4096)) for i in range(4)]
    for _ in range(3):
        heads = _post(fast, writes)
        assert sorted(_used(fast, 0, 4, 1.5)) == sorted(heads)
    # Served while the slow request waits on the same worker.
    assert slow.stats(0)["completed_desc"] == 0
    assert time.monotonic() - started < 1.9
    assert _used(slow, 0, 1, SETTLE) == [slow_head]
    assert time.monotonic() - started >= 1.95
    contents = fast.contents()
    for i in range(4):
        assert contents[i * 4096 : (i + 1) * 4096] == data(i, 4096)


def test_file_requests_complete_out_of_order(
    sock_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every other request is held back: the used ring's order is not the ring's order."""
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(DISK_BYTES))
    monkeypatch.setattr(engine_blk, "TEST_BLK_DELAY", (200, 2))
    with contextlib.ExitStack() as stack:
        engine = stack.enter_context(Engine("adaptive"))
        device = EngineBlkDevice(path=image, engine=engine)
        disk = Disk(stack, sock_dir / "ooo.sock", device, inflight=True)
        writes = [request(header(OUT, 8 * i) + data(i + 50, 4096)) for i in range(6)]
        heads = _post(disk, writes)
        order = _used(disk, 0, 6, SETTLE)
        assert sorted(order) == sorted(heads)
        assert order != heads
        # The held-back ones (first, third, fifth) come last.
        assert set(order[3:]) == {heads[0], heads[2], heads[4]}
        reads = _post(disk, [request(header(IN, 8 * i), (4096, 1)) for i in range(6)])
        assert sorted(_used(disk, 0, 6, SETTLE)) == sorted(reads)
        for i in range(6):
            assert disk.contents()[i * 4096 : (i + 1) * 4096] == data(i + 50, 4096)
        assert disk.stats(0)["completed_desc"] == 12
        assert disk.stats(0)["completion_errors"] == 0
        # Stopping the ring waits for the pool: nothing is in flight afterwards.
        _post(disk, writes[:2])
        assert _until(lambda: disk.stats(0)["received_desc"] == 14)
        disk.session.stop()
        assert disk.device.stats[0].completed_desc == 14


def test_ram_disk_keeps_the_synchronous_copy(pair: Callable[..., Pair]) -> None:
    disks = pair(backing="ram")
    device = disks.engine.device
    assert isinstance(device, EngineBlkDevice)
    assert device._pool is None


def test_file_without_inflight_region_completes_in_order(
    sock_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without a region a restart resumes at the used index: requests must complete in order."""
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(DISK_BYTES))
    monkeypatch.setattr(engine_blk, "TEST_BLK_DELAY", (100, 2))
    with contextlib.ExitStack() as stack:
        engine = stack.enter_context(Engine("event"))
        device = EngineBlkDevice(path=image, engine=engine)
        disk = Disk(stack, sock_dir / "ordered.sock", device)
        writes = [request(header(OUT, 8 * i) + data(i, 4096)) for i in range(6)]
        heads = _post(disk, writes)
        assert _used(disk, 0, 6, SETTLE) == heads


def test_invalidation_restarts_rings_the_pool_serves(sock_dir: Path, tmp_path: Path) -> None:
    """Pool threads hold host addresses: an IOTLB invalidation restarts the ring, not in place."""
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(DISK_BYTES))
    with contextlib.ExitStack() as stack:
        engine = stack.enter_context(Engine("event"))
        device = EngineBlkDevice(path=image, engine=engine)
        Disk(stack, sock_dir / "inv.sock", device, inflight=True)
        called: list[bool] = []
        assert not device.iotlb_invalidate(0, 4096, lambda: called.append(True))
        assert called == []
