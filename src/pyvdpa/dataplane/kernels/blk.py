"""The ``blk`` program: one virtqueue of a virtio-blk device over a file (virtio 1.2, 5.2.6).

Theory of operation
-------------------
A blk unit serves one virtqueue, in the unit's ``U_TXQ`` column: requests
flow from the driver, like transmitted frames.  Each chain holds a 16-byte
header (type, reserved, sector) in its device-readable part, then data, and
its last device-writable byte is the status.

``IN`` is one ``preadv`` from the backing file straight into the guest's
writable buffers, ``OUT`` one ``pwritev`` straight from its readable
buffers (no copy, in batches of ``IOV_MAX`` buffers); ``FLUSH`` is
``fdatasync``; ``GET_ID`` copies the serial; ``DISCARD`` and
``WRITE_ZEROES`` validate their segments and ``fallocate`` (punching a
hole, or zeroing a range, with a fallback to writing zeros where the file
system cannot).  The checks, their order, the status byte and the used
length are those of the reference device,
:class:`pyvdpa.devices.blk.BlkDevice`, which the tests hold the kernel to.

The I/O is synchronous, as in DPDK's vhost blk examples: a request is
finished, and its used element written, before the next one is popped, so
the worker never leaves a burst with a request in flight.
"""

from __future__ import annotations

from pyvdpa.dataplane.kernels.cache import kernel
from pyvdpa.dataplane.kernels.intrinsics import (
    Table,
    errno,
    fallocate,
    fdatasync,
    preadv,
    pwrite,
    pwritev,
)
from pyvdpa.dataplane.kernels.layout import (
    EMPTY,
    ERROR,
    Queue,
    Unit,
    Worker,
    iovecs_at,
    queue_at,
    segments_at,
    stats_at,
    unit_at,
    worker_at,
)
from pyvdpa.dataplane.kernels.ring import complete, count_error, push, ring_pop
from pyvdpa.dataplane.kernels.segments import sg_load, sg_store_u8, sg_write
from pyvdpa.dataplane.kernels.spec import (
    BLK_HEADER,
    BLK_ID_BYTES,
    BLK_S_IOERR,
    BLK_S_OK,
    BLK_S_UNSUPP,
    BLK_SEGMENT,
    BLK_T_DISCARD,
    BLK_T_FLUSH,
    BLK_T_GET_ID,
    BLK_T_IN,
    BLK_T_OUT,
    BLK_T_WRITE_ZEROES,
    BLK_UNMAP,
    EINTR,
    FALLOC_KEEP_SIZE,
    FALLOC_PUNCH_HOLE,
    FALLOC_ZERO_RANGE,
    SECTOR_MASK,
    SECTOR_SHIFT,
)
from pyvdpa.dataplane.kernels.translate import log_write

__all__ = ["blk_program", "blk_requests"]

# The request header: type (u32), reserved (u32), sector (u64).  A segment of DISCARD or
# WRITE_ZEROES: sector (u64), num_sectors (u32), flags (u32).
_HDR_SECTOR = 8
_SEG_NUM_SECTORS = 8
_SEG_FLAGS = 12


@kernel
def _sg_zero(q: Queue, u: Unit, segs: Table, first: int, end: int, offset: int, count: int) -> None:
    """Zero ``count`` bytes of segments [first, end) from ``offset``."""
    chunk = u.zeros_len
    while count > 0:
        n = min(count, chunk)
        sg_write(q, segs, first, end, offset, u.zeros, n)
        offset += n
        count -= n


