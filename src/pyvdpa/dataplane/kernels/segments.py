"""Scatter-gather over a chain's segments: copies in and out, and the bytes they log.

Theory of operation
-------------------
A walked chain is a run of ``SEGMENT`` rows (device address, host address,
length, writable), readable ones first.  The programs see a chain's data
as one byte stream over its segments and address it by stream offset: a
header straddling two buffers is read or written byte by byte, a frame
copied between two chains piece by piece.  Every byte written into guest
memory is logged at its device address when the queue logs (see
:func:`~pyvdpa.dataplane.kernels.translate.log_write`).

Copies of up to 4 KiB, frames among them, are inlined as overlapping
fixed-size vector moves, as DPDK's ``rte_memcpy`` does: a libc call and the
start-up cost of ``rep movsb`` would dominate them.
"""

from __future__ import annotations

from pyvdpa.dataplane.kernels.cache import kernel
from pyvdpa.dataplane.kernels.intrinsics import (
    Table,
    copy1,
    copy2,
    copy4,
    copy8,
    copy16,
    copy32,
    copy64,
    ld_u8,
    ld_u32,
    ld_u64,
    memcpy,
    st_u8,
)
from pyvdpa.dataplane.kernels.layout import Queue
from pyvdpa.dataplane.kernels.translate import log_write

__all__ = [
    "copy",
    "gather",
    "log_segments",
    "sg_addr",
    "sg_copy",
    "sg_load",
    "sg_store_u8",
    "sg_write",
]

_LIBC_COPY = 4096
"""Copies from this many bytes on go to libc's ``memcpy``."""
_BYTE_BITS = 8


@kernel
def copy(dst: int, src: int, count: int) -> None:
    """Copy ``count`` bytes between host addresses (ranges that do not overlap).

    A hostile driver may make two buffers overlap; the bytes are then
    unspecified, but nothing outside the two checked ranges is touched.
    """
    if count >= _LIBC_COPY:
        memcpy(dst, src, count)
    elif count >= 64:
        last = count - 64
        offset = 0
        while offset < last:
            copy64(dst + offset, src + offset)
            offset += 64
        copy64(dst + last, src + last)
    elif count >= 32:
        copy32(dst, src)
        copy32(dst + count - 32, src + count - 32)
    elif count >= 16:
        copy16(dst, src)
        copy16(dst + count - 16, src + count - 16)
    elif count >= 8:
        copy8(dst, src)
        copy8(dst + count - 8, src + count - 8)
    elif count >= 4:
        copy4(dst, src)
        copy4(dst + count - 4, src + count - 4)
    elif count >= 2:
        copy2(dst, src)
        copy2(dst + count - 2, src + count - 2)
    elif count == 1:
        copy1(dst, src)


@kernel
def sg_write(
    q: Queue, segs: Table, first: int, end: int, offset: int, src: int, count: int
) -> None:
    """Copy ``count`` bytes from host address ``src`` into segments [first, end) at ``offset``."""
    i = first
    while count > 0 and i < end:
        seg = segs[i]
        length = seg.length
        if offset >= length:
            offset -= length
            i += 1
            continue
        n = min(length - offset, count)
        copy(seg.host + offset, src, n)
        if q.log:
            log_write(q, seg.gpa + offset, n)
        src += n
        count -= n
        offset = 0
        i += 1


@kernel
def sg_copy(
    q: Queue,
    dst: Table,
    d_first: int,
    d_end: int,
    d_offset: int,
    src: Table,
    s_first: int,
    s_end: int,
    s_offset: int,
    count: int,
) -> None:
    """Copy ``count`` bytes between two segment lists, from and to the given stream offsets."""
    i = s_first
    while i < s_end and s_offset >= src[i].length:
        s_offset -= src[i].length
        i += 1
    j = d_first
    while j < d_end and d_offset >= dst[j].length:
        d_offset -= dst[j].length
        j += 1
    while count > 0 and i < s_end and j < d_end:
        n = min(src[i].length - s_offset, dst[j].length - d_offset, count)
        copy(dst[j].host + d_offset, src[i].host + s_offset, n)
        if q.log:
            log_write(q, dst[j].gpa + d_offset, n)
        count -= n
        s_offset += n
        d_offset += n
        if s_offset == src[i].length:
            s_offset = 0
            i += 1
        if d_offset == dst[j].length:
            d_offset = 0
            j += 1


@kernel
def sg_addr(segs: Table, first: int, end: int, offset: int) -> int:
    """Host address of byte ``offset`` of segments [first, end), or 0 past their end."""
    for i in range(first, end):
        if offset < segs[i].length:
            return segs[i].host + offset
        offset -= segs[i].length
    return 0


@kernel
def gather(dst: int, segs: Table, first: int, end: int, offset: int, count: int) -> None:
    """Copy ``count`` bytes of segments [first, end), from stream ``offset``, to host ``dst``."""
    for i in range(first, end):
        if count <= 0:
            break
        length = segs[i].length
        if offset >= length:
            offset -= length
            continue
        n = min(length - offset, count)
        copy(dst, segs[i].host + offset, n)
        dst += n
        count -= n
        offset = 0


@kernel
def sg_load(segs: Table, first: int, end: int, offset: int, nbytes: int) -> int:
    """The little-endian ``nbytes``-byte (4 or 8) integer at ``offset`` of segments [first, end).

    The bytes may straddle segments; the caller checked that they exist.
    """
    if segs[first].length >= offset + nbytes:
        host = segs[first].host + offset
        return ld_u64(host) if nbytes == 8 else ld_u32(host)
    value = 0
    for b in range(nbytes):
        value |= ld_u8(sg_addr(segs, first, end, offset + b)) << (_BYTE_BITS * b)
    return value


@kernel
def sg_store_u8(q: Queue, segs: Table, first: int, end: int, offset: int, value: int) -> None:
    """Store one byte at ``offset`` of segments [first, end), and log it."""
    for i in range(first, end):
        if offset < segs[i].length:
            st_u8(segs[i].host + offset, value)
            if q.log:
                log_write(q, segs[i].gpa + offset, 1)
            return
        offset -= segs[i].length


@kernel
def log_segments(q: Queue, segs: Table, first: int, end: int, count: int) -> None:
    """Log the first ``count`` bytes of segments [first, end) as written."""
    if q.log == 0:
        return
    for i in range(first, end):
        if count <= 0:
            break
        n = min(segs[i].length, count)
        log_write(q, segs[i].gpa, n)
        count -= n
