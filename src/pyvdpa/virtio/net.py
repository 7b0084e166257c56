"""virtio-net layouts: the per-packet header, the config space, MACs and queue numbering.

Theory of operation (virtio 1.2, section 5.1 "Network Device"):

* Every packet on a receive or transmit queue is preceded by a
  ``virtio_net_hdr``: ``flags u8, gso_type u8, hdr_len, gso_size,
  csum_start, csum_offset`` (little-endian u16) and, when ``VERSION_1`` or
  ``MRG_RXBUF`` is negotiated, ``num_buffers`` u16; 12 bytes then, 10
  without (:func:`net_header_size`).  On receive with ``MRG_RXBUF`` a
  packet may span several chains and ``num_buffers`` says how many.
* The config space is ``mac[6], status, max_virtqueue_pairs, mtu, speed,
  duplex, rss_max_key_size, rss_max_indirection_table_length,
  supported_hash_types``; the front-end reads it with ``GET_CONFIG`` in
  arbitrary slices (:meth:`NetConfig.read`).
* Queues come in pairs: queue ``2k`` receives and ``2k + 1`` transmits for
  pair ``k``; the control queue, with ``CTRL_VQ``, follows the last pair.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass
from enum import IntEnum, IntFlag
from typing import ClassVar, Self

from pyvdpa.errors import ConfigError, RemoteProtocolError, RingError
from pyvdpa.virtio.constants import NetFeature, VirtioFeature

__all__ = [
    "DUPLEX_FULL",
    "DUPLEX_HALF",
    "DUPLEX_UNKNOWN",
    "NET_CONFIG_SIZE",
    "NET_GSO_ECN",
    "NET_HDR_LEGACY_SIZE",
    "NET_HDR_SIZE",
    "SPEED_UNKNOWN",
    "NetConfig",
    "NetGsoType",
    "NetHdrFlag",
    "NetHeader",
    "ctrl_queue_index",
    "format_mac",
    "is_rx_queue",
    "net_header_size",
    "parse_mac",
    "queue_pair",
    "rx_queue_index",
    "tx_queue_index",
]

NET_HDR_SIZE = 12
"""Bytes of ``virtio_net_hdr`` with ``num_buffers`` (``VERSION_1`` or ``MRG_RXBUF``)."""

NET_HDR_LEGACY_SIZE = 10
"""Bytes of ``virtio_net_hdr`` without ``num_buffers``."""

NET_GSO_ECN = 0x80
"""Bit OR-ed into ``gso_type``: the TCP segments carry ECN's CWR."""

SPEED_UNKNOWN = 0xFFFF_FFFF
"""``speed`` value for an unknown link speed."""

DUPLEX_HALF = 0x00
"""``duplex`` value for half duplex."""

DUPLEX_FULL = 0x01
"""``duplex`` value for full duplex."""

DUPLEX_UNKNOWN = 0xFF
"""``duplex`` value for an unknown duplex mode."""

_HEADER = struct.Struct("<BBHHHHH")
_HEADER_LEGACY = struct.Struct("<BBHHHH")
_CONFIG = struct.Struct("<6sHHHIBBHI")
NET_CONFIG_SIZE = _CONFIG.size
"""Bytes of the virtio-net config space, up to ``supported_hash_types``."""

_MAC_RE = re.compile(r"[0-9A-Fa-f]{2}(?::[0-9A-Fa-f]{2}){5}")


class NetHdrFlag(IntFlag):
    """``virtio_net_hdr.flags`` bits."""

    NEEDS_CSUM = 1
    DATA_VALID = 2
    RSC_INFO = 4


class NetGsoType(IntEnum):
    """``virtio_net_hdr.gso_type`` values (without :data:`NET_GSO_ECN`)."""

    NONE = 0
    TCPV4 = 1
    UDP = 3
    TCPV6 = 4
    UDP_L4 = 5


def net_header_size(features: int) -> int:
    """Bytes of the per-packet header for the negotiated ``features``."""
    if features & (VirtioFeature.VERSION_1 | NetFeature.MRG_RXBUF):
        return NET_HDR_SIZE
    return NET_HDR_LEGACY_SIZE


def _header_struct(header_size: int) -> struct.Struct:
    if header_size == NET_HDR_SIZE:
        return _HEADER
    if header_size == NET_HDR_LEGACY_SIZE:
        return _HEADER_LEGACY
    raise ValueError(
        f"a virtio-net header is {NET_HDR_SIZE} or {NET_HDR_LEGACY_SIZE} bytes, not {header_size}"
    )