@kernel
def _sg_file_io(
    q: Queue,
    u: Unit,
    segs: Table,
    first: int,
    end: int,
    offset: int,
    count: int,
    pos: int,
    out: bool,
    w: Worker,
) -> bool:
    """Move ``count`` bytes between file offset ``pos`` and segments [first, end) from ``offset``.

    ``out`` false: ``preadv`` into the segments (logged as written);
    ``out`` true: ``pwritev`` from them.  The guest's buffers are the I/O
    buffers, through the worker's iovecs: nothing is copied.  Returns True
    when every byte moved.  A read meeting the end of the file zeroes the
    rest, as QEMU's raw files do; a write making no progress fails, as does
    any error but EINTR.
    """
    fd = u.blk_fd
    iov = iovecs_at(w.iov, w.iov_len)
    i = first
    while i < end and offset >= segs[i].length:
        offset -= segs[i].length
        i += 1
    while count > 0:
        n = 0
        batch = 0
        j = i
        skip = offset
        while n < iov.shape[0] and batch < count and j < end:
            length = min(segs[j].length - skip, count - batch)
            if length > 0:
                iov[n].base = segs[j].host + skip
                iov[n].length = length
                if not out and q.log:
                    log_write(q, segs[j].gpa + skip, length)
                n += 1
                batch += length
            skip = 0
            j += 1
        if n == 0:
            return False
        done = pwritev(fd, w.iov, n, pos) if out else preadv(fd, w.iov, n, pos)
        if done < 0:
            if errno() == EINTR:
                continue
            return False
        if done == 0:
            if out:
                return False
            _sg_zero(q, u, segs, i, end, offset, count)
            return True
        count -= done
        pos += done
        offset += done
        while i < end and offset >= segs[i].length:
            offset -= segs[i].length
            i += 1
    return True


@kernel
def _blk_range(u: Unit, sector: int, length: int) -> int:
    """File offset of ``length`` bytes at ``sector``, or -1 unless whole sectors inside the disk.

    ``sector`` is the request's u64 as an int64 bit pattern: a negative one
    lies beyond any capacity, and the sum cannot overflow once it is below.
    """
    capacity = u.capacity
    if length & SECTOR_MASK:
        return -1
    if sector < 0 or sector > capacity or sector + (length >> SECTOR_SHIFT) > capacity:
        return -1
    return sector << SECTOR_SHIFT


@kernel
def _falloc(fd: int, mode: int, pos: int, length: int) -> bool:
    """``fallocate``, retried on EINTR; True on success."""
    while True:
        if fallocate(fd, mode, pos, length) == 0:
            return True
        if errno() != EINTR:
            return False


@kernel
def _zero_range(u: Unit, pos: int, length: int) -> bool:
    """Zero file bytes [pos, pos + length): ZERO_RANGE, else by writing zeros."""
    fd = u.blk_fd
    if _falloc(fd, FALLOC_ZERO_RANGE | FALLOC_KEEP_SIZE, pos, length):
        return True
    # Not every file system zeroes ranges (tmpfs, behind a RAM disk, does not).
    while length > 0:
        done = pwrite(fd, u.zeros, min(length, u.zeros_len), pos)
        if done < 0 and errno() == EINTR:
            continue
        if done <= 0:
            return False
        pos += done
        length -= done
    return True


