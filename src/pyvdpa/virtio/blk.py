"""virtio-blk layouts: the request header, discard/write-zeroes segments and the config space.

Theory of operation (virtio 1.2, section 5.2 "Block Device"):

* A request is one descriptor chain: a device-readable header ``type u32,
  ioprio u32, sector u64`` (:class:`BlkRequestHeader`), the data (read by
  the device for ``OUT``, ``DISCARD`` and ``WRITE_ZEROES``, written for
  ``IN`` and ``GET_ID``), and a final device-writable status byte
  (:class:`~pyvdpa.virtio.constants.BlkStatus`).  Sectors are always 512
  bytes, whatever ``blk_size`` says.  ``GET_ID`` returns a 20-byte serial.
* ``DISCARD`` and ``WRITE_ZEROES`` carry an array of 16-byte segments
  ``sector u64, num_sectors u32, flags u32`` (bit 0: unmap).
* The config space (:class:`BlkConfig`) is read by the front-end with
  ``GET_CONFIG`` (QEMU asks for 57 or 60 bytes) through
  :meth:`BlkConfig.read`; with ``CONFIG_WCE`` the driver may write the
  ``writeback`` byte (``SET_CONFIG``, :meth:`BlkConfig.apply_write`).
"""

from __future__ import annotations

import dataclasses
import struct
from dataclasses import dataclass, field
from enum import IntFlag
from typing import ClassVar, Self

from pyvdpa.errors import ConfigError, RemoteProtocolError, RingError

__all__ = [
    "BLK_CONFIG_SIZE",
    "BLK_ID_BYTES",
    "BLK_REQUEST_HEADER_SIZE",
    "BLK_SEGMENT_SIZE",
    "SECTOR_SHIFT",
    "SECTOR_SIZE",
    "BlkConfig",
    "BlkGeometry",
    "BlkRequestHeader",
    "BlkTopology",
    "DiscardWriteZeroesSegment",
    "SegmentFlag",
]

SECTOR_SHIFT = 9
"""log2 of :data:`SECTOR_SIZE`."""

SECTOR_SIZE = 1 << SECTOR_SHIFT
"""Bytes per sector in requests and ``capacity``."""

BLK_ID_BYTES = 20
"""Length of the serial a ``GET_ID`` request returns."""

_REQUEST_HEADER = struct.Struct("<IIQ")
BLK_REQUEST_HEADER_SIZE = _REQUEST_HEADER.size
"""Bytes of :class:`BlkRequestHeader`."""

_SEGMENT = struct.Struct("<QII")
BLK_SEGMENT_SIZE = _SEGMENT.size
"""Bytes of :class:`DiscardWriteZeroesSegment`."""

# capacity, size_max, seg_max, geometry (cylinders, heads, sectors), blk_size,
# topology (physical_block_exp, alignment_offset, min_io_size, opt_io_size),
# writeback, unused0, num_queues, max_discard_sectors, max_discard_seg,
# discard_sector_alignment, max_write_zeroes_sectors, max_write_zeroes_seg,
# write_zeroes_may_unmap, unused1[3].
_CONFIG = struct.Struct("<QIIHBBIBBHIBxHIIIIIB3x")
BLK_CONFIG_SIZE = _CONFIG.size
"""Bytes of the virtio-blk config space, up to ``write_zeroes_may_unmap`` and its padding."""

_WRITEBACK_AT = 32


class SegmentFlag(IntFlag):
    """``flags`` of a discard / write-zeroes segment."""

    UNMAP = 1


@dataclass(frozen=True, slots=True)
class BlkRequestHeader:
    """The device-readable header at the start of every request.

    ``type`` stays a plain integer: an unknown type must be answered with
    ``UNSUPP``, not rejected while parsing.
    """

    type: int
    ioprio: int = 0
    sector: int = 0

    def pack(self) -> bytes:
        """Encode as :data:`BLK_REQUEST_HEADER_SIZE` bytes."""
        return _REQUEST_HEADER.pack(self.type, self.ioprio, self.sector)

    @classmethod
    def unpack(cls, data: bytes | bytearray | memoryview) -> Self:
        """Decode the first 16 bytes; :class:`RingError` if the driver gave fewer."""
        if len(data) < BLK_REQUEST_HEADER_SIZE:
            raise RingError(
                f"virtio-blk request header is {BLK_REQUEST_HEADER_SIZE} bytes, "
                f"the driver supplied {len(data)}"
            )
        return cls(*_REQUEST_HEADER.unpack_from(data))


@dataclass(frozen=True, slots=True)
class DiscardWriteZeroesSegment:
    """One range of a ``DISCARD`` or ``WRITE_ZEROES`` request."""

    sector: int
    num_sectors: int
    flags: int = 0

    def pack(self) -> bytes:
        """Encode as :data:`BLK_SEGMENT_SIZE` bytes."""
        return _SEGMENT.pack(self.sector, self.num_sectors, self.flags)

    @classmethod
    def unpack_all(cls, data: bytes | bytearray | memoryview) -> list[Self]:
        """Decode an array of segments.

        Raises :class:`RingError` if ``data`` is empty or not a whole number
        of segments.
        """
        if not data or len(data) % BLK_SEGMENT_SIZE:
            raise RingError(
                f"{len(data)} bytes is not a non-empty array of {BLK_SEGMENT_SIZE}-byte segments"
            )
        return [cls(*fields) for fields in _SEGMENT.iter_unpack(data)]


