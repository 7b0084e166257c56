"""Block I/O over any blk device, vhost-user or vhost-vdpa (like fio).

Theory of operation (virtio 1.2, section 5.2.6): a request is a chain of a
readable 16-byte header (type, ioprio, sector), the data (readable for
OUT, writable for IN) and one writable status byte the device fills last.
Capacity comes from the config space (GET_CONFIG, 512-byte sectors).

Up to ``iodepth`` requests are in flight.  Offsets are sequential or
random, aligned to the block size, inside ``size`` bytes.  With ``verify``
every block written carries a pattern derived from its offset and a
generation number: after a write completes the block is read back and
compared; for read workloads the area is first filled with the pattern.
"""

from __future__ import annotations

import random
import struct
import time
from dataclasses import asdict, dataclass
from typing import Literal

from pyvdpa.drive.session import DriverSession
from pyvdpa.errors import ConfigError, PyvdpaError
from pyvdpa.virtio.blk import SECTOR_SIZE, BlkRequestHeader
from pyvdpa.virtio.constants import BlkFeature, BlkStatus, BlkType, DeviceId, VirtioFeature

__all__ = ["BlkResult", "pattern", "run_blk"]

Workload = Literal["read", "write", "randread", "randwrite"]
WORKLOADS = ("read", "write", "randread", "randwrite")

BLK_WANTED = (
    VirtioFeature.VERSION_1
    | VirtioFeature.RING_EVENT_IDX
    | VirtioFeature.RING_INDIRECT_DESC
    | VirtioFeature.PROTOCOL_FEATURES
    | VirtioFeature.IN_ORDER
    | BlkFeature.SIZE_MAX
    | BlkFeature.SEG_MAX
    | BlkFeature.BLK_SIZE
    | BlkFeature.FLUSH
    | BlkFeature.RO
    | BlkFeature.TOPOLOGY
)

_PATTERN = struct.Struct("<QQ")
#: ``capacity``, the first field of the config space (512-byte sectors).
_CAPACITY = struct.Struct("<Q")


