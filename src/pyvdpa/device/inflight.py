"""The inflight I/O tracking buffer (``GET_INFLIGHT_FD`` / ``SET_INFLIGHT_FD``).

Theory of operation (vhost-user spec, "Inflight I/O tracking"):

A back-end that completes requests out of order cannot rebuild, after a
crash or restart, the list of requests it had taken from a ring but not
completed: the ring entries that described them may have been overwritten.
With protocol feature ``INFLIGHT_SHMFD`` the back-end keeps that list in a
buffer shared with the front-end.  The front-end asks for the buffer once
(``GET_INFLIGHT_FD``: the back-end allocates a zeroed memfd and returns it
with its size), keeps it across back-end restarts, and hands it back with
``SET_INFLIGHT_FD`` every time the device starts.

The buffer is one region per virtqueue, each rounded up to 64 bytes:

* split rings: ``features u64, version u16, desc_num u16,
  last_batch_head u16, used_idx u16`` then ``desc_num`` entries of
  ``inflight u8, padding[5], next u16, counter u64`` (16 bytes), one per
  descriptor head;
* packed rings: ``features u64, version u16, desc_num u16, free_head u16,
  old_free_head u16, used_idx u16, old_used_idx u16, used_wrap_counter u8,
  old_used_wrap_counter u8, padding[7]`` (padded to 32 bytes) then
  ``desc_num`` entries of ``inflight u8, padding u8, next u16, last u16,
  num u16, counter u64, id u16, flags u16, len u32, addr u64`` (32 bytes),
  which copy the descriptors themselves and are linked into a free list.

``version`` 0 marks a region no ring has started on yet (GET_INFLIGHT_FD
hands out a zeroed buffer, as libvhost-user does; a start writes 1, the
only layout), so that a start tells a buffer an earlier back-end used,
to be recovered, from a new one, whose ring keeps the position
SET_VRING_BASE gave (the destination of a migration gets a new buffer).
The fields are written in the order the spec gives, so that a crash
between any two writes leaves a state :meth:`SplitInflightQueue.recover` /
:meth:`PackedInflightQueue.recover` can repair.  The buffer is shared by
two processes on one host, so it is in native byte order.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import ClassVar, Self

from pyvdpa.errors import GuestMemoryError, RemoteProtocolError, RingError
from pyvdpa.memory import FdMapping

__all__ = [
    "INFLIGHT_VERSION",
    "MAX_QUEUE_SIZE",
    "InflightChain",
    "InflightDescriptor",
    "InflightRegion",
    "PackedInflightQueue",
    "SplitInflightQueue",
]

INFLIGHT_VERSION = 1
"""The only defined version of a queue region's layout."""

MAX_QUEUE_SIZE = 32768
"""Largest virtqueue size (virtio 1.2, section 2.7 and 2.8)."""

_ALIGNMENT = 64
# Both layouts start with ``features u64, version u16, desc_num u16``.
_VERSION_AT = 8
_DESC_NUM_AT = 10
_U8 = struct.Struct("=B")
_U16 = struct.Struct("=H")
_U64 = struct.Struct("=Q")
_VERSION_AND_DESC_NUM = struct.Struct("=HH")

# Split layout: the header ``=QHHHH`` is followed by ``=B5xHQ`` entries.
_SPLIT_HEADER_SIZE = 16
_SPLIT_DESC_SIZE = 16
_SPLIT_LAST_BATCH_HEAD = 12
_SPLIT_USED_IDX = 14
_SPLIT_DESC = struct.Struct("=B5xHQ")
_SPLIT_INFLIGHT = 0
_SPLIT_NEXT = 6
_SPLIT_COUNTER = 8

