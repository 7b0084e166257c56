"""The I/O TLB of a device behind an IOMMU.

Theory of operation (vhost-user spec, "IOMMU support";
``VIRTIO_F_ACCESS_PLATFORM``):

* The device then sees I/O virtual addresses (IOVAs), and the front-end
  maps them to its own virtual addresses page by page with ``IOTLB_MSG``
  UPDATE and INVALIDATE.  :class:`Iotlb` keeps those entries (coalesced:
  a Linux guest maps a buffer spanning two pages as two entries).
* :class:`IotlbAddressSpace` views an IOVA range through the IOTLB and then
  :meth:`GuestMemory.uva_view <pyvdpa.memory.regions.GuestMemory.uva_view>`,
  checking the entry's permission (:class:`IotlbPerm`) against the access.
  An address with no entry raises :class:`~pyvdpa.errors.IotlbMissError`,
  which is not the driver's fault: the back-end asks for the translation
  and retries.  A forbidden access raises
  :class:`~pyvdpa.errors.IotlbPermissionError`.  A range whose pages are
  not contiguous in the front-end's address space cannot be one view and
  is refused as outside memory.
"""

from __future__ import annotations

import bisect
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from enum import IntEnum

from pyvdpa.errors import GuestMemoryError, IotlbMissError, IotlbPermissionError
from pyvdpa.memory.regions import GuestMemory, _check_range

__all__ = ["Iotlb", "IotlbAddressSpace", "IotlbEntry", "IotlbPerm"]


class IotlbPerm(IntEnum):
    """Access permissions of an IOTLB entry (``VHOST_ACCESS_*``).

    vhost-user's ``IOTLB_MSG``, vhost-vdpa and VDUSE use the same values.
    """

    NONE = 0
    RO = 1
    WO = 2
    RW = 3


_READ = int(IotlbPerm.RO)
_WRITE = int(IotlbPerm.WO)


@dataclass(frozen=True, slots=True)
class IotlbEntry:
    """One IOTLB translation: ``[iova, iova + size)`` is front-end virtual ``uaddr`` onwards."""

    iova: int
    size: int
    uaddr: int
    perm: IotlbPerm

    @property
    def end(self) -> int:
        """One past the last I/O virtual address covered."""
        return self.iova + self.size

    def allows(self, write: bool) -> bool:
        """Whether the entry permits a device write (``write``) or read."""
        return bool(int(self.perm) & (_WRITE if write else _READ))


def _coalesce(entries: Sequence[IotlbEntry]) -> tuple[IotlbEntry, ...]:
    """Merge neighbours contiguous in both IOVA and front-end address with equal perms."""
    merged: list[IotlbEntry] = []
    for entry in entries:
        if merged:
            last = merged[-1]
            if (
                last.end == entry.iova
                and last.uaddr + last.size == entry.uaddr
                and last.perm == entry.perm
            ):
                merged[-1] = IotlbEntry(last.iova, last.size + entry.size, last.uaddr, last.perm)
                continue
        merged.append(entry)
    return tuple(merged)


def _cut(entries: Sequence[IotlbEntry], iova: int, end: int) -> list[IotlbEntry]:
    """``entries`` without ``[iova, end)``: overlapping entries are trimmed or split."""
    kept: list[IotlbEntry] = []
    for entry in entries:
        if entry.end <= iova or entry.iova >= end:
            kept.append(entry)
            continue
        if entry.iova < iova:
            kept.append(IotlbEntry(entry.iova, iova - entry.iova, entry.uaddr, entry.perm))
        if entry.end > end:
            skip = end - entry.iova
            kept.append(IotlbEntry(end, entry.end - end, entry.uaddr + skip, entry.perm))
    return kept