@kernel
def _blk_discard_or_zero(u: Unit, segs: Table, nread: int, kind: int, data_out: int) -> int:
    """Apply the segments of a DISCARD or WRITE_ZEROES request; return the status.

    Like the reference device, each segment is checked and applied before
    the next one is looked at.
    """
    if data_out == 0 or data_out % BLK_SEGMENT or data_out // BLK_SEGMENT > u.max_seg:
        return BLK_S_UNSUPP
    for s in range(data_out // BLK_SEGMENT):
        at = BLK_HEADER + BLK_SEGMENT * s
        sector = sg_load(segs, 0, nread, at, 8)
        num_sectors = sg_load(segs, 0, nread, at + _SEG_NUM_SECTORS, 4)
        flags = sg_load(segs, 0, nread, at + _SEG_FLAGS, 4)
        if flags & ~BLK_UNMAP or (kind == BLK_T_DISCARD and flags):
            return BLK_S_UNSUPP
        if num_sectors > u.max_sectors:
            return BLK_S_IOERR
        length = num_sectors << SECTOR_SHIFT
        pos = _blk_range(u, sector, length)
        if pos < 0:
            return BLK_S_IOERR
        if kind == BLK_T_DISCARD:
            done = _falloc(u.blk_fd, FALLOC_PUNCH_HOLE | FALLOC_KEEP_SIZE, pos, length)
        else:
            done = _zero_range(u, pos, length)
        if not done:
            return BLK_S_IOERR
    return BLK_S_OK


@kernel
def _blk_execute(
    q: Queue, u: Unit, segs: Table, nseg: int, nread: int, rlen: int, wlen: int, w: Worker
) -> tuple[int, int]:
    """Execute one well-formed request; return (status, bytes written before the status)."""
    kind = sg_load(segs, 0, nread, 0, 4)
    sector = sg_load(segs, 0, nread, _HDR_SECTOR, 8)
    data_in = wlen - 1
    data_out = rlen - BLK_HEADER
    readonly = u.readonly
    if kind == BLK_T_IN:
        pos = _blk_range(u, sector, data_in)
        if pos < 0 or not _sg_file_io(q, u, segs, nread, nseg, 0, data_in, pos, False, w):
            return (BLK_S_IOERR, 0)
        return (BLK_S_OK, data_in)
    if kind == BLK_T_OUT:
        if readonly:
            return (BLK_S_IOERR, 0)
        pos = _blk_range(u, sector, data_out)
        if pos < 0 or not _sg_file_io(q, u, segs, 0, nread, BLK_HEADER, data_out, pos, True, w):
            return (BLK_S_IOERR, 0)
        return (BLK_S_OK, 0)
    if kind == BLK_T_FLUSH:
        if not readonly:
            while fdatasync(u.blk_fd) != 0:
                if errno() != EINTR:
                    return (BLK_S_IOERR, 0)
        return (BLK_S_OK, 0)
    if kind == BLK_T_GET_ID:
        count = min(BLK_ID_BYTES, data_in)
        sg_write(q, segs, nread, nseg, 0, u.serial, count)
        return (BLK_S_OK, count)
    if kind in (BLK_T_DISCARD, BLK_T_WRITE_ZEROES):
        if readonly:
            return (BLK_S_IOERR, 0)
        return (_blk_discard_or_zero(u, segs, nread, kind, data_out), 0)
    return (BLK_S_UNSUPP, 0)


@kernel
def blk_requests(u: Unit, w: Worker) -> int:
    """Serve a burst of requests of a blk unit's queue; return how many."""
    qa = u.txq
    if qa == 0:
        return 0
    q = queue_at(qa)
    if q.error:
        return 0
    segs = segments_at(w.segs_t, w.segs_t_len)
    stats = stats_at(q.stats)
    limit = u.burst
    count = 0
    while count < limit:
        status, ident, nseg, nread, rlen, wlen, dc = ring_pop(q, segs, 0)
        if status == EMPTY:
            break
        if status == ERROR:
            count_error(q)
            break
        stats.received_desc += 1
        written = 0
        if wlen < 1 or rlen < BLK_HEADER:
            # No room for a status, or no header to act on: returned untouched.
            stats.invalid_buffer += 1
        else:
            result, reply = _blk_execute(q, u, segs, nseg, nread, rlen, wlen, w)
            if result != BLK_S_OK:
                stats.completion_errors += 1
            sg_store_u8(q, segs, nread, nseg, wlen - 1, result)
            stats.packets += 1
            stats.bytes += reply + rlen - BLK_HEADER
            written = reply + 1
        push(q, ident, written, dc, wlen)
        stats.completed_desc += 1
        count += 1
    if count:
        complete(q)
    return count


@kernel
def blk_program(unit: int, worker: int) -> int:
    """The ``blk`` program: one pass over the unit at ``unit``; the work done."""
    return blk_requests(unit_at(unit), worker_at(worker))