# Packed layout: a 29-byte header, padded to 32 by the 8-byte alignment of
# the entries that follow, each ``=BxHHHQHHIQ``.
_PACKED_HEADER = struct.Struct("=QHHHHHHBB")
_PACKED_HEADER_SIZE = 32
_PACKED_DESC_SIZE = 32
_PACKED_FREE_HEAD = 12
_PACKED_OLD_FREE_HEAD = 14
_PACKED_USED_IDX = 16
_PACKED_OLD_USED_IDX = 18
_PACKED_USED_WRAP = 20
_PACKED_OLD_USED_WRAP = 21
_PACKED_DESC = struct.Struct("=BxHHHQHHIQ")
_PACKED_INFLIGHT = 0
_PACKED_NEXT = 2
_PACKED_LAST = 4
_PACKED_NUM = 6
_PACKED_COUNTER = 8
_PACKED_BUFFER = struct.Struct("=HHIQ")  # id, flags, len, addr
_PACKED_BUFFER_AT = 16


@dataclass(frozen=True, slots=True)
class InflightDescriptor:
    """A packed-ring descriptor as copied into the inflight buffer."""

    addr: int
    len: int
    id: int
    flags: int


@dataclass(frozen=True, slots=True)
class InflightChain:
    """A packed-ring chain still in flight: its head entry and its descriptors in order."""

    entry: int
    counter: int
    descriptors: tuple[InflightDescriptor, ...]