@dataclass(frozen=True, slots=True)
class BlkGeometry:
    """``geometry``: the legacy disk geometry hint (feature ``GEOMETRY``)."""

    cylinders: int = 0
    heads: int = 0
    sectors: int = 0


@dataclass(frozen=True, slots=True)
class BlkTopology:
    """``topology``: alignment hints (feature ``TOPOLOGY``).

    ``physical_block_exp`` is log2 of logical blocks per physical block;
    ``min_io_size`` and ``opt_io_size`` count logical blocks.
    """

    physical_block_exp: int = 0
    alignment_offset: int = 0
    min_io_size: int = 0
    opt_io_size: int = 0


@dataclass(frozen=True, slots=True)
class BlkConfig:
    """The virtio-blk config space (virtio 1.2, section 5.2.4).

    ``capacity`` counts 512-byte sectors.  A field is meaningful to the
    driver only when its feature is offered.  Out-of-range values raise
    :class:`ConfigError`.
    """

    SIZE: ClassVar[int] = BLK_CONFIG_SIZE
    """Bytes of the encoded config space (:data:`BLK_CONFIG_SIZE`)."""

    capacity: int = 0
    size_max: int = 0
    seg_max: int = 0
    geometry: BlkGeometry = field(default_factory=BlkGeometry)
    blk_size: int = SECTOR_SIZE
    topology: BlkTopology = field(default_factory=BlkTopology)
    writeback: int = 0
    num_queues: int = 1
    max_discard_sectors: int = 0
    max_discard_seg: int = 0
    discard_sector_alignment: int = 0
    max_write_zeroes_sectors: int = 0
    max_write_zeroes_seg: int = 0
    write_zeroes_may_unmap: int = 0

    def __post_init__(self) -> None:
        try:
            self.encode()
        except struct.error as exc:
            raise ConfigError(f"virtio-blk config field out of range: {exc}") from exc

    def encode(self) -> bytes:
        """The config space, :data:`BLK_CONFIG_SIZE` bytes."""
        geometry, topology = self.geometry, self.topology
        return _CONFIG.pack(
            self.capacity,
            self.size_max,
            self.seg_max,
            geometry.cylinders,
            geometry.heads,
            geometry.sectors,
            self.blk_size,
            topology.physical_block_exp,
            topology.alignment_offset,
            topology.min_io_size,
            topology.opt_io_size,
            self.writeback,
            self.num_queues,
            self.max_discard_sectors,
            self.max_discard_seg,
            self.discard_sector_alignment,
            self.max_write_zeroes_sectors,
            self.max_write_zeroes_seg,
            self.write_zeroes_may_unmap,
        )

    @classmethod
    def decode(cls, data: bytes | bytearray | memoryview) -> Self:
        """Parse a full config space; :class:`RemoteProtocolError` if the size is wrong."""
        if len(data) != BLK_CONFIG_SIZE:
            raise RemoteProtocolError(
                f"virtio-blk config is {BLK_CONFIG_SIZE} bytes, got {len(data)}"
            )
        (
            capacity,
            size_max,
            seg_max,
            cylinders,
            heads,
            sectors,
            blk_size,
            physical_block_exp,
            alignment_offset,
            min_io_size,
            opt_io_size,
            *rest,
        ) = _CONFIG.unpack(data)
        return cls(
            capacity,
            size_max,
            seg_max,
            BlkGeometry(cylinders, heads, sectors),
            blk_size,
            BlkTopology(physical_block_exp, alignment_offset, min_io_size, opt_io_size),
            *rest,
        )

    def read(self, offset: int, size: int) -> bytes:
        """The ``size`` bytes at ``offset`` (``GET_CONFIG``).

        Raises :class:`RemoteProtocolError` if the slice leaves the config space.
        """
        space = self.encode()
        if offset < 0 or size < 0 or offset + size > len(space):
            raise RemoteProtocolError(
                f"config read of {size} bytes at offset {offset} leaves the "
                f"{len(space)}-byte virtio-blk config space"
            )
        return space[offset : offset + size]

    def apply_write(self, offset: int, data: bytes | bytearray | memoryview) -> Self:
        """Return the config after a driver write (``SET_CONFIG``).

        Only ``writeback`` (offset 32, one byte, 0 or 1) is writable; any
        other write raises :class:`RemoteProtocolError`.
        """
        if offset != _WRITEBACK_AT or len(data) != 1:
            raise RemoteProtocolError(
                f"config write of {len(data)} bytes at offset {offset}: only the "
                f"writeback byte at offset {_WRITEBACK_AT} is writable"
            )
        if data[0] not in (0, 1):
            raise RemoteProtocolError(f"writeback must be 0 or 1, not {data[0]}")
        return dataclasses.replace(self, writeback=data[0])
