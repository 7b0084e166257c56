"""An I/O virtual address space made of files mapped into this process.

Theory of operation (Linux ``vduse.h``, "VDUSE_IOTLB_GET_FD"): a VDUSE
device reaches the driver's memory through IOVAs.  The kernel hands out,
per IOVA range, a file descriptor and an offset (the bounce buffer of
virtio_vdpa, the coherent allocations of the rings, or the memory a
vhost-vdpa user mapped); the device maps that file and finds its bytes
there.  :class:`IovaSpace` keeps those mappings, sorted by IOVA and never
overlapping, and translates device ranges into views with the mapping's
permission checked, like :class:`~pyvdpa.memory.GuestMemory` does for a
memory table.  A range must lie inside one mapping: two mappings adjacent
in IOVA are separate files here.

:meth:`IovaSpace.unmap` drops the mappings a range touches (the control
plane stops the rings using them first); a mapping a buffer view still
holds is closed once the view is gone.  :meth:`IovaSpace.host_rows` gives
the compiled data path its translation table: IOVA, size, host address,
access.  A ``resolver`` maps ranges on first use: a view of an IOVA no
mapping holds asks it first (VDUSE's bounce buffer appears in the kernel's
IOTLB only once the driver maps its first buffer, with no message to the
device).
"""

from __future__ import annotations

import bisect
import mmap
import threading
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from pyvdpa.errors import GuestMemoryError, IotlbPermissionError
from pyvdpa.memory.iotlb import IotlbPerm

__all__ = ["IovaMapping", "IovaSpace"]

_U64_LIMIT = 1 << 64


@dataclass(eq=False)
class IovaMapping:
    """One mapped IOVA range: ``[iova, iova + size)`` at ``host`` in this process."""

    iova: int
    size: int
    perm: IotlbPerm
    mapping: mmap.mmap
    #: Where ``iova`` lies in ``mapping`` (file offsets are mapped from a page boundary).
    base: int
    #: The host address of ``iova``.
    host: int

    @property
    def end(self) -> int:
        """First IOVA past the range."""
        return self.iova + self.size


class IovaSpace:
    """IOVA ranges backed by mapped files; an :class:`~pyvdpa.virtio.ring.AddressSpace`."""

    def __init__(self, resolver: Callable[[int], object] | None = None) -> None:
        #: Called with an IOVA no mapping holds, to map it (e.g. from VDUSE_IOTLB_GET_FD).
        self.resolver = resolver
        self._maps: list[IovaMapping] = []
        self._starts: list[int] = []
        self._retired: list[mmap.mmap] = []
        self._lock = threading.Lock()
        #: Bumped by every change.
        self.generation = 0

    @property
    def mappings(self) -> tuple[IovaMapping, ...]:
        """The mappings, by IOVA."""
        with self._lock:
            return tuple(self._maps)

    def map(self, iova: int, size: int, fd: int, offset: int, perm: IotlbPerm) -> IovaMapping:
        """Map ``size`` bytes of ``fd`` at ``offset`` as ``[iova, iova + size)``.

        Raises :class:`~pyvdpa.errors.GuestMemoryError` for an empty range,
        one past 2**64, one overlapping a mapping, no permission, or a file
        that cannot be mapped.
        """
        if size <= 0 or iova < 0 or iova + size > _U64_LIMIT:
            raise GuestMemoryError(f"IOVA range [{iova:#x}, +{size:#x}) is empty or past 2**64")
        if perm is IotlbPerm.NONE:
            raise GuestMemoryError(f"IOVA range at {iova:#x} allows no access")
        prot = (mmap.PROT_READ if perm & IotlbPerm.RO else 0) | (
            mmap.PROT_WRITE if perm & IotlbPerm.WO else 0
        )
        if prot & mmap.PROT_WRITE:
            # A shared writable mapping must be readable too on x86.
            prot |= mmap.PROT_READ
        with self._lock:
            at = bisect.bisect_right(self._starts, iova)
            before = self._maps[at - 1] if at else None
            after = self._maps[at] if at < len(self._maps) else None
            if (before is not None and before.end > iova) or (
                after is not None and after.iova < iova + size
            ):
                raise GuestMemoryError(f"IOVA range [{iova:#x}, +{size:#x}) overlaps a mapping")
            base = offset % mmap.ALLOCATIONGRANULARITY
            try:
                mapped = mmap.mmap(fd, base + size, mmap.MAP_SHARED, prot, offset=offset - base)
            except (OSError, ValueError, OverflowError) as exc:
                raise GuestMemoryError(
                    f"cannot map IOVA range [{iova:#x}, +{size:#x}) at offset {offset:#x}: {exc}"
                ) from exc
            host = int(np.frombuffer(mapped, dtype=np.uint8).ctypes.data) + base
            entry = IovaMapping(iova, size, perm, mapped, base, host)
            self._maps.insert(at, entry)
            self._starts.insert(at, iova)
            self.generation += 1
        return entry

    def covers(self, iova: int, size: int = 1) -> bool:
        """Whether one mapping holds ``[iova, iova + size)``."""
        with self._lock:
            return self._find(iova, size) is not None

    def _find(self, iova: int, size: int) -> IovaMapping | None:
        at = bisect.bisect_right(self._starts, iova) - 1
        if at < 0:
            return None
        entry = self._maps[at]
        return entry if iova + max(size, 0) <= entry.end else None

    def view(self, addr: int, length: int, *, write: bool = True) -> memoryview:
        """A view of device range ``[addr, addr + length)``, inside one mapping.

        Raises :class:`~pyvdpa.errors.GuestMemoryError` when no mapping holds
        the whole range, :class:`~pyvdpa.errors.IotlbPermissionError` when
        the mapping forbids the access.
        """
        if length < 0 or addr < 0:
            raise GuestMemoryError(f"IOVA range [{addr:#x}, +{length:#x}) is invalid")
        resolver = self.resolver
        while True:
            with self._lock:
                entry = self._find(addr, length)
                if entry is not None:
                    needed = IotlbPerm.WO if write else IotlbPerm.RO
                    if not entry.perm & needed:
                        raise IotlbPermissionError(addr, write=write)
                    start = entry.base + addr - entry.iova
                    return memoryview(entry.mapping)[start : start + length]
            if resolver is None:
                raise GuestMemoryError(f"IOVA range [{addr:#x}, +{length:#x}) is not mapped")
            # Mapped on first use, once; outside the lock, which mapping takes.
            resolver(addr)
            resolver = None

    def host_rows(self) -> list[tuple[int, int, int, int, int]]:
        """(IOVA, size, host address, access, IOVA) per mapping, for compiled data paths."""
        with self._lock:
            return [(m.iova, m.size, m.host, int(m.perm), m.iova) for m in self._maps]

    def unmap(self, start: int, last: int) -> int:
        """Drop every mapping that touches ``[start, last]``; return how many went."""
        with self._lock:
            keep = [m for m in self._maps if m.end <= start or m.iova > last]
            gone = [m for m in self._maps if not (m.end <= start or m.iova > last)]
            self._maps = keep
            self._starts = [m.iova for m in keep]
            if gone:
                self.generation += 1
            self._retire([m.mapping for m in gone])
        return len(gone)

    def clear(self) -> None:
        """Drop every mapping."""
        self.unmap(0, _U64_LIMIT - 1)

    def _retire(self, mappings: list[mmap.mmap]) -> None:
        pending = [*self._retired, *mappings]
        self._retired = []
        for mapped in pending:
            try:
                mapped.close()
            except BufferError:
                # A view still uses it: closed on a later change, or when dropped.
                self._retired.append(mapped)
