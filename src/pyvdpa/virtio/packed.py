"""Packed virtqueues (virtio 1.2, section 2.8), device side and driver side.

Theory of operation
-------------------
A packed queue of N entries (any N from 1 to 32768) is one descriptor ring
that both sides write, plus two 4-byte event suppression areas: the driver
event area (written by the driver; it governs used-buffer notifications) and
the device event area (written by the device; it governs available-buffer
notifications).  Each area is ``<HH``: ``off:15 | wrap:1``, then ``flags``
(ENABLE 0, DISABLE 1, DESC 2).

Ownership of a descriptor is told by its AVAIL and USED flag bits compared
with wrap counters that start at 1 and flip each time a side's position
passes the end of the ring (section 2.8.1).  The driver makes a chain
available by writing its descriptors in consecutive slots with AVAIL equal
to its wrap counter and USED the opposite, the head's flags last.  The
device reads the head's flags, validates the chain with
:func:`~pyvdpa.virtio.ring.walk_chain` (the buffer id is the one in the
chain's last descriptor) and later writes one used descriptor per chain,
with AVAIL and USED both equal to its own used wrap counter, at its used
position, which then skips as many slots as the chain occupied.  WRITE is set
in a used descriptor exactly when its length counts written bytes
(sections 2.8.3 and 2.8.4).

The device never holds more slots in flight than the ring has: a driver that
makes a slot available again before the device returned it breaks the
queue.  With ``VIRTIO_F_EVENT_IDX`` an event area in DESC mode names a ring
position and wrap counter; notification is due when the producer's position
passed it, as :func:`~pyvdpa.virtio.ring.need_event` decides once an event
of the other wrap counter is counted one lap behind (section 2.8.10).

With ``VIRTIO_F_IN_ORDER`` (section 2.8.8) a driver names each chain by
the ring slot of its head (as the drivers of DPDK and Linux do, and as the
batching below needs to tell chains apart); the device refuses another id
(:class:`~pyvdpa.virtio.ring.OutOfOrderError`).  Completing a batch
(:meth:`PackedDeviceQueue.push_batch`), it writes one used descriptor for a
run of chains: chains it used completely
(:func:`~pyvdpa.virtio.ring.used_completely`) leave it to the next chain of
the batch, and the descriptor, written at the run's first slot with the
wrap counter there, carries the buffer id and length of the run's last
chain; the used position skips every slot of the run.

GET_VRING_BASE reports bits 0-14 the next available slot, bit 15 its wrap
counter, bits 16-30 the used position and bit 31 its wrap counter;
SET_VRING_BASE carries the low 16 bits only, and the used state restarts
equal to the available state.
"""

from __future__ import annotations

import struct
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from enum import IntEnum
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
    DescriptorLoopError,
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
    "EventFlags",
    "PackedDeviceQueue",
    "PackedDriverQueue",
    "PackedLayout",
    "check_packed_queue_size",
]

_U16 = struct.Struct("<H")
_EVENT = struct.Struct("<HH")
_LEN_ID = struct.Struct("<IH")
_ADDR_LEN_ID = struct.Struct("<QIH")
_ID_OFFSET = 12
_FLAGS_OFFSET = 14
_EVENT_FLAGS_OFFSET = 2
_WRAP_SHIFT = 15
_OFF_MASK = (1 << _WRAP_SHIFT) - 1
_EVENT_FLAGS_MASK = 3


class EventFlags(IntEnum):
    """``flags`` of an event suppression area (section 2.8.10); a 2-bit value, not a mask."""

    ENABLE = 0
    DISABLE = 1
    DESC = 2


_AVAIL = int(DescFlag.AVAIL)
_USED = int(DescFlag.USED)
_AVAIL_USED = _AVAIL | _USED
_NEXT = int(DescFlag.NEXT)
_WRITE = int(DescFlag.WRITE)
_INDIRECT = int(DescFlag.INDIRECT)
_ENABLE = int(EventFlags.ENABLE)
_DISABLE = int(EventFlags.DISABLE)
_DESC = int(EventFlags.DESC)