def pattern(offset: int, generation: int, size: int) -> bytes:
    """The verification pattern of the block at ``offset`` written in ``generation``."""
    unit = _PATTERN.pack(offset, generation)
    return (unit * (size // len(unit) + 1))[:size]


@dataclass
class BlkResult:
    """What a blk run measured (``--json`` prints these keys)."""

    rw: str
    bs: int
    duration: float
    capacity: int = 0
    ios: int = 0
    bytes: int = 0
    errors: int = 0
    verify_errors: int = 0
    verified: int = 0
    iops: float = 0.0
    bytes_per_s: float = 0.0
    #: IOTLB misses the back-end sent and the session answered (``--iommu``).
    iotlb_misses: int = 0
    #: Mappings the session withdrew and gave again during the run (vhost-vdpa ``--iommu``).
    iotlb_remaps: int = 0

    def finish(self, elapsed: float) -> None:
        """Compute rates over ``elapsed`` seconds."""
        self.duration = elapsed
        if elapsed > 0:
            self.iops = self.ios / elapsed
            self.bytes_per_s = self.bytes / elapsed

    def as_dict(self) -> dict[str, object]:
        """The figures as a JSON-ready dict."""
        return asdict(self)


@dataclass
class _Slot:
    header: int
    data: int
    status: int
    offset: int = 0
    kind: BlkType = BlkType.IN
    verify: bool = False
    generation: int = 0


def read_capacity(session: DriverSession) -> int:
    """Disk size in bytes, from the config space."""
    (sectors,) = _CAPACITY.unpack(session.read_config(0, _CAPACITY.size))
    return int(sectors) * SECTOR_SIZE


def run_blk(
    session: DriverSession,
    *,
    rw: str = "randread",
    bs: int = 4096,
    iodepth: int = 32,
    size: int | None = None,
    verify: bool = False,
    duration: float = 5.0,
    ios: int | None = None,
    ring_size: int = 128,
    packed: bool = False,
    in_order: bool = True,
    progress: bool = False,
) -> BlkResult:
    """Negotiate a blk device on ``session`` and run I/O; return the figures.

    ``in_order``: ask VIRTIO_F_IN_ORDER (used when the back-end offers it).
    """
    if rw not in WORKLOADS:
        raise ConfigError(f"unknown workload {rw!r} ({', '.join(WORKLOADS)})")
    if bs <= 0 or bs % SECTOR_SIZE:
        raise ConfigError(f"block size {bs} is not a positive multiple of {SECTOR_SIZE}")
    if not 0 < iodepth <= ring_size // 3:
        raise ConfigError(f"iodepth must be 1..{ring_size // 3}")
    if size is not None and size < bs * iodepth:
        raise ConfigError(f"size {size} holds fewer than iodepth={iodepth} blocks of {bs}")
    required = VirtioFeature.VERSION_1 | (VirtioFeature.RING_PACKED if packed else 0)
    wanted = BLK_WANTED if in_order else BLK_WANTED & ~VirtioFeature.IN_ORDER
    features = session.negotiate(wanted, required, device=DeviceId.BLOCK)
    capacity = read_capacity(session)
    area = min(size if size is not None else capacity, capacity)
    area -= area % bs
    if area < bs:
        raise ConfigError(f"disk of {capacity} bytes holds no {bs}-byte block in the chosen size")
    writes = rw in ("write", "randwrite")
    if writes and features & BlkFeature.RO:
        raise ConfigError("device is read-only: write workloads refused")
    ring = session.setup_ring(0, ring_size)
    session.enable_rings()
    slots = []
    for _ in range(iodepth):
        slots.append(_Slot(session.alloc(16, 16), session.alloc(bs, 512), session.alloc(1, 1)))
    result = BlkResult(rw, bs, duration, capacity)
    blocks = area // bs
    sequential = rw in ("read", "write")
    rng = random.Random(0x5EED)
    cursor = 0
    generations: dict[int, int] = {}
    in_flight: dict[int, _Slot] = {}
    busy: set[int] = set()
    free = list(slots)
    prefill = verify and not writes
    prefill_next = 0
    mem = session.memory

    def submit(slot: _Slot, kind: BlkType, offset: int, *, check: bool) -> None:
        slot.kind, slot.offset, slot.verify = kind, offset, check
        header = BlkRequestHeader(kind, 0, offset // SECTOR_SIZE)
        mem.write(slot.header, header.pack())
        mem.write(slot.status, b"\xff")
        if kind is BlkType.OUT:
            slot.generation = generations.get(offset, 0) + 1
            mem.write(slot.data, pattern(offset, slot.generation, bs))
            chain = ring.add([(slot.header, 16), (slot.data, bs)], [(slot.status, 1)])
        else:
            chain = ring.add([(slot.header, 16)], [(slot.data, bs), (slot.status, 1)])
        in_flight[chain] = slot
        busy.add(offset)

    def next_offset() -> int:
        # Never two requests on one block at once: their completion order
        # would decide what the block holds, and verification would guess.
        nonlocal cursor
        while True:
            if sequential:
                offset = cursor * bs
                cursor = (cursor + 1) % blocks
            else:
                offset = rng.randrange(blocks) * bs
            if offset not in busy:
                return offset

    def complete(slot: _Slot, written: int) -> None:
        status = mem.read(slot.status, 1)[0]
        expected_len = 1 + (bs if slot.kind is BlkType.IN else 0)
        if status != BlkStatus.OK or written < 1 or written > expected_len:
            result.errors += 1
            free.append(slot)
            return
        if slot.kind is BlkType.OUT:
            generations[slot.offset] = slot.generation
            if verify:
                submit(slot, BlkType.IN, slot.offset, check=True)
                return
        elif slot.verify:
            result.verified += 1
            expected = pattern(slot.offset, generations.get(slot.offset, 0), bs)
            if mem.read(slot.data, bs) != expected:
                result.verify_errors += 1
        free.append(slot)

    start = time.monotonic()
    deadline = start + duration
    next_report = start + 1.0
    while True:
        now = time.monotonic()
        done = now >= deadline or (ios is not None and result.ios >= ios)
        session.tick()
        if done and not in_flight:
            break
        while free and not done and not session.quiescing():
            slot = free.pop()
            if prefill:
                submit(slot, BlkType.OUT, prefill_next * bs, check=False)
                prefill_next += 1
                prefill = prefill_next < blocks
                continue
            offset = next_offset()
            if writes:
                submit(slot, BlkType.OUT, offset, check=False)
            else:
                submit(slot, BlkType.IN, offset, check=verify and offset in generations)
            result.ios += 1
            result.bytes += bs
        ring.kick()
        progressed = False
        while (used := ring.get_used()) is not None:
            head, written = used
            slot_done = in_flight.pop(head, None)
            if slot_done is None:
                raise PyvdpaError(f"device completed unknown request {head}")
            busy.discard(slot_done.offset)
            progressed = True
            complete(slot_done, written)
        if progress and now >= next_report:
            next_report += 1.0
            print(f"  {now - start:5.1f}s  ios {result.ios}  errors {result.errors}", flush=True)
        if not progressed:
            if now > deadline + 10.0:
                raise PyvdpaError(f"{len(in_flight)} requests never completed")
            session.wait_call(0.01)
    result.finish(time.monotonic() - start)
    session.stop()
    result.iotlb_misses = session.iotlb_misses
    result.iotlb_remaps = session.iotlb_remaps
    return result
