"""The migration dirty-page log.

Theory of operation (vhost-user spec, "Migration"):

* With ``LOG_SHMFD`` the front-end shares a bitmap with one bit per
  4096-byte guest-physical page (:class:`DirtyLog`); the back-end sets the
  bit of every page it writes.
* Behind an IOMMU (``VIRTIO_F_ACCESS_PLATFORM``) the addresses a device
  writes are IOVAs.  :class:`IotlbDirtyLog` logs them at the guest-physical
  pages behind them (IOVA, front-end address, GPA), as DPDK does.
"""

from __future__ import annotations

import threading

from pyvdpa.errors import GuestMemoryError
from pyvdpa.memory.iotlb import IotlbAddressSpace
from pyvdpa.memory.regions import FdMapping

__all__ = ["LOG_PAGE_SIZE", "DirtyLog", "IotlbDirtyLog", "log_size", "page_logged"]

LOG_PAGE_SIZE = 0x1000
"""Bytes of guest-physical memory covered by one bit of the dirty log (``VHOST_LOG_PAGE``)."""

_LOG_PAGE_SHIFT = 12


def log_size(memory_end: int) -> int:
    """Bytes of bitmap covering guest-physical ``[0, memory_end)``, in whole 64-bit words."""
    pages = -(-memory_end // LOG_PAGE_SIZE)
    return -(-pages // 64) * 8


def page_logged(bitmap: bytes | memoryview, gpa: int) -> bool:
    """Whether ``bitmap`` marks the page of guest-physical ``gpa`` dirty (not past its end)."""
    pfn = gpa >> _LOG_PAGE_SHIFT
    byte = pfn >> 3
    return byte < len(bitmap) and bool(bitmap[byte] & (1 << (pfn & 7)))


class DirtyLog:
    """The migration dirty-page bitmap shared with ``SET_LOG_BASE`` (``LOG_SHMFD``).

    Bit ``pfn & 7`` of byte ``pfn >> 3`` marks guest-physical page ``pfn``
    (4096 bytes) dirty.  Pages past the end of the bitmap are not written;
    they are counted in :attr:`out_of_range`.

    The front-end harvests the bitmap with atomic exchanges while we set
    bits; Python has no atomic OR on shared memory, so a bit the front-end
    already harvested may be set again, which only makes it send a page
    twice.  Writers in this process are serialised by a lock, so none of
    our own bits is lost.  The caller keeps ownership of ``fd``.
    """

    __slots__ = ("_lock", "_mapping", "out_of_range")

    def __init__(self, fd: int, mmap_size: int, mmap_offset: int) -> None:
        self._mapping = FdMapping(fd, mmap_size, mmap_offset)
        self._lock = threading.Lock()
        self.out_of_range = 0

    @property
    def size(self) -> int:
        """Bytes of bitmap; it covers ``size * 8 * 4096`` bytes of guest memory."""
        return self._mapping.size

    @property
    def address(self) -> int:
        """The bitmap's virtual address in this process, for compiled writers."""
        return self._mapping.address

    def log_write(self, gpa: int, length: int) -> None:
        """Mark every page touched by guest-physical ``[gpa, gpa + length)`` dirty."""
        if gpa < 0 or length < 0:
            raise GuestMemoryError(f"invalid dirty range: address {gpa:#x}, length {length}")
        if length == 0:
            return
        first = gpa >> _LOG_PAGE_SHIFT
        last = (gpa + length - 1) >> _LOG_PAGE_SHIFT
        limit = self._mapping.size * 8
        with self._lock:
            if last >= limit:
                self.out_of_range += last - max(first, limit) + 1
                last = limit - 1
            if first > last:
                return
            log = self._mapping.buffer
            first_byte, last_byte = first >> 3, last >> 3
            head = (0xFF << (first & 7)) & 0xFF
            tail = 0xFF >> (7 - (last & 7))
            if first_byte == last_byte:
                log[first_byte] |= head & tail
                return
            log[first_byte] |= head
            if last_byte > first_byte + 1:
                log[first_byte + 1 : last_byte] = b"\xff" * (last_byte - first_byte - 1)
            log[last_byte] |= tail

    def close(self) -> None:
        """Unmap the bitmap.  Safe to call repeatedly."""
        self._mapping.close()


class IotlbDirtyLog:
    """A dirty logger for I/O virtual addresses: IOVA, front-end address, GPA, then the bitmap.

    With ``VIRTIO_F_ACCESS_PLATFORM`` the addresses a queue logs (buffers,
    and the ring log address) are IOVAs; DPDK and Linux vhost translate
    them the same way.  Parts without a translation cannot be logged and
    are counted in :attr:`unlogged`; a device logs only what it just wrote
    through the IOTLB, so this stays 0 unless the front-end invalidated a
    range under a running ring.
    """

    __slots__ = ("log", "space", "unlogged")

    def __init__(self, log: DirtyLog, space: IotlbAddressSpace) -> None:
        self.log = log
        self.space = space
        self.unlogged = 0

    def log_write(self, addr: int, length: int) -> None:
        """Mark the guest-physical pages behind I/O virtual ``[addr, addr + length)`` dirty."""
        memory = self.space.memory
        done = 0
        for _, size, uaddr in self.space.iotlb.uaddr_ranges(addr, length):
            try:
                gpa = memory.uva_to_gpa(uaddr, size)
            except GuestMemoryError:
                continue
            self.log.log_write(gpa, size)
            done += size
        self.unlogged += length - done