def check_packed_base(base: int, size: int) -> None:
    """Raise ValueError unless ``base`` is a 32-bit ring state naming a slot below ``size``.

    Bits 0-14 are the next available slot, bit 15 its wrap counter; GET_VRING_BASE
    adds the used slot and wrap counter in bits 16-31.
    """
    if not 0 <= base <= 0xFFFFFFFF:
        raise ValueError(f"packed ring base {base:#x} is not a 32-bit value")
    if base & _OFF_MASK >= size:
        raise ValueError(f"packed ring base {base:#x} names a slot beyond {size}")


def check_packed_queue_size(size: int) -> None:
    """Raise ValueError unless ``size`` is from 1 to 32768."""
    if not 1 <= size <= MAX_QUEUE_SIZE:
        raise ValueError(f"packed queue size {size} is not in 1..{MAX_QUEUE_SIZE}")


@dataclass(frozen=True, slots=True)
class PackedLayout:
    """Sizes and alignments of a packed queue of ``size`` entries."""

    size: int

    DESC_ALIGN: ClassVar[int] = 16
    EVENT_ALIGN: ClassVar[int] = 4
    EVENT_SIZE: ClassVar[int] = _EVENT.size

    def __post_init__(self) -> None:
        check_packed_queue_size(self.size)

    @property
    def desc_size(self) -> int:
        """Bytes of the descriptor ring."""
        return DESCRIPTOR_SIZE * self.size

    def check_addresses(
        self, desc_addr: int, driver_event_addr: int, device_event_addr: int
    ) -> None:
        """Raise ValueError unless the three areas are aligned as section 2.8 requires."""
        check_aligned(desc_addr, self.DESC_ALIGN, "descriptor ring")
        check_aligned(driver_event_addr, self.EVENT_ALIGN, "driver event area")
        check_aligned(device_event_addr, self.EVENT_ALIGN, "device event area")

    def map(
        self, space: AddressSpace, desc_addr: int, driver_event_addr: int, device_event_addr: int
    ) -> RingAreas:
        """Check the three areas' alignment and map them from ``space`` for the device.

        The device writes used descriptors into the ring and its own event
        area, and only reads the driver's.  Raises ValueError for a
        misaligned area, and what :meth:`AddressSpace.view` raises for one
        outside memory.
        """
        self.check_addresses(desc_addr, driver_event_addr, device_event_addr)
        return RingAreas.map(
            space,
            ((desc_addr, self.desc_size, True), (driver_event_addr, self.EVENT_SIZE, False),
             (device_event_addr, self.EVENT_SIZE, True)),
        )  # fmt: skip


def _is_avail(flags: int, wrap: int) -> bool:
    """Whether a descriptor is available to a device whose avail wrap counter is ``wrap``."""
    return flags & _AVAIL_USED == (_AVAIL if wrap else _USED)


def _is_used(flags: int, wrap: int) -> bool:
    """Whether a descriptor is used, for a driver whose used wrap counter is ``wrap``."""
    return flags & _AVAIL_USED == (_AVAIL_USED if wrap else 0)


def _packed_need_event(off_wrap: int, new: int, wrap: int, advanced: int, size: int) -> bool:
    """Whether a producer at ring position ``new`` (wrap counter ``wrap``) passed the event.

    ``advanced`` is how many slots the producer moved since it last asked; an
    event whose wrap bit differs from ``wrap`` lies one lap behind.
    """
    event = off_wrap & _OFF_MASK
    if off_wrap >> _WRAP_SHIFT != wrap:
        event -= size
    return need_event(event, new, new - min(advanced, 0xFFFF))


def _advance(idx: int, wrap: int, count: int, size: int) -> tuple[int, int]:
    """Move a ring position ``count`` slots on, flipping the wrap counter at the end."""
    idx += count
    if idx >= size:
        return idx - size, wrap ^ 1
    return idx, wrap


def _event_off_wrap(idx: int, wrap: int) -> int:
    return idx | wrap << _WRAP_SHIFT


