"""The device's records in the vhost-user inflight region, from the compiled programs.

Theory of operation
-------------------
The region (vhost-user spec, "Inflight I/O tracking") is the one
:mod:`pyvdpa.device.inflight` describes: one part per queue, shared with the
front-end, which keeps it across back-end restarts.  The compiled ``blk``
program records what it takes and completes there, with the layout's
offsets from :mod:`~pyvdpa.dataplane.kernels.spec`, in the order the spec
gives and :class:`~pyvdpa.device.inflight.SplitInflightQueue` /
:class:`~pyvdpa.device.inflight.PackedInflightQueue` follow:

* *take* (before the request touches the disk): split, the head's
  ``counter`` then ``inflight``; packed, copies of the chain's ring
  descriptors into entries taken off the free list, then ``old_free_head``;
* *record* a batch (before its used entries are published): split, the
  heads linked into the last-batch list; packed, the entries given back to
  the free list and the used position after the batch;
* *commit* it (after publishing): split, ``inflight`` cleared and
  ``used_idx``; packed, ``inflight`` cleared and the ``old_*`` fields.

A process killed between any two of these stores leaves a region that
:meth:`~pyvdpa.device.inflight.SplitInflightQueue.recover` repairs; the
recovery and the resubmission of what was left undone run in Python when a
ring starts (:mod:`pyvdpa.dataplane.blk`).  Entries are indexed only after
a bounds check against the queue size: the front-end can write the region.
"""

from __future__ import annotations

from pyvdpa.dataplane.kernels.cache import inlined
from pyvdpa.dataplane.kernels.intrinsics import (
    ld_u8,
    ld_u16,
    ld_u32,
    ld_u64,
    st_u8,
    st_u16,
    st_u32,
    st_u64,
)
from pyvdpa.dataplane.kernels.spec import (
    DESC_LEN,
    DESC_SIZE,
    INFLIGHT_PACKED_ADDR,
    INFLIGHT_PACKED_COUNTER,
    INFLIGHT_PACKED_DESC,
    INFLIGHT_PACKED_FLAGS,
    INFLIGHT_PACKED_FREE_HEAD,
    INFLIGHT_PACKED_HEADER,
    INFLIGHT_PACKED_ID,
    INFLIGHT_PACKED_INFLIGHT,
    INFLIGHT_PACKED_LAST,
    INFLIGHT_PACKED_LEN,
    INFLIGHT_PACKED_NEXT,
    INFLIGHT_PACKED_NUM,
    INFLIGHT_PACKED_OLD_FREE_HEAD,
    INFLIGHT_PACKED_OLD_USED_IDX,
    INFLIGHT_PACKED_OLD_USED_WRAP,
    INFLIGHT_PACKED_USED_IDX,
    INFLIGHT_PACKED_USED_WRAP,
    INFLIGHT_SPLIT_COUNTER,
    INFLIGHT_SPLIT_DESC,
    INFLIGHT_SPLIT_HEADER,
    INFLIGHT_SPLIT_INFLIGHT,
    INFLIGHT_SPLIT_LAST_BATCH_HEAD,
    INFLIGHT_SPLIT_NEXT,
    INFLIGHT_SPLIT_USED_IDX,
    PACKED_DESC_FLAGS,
    PACKED_DESC_ID,
)

__all__ = [
    "packed_commit",
    "packed_commit_batch",
    "packed_record",
    "packed_take",
    "packed_used",
    "split_commit",
    "split_record",
    "split_take",
]


@inlined
def _split_entry(base: int, head: int) -> int:
    return base + INFLIGHT_SPLIT_HEADER + INFLIGHT_SPLIT_DESC * head


@inlined
def _packed_entry(base: int, index: int) -> int:
    return base + INFLIGHT_PACKED_HEADER + INFLIGHT_PACKED_DESC * index


@inlined
def split_take(base: int, head: int, counter: int) -> None:
    """Record head ``head`` as taken, ``counter`` saying when."""
    entry = _split_entry(base, head)
    st_u64(entry + INFLIGHT_SPLIT_COUNTER, counter)
    st_u8(entry + INFLIGHT_SPLIT_INFLIGHT, 1)