class Iotlb:
    """The I/O TLB a front-end with an IOMMU fills (``IOTLB_MSG`` UPDATE / INVALIDATE).

    Entries never overlap: an UPDATE replaces whatever the range held (the
    front-end's IOMMU has one mapping per address).  They are kept sorted by
    IOVA and coalesced, so a buffer the driver mapped page by page still
    translates as one range.  Changes swap an immutable tuple under a lock:
    a translation running concurrently sees the table before or after a
    change, never half of it.  :attr:`generation` moves on every change.
    """

    def __init__(self) -> None:
        # Entries and their start addresses, swapped together as one tuple.
        self._state: tuple[tuple[IotlbEntry, ...], tuple[int, ...]] = ((), ())
        self._generation = 0
        self._lock = threading.Lock()

    @property
    def generation(self) -> int:
        """A counter bumped by every update, invalidation and clear."""
        return self._generation

    def __len__(self) -> int:
        return len(self._state[0])

    def snapshot(self) -> tuple[IotlbEntry, ...]:
        """The entries, sorted by IOVA, coalesced.

        Neighbours contiguous in both IOVA and front-end address, with equal
        permissions, are one entry.
        """
        return self._state[0]

    def update(self, iova: int, size: int, uaddr: int, perm: IotlbPerm) -> None:
        """Map ``[iova, iova + size)`` to ``uaddr`` with ``perm`` (``IOTLB_MSG`` UPDATE).

        Raises :class:`GuestMemoryError` for a zero size, no access permission
        or a range passing 2**64.
        """
        _check_range("I/O virtual address", iova, size)
        _check_range("IOTLB front-end address", uaddr, size)
        if size == 0:
            raise GuestMemoryError(f"IOTLB update at {iova:#x} has size 0")
        perm = IotlbPerm(perm)
        if perm is IotlbPerm.NONE:
            raise GuestMemoryError(f"IOTLB update at {iova:#x} grants no access")
        entry = IotlbEntry(iova, size, uaddr, perm)
        with self._lock:
            kept = _cut(self._state[0], iova, iova + size)
            kept.insert(bisect.bisect_left([e.iova for e in kept], iova), entry)
            self._install(_coalesce(kept))

    def invalidate(self, iova: int, size: int) -> None:
        """Drop every translation of ``[iova, iova + size)`` (``IOTLB_MSG`` INVALIDATE).

        Entries partly inside are trimmed, or split in two around the range.
        """
        _check_range("I/O virtual address", iova, size)
        if size == 0:
            raise GuestMemoryError(f"IOTLB invalidation at {iova:#x} has size 0")
        with self._lock:
            self._install(_coalesce(_cut(self._state[0], iova, iova + size)))

    def clear(self) -> None:
        """Drop every entry."""
        with self._lock:
            self._install(())

    def covers(self, iova: int) -> bool:
        """Whether ``iova`` has a translation."""
        return self._find(*self._state, iova) is not None

    def translate(self, iova: int, length: int, *, write: bool) -> int:
        """The front-end virtual address of ``[iova, iova + length)`` for a device access.

        ``length`` may be 0, but ``iova`` itself must be translated.  Raises
        :class:`~pyvdpa.errors.IotlbMissError` at the first address without
        an entry, :class:`~pyvdpa.errors.IotlbPermissionError` when an entry
        forbids the access, and :class:`GuestMemoryError` when the range is
        invalid or its pages are not contiguous in front-end memory.
        """
        _check_range("I/O virtual address", iova, length)
        entries, starts = self._state
        end = iova + max(length, 1)
        i = self._find(entries, starts, iova)
        if i is None:
            raise IotlbMissError(iova, write=write)
        first = entries[i]
        uaddr = first.uaddr + iova - first.iova
        at = iova
        while True:
            entry = entries[i]
            if not entry.allows(write):
                raise IotlbPermissionError(at, write=write)
            if entry.end >= end:
                return uaddr
            at = entry.end
            i += 1
            if i == len(entries) or entries[i].iova != at:
                raise IotlbMissError(at, write=write)
            if entries[i].uaddr != uaddr + at - iova:
                raise GuestMemoryError(
                    f"I/O virtual range [{iova:#x}, {iova + length:#x}) is not contiguous "
                    "in front-end memory"
                )

    def uaddr_ranges(self, iova: int, length: int) -> list[tuple[int, int, int]]:
        """``(offset, size, uaddr)`` for every translated part of ``[iova, iova + length)``.

        ``offset`` counts from ``iova``; untranslated parts are left out and
        permissions are not checked.
        """
        _check_range("I/O virtual address", iova, length)
        entries, starts = self._state
        end = iova + length
        parts = []
        i = max(bisect.bisect_right(starts, iova) - 1, 0)
        for entry in entries[i:]:
            if entry.iova >= end:
                break
            start, stop = max(iova, entry.iova), min(end, entry.end)
            if start < stop:
                parts.append((start - iova, stop - start, entry.uaddr + start - entry.iova))
        return parts

    @staticmethod
    def _find(entries: tuple[IotlbEntry, ...], starts: tuple[int, ...], iova: int) -> int | None:
        i = bisect.bisect_right(starts, iova) - 1
        if i >= 0 and iova < entries[i].end:
            return i
        return None

    def _install(self, entries: tuple[IotlbEntry, ...]) -> None:
        # One store publishes both tuples, so readers never pair old and new.
        self._state = (entries, tuple(e.iova for e in entries))
        self._generation += 1


class IotlbAddressSpace:
    """Guest memory as a device behind an IOMMU sees it: IOVA, then IOTLB, then front-end memory.

    Implements the ring layer's :class:`~pyvdpa.virtio.ring.AddressSpace`;
    :meth:`view` checks the IOTLB permission against ``write``.
    """

    __slots__ = ("iotlb", "memory")

    def __init__(self, iotlb: Iotlb, memory: GuestMemory) -> None:
        self.iotlb = iotlb
        self.memory = memory

    def view(self, addr: int, length: int, *, write: bool = True) -> memoryview:
        """Return a writable view of I/O virtual ``[addr, addr + length)``.

        ``write`` says whether the device will write the range (or only read
        it); raises :class:`~pyvdpa.errors.IotlbMissError` when a translation
        is missing and :class:`GuestMemoryError` for anything else.
        """
        uaddr = self.iotlb.translate(addr, length, write=write)
        return self.memory.uva_view(uaddr, length)
