"""The device side of a split virtqueue (virtio 1.2, section 2.7).

Theory of operation
-------------------
A split ring has three areas: the descriptor table, the available ring the
driver writes (``flags``, ``idx``, ``ring[size]``, ``used_event``) and the
used ring the device writes (``flags``, ``idx``, ``ring[size]`` of
``{id, len}``, ``avail_event``).  Indices run free modulo 2**16; the
queue size is a power of two.

*Taking a chain* (ordering as section 2.7.13 asks): the device loads
``avail.idx`` with acquire ordering, once for every run of chains made
available since its last load (``Q_AVAIL_SEEN``), so that the heads and
descriptors it then reads are those the driver published; an index more
than the queue size ahead is a broken ring.  The head at ``last_avail`` is walked by
:func:`~pyvdpa.dataplane.kernels.chain.walk`.

*Returning chains* (section 2.7.8): :func:`push` writes used elements in
place; :func:`publish` makes a burst of them visible with one release store
of ``used.idx``.  Every ring write is logged when the queue logs.

*In order* (``VIRTIO_F_IN_ORDER``, section 2.7.9): a chain must start at
``next_head``, the descriptor after the previous chain's last (unknown
until the first chain), and end ``desc_count - 1`` descriptors further on;
anything else breaks the ring.  With ``batch``, a chain used completely
leaves the batch open: the next chain pushed writes its element in the same
slot, so one element, naming the batch's last chain, stands for the whole
batch, while ``used.idx`` counts every chain; :func:`publish` closes it.
The rule is :meth:`pyvdpa.virtio.split.SplitDeviceQueue.push_batch`'s.

*Notifications* (sections 2.7.7 and 2.7.10): without EVENT_IDX the device
sets ``used.flags`` NO_NOTIFY to ask not to be kicked and honours the
driver's ``avail.flags`` NO_INTERRUPT; with it, it writes ``avail_event``
(the index at which it wants a kick) and interrupts when ``used_event``
lies among the entries it just published (:func:`need_event`).
"""

from __future__ import annotations

from pyvdpa.dataplane.kernels.cache import inlined, kernel
from pyvdpa.dataplane.kernels.chain import walk
from pyvdpa.dataplane.kernels.intrinsics import (
    Table,
    ld_acq_u16,
    ld_u16,
    ld_u64,
    prefetch_write,
    st_rel_u16,
    st_u16,
    st_u64,
)
from pyvdpa.dataplane.kernels.layout import (
    E_AVAIL_JUMP,
    E_HEAD_INDEX,
    E_ORDER,
    E_ORDER_LINKS,
    EMPTY,
    ERROR,
    MISS,
    POPPED,
    Popped,
    Queue,
    fail,
)
from pyvdpa.dataplane.kernels.spec import (
    AVAIL_ENTRY_SIZE,
    AVAIL_F_NO_INTERRUPT,
    DESC_SIZE,
    RING_ENTRIES,
    RING_FLAGS,
    RING_IDX,
    RING_IDX_MASK,
    USED_ENTRY_SIZE,
    USED_F_NO_NOTIFY,
)
from pyvdpa.dataplane.kernels.translate import log_write, translate

__all__ = [
    "disable",
    "enable",
    "head_available",
    "need_event",
    "pop",
    "prefetch",
    "publish",
    "push",
    "unpop",
    "wants_interrupt",
]

_LEN_SHIFT = 32
"""A used element as one u64: the id in the low half, the length in the high half."""


@kernel
def need_event(event: int, new: int, old: int) -> bool:
    """``vring_need_event`` (section 2.7.10), modulo 2**16."""
    return ((new - event - 1) & RING_IDX_MASK) < ((new - old) & RING_IDX_MASK)


@kernel
def _set_avail_event(q: Queue, idx: int) -> None:
    offset = RING_ENTRIES + USED_ENTRY_SIZE * q.size
    st_u16(q.device + offset, idx & RING_IDX_MASK)
    if q.log:
        log_write(q, q.log_ring + offset, 2)


@kernel
def _set_used_flags(q: Queue, flags: int) -> None:
    st_u16(q.device + RING_FLAGS, flags)
    if q.log:
        log_write(q, q.log_ring + RING_FLAGS, 2)