def _queue_region_size(queue_size: int, *, packed: bool) -> int:
    if packed:
        raw = _PACKED_HEADER_SIZE + _PACKED_DESC_SIZE * queue_size
    else:
        raw = _SPLIT_HEADER_SIZE + _SPLIT_DESC_SIZE * queue_size
    return -(-raw // _ALIGNMENT) * _ALIGNMENT


def _check_geometry(num_queues: int, queue_size: int) -> None:
    if not 1 <= num_queues <= 0xFFFF:
        raise RemoteProtocolError(f"inflight buffer for {num_queues} queues: need 1 to 65535")
    if not 1 <= queue_size <= MAX_QUEUE_SIZE:
        raise RemoteProtocolError(
            f"inflight buffer for queues of size {queue_size}: need 1 to {MAX_QUEUE_SIZE}"
        )


class _QueueRegion:
    """Field access to one queue's region of the buffer.

    A region is :attr:`fresh` (``version`` 0) until its ring first starts
    or a chain is recorded in it:
    no back-end recorded anything there yet (a new buffer from
    GET_INFLIGHT_FD, which a first start and the destination of a
    migration get), so that start adopts the ring's position, resubmits
    nothing and writes the version, as libvhost-user does.  A region a
    dead back-end used carries version 1 and is recovered.
    """

    __slots__ = ("_base", "_counter", "_region", "desc_num")

    _desc_size: ClassVar[int]
    _desc_at: ClassVar[int]

    def __init__(self, region: InflightRegion, base: int) -> None:
        self._region = region
        self._base = base
        self.desc_num = region.queue_size
        self._counter = 0

    @property
    def fresh(self) -> bool:
        """Whether no ring has started on the region yet (``version`` 0)."""
        return self._get(_U16, _VERSION_AT) == 0

    def _begin(self) -> None:
        """Mark the region used by a started ring (``version`` 1)."""
        self._put(_U16, _VERSION_AT, INFLIGHT_VERSION)

    @property
    def view(self) -> memoryview:
        """This queue's part of the buffer (a device recording from compiled code maps it)."""
        size = _queue_region_size(self.desc_num, packed=isinstance(self, PackedInflightQueue))
        return self._region.buffer[self._base : self._base + size]

    @property
    def next_counter(self) -> int:
        """The fetch counter the next chain taken is recorded with."""
        return self._counter

    def _get(self, fmt: struct.Struct, offset: int) -> int:
        value: int = fmt.unpack_from(self._region.buffer, self._base + offset)[0]
        return value

    def _put(self, fmt: struct.Struct, offset: int, value: int) -> None:
        fmt.pack_into(self._region.buffer, self._base + offset, value)

    def _entry(self, index: int) -> int:
        """Offset of entry ``index`` relative to the queue region."""
        return self._desc_at + self._desc_size * index

    def _check_entry(self, index: int, what: str) -> None:
        if not 0 <= index < self.desc_num:
            raise RingError(f"{what} {index} is outside the queue of size {self.desc_num}")

    def _next_counter(self) -> int:
        counter = self._counter
        self._counter = (counter + 1) & 0xFFFF_FFFF_FFFF_FFFF
        return counter

    def _resume_counter(self, counter_at: int) -> None:
        """Continue the fetch counter after the largest one recorded."""
        buf = self._region.buffer
        start = self._base + self._desc_at
        highest = max(
            (
                _U64.unpack_from(buf, start + self._desc_size * i + counter_at)[0]
                for i in range(self.desc_num)
            ),
            default=-1,
        )
        # A hostile buffer may hold the largest counter: wrap, as counting on would.
        self._counter = (highest + 1) & 0xFFFF_FFFF_FFFF_FFFF


class SplitInflightQueue(_QueueRegion):
    """Inflight tracking for one split virtqueue.

    Protocol, from the spec: :meth:`mark_inflight` for every head taken from
    the available ring; to complete, :meth:`record_batch` the heads, publish
    them in the used ring (used ``idx`` included), then :meth:`commit_batch`
    with the new used ``idx``.  After a restart, :meth:`recover` repairs an
    interrupted batch and lists the heads to resubmit.
    """

    __slots__ = ()

    _desc_size = _SPLIT_DESC_SIZE
    _desc_at = _SPLIT_HEADER_SIZE

    def __init__(self, region: InflightRegion, base: int) -> None:
        super().__init__(region, base)
        self._resume_counter(_SPLIT_COUNTER)

    def _initialise(self) -> None:
        """Write a fresh header over a zeroed region (``version`` stays 0: :attr:`fresh`)."""
        self._put(_U16, _DESC_NUM_AT, self.desc_num)

    @property
    def version(self) -> int:
        """The layout version stored in the region."""
        return self._get(_U16, _VERSION_AT)

    @property
    def last_batch_head(self) -> int:
        """Head of the list of the last batch of completed heads."""
        return self._get(_U16, _SPLIT_LAST_BATCH_HEAD)

    @property
    def used_idx(self) -> int:
        """The used ring ``idx`` after the last committed batch."""
        return self._get(_U16, _SPLIT_USED_IDX)

    def mark_inflight(self, head: int) -> None:
        """Record that descriptor chain ``head`` was taken from the available ring."""
        self._check_entry(head, "descriptor head")
        if self.fresh:
            self._begin()
        entry = self._entry(head)
        self._put(_U64, entry + _SPLIT_COUNTER, self._next_counter())
        self._put(_U8, entry + _SPLIT_INFLIGHT, 1)

    def record_batch(self, heads: Iterable[int]) -> None:
        """Link the heads about to be published in the used ring into the last-batch list."""
        for head in heads:
            self._check_entry(head, "descriptor head")
            self._put(_U16, self._entry(head) + _SPLIT_NEXT, self.last_batch_head)
            self._put(_U16, _SPLIT_LAST_BATCH_HEAD, head)

    def commit_batch(self, heads: Iterable[int], used_idx: int) -> None:
        """Clear the heads once the used ring ``idx`` has become ``used_idx``."""
        for head in heads:
            self._check_entry(head, "descriptor head")
            self._put(_U8, self._entry(head) + _SPLIT_INFLIGHT, 0)
        self._put(_U16, _SPLIT_USED_IDX, used_idx & 0xFFFF)

    def inflight_heads(self) -> list[int]:
        """The heads still in flight, in the order they were taken."""
        buf = self._region.buffer
        start = self._base + _SPLIT_HEADER_SIZE
        pending = []
        for head in range(self.desc_num):
            inflight, _, counter = _SPLIT_DESC.unpack_from(buf, start + _SPLIT_DESC_SIZE * head)
            if inflight:
                pending.append((counter, head))
        return [head for _, head in sorted(pending)]

    def recover(self, used_ring_idx: int) -> list[int]:
        """Repair after a restart and return the heads to resubmit, oldest first.

        ``used_ring_idx`` is the ``idx`` currently in the used ring.  If it
        moved past the recorded ``used_idx``, the back-end published a batch
        but died before clearing it: those heads, found through the
        last-batch list, are completed rather than resubmitted.
        """
        used_ring_idx &= 0xFFFF
        if self.fresh:
            self._begin()
            self._put(_U16, _SPLIT_USED_IDX, used_ring_idx)
            return []
        used_idx = self.used_idx
        if used_idx != used_ring_idx:
            batch = (used_ring_idx - used_idx) & 0xFFFF
            if batch > self.desc_num:
                raise RemoteProtocolError(
                    f"inflight buffer: used idx {used_idx} is {batch} entries behind the "
                    f"used ring, more than the queue size {self.desc_num}"
                )
            head = self.last_batch_head
            for _ in range(batch):
                if head >= self.desc_num:
                    raise RemoteProtocolError(
                        f"inflight buffer: last-batch list reaches head {head} outside the "
                        f"queue of size {self.desc_num}"
                    )
                entry = self._entry(head)
                self._put(_U8, entry + _SPLIT_INFLIGHT, 0)
                head = self._get(_U16, entry + _SPLIT_NEXT)
            self._put(_U16, _SPLIT_USED_IDX, used_ring_idx)
        return self.inflight_heads()


class PackedInflightQueue(_QueueRegion):
    """Inflight tracking for one packed virtqueue.

    Protocol, from the spec: :meth:`mark_inflight` for every chain taken
    from the descriptor ring (it copies the descriptors and returns the
    chain's entry); to complete, :meth:`record_batch` the entries with the
    new used index and wrap counter, write the used descriptors to the
    ring, then :meth:`commit_batch`.  After a restart, :meth:`recover`
    rolls back or completes an interrupted batch and lists the chains to
    resubmit.
    """

    __slots__ = ()

    _desc_size = _PACKED_DESC_SIZE
    _desc_at = _PACKED_HEADER_SIZE

    def __init__(self, region: InflightRegion, base: int) -> None:
        super().__init__(region, base)
        self._resume_counter(_PACKED_COUNTER)

    def _initialise(self) -> None:
        """Write a fresh header and free list over a zeroed region (``version`` stays 0)."""
        for i in range(self.desc_num):
            self._put(_U16, self._entry(i) + _PACKED_NEXT, i + 1)
        self._put(_U8, _PACKED_USED_WRAP, 1)
        self._put(_U8, _PACKED_OLD_USED_WRAP, 1)
        self._put(_U16, _DESC_NUM_AT, self.desc_num)

    def _header(self) -> tuple[int, ...]:
        fields: tuple[int, ...] = _PACKED_HEADER.unpack_from(self._region.buffer, self._base)
        return fields

    @property
    def version(self) -> int:
        """The layout version stored in the region."""
        return self._header()[1]

    @property
    def free_head(self) -> int:
        """First free entry."""
        return self._header()[3]

    @property
    def old_free_head(self) -> int:
        """First free entry as of the last committed change."""
        return self._header()[4]

    @property
    def used_idx(self) -> int:
        """Next descriptor ring slot the device writes a used descriptor to."""
        return self._header()[5]

    @property
    def old_used_idx(self) -> int:
        """``used_idx`` as of the last committed batch."""
        return self._header()[6]

    @property
    def used_wrap_counter(self) -> int:
        """The device's ring wrap counter."""
        return self._header()[7]

    @property
    def old_used_wrap_counter(self) -> int:
        """``used_wrap_counter`` as of the last committed batch."""
        return self._header()[8]

    def mark_inflight(self, chain: Sequence[InflightDescriptor]) -> int:
        """Record a chain taken from the descriptor ring; return its entry.

        The entry identifies the chain in :meth:`record_batch` and
        :meth:`commit_batch`.
        """
        if not 1 <= len(chain) <= self.desc_num:
            raise RingError(
                f"chain of {len(chain)} descriptors does not fit a queue of size {self.desc_num}"
            )
        if self.fresh:
            self._begin()
        head = self.old_free_head
        if head != self.free_head:
            raise RingError("inflight buffer: a completion batch was recorded but not committed")
        head_entry = self._entry(head)
        last = len(chain) - 1
        for i, desc in enumerate(chain):
            free = self.free_head
            if free >= self.desc_num:
                raise RingError(f"inflight buffer: more than {self.desc_num} descriptors in flight")
            if i == 0:
                self._put(_U16, head_entry + _PACKED_NUM, 0)
                self._put(_U64, head_entry + _PACKED_COUNTER, self._next_counter())
                self._put(_U8, head_entry + _PACKED_INFLIGHT, 1)
            if i == last:
                self._put(_U16, head_entry + _PACKED_LAST, free)
            self._put(_U16, head_entry + _PACKED_NUM, i + 1)
            entry = self._entry(free)
            _PACKED_BUFFER.pack_into(
                self._region.buffer,
                self._base + entry + _PACKED_BUFFER_AT,
                desc.id,
                desc.flags,
                desc.len,
                desc.addr,
            )
            self._put(_U16, _PACKED_FREE_HEAD, self._get(_U16, entry + _PACKED_NEXT))
        self._put(_U16, _PACKED_OLD_FREE_HEAD, self.free_head)
        return head

    def record_batch(self, entries: Iterable[int], used_idx: int, used_wrap_counter: int) -> None:
        """Return completed chains to the free list and record the new used position.

        ``used_idx`` and ``used_wrap_counter`` are where the device writes
        its next used descriptor once this batch is in the ring.
        """
        for head in entries:
            self._check_entry(head, "inflight entry")
            last = self._get(_U16, self._entry(head) + _PACKED_LAST)
            self._check_entry(last, "inflight entry")
            self._put(_U16, self._entry(last) + _PACKED_NEXT, self.free_head)
            self._put(_U16, _PACKED_FREE_HEAD, head)
        self._put(_U16, _PACKED_USED_IDX, used_idx & 0x7FFF)
        self._put(_U8, _PACKED_USED_WRAP, 1 if used_wrap_counter else 0)

    def commit_batch(self, entries: Iterable[int]) -> None:
        """Clear the chains once their used descriptors are in the ring."""
        for head in entries:
            self._check_entry(head, "inflight entry")
            self._put(_U8, self._entry(head) + _PACKED_INFLIGHT, 0)
        self._commit()

    def restart_at(self, used_idx: int, used_wrap_counter: int) -> None:
        """Record the ring's used position when a ring starts with nothing in flight.

        The front-end's SET_VRING_BASE, not this buffer, then says where the
        ring is (a fresh buffer says slot 0, a ring may resume anywhere); the
        next interrupted batch must be judged against that position.
        """
        self._check_entry(used_idx, "used position")
        wrap = 1 if used_wrap_counter else 0
        self._put(_U16, _PACKED_USED_IDX, used_idx)
        self._put(_U8, _PACKED_USED_WRAP, wrap)
        self._put(_U16, _PACKED_OLD_USED_IDX, used_idx)
        self._put(_U8, _PACKED_OLD_USED_WRAP, wrap)

    def _commit(self) -> None:
        header = self._header()
        self._put(_U16, _PACKED_OLD_FREE_HEAD, header[3])
        self._put(_U16, _PACKED_OLD_USED_IDX, header[5])
        self._put(_U8, _PACKED_OLD_USED_WRAP, header[7])

    def inflight_chains(self) -> list[InflightChain]:
        """The chains still in flight, in the order they were taken."""
        buf = self._region.buffer
        start = self._base + _PACKED_HEADER_SIZE
        chains = []
        for head in range(self.desc_num):
            inflight, _, _, num, counter, *_ = _PACKED_DESC.unpack_from(
                buf, start + _PACKED_DESC_SIZE * head
            )
            if not inflight:
                continue
            if not 1 <= num <= self.desc_num:
                raise RemoteProtocolError(
                    f"inflight buffer: entry {head} claims a chain of {num} descriptors"
                )
            descriptors = []
            entry = head
            for _ in range(num):
                if entry >= self.desc_num:
                    raise RemoteProtocolError(
                        f"inflight buffer: chain at entry {head} reaches entry {entry} "
                        f"outside the queue of size {self.desc_num}"
                    )
                _, nxt, _, _, _, desc_id, flags, length, addr = _PACKED_DESC.unpack_from(
                    buf, start + _PACKED_DESC_SIZE * entry
                )
                descriptors.append(InflightDescriptor(addr, length, desc_id, flags))
                entry = nxt
            chains.append(InflightChain(head, counter, tuple(descriptors)))
        chains.sort(key=lambda chain: chain.counter)
        return chains

    def recover(self, descriptor_used: Callable[[int, int], bool]) -> list[InflightChain]:
        """Repair after a restart and return the chains to resubmit, oldest first.

        ``descriptor_used(index, wrap_counter)`` tells whether the ring
        entry at ``index`` carries a used descriptor written with
        ``wrap_counter``.  If the device got as far as writing the first
        used descriptor of an uncommitted batch, the batch is committed;
        otherwise it is rolled back and its chains are resubmitted.
        """
        if self.fresh:
            self._begin()
            return []
        header = self._header()
        if header[5] != header[6] and descriptor_used(header[6], header[8]):
            self._commit()
        header = self._header()
        self._put(_U16, _PACKED_FREE_HEAD, header[4])
        self._put(_U16, _PACKED_USED_IDX, header[6])
        self._put(_U8, _PACKED_USED_WRAP, header[8])
        entry = header[4]
        for _ in range(self.desc_num):
            if entry >= self.desc_num:
                break
            self._put(_U8, self._entry(entry) + _PACKED_INFLIGHT, 0)
            entry = self._get(_U16, self._entry(entry) + _PACKED_NEXT)
        return self.inflight_chains()


class InflightRegion:
    """The whole inflight buffer: one region per virtqueue.

    Build it with :meth:`allocate` (``GET_INFLIGHT_FD``) or :meth:`from_fd`
    (``SET_INFLIGHT_FD``).  The object owns :attr:`fd` and closes it in
    :meth:`close`; the fd given to :meth:`from_fd` stays the caller's.
    """

    __slots__ = (
        "_mapping",
        "_queues",
        "fd",
        "mmap_offset",
        "mmap_size",
        "num_queues",
        "packed",
        "queue_size",
    )

    def __init__(
        self,
        mapping: FdMapping,
        fd: int,
        num_queues: int,
        queue_size: int,
        *,
        packed: bool,
    ) -> None:
        """Wrap an existing mapping; use :meth:`allocate` or :meth:`from_fd` instead."""
        self._mapping = mapping
        self.fd = fd
        self.mmap_size = mapping.size
        self.mmap_offset = mapping.offset
        self.num_queues = num_queues
        self.queue_size = queue_size
        self.packed = packed
        self._queues: dict[int, SplitInflightQueue | PackedInflightQueue] = {}

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    @staticmethod
    def queue_region_size(queue_size: int, *, packed: bool) -> int:
        """Bytes of buffer one queue of ``queue_size`` descriptors takes."""
        return _queue_region_size(queue_size, packed=packed)

    @classmethod
    def allocate(cls, num_queues: int, queue_size: int, *, packed: bool) -> InflightRegion:
        """Create a zeroed, initialised buffer in a new memfd (``GET_INFLIGHT_FD``)."""
        _check_geometry(num_queues, queue_size)
        size = num_queues * _queue_region_size(queue_size, packed=packed)
        try:
            fd = os.memfd_create("pyvdpa-inflight", os.MFD_CLOEXEC)
        except OSError as exc:
            raise GuestMemoryError(f"memfd_create failed: {exc.strerror}") from exc
        try:
            os.ftruncate(fd, size)
            region = cls(FdMapping(fd, size), fd, num_queues, queue_size, packed=packed)
        except OSError as exc:
            os.close(fd)
            raise GuestMemoryError(f"cannot size the inflight memfd: {exc.strerror}") from exc
        except BaseException:
            os.close(fd)
            raise
        for index in range(num_queues):
            region._queue(index)._initialise()
        return region

    @classmethod
    def from_fd(
        cls,
        fd: int,
        mmap_size: int,
        mmap_offset: int,
        num_queues: int,
        queue_size: int,
        *,
        packed: bool,
    ) -> InflightRegion:
        """Map a buffer the front-end hands back (``SET_INFLIGHT_FD``).

        ``mmap_size`` must hold ``num_queues`` regions for queues of
        ``queue_size``.  Each region must be uninitialised (version 0,
        then initialised here) or carry version 1 and ``queue_size``
        entries.  Raises :class:`RemoteProtocolError` for inconsistent
        sizes or contents, :class:`GuestMemoryError` if ``fd`` cannot be
        mapped.
        """
        _check_geometry(num_queues, queue_size)
        needed = num_queues * _queue_region_size(queue_size, packed=packed)
        if mmap_size < needed:
            raise RemoteProtocolError(
                f"inflight buffer of {mmap_size} bytes is too small for {num_queues} queues "
                f"of size {queue_size} ({needed} bytes needed)"
            )
        mapping = FdMapping(fd, mmap_size, mmap_offset)
        try:
            own_fd = os.dup(fd)
        except OSError as exc:
            mapping.close()
            raise GuestMemoryError(f"cannot duplicate fd {fd}: {exc.strerror}") from exc
        region = cls(mapping, own_fd, num_queues, queue_size, packed=packed)
        try:
            region._adopt()
        except BaseException:
            region.close()
            raise
        return region

    def _adopt(self) -> None:
        """Check every queue region, initialising the ones still zero."""
        stride = _queue_region_size(self.queue_size, packed=self.packed)
        for index in range(self.num_queues):
            base = index * stride
            version, desc_num = _VERSION_AND_DESC_NUM.unpack_from(self.buffer, base + _VERSION_AT)
            if version == 0:
                self.buffer[base : base + stride] = bytes(stride)
                self._queue(index)._initialise()
            elif version != INFLIGHT_VERSION:
                raise RemoteProtocolError(
                    f"inflight buffer: queue {index} has unknown version {version}"
                )
            elif desc_num != self.queue_size:
                raise RemoteProtocolError(
                    f"inflight buffer: queue {index} holds {desc_num} entries, "
                    f"expected {self.queue_size}"
                )

    @property
    def buffer(self) -> memoryview:
        """The whole buffer; raises :class:`GuestMemoryError` once closed."""
        return self._mapping.buffer

    def _queue(self, index: int) -> SplitInflightQueue | PackedInflightQueue:
        if not 0 <= index < self.num_queues:
            raise RingError(f"queue {index} is outside the inflight buffer of {self.num_queues}")
        queue = self._queues.get(index)
        if queue is None:
            base = index * _queue_region_size(self.queue_size, packed=self.packed)
            queue = (
                PackedInflightQueue(self, base) if self.packed else SplitInflightQueue(self, base)
            )
            self._queues[index] = queue
        return queue

    def split_queue(self, index: int) -> SplitInflightQueue:
        """Tracking for split virtqueue ``index``."""
        queue = self._queue(index)
        if not isinstance(queue, SplitInflightQueue):
            raise RingError("the inflight buffer has the packed layout")
        return queue

    def packed_queue(self, index: int) -> PackedInflightQueue:
        """Tracking for packed virtqueue ``index``."""
        queue = self._queue(index)
        if not isinstance(queue, PackedInflightQueue):
            raise RingError("the inflight buffer has the split layout")
        return queue

    def close(self) -> None:
        """Unmap the buffer and close :attr:`fd`.  Safe to call repeatedly."""
        self._mapping.close()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
