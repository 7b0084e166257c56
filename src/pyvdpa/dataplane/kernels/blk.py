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

On a RAM disk the I/O is synchronous, as in DPDK's vhost blk examples (a
copy from page cache costs less than handing it to another thread): a
pass's requests are executed as they are popped, then returned together
(the unit's ``done`` table).  On a file, each IN, OUT, FLUSH, DISCARD and
WRITE_ZEROES request goes to the device's I/O pool: the worker copies the
chain's segments into a free request slot (``REQUEST``, ``U_REQUESTS``)
and writes the slot's address to the pool's pipe; a pool thread
(:func:`blk_io_loop`, compiled, without the GIL) executes it with the
same code, stores the status, and writes the address to the unit's
completion pipe (``U_FD``), which wakes the worker; the worker's next
pass collects it and returns it with the others.  Requests therefore
complete out of order, and a slow one holds neither the queue's other
requests nor the worker's other units.  GET_ID, unknown types, chains of
more segments than a slot holds, and every request of a ring that
negotiated VIRTIO_F_IN_ORDER (chains must be used in ring order) are
served by the worker itself.

With an inflight region (``U_INFLIGHT``), every chain is recorded as taken
before its request touches the disk, and a burst's completions are
recorded, published and committed in the order of
:mod:`~pyvdpa.dataplane.kernels.inflight`: a back-end killed at any point
leaves its successor the list of what it must serve again.
"""

from __future__ import annotations

from pyvdpa.dataplane.kernels import inflight
from pyvdpa.dataplane.kernels.cache import kernel
from pyvdpa.dataplane.kernels.intrinsics import (
    Table,
    epoll_wait,
    errno,
    fallocate,
    fdatasync,
    fence,
    ld_u64,
    preadv,
    pwrite,
    pwritev,
    readv,
    st_u64,
    writev,
)
from pyvdpa.dataplane.kernels.layout import (
    E_AVAIL_SLOTS,
    EMPTY,
    ERROR,
    IOV_MAX,
    IOVEC,
    REQUEST,
    Queue,
    Unit,
    Worker,
    done_at,
    fail,
    iovecs_at,
    queue_at,
    request_at,
    requests_at,
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

__all__ = ["blk_io_loop", "blk_program", "blk_requests"]

# A request slot's own iovec (the pipes' message), and the slot's size.
_IOV_AT = REQUEST.offset(REQUEST.names.index("iov_base"))
_REQUEST_BYTES = REQUEST.width * 8
# An I/O thread's scratch memory: an iovec over the message cell, the cell, the iovecs.
_SCRATCH_CELL = 16
_SCRATCH_IOV = 24
_IOV_BYTES = IOVEC.width * 8

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
    iov_at: int,
    iov_cap: int,
) -> bool:
    """Move ``count`` bytes between file offset ``pos`` and segments [first, end) from ``offset``.

    ``out`` false: ``preadv`` into the segments (logged as written);
    ``out`` true: ``pwritev`` from them.  The guest's buffers are the I/O
    buffers, through the ``iov_cap`` iovecs at ``iov_at`` (the caller's
    own): nothing is copied.  Returns True
    when every byte moved.  A read meeting the end of the file zeroes the
    rest, as QEMU's raw files do; a write making no progress fails, as does
    any error but EINTR.
    """
    fd = u.blk_fd
    iov = iovecs_at(iov_at, iov_cap)
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
        done = pwritev(fd, iov_at, n, pos) if out else preadv(fd, iov_at, n, pos)
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
    q: Queue,
    u: Unit,
    segs: Table,
    nseg: int,
    nread: int,
    rlen: int,
    wlen: int,
    iov_at: int,
    iov_cap: int,
) -> tuple[int, int]:
    """Execute one well-formed request; return (status, bytes written before the status)."""
    kind = sg_load(segs, 0, nread, 0, 4)
    sector = sg_load(segs, 0, nread, _HDR_SECTOR, 8)
    data_in = wlen - 1
    data_out = rlen - BLK_HEADER
    readonly = u.readonly
    if kind == BLK_T_IN:
        pos = _blk_range(u, sector, data_in)
        if pos < 0 or not _sg_file_io(
            q, u, segs, nread, nseg, 0, data_in, pos, False, iov_at, iov_cap
        ):
            return (BLK_S_IOERR, 0)
        return (BLK_S_OK, data_in)
    if kind == BLK_T_OUT:
        if readonly:
            return (BLK_S_IOERR, 0)
        pos = _blk_range(u, sector, data_out)
        if pos < 0 or not _sg_file_io(
            q, u, segs, 0, nread, BLK_HEADER, data_out, pos, True, iov_at, iov_cap
        ):
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
def _take(q: Queue, u: Unit, ident: int, first: int, desc_count: int) -> int:
    """Record a chain just taken in the inflight region; return its entry, -1 if it cannot be.

    ``first`` is the chain's first ring slot (packed rings).
    """
    base = u.inflight
    counter = u.inflight_counter
    u.inflight_counter = counter + 1
    if not q.packed:
        inflight.split_take(base, ident, counter)
        return ident
    entry = inflight.packed_take(base, q.size, q.desc, first, desc_count, counter)
    if entry < 0:
        fail(q, E_AVAIL_SLOTS, desc_count, q.inflight_slots)
    return entry


@kernel
def _return_done(q: Queue, u: Unit, count: int) -> None:
    """Return the ``count`` finished requests of the unit's done table, in the spec's order.

    With an inflight region: the batch is recorded, the used entries are
    published (and the driver interrupted if it asks), then the batch is
    committed.
    """
    done = done_at(u.done, u.done_len)
    stats = stats_at(q.stats)
    for i in range(count):
        r = done[i]
        push(q, r.id, r.written, r.desc_count, r.wlen)
        stats.completed_desc += 1
    base = u.inflight
    if base and not q.error:
        if q.packed:
            for i in range(count):
                inflight.packed_record(base, q.size, done[i].entry)
            inflight.packed_used(base, q.used_idx, q.used_wrap)
        else:
            for i in range(count):
                inflight.split_record(base, done[i].entry)
    complete(q)
    if base and not q.error:
        # Nothing is cleared before the used entries it covers are published.
        fence()
        if q.packed:
            for i in range(count):
                inflight.packed_commit(base, done[i].entry)
            inflight.packed_commit_batch(base)
        else:
            for i in range(count):
                inflight.split_commit(base, done[i].entry, q.used_idx)


@kernel
def _serve(
    q: Queue,
    u: Unit,
    segs: Table,
    nseg: int,
    nread: int,
    rlen: int,
    wlen: int,
    iov_at: int,
    iov_cap: int,
) -> tuple[int, int]:
    """Execute a request and store its status; return (status, bytes replied before it)."""
    result, reply = _blk_execute(q, u, segs, nseg, nread, rlen, wlen, iov_at, iov_cap)
    sg_store_u8(q, segs, nread, nseg, wlen - 1, result)
    return (result, reply)


@kernel
def _count(q: Queue, result: int, reply: int, rlen: int) -> int:
    """Count a request served; return the used length (the reply and the status byte)."""
    stats = stats_at(q.stats)
    if result != BLK_S_OK:
        stats.completion_errors += 1
    stats.packets += 1
    stats.bytes += reply + rlen - BLK_HEADER
    return reply + 1


@kernel
def _to_pool(q: Queue, u: Unit, nseg: int, kind: int) -> bool:
    """Whether the request goes to the I/O pool: file I/O, segments that fit a slot, a slot.

    Never with VIRTIO_F_IN_ORDER, which requires chains used in ring order.
    """
    if u.io_fd < 0 or u.free_top == 0 or q.in_order:
        return False
    if kind not in (BLK_T_IN, BLK_T_OUT, BLK_T_FLUSH, BLK_T_DISCARD, BLK_T_WRITE_ZEROES):
        return False
    return nseg <= u.slot_segs


@kernel
def _submit(
    q: Queue, u: Unit, segs: Table, ident: int, nseg: int, nread: int, rlen: int, wlen: int,
    dc: int, entry: int,
) -> None:  # fmt: skip
    """Hand a request to the I/O pool: its chain copied into a free slot, the slot sent."""
    top = u.free_top - 1
    u.free_top = top
    slot = ld_u64(u.free + 8 * top)
    r = requests_at(u.requests, slot + 1)[slot]
    dst = segments_at(r.segs, nseg)
    for i in range(nseg):
        dst[i].gpa = segs[i].gpa
        dst[i].host = segs[i].host
        dst[i].length = segs[i].length
        dst[i].writable = segs[i].writable
    r.id = ident
    r.desc_count = dc
    r.entry = entry
    r.nseg = nseg
    r.nread = nread
    r.rlen = rlen
    r.wlen = wlen
    r.seq = u.io_seq
    u.io_seq += 1
    u.io_pending += 1
    while writev(u.io_fd, r.addr + _IOV_AT, 1) < 0 and errno() == EINTR:
        pass


@kernel
def _collect(q: Queue, u: Unit, count: int) -> int:
    """Add the requests the I/O pool finished to the done table from row ``count``.

    Returns the new row count.  Each slot goes back to the free stack; with
    the queue broken, nothing is returned to the ring.
    """
    got = readv(u.fd, u.reap_iov, 1)
    if got <= 0:
        return count
    done = done_at(u.done, u.done_len)
    reaped = ld_u64(u.reap_iov)
    for m in range(got // 8):
        r = request_at(ld_u64(reaped + 8 * m))
        u.io_pending -= 1
        st_u64(u.free + 8 * u.free_top, (r.addr - u.requests) // _REQUEST_BYTES)
        u.free_top += 1
        if q.error:
            continue
        d = done[count]
        d.id = r.id
        d.desc_count = r.desc_count
        d.written = _count(q, r.status, r.reply, r.rlen)
        d.wlen = r.wlen
        d.entry = r.entry
        count += 1
    return count


@kernel
def blk_requests(u: Unit, w: Worker) -> int:
    """Serve a pass over a blk unit's queue; return the requests taken and returned.

    Requests the I/O pool finished are collected first; then chains are
    taken, up to a burst: file I/O goes to the pool when the unit has one,
    everything else is executed here.  All that is done is returned to the
    ring together.
    """
    qa = u.txq
    if qa == 0:
        return 0
    q = queue_at(qa)
    count = 0
    if u.io_pending:
        count = _collect(q, u, 0)
    work = count
    if q.error or u.drain:
        if count:
            _return_done(q, u, count)
        return work
    segs = segments_at(w.segs_t, w.segs_t_len)
    stats = stats_at(q.stats)
    done = done_at(u.done, u.done_len)
    limit = min(u.burst, u.done_len - count)
    taken = 0
    while taken < limit:
        first = q.last_avail
        status, ident, nseg, nread, rlen, wlen, dc = ring_pop(q, segs, 0)
        if status == EMPTY:
            break
        if status == ERROR:
            count_error(q)
            break
        entry = ident
        if u.inflight:
            entry = _take(q, u, ident, first, dc)
            if entry < 0:
                count_error(q)
                break
        stats.received_desc += 1
        taken += 1
        written = 0
        if wlen < 1 or rlen < BLK_HEADER:
            # No room for a status, or no header to act on: returned untouched.
            stats.invalid_buffer += 1
        else:
            kind = sg_load(segs, 0, nread, 0, 4)
            if _to_pool(q, u, nseg, kind):
                _submit(q, u, segs, ident, nseg, nread, rlen, wlen, dc, entry)
                continue
            result, reply = _serve(q, u, segs, nseg, nread, rlen, wlen, w.iov, w.iov_len)
            written = _count(q, result, reply, rlen)
        r = done[count]
        r.id = ident
        r.desc_count = dc
        r.written = written
        r.wlen = wlen
        r.entry = entry
        count += 1
    if count:
        _return_done(q, u, count)
    return work + taken


@kernel
def blk_io_loop(submit_fd: int, scratch: int, epfd: int) -> int:
    """An I/O pool thread: execute the request slots read from ``submit_fd`` until a 0.

    ``scratch`` is the thread's own memory: an iovec over a message cell,
    the cell, then ``IOV_MAX`` iovecs for the I/O, then room for one epoll
    event (the test-only delay sleeps in ``epoll_wait`` on ``epfd``, which
    watches nothing).  Each finished slot is written to its unit's
    completion pipe, which wakes the unit's worker.  Returns 0 on the 0
    message, -1 if the pipe fails.
    """
    iov_at = scratch + _SCRATCH_IOV
    events = iov_at + _IOV_BYTES * IOV_MAX
    while True:
        got = readv(submit_fd, scratch, 1)
        if got < 0:
            if errno() == EINTR:
                continue
            return -1
        if got == 0:
            return -1
        addr = ld_u64(scratch + _SCRATCH_CELL)
        if addr == 0:
            return 0
        r = request_at(addr)
        u = unit_at(r.unit)
        q = queue_at(r.queue)
        if u.test_delay_ms > 0 and r.seq % u.test_delay_every == 0:
            epoll_wait(epfd, events, 1, u.test_delay_ms)
        segs = segments_at(r.segs, r.nseg)
        result, reply = _serve(q, u, segs, r.nseg, r.nread, r.rlen, r.wlen, iov_at, IOV_MAX)
        r.status = result
        r.reply = reply
        while writev(r.done_fd, addr + _IOV_AT, 1) < 0 and errno() == EINTR:
            pass


@kernel
def blk_program(unit: int, worker: int) -> int:
    """The ``blk`` program: one pass over the unit at ``unit``; the work done."""
    return blk_requests(unit_at(unit), worker_at(worker))
