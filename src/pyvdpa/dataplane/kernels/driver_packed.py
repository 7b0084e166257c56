"""The driver side of a packed virtqueue (virtio 1.2, section 2.8), compiled.

Theory of operation
-------------------
*Adding chains* (section 2.8.6): each chain is one descriptor, written in
the slot at the driver's available position with the buffer id of its
buffer slot; its flags carry AVAIL equal to the driver's wrap counter and
USED different from it.  A burst's descriptors are written in order, the
first one's flags last with release ordering, so that the device takes the
whole burst at once (section 2.8.21.3.1, "Implementation note").  A full
fence follows before the device event area is read: DISABLE means no kick,
DESC (with EVENT_IDX) a kick when the slot it names lies among those just
made available, anything else a kick.

*Reclaiming* (section 2.8.4): the slot at the driver's used position holds
a used descriptor when both its AVAIL and USED flags equal the driver's
used wrap counter (flags loaded with acquire ordering).  Each chain here
takes one slot, so the used position moves on one slot per used
descriptor; its buffer id must be in flight and its length (counted only
with WRITE) within the chain's buffer.  Interrupts stay off: the driver
event area says DISABLE from the start.
"""

from __future__ import annotations

from pyvdpa.dataplane.kernels.cache import inlined
from pyvdpa.dataplane.kernels.driver_net import received
from pyvdpa.dataplane.kernels.driver_row import DriverQueue, retire
from pyvdpa.dataplane.kernels.intrinsics import (
    fence,
    ld_acq_u16,
    ld_u16,
    ld_u32,
    ld_u64,
    st_rel_u16,
    st_u16,
    st_u32,
    st_u64,
)
from pyvdpa.dataplane.kernels.spec import (
    DESC_F_WRITE,
    DESC_LEN,
    DESC_SIZE,
    EVENT_F_DESC,
    EVENT_F_DISABLE,
    EVENT_FLAGS,
    EVENT_FLAGS_MASK,
    EVENT_OFF_WRAP,
    PACKED_DESC_F_AVAIL,
    PACKED_DESC_F_USED,
    PACKED_DESC_FLAGS,
    PACKED_DESC_ID,
    PACKED_OFF_MASK,
    PACKED_WRAP_SHIFT,
    RING_IDX_MASK,
)
from pyvdpa.dataplane.kernels.split import need_event

__all__ = ["add", "reclaim"]

_WORD = 8
_AVAIL_USED = PACKED_DESC_F_AVAIL | PACKED_DESC_F_USED


@inlined
def _avail_flags(q: DriverQueue, wrap: int) -> int:
    """A chain's flags: AVAIL and USED for the wrap counter, WRITE for a receive buffer."""
    marks = PACKED_DESC_F_AVAIL if wrap else PACKED_DESC_F_USED
    return marks | (DESC_F_WRITE if q.receive else 0)


@inlined
def add(q: DriverQueue, count: int) -> bool:
    """Make ``count`` chains available (``count`` <= free descriptors); True to kick."""
    size = q.size
    idx = q.avail_idx
    wrap = q.avail_wrap
    top = q.free_top
    first = q.desc + DESC_SIZE * idx
    first_flags = _avail_flags(q, wrap)
    for i in range(count):
        top -= 1
        ident = ld_u64(q.free + _WORD * top)
        d = q.desc + DESC_SIZE * idx
        # A staged chain carries the length of the frame copied in.
        length = ld_u64(q.busy + _WORD * ident) or q.chain_len
        st_u64(d, q.buffers_dev + ident * q.slot)
        st_u32(d + DESC_LEN, length)
        st_u16(d + PACKED_DESC_ID, ident)
        st_u64(q.busy + _WORD * ident, length)
        if i > 0:
            st_rel_u16(d + PACKED_DESC_FLAGS, _avail_flags(q, wrap))
        idx += 1
        if idx == size:
            idx = 0
            wrap ^= 1
    # The first descriptor's flags hand the whole burst over.
    st_rel_u16(first + PACKED_DESC_FLAGS, first_flags)
    q.free_top = top
    q.inflight += count
    q.avail_idx = idx
    q.avail_wrap = wrap
    fence()
    mode = ld_u16(q.device + EVENT_FLAGS) & EVENT_FLAGS_MASK
    if mode == EVENT_F_DISABLE:
        return False
    if mode == EVENT_F_DESC and q.event_idx:
        off_wrap = ld_u16(q.device + EVENT_OFF_WRAP)
        event = off_wrap & PACKED_OFF_MASK
        if (off_wrap >> PACKED_WRAP_SHIFT) != wrap:
            event -= size
        return need_event(event, idx, idx - min(count, RING_IDX_MASK))
    return True


@inlined
def reclaim(q: DriverQueue) -> int:
    """Take back the chains the device used; their number, or -1 when it broke the ring."""
    size = q.size
    idx = q.last_used
    wrap = q.used_wrap
    taken = 0
    used_flags = _AVAIL_USED if wrap else 0
    while q.inflight > 0 and (q.peer == 0 or q.budget > 0):
        d = q.desc + DESC_SIZE * idx
        flags = ld_acq_u16(d + PACKED_DESC_FLAGS)
        if flags & _AVAIL_USED != used_flags:
            break
        ident = ld_u16(d + PACKED_DESC_ID)
        length = ld_u32(d + DESC_LEN) if flags & DESC_F_WRITE else 0
        if retire(q, ident, length, idx) < 0:
            return -1
        if q.receive:
            received(q, ident, length)
        taken += 1
        idx += 1
        if idx == size:
            idx = 0
            wrap ^= 1
            used_flags = _AVAIL_USED if wrap else 0
    q.last_used = idx
    q.used_wrap = wrap
    return taken