@inlined
def split_record(base: int, head: int) -> None:
    """Link head ``head``, about to be published, into the last-batch list."""
    entry = _split_entry(base, head)
    st_u16(entry + INFLIGHT_SPLIT_NEXT, ld_u16(base + INFLIGHT_SPLIT_LAST_BATCH_HEAD))
    st_u16(base + INFLIGHT_SPLIT_LAST_BATCH_HEAD, head)


@inlined
def split_commit(base: int, head: int, used_idx: int) -> None:
    """Clear head ``head``, published; the used ring's ``idx`` is now ``used_idx``."""
    st_u8(_split_entry(base, head) + INFLIGHT_SPLIT_INFLIGHT, 0)
    st_u16(base + INFLIGHT_SPLIT_USED_IDX, used_idx)


@inlined
def packed_take(base: int, size: int, desc: int, first: int, count: int, counter: int) -> int:
    """Copy the ``count`` ring descriptors from slot ``first`` into free entries.

    Returns the chain's entry, or -1 when the free list leaves the queue
    (a region the front-end corrupted), before anything is written.
    """
    head = ld_u16(base + INFLIGHT_PACKED_OLD_FREE_HEAD)
    # Walk the free list first: a hostile one is refused whole.
    free = head
    for _ in range(count):
        if free >= size:
            return -1
        free = ld_u16(_packed_entry(base, free) + INFLIGHT_PACKED_NEXT)
    head_entry = _packed_entry(base, head)
    slot = first
    free = head
    for i in range(count):
        if i == 0:
            st_u16(head_entry + INFLIGHT_PACKED_NUM, 0)
            st_u64(head_entry + INFLIGHT_PACKED_COUNTER, counter)
            st_u8(head_entry + INFLIGHT_PACKED_INFLIGHT, 1)
        if i == count - 1:
            st_u16(head_entry + INFLIGHT_PACKED_LAST, free)
        st_u16(head_entry + INFLIGHT_PACKED_NUM, i + 1)
        entry = _packed_entry(base, free)
        d = desc + DESC_SIZE * slot
        st_u64(entry + INFLIGHT_PACKED_ADDR, ld_u64(d))
        st_u32(entry + INFLIGHT_PACKED_LEN, ld_u32(d + DESC_LEN))
        st_u16(entry + INFLIGHT_PACKED_ID, ld_u16(d + PACKED_DESC_ID))
        st_u16(entry + INFLIGHT_PACKED_FLAGS, ld_u16(d + PACKED_DESC_FLAGS))
        free = ld_u16(entry + INFLIGHT_PACKED_NEXT)
        st_u16(base + INFLIGHT_PACKED_FREE_HEAD, free)
        slot += 1
        if slot == size:
            slot = 0
    st_u16(base + INFLIGHT_PACKED_OLD_FREE_HEAD, free)
    return head


@inlined
def packed_record(base: int, size: int, head: int) -> None:
    """Give the entries of the chain at entry ``head`` back to the free list."""
    last = ld_u16(_packed_entry(base, head) + INFLIGHT_PACKED_LAST)
    if last < size:
        st_u16(
            _packed_entry(base, last) + INFLIGHT_PACKED_NEXT,
            ld_u16(base + INFLIGHT_PACKED_FREE_HEAD),
        )
        st_u16(base + INFLIGHT_PACKED_FREE_HEAD, head)


@inlined
def packed_used(base: int, used_idx: int, used_wrap: int) -> None:
    """Record the used position after the batch being returned."""
    st_u16(base + INFLIGHT_PACKED_USED_IDX, used_idx)
    st_u8(base + INFLIGHT_PACKED_USED_WRAP, used_wrap)


@inlined
def packed_commit(base: int, head: int) -> None:
    """Clear the chain at entry ``head``, published."""
    st_u8(_packed_entry(base, head) + INFLIGHT_PACKED_INFLIGHT, 0)


@inlined
def packed_commit_batch(base: int) -> None:
    """Make the recorded free list and used position the committed ones."""
    st_u16(base + INFLIGHT_PACKED_OLD_FREE_HEAD, ld_u16(base + INFLIGHT_PACKED_FREE_HEAD))
    st_u16(base + INFLIGHT_PACKED_OLD_USED_IDX, ld_u16(base + INFLIGHT_PACKED_USED_IDX))
    st_u8(base + INFLIGHT_PACKED_OLD_USED_WRAP, ld_u8(base + INFLIGHT_PACKED_USED_WRAP))
