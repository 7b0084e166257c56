"""Device-side virtqueues driven by the compiled kernels.

Theory of operation
-------------------
:class:`CompiledQueue` is the device side of a split (virtio 1.2, section
2.7) or packed (section 2.8) virtqueue whose state lives in a row of 64-bit
integers that the kernels of :mod:`pyvdpa.dataplane.kernels` read and
write.  It implements the :class:`~pyvdpa.virtio.ring.DeviceQueue` protocol
step by step from Python, which is how the tests hold it against
:class:`~pyvdpa.virtio.split.SplitDeviceQueue` and
:class:`~pyvdpa.virtio.packed.PackedDeviceQueue` on the same rings, and the
data-plane engine runs the very same row in bursts on a worker thread.  Only
one of the two may drive a row at a time: the engine owns it between
attaching and detaching it.

Building a queue checks what the Python queues check (sizes, alignment,
base) and translates the ring areas once through
:meth:`pyvdpa.memory.GuestMemory.view`; the region table given to the kernels
lists each mapped region's guest-physical start, size and host address.  The
host addresses stay valid until the memory table changes, and the
vhost-user back-end stops every ring before it changes the table.

A broken ring rule leaves an ``E_*`` code in the row; :func:`ring_error`
turns it into the :class:`~pyvdpa.errors.RingError` subclass the Python
validator raises for the same chain.
"""

from __future__ import annotations

import ctypes
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

from pyvdpa.dataplane import kernels as k
from pyvdpa.device import RingPosition, RingSpec
from pyvdpa.errors import IotlbMissError, RingError
from pyvdpa.memory import DirtyLog, GuestMemory, Iotlb, IotlbAddressSpace, IovaSpace, MemoryRegion
from pyvdpa.virtio.packed import PackedLayout, check_packed_base
from pyvdpa.virtio.ring import (
    AddressSpace,
    AvailIndexError,
    BufferAddressError,
    ChainLayoutError,
    ChainTooLongError,
    DescriptorChain,
    DescriptorIndexError,
    DescriptorLoopError,
    IndirectDescriptorError,
    OutOfOrderError,
    QueueBrokenError,
    RingAreas,
    Segment,
    check_written,
)
from pyvdpa.virtio.split import SplitLayout, check_split_base

__all__ = [
    "CompiledPackedQueue",
    "CompiledQueue",
    "CompiledSplitQueue",
    "Int64Array",
    "host_address",
    "iotlb_table",
    "region_table",
    "ring_error",
]

Int64Array = npt.NDArray[np.int64]

_U64_MASK = (1 << 64) - 1
_WRAP_SHIFT = 15

_ERRORS: dict[int, tuple[type[RingError], str]] = {
    k.E_AVAIL_JUMP: (
        AvailIndexError,
        "avail idx {a} is more than the ring's entries past the next index {b}",
    ),
    k.E_AVAIL_SLOTS: (
        AvailIndexError,
        "chain of {a} slots made available while {b} slots are still in flight",
    ),
    k.E_HEAD_INDEX: (DescriptorIndexError, "head descriptor {a} is not below {b}"),
    k.E_NEXT_INDEX: (DescriptorIndexError, "next descriptor {a} is not below {b}"),
    k.E_ID_INDEX: (DescriptorIndexError, "buffer id {a} is not below {b}"),
    k.E_LOOP: (DescriptorLoopError, "chain revisits a descriptor of a {a}-entry table"),
    k.E_INDIRECT_FEATURE: (
        IndirectDescriptorError,
        "indirect descriptor without VIRTIO_F_INDIRECT_DESC",
    ),
    k.E_INDIRECT_NESTED: (IndirectDescriptorError, "indirect descriptor inside an indirect table"),
    k.E_INDIRECT_CHAINED: (
        IndirectDescriptorError,
        "indirect descriptor after direct ones in a packed chain",
    ),
    k.E_INDIRECT_NEXT: (IndirectDescriptorError, "indirect descriptor with NEXT set"),
    k.E_INDIRECT_LENGTH: (
        IndirectDescriptorError,
        "indirect table length {a} is not a non-zero multiple of 16",
    ),
    k.E_TOO_MANY: (ChainTooLongError, "chain has more than {a} descriptors"),
    k.E_TOO_BIG: (ChainTooLongError, "chain holds {a} bytes, 2**32 or more"),
    k.E_LAYOUT: (ChainLayoutError, "device-readable descriptor after a device-writable one"),
    k.E_BUFFER: (
        BufferAddressError,
        "guest address range [{a:#x}, +{b:#x}) is not inside one mapped region",
    ),
    k.E_ORDER: (OutOfOrderError, "in-order ring: chain names {a} where ring order expects {b}"),
    k.E_ORDER_LINKS: (
        OutOfOrderError,
        "in-order ring: chain from descriptor {a} ends at {b}, not on consecutive descriptors",
    ),
}


