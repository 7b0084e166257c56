"""virtio constants (virtio 1.2, sections 2.1, 5.1 and 5.2, and 6).

Feature words are 64-bit masks (:class:`enum.IntFlag`); never bit numbers.
"""

from __future__ import annotations

from enum import IntEnum, IntFlag

__all__ = [
    "BlkFeature",
    "BlkStatus",
    "BlkType",
    "DeviceId",
    "DeviceStatus",
    "NetFeature",
    "NetStatus",
    "VirtioFeature",
    "bit",
]


def bit(n: int) -> int:
    """Return the mask of feature bit ``n``."""
    return 1 << n


class DeviceId(IntEnum):
    """virtio device ids (virtio 1.2, section 5)."""

    NET = 1
    BLOCK = 2
    CONSOLE = 3
    ENTROPY = 4
    SCSI = 8
    VSOCK = 19
    FS = 26


class DeviceStatus(IntFlag):
    """Device status field bits (virtio 1.2, section 2.1)."""

    ACKNOWLEDGE = 1
    DRIVER = 2
    DRIVER_OK = 4
    FEATURES_OK = 8
    DEVICE_NEEDS_RESET = 64
    FAILED = 128


class VirtioFeature(IntFlag):
    """Device-independent feature bits, plus the vhost bits living in the same word."""

    NOTIFY_ON_EMPTY = bit(24)
    LOG_ALL = bit(26)  # VHOST_F_LOG_ALL
    ANY_LAYOUT = bit(27)
    RING_INDIRECT_DESC = bit(28)
    RING_EVENT_IDX = bit(29)
    PROTOCOL_FEATURES = bit(30)  # VHOST_USER_F_PROTOCOL_FEATURES
    VERSION_1 = bit(32)
    ACCESS_PLATFORM = bit(33)
    RING_PACKED = bit(34)
    IN_ORDER = bit(35)
    ORDER_PLATFORM = bit(36)
    SR_IOV = bit(37)
    NOTIFICATION_DATA = bit(38)
    RING_RESET = bit(40)


class NetFeature(IntFlag):
    """virtio-net feature bits (virtio 1.2, section 5.1.3)."""

    CSUM = bit(0)
    GUEST_CSUM = bit(1)
    CTRL_GUEST_OFFLOADS = bit(2)
    MTU = bit(3)
    MAC = bit(5)
    GUEST_TSO4 = bit(7)
    GUEST_TSO6 = bit(8)
    GUEST_ECN = bit(9)
    GUEST_UFO = bit(10)
    HOST_TSO4 = bit(11)
    HOST_TSO6 = bit(12)
    HOST_ECN = bit(13)
    HOST_UFO = bit(14)
    MRG_RXBUF = bit(15)
    STATUS = bit(16)
    CTRL_VQ = bit(17)
    CTRL_RX = bit(18)
    CTRL_VLAN = bit(19)
    GUEST_ANNOUNCE = bit(21)
    MQ = bit(22)
    CTRL_MAC_ADDR = bit(23)


class NetStatus(IntFlag):
    """virtio-net config ``status`` bits."""

    LINK_UP = 1
    ANNOUNCE = 2


class BlkFeature(IntFlag):
    """virtio-blk feature bits (virtio 1.2, section 5.2.3)."""

    SIZE_MAX = bit(1)
    SEG_MAX = bit(2)
    GEOMETRY = bit(4)
    RO = bit(5)
    BLK_SIZE = bit(6)
    FLUSH = bit(9)
    TOPOLOGY = bit(10)
    CONFIG_WCE = bit(11)
    MQ = bit(12)
    DISCARD = bit(13)
    WRITE_ZEROES = bit(14)


class BlkType(IntEnum):
    """virtio-blk request types."""

    IN = 0
    OUT = 1
    FLUSH = 4
    GET_ID = 8
    GET_LIFETIME = 10
    DISCARD = 11
    WRITE_ZEROES = 13
    SECURE_ERASE = 14


class BlkStatus(IntEnum):
    """virtio-blk request status byte."""

    OK = 0
    IOERR = 1
    UNSUPP = 2
