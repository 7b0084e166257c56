"""Split virtqueues (virtio 1.2, section 2.7), device side and driver side.

Theory of operation
-------------------
A split queue of N entries (a power of two up to 32768) is three areas in
guest memory (section 2.7): the descriptor table (16·N bytes, align 16), the
available ring the driver writes (``flags``, ``idx``, N heads, ``used_event``;
align 2) and the used ring the device writes (``flags``, ``idx``, N
``(id, len)`` elements, ``avail_event``; align 4).  Both rings count with
free-running 16-bit indices; a slot is the index modulo N.

The device (:class:`SplitDeviceQueue`) reads ``avail.idx``, refuses it if it
moved more than N past the next index it will consume, takes the head from
the ring and validates the whole chain with
:func:`~pyvdpa.virtio.ring.walk_chain` before handing it out.  It returns a
chain by writing a used element and then publishing ``used.idx``.

Notification suppression (section 2.7.10) works in both directions: without
``VIRTIO_F_EVENT_IDX`` through ``avail.flags`` (NO_INTERRUPT) and
``used.flags`` (NO_NOTIFY); with it through ``used_event`` and
``avail_event`` and :func:`~pyvdpa.virtio.ring.need_event`.  To switch its
notifications off under EVENT_IDX, a side writes an event index one behind
the position it has reached, which the other side cannot pass before the
16-bit index wraps.

With ``VIRTIO_F_IN_ORDER`` (section 2.7.9) the driver uses descriptors in
ring order: each chain starts at the descriptor after the previous chain's
last and takes consecutive ones, wrapping at the end of the table.  The
device checks where each chain starts and ends (the first chain after a
start is taken as the reference) and refuses one out of order
(:class:`~pyvdpa.virtio.ring.OutOfOrderError`).  Completing a batch
(:meth:`SplitDeviceQueue.push_batch`), it writes one used element for a run
of chains: a chain it used completely
(:func:`~pyvdpa.virtio.ring.used_completely`) leaves its element to the
next chain of the batch, and the element of the run's last chain, written
in the run's first slot, names that chain; ``used.idx`` still advances by
one per chain.  The driver infers the chains skipped over.

The driver (:class:`SplitDriverQueue`) is what a VMM or a virtio driver does:
it owns the free list, writes descriptors, then the available ring slot, then
``avail.idx``.  It keeps its own record of which descriptors each chain holds
and never trusts the used ring to tell it.
"""

from __future__ import annotations

import struct
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from enum import IntFlag
from typing import ClassVar

from pyvdpa.errors import RingError
from pyvdpa.virtio.ring import (
    DESCRIPTOR,
    DESCRIPTOR_SIZE,
    MAX_QUEUE_SIZE,
    AddressSpace,
    AvailIndexError,
    DescFlag,
    DescriptorChain,
    DescriptorIndexError,
    DirtyLogger,
    OutOfOrderError,
    QueueBrokenError,
    QueueFullError,
    RingAreas,
    check_aligned,
    check_index,
    check_written,
    log_written,
    need_event,
    store_u16,
    used_completely,
    walk_chain,
)

__all__ = [
    "AvailFlag",
    "SplitDeviceQueue",
    "SplitDriverQueue",
    "SplitLayout",
    "UsedFlag",
    "check_queue_size",
]

_U16 = struct.Struct("<H")
_USED_ELEM = struct.Struct("<II")


class AvailFlag(IntFlag):
    """``avail.flags`` (section 2.7.6)."""

    NO_INTERRUPT = 1


class UsedFlag(IntFlag):
    """``used.flags`` (section 2.7.8)."""

    NO_NOTIFY = 1


_NO_INTERRUPT = int(AvailFlag.NO_INTERRUPT)
_NO_NOTIFY = int(UsedFlag.NO_NOTIFY)
_NEXT = int(DescFlag.NEXT)
_WRITE = int(DescFlag.WRITE)
_INDIRECT = int(DescFlag.INDIRECT)


