"""The device side of a packed virtqueue (virtio 1.2, section 2.8).

Theory of operation
-------------------
A packed ring is one array of descriptors that driver and device both write,
and two event suppression areas (``off_wrap``, ``flags``).  Each side keeps
a position and a wrap counter that flips every time it passes the end of
the ring.  A descriptor is available when its AVAIL flag equals the
device's available wrap counter and its USED flag differs from it (section
2.8.1); a chain takes consecutive slots and its buffer id is in its last
descriptor.

*Taking a chain* (ordering as section 2.7.13 asks): the head's flags are
loaded with acquire ordering before the rest of the chain is read, and the
chain is walked by :func:`~pyvdpa.dataplane.kernels.chain.walk`; a buffer
id beyond the ring, or more slots in flight than the ring has, is a broken
ring.

*Returning chains*: a used descriptor, written in the slot at the device's
used position, hands a whole chain (all its slots) back, WRITE set when its
length counts written bytes (sections 2.8.3 and 2.8.4).  :func:`push`
records it in the queue's shadow table and :func:`publish` writes a burst
of them: every descriptor's id and length, the flags last with release
ordering, and the burst's first descriptor's flags after all the others, so
that the driver takes the whole burst at once and the ring's cache lines,
which the driver writes too, change hands once per burst (as DPDK's shadow
used ring does).

*In order* (``VIRTIO_F_IN_ORDER``, section 2.8.8): a chain's buffer id
must be the slot of its head, or the ring breaks.  With ``batch``, a chain
used completely leaves the batch open: the next chain pushed replaces its
shadow entry (id, WRITE and length; the slot and wrap bits stay the
batch's first), so one used descriptor stands for the batch and the used
position skips all its slots.  The rule is
:meth:`pyvdpa.virtio.packed.PackedDeviceQueue.push_batch`'s.

*Notifications* (section 2.8.10): the device writes its event area's flags
(ENABLE, DISABLE, or DESC with the slot and wrap counter at which it wants a
kick) and reads the driver's: DESC with EVENT_IDX means interrupt when the
driver's ``off_wrap`` lies among the slots just used (:func:`need_event`).
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
    st_u32,
)
from pyvdpa.dataplane.kernels.layout import (
    E_AVAIL_SLOTS,
    E_ID_INDEX,
    E_ORDER,
    EMPTY,
    ERROR,
    MISS,
    POPPED,
    Popped,
    Queue,
    fail,
    shadow_at,
)
from pyvdpa.dataplane.kernels.spec import (
    DESC_F_WRITE,
    DESC_LEN,
    DESC_SIZE,
    EVENT_F_DESC,
    EVENT_F_DISABLE,
    EVENT_F_ENABLE,
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
from pyvdpa.dataplane.kernels.translate import log_write, translate

__all__ = [
    "disable",
    "enable",
    "head_available",
    "is_avail",
    "pop",
    "prefetch",
    "publish",
    "push",
    "unpop",
    "wants_interrupt",
]

# A shadow entry is the used descriptor's last 8 bytes as one u64: the buffer id, the
# flags, the length (see SHADOW).
_FLAGS_SHIFT = 16
_LEN_SHIFT = 32
_U16 = 0xFFFF


@kernel
def is_avail(flags: int, wrap: int) -> bool:
    """Whether descriptor ``flags`` mark it available to a device whose wrap counter is ``wrap``."""
    both = flags & (PACKED_DESC_F_AVAIL | PACKED_DESC_F_USED)
    return both == (PACKED_DESC_F_AVAIL if wrap else PACKED_DESC_F_USED)


@inlined
def pop(q: Queue, segs: Table, base: int) -> Popped:
    """Take the chain at the next slot; see :func:`pyvdpa.dataplane.kernels.ring.ring_pop`."""
    size = q.size
    idx = q.last_avail
    wrap = q.avail_wrap
    desc = q.desc
    if not is_avail(ld_acq_u16(desc + DESC_SIZE * idx + PACKED_DESC_FLAGS), wrap):
        return (EMPTY, 0, 0, 0, 0, 0, 0)
    status, nseg, nread, rlen, wlen, dc, last = walk(q, segs, base, desc, size, idx, True)
    if status != POPPED:
        return (EMPTY if status == MISS else ERROR, 0, 0, 0, 0, 0, 0)
    ident = ld_u16(desc + DESC_SIZE * last + PACKED_DESC_ID)
    if ident >= size:
        return fail(q, E_ID_INDEX, ident, size)
    if q.in_order and ident != idx:
        return fail(q, E_ORDER, ident, idx)
    if q.inflight_slots + dc > size:
        return fail(q, E_AVAIL_SLOTS, dc, q.inflight_slots)
    idx += dc
    if idx >= size:
        idx -= size
        wrap ^= 1
    q.last_avail = idx
    q.avail_wrap = wrap
    q.inflight_slots += dc
    q.inflight += 1
    if q.notify and q.event_idx:
        # Keep asking for a kick at the next slot the driver fills.
        st_u16(q.device + EVENT_OFF_WRAP, idx | (wrap << PACKED_WRAP_SHIFT))
    return (POPPED, ident, nseg, nread, rlen, wlen, dc)


@inlined
def unpop(q: Queue, slots: int) -> None:
    """Give back the last chains taken, ``slots`` ring slots in all."""
    idx = q.last_avail - slots
    if idx < 0:
        idx += q.size
        q.avail_wrap ^= 1
    q.last_avail = idx
    q.inflight_slots -= slots


@inlined
def push(q: Queue, ident: int, written: int, desc_count: int, whole: bool) -> None:
    """Record the used descriptor of chain ``ident`` (``desc_count`` slots) in the shadow.

    ``whole``: the device wrote every writable byte of the chain.
    """
    size = q.size
    used = q.used_idx
    flags = (PACKED_DESC_F_AVAIL | PACKED_DESC_F_USED) if q.used_wrap else 0
    n = q.unpublished
    if q.batch_open:
        # The open batch's descriptor, at its first slot with that slot's wrap bits.
        n -= 1
        entry = shadow_at(q.shadow, size)[n]
        flags = (entry.entry >> _FLAGS_SHIFT) & (PACKED_DESC_F_AVAIL | PACKED_DESC_F_USED)
    else:
        entry = shadow_at(q.shadow, size)[n]
        entry.slot = used
    if written:
        flags |= DESC_F_WRITE
    entry.entry = ident | (flags << _FLAGS_SHIFT) | (written << _LEN_SHIFT)
    q.unpublished = n + 1
    if q.batch:
        q.batch_open = whole
    used += desc_count
    if used >= size:
        used -= size
        q.used_wrap ^= 1
    q.used_idx = used
    q.inflight_slots -= desc_count
    q.unsignalled += desc_count


@kernel
def _write_used(q: Queue, slot: int, entry: int) -> None:
    """Write one used descriptor; its flags, released last, hand it to the driver."""
    offset = DESC_SIZE * slot
    d = q.desc + offset
    st_u32(d + DESC_LEN, entry >> _LEN_SHIFT)
    st_u16(d + PACKED_DESC_ID, entry & _U16)
    st_rel_u16(d + PACKED_DESC_FLAGS, (entry >> _FLAGS_SHIFT) & _U16)
    if q.log:
        log_write(q, q.log_ring + offset, DESC_SIZE)


@inlined
def publish(q: Queue, count: int) -> None:
    """Write the ``count`` used descriptors recorded, the first one's flags last."""
    shadow = shadow_at(q.shadow, q.size)
    for i in range(1, count):
        _write_used(q, shadow[i].slot, shadow[i].entry)
    _write_used(q, shadow[0].slot, shadow[0].entry)


