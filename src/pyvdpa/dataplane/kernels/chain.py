"""Descriptor chains: the walk and its validation, shared by split and packed rings.

Theory of operation
-------------------
A chain is a list of buffers the driver made available under one head
(split, section 2.7.5) or in consecutive ring slots (packed), possibly
through one indirect table (sections 2.7.5.3 and 2.8.7).
:func:`walk` follows it and checks it with the rules of
:func:`pyvdpa.virtio.ring.walk_chain`, in the same order, with the same
outcome for every chain (the tests feed the same hostile rings to both):

* indirect descriptors only with VIRTIO_F_INDIRECT_DESC, not inside an
  indirect table, not after direct ones in a packed chain (section 2.8.19),
  without NEXT, of a length that is a non-zero multiple of 16;
* at most the queue size of buffers, below 2**32 bytes in all (section
  2.7.5.2);
* device-readable buffers before device-writable ones;
* a split chain revisits no descriptor and names none beyond its table;
* every buffer inside memory the device may access (:func:`translate`).

The first rule broken becomes an ``E_*`` code in the queue row (see
:func:`~pyvdpa.dataplane.kernels.layout.fail`) and the queue refuses
further work, as section 2.1.2 lets a device do.  A translation missing from
the IOTLB is no broken rule: the walk reports ``MISS`` and consumes nothing.
"""

from __future__ import annotations

from pyvdpa.dataplane.kernels.cache import inlined
from pyvdpa.dataplane.kernels.intrinsics import Table, ld_u16, ld_u32, ld_u64
from pyvdpa.dataplane.kernels.layout import (
    ACCESS_READ,
    ACCESS_WRITE,
    E_INDIRECT_CHAINED,
    E_INDIRECT_FEATURE,
    E_INDIRECT_LENGTH,
    E_INDIRECT_NESTED,
    E_INDIRECT_NEXT,
    E_LAYOUT,
    E_LOOP,
    E_NEXT_INDEX,
    E_TOO_BIG,
    E_TOO_MANY,
    ERROR,
    MISS,
    POPPED,
    Popped,
    Queue,
    fail,
)
from pyvdpa.dataplane.kernels.spec import (
    DESC_F_INDIRECT,
    DESC_F_NEXT,
    DESC_F_WRITE,
    DESC_FLAGS,
    DESC_LEN,
    DESC_NEXT,
    DESC_SIZE,
    MAX_CHAIN_BYTES,
)
from pyvdpa.dataplane.kernels.translate import NO_HOST, resolve, translate

__all__ = ["walk"]


@inlined
def walk(
    q: Queue, segs: Table, base: int, table: int, entries: int, first: int, packed: bool
) -> Popped:
    """Walk and validate the chain at entry ``first`` of the table at host address ``table``.

    Mirrors :func:`pyvdpa.virtio.ring.walk_chain`.  Returns ``(status,
    segments, readable segments, readable bytes, writable bytes, entries used
    in the queue's own table, index of the last of them)``; the segments go to
    ``segs`` rows from ``base`` on, readable ones first.  On a broken rule the
    status is ERROR and the queue row holds the error; on a missing
    translation it is MISS.
    """
    size = q.size
    count = 0
    total = 0
    nseg = 0
    nread = 0
    nwrite = 0
    rlen = 0
    wlen = 0
    index = first
    steps = 0
    nested = False
    own_steps = 0
    own_last = first
    while True:
        d = table + DESC_SIZE * index
        addr = ld_u64(d)
        length = ld_u32(d + DESC_LEN)
        # Split: flags, then next.  Packed: buffer id, then flags.
        third = ld_u16(d + DESC_FLAGS)
        fourth = ld_u16(d + DESC_NEXT)
        flags = fourth if packed else third
        steps += 1
        if flags & DESC_F_INDIRECT:
            code = 0
            if q.indirect == 0:
                code = E_INDIRECT_FEATURE
            elif nested:
                code = E_INDIRECT_NESTED
            elif packed and steps > 1:
                code = E_INDIRECT_CHAINED
            elif flags & DESC_F_NEXT:
                code = E_INDIRECT_NEXT
            elif length == 0 or length % DESC_SIZE:
                code = E_INDIRECT_LENGTH
            if code:
                return fail(q, code, length, 0)
            sub = translate(q, addr, length, ACCESS_READ)
            if sub < 0:
                sub = resolve(q, addr, length, ACCESS_READ)
                if sub < 0:
                    return (ERROR if sub == NO_HOST else MISS, 0, 0, 0, 0, 0, 0)
            own_steps = steps
            own_last = index
            nested = True
            table = sub
            entries = length // DESC_SIZE
            index = 0
            steps = 0
            continue
        count += 1
        if count > size:
            return fail(q, E_TOO_MANY, size, 0)
        total += length
        if total >= MAX_CHAIN_BYTES:
            return fail(q, E_TOO_BIG, total, 0)
        writable = flags & DESC_F_WRITE
        if not writable and nwrite:
            return fail(q, E_LAYOUT, 0, 0)
        access = ACCESS_WRITE if writable else ACCESS_READ
        host = translate(q, addr, length, access)
        if host < 0:
            host = resolve(q, addr, length, access)
            if host < 0:
                return (ERROR if host == NO_HOST else MISS, 0, 0, 0, 0, 0, 0)
        seg = segs[base + nseg]
        seg.gpa = addr
        seg.host = host
        seg.length = length
        seg.writable = 1 if writable else 0
        nseg += 1
        if writable:
            nwrite += 1
            wlen += length
        else:
            nread += 1
            rlen += length
        if packed and nested:
            # A packed indirect table is used whole; its NEXT flags mean nothing.
            if steps == entries:
                break
            index += 1
        elif not flags & DESC_F_NEXT:
            break
        elif packed:
            # Consecutive slots; wrapping onto the head is caught by the count rule.
            index += 1
            if index == entries:
                index = 0
        else:
            if steps == entries:
                return fail(q, E_LOOP, entries, 0)
            if fourth >= entries:
                return fail(q, E_NEXT_INDEX, fourth, entries)
            index = fourth
    if nested:
        return (POPPED, nseg, nread, rlen, wlen, own_steps, own_last)
    return (POPPED, nseg, nread, rlen, wlen, steps, index)