@dataclass(frozen=True, slots=True)
class NetHeader:
    """``virtio_net_hdr``: offload metadata in front of every packet.

    ``num_buffers`` exists only in the 12-byte form; the 10-byte form packs
    without it and unpacks it as 0.
    """

    flags: int = 0
    gso_type: int = NetGsoType.NONE
    hdr_len: int = 0
    gso_size: int = 0
    csum_start: int = 0
    csum_offset: int = 0
    num_buffers: int = 0

    def _fields(self, fmt: struct.Struct) -> tuple[int, ...]:
        fields = (
            self.flags,
            self.gso_type,
            self.hdr_len,
            self.gso_size,
            self.csum_start,
            self.csum_offset,
        )
        return (*fields, self.num_buffers) if fmt is _HEADER else fields

    def pack(self, header_size: int = NET_HDR_SIZE) -> bytes:
        """Encode as ``header_size`` (12 or 10) bytes."""
        fmt = _header_struct(header_size)
        return fmt.pack(*self._fields(fmt))

    def pack_into(
        self, buffer: memoryview | bytearray, offset: int = 0, header_size: int = NET_HDR_SIZE
    ) -> None:
        """Write ``header_size`` (12 or 10) bytes into ``buffer`` at ``offset``."""
        fmt = _header_struct(header_size)
        fmt.pack_into(buffer, offset, *self._fields(fmt))

    @classmethod
    def unpack(cls, data: bytes | bytearray | memoryview, header_size: int = NET_HDR_SIZE) -> Self:
        """Decode the first ``header_size`` bytes of ``data``.

        Raises :class:`RingError` if the driver's buffer is shorter than the
        header.
        """
        fmt = _header_struct(header_size)
        if len(data) < header_size:
            raise RingError(
                f"buffer of {len(data)} bytes is shorter than the {header_size}-byte "
                "virtio-net header"
            )
        return cls(*fmt.unpack_from(data))


@dataclass(frozen=True, slots=True)
class NetConfig:
    """The virtio-net config space.

    ``status`` takes :class:`~pyvdpa.virtio.constants.NetStatus` bits.
    Out-of-range values raise :class:`ConfigError`.
    """

    SIZE: ClassVar[int] = NET_CONFIG_SIZE
    """Bytes of the encoded config space (:data:`NET_CONFIG_SIZE`)."""

    mac: bytes = bytes(6)
    status: int = 0
    max_virtqueue_pairs: int = 1
    mtu: int = 1500
    speed: int = SPEED_UNKNOWN
    duplex: int = DUPLEX_UNKNOWN
    rss_max_key_size: int = 0
    rss_max_indirection_table_length: int = 0
    supported_hash_types: int = 0

    def __post_init__(self) -> None:
        if len(self.mac) != 6:
            raise ConfigError(f"a MAC address is 6 bytes, not {len(self.mac)}")
        try:
            self.encode()
        except struct.error as exc:
            raise ConfigError(f"virtio-net config field out of range: {exc}") from exc

    def encode(self) -> bytes:
        """The config space, :data:`NET_CONFIG_SIZE` bytes."""
        return _CONFIG.pack(
            bytes(self.mac),
            self.status,
            self.max_virtqueue_pairs,
            self.mtu,
            self.speed,
            self.duplex,
            self.rss_max_key_size,
            self.rss_max_indirection_table_length,
            self.supported_hash_types,
        )

    @classmethod
    def decode(cls, data: bytes | bytearray | memoryview) -> Self:
        """Parse a full config space; :class:`RemoteProtocolError` if the size is wrong."""
        if len(data) != NET_CONFIG_SIZE:
            raise RemoteProtocolError(
                f"virtio-net config is {NET_CONFIG_SIZE} bytes, got {len(data)}"
            )
        return cls(*_CONFIG.unpack(data))

    def read(self, offset: int, size: int) -> bytes:
        """The ``size`` bytes at ``offset`` (``GET_CONFIG``).

        Raises :class:`RemoteProtocolError` if the slice leaves the config space.
        """
        space = self.encode()
        if offset < 0 or size < 0 or offset + size > len(space):
            raise RemoteProtocolError(
                f"config read of {size} bytes at offset {offset} leaves the "
                f"{len(space)}-byte virtio-net config space"
            )
        return space[offset : offset + size]


def parse_mac(text: str) -> bytes:
    """Parse ``"52:54:00:12:34:56"`` into 6 bytes; :class:`ConfigError` if malformed."""
    if not _MAC_RE.fullmatch(text):
        raise ConfigError(f"invalid MAC address {text!r}: expected six xx: hex octets")
    return bytes.fromhex(text.replace(":", ""))


def format_mac(mac: bytes) -> str:
    """Format 6 bytes as ``"52:54:00:12:34:56"``."""
    if len(mac) != 6:
        raise ConfigError(f"a MAC address is 6 bytes, not {len(mac)}")
    return mac.hex(":")


def rx_queue_index(pair: int) -> int:
    """Index of the receive queue of queue pair ``pair``."""
    if pair < 0:
        raise ValueError(f"queue pair {pair} is negative")
    return 2 * pair


def tx_queue_index(pair: int) -> int:
    """Index of the transmit queue of queue pair ``pair``."""
    if pair < 0:
        raise ValueError(f"queue pair {pair} is negative")
    return 2 * pair + 1


def ctrl_queue_index(max_virtqueue_pairs: int) -> int:
    """Index of the control queue, after the last of ``max_virtqueue_pairs`` pairs."""
    if max_virtqueue_pairs < 1:
        raise ValueError(f"a device has at least one queue pair, not {max_virtqueue_pairs}")
    return 2 * max_virtqueue_pairs


def queue_pair(index: int) -> int:
    """The queue pair a receive or transmit queue belongs to."""
    if index < 0:
        raise ValueError(f"queue index {index} is negative")
    return index // 2


def is_rx_queue(index: int) -> bool:
    """Whether queue ``index`` receives (even) rather than transmits (odd)."""
    if index < 0:
        raise ValueError(f"queue index {index} is negative")
    return index % 2 == 0