class PackedDeviceQueue:
    """The device side of a packed queue.

    ``base`` is the SET_VRING_BASE value: bits 0-14 the next available slot,
    bit 15 its wrap counter (higher bits are ignored).  When ``log`` is given,
    written buffer bytes are logged at their descriptor addresses and each
    used descriptor at ``log_addr`` (the guest-physical address of the
    descriptor ring) plus its offset.  Device event area writes are not
    logged: they carry no state the driver keeps, and a device resumed
    elsewhere writes the area anew when it sets its notification state.
    ``in_order`` says VIRTIO_F_IN_ORDER was negotiated (see the module's theory
    of operation).
    """

    def __init__(
        self,
        mem: AddressSpace,
        size: int,
        desc_addr: int,
        driver_event_addr: int,
        device_event_addr: int,
        *,
        event_idx: bool,
        indirect: bool,
        base: int = 1 << _WRAP_SHIFT,
        log: DirtyLogger | None = None,
        log_addr: int | None = None,
        in_order: bool = False,
    ) -> None:
        layout = PackedLayout(size)
        check_packed_base(base, size)
        areas = layout.map(mem, desc_addr, driver_event_addr, device_event_addr)
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
        base: int = 1 << _WRAP_SHIFT,
        log: DirtyLogger | None = None,
        log_addr: int | None = None,
        in_order: bool = False,
    ) -> PackedDeviceQueue:
        """A queue over ring areas already mapped and checked (by :meth:`PackedLayout.map`).

        The caller keeps the areas and releases them after the queue is done.
        """
        check_packed_base(base, size)
        queue = cls.__new__(cls)
        queue._setup(
            mem, PackedLayout(size), areas, event_idx, indirect, base, log, log_addr, in_order
        )
        return queue

    def _setup(
        self,
        mem: AddressSpace,
        layout: PackedLayout,
        areas: RingAreas,
        event_idx: bool,
        indirect: bool,
        base: int,
        log: DirtyLogger | None,
        log_addr: int | None,
        in_order: bool,
    ) -> None:
        if log is not None and log_addr is None:
            raise ValueError("dirty logging needs the descriptor ring's log_addr")
        self._mem = mem
        self._size = layout.size
        self._desc = areas.desc.view
        self._driver_event = areas.driver.view
        self._device_event = areas.device.view
        self._event_idx = event_idx
        self._indirect = indirect
        self._log = log
        self._log_addr = 0 if log_addr is None else log_addr
        self._avail_idx = base & _OFF_MASK
        self._avail_wrap = base >> _WRAP_SHIFT & 1
        self._used_idx = self._avail_idx
        self._used_wrap = self._avail_wrap
        self._inflight_slots = 0
        self._inflight = 0
        self._unsignalled = 0
        self._notify = True
        self._broken = False
        self._in_order = in_order

    @property
    def size(self) -> int:
        """Number of descriptors in the ring."""
        return self._size

    @property
    def in_order(self) -> bool:
        """Whether ``VIRTIO_F_IN_ORDER`` was negotiated for the queue."""
        return self._in_order

    @property
    def broken(self) -> bool:
        """Whether a ring error stopped the queue."""
        return self._broken

    @property
    def inflight(self) -> int:
        """Chains popped and not yet pushed."""
        return self._inflight

    @property
    def base(self) -> int:
        """The ring state as GET_VRING_BASE reports it (available and used positions).

        Chains still in flight count as consumed: finish or record them first.
        """
        return (
            _event_off_wrap(self._avail_idx, self._avail_wrap)
            | _event_off_wrap(self._used_idx, self._used_wrap) << 16
        )

    def _check_usable(self) -> None:
        if self._broken:
            raise QueueBrokenError("packed queue is broken")

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
        head = self._avail_idx * DESCRIPTOR_SIZE
        if not _is_avail(_U16.unpack_from(self._desc, head + _FLAGS_OFFSET)[0], self._avail_wrap):
            return None
        walk = walk_chain(
            self._mem, self._desc, self._size, self._avail_idx, packed=True, indirect=self._indirect
        )
        buffer_id = _U16.unpack_from(self._desc, walk.last * DESCRIPTOR_SIZE + _ID_OFFSET)[0]
        check_index(buffer_id, self._size, "buffer id")
        if self._in_order and buffer_id != self._avail_idx:
            raise OutOfOrderError(
                f"in-order ring: chain at slot {self._avail_idx} carries buffer id {buffer_id}"
            )
        if self._inflight_slots + walk.desc_count > self._size:
            raise AvailIndexError(
                f"chain of {walk.desc_count} slots made available while "
                f"{self._inflight_slots} of {self._size} are still in flight"
            )
        self._avail_idx, self._avail_wrap = _advance(
            self._avail_idx, self._avail_wrap, walk.desc_count, self._size
        )
        self._inflight_slots += walk.desc_count
        self._inflight += 1
        if self._notify and self._event_idx:
            # Keep asking for a kick at the next slot the driver fills.
            store_u16(self._device_event, 0, _event_off_wrap(self._avail_idx, self._avail_wrap))
        return DescriptorChain(buffer_id, walk.readable, walk.writable, walk.desc_count)

    def push(self, chain: DescriptorChain, written: int) -> None:
        """Return a chain to the driver with ``written`` bytes written to its writable buffers."""
        self.push_batch(((chain, written),))

    def push_batch(self, completions: Sequence[tuple[DescriptorChain, int]]) -> None:
        """Return chains, each with the bytes written to it.

        The chains must be in flight and, with ``VIRTIO_F_IN_ORDER``, in the
        order they were popped; then a run of chains used completely and the
        chain after it share one used descriptor (see the module's theory of
        operation).
        """
        self._check_usable()
        if len(completions) > self._inflight:
            raise ValueError(f"push of {len(completions)} chains, {self._inflight} in flight")
        for chain, written in completions:
            check_written(chain, written)
        run: tuple[int, int] | None = None
        for i, (chain, written) in enumerate(completions):
            if run is None:
                run = (self._used_idx, self._used_wrap)
            self._used_idx, self._used_wrap = _advance(
                self._used_idx, self._used_wrap, chain.desc_count, self._size
            )
            self._inflight_slots -= chain.desc_count
            self._inflight -= 1
            self._unsignalled += chain.desc_count
            if self._log is not None:
                log_written(self._log, chain, written)
            last = i == len(completions) - 1
            if self._in_order and used_completely(chain, written) and not last:
                continue
            slot = run[0] * DESCRIPTOR_SIZE
            flags = (_AVAIL_USED if run[1] else 0) | (_WRITE if written else 0)
            _LEN_ID.pack_into(self._desc, slot + 8, written, chain.id)
            store_u16(self._desc, slot + _FLAGS_OFFSET, flags)
            if self._log is not None:
                self._log.log_write(self._log_addr + slot, DESCRIPTOR_SIZE)
            run = None

    def should_notify(self) -> bool:
        """Return whether the driver wants a used-buffer notification now.

        The question covers the pushes since the previous call, which count as
        signalled whatever the answer.  DESC mode without EVENT_IDX, or a
        reserved flags value, is read as ENABLE: a spare interrupt is harmless.
        """
        self._check_usable()
        if self._unsignalled == 0:
            return False
        advanced = self._unsignalled
        self._unsignalled = 0
        off_wrap, flags = _EVENT.unpack_from(self._driver_event, 0)
        mode = flags & _EVENT_FLAGS_MASK
        if mode == _DISABLE:
            return False
        if mode == _DESC and self._event_idx:
            return _packed_need_event(
                off_wrap, self._used_idx, self._used_wrap, advanced, self._size
            )
        return True

    def disable_notification(self) -> None:
        """Ask the driver not to kick (device event flags DISABLE)."""
        self._check_usable()
        self._notify = False
        store_u16(self._device_event, _EVENT_FLAGS_OFFSET, _DISABLE)

    def enable_notification(self) -> bool:
        """Ask the driver to kick for new buffers; return True if some arrived already.

        With EVENT_IDX the device event area names the next slot to consume
        (DESC mode), otherwise its flags say ENABLE.  A True answer means the
        caller must pop again rather than wait for a kick.
        """
        self._check_usable()
        self._notify = True
        if self._event_idx:
            store_u16(self._device_event, 0, _event_off_wrap(self._avail_idx, self._avail_wrap))
            store_u16(self._device_event, _EVENT_FLAGS_OFFSET, _DESC)
        else:
            store_u16(self._device_event, _EVENT_FLAGS_OFFSET, _ENABLE)
        flags = _U16.unpack_from(self._desc, self._avail_idx * DESCRIPTOR_SIZE + _FLAGS_OFFSET)[0]
        return _is_avail(flags, self._avail_wrap)

    # Inflight I/O tracking (vhost-user spec, "Inflight I/O tracking", packed
    # virtqueue): the back-end copies the ring descriptors of every chain it
    # takes, and a later back-end rebuilds the chains from those copies.

    @property
    def avail_position(self) -> int:
        """The ring slot :meth:`pop` reads next."""
        return self._avail_idx

    @property
    def used_position(self) -> tuple[int, int]:
        """The ring slot the next used descriptor goes to, and the used wrap counter."""
        return self._used_idx, self._used_wrap

    def used_position_after(self, chain: DescriptorChain) -> tuple[int, int]:
        """:attr:`used_position` once ``chain`` is pushed."""
        return _advance(self._used_idx, self._used_wrap, chain.desc_count, self._size)

    def ring_descriptors(self, first: int, count: int) -> list[tuple[int, int, int, int]]:
        """``(addr, len, id, flags)`` of ``count`` ring slots from ``first``, wrapping.

        Used right after :meth:`pop` on the chain's own slots, which the
        driver may not reuse before the device returns them.
        """
        check_index(first, self._size, "ring slot")
        if not 0 <= count <= self._size:
            raise ValueError(f"{count} slots of a {self._size}-slot ring")
        slots = ((first + i) % self._size for i in range(count))
        return [DESCRIPTOR.unpack_from(self._desc, s * DESCRIPTOR_SIZE) for s in slots]

    def slot_used(self, slot: int, wrap: int) -> bool:
        """Whether ring ``slot`` holds a used descriptor the device wrote with ``wrap``."""
        check_index(slot, self._size, "ring slot")
        flags = _U16.unpack_from(self._desc, slot * DESCRIPTOR_SIZE + _FLAGS_OFFSET)[0]
        return _is_used(flags, 1 if wrap else 0)

    def resume_inflight(self, used_idx: int, used_wrap: int, chains: int, slots: int) -> None:
        """Restart the used side where a previous device left it.

        ``chains`` chains occupying ``slots`` ring slots were taken and never
        completed; they lie between the used position (``used_idx``,
        ``used_wrap``) and the available position of ``base``, which must be
        exactly ``slots`` further on.
        """
        check_index(used_idx, self._size, "inflight used position")
        if not 0 <= chains <= slots <= self._size:
            raise AvailIndexError(
                f"{chains} chains of {slots} slots cannot be in flight in a {self._size}-slot ring"
            )
        wrap = 1 if used_wrap else 0
        distance = self._avail_idx - used_idx + (self._size if wrap != self._avail_wrap else 0)
        if distance != slots:
            raise AvailIndexError(
                f"{slots} slots are in flight but the available position is {distance} slots "
                "past the used one"
            )
        self._used_idx, self._used_wrap = used_idx, wrap
        self._inflight, self._inflight_slots = chains, slots

    def resubmit(self, descriptors: Sequence[tuple[int, int, int, int]]) -> DescriptorChain:
        """Rebuild a chain from copies of its ring descriptors ``(addr, len, id, flags)``.

        The chain was taken by a previous device and counted by
        :meth:`resume_inflight`; it is validated as :meth:`pop` validates a
        chain in the ring, and must end at its last descriptor.
        """
        self._check_usable()
        try:
            return self._resubmit(descriptors)
        except RingError:
            self._broken = True
            raise

    def _resubmit(self, descriptors: Sequence[tuple[int, int, int, int]]) -> DescriptorChain:
        count = len(descriptors)
        if not 1 <= count <= self._size:
            raise AvailIndexError(f"chain of {count} slots in a {self._size}-slot ring")
        # A scratch ring of the queue's size, so the walk applies the queue's limits.
        table = bytearray(self._size * DESCRIPTOR_SIZE)
        for i, desc in enumerate(descriptors):
            DESCRIPTOR.pack_into(table, i * DESCRIPTOR_SIZE, *desc)
        walk = walk_chain(
            self._mem, memoryview(table), self._size, 0, packed=True, indirect=self._indirect
        )
        if walk.desc_count != count:
            raise DescriptorLoopError(
                f"resubmitted chain of {count} slots walks {walk.desc_count} descriptors"
            )
        buffer_id = descriptors[-1][2]
        check_index(buffer_id, self._size, "buffer id")
        return DescriptorChain(buffer_id, walk.readable, walk.writable, walk.desc_count)


