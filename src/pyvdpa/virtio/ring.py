"""Rules shared by split and packed virtqueues (virtio 1.2, sections 2.7 and 2.8).

Theory of operation
-------------------
Both ring layouts describe buffers with the same 16-byte descriptor
(``<QIHH``: address, length and two 16-bit fields whose meaning depends on
the layout) and both may point at an indirect table of such descriptors
(sections 2.7.5.3 and 2.8.7).  A device therefore validates a chain with the
same rules whichever layout carries it, and :func:`walk_chain` is the one
place these rules live:

* every index read from guest memory is below the size of the table it
  indexes (:class:`DescriptorIndexError`);
* a linked walk that needs more steps than its table has entries revisits a
  descriptor (:class:`DescriptorLoopError`);
* an indirect descriptor needs ``VIRTIO_F_INDIRECT_DESC``, is never nested,
  never carries ``NEXT``, and its length is a non-zero multiple of 16
  (:class:`IndirectDescriptorError`); in a split ring zero or more direct
  descriptors may precede it (section 2.7.5.3.2), in a packed ring it is
  the whole chain (section 2.8.19);
* a chain holds at most queue-size buffer descriptors and less than 2**32
  bytes in total (:class:`ChainTooLongError`);
* device-writable buffers come after device-readable ones
  (:class:`ChainLayoutError`);
* every buffer and indirect table lies inside guest memory, and the device
  may access it as it means to: read the readable buffers and indirect
  tables, write the writable buffers (:class:`BufferAddressError`).

Behind an IOMMU (``VIRTIO_F_ACCESS_PLATFORM``) a buffer's address may have
no translation yet: the address space raises
:class:`~pyvdpa.errors.IotlbMissError`, which is not a broken rule.  It
leaves the walk, and the queue's ``pop``, without consuming or writing
anything, so a later ``pop`` retries the same chain from scratch once the
translation arrived.

The layouts differ only in how the next descriptor is found: a split ring
follows ``next`` fields; a packed ring takes consecutive ring slots while
``NEXT`` is set, and a packed indirect table is used whole (``NEXT`` is
ignored there, section 2.8.7).

Guest memory is reached only through :class:`AddressSpace` views, which are
bounds-checked; descriptors are decoded with ``struct.unpack_from`` on those
views, so nothing outside them is ever read or written.  A device queue that
meets a broken rule marks itself broken and refuses further work
(:class:`QueueBrokenError`), as section 2.1.2 lets a device do by setting
``DEVICE_NEEDS_RESET``.

Memory ordering: CPython performs ``struct`` stores in program order and x86
keeps stores ordered, so writing payload, then ring elements, then the
published index is enough here; a compiled data path must add the acquire,
release and full fences of section 2.7.13 explicitly.
"""

from __future__ import annotations

import struct
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from enum import IntFlag
from typing import NamedTuple, Protocol

from pyvdpa.errors import GuestMemoryError, IotlbMissError, PyvdpaError, RingError

__all__ = [
    "DESCRIPTOR",
    "DESCRIPTOR_SIZE",
    "MAX_CHAIN_BYTES",
    "MAX_QUEUE_SIZE",
    "AddressSpace",
    "AvailIndexError",
    "BufferAddressError",
    "ChainLayoutError",
    "ChainTooLongError",
    "ChainWalk",
    "DescFlag",
    "DescriptorChain",
    "DescriptorIndexError",
    "DescriptorLoopError",
    "DeviceQueue",
    "DirtyLogger",
    "DriverQueue",
    "IndirectDescriptorError",
    "OutOfOrderError",
    "QueueBrokenError",
    "QueueFullError",
    "RingArea",
    "RingAreas",
    "Segment",
    "check_aligned",
    "check_index",
    "check_indirect",
    "check_written",
    "log_written",
    "map_buffer",
    "need_event",
    "store_u16",
    "used_completely",
    "walk_chain",
]

DESCRIPTOR = struct.Struct("<QIHH")
"""A descriptor: addr, len, then flags, next (split) or id, flags (packed)."""

DESCRIPTOR_SIZE = DESCRIPTOR.size

