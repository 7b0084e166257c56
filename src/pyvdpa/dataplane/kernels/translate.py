"""Device addresses to host addresses, through guest memory or an IOTLB; the dirty log.

Theory of operation
-------------------
A descriptor's address is a *device address*: guest-physical, or an I/O
virtual address once VIRTIO_F_ACCESS_PLATFORM is negotiated.  Each queue
points at a translation table (``Q_REGS``, ``TRANSLATION`` rows sorted by
device address, disjoint), built by :mod:`pyvdpa.dataplane.queues` from the
memory table or from the IOTLB.
A buffer is touched only when one row holds ``[addr, addr + len)`` and
allows the access: :func:`translate` is the fast path, a binary search and a
bounds check, exactly as :meth:`pyvdpa.memory.GuestMemory.view` decides.

What it cannot translate goes to :func:`resolve`.  Without an IOTLB that
breaks the ring (``E_BUFFER``).  With one, it applies the rules of
:meth:`pyvdpa.memory.Iotlb.translate`: a range may run over rows whose
entries adjoin in front-end memory; the first byte no row covers is a *miss*
(the front-end has not mapped it yet), which stalls the queue (``Q_STALLED``)
and signals the engine's attention eventfd instead of breaking the ring;
an entry without the permission breaks it.  The ring areas themselves were
translated whole when the queue was built.

Dirty logging (vhost-user ``LOG_SHMFD``): every byte the device writes to
guest memory marks its 4 KiB guest-physical pages in the shared bitmap with
an atomic OR, the front-end harvesting it concurrently.  Behind an IOTLB the
pages are those of the guest-physical column of the table.
"""

from __future__ import annotations

from pyvdpa.dataplane.kernels.cache import kernel
from pyvdpa.dataplane.kernels.intrinsics import (
    Table,
    atomic_or_u8,
    eventfd_signal,
    signed,
    unsigned,
)
from pyvdpa.dataplane.kernels.layout import (
    ACCESS_ADJOINS,
    ACCESS_CONTINUES,
    ACCESS_PERM_SHIFT,
    ACCESS_READ,
    ACCESS_WRITE,
    E_BUFFER,
    Int64Row,
    Queue,
    fail,
    queue_of,
    translations_at,
)
from pyvdpa.dataplane.kernels.spec import LOG_PAGE_SHIFT

__all__ = ["MISSING", "NO_HOST", "find", "log_pages", "log_write", "resolve", "translate"]

NO_HOST = -1
"""What :func:`translate` and :func:`resolve` return for a range that breaks the ring."""
MISSING = -2
"""What :func:`resolve` returns for a range the IOTLB has no translation of yet."""


@kernel
def find(regs: Table, addr: int) -> int:
    """Index of the last table row starting at or below ``addr``, -1 if none (binary search)."""
    lo = 0
    hi = regs.shape[0]
    while lo < hi:
        mid = (lo + hi) >> 1
        if regs[mid].start <= addr:
            lo = mid + 1
        else:
            hi = mid
    return lo - 1


@kernel
def translate(q: Queue, gpa: int, length: int, access: int) -> int:
    """Host address of device range ``[gpa, gpa + length)``, or -1 unless one row holds it.

    The row must also allow ``access``.  ``gpa`` is the descriptor's 64-bit
    address as an int64 bit pattern; comparisons are unsigned, so no address
    wraps around.
    """
    regs = translations_at(q.regs, q.nregs)
    addr = unsigned(gpa)
    count = unsigned(length)
    r = find(regs, addr)
    if r >= 0:
        row = regs[r]
        offset = addr - row.start
        size = row.size
        if offset < size and count <= size - offset and row.access & access == access:
            return signed(row.host + offset)
    return NO_HOST