def check_split_base(base: int) -> None:
    """Raise ValueError unless ``base`` (the next available index) is a 16-bit index."""
    if not 0 <= base <= 0xFFFF:
        raise ValueError(f"split ring base {base} is not a 16-bit index")


def check_queue_size(size: int) -> None:
    """Raise ValueError unless ``size`` is a power of two from 1 to 32768."""
    if not 1 <= size <= MAX_QUEUE_SIZE or size & (size - 1):
        raise ValueError(f"split queue size {size} is not a power of two in 1..{MAX_QUEUE_SIZE}")


@dataclass(frozen=True, slots=True)
class SplitLayout:
    """Sizes, alignments and field offsets of a split queue of ``size`` entries."""

    size: int

    DESC_ALIGN: ClassVar[int] = 16
    AVAIL_ALIGN: ClassVar[int] = 2
    USED_ALIGN: ClassVar[int] = 4

    def __post_init__(self) -> None:
        check_queue_size(self.size)

    @property
    def desc_size(self) -> int:
        """Bytes of the descriptor table."""
        return DESCRIPTOR_SIZE * self.size

    @property
    def avail_size(self) -> int:
        """Bytes of the available ring, ``used_event`` included."""
        return 6 + 2 * self.size

    @property
    def used_size(self) -> int:
        """Bytes of the used ring, ``avail_event`` included."""
        return 6 + 8 * self.size

    @property
    def used_event_offset(self) -> int:
        """Offset of ``used_event`` in the available ring."""
        return 4 + 2 * self.size

    @property
    def avail_event_offset(self) -> int:
        """Offset of ``avail_event`` in the used ring."""
        return 4 + 8 * self.size

    def avail_slot_offset(self, idx: int) -> int:
        """Offset in the available ring of the slot for free-running index ``idx``."""
        return 4 + 2 * (idx & (self.size - 1))

    def used_slot_offset(self, idx: int) -> int:
        """Offset in the used ring of the element for free-running index ``idx``."""
        return 4 + 8 * (idx & (self.size - 1))

    def check_addresses(self, desc_addr: int, avail_addr: int, used_addr: int) -> None:
        """Raise ValueError unless the three areas are aligned as section 2.7 requires."""
        check_aligned(desc_addr, self.DESC_ALIGN, "descriptor table")
        check_aligned(avail_addr, self.AVAIL_ALIGN, "available ring")
        check_aligned(used_addr, self.USED_ALIGN, "used ring")

    def map(
        self, space: AddressSpace, desc_addr: int, avail_addr: int, used_addr: int
    ) -> RingAreas:
        """Check the three areas' alignment and map them from ``space`` for the device.

        The device reads the descriptor table and the available ring and
        writes the used ring.  Raises ValueError for a misaligned area, and
        what :meth:`AddressSpace.view` raises for one outside memory.
        """
        self.check_addresses(desc_addr, avail_addr, used_addr)
        return RingAreas.map(
            space,
            ((desc_addr, self.desc_size, False), (avail_addr, self.avail_size, False),
             (used_addr, self.used_size, True)),
        )  # fmt: skip