class PackedDriverQueue:
    """The driver side of a packed queue (a VMM's or a virtio driver's view).

    The constructor zeroes the descriptor ring and both event areas.
    ``indirect_addr``, when given, is an area of ``size * size * 16`` bytes:
    the indirect table of buffer id ``i`` lives at
    ``indirect_addr + i * size * 16`` and holds up to ``size`` descriptors.
    With ``in_order`` (``VIRTIO_F_IN_ORDER`` negotiated) a chain's buffer id
    is the slot of its head, and a used descriptor may stand for a batch of
    chains: those before the one it names were used completely.
    """

    def __init__(
        self,
        mem: AddressSpace,
        size: int,
        desc_addr: int,
        driver_event_addr: int,
        device_event_addr: int,
        *,
        event_idx: bool,
        indirect_addr: int | None = None,
        in_order: bool = False,
    ) -> None:
        layout = PackedLayout(size)
        layout.check_addresses(desc_addr, driver_event_addr, device_event_addr)
        self._layout = layout
        self._size = size
        self._desc = mem.view(desc_addr, layout.desc_size)
        self._driver_event = mem.view(driver_event_addr, layout.EVENT_SIZE)
        self._device_event = mem.view(device_event_addr, layout.EVENT_SIZE)
        for area in (self._desc, self._driver_event, self._device_event):
            area[:] = bytes(len(area))
        self._indirect = (
            None
            if indirect_addr is None
            else (indirect_addr, mem.view(indirect_addr, size * layout.desc_size))
        )
        self._event_idx = event_idx
        self._in_order = in_order
        # Popping from the end hands out buffer id 0 first.
        self._free_ids = list(range(size - 1, -1, -1))
        self._slots = [0] * size
        # In order: buffer ids in flight in ring order, each chain's writable bytes, and the
        # used descriptor of the batch being taken apart.
        self._order: deque[int] = deque()
        self._writable = [0] * size
        self._batch: tuple[int, int] | None = None
        self._num_free = size
        self._avail_idx = 0
        self._avail_wrap = 1
        self._used_idx = 0
        self._used_wrap = 1
        self._unkicked = 0
        self._interrupts = True

    @property
    def size(self) -> int:
        """Number of descriptors in the ring."""
        return self._size

    @property
    def num_free(self) -> int:
        """Ring slots free for new chains."""
        return self._num_free

    def add(
        self,
        readable: Sequence[tuple[int, int]],
        writable: Sequence[tuple[int, int]],
        *,
        indirect: bool = False,
    ) -> int:
        """Make a chain of (addr, len) buffers available; return its buffer id.

        Raises :class:`~pyvdpa.virtio.ring.QueueFullError` when too few ring
        slots are free (one for an indirect chain).
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
        if needed > self._num_free:
            raise QueueFullError(f"{needed} ring slots needed, {self._num_free} free")
        buffer_id = self._avail_idx if self._in_order else self._free_ids.pop()
        if area is not None:
            area_addr, area_view = area
            table = buffer_id * self._layout.desc_size
            for i, (addr, length, flags) in enumerate(buffers):
                DESCRIPTOR.pack_into(area_view, table + i * DESCRIPTOR_SIZE, addr, length, 0, flags)
            buffers = [(area_addr + table, len(buffers) * DESCRIPTOR_SIZE, _INDIRECT)]
        head = self._avail_idx * DESCRIPTOR_SIZE
        head_flags = 0
        idx, wrap = self._avail_idx, self._avail_wrap
        last = len(buffers) - 1
        for i, (addr, length, flags) in enumerate(buffers):
            flags |= (_NEXT if i < last else 0) | (_AVAIL if wrap else _USED)
            if i == 0:
                # The head's flags hand the whole chain over, so they go last.
                _ADDR_LEN_ID.pack_into(self._desc, head, addr, length, buffer_id)
                head_flags = flags
            else:
                DESCRIPTOR.pack_into(
                    self._desc, idx * DESCRIPTOR_SIZE, addr, length, buffer_id, flags
                )
            idx, wrap = _advance(idx, wrap, 1, self._size)
        store_u16(self._desc, head + _FLAGS_OFFSET, head_flags)
        self._avail_idx, self._avail_wrap = idx, wrap
        self._slots[buffer_id] = needed
        self._writable[buffer_id] = sum(length for _, length in writable)
        if self._in_order:
            self._order.append(buffer_id)
        self._num_free -= needed
        self._unkicked += needed
        return buffer_id

    def kick_needed(self) -> bool:
        """Return whether the device wants a kick for the chains added since the last call."""
        if self._unkicked == 0:
            return False
        added = self._unkicked
        self._unkicked = 0
        off_wrap, flags = _EVENT.unpack_from(self._device_event, 0)
        mode = flags & _EVENT_FLAGS_MASK
        if mode == _DISABLE:
            return False
        if mode == _DESC and self._event_idx:
            return _packed_need_event(
                off_wrap, self._avail_idx, self._avail_wrap, added, self._size
            )
        return True

    def get_used(self) -> tuple[int, int] | None:
        """Return (buffer id, written length) of the next used chain and free its slots.

        Raises :class:`~pyvdpa.virtio.ring.DescriptorIndexError` when the
        device names a buffer id that is not in flight.
        """
        if self._batch is None:
            slot = self._used_idx * DESCRIPTOR_SIZE
            flags = _U16.unpack_from(self._desc, slot + _FLAGS_OFFSET)[0]
            if not _is_used(flags, self._used_wrap):
                return None
            length, named = _LEN_ID.unpack_from(self._desc, slot + 8)
            if named >= self._size or self._slots[named] == 0:
                raise DescriptorIndexError(f"used descriptor names buffer {named}, not in flight")
            self._batch = (named, length if flags & _WRITE else 0)
        named, length = self._batch
        buffer_id = self._order.popleft() if self._in_order else named
        if buffer_id == named:
            self._batch = None
        else:
            # Skipped over by the batch's descriptor: used completely (section 2.8.8).
            length = self._writable[buffer_id]
        count = self._slots[buffer_id]
        self._slots[buffer_id] = 0
        if not self._in_order:
            self._free_ids.append(buffer_id)
        self._num_free += count
        self._used_idx, self._used_wrap = _advance(
            self._used_idx, self._used_wrap, count, self._size
        )
        if self._event_idx and self._interrupts:
            store_u16(self._driver_event, 0, _event_off_wrap(self._used_idx, self._used_wrap))
        return buffer_id, length

    def disable_interrupts(self) -> None:
        """Ask the device not to interrupt (driver event flags DISABLE)."""
        self._interrupts = False
        store_u16(self._driver_event, _EVENT_FLAGS_OFFSET, _DISABLE)

    def enable_interrupts(self) -> bool:
        """Ask for an interrupt at the next used chain; return True if one is already there.

        With EVENT_IDX the driver event area names the next used slot (DESC
        mode), otherwise its flags say ENABLE.
        """
        self._interrupts = True
        if self._event_idx:
            store_u16(self._driver_event, 0, _event_off_wrap(self._used_idx, self._used_wrap))
            store_u16(self._driver_event, _EVENT_FLAGS_OFFSET, _DESC)
        else:
            store_u16(self._driver_event, _EVENT_FLAGS_OFFSET, _ENABLE)
        if self._batch is not None:
            return True
        flags = _U16.unpack_from(self._desc, self._used_idx * DESCRIPTOR_SIZE + _FLAGS_OFFSET)[0]
        return _is_used(flags, self._used_wrap)