MAX_QUEUE_SIZE = 32768
"""Largest queue size either layout allows (sections 2.7 and 2.8)."""

MAX_CHAIN_BYTES = 1 << 32
"""A chain's total length must stay below this (section 2.7.5.2)."""


if sys.byteorder != "little":  # pragma: no cover - virtio rings are little-endian
    raise ImportError("pyvdpa rings need a little-endian host")


class DescFlag(IntFlag):
    """Descriptor ``flags`` (sections 2.7.5 and 2.8.2)."""

    NEXT = 1
    WRITE = 2
    INDIRECT = 4
    AVAIL = 1 << 7
    USED = 1 << 15


# Plain ints for the hot loop: IntFlag arithmetic builds enum objects.
_NEXT = int(DescFlag.NEXT)
_WRITE = int(DescFlag.WRITE)
_INDIRECT = int(DescFlag.INDIRECT)


class AddressSpace(Protocol):
    """Guest memory as the device reaches it (guest-physical addresses or IOVAs)."""

    def view(self, addr: int, length: int, *, write: bool = True) -> memoryview:
        """Return a writable byte view of ``length`` bytes at device address ``addr``.

        ``write`` tells whether the device will write the range or only read
        it, for address spaces that carry permissions (an IOMMU's).  Raises
        :class:`~pyvdpa.errors.GuestMemoryError` unless the whole range lies
        inside mapped guest memory and allows the access;
        :class:`~pyvdpa.errors.IotlbMissError` when a translation is missing.
        """
        ...


class DirtyLogger(Protocol):
    """Receiver of the guest memory a device writes, for live migration."""

    def log_write(self, addr: int, length: int) -> None:
        """Mark ``length`` bytes at guest-physical address ``addr`` dirty.

        Buffers are logged at their descriptor addresses and ring writes
        relative to the queue's ``log_addr``; behind an IOMMU both are IOVAs
        and the logger translates them
        (:class:`~pyvdpa.memory.IotlbDirtyLog`).
        """
        ...


class DescriptorLoopError(RingError):
    """Following ``next`` fields revisits a descriptor."""


class DescriptorIndexError(RingError):
    """A head, ``next`` index or buffer id is not below the table or queue size."""


class IndirectDescriptorError(RingError):
    """An indirect descriptor breaks a rule of section 2.7.5.3 or 2.8.19."""


class ChainTooLongError(RingError):
    """A chain has more descriptors than the queue size, or 2**32 bytes or more."""


class AvailIndexError(RingError):
    """The driver made more buffers available than the ring can hold."""


class BufferAddressError(RingError):
    """A buffer or indirect table lies outside guest memory."""


class ChainLayoutError(RingError):
    """A device-readable descriptor follows a device-writable one."""


class OutOfOrderError(RingError):
    """With ``VIRTIO_F_IN_ORDER``, a chain is not where ring order puts it (2.7.9, 2.8.8).

    A split chain must start at the descriptor after the previous chain's
    last and take consecutive descriptors; a packed chain must carry the
    buffer id of its head slot.
    """


class QueueBrokenError(RingError):
    """The queue was marked broken by an earlier error and refuses all work."""


class QueueFullError(PyvdpaError):
    """The driver side has too few free descriptors for the chain."""


@dataclass(frozen=True, slots=True)
class RingArea:
    """One of a ring's three areas: its device address, length and a view of its bytes."""

    addr: int
    length: int
    view: memoryview


@dataclass(frozen=True, slots=True)
class RingAreas:
    """A ring's descriptor area, driver area and device area, mapped for the device.

    Split rings: descriptor table, available ring, used ring.  Packed rings:
    descriptor ring, driver event area, device event area.  Built by the
    layouts' ``map`` methods, which check alignment; whoever mapped them
    releases them with :meth:`release` once no queue uses them.
    """

    desc: RingArea
    driver: RingArea
    device: RingArea

    @classmethod
    def map(cls, space: AddressSpace, areas: tuple[tuple[int, int, bool], ...]) -> RingAreas:
        """Map ``(addr, length, device_writes)`` for each area; all or none."""
        mapped: list[RingArea] = []
        try:
            for addr, length, write in areas:
                mapped.append(RingArea(addr, length, space.view(addr, length, write=write)))
        except BaseException:
            for area in mapped:
                area.view.release()
            raise
        return cls(*mapped)

    @property
    def addresses(self) -> tuple[int, int, int]:
        """The three device addresses."""
        return self.desc.addr, self.driver.addr, self.device.addr

    def overlaps(self, addr: int, length: int) -> bool:
        """Whether device range ``[addr, addr + length)`` touches one of the areas."""
        return any(
            a.addr < addr + length and addr < a.addr + a.length
            for a in (self.desc, self.driver, self.device)
        )

    def release(self) -> None:
        """Release the three views."""
        for area in (self.desc, self.driver, self.device):
            area.view.release()