class SplitDeviceQueue:
    """The device side of a split queue.

    ``base`` is the next available index to consume (SET_VRING_BASE); the
    used index is read back from the used ring, which the driver owns.  When
    ``log`` is given, every byte the device writes is logged: buffer bytes at
    their descriptor addresses and used ring fields at ``log_addr`` (the
    guest-physical address of the used ring) plus their offset.  ``in_order``
    says VIRTIO_F_IN_ORDER was negotiated (see the module's theory of operation).
    """

    def __init__(
        self,
        mem: AddressSpace,
        size: int,
        desc_addr: int,
        avail_addr: int,
        used_addr: int,
        *,
        event_idx: bool,
        indirect: bool,
        base: int = 0,
        log: DirtyLogger | None = None,
        log_addr: int | None = None,
        in_order: bool = False,
    ) -> None:
        layout = SplitLayout(size)
        check_split_base(base)
        areas = layout.map(mem, desc_addr, avail_addr, used_addr)
        self._setup(mem, layout, areas, event_idx, indirect, base, log, log_addr, in_order)

    @classmethod
    def on_areas(
        cls,
        mem: AddressSpace,
        areas: RingAreas,
        size: int,
        *,
        event_idx: bool,
        indirect: bool,
        base: int = 0,
        log: DirtyLogger | None = None,
        log_addr: int | None = None,
        in_order: bool = False,
    ) -> SplitDeviceQueue:
        """A queue over ring areas already mapped and checked (by :meth:`SplitLayout.map`).

        The caller keeps the areas and releases them after the queue is done.
        """
        check_split_base(base)
        queue = cls.__new__(cls)
        queue._setup(
            mem, SplitLayout(size), areas, event_idx, indirect, base, log, log_addr, in_order
        )
        return queue

    def _setup(
        self,
        mem: AddressSpace,
        layout: SplitLayout,
        areas: RingAreas,
        event_idx: bool,
        indirect: bool,
        base: int,
        log: DirtyLogger | None,
        log_addr: int | None,
        in_order: bool,
    ) -> None:
        if log is not None and log_addr is None:
            raise ValueError("dirty logging needs the used ring's log_addr")
        self._layout = layout
        self._mem = mem
        self._size = layout.size
        self._desc = areas.desc.view
        self._avail = areas.driver.view
        self._used = areas.device.view
        self._event_idx = event_idx
        self._indirect = indirect
        self._log = log
        self._log_addr = 0 if log_addr is None else log_addr
        self._last_avail = base
        self._used_idx: int = _U16.unpack_from(self._used, 2)[0]
        self._unsignalled = 0
        self._notify = True
        self._inflight = 0
        self._broken = False
        self._in_order = in_order
        # In order: the descriptor the next chain must start at (None until the first chain).
        self._next_head: int | None = None

    @property
    def size(self) -> int:
        """Number of descriptors in the queue."""
        return self._size

    @property
    def broken(self) -> bool:
        """Whether a ring error stopped the queue."""
        return self._broken

    @property
    def inflight(self) -> int:
        """Chains popped and not yet pushed."""
        return self._inflight

    @property
    def in_order(self) -> bool:
        """Whether ``VIRTIO_F_IN_ORDER`` was negotiated for the queue."""
        return self._in_order

    @property
    def base(self) -> int:
        """The next available index to consume, as GET_VRING_BASE reports it.

        Chains still in flight count as consumed: finish or record them first.
        """
        return self._last_avail

    def _check_usable(self) -> None:
        if self._broken:
            raise QueueBrokenError("split queue is broken")

    def pop(self) -> DescriptorChain | None:
        """Return the next available chain, validated, or None when there is none.

        A :class:`~pyvdpa.errors.RingError` marks the queue broken and is
        re-raised; nothing is consumed or written in that case.  An
        :class:`~pyvdpa.errors.IotlbMissError` leaves the queue as it was:
        the next call walks the same chain again.
        """
        self._check_usable()
        try:
            return self._pop()
        except RingError:
            self._broken = True
            raise

    def _pop(self) -> DescriptorChain | None:
        avail_idx = _U16.unpack_from(self._avail, 2)[0]
        pending = (avail_idx - self._last_avail) & 0xFFFF
        if pending == 0:
            return None
        if pending > self._size:
            raise AvailIndexError(
                f"avail idx {avail_idx} is {pending} past {self._last_avail}, "
                f"more than the {self._size} entries of the ring"
            )
        head = _U16.unpack_from(self._avail, self._layout.avail_slot_offset(self._last_avail))[0]
        check_index(head, self._size, "head descriptor")
        walk = walk_chain(
            self._mem, self._desc, self._size, head, packed=False, indirect=self._indirect
        )
        if self._in_order:
            self._check_order(head, walk.last, walk.desc_count)
        self._last_avail = (self._last_avail + 1) & 0xFFFF
        self._inflight += 1
        if self._notify and self._event_idx:
            # Keep asking for a kick at the next buffer the driver adds.
            self._write_avail_event(self._last_avail)
        return DescriptorChain(head, walk.readable, walk.writable, walk.desc_count)

    def _check_order(self, head: int, last: int, desc_count: int) -> None:
        """Refuse a chain that is not where ring order puts it (section 2.7.9)."""
        mask = self._size - 1
        expected = self._next_head
        if expected is not None and head != expected:
            raise OutOfOrderError(
                f"in-order ring: chain starts at descriptor {head}, ring order expects {expected}"
            )
        if last != (head + desc_count - 1) & mask:
            raise OutOfOrderError(
                f"in-order ring: chain of {desc_count} descriptors from {head} ends at {last}, "
                "not on consecutive descriptors"
            )
        self._next_head = (last + 1) & mask

    @property
    def used_idx(self) -> int:
        """The used ring ``idx`` this queue publishes next."""
        return self._used_idx

    def resubmit(self, head: int) -> DescriptorChain:
        """Take again the chain at ``head``, consumed but never completed before a restart.

        Inflight recovery (vhost-user spec, "Inflight I/O tracking"): the
        avail index already counts it; the chain is walked and validated as
        :meth:`pop` would.
        """
        self._check_usable()
        try:
            check_index(head, self._size, "resubmitted head")
            walk = walk_chain(
                self._mem, self._desc, self._size, head, packed=False, indirect=self._indirect
            )
        except RingError:
            self._broken = True
            raise
        self._inflight += 1
        return DescriptorChain(head, walk.readable, walk.writable, walk.desc_count)

    def push(self, chain: DescriptorChain, written: int) -> None:
        """Return a chain to the driver with ``written`` bytes written to its writable buffers."""
        self.push_batch(((chain, written),))

    def push_batch(self, completions: Sequence[tuple[DescriptorChain, int]]) -> None:
        """Return chains, each with the bytes written to it, and publish ``used.idx`` once.

        The chains must be in flight and, with ``VIRTIO_F_IN_ORDER``, in the
        order they were popped; then a chain used completely gets no used
        element of its own (see the module's theory of operation).
        """
        self._check_usable()
        if len(completions) > self._inflight:
            raise ValueError(f"push of {len(completions)} chains, {self._inflight} in flight")
        for chain, written in completions:
            check_written(chain, written)
        batch_slot: int | None = None
        for chain, written in completions:
            slot = self._used_idx if batch_slot is None else batch_slot
            elem = self._layout.used_slot_offset(slot)
            _USED_ELEM.pack_into(self._used, elem, chain.id, written)
            batch_slot = slot if self._in_order and used_completely(chain, written) else None
            self._used_idx = (self._used_idx + 1) & 0xFFFF
            if self._log is not None:
                log_written(self._log, chain, written)
                self._log.log_write(self._log_addr + elem, _USED_ELEM.size)
        store_u16(self._used, 2, self._used_idx)
        self._inflight -= len(completions)
        self._unsignalled += len(completions)
        if self._log is not None:
            self._log.log_write(self._log_addr + 2, _U16.size)

    def should_notify(self) -> bool:
        """Return whether the driver wants a used-buffer notification now.

        The question covers the pushes since the previous call, which count as
        signalled whatever the answer.
        """
        self._check_usable()
        if self._unsignalled == 0:
            return False
        pushed = min(self._unsignalled, 0xFFFF)
        self._unsignalled = 0
        if self._event_idx:
            used_event = _U16.unpack_from(self._avail, self._layout.used_event_offset)[0]
            return need_event(used_event, self._used_idx, self._used_idx - pushed)
        return not _U16.unpack_from(self._avail, 0)[0] & _NO_INTERRUPT

    def disable_notification(self) -> None:
        """Ask the driver not to kick (``used.flags`` NO_NOTIFY, or ``avail_event`` held back)."""
        self._check_usable()
        self._notify = False
        if self._event_idx:
            self._write_avail_event(self._last_avail - 1)
        else:
            self._write_used_flags(_NO_NOTIFY)

    def enable_notification(self) -> bool:
        """Ask the driver to kick for new buffers; return True if some arrived already.

        A True answer means the caller must pop again rather than wait for a
        kick that the driver may have decided it need not send.
        """
        self._check_usable()
        self._notify = True
        if self._event_idx:
            self._write_avail_event(self._last_avail)
        else:
            self._write_used_flags(0)
        return bool(_U16.unpack_from(self._avail, 2)[0] != self._last_avail)

    def _write_avail_event(self, idx: int) -> None:
        offset = self._layout.avail_event_offset
        store_u16(self._used, offset, idx & 0xFFFF)
        if self._log is not None:
            self._log.log_write(self._log_addr + offset, _U16.size)

    def _write_used_flags(self, flags: int) -> None:
        store_u16(self._used, 0, flags)
        if self._log is not None:
            self._log.log_write(self._log_addr, _U16.size)