def ring_error(row: Int64Array) -> RingError | None:
    """The error a queue row records, as the RingError subclass that names the rule."""
    code = int(row[k.Q_ERROR])
    if code == 0:
        return None
    cls, text = _ERRORS[code]
    a = int(row[k.Q_ERROR_A]) & _U64_MASK
    return cls(text.format(a=a, b=int(row[k.Q_ERROR_B])))


def host_address(view: memoryview) -> int:
    """The address, in this process, of the first byte of a writable view."""
    anchor = ctypes.c_char.from_buffer(view)
    address = ctypes.addressof(anchor)
    # The ctypes object exports the buffer; drop it so it never blocks an unmap.
    del anchor
    return address


_ANY_ACCESS = k.ACCESS_READ | k.ACCESS_WRITE


def _table(rows: Sequence[tuple[int, int, int, int, int]]) -> npt.NDArray[np.uint64]:
    # An empty table still has one all-zero row: the kernels' view needs a
    # valid address, and a zero-sized row translates nothing.
    return np.array(rows or [(0, 0, 0, 0, 0)], dtype=np.uint64)


def region_table(mem: GuestMemory) -> npt.NDArray[np.uint64]:
    """The kernels' translation table of guest memory, in guest-physical order.

    One row per region: guest-physical start, size, host address, read and
    write access, and the guest-physical start again (where dirty pages are
    logged).
    """
    rows = []
    for region in mem.regions:
        view = mem.view(region.guest_phys_addr, region.memory_size)
        gpa = region.guest_phys_addr
        rows.append((gpa, region.memory_size, host_address(view), _ANY_ACCESS, gpa))
        view.release()
    return _table(rows)


def iotlb_table(space: IotlbAddressSpace) -> npt.NDArray[np.uint64]:
    """The kernels' translation table of an IOTLB, in I/O virtual order.

    Each (coalesced) entry is cut where its front-end virtual range crosses
    from one memory region into another, since regions are not contiguous in
    this process.  A part no region holds is a row allowing no access: using
    it breaks the ring, as :meth:`~pyvdpa.memory.IotlbAddressSpace.view`
    refuses it, instead of asking the front-end again for a translation it has
    already given.  A row continuing the previous one in the same region (two
    entries of different permissions, contiguous in both address spaces) is
    marked ``ACCESS_CONTINUES``.  Every row keeps its entry's permission
    (``ACCESS_PERM_SHIFT``) and is marked ``ACCESS_ADJOINS`` when it goes on
    from the previous row in front-end memory, so the kernels tell a range
    the IOTLB translates whole from one running into a missing translation.
    """
    memory = space.memory
    regions = sorted(memory.regions, key=lambda r: r.userspace_addr)
    rows: list[tuple[int, int, int, int, int]] = []
    # The region and front-end address the previous row ended at.
    previous: tuple[MemoryRegion | None, int, int] = (None, -1, -1)
    for entry in space.iotlb.snapshot():
        iova, uva, end = entry.iova, entry.uaddr, entry.uaddr + entry.size
        access = int(entry.perm) & _ANY_ACCESS
        perm = access << k.ACCESS_PERM_SHIFT
        while uva < end:
            adjoins = k.ACCESS_ADJOINS if previous[1:] == (iova, uva) else 0
            region = next(
                (r for r in regions if r.userspace_addr <= uva < r.userspace_addr + r.memory_size),
                None,
            )
            if region is None:
                later = [r.userspace_addr for r in regions if r.userspace_addr > uva]
                step = min([end, *later]) - uva
                rows.append((iova, step, 0, perm | adjoins, 0))
            else:
                step = min(end, region.userspace_addr + region.memory_size) - uva
                view = memory.uva_view(uva, step)
                continues = previous == (region, iova, uva)
                flags = access | perm | adjoins | (k.ACCESS_CONTINUES if continues else 0)
                gpa = region.guest_phys_addr + uva - region.userspace_addr
                rows.append((iova, step, host_address(view), flags, gpa))
                view.release()
            previous = (region, iova + step, uva + step)
            iova += step
            uva += step
    return _table(rows)