@dataclass(frozen=True, slots=True)
class Segment:
    """One buffer of a chain: its device address, length and a view of its bytes."""

    addr: int
    length: int
    view: memoryview


@dataclass(frozen=True, slots=True)
class DescriptorChain:
    """A validated chain, as a device pops it.

    ``id`` is what the used ring reports back: the head descriptor index
    (split) or the buffer id (packed).  ``desc_count`` is the number of
    entries the chain occupies in the queue's own descriptor table or ring (an
    indirect table counts as one).
    """

    id: int
    readable: tuple[Segment, ...]
    writable: tuple[Segment, ...]
    desc_count: int

    def readable_len(self) -> int:
        """Return the total length of the device-readable buffers."""
        return sum(seg.length for seg in self.readable)

    def writable_len(self) -> int:
        """Return the total length of the device-writable buffers."""
        return sum(seg.length for seg in self.writable)

    def read_all(self) -> bytes:
        """Return the device-readable buffers concatenated."""
        return b"".join(seg.view for seg in self.readable)

    def write(self, data: bytes | bytearray | memoryview, offset: int = 0) -> int:
        """Scatter ``data`` into the writable buffers, starting ``offset`` bytes in.

        Returns the number of bytes written, which is less than ``len(data)``
        when the writable space ends first; nothing is written past its end.
        """
        if offset < 0:
            raise ValueError(f"negative offset {offset}")
        src = memoryview(data).cast("B")
        done = 0
        for seg in self.writable:
            if done == len(src):
                break
            if offset >= seg.length:
                offset -= seg.length
                continue
            count = min(seg.length - offset, len(src) - done)
            seg.view[offset : offset + count] = src[done : done + count]
            done += count
            offset = 0
        return done


class ChainWalk(NamedTuple):
    """What :func:`walk_chain` found."""

    readable: tuple[Segment, ...]
    writable: tuple[Segment, ...]
    desc_count: int
    """Entries used in the queue's own table or ring."""
    last: int
    """Index of the chain's last entry in the queue's own table or ring."""


def store_u16(view: memoryview, offset: int, value: int) -> None:
    """Publish the little-endian u16 at ``offset`` of ``view`` with one 2-byte store.

    Fields the other side polls (ring indices, flags, event suppression)
    must never be seen half-written: ``struct.pack_into`` zero-fills its
    target before packing, so a reader in another process could see 0 there.
    """
    view[offset : offset + 2].cast("H")[0] = value & 0xFFFF


def need_event(event_idx: int, new_idx: int, old_idx: int) -> bool:
    """Return whether moving an index from ``old_idx`` to ``new_idx`` passed ``event_idx``.

    This is ``vring_need_event`` of section 2.7.10: all arithmetic is modulo
    2**16, and the event counts as passed when it lies in ``[old, new)``.
    """
    return ((new_idx - event_idx - 1) & 0xFFFF) < ((new_idx - old_idx) & 0xFFFF)


def check_aligned(addr: int, align: int, what: str) -> None:
    """Raise ValueError unless ring area ``what`` at ``addr`` is ``align``-byte aligned."""
    if addr % align:
        raise ValueError(f"{what} address {addr:#x} is not {align}-byte aligned")


def check_index(index: int, size: int, what: str) -> None:
    """Raise :class:`DescriptorIndexError` unless ``0 <= index < size``."""
    if index >= size:
        raise DescriptorIndexError(f"{what} {index} is not below {size}")


