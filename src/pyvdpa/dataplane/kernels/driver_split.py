"""The driver side of a split virtqueue (virtio 1.2, section 2.7), compiled.

Theory of operation
-------------------
*Adding chains* (section 2.7.13): descriptor ``i`` carries buffer slot
``i``; the driver writes each descriptor and its available entry, then
publishes the burst with one release store of ``avail.idx``.  A full fence
follows, so that the device's notification suppression is read after the
index is visible: with EVENT_IDX the device is kicked when its
``avail_event`` lies among the entries just published (:func:`need_event`,
the rule the device side uses), without it unless ``used.flags`` has
NO_NOTIFY.

*Reclaiming* (section 2.7.14): ``used.idx`` is loaded with acquire
ordering; the entries up to it are checked (a chain in flight, a length
within its buffer) and their descriptors go back on the free stack.  With
EVENT_IDX ``used_event`` is kept one behind the last entry read, so the
device never finds a reason to interrupt; without it the available ring's
NO_INTERRUPT flag, set when the ring was made, says the same.
"""

from __future__ import annotations

from pyvdpa.dataplane.kernels.cache import inlined
from pyvdpa.dataplane.kernels.driver_net import received
from pyvdpa.dataplane.kernels.driver_row import DE_USED_JUMP, DriverQueue, broken, retire
from pyvdpa.dataplane.kernels.intrinsics import (
    fence,
    ld_acq_u16,
    ld_u16,
    ld_u64,
    st_rel_u16,
    st_u16,
    st_u64,
)
from pyvdpa.dataplane.kernels.spec import (
    AVAIL_ENTRY_SIZE,
    DESC_F_WRITE,
    DESC_LEN,
    DESC_SIZE,
    RING_ENTRIES,
    RING_FLAGS,
    RING_IDX,
    RING_IDX_MASK,
    USED_ENTRY_SIZE,
    USED_F_NO_NOTIFY,
)
from pyvdpa.dataplane.kernels.split import need_event

__all__ = ["add", "reclaim"]

_WORD = 8
_FLAGS_SHIFT = 32
"""A descriptor's len and flags as one u64: the flags start 32 bits in."""
_U32_MASK = 0xFFFFFFFF


@inlined
def add(q: DriverQueue, count: int) -> bool:
    """Make ``count`` chains available (``count`` <= free descriptors); True to kick."""
    size = q.size
    old = q.avail_idx
    idx = old
    top = q.free_top
    for _ in range(count):
        top -= 1
        head = ld_u64(q.free + _WORD * top)
        desc = q.desc + DESC_SIZE * head
        # A staged chain carries the length of the frame copied in.
        length = ld_u64(q.busy + _WORD * head) or q.chain_len
        st_u64(desc, q.buffers_dev + head * q.slot)
        # len, then flags (WRITE for a receive buffer) and next 0: a chain of one buffer.
        st_u64(desc + DESC_LEN, length | (DESC_F_WRITE * q.receive) << _FLAGS_SHIFT)
        st_u64(q.busy + _WORD * head, length)
        st_u16(q.driver + RING_ENTRIES + AVAIL_ENTRY_SIZE * (idx & (size - 1)), head)
        idx = (idx + 1) & RING_IDX_MASK
    q.free_top = top
    q.inflight += count
    q.avail_idx = idx
    st_rel_u16(q.driver + RING_IDX, idx)
    # The device's suppression must be read after it can see the new index.
    fence()
    if q.event_idx:
        avail_event = ld_u16(q.device + RING_ENTRIES + USED_ENTRY_SIZE * size)
        return need_event(avail_event, idx, old)
    return not ld_u16(q.device + RING_FLAGS) & USED_F_NO_NOTIFY


@inlined
def reclaim(q: DriverQueue) -> int:
    """Take back the chains the device used; their number, or -1 when it broke the ring."""
    size = q.size
    last = q.last_used
    pending = (ld_acq_u16(q.device + RING_IDX) - last) & RING_IDX_MASK
    if pending == 0:
        return 0
    if pending > q.inflight:
        return broken(q, DE_USED_JUMP, pending, q.inflight)
    if q.peer:
        pending = min(pending, q.budget)
    for _ in range(pending):
        elem = ld_u64(q.device + RING_ENTRIES + USED_ENTRY_SIZE * (last & (size - 1)))
        ident = elem & _U32_MASK
        length = (elem >> 32) & _U32_MASK
        if retire(q, ident, length, last) < 0:
            return -1
        if q.receive:
            received(q, ident, length)
        last = (last + 1) & RING_IDX_MASK
    q.last_used = last
    if q.event_idx:
        st_u16(q.driver + RING_ENTRIES + AVAIL_ENTRY_SIZE * size, (last - 1) & RING_IDX_MASK)
    return pending
