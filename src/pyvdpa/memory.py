"""Guest memory shared by the front-end, the dirty-page log, and shared allocations.

Theory of operation (vhost-user spec, "Memory access" and "Migration"):

* The front-end describes guest RAM as a table of regions
  (``SET_MEM_TABLE``, or one at a time with ``ADD_MEM_REG`` / ``REM_MEM_REG``
  once ``CONFIGURE_MEM_SLOTS`` is negotiated).  Each region carries a
  guest-physical address (GPA), a size, the front-end's own virtual address
  of the region (``userspace_addr``, UVA) and the offset of the region inside
  the file descriptor sent with it.  :class:`GuestMemory` maps each fd
  ``MAP_SHARED`` read/write and translates both kinds of address into
  writable :class:`memoryview` slices of the mapping.  Ring addresses from
  ``SET_VRING_ADDR`` are UVAs (:meth:`GuestMemory.uva_to_gpa`); descriptor
  addresses are GPAs (:meth:`GuestMemory.view`).
* An access is accepted only when the whole ``[addr, addr + length)`` range
  lies inside a single region: the front-end is free to place regions
  side by side, but nothing guarantees they are side by side in our address
  space, so a buffer straddling two regions is refused rather than split.
* The table can change at any time.  Every change bumps
  :attr:`GuestMemory.generation`, so holders of translated views know to
  translate again.  Views handed out for a region are released when the
  region is unmapped: using one afterwards raises :class:`ValueError`
  instead of touching memory that is gone.  Holders should drop their views
  (and anything exported from them, such as ``numpy.frombuffer`` arrays)
  before a table change; a mapping whose views are still exported elsewhere
  is kept on a pending list and unmapped on a later change or on
  :meth:`GuestMemory.close`.
* Migration: with ``LOG_SHMFD`` the front-end shares a bitmap with one bit
  per 4096-byte guest-physical page (:class:`DirtyLog`); the back-end sets
  the bit of every page it writes.
* IOMMU (vhost-user spec, "IOMMU support"; ``VIRTIO_F_ACCESS_PLATFORM``):
  the device then sees I/O virtual addresses (IOVAs), and the front-end
  maps them to its own virtual addresses page by page with ``IOTLB_MSG``
  UPDATE and INVALIDATE.  :class:`Iotlb` keeps those entries (coalesced:
  a Linux guest maps a buffer spanning two pages as two entries);
  :class:`IotlbAddressSpace` views an IOVA range through the IOTLB and then
  :meth:`GuestMemory.uva_view`, checking the entry's permission against the
  access.  An address with no entry raises :class:`~pyvdpa.errors.IotlbMissError`,
  which is not the driver's fault: the back-end asks for the translation
  and retries.  A forbidden access raises
  :class:`~pyvdpa.errors.IotlbPermissionError`.  A range whose pages are
  not contiguous in the front-end's address space cannot be one view and
  is refused as outside memory.  :class:`IotlbDirtyLog` logs IOVAs at the
  guest-physical pages behind them (IOVA, front-end address, GPA), as DPDK
  does.
* The front-end role needs memory it can share: :func:`allocate_shared`
  creates a memfd mapping and reports its virtual address, which is what a
  front-end sends as ``userspace_addr``.
"""

from __future__ import annotations

import bisect
import ctypes
import mmap
import os
import stat
import threading
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Self

from pyvdpa.errors import GuestMemoryError, IotlbMissError, IotlbPermissionError
from pyvdpa.vhost_user.protocol import MAX_MEM_REGIONS, IotlbPerm

__all__ = [
    "LOG_PAGE_SIZE",
    "MAX_MEM_SLOTS",
    "DirtyLog",
    "FdMapping",
    "GuestMemory",
    "Iotlb",
    "IotlbAddressSpace",
    "IotlbDirtyLog",
    "IotlbEntry",
    "MemoryRegion",
    "SharedMemory",
    "allocate_shared",
]

MAX_MEM_SLOTS = 509
"""Memory slots a back-end offers with ``CONFIGURE_MEM_SLOTS`` (QEMU's KVM limit)."""

LOG_PAGE_SIZE = 0x1000
"""Bytes of guest-physical memory covered by one bit of the dirty log (``VHOST_LOG_PAGE``)."""

_LOG_PAGE_SHIFT = 12
_ADDRESS_LIMIT = 1 << 64