@kernel
def resolve(q: Queue, gpa: int, length: int, access: int) -> int:
    """What :func:`translate` could not: a host address, or -1 (ring broken) or -2 (a miss).

    Without an IOTLB a range outside one row breaks the ring.  With one, the
    rules of :meth:`pyvdpa.memory.Iotlb.translate` and then
    :meth:`pyvdpa.memory.GuestMemory.uva_view`: a range may run over entries
    that go on from one another in front-end memory (``ACCESS_ADJOINS``),
    each permitting ``access``; the first byte no row covers is a miss (the
    front-end has not mapped it yet: the queue stalls until the control plane
    brings new translations); an entry without the permission, or a neighbour
    that does not adjoin its row, breaks the ring.  A range translated whole
    must then be one view in this process (rows with memory that continue one
    another, ``ACCESS_CONTINUES``), or it breaks the ring as memory outside
    the table does.
    """
    if q.iotlb == 0:
        fail(q, E_BUFFER, gpa, length)
        return NO_HOST
    regs = translations_at(q.regs, q.nregs)
    addr = unsigned(gpa)
    end = addr + unsigned(max(length, 1))
    if end < addr:
        # Past 2**64: no translation can ever hold it, so it is no miss.
        fail(q, E_BUFFER, gpa, length)
        return NO_HOST
    r = find(regs, addr)
    miss = addr
    perm = access << ACCESS_PERM_SHIFT
    if r >= 0 and addr - regs[r].start < regs[r].size:
        host = signed(regs[r].host + (addr - regs[r].start))
        # Whether the rows so far are one range of this process's memory.
        here = regs[r].access & access == access
        while True:
            if regs[r].access & perm != perm:
                fail(q, E_BUFFER, gpa, length)
                return NO_HOST
            stop = regs[r].start + regs[r].size
            if stop >= end:
                if not here:
                    fail(q, E_BUFFER, gpa, length)
                    return NO_HOST
                return host
            r += 1
            if r == regs.shape[0] or regs[r].start != stop:
                miss = stop
                break
            if regs[r].access & ACCESS_ADJOINS == 0:
                fail(q, E_BUFFER, gpa, length)
                return NO_HOST
            here = here and regs[r].access & ACCESS_CONTINUES != 0
    q.miss_addr = signed(miss)
    q.miss_access = access
    q.stalled = 1
    fd = q.attn_fd
    if fd >= 0:
        eventfd_signal(fd)
    return MISSING


@kernel
def log_pages(q: Queue, gpa: int, length: int) -> None:
    """Mark the guest pages of guest-physical ``[gpa, gpa + length)`` dirty."""
    if gpa < 0:
        q.log_missed += 1
        return
    first = gpa >> LOG_PAGE_SHIFT
    last = (gpa + length - 1) >> LOG_PAGE_SHIFT
    limit = q.log_size * 8
    if last >= limit:
        q.log_missed += last - max(first, limit) + 1
        last = limit - 1
    log = q.log
    for pfn in range(first, last + 1):
        atomic_or_u8(log + (pfn >> 3), 1 << (pfn & 7))


@kernel
def log_write(queue: Queue | Int64Row, addr: int, length: int) -> None:
    """Mark the guest pages of device range ``[addr, addr + length)`` dirty, if the queue logs.

    Device addresses are guest-physical, or IOVAs with an IOTLB: each part
    is then logged at the guest-physical address its table row gives, and a
    part no row translates is counted as missed (the front-end invalidated
    it under a running ring).  ``queue`` is the queue's record, or its row
    as Python holds it.
    """
    q = queue_of(queue)
    if q.log == 0 or length <= 0:
        return
    if q.iotlb == 0:
        log_pages(q, addr, length)
        return
    regs = translations_at(q.regs, q.nregs)
    at = unsigned(addr)
    end = at + unsigned(length)
    r = find(regs, at)
    if r < 0:
        r = 0
    while at < end:
        if (
            r < regs.shape[0]
            and regs[r].start <= at < regs[r].start + regs[r].size
            and regs[r].access & (ACCESS_READ | ACCESS_WRITE) != 0
        ):
            stop = min(end, regs[r].start + regs[r].size)
            log_pages(q, signed(regs[r].gpa + (at - regs[r].start)), signed(stop - at))
            at = stop
            r += 1
        elif r < regs.shape[0] and regs[r].start <= at:
            r += 1
        else:
            stop = end if r == regs.shape[0] else min(end, regs[r].start)
            q.log_missed += 1
            at = stop