def check_indirect(
    flags: int, length: int, *, negotiated: bool, nested: bool, chained: bool
) -> None:
    """Raise :class:`IndirectDescriptorError` if an indirect descriptor breaks a rule.

    ``nested``: it sits in an indirect table.  ``chained``: direct descriptors
    precede it in a layout that forbids this (packed).
    """
    if not negotiated:
        raise IndirectDescriptorError("indirect descriptor without VIRTIO_F_INDIRECT_DESC")
    if nested:
        raise IndirectDescriptorError("indirect descriptor inside an indirect table")
    if chained:
        raise IndirectDescriptorError("indirect descriptor after direct ones in a packed chain")
    if flags & _NEXT:
        raise IndirectDescriptorError("indirect descriptor with NEXT set")
    if length == 0 or length % DESCRIPTOR_SIZE:
        raise IndirectDescriptorError(
            f"indirect table length {length} is not a non-zero multiple of {DESCRIPTOR_SIZE}"
        )


def map_buffer(mem: AddressSpace, addr: int, length: int, *, write: bool) -> memoryview:
    """Return the view of a guest buffer, or raise :class:`BufferAddressError`.

    A missing IOTLB translation is not the driver's fault and propagates as
    :class:`~pyvdpa.errors.IotlbMissError`.
    """
    try:
        return mem.view(addr, length, write=write)
    except IotlbMissError:
        raise
    except GuestMemoryError as exc:
        raise BufferAddressError(str(exc)) from exc


