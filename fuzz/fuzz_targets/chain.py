"""The descriptor chain walkers: the Python rings against the compiled kernels.

Input: a flags byte (packed layout, indirect descriptors, event index,
whether each chain is completed, all its writable bytes written, once
popped, whether the device is behind an IOMMU), a byte choosing the queue
size (split: a power of two up to 32; packed: 1 to 32), the 16-bit
SET_VRING_BASE value; behind an IOMMU, a count and that many IOTLB
entries (I/O virtual page, memory page, pages, permission: a byte each);
then the first bytes of guest memory, which hold the descriptor table at
0x0, the available ring (split) or driver event area (packed) at 0x200,
the used ring or device event area at 0x400, and buffers and indirect
tables anywhere up to 0x4000.  Behind an IOMMU those addresses are I/O
virtual addresses, translated by the IOTLB
(:class:`~pyvdpa.memory.IotlbAddressSpace` for the Python queue, the
translation table for the compiled one); a missing translation must be
reported by both at the same address.

The ring goes the way a control plane sends it: checked and mapped by
:func:`~pyvdpa.device.ring.describe_ring`, then the Python queue a device
builds from the spec (:class:`~pyvdpa.device.virtqueue.Virtqueue`) and the
compiled one (:meth:`~pyvdpa.dataplane.queues.CompiledQueue.from_spec`).

Verdicts: both queues pop (and complete) the same chains (ids, segments,
bytes) or fail with the same :class:`~pyvdpa.errors.PyvdpaError` subclass
(a missing translation at the same address), and leave guest memory the
same; neither raises anything else.  Coverage comes from the Python
walker; the kernels are compiled code the fuzzer does not see into.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from fuzz_targets.reader import Reader
from pyvdpa.dataplane.queues import CompiledQueue
from pyvdpa.device.ring import RingNotifiers, RingPosition, describe_ring
from pyvdpa.device.virtqueue import Virtqueue
from pyvdpa.errors import IotlbMissError, PyvdpaError
from pyvdpa.memory import (
    GuestMemory,
    Iotlb,
    IotlbAddressSpace,
    IotlbPerm,
    MemoryRegion,
    allocate_shared,
)
from pyvdpa.virtio.constants import VirtioFeature
from pyvdpa.virtio.packed import PackedDriverQueue
from pyvdpa.virtio.ring import AddressSpace, DeviceQueue, QueueFullError
from pyvdpa.virtio.split import SplitDriverQueue

__all__ = ["MEMORY_SIZE", "check", "guest_memory", "ring_image", "seeds", "test_one_input"]

MEMORY_SIZE = 0x4000
"""Bytes of guest memory, from guest-physical address 0."""

DESC_ADDR = 0x0
DRIVER_ADDR = 0x200
DEVICE_ADDR = 0x400
INDIRECT_ADDR = 0x800
BUFFERS_ADDR = 0x1000
MAX_SIZE = 32

_PACKED, _INDIRECT, _EVENT_IDX, _COMPLETE, _IOMMU = 1, 2, 4, 8, 16
_PAGE = 0x1000
_FRAMES = MEMORY_SIZE // _PAGE
_MAX_ENTRIES = 8

Outcome = tuple[Any, ...]


class _Guest:
    """One memfd region at guest-physical 0, shared by every input of a run."""

    def __init__(self) -> None:
        self.shared = allocate_shared(MEMORY_SIZE, "fuzz-chain")
        self.memory = GuestMemory(1)
        self.memory.add_region(MemoryRegion(0, MEMORY_SIZE, self.shared.address, 0), self.shared.fd)

    def load(self, image: bytes) -> None:
        self.memory.write(0, image[:MEMORY_SIZE].ljust(MEMORY_SIZE, b"\0"))

    def snapshot(self) -> bytes:
        return self.memory.read(0, MEMORY_SIZE)


_guest: _Guest | None = None


def guest_memory() -> _Guest:
    """The guest memory of this process's inputs, allocated on first use."""
    global _guest
    if _guest is None:
        _guest = _Guest()
    return _guest


def _pop_all(queue: DeviceQueue, limit: int, complete: bool) -> list[Outcome]:
    outcomes: list[Outcome] = []
    for _ in range(limit):
        try:
            chain = queue.pop()
            if chain is not None and complete:
                queue.push(chain, sum(s.length for s in chain.writable))
        except PyvdpaError as exc:
            miss = (exc.iova, exc.write) if isinstance(exc, IotlbMissError) else None
            outcomes.append(("error", type(exc), miss))
            break
        if chain is None:
            outcomes.append(("empty",))
            break
        outcomes.append(
            (
                chain.id,
                chain.desc_count,
                tuple((s.addr, s.length) for s in chain.readable),
                tuple((s.addr, s.length) for s in chain.writable),
                chain.read_all(),
            )
        )
    outcomes.append(("state", queue.broken, queue.inflight, queue.base))
    return outcomes


