"""Guest memory shared by the front-end: regions, their mappings and the memory table.

Theory of operation (vhost-user spec, "Memory access"):

* The front-end describes guest RAM as a table of regions
  (``SET_MEM_TABLE``, or one at a time with ``ADD_MEM_REG`` / ``REM_MEM_REG``
  once ``CONFIGURE_MEM_SLOTS`` is negotiated).  Each region carries a
  guest-physical address (GPA), a size, the front-end's own virtual address
  of the region (``userspace_addr``, UVA) and the offset of the region inside
  the file descriptor sent with it.  :class:`GuestMemory` maps each fd
  ``MAP_SHARED`` read/write (:class:`FdMapping`) and translates both kinds of
  address into writable :class:`memoryview` slices of the mapping.  Ring
  addresses from ``SET_VRING_ADDR`` are UVAs (:meth:`GuestMemory.uva_to_gpa`);
  descriptor addresses are GPAs (:meth:`GuestMemory.view`).
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
* The table's size limit is the caller's: the protocol that fills the table
  decides how many regions it may hold.
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

from pyvdpa.errors import GuestMemoryError

__all__ = [
    "MAX_MEM_SLOTS",
    "FdMapping",
    "GuestMemory",
    "MemoryRegion",
]

MAX_MEM_SLOTS = 509
"""Memory slots a back-end offers with ``CONFIGURE_MEM_SLOTS`` (QEMU's KVM limit)."""

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

    ``max_regions`` bounds the table and is the caller's to give: the
    vhost-user protocol's limit (8) for plain ``SET_MEM_TABLE``,
    :data:`MAX_MEM_SLOTS` when the back-end offers that many slots with
    ``CONFIGURE_MEM_SLOTS``.

    File descriptors passed in stay owned by the caller, who may close them
    right after the call: each mapping holds its own duplicate.

    Table changes swap an immutable snapshot, so a translation running
    concurrently sees either the old or the new table; changes themselves
    are serialised by a lock.
    """

    def __init__(self, max_regions: int) -> None:
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
