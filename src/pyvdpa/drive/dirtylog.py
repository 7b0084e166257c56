"""Whether a back-end logged every page it wrote: the check of ``pyvdpa drive net --log-all``.

Theory of operation (vhost-user spec, "Migration"): a front-end that
migrates its guest sets ``VHOST_F_LOG_ALL``, shares a bitmap with one bit
per 4 KiB guest-physical page (SET_LOG_BASE with ``LOG_SHMFD``) and gives
each ring's log address in SET_VRING_ADDR (``VHOST_VRING_F_LOG``).  From
then on the back-end sets the bit of every page it writes: the bytes it puts
into buffers and its used-ring entries.  A page written but not logged is a
page the VMM does not send again, stale on the destination.

The driver's memory starts zeroed and the driver never writes what the
device writes (receive buffers, split used rings), so once the rings have
stopped, every page in which such an area holds a non-zero byte is a page
the device wrote.  On a packed ring driver and device write the same
descriptors; a descriptor whose AVAIL and USED flags are equal (and that is
not all zero, as every slot starts) was written last by the device.  Each of
those pages must be marked in the bitmap.  A page the device filled with
zeroes only is not seen: the check can overlook a missing bit, and it never
reports a logged page as missing.

The functions here read memory through a callable and hold no state.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from pyvdpa.memory.dirty import LOG_PAGE_SIZE, page_logged
from pyvdpa.virtio.ring import DescFlag

__all__ = ["LogCoverage", "coverage", "device_written_pages"]

#: Reads ``size`` bytes of driver memory at a guest-physical address.
Reader = Callable[[int, int], bytes]

_PACKED_DESC = struct.Struct("<QIHH")
_USED_FLAGS = int(DescFlag.AVAIL | DescFlag.USED)


@dataclass(frozen=True, slots=True)
class LogCoverage:
    """Pages the device was seen writing, and those of them the bitmap lacks."""

    written: int
    missing: tuple[int, ...]


def _pages(start: int, size: int) -> range:
    """Guest-physical page numbers of ``[start, start + size)``."""
    return range(start // LOG_PAGE_SIZE, (start + size - 1) // LOG_PAGE_SIZE + 1)


def device_written_pages(
    read: Reader, areas: Iterable[tuple[int, int]], packed_rings: Iterable[tuple[int, int]]
) -> set[int]:
    """Page numbers the device left its writes in.

    ``areas`` are ``(gpa, size)`` ranges only the device writes; ``packed_rings``
    are ``(gpa, slots)`` descriptor rings of packed queues.
    """
    pages: set[int] = set()
    for start, size in areas:
        for page in _pages(start, size):
            low = max(start, page * LOG_PAGE_SIZE)
            high = min(start + size, (page + 1) * LOG_PAGE_SIZE)
            if any(read(low, high - low)):
                pages.add(page)
    for start, slots in packed_rings:
        ring = read(start, slots * _PACKED_DESC.size)
        for slot, (addr, length, head, flags) in enumerate(_PACKED_DESC.iter_unpack(ring)):
            used = flags & _USED_FLAGS
            if (addr or length or head or flags) and used in (0, _USED_FLAGS):
                pages.add((start + slot * _PACKED_DESC.size) // LOG_PAGE_SIZE)
    return pages


def coverage(bitmap: bytes | memoryview, pages: Iterable[int]) -> LogCoverage:
    """Check ``pages`` (page numbers) against ``bitmap``; the missing ones as GPAs, in order."""
    seen = sorted(set(pages))
    missing = tuple(
        page * LOG_PAGE_SIZE for page in seen if not page_logged(bitmap, page * LOG_PAGE_SIZE)
    )
    return LogCoverage(len(seen), missing)