def _size(packed: bool, choice: int) -> int:
    return choice % MAX_SIZE + 1 if packed else 1 << choice % 6


def _iommu(reader: Reader) -> IotlbAddressSpace:
    """An IOTLB of the entries the input lists, in front of the guest memory."""
    iotlb = Iotlb()
    address = guest_memory().shared.address
    for _ in range(reader.u8() % (_MAX_ENTRIES + 1)):
        page, frame, pages, perm = reader.u8(), reader.u8(), reader.u8(), reader.u8()
        with contextlib.suppress(PyvdpaError):
            iotlb.update(
                page * _PAGE,
                (pages % _FRAMES + 1) * _PAGE,
                address + frame % _FRAMES * _PAGE,
                IotlbPerm(perm & 3),
            )
    return IotlbAddressSpace(iotlb, guest_memory().memory)


def test_one_input(data: bytes) -> None:
    """Pop every chain with both walkers over the same guest memory; compare."""
    check(data)


def check(data: bytes) -> None:
    """Walk the ring in ``data`` with the Python device queue and the kernels: same verdicts."""
    reader = Reader(data)
    flags, choice, base = reader.u8(), reader.u8(), reader.u16()
    space: AddressSpace = _iommu(reader) if flags & _IOMMU else guest_memory().memory
    image = reader.rest()
    packed = bool(flags & _PACKED)
    features = VirtioFeature.RING_PACKED if packed else VirtioFeature(0)
    if flags & _INDIRECT:
        features |= VirtioFeature.RING_INDIRECT_DESC
    if flags & _EVENT_IDX:
        features |= VirtioFeature.RING_EVENT_IDX
    size = _size(packed, choice)
    complete = bool(flags & _COMPLETE)
    # Completing chains frees their slots: go round the ring once more.
    limit = 2 * size + 1 if complete else size + 1
    guest = guest_memory()
    guest.load(image)
    try:
        spec = describe_ring(
            0, size, int(features), (DESC_ADDR, DRIVER_ADDR, DEVICE_ADDR),
            RingPosition.decode(base, packed=packed), space, RingNotifiers(0),
        )  # fmt: skip
    except PyvdpaError:
        return
    try:
        python_queue = Virtqueue(spec).queue
        expected = _pop_all(python_queue, limit, complete)
        after_python = guest.snapshot()
        guest.load(image)
        got = _pop_all(CompiledQueue.from_spec(spec), limit, complete)
        assert got == expected, (got, expected)
        assert guest.snapshot() == after_python
    finally:
        spec.areas.release()


def ring_image(packed: bool, size: int, indirect: bool, event_idx: bool) -> bytes:
    """Guest memory with a few chains a well-behaved driver made available."""
    guest = guest_memory()
    guest.load(b"")
    cls = PackedDriverQueue if packed else SplitDriverQueue
    driver = cls(
        guest.memory, size, DESC_ADDR, DRIVER_ADDR, DEVICE_ADDR,
        event_idx=event_idx, indirect_addr=INDIRECT_ADDR,
    )  # fmt: skip
    buffer = BUFFERS_ADDR
    for n in range(min(size, 3)):
        readable = [(buffer, 16)] if n != 1 else []
        writable = [(buffer + 0x100 + 0x20 * i, 32) for i in range(n + 1)]
        guest.memory.write(buffer, bytes(range(16)))
        try:
            driver.add(readable, writable, indirect=indirect and n == 2)
        except QueueFullError:
            break
        buffer += 0x200
    image = guest.snapshot()
    return image[: BUFFERS_ADDR + 0x800]


def seeds() -> Iterator[bytes]:
    """Well-formed rings of each layout, with and without indirect chains and an IOMMU."""
    for packed in (False, True):
        for size, indirect, event_idx in ((1, False, False), (4, True, False), (8, True, True)):
            flags = (_PACKED if packed else 0) | (_INDIRECT if indirect else 0)
            flags |= _EVENT_IDX if event_idx else 0
            choice = size - 1 if packed else size.bit_length() - 1
            base = (1 << 15 if packed else 0).to_bytes(2, "little")
            image = ring_image(packed, size, indirect, event_idx).rstrip(b"\0")
            yield bytes([flags, choice]) + base + image
            # The same ring behind an IOMMU mapping every page one to one, read-write.
            identity = bytes([1, 0, 0, _FRAMES - 1, int(IotlbPerm.RW)])
            yield bytes([flags | _IOMMU | _COMPLETE, choice]) + base + identity + image
