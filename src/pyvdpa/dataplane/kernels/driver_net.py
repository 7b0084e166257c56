"""What the compiled driver checks in a received frame: the tag ``pyvdpa drive net`` writes.

Theory of operation
-------------------
A frame :func:`pyvdpa.drive.net.build_frame` made carries, after its
Ethernet header, the magic ``PYVD``, a sequence number and the CRC-32 (the
zlib polynomial) of the rest of the frame, the last two big-endian.  A
frame too short for the tag, or without the magic, is someone else's
(``FOREIGN``); one whose checksum differs was corrupted (``CORRUPT``).
The tests hold these offsets to the Python driver's.
"""

from __future__ import annotations

from pyvdpa.dataplane.kernels.cache import inlined
from pyvdpa.dataplane.kernels.driver_row import DriverQueue, driver_at
from pyvdpa.dataplane.kernels.intrinsics import ld_u8, ld_u32, ld_u64, memcpy, st_u64
from pyvdpa.dataplane.kernels.spec import ETH_HLEN

__all__ = [
    "CORRUPT",
    "FOREIGN",
    "INTACT",
    "MAGIC",
    "TAG_CRC",
    "TAG_SIZE",
    "check_frame",
    "received",
]

INTACT = 0
CORRUPT = 1
FOREIGN = 2

MAGIC = 0x44565950
"""``b"PYVD"`` read as a little-endian u32."""
TAG_CRC = ETH_HLEN + 4 + 8
"""Offset of the CRC-32 in the frame."""
TAG_SIZE = TAG_CRC + 4
"""Bytes of Ethernet header and tag: the checksummed fill follows."""

_U32_MASK = 0xFFFFFFFF
_WORD = 8
_BYTE = 0xFF


@inlined
def _bswap32(value: int) -> int:
    return (
        ((value & _BYTE) << 24)
        | (((value >> 8) & _BYTE) << 16)
        | (((value >> 16) & _BYTE) << 8)
        | ((value >> 24) & _BYTE)
    )


@inlined
def check_frame(frame: int, length: int, table: int) -> int:
    """INTACT, CORRUPT or FOREIGN: the frame of ``length`` bytes at host address ``frame``.

    ``table`` is the host address of the CRC-32 table (``uint32[256]``).
    """
    if length < TAG_SIZE or ld_u32(frame + ETH_HLEN) != MAGIC:
        return FOREIGN
    crc = _U32_MASK
    for i in range(TAG_SIZE, length):
        crc = ld_u32(table + 4 * ((crc ^ ld_u8(frame + i)) & _BYTE)) ^ (crc >> 8)
    crc ^= _U32_MASK
    return INTACT if crc == _bswap32(ld_u32(frame + TAG_CRC)) else CORRUPT


@inlined
def received(q: DriverQueue, ident: int, length: int) -> None:
    """Count and check what the device wrote in the receive buffer of chain ``ident``.

    A forwarding queue (``peer``) copies the frame, header included, into
    the buffer of its peer's next free chain, to be added there; a
    corrupted frame is replaced by the peer's template, so that it does
    not come back to be counted again.
    """
    if q.peer:
        q.budget -= 1
    if length < q.hdr:
        q.short += 1
        q.short_len = length
        return
    size = length - q.hdr
    buffer = q.buffers + ident * q.slot
    verdict = check_frame(buffer + q.hdr, size, q.crc_table)
    q.packets += 1
    q.bytes += size
    if verdict == CORRUPT:
        q.bad += 1
    elif verdict == FOREIGN:
        q.foreign += 1
    if q.peer:
        tx = driver_at(q.peer)
        head = ld_u64(tx.free + _WORD * (tx.free_top - 1 - tx.staged))
        if verdict == CORRUPT:
            buffer = tx.template
            length = tx.chain_len
        memcpy(tx.buffers + head * tx.slot, buffer, length)
        st_u64(tx.busy + _WORD * head, length)
        tx.staged += 1
        tx.bytes += length - tx.hdr