@dataclass(frozen=True, slots=True)
class MemoryRegion:
    """One region of a memory table, as the front-end describes it.

    ``userspace_addr`` is the front-end's virtual address of the region;
    ``mmap_offset`` is where the region starts inside the fd sent with it.
    """

    guest_phys_addr: int
    memory_size: int
    userspace_addr: int
    mmap_offset: int


class FdMapping:
    """A read/write ``MAP_SHARED`` mapping of ``[offset, offset + size)`` of a file descriptor.

    The caller keeps ownership of ``fd``: :class:`mmap.mmap` duplicates it,
    and the duplicate lives exactly as long as the mapping.  ``offset`` need
    not be page-aligned: the mapping starts at ``offset`` rounded down to the
    file's mapping granule (the page size, or the huge page size on
    hugetlbfs) and the remainder is skipped.

    Raises :class:`GuestMemoryError` if ``size`` is not positive, if a
    regular file (memfd included) is shorter than ``offset + size``, or if
    the fd cannot be mapped shared and writable (closed fd, pipe, socket,
    read-only file...).
    """

    __slots__ = ("_base", "_mmap", "_skip", "_views", "offset", "size")

    def __init__(self, fd: int, size: int, offset: int = 0) -> None:
        if size <= 0:
            raise GuestMemoryError(f"cannot map {size} bytes: the size must be positive")
        if offset < 0 or offset + size > _ADDRESS_LIMIT:
            raise GuestMemoryError(
                f"cannot map {size} bytes at offset {offset:#x}: outside a 64-bit file"
            )
        try:
            st = os.fstat(fd)
        except OSError as exc:
            raise GuestMemoryError(f"cannot map fd {fd}: {exc.strerror}") from exc
        granule = mmap.ALLOCATIONGRANULARITY
        # hugetlbfs reports its huge page size here, and refuses mappings that
        # do not start on a huge page boundary.
        if st.st_blksize > granule and st.st_blksize % granule == 0:
            granule = st.st_blksize
        start = offset - offset % granule
        length = offset - start + size
        if stat.S_ISREG(st.st_mode):
            if offset + size > st.st_size:
                raise GuestMemoryError(
                    f"fd {fd} holds {st.st_size} bytes; cannot map {size} bytes at "
                    f"offset {offset:#x}"
                )
            # Rounding up keeps hugetlbfs happy; the file bounds it for the rest.
            length = min(-(-length // granule) * granule, st.st_size - start)
        try:
            self._mmap = mmap.mmap(
                fd,
                length,
                flags=mmap.MAP_SHARED,
                prot=mmap.PROT_READ | mmap.PROT_WRITE,
                offset=start,
            )
        except (OSError, ValueError, OverflowError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) else str(exc)
            raise GuestMemoryError(
                f"cannot map fd {fd} shared and writable ({size} bytes at offset "
                f"{offset:#x}): {reason}"
            ) from exc
        self.offset = offset
        self.size = size
        self._skip = offset - start
        self._base: memoryview | None = memoryview(self._mmap)[self._skip : self._skip + size]
        self._views: dict[int, weakref.ref[memoryview]] = {}

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` has given up this mapping's memory."""
        return self._base is None

    def _buffer(self) -> memoryview:
        if self._base is None:
            raise GuestMemoryError("the mapping is closed")
        return self._base

    def view(self, start: int, length: int) -> memoryview:
        """Return a writable view of ``length`` bytes at ``start`` (relative to ``offset``).

        The view is tracked and released by :meth:`close`.  The caller has
        checked the bounds.
        """
        view = self._buffer()[start : start + length]
        views = self._views
        ref = weakref.ref(view, lambda r: views.pop(id(r), None))
        views[id(ref)] = ref
        return view

    @property
    def buffer(self) -> memoryview:
        """An untracked view of the whole ``size`` bytes, valid until :meth:`close`."""
        return self._buffer()

    @property
    def address(self) -> int:
        """The virtual address, in this process, of the byte at ``offset``."""
        anchor = ctypes.c_char.from_buffer(self._mmap, self._skip)
        address = ctypes.addressof(anchor)
        # The ctypes object holds an export of the mmap; drop it at once so
        # that it never blocks an unmap.
        del anchor
        return address

    def close(self) -> bool:
        """Release every view handed out and unmap.

        Returns ``False`` if some view is still exported elsewhere (a
        ``numpy`` array, a ``ctypes`` object...), in which case the memory
        stays mapped and no further views can be taken; call again later.
        Safe to call repeatedly.
        """
        if self._base is not None:
            self._base.release()
            self._base = None
        for ref in list(self._views.values()):
            view = ref()
            if view is not None:
                try:
                    view.release()
                except BufferError:
                    return False
        try:
            self._mmap.close()
        except BufferError:
            return False
        return True


@dataclass(frozen=True, slots=True)
class _Slot:
    """A mapped region with its precomputed ends."""

    region: MemoryRegion
    mapping: FdMapping
    gpa_end: int
    uva_end: int


class _Table:
    """An immutable memory table: slots sorted by GPA and by UVA for bisection."""

    __slots__ = ("by_gpa", "by_uva", "gpa_starts", "uva_starts")

    def __init__(self, slots: Sequence[_Slot]) -> None:
        self.by_gpa = tuple(sorted(slots, key=lambda s: s.region.guest_phys_addr))
        self.by_uva = tuple(sorted(slots, key=lambda s: s.region.userspace_addr))
        self.gpa_starts = tuple(s.region.guest_phys_addr for s in self.by_gpa)
        self.uva_starts = tuple(s.region.userspace_addr for s in self.by_uva)

    def find_gpa(self, addr: int, length: int) -> tuple[_Slot, int]:
        _check_range("guest address", addr, length)
        i = bisect.bisect_right(self.gpa_starts, addr) - 1
        if i >= 0:
            slot = self.by_gpa[i]
            if addr < slot.gpa_end and addr + length <= slot.gpa_end:
                return slot, addr - slot.region.guest_phys_addr
        raise GuestMemoryError(
            f"guest address range [{addr:#x}, {addr + length:#x}) is not inside one mapped region"
        )

    def find_uva(self, uva: int, length: int) -> tuple[_Slot, int]:
        _check_range("front-end virtual address", uva, length)
        i = bisect.bisect_right(self.uva_starts, uva) - 1
        if i >= 0:
            slot = self.by_uva[i]
            if uva < slot.uva_end and uva + length <= slot.uva_end:
                return slot, uva - slot.region.userspace_addr
        raise GuestMemoryError(
            f"front-end virtual address range [{uva:#x}, {uva + length:#x}) is not "
            "inside one mapped region"
        )


_EMPTY = _Table(())


def _check_range(what: str, addr: int, length: int) -> None:
    if addr < 0 or length < 0 or addr + length > _ADDRESS_LIMIT:
        raise GuestMemoryError(f"invalid {what} range: address {addr:#x}, length {length}")


def _validate_region(region: MemoryRegion) -> None:
    for name in ("guest_phys_addr", "memory_size", "userspace_addr", "mmap_offset"):
        value = getattr(region, name)
        if not 0 <= value < _ADDRESS_LIMIT:
            raise GuestMemoryError(f"memory region {name} {value:#x} is not a 64-bit value")
    size = region.memory_size
    if size == 0:
        raise GuestMemoryError(f"memory region at {region.guest_phys_addr:#x} has size 0")
    for name in ("guest_phys_addr", "userspace_addr", "mmap_offset"):
        if getattr(region, name) + size > _ADDRESS_LIMIT:
            raise GuestMemoryError(
                f"memory region {name} {getattr(region, name):#x} + size {size:#x} passes 2**64"
            )


def _overlaps(a: MemoryRegion, b: MemoryRegion) -> str | None:
    """Name the address space in which ``a`` and ``b`` overlap, if any."""
    if (
        a.guest_phys_addr < b.guest_phys_addr + b.memory_size
        and b.guest_phys_addr < a.guest_phys_addr + a.memory_size
    ):
        return "guest-physical"
    if (
        a.userspace_addr < b.userspace_addr + b.memory_size
        and b.userspace_addr < a.userspace_addr + a.memory_size
    ):
        return "front-end virtual"
    return None


def _check_disjoint(new: MemoryRegion, others: Sequence[MemoryRegion]) -> None:
    for other in others:
        space = _overlaps(new, other)
        if space is not None:
            raise GuestMemoryError(
                f"memory region at GPA {new.guest_phys_addr:#x} overlaps the region at "
                f"GPA {other.guest_phys_addr:#x} in {space} address space"
            )


def _map_region(region: MemoryRegion, fd: int) -> _Slot:
    mapping = FdMapping(fd, region.memory_size, region.mmap_offset)
    return _Slot(
        region=region,
        mapping=mapping,
        gpa_end=region.guest_phys_addr + region.memory_size,
        uva_end=region.userspace_addr + region.memory_size,
    )


class GuestMemory:
    """The guest memory table shared by the front-end.

    Implements the virtqueue layer's address space: :meth:`view` turns a
    guest-physical range into a writable :class:`memoryview`.  All errors
    are :class:`GuestMemoryError`.

    ``max_regions`` bounds the table: :data:`~pyvdpa.vhost_user.protocol.MAX_MEM_REGIONS`
    (8) for plain ``SET_MEM_TABLE``, :data:`MAX_MEM_SLOTS` when the back-end
    offers that many slots with ``CONFIGURE_MEM_SLOTS``.

    File descriptors passed in stay owned by the caller, who may close them
    right after the call: each mapping holds its own duplicate.

    Table changes swap an immutable snapshot, so a translation running
    concurrently sees either the old or the new table; changes themselves
    are serialised by a lock.
    """

    def __init__(self, max_regions: int = MAX_MEM_REGIONS) -> None:
        if max_regions <= 0:
            raise ValueError(f"max_regions must be positive, not {max_regions}")
        self.max_regions = max_regions
        self._table = _EMPTY
        self._pending: list[FdMapping] = []
        self._generation = 0
        self._closed = False
        self._lock = threading.Lock()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    @property
    def regions(self) -> tuple[MemoryRegion, ...]:
        """The mapped regions, in guest-physical order."""
        return tuple(slot.region for slot in self._table.by_gpa)

    @property
    def generation(self) -> int:
        """A counter bumped on every table change; re-translate when it moves."""
        return self._generation

    @property
    def pending_unmaps(self) -> int:
        """Removed mappings still held by views exported elsewhere."""
        return len(self._pending)

    def view(self, addr: int, length: int, *, write: bool = True) -> memoryview:
        """Return a writable view of guest-physical ``[addr, addr + length)``.

        ``length`` may be 0, but ``addr`` must still lie inside a region.
        The view is released when its region is unmapped.  ``write`` (the
        access the device means to make) changes nothing: guest-physical
        memory carries no permissions.
        """
        slot, offset = self._table.find_gpa(addr, length)
        return slot.mapping.view(offset, length)

    def uva_to_gpa(self, uva: int, length: int = 1) -> int:
        """Translate a front-end virtual address (as in ``SET_VRING_ADDR``) to a GPA.

        The whole ``[uva, uva + length)`` range must lie inside one region.
        """
        slot, offset = self._table.find_uva(uva, length)
        return slot.region.guest_phys_addr + offset

    def uva_view(self, uva: int, length: int) -> memoryview:
        """Return a writable view of front-end virtual ``[uva, uva + length)``."""
        slot, offset = self._table.find_uva(uva, length)
        return slot.mapping.view(offset, length)

    def read(self, gpa: int, length: int) -> bytes:
        """Copy ``length`` bytes of guest memory at ``gpa``."""
        with self.view(gpa, length) as view:
            return bytes(view)

    def write(self, gpa: int, data: bytes | bytearray | memoryview) -> None:
        """Copy ``data`` into guest memory at ``gpa``."""
        with self.view(gpa, len(data)) as view:
            view[:] = data

    def add_region(self, region: MemoryRegion, fd: int) -> None:
        """Validate and map one region (``ADD_MEM_REG``, or a ``SET_MEM_TABLE`` entry).

        Refused if the size is 0, an address passes 2**64, the region
        overlaps a mapped one in guest-physical or front-end virtual address
        space, the table is full, or ``fd`` cannot be mapped.  The caller
        keeps ownership of ``fd``.
        """
        with self._lock:
            self._check_open()
            _validate_region(region)
            slots = self._table.by_gpa
            if len(slots) >= self.max_regions:
                raise GuestMemoryError(
                    f"memory table full: {len(slots)} of {self.max_regions} regions in use"
                )
            _check_disjoint(region, [slot.region for slot in slots])
            slot = _map_region(region, fd)
            self._install(_Table((*slots, slot)), ())

    def remove_region(self, region: MemoryRegion) -> None:
        """Unmap the region matching ``region`` (``REM_MEM_REG``).

        A region matches on guest address, size and front-end virtual
        address; ``mmap_offset`` is not compared.
        """
        with self._lock:
            slots = self._table.by_gpa
            key = (region.guest_phys_addr, region.memory_size, region.userspace_addr)
            for slot in slots:
                r = slot.region
                if (r.guest_phys_addr, r.memory_size, r.userspace_addr) == key:
                    remaining = tuple(s for s in slots if s is not slot)
                    self._install(_Table(remaining), (slot,))
                    return
            raise GuestMemoryError(
                f"no mapped region at GPA {region.guest_phys_addr:#x} of size "
                f"{region.memory_size:#x} and front-end address {region.userspace_addr:#x}"
            )

    def set_table(self, pairs: Sequence[tuple[MemoryRegion, int]]) -> None:
        """Replace the whole table (``SET_MEM_TABLE``), all or nothing.

        Every new region is validated and mapped before the old table goes;
        on any failure the new mappings are undone and the old table stays
        in force.  The caller keeps ownership of the fds.
        """
        with self._lock:
            self._check_open()
            if len(pairs) > self.max_regions:
                raise GuestMemoryError(
                    f"memory table of {len(pairs)} regions exceeds the limit of {self.max_regions}"
                )
            regions = [region for region, _ in pairs]
            for i, region in enumerate(regions):
                _validate_region(region)
                _check_disjoint(region, regions[:i])
            mapped: list[_Slot] = []
            try:
                for region, fd in pairs:
                    mapped.append(_map_region(region, fd))
            except BaseException:
                for slot in mapped:
                    slot.mapping.close()
                raise
            self._install(_Table(mapped), self._table.by_gpa)

    def clear(self) -> None:
        """Unmap every region (the table becomes empty)."""
        with self._lock:
            self._install(_EMPTY, self._table.by_gpa)

    def close(self) -> None:
        """Unmap everything; the table accepts no new regions afterwards.

        A mapping still exported elsewhere is left to the garbage collector,
        which unmaps it once the last export goes away.
        """
        with self._lock:
            self._install(_EMPTY, self._table.by_gpa)
            self._closed = True
            self._pending.clear()

    def _check_open(self) -> None:
        if self._closed:
            raise GuestMemoryError("guest memory is closed")

    def _install(self, table: _Table, removed: Sequence[_Slot]) -> None:
        """Publish ``table``, then unmap ``removed`` and retry pending unmaps."""
        self._table = table
        self._generation += 1
        self._pending = [
            mapping
            for mapping in (*self._pending, *(slot.mapping for slot in removed))
            if not mapping.close()
        ]


class SharedMemory:
    """Anonymous shared memory (a memfd) mapped read/write in this process.

    This is what a front-end shares with a back-end: send :attr:`fd` with a
    region whose ``userspace_addr`` is :attr:`address`.  The object owns the
    fd and closes it in :meth:`close`.
    """

    __slots__ = ("_mapping", "address", "fd", "size")

    def __init__(self, fd: int, size: int) -> None:
        self._mapping = FdMapping(fd, size)
        self.fd = fd
        self.size = size
        self.address = self._mapping.address

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    @property
    def buf(self) -> memoryview:
        """A writable view of the whole memory, released by :meth:`close`."""
        return self._mapping.view(0, self.size)

    def close(self) -> None:
        """Unmap and close the fd.  Safe to call repeatedly.

        A view still exported elsewhere keeps the memory mapped until the
        garbage collector drops it.
        """
        self._mapping.close()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def allocate_shared(size: int, name: str = "pyvdpa") -> SharedMemory:
    """Create ``size`` bytes of zeroed shared memory backed by a close-on-exec memfd.

    Raises :class:`GuestMemoryError` if ``size`` is not positive or the
    memfd cannot be created or mapped.
    """
    if size <= 0:
        raise GuestMemoryError(f"cannot allocate {size} bytes of shared memory")
    try:
        fd = os.memfd_create(name, os.MFD_CLOEXEC)
    except OSError as exc:
        raise GuestMemoryError(f"memfd_create failed: {exc.strerror}") from exc
    try:
        os.ftruncate(fd, size)
        return SharedMemory(fd, size)
    except OSError as exc:
        os.close(fd)
        raise GuestMemoryError(f"cannot size a memfd to {size} bytes: {exc.strerror}") from exc
    except GuestMemoryError:
        os.close(fd)
        raise


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