class _Walk:
    """Segments and running totals of one chain walk."""

    __slots__ = ("count", "indirect", "mem", "queue_size", "readable", "total", "writable")

    def __init__(self, mem: AddressSpace, queue_size: int, indirect: bool) -> None:
        self.mem = mem
        self.queue_size = queue_size
        self.indirect = indirect
        self.readable: list[Segment] = []
        self.writable: list[Segment] = []
        self.count = 0
        self.total = 0

    def add_buffer(self, addr: int, length: int, flags: int) -> None:
        """Apply the chain length, total size, layout and address rules to one buffer."""
        self.count += 1
        if self.count > self.queue_size:
            raise ChainTooLongError(f"chain has more than {self.queue_size} descriptors")
        self.total += length
        if self.total >= MAX_CHAIN_BYTES:
            raise ChainTooLongError(f"chain holds {self.total} bytes, 2**32 or more")
        if flags & _WRITE:
            view = map_buffer(self.mem, addr, length, write=True)
            self.writable.append(Segment(addr, length, view))
        elif self.writable:
            raise ChainLayoutError("device-readable descriptor after a device-writable one")
        else:
            view = map_buffer(self.mem, addr, length, write=False)
            self.readable.append(Segment(addr, length, view))

    def table(
        self, table: memoryview, entries: int, index: int, *, packed: bool, nested: bool
    ) -> tuple[int, int]:
        """Walk one descriptor table from ``index``; return (entries used, last index)."""
        steps = 0
        while True:
            addr, length, third, fourth = DESCRIPTOR.unpack_from(table, index * DESCRIPTOR_SIZE)
            flags = fourth if packed else third
            steps += 1
            if flags & _INDIRECT:
                check_indirect(
                    flags,
                    length,
                    negotiated=self.indirect,
                    nested=nested,
                    chained=packed and steps > 1,
                )
                sub = map_buffer(self.mem, addr, length, write=False)
                self.table(sub, length // DESCRIPTOR_SIZE, 0, packed=packed, nested=True)
                return steps, index
            self.add_buffer(addr, length, flags)
            if packed and nested:
                # A packed indirect table is used whole; its NEXT flags mean nothing.
                if steps == entries:
                    return steps, index
                index += 1
            elif not flags & _NEXT:
                return steps, index
            elif packed:
                # Consecutive ring slots; a chain wrapping onto its own head is
                # caught by the chain length rule in add_buffer.
                index = index + 1 if index + 1 < entries else 0
            else:
                if steps == entries:
                    raise DescriptorLoopError(
                        f"chain revisits a descriptor of a {entries}-entry table"
                    )
                check_index(fourth, entries, "next descriptor")
                index = fourth


def walk_chain(
    mem: AddressSpace,
    table: memoryview,
    queue_size: int,
    first: int,
    *,
    packed: bool,
    indirect: bool,
) -> ChainWalk:
    """Walk and validate the chain starting at entry ``first`` of a queue's own table.

    ``table`` is the split descriptor table or the packed descriptor ring
    (``queue_size`` entries); ``first`` must already be below ``queue_size``.
    ``indirect`` says whether ``VIRTIO_F_INDIRECT_DESC`` was negotiated.
    Raises a :class:`~pyvdpa.errors.RingError` subclass naming the first rule
    broken, or :class:`~pyvdpa.errors.IotlbMissError` when an address has no
    IOTLB translation yet; only reads guest memory.
    """
    walk = _Walk(mem, queue_size, indirect)
    desc_count, last = walk.table(table, queue_size, first, packed=packed, nested=False)
    return ChainWalk(tuple(walk.readable), tuple(walk.writable), desc_count, last)


def check_written(chain: DescriptorChain, written: int) -> None:
    """Raise ValueError unless ``written`` fits in the chain's writable buffers."""
    if not 0 <= written <= chain.writable_len():
        raise ValueError(
            f"written length {written} outside 0..{chain.writable_len()} for chain {chain.id}"
        )


def used_completely(chain: DescriptorChain, written: int) -> bool:
    """Whether the device wrote every writable byte of ``chain`` (none for a read-only chain).

    With ``VIRTIO_F_IN_ORDER`` such a chain needs no used entry of its own:
    the entry of a later chain in the same batch covers it, and the driver
    takes it as used completely (sections 2.7.9 and 2.8.8).
    """
    return written == chain.writable_len()


def log_written(log: DirtyLogger, chain: DescriptorChain, written: int) -> None:
    """Log the first ``written`` bytes of the chain's writable buffers."""
    for seg in chain.writable:
        if written <= 0:
            break
        count = min(seg.length, written)
        log.log_write(seg.addr, count)
        written -= count


class DeviceQueue(Protocol):
    """The device side of a virtqueue, whatever its layout."""

    @property
    def size(self) -> int:
        """Number of descriptors in the queue."""
        ...

    @property
    def broken(self) -> bool:
        """Whether a ring error stopped the queue."""
        ...

    @property
    def inflight(self) -> int:
        """Chains popped and not yet pushed."""
        ...

    @property
    def base(self) -> int:
        """The ring state GET_VRING_BASE reports."""
        ...

    def pop(self) -> DescriptorChain | None:
        """Return the next available chain, validated, or None when there is none.

        Raises :class:`~pyvdpa.errors.IotlbMissError`, consuming nothing,
        when the chain needs a translation the IOTLB does not have yet.
        """
        ...

    def push(self, chain: DescriptorChain, written: int) -> None:
        """Return a chain to the driver with ``written`` bytes written to it."""
        ...

    def should_notify(self) -> bool:
        """Return whether the driver wants a used-buffer notification now."""
        ...

    def disable_notification(self) -> None:
        """Ask the driver not to send available-buffer notifications."""
        ...

    def enable_notification(self) -> bool:
        """Ask for available-buffer notifications; return True if buffers already wait."""
        ...


class DriverQueue(Protocol):
    """The driver side of a virtqueue, whatever its layout."""

    @property
    def size(self) -> int:
        """Number of descriptors in the queue."""
        ...

    @property
    def num_free(self) -> int:
        """Descriptors (split) or ring slots (packed) free for new chains."""
        ...

    def add(
        self,
        readable: Sequence[tuple[int, int]],
        writable: Sequence[tuple[int, int]],
        *,
        indirect: bool = False,
    ) -> int:
        """Make a chain of (addr, len) buffers available; return its id."""
        ...

    def kick_needed(self) -> bool:
        """Return whether the device wants an available-buffer notification now."""
        ...

    def get_used(self) -> tuple[int, int] | None:
        """Return (id, written length) of the next used chain, or None."""
        ...

    def disable_interrupts(self) -> None:
        """Ask the device not to send used-buffer notifications."""
        ...

    def enable_interrupts(self) -> bool:
        """Ask for used-buffer notifications; return True if used chains already wait."""
        ...