def _signed(value: int) -> int:
    """A 64-bit address as the int64 bit pattern the kernels take."""
    return value - (1 << 64) if value >= 1 << 63 else value


class CompiledQueue:
    """The device side of a virtqueue, each step a compiled kernel over a state row.

    Implements :class:`~pyvdpa.virtio.ring.DeviceQueue`.  ``driver_addr`` is
    the available ring (split) or driver event area (packed); ``device_addr``
    the used ring or device event area.  ``base`` is the SET_VRING_BASE value.
    With ``log``, every byte written to guest memory is logged in the shared
    bitmap, ring writes at ``log_addr``.  ``stats``, when given, is the
    ``int64[NSTATS]`` array the engine counts this queue's work in.
    ``in_order`` says VIRTIO_F_IN_ORDER was negotiated; ``batch`` (by default
    the same) lets a chain used completely share the used entry of the next
    chain pushed before a publish.
    """

    def __init__(
        self,
        mem: GuestMemory,
        size: int,
        desc_addr: int,
        driver_addr: int,
        device_addr: int,
        *,
        packed: bool,
        event_idx: bool,
        indirect: bool,
        base: int,
        log: DirtyLog | None = None,
        log_addr: int | None = None,
        stats: Int64Array | None = None,
        space: AddressSpace | None = None,
        in_order: bool = False,
        batch: bool | None = None,
    ) -> None:
        if space is None:
            space = mem
        if packed:
            check_packed_base(base, size)
            areas = PackedLayout(size).map(space, desc_addr, driver_addr, device_addr)
        else:
            check_split_base(base)
            areas = SplitLayout(size).map(space, desc_addr, driver_addr, device_addr)
        self._setup(
            space, areas, size, packed=packed, event_idx=event_idx, indirect=indirect,
            base=base, log=log, log_addr=log_addr, stats=stats, owns_areas=True,
            in_order=in_order, batch=in_order if batch is None else batch,
        )  # fmt: skip

    @classmethod
    def from_spec(
        cls, spec: RingSpec, stats: Int64Array | None = None, *, batch: bool = True
    ) -> CompiledQueue:
        """The compiled queue of the ring ``spec`` describes, over its mapped areas.

        ``batch``: with VIRTIO_F_IN_ORDER, chains used completely may share
        a used entry (a device turns it off where its drivers read every
        entry's length, as receive queues).  The spec's owner releases the
        areas; :meth:`release` leaves them alone.
        """
        queue = cls.__new__(cls)
        queue._setup(
            spec.space, spec.areas, spec.size, packed=spec.packed, event_idx=spec.event_idx,
            indirect=spec.indirect, base=spec.base, log=spec.dirty_log, log_addr=spec.log_addr,
            stats=stats, owns_areas=False, in_order=spec.in_order, batch=batch,
        )  # fmt: skip
        return queue

    def _setup(
        self,
        space: AddressSpace,
        areas: RingAreas,
        size: int,
        *,
        packed: bool,
        event_idx: bool,
        indirect: bool,
        base: int,
        log: DirtyLog | None,
        log_addr: int | None,
        stats: Int64Array | None,
        owns_areas: bool,
        in_order: bool,
        batch: bool,
    ) -> None:
        if log is not None and log_addr is None:
            raise ValueError("dirty logging needs the ring's log_addr")
        if stats is None:
            stats = np.zeros(k.NSTATS, dtype=np.int64)
        if stats.shape != (k.NSTATS,) or stats.dtype != np.int64 or not stats.flags.c_contiguous:
            raise ValueError(f"stats must be a contiguous int64[{k.NSTATS}] array")
        self._space = space
        self.iotlb = space.iotlb if isinstance(space, IotlbAddressSpace) else None
        # What the translation table is taken from, when it can change under
        # a running queue (a miss then stalls the queue rather than breaking it).
        self._source: Iotlb | IovaSpace | None = (
            self.iotlb
            if self.iotlb is not None
            else space
            if isinstance(space, IovaSpace)
            else None
        )
        self._ring_areas: RingAreas | None = areas if owns_areas else None
        self._areas = areas
        views = [areas.desc.view, areas.driver.view, areas.device.view]
        self.generation = 0
        self._regions = self._translations()
        self._log = log
        self.stats = stats
        self._segs: Int64Array | None = None
        self._shadow = np.zeros((size if packed else 1, 2), dtype=np.int64)
        row = np.zeros(k.QCOLS, dtype=np.int64)
        row[k.Q_SIZE] = size
        row[k.Q_PACKED] = packed
        row[k.Q_EVENT_IDX] = event_idx
        row[k.Q_INDIRECT] = indirect
        row[k.Q_IN_ORDER] = in_order
        row[k.Q_BATCH] = in_order and batch
        row[k.Q_NEXT_HEAD] = -1
        row[k.Q_DESC], row[k.Q_DRIVER], row[k.Q_DEVICE] = (host_address(v) for v in views)
        row[k.Q_REGS] = self._regions.ctypes.data
        row[k.Q_NREGS] = self._regions.shape[0]
        row[k.Q_IOTLB] = self._source is not None
        row[k.Q_ATTN_FD] = -1
        if log is not None and log_addr is not None:
            row[k.Q_LOG] = log.address
            row[k.Q_LOG_SIZE] = log.size
            row[k.Q_LOG_RING] = _signed(log_addr)
        row[k.Q_STATS] = stats.ctypes.data
        row[k.Q_SHADOW] = self._shadow.ctypes.data
        row[k.Q_CALL_FD] = -1
        row[k.Q_NOTIFY] = 1
        if packed:
            row[k.Q_LAST_AVAIL] = row[k.Q_USED_IDX] = base & 0x7FFF
            row[k.Q_AVAIL_WRAP] = row[k.Q_USED_WRAP] = base >> _WRAP_SHIFT & 1
        else:
            row[k.Q_LAST_AVAIL] = row[k.Q_AVAIL_SEEN] = base
            row[k.Q_USED_IDX] = int.from_bytes(views[2][2:4], "little")
        self.row: Int64Array = row

    # ------------------------------------------------------------------ state

    @property
    def size(self) -> int:
        """Number of descriptors in the queue."""
        return int(self.row[k.Q_SIZE])

    @property
    def packed(self) -> bool:
        """Whether the queue uses the packed layout."""
        return bool(self.row[k.Q_PACKED])

    @property
    def broken(self) -> bool:
        """Whether a ring error stopped the queue."""
        return bool(self.row[k.Q_ERROR])

    @property
    def error(self) -> RingError | None:
        """The ring error that broke the queue, if any."""
        return ring_error(self.row)

    @property
    def inflight(self) -> int:
        """Chains popped and not yet pushed."""
        return int(self.row[k.Q_INFLIGHT])

    @property
    def base(self) -> int:
        """The ring state GET_VRING_BASE reports.

        Split: the next avail index.  Packed: bits 0-14 the next available
        slot, bit 15 its wrap counter, bits 16-30 the used slot, bit 31 its
        wrap counter.  Chains in flight count as consumed.
        """
        row = self.row
        if row[k.Q_PACKED]:
            avail = int(row[k.Q_LAST_AVAIL]) | int(row[k.Q_AVAIL_WRAP]) << _WRAP_SHIFT
            used = int(row[k.Q_USED_IDX]) | int(row[k.Q_USED_WRAP]) << _WRAP_SHIFT
            return avail | used << 16
        return int(row[k.Q_LAST_AVAIL])

    @property
    def regions(self) -> npt.NDArray[np.uint64]:
        """The translation table the row points at (kept alive by this object)."""
        return self._regions

    @property
    def stalled(self) -> tuple[int, bool] | None:
        """``(iova, write)`` of the translation a stalled queue waits for, else None."""
        row = self.row
        if not row[k.Q_STALLED]:
            return None
        return int(row[k.Q_MISS_ADDR]) & _U64_MASK, int(row[k.Q_MISS_ACCESS]) == k.ACCESS_WRITE

    def _translations(self) -> npt.NDArray[np.uint64]:
        space = self._space
        if isinstance(space, IotlbAddressSpace):
            # Read before the snapshot: a change in between only causes one
            # more rebuild, never a stale table taken for a current one.
            self.generation = space.iotlb.generation
            return iotlb_table(space)
        if isinstance(space, IovaSpace):
            self.generation = space.generation
            return _table(
                [
                    (iova, size, host, access | access << k.ACCESS_PERM_SHIFT, gpa)
                    for iova, size, host, access, gpa in space.host_rows()
                ]
            )
        assert isinstance(space, GuestMemory)
        return region_table(space)

    def uses_ring_areas(self, iova: int, size: int) -> bool:
        """Whether device range ``[iova, iova + size)`` overlaps one of the ring's areas.

        The areas are translated once, when the queue is built: a change
        there needs a new queue, not a new translation table.
        """
        return self._areas.overlaps(iova, size)

    @property
    def position(self) -> RingPosition:
        """Where the ring stands, as :attr:`base` encodes it."""
        return RingPosition.decode(self.base, packed=self.packed)

    @property
    def translates(self) -> bool:
        """Whether the translation table can change under the running queue."""
        return self._source is not None

    @property
    def translation_current(self) -> bool:
        """Whether the table reflects the latest IOTLB or IOVA mappings."""
        return self._source is None or self._source.generation == self.generation

    def retranslate(self) -> None:
        """Rebuild the translation table from the IOTLB and let a stalled queue go on.

        The caller keeps the queue's worker out of the kernel meanwhile.
        """
        table = self._translations()
        row = self.row
        row[k.Q_REGS] = table.ctypes.data
        row[k.Q_NREGS] = table.shape[0]
        self._regions = table
        row[k.Q_STALLED] = 0

    def _check_usable(self) -> None:
        if self.row[k.Q_ERROR]:
            raise QueueBrokenError(f"queue is broken: {self.error}")

    def _segments(self) -> Int64Array:
        if self._segs is None:
            self._segs = np.zeros((self.size, 4), dtype=np.int64)
        return self._segs

    # ------------------------------------------------------------------ DeviceQueue

    def pop(self) -> DescriptorChain | None:
        """Return the next available chain, validated, or None when there is none.

        A :class:`~pyvdpa.errors.RingError` marks the queue broken and is
        raised; nothing is consumed or written in that case.
        """
        self._check_usable()
        segs = self._segments()
        status, ident, nseg, nread, _, _, desc_count = k.ring_pop(self.row, segs, 0)
        if status == k.ERROR:
            error = self.error
            assert error is not None
            raise error
        miss = self.stalled
        if miss is not None:
            # As the Python queues do: nothing consumed, the next pop walks again.
            self.row[k.Q_STALLED] = 0
            raise IotlbMissError(miss[0], write=miss[1])
        if status == k.EMPTY:
            return None
        readable: list[Segment] = []
        writable: list[Segment] = []
        for i in range(nseg):
            addr = int(segs[i, 0]) & _U64_MASK
            length = int(segs[i, 2])
            write = i >= nread
            (writable if write else readable).append(
                Segment(addr, length, self._space.view(addr, length, write=write))
            )
        return DescriptorChain(int(ident), tuple(readable), tuple(writable), int(desc_count))

    def push(self, chain: DescriptorChain, written: int) -> None:
        """Return a chain to the driver with ``written`` bytes written to its writable buffers."""
        self.push_batch(((chain, written),))

    def push_batch(self, completions: Sequence[tuple[DescriptorChain, int]]) -> None:
        """Return chains, in the order popped, and publish them together.

        As :meth:`pyvdpa.virtio.split.SplitDeviceQueue.push_batch`: with
        VIRTIO_F_IN_ORDER and batching, chains used completely share the used
        entry of the next chain.
        """
        self._check_usable()
        if len(completions) > self.row[k.Q_INFLIGHT]:
            raise ValueError(
                f"push of {len(completions)} chains, {self.row[k.Q_INFLIGHT]} in flight"
            )
        for chain, written in completions:
            check_written(chain, written)
        for chain, written in completions:
            k.push(self.row, chain.id, written, chain.desc_count, chain.writable_len())
            if self._log is not None:
                remaining = written
                for seg in chain.writable:
                    if remaining <= 0:
                        break
                    count = min(seg.length, remaining)
                    k.log_write(self.row, _signed(seg.addr), count)
                    remaining -= count
        k.publish(self.row)

    def should_notify(self) -> bool:
        """Return whether the driver wants a used-buffer notification now."""
        self._check_usable()
        return bool(k.should_notify(self.row))

    def disable_notification(self) -> None:
        """Ask the driver not to send available-buffer notifications."""
        self._check_usable()
        k.disable_notification(self.row)

    def enable_notification(self) -> bool:
        """Ask for available-buffer notifications; return True if buffers already wait."""
        self._check_usable()
        return bool(k.enable_notification(self.row))

    def release(self) -> None:
        """Release the ring areas this queue mapped itself (not a spec's)."""
        if self._ring_areas is not None:
            self._ring_areas.release()
            self._ring_areas = None