@inlined
def pop(q: Queue, segs: Table, base: int) -> Popped:
    """Take the chain at ``last_avail``; see :func:`pyvdpa.dataplane.kernels.ring.ring_pop`."""
    size = q.size
    last = q.last_avail
    avail = q.driver
    if last == q.avail_seen:
        idx = ld_acq_u16(avail + RING_IDX)
        pending = (idx - last) & RING_IDX_MASK
        if pending == 0:
            return (EMPTY, 0, 0, 0, 0, 0, 0)
        if pending > size:
            return fail(q, E_AVAIL_JUMP, idx, last)
        q.avail_seen = idx
    head = ld_u16(avail + RING_ENTRIES + AVAIL_ENTRY_SIZE * (last & (size - 1)))
    if head >= size:
        return fail(q, E_HEAD_INDEX, head, size)
    status, nseg, nread, rlen, wlen, dc, end = walk(q, segs, base, q.desc, size, head, False)
    if status != POPPED:
        return (EMPTY if status == MISS else ERROR, 0, 0, 0, 0, 0, 0)
    if q.in_order:
        if q.next_head >= 0 and head != q.next_head:
            return fail(q, E_ORDER, head, q.next_head)
        if end != (head + dc - 1) & (size - 1):
            return fail(q, E_ORDER_LINKS, head, end)
        q.next_head = (end + 1) & (size - 1)
    last = (last + 1) & RING_IDX_MASK
    q.last_avail = last
    q.inflight += 1
    if q.notify and q.event_idx:
        # Keep asking for a kick at the next buffer the driver adds.
        _set_avail_event(q, last)
    return (POPPED, head, nseg, nread, rlen, wlen, dc)


@inlined
def unpop(q: Queue, count: int, descs: int) -> None:
    """Give back the last ``count`` chains taken, ``descs`` table descriptors in all."""
    q.last_avail = (q.last_avail - count) & RING_IDX_MASK
    if q.in_order and q.next_head >= 0:
        q.next_head = (q.next_head - descs) & (q.size - 1)


@inlined
def push(q: Queue, ident: int, written: int, whole: bool) -> None:
    """Write the used element of chain ``ident``, unpublished until :func:`publish`.

    ``whole``: the device wrote every writable byte of the chain.
    """
    used = q.used_idx
    slot = q.batch_slot if q.batch_open else used
    offset = RING_ENTRIES + USED_ENTRY_SIZE * (slot & (q.size - 1))
    st_u64(q.device + offset, ident | (written << _LEN_SHIFT))
    if q.batch:
        q.batch_open = whole
        q.batch_slot = slot
    q.used_idx = (used + 1) & RING_IDX_MASK
    q.unpublished += 1
    q.unsignalled += 1
    if q.log:
        log_write(q, q.log_ring + offset, USED_ENTRY_SIZE)


@inlined
def publish(q: Queue) -> None:
    """Publish the used elements written since the last call: one release store of used.idx."""
    st_rel_u16(q.device + RING_IDX, q.used_idx)
    if q.log:
        log_write(q, q.log_ring + RING_IDX, 2)


@inlined
def wants_interrupt(q: Queue, pushed: int) -> bool:
    """Whether the driver asks to be interrupted for the last ``pushed`` used elements."""
    new = q.used_idx
    if q.event_idx:
        used_event = ld_u16(q.driver + RING_ENTRIES + AVAIL_ENTRY_SIZE * q.size)
        return need_event(used_event, new, new - min(pushed, RING_IDX_MASK))
    return not ld_u16(q.driver + RING_FLAGS) & AVAIL_F_NO_INTERRUPT


@inlined
def disable(q: Queue) -> None:
    """Ask the driver not to kick: NO_NOTIFY, or an avail_event held back."""
    if q.event_idx:
        _set_avail_event(q, q.last_avail - 1)
    else:
        _set_used_flags(q, USED_F_NO_NOTIFY)


@inlined
def enable(q: Queue) -> None:
    """Ask the driver to kick for the next buffer it adds."""
    if q.event_idx:
        _set_avail_event(q, q.last_avail)
    else:
        _set_used_flags(q, 0)


@inlined
def head_available(q: Queue) -> bool:
    """Whether the driver made a chain available past ``last_avail`` (acquire load)."""
    return ld_acq_u16(q.driver + RING_IDX) != q.last_avail


@inlined
def prefetch(q: Queue, count: int) -> None:
    """Start loading the first buffer line of the next ``count`` available chains, for writing."""
    size = q.size
    last = q.last_avail
    avail = q.driver
    pending = (ld_acq_u16(avail + RING_IDX) - last) & RING_IDX_MASK
    for i in range(min(count, pending, size)):
        head = ld_u16(avail + RING_ENTRIES + AVAIL_ENTRY_SIZE * ((last + i) & (size - 1)))
        if head >= size:
            break
        host = translate(q, ld_u64(q.desc + DESC_SIZE * head), 1, 0)
        if host >= 0:
            prefetch_write(host)
