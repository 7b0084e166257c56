"""The specification values the kernels compile in: virtio 1.2, Linux.

They are written out here rather than imported from :mod:`pyvdpa.virtio`
so that the machine code depends on this package's files alone, which is
what its cache is keyed on (:mod:`~pyvdpa.dataplane.kernels.cache`); the
tests hold them to the shared definitions.
"""

from __future__ import annotations

# Descriptors (sections 2.7.5 and 2.8.13): addr (u64), len (u32), then flags and next
# (split) or buffer id and flags (packed), u16 each.
DESC_SIZE = 16
"""Bytes of a descriptor, split or packed, direct or in an indirect table."""
DESC_LEN = 8
DESC_FLAGS = 12
DESC_NEXT = 14
PACKED_DESC_ID = 12
PACKED_DESC_FLAGS = 14
DESC_F_NEXT = 1
DESC_F_WRITE = 2
DESC_F_INDIRECT = 4
PACKED_DESC_F_AVAIL = 1 << 7
PACKED_DESC_F_USED = 1 << 15

# Split rings (sections 2.7.6 and 2.7.8): flags (u16), idx (u16), then the entries; the
# driver's used_event follows the available ring, the device's avail_event the used ring.
RING_FLAGS = 0
RING_IDX = 2
RING_ENTRIES = 4
AVAIL_ENTRY_SIZE = 2
USED_ENTRY_SIZE = 8
"""A used element: id (u32), len (u32)."""
RING_IDX_MASK = 0xFFFF
"""Split ring indices run free modulo 2**16."""
USED_F_NO_NOTIFY = 1
AVAIL_F_NO_INTERRUPT = 1

# Packed rings' event suppression areas (section 2.8.10): off_wrap (u16), flags (u16).
EVENT_OFF_WRAP = 0
EVENT_FLAGS = 2
EVENT_FLAGS_MASK = 3
EVENT_F_ENABLE = 0
EVENT_F_DISABLE = 1
EVENT_F_DESC = 2
PACKED_WRAP_SHIFT = 15
"""Bit of ``off_wrap`` (and of a ring position) holding the wrap counter."""
PACKED_OFF_MASK = (1 << PACKED_WRAP_SHIFT) - 1

MAX_CHAIN_BYTES = 1 << 32
"""A chain's total length must stay below 2**32 (section 2.7.5.2)."""

LOG_PAGE_SHIFT = 12
"""The vhost-user dirty log has one bit per 4 KiB page."""

# virtio-net (section 5.1.6).
NET_HDR_MRG = 12
"""Size of ``virtio_net_hdr`` with ``num_buffers`` (MRG_RXBUF or VERSION_1)."""
ETH_HLEN = 14

# virtio-blk (section 5.2.6): request types, status, layout.
BLK_T_IN = 0
BLK_T_OUT = 1
BLK_T_FLUSH = 4
BLK_T_GET_ID = 8
BLK_T_DISCARD = 11
BLK_T_WRITE_ZEROES = 13
BLK_S_OK = 0
BLK_S_IOERR = 1
BLK_S_UNSUPP = 2
BLK_HEADER = 16
BLK_SEGMENT = 16
BLK_ID_BYTES = 20
BLK_UNMAP = 1
SECTOR_SHIFT = 9
SECTOR_MASK = (1 << SECTOR_SHIFT) - 1

# fallocate(2) modes and errno values.
FALLOC_KEEP_SIZE = 0x01
FALLOC_PUNCH_HOLE = 0x02
FALLOC_ZERO_RANGE = 0x10
EINTR = 4

# The vhost-user inflight region (vhost-user spec, "Inflight I/O tracking"), one queue's
# part, in native byte order.  Split: a 16-byte header (features u64, version u16,
# desc_num u16, last_batch_head u16, used_idx u16), then one 16-byte entry per head
# (inflight u8, padding, next u16 at 6, counter u64 at 8).
INFLIGHT_SPLIT_HEADER = 16
INFLIGHT_SPLIT_DESC = 16
INFLIGHT_SPLIT_LAST_BATCH_HEAD = 12
INFLIGHT_SPLIT_USED_IDX = 14
INFLIGHT_SPLIT_INFLIGHT = 0
INFLIGHT_SPLIT_NEXT = 6
INFLIGHT_SPLIT_COUNTER = 8
# Packed: a 32-byte header (free_head, old_free_head, used_idx, old_used_idx u16 from 12,
# used_wrap_counter and old_used_wrap_counter u8 at 20 and 21), then 32-byte entries
# (inflight u8, padding, next, last, num u16, counter u64, then a copy of the ring
# descriptor: id u16, flags u16, len u32, addr u64).
INFLIGHT_PACKED_HEADER = 32
INFLIGHT_PACKED_DESC = 32
INFLIGHT_PACKED_FREE_HEAD = 12
INFLIGHT_PACKED_OLD_FREE_HEAD = 14
INFLIGHT_PACKED_USED_IDX = 16
INFLIGHT_PACKED_OLD_USED_IDX = 18
INFLIGHT_PACKED_USED_WRAP = 20
INFLIGHT_PACKED_OLD_USED_WRAP = 21
INFLIGHT_PACKED_INFLIGHT = 0
INFLIGHT_PACKED_NEXT = 2
INFLIGHT_PACKED_LAST = 4
INFLIGHT_PACKED_NUM = 6
INFLIGHT_PACKED_COUNTER = 8
INFLIGHT_PACKED_ID = 16
INFLIGHT_PACKED_FLAGS = 18
INFLIGHT_PACKED_LEN = 20
INFLIGHT_PACKED_ADDR = 24