class CompiledSplitQueue(CompiledQueue):
    """A compiled split queue, built like :class:`~pyvdpa.virtio.split.SplitDeviceQueue`."""

    def __init__(
        self,
        mem: GuestMemory,
        size: int,
        desc_addr: int,
        avail_addr: int,
        used_addr: int,
        *,
        event_idx: bool,
        indirect: bool,
        base: int = 0,
        log: DirtyLog | None = None,
        log_addr: int | None = None,
        stats: Int64Array | None = None,
        in_order: bool = False,
    ) -> None:
        super().__init__(
            mem, size, desc_addr, avail_addr, used_addr,
            packed=False, event_idx=event_idx, indirect=indirect, base=base,
            log=log, log_addr=log_addr, stats=stats, in_order=in_order,
        )  # fmt: skip


class CompiledPackedQueue(CompiledQueue):
    """A compiled packed queue, built like :class:`~pyvdpa.virtio.packed.PackedDeviceQueue`."""

    def __init__(
        self,
        mem: GuestMemory,
        size: int,
        desc_addr: int,
        driver_event_addr: int,
        device_event_addr: int,
        *,
        event_idx: bool,
        indirect: bool,
        base: int = 1 << _WRAP_SHIFT,
        log: DirtyLog | None = None,
        log_addr: int | None = None,
        stats: Int64Array | None = None,
        in_order: bool = False,
    ) -> None:
        super().__init__(
            mem, size, desc_addr, driver_event_addr, device_event_addr,
            packed=True, event_idx=event_idx, indirect=indirect, base=base,
            log=log, log_addr=log_addr, stats=stats, in_order=in_order,
        )  # fmt: skip