@inlined
def wants_interrupt(q: Queue, pushed: int) -> bool:
    """Whether the driver asks to be interrupted for the last ``pushed`` slots used."""
    area = q.driver
    off_wrap = ld_u16(area + EVENT_OFF_WRAP)
    mode = ld_u16(area + EVENT_FLAGS) & EVENT_FLAGS_MASK
    if mode == EVENT_F_DISABLE:
        return False
    if mode == EVENT_F_DESC and q.event_idx:
        new = q.used_idx
        event = off_wrap & PACKED_OFF_MASK
        if (off_wrap >> PACKED_WRAP_SHIFT) != q.used_wrap:
            event -= q.size
        return need_event(event, new, new - min(pushed, RING_IDX_MASK))
    return True


@inlined
def disable(q: Queue) -> None:
    """Ask the driver not to kick (DISABLE)."""
    st_u16(q.device + EVENT_FLAGS, EVENT_F_DISABLE)


@inlined
def enable(q: Queue) -> None:
    """Ask the driver to kick: at the next slot with EVENT_IDX (DESC), else for any (ENABLE)."""
    if q.event_idx:
        st_u16(q.device + EVENT_OFF_WRAP, q.last_avail | (q.avail_wrap << PACKED_WRAP_SHIFT))
        st_u16(q.device + EVENT_FLAGS, EVENT_F_DESC)
    else:
        st_u16(q.device + EVENT_FLAGS, EVENT_F_ENABLE)


@inlined
def head_available(q: Queue) -> bool:
    """Whether the next slot holds an available descriptor (acquire load of its flags)."""
    flags = ld_acq_u16(q.desc + DESC_SIZE * q.last_avail + PACKED_DESC_FLAGS)
    return is_avail(flags, q.avail_wrap)


@inlined
def prefetch(q: Queue, count: int) -> None:
    """Start loading the first buffer line of the next ``count`` available chains, for writing."""
    size = q.size
    desc = q.desc
    idx = q.last_avail
    wrap = q.avail_wrap
    for _ in range(min(count, size)):
        d = desc + DESC_SIZE * idx
        if not is_avail(ld_acq_u16(d + PACKED_DESC_FLAGS), wrap):
            break
        host = translate(q, ld_u64(d), 1, 0)
        if host >= 0:
            prefetch_write(host)
        idx += 1
        if idx == size:
            idx = 0
            wrap ^= 1