class SplitDriverQueue:
    """The driver side of a split queue (a VMM's or a virtio driver's view).

    The constructor zeroes the three ring areas.  ``indirect_addr``, when
    given, is an area of ``size * size * 16`` bytes: the indirect table of the
    chain whose head is ``h`` lives at ``indirect_addr + h * size * 16`` and
    holds up to ``size`` descriptors.  With ``in_order`` (``VIRTIO_F_IN_ORDER``
    negotiated) chains take descriptors in ring order and a used element may
    stand for a batch of chains: those before the one it names were used
    completely.
    """

    def __init__(
        self,
        mem: AddressSpace,
        size: int,
        desc_addr: int,
        avail_addr: int,
        used_addr: int,
        *,
        event_idx: bool,
        indirect_addr: int | None = None,
        in_order: bool = False,
    ) -> None:
        layout = SplitLayout(size)
        layout.check_addresses(desc_addr, avail_addr, used_addr)
        self._layout = layout
        self._size = size
        self._desc = mem.view(desc_addr, layout.desc_size)
        self._avail = mem.view(avail_addr, layout.avail_size)
        self._used = mem.view(used_addr, layout.used_size)
        for area in (self._desc, self._avail, self._used):
            area[:] = bytes(len(area))
        self._indirect = (
            None
            if indirect_addr is None
            else (indirect_addr, mem.view(indirect_addr, size * layout.desc_size))
        )
        self._event_idx = event_idx
        self._in_order = in_order
        # Out of order, the free list is a stack (popped from the end, descriptor 0 first);
        # in order, a queue in ring order.
        self._free = deque(range(size) if in_order else range(size - 1, -1, -1))
        self._chains: list[list[int] | None] = [None] * size
        # In order: heads in flight in ring order, each chain's writable bytes, and the
        # used element of the batch being taken apart.
        self._order: deque[int] = deque()
        self._writable = [0] * size
        self._batch: tuple[int, int] | None = None
        self._avail_idx = 0
        self._last_used = 0
        self._unkicked = 0
        self._interrupts = True

    @property
    def size(self) -> int:
        """Number of descriptors in the queue."""
        return self._size

    @property
    def num_free(self) -> int:
        """Descriptors free for new chains."""
        return len(self._free)

    def add(
        self,
        readable: Sequence[tuple[int, int]],
        writable: Sequence[tuple[int, int]],
        *,
        indirect: bool = False,
    ) -> int:
        """Make a chain of (addr, len) buffers available; return its head index.

        Raises :class:`~pyvdpa.virtio.ring.QueueFullError` when too few
        descriptors are free (one for an indirect chain).
        """
        buffers = [(addr, length, 0) for addr, length in readable]
        buffers += [(addr, length, _WRITE) for addr, length in writable]
        if not buffers:
            raise ValueError("a chain needs at least one buffer")
        area = self._indirect if indirect else None
        if indirect and area is None:
            raise ValueError("indirect chains need an indirect_addr area")
        if indirect and len(buffers) > self._size:
            raise ValueError(f"an indirect table holds at most {self._size} descriptors")
        needed = 1 if indirect else len(buffers)
        if needed > len(self._free):
            raise QueueFullError(f"{needed} descriptors needed, {len(self._free)} free")
        take = self._free.popleft if self._in_order else self._free.pop
        descs = [take() for _ in range(needed)]
        head = descs[0]
        if area is not None:
            area_addr, area_view = area
            table = head * self._layout.desc_size
            self._write_linked(area_view, table, range(len(buffers)), buffers)
            DESCRIPTOR.pack_into(
                self._desc,
                head * DESCRIPTOR_SIZE,
                area_addr + table,
                len(buffers) * DESCRIPTOR_SIZE,
                _INDIRECT,
                0,
            )
        else:
            self._write_linked(self._desc, 0, descs, buffers)
        self._chains[head] = descs
        self._writable[head] = sum(length for _, length in writable)
        if self._in_order:
            self._order.append(head)
        store_u16(self._avail, self._layout.avail_slot_offset(self._avail_idx), head)
        self._avail_idx = (self._avail_idx + 1) & 0xFFFF
        store_u16(self._avail, 2, self._avail_idx)
        self._unkicked += 1
        return head

    @staticmethod
    def _write_linked(
        table: memoryview,
        base: int,
        indices: Sequence[int],
        buffers: Sequence[tuple[int, int, int]],
    ) -> None:
        last = len(buffers) - 1
        for i, (addr, length, flags) in enumerate(buffers):
            link = indices[i + 1] if i < last else 0
            flags |= _NEXT if i < last else 0
            DESCRIPTOR.pack_into(
                table, base + indices[i] * DESCRIPTOR_SIZE, addr, length, flags, link
            )

    def kick_needed(self) -> bool:
        """Return whether the device wants a kick for the chains added since the last call."""
        if self._unkicked == 0:
            return False
        added = min(self._unkicked, 0xFFFF)
        self._unkicked = 0
        if self._event_idx:
            avail_event = _U16.unpack_from(self._used, self._layout.avail_event_offset)[0]
            return need_event(avail_event, self._avail_idx, self._avail_idx - added)
        return not _U16.unpack_from(self._used, 0)[0] & _NO_NOTIFY

    def get_used(self) -> tuple[int, int] | None:
        """Return (head, written length) of the next used chain and free its descriptors.

        Raises :class:`~pyvdpa.virtio.ring.DescriptorIndexError` when the
        device names a chain that is not in flight.
        """
        if _U16.unpack_from(self._used, 2)[0] == self._last_used:
            return None
        if self._batch is None:
            self._batch = _USED_ELEM.unpack_from(
                self._used, self._layout.used_slot_offset(self._last_used)
            )
        named, length = self._batch
        if named >= self._size or self._chains[named] is None:
            self._batch = None
            raise DescriptorIndexError(f"used element names chain {named}, which is not in flight")
        head = self._order[0] if self._in_order else named
        descs = self._chains[head]
        assert descs is not None
        if head == named:
            self._batch = None
        else:
            # Skipped over by the batch's element: used completely (section 2.7.9).
            length = self._writable[head]
        if self._in_order:
            self._order.popleft()
        self._chains[head] = None
        self._free.extend(descs)
        self._last_used = (self._last_used + 1) & 0xFFFF
        if self._event_idx and self._interrupts:
            self._write_used_event(self._last_used)
        return head, length

    def disable_interrupts(self) -> None:
        """Ask the device not to interrupt (NO_INTERRUPT, or ``used_event`` held back)."""
        self._interrupts = False
        if self._event_idx:
            self._write_used_event(self._last_used - 1)
        else:
            store_u16(self._avail, 0, _NO_INTERRUPT)

    def enable_interrupts(self) -> bool:
        """Ask for an interrupt at the next used chain; return True if one is already there."""
        self._interrupts = True
        if self._event_idx:
            self._write_used_event(self._last_used)
        else:
            store_u16(self._avail, 0, 0)
        return bool(_U16.unpack_from(self._used, 2)[0] != self._last_used)

    def _write_used_event(self, idx: int) -> None:
        store_u16(self._avail, self._layout.used_event_offset, idx & 0xFFFF)
