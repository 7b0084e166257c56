"""The row of a driver queue, and the rules of the ring a device can break.

See :mod:`~pyvdpa.dataplane.kernels.driver` for how the kernels use it.
"""

from __future__ import annotations

import itertools
from typing import TypeAlias

from pyvdpa.dataplane.kernels.cache import inlined, kernel
from pyvdpa.dataplane.kernels.intrinsics import Record, ld_u64, record_at, record_of, st_u64
from pyvdpa.dataplane.kernels.layout import Row, check

__all__ = [
    "DCOLS",
    "DE_USED_ID",
    "DE_USED_JUMP",
    "DE_USED_LEN",
    "DRIVER",
    "D_AVAIL_IDX",
    "D_AVAIL_WRAP",
    "D_BAD",
    "D_BUDGET",
    "D_BUFFERS",
    "D_BUFFERS_DEV",
    "D_BURST",
    "D_BUSY",
    "D_BYTES",
    "D_CHAIN_LEN",
    "D_CRC_TABLE",
    "D_DEADLINE",
    "D_DESC",
    "D_DEVICE",
    "D_DRAIN_NS",
    "D_DRIVER",
    "D_END_NS",
    "D_ERROR",
    "D_ERROR_A",
    "D_ERROR_B",
    "D_EVENT_IDX",
    "D_FOREIGN",
    "D_FRAME_LEN",
    "D_FREE",
    "D_FREE_TOP",
    "D_HDR",
    "D_INFLIGHT",
    "D_KICKS",
    "D_KICK_FD",
    "D_LAST_USED",
    "D_LIMIT",
    "D_PACKED",
    "D_PACKETS",
    "D_PEER",
    "D_RECEIVE",
    "D_SHORT",
    "D_SHORT_LEN",
    "D_SIZE",
    "D_SLOT",
    "D_STAGED",
    "D_START_NS",
    "D_STOP",
    "D_TEMPLATE",
    "D_USED_WRAP",
    "DriverQueue",
    "broken",
    "driver_at",
    "driver_of",
    "retire",
]

DRIVER = Row("driver", "D", pad_to=8)
"""A driver queue: its parameters, the run's limits, then its state and counters."""
D_SIZE = DRIVER.field("size")
D_PACKED = DRIVER.field("packed")
D_EVENT_IDX = DRIVER.field("event_idx")
D_DESC = DRIVER.field("desc")
"""Host address of the descriptor table (split) or ring (packed)."""
D_DRIVER = DRIVER.field("driver")
"""Host address of the available ring (split) or driver event area (packed)."""
D_DEVICE = DRIVER.field("device")
"""Host address of the used ring (split) or device event area (packed)."""
D_KICK_FD = DRIVER.field("kick_fd")
"""Kick eventfd, -1 for none."""
D_RECEIVE = DRIVER.field("receive")
"""1 for a receive queue: its buffers are device-writable and what arrives is checked."""
D_BUFFERS = DRIVER.field("buffers")
"""Host address of buffer slot 0."""
D_HDR = DRIVER.field("hdr")
"""Bytes of the virtio-net header in front of each frame."""
D_CRC_TABLE = DRIVER.field("crc_table")
"""Host address of the CRC-32 table (``uint32[256]``) received frames are checked with."""
D_PEER = DRIVER.field("peer")
"""A receive queue in io mode: host address of the transmit queue's row it forwards to, else 0."""
D_TEMPLATE = DRIVER.field("template")
"""A transmit queue: host address of a header and frame sent in place of a corrupted one."""
D_BUFFERS_DEV = DRIVER.field("buffers_dev")
"""Device address of buffer slot 0; slot ``i`` is descriptor ``i``'s buffer."""
D_SLOT = DRIVER.field("slot")
"""Bytes from one buffer slot to the next."""
D_CHAIN_LEN = DRIVER.field("chain_len")
"""Bytes of each chain: the virtio-net header and the frame."""
D_FRAME_LEN = DRIVER.field("frame_len")
"""Bytes of each frame (what ``bytes`` counts)."""
D_BURST = DRIVER.field("burst")
D_FREE = DRIVER.field("free")
"""Host address of the stack of free descriptors (``int64[size]``)."""
D_BUSY = DRIVER.field("busy")
"""Host address of each descriptor's chain length while in flight (``int64[size]``, 0: free)."""
# The run's limits.
D_DEADLINE = DRIVER.field("deadline")
"""``CLOCK_MONOTONIC`` nanoseconds at which sending stops."""
D_DRAIN_NS = DRIVER.field("drain_ns")
"""Nanoseconds the device gets, once sending stops, to return the chains in flight."""
D_LIMIT = DRIVER.field("limit")
"""Frames to send at most, 0 for no limit."""
D_STOP = DRIVER.field("stop")
"""Set by Python: stop now, without waiting for the chains in flight."""
# State.
D_AVAIL_IDX = DRIVER.field("avail_idx")
"""Split: the next avail index (16 bits, free-running).  Packed: the next slot."""
D_AVAIL_WRAP = DRIVER.field("avail_wrap")
D_LAST_USED = DRIVER.field("last_used")
"""Split: the next used index to read.  Packed: the next slot to look at for a used chain."""
D_USED_WRAP = DRIVER.field("used_wrap")
D_BUDGET = DRIVER.field("budget")
"""A forwarding receive queue: frames it may still take this pass (its peer's free chains)."""
D_STAGED = DRIVER.field("staged")
"""A transmit queue: frames copied into the slots of the next free chains, not yet added."""
D_FREE_TOP = DRIVER.field("free_top")
"""Descriptors on the free stack."""
D_INFLIGHT = DRIVER.field("inflight")
"""Chains the device holds."""
D_ERROR = DRIVER.field("error")
"""The first ``DE_*`` code met; non-zero ends the run."""
D_ERROR_A = DRIVER.field("error_a")
D_ERROR_B = DRIVER.field("error_b")
# Counters and times.
D_PACKETS = DRIVER.field("packets")
D_BYTES = DRIVER.field("bytes")
D_KICKS = DRIVER.field("kicks")
D_BAD = DRIVER.field("bad")
"""Received frames of ours whose checksum does not match."""
D_FOREIGN = DRIVER.field("foreign")
"""Received frames some other sender made."""
D_SHORT = DRIVER.field("short")
"""Receive buffers returned with a used length below the virtio-net header."""
D_SHORT_LEN = DRIVER.field("short_len")
"""The last such used length."""
D_START_NS = DRIVER.field("start_ns")
D_END_NS = DRIVER.field("end_ns")
"""When sending stopped (``CLOCK_MONOTONIC`` nanoseconds), 0 while it goes on."""
DCOLS = DRIVER.close()

check(globals(), (DRIVER,))

# The rule a device broke (D_ERROR); 0 is none.
_rule = itertools.count(1)
DE_USED_ID = next(_rule)
"""A used entry names a chain that is not in flight (a = the id, b = the used position)."""
DE_USED_LEN = next(_rule)
"""A used length beyond the chain's buffer (a = the length, b = the chain's bytes)."""
DE_USED_JUMP = next(_rule)
"""The used index moved past the chains in flight (a = how far, b = chains in flight)."""

driver_of = record_of(DRIVER.record)
driver_at = record_at(DRIVER.record)
"""The driver queue row at a host address."""
"""A driver queue row, given as a record or as the int64 array Python holds."""

DriverQueue: TypeAlias = Record
"""A driver queue row as the kernels see it (``DRIVER``)."""


@kernel
def broken(q: DriverQueue, code: int, a: int, b: int) -> int:
    """Record that the device broke rule ``code`` (with two numbers for the message); -1."""
    q.error = code
    q.error_a = a
    q.error_b = b
    return -1


_WORD = 8


@inlined
def retire(q: DriverQueue, ident: int, length: int, position: int) -> int:
    """Take back the chain ``ident`` the device used with ``length`` bytes written.

    The chain must be in flight (``busy``) and ``length`` within its
    buffer; it goes back on the free stack.  Returns the chain's length, or
    -1 when the device broke the ring (``position``: where the used entry
    was, for the message).  The one used-entry rule of split and packed rings.
    """
    held = ld_u64(q.busy + _WORD * ident) if 0 <= ident < q.size else 0
    if held == 0:
        return broken(q, DE_USED_ID, ident, position)
    if length > held:
        return broken(q, DE_USED_LEN, length, held)
    st_u64(q.busy + _WORD * ident, 0)
    st_u64(q.free + _WORD * q.free_top, ident)
    q.free_top += 1
    q.inflight -= 1
    return held
