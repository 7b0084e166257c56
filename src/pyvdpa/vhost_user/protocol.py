"""vhost-user protocol numbers (QEMU ``docs/interop/vhost-user.rst``).

Only numbers live here; the codec (:mod:`pyvdpa.vhost_user.codec`) gives
them layouts and rules.
"""

from __future__ import annotations

from enum import IntEnum, IntFlag

# IOTLB_MSG carries the permission guest memory defines (shared with vhost-vdpa and VDUSE).
from pyvdpa.memory.iotlb import IotlbPerm
from pyvdpa.virtio.constants import bit

__all__ = [
    "ACKED_BACKEND_CHANNEL",
    "HEADER_SIZE",
    "MAX_MEM_REGIONS",
    "MAX_PAYLOAD_SIZE",
    "VRING_IDX_MASK",
    "VRING_NOFD_MASK",
    "BackendRequest",
    "HeaderFlags",
    "IotlbPerm",
    "IotlbType",
    "ProtocolFeature",
    "Request",
]

HEADER_SIZE = 12
MAX_PAYLOAD_SIZE = 4096
MAX_MEM_REGIONS = 8
VRING_IDX_MASK = 0xFF
VRING_NOFD_MASK = 0x100


class Request(IntEnum):
    """Front-end requests (front-end to back-end)."""

    GET_FEATURES = 1
    SET_FEATURES = 2
    SET_OWNER = 3
    RESET_OWNER = 4
    SET_MEM_TABLE = 5
    SET_LOG_BASE = 6
    SET_LOG_FD = 7
    SET_VRING_NUM = 8
    SET_VRING_ADDR = 9
    SET_VRING_BASE = 10
    GET_VRING_BASE = 11
    SET_VRING_KICK = 12
    SET_VRING_CALL = 13
    SET_VRING_ERR = 14
    GET_PROTOCOL_FEATURES = 15
    SET_PROTOCOL_FEATURES = 16
    GET_QUEUE_NUM = 17
    SET_VRING_ENABLE = 18
    SEND_RARP = 19
    NET_SET_MTU = 20
    SET_BACKEND_REQ_FD = 21
    IOTLB_MSG = 22
    SET_VRING_ENDIAN = 23
    GET_CONFIG = 24
    SET_CONFIG = 25
    CREATE_CRYPTO_SESSION = 26
    CLOSE_CRYPTO_SESSION = 27
    POSTCOPY_ADVISE = 28
    POSTCOPY_LISTEN = 29
    POSTCOPY_END = 30
    GET_INFLIGHT_FD = 31
    SET_INFLIGHT_FD = 32
    GPU_SET_SOCKET = 33
    RESET_DEVICE = 34
    VRING_KICK = 35
    GET_MAX_MEM_SLOTS = 36
    ADD_MEM_REG = 37
    REM_MEM_REG = 38
    SET_STATUS = 39
    GET_STATUS = 40
    GET_SHARED_OBJECT = 41
    SET_DEVICE_STATE_FD = 42
    CHECK_DEVICE_STATE = 43


class BackendRequest(IntEnum):
    """Back-end requests (back-end to front-end, on the SET_BACKEND_REQ_FD socket)."""

    IOTLB_MSG = 1
    CONFIG_CHANGE_MSG = 2
    VRING_HOST_NOTIFIER_MSG = 3
    VRING_CALL = 4
    VRING_ERR = 5


class HeaderFlags(IntFlag):
    """Bits of the header ``flags`` word."""

    VERSION = 0x1
    REPLY = 0x4
    NEED_REPLY = 0x8


class ProtocolFeature(IntFlag):
    """Protocol feature bits (GET/SET_PROTOCOL_FEATURES)."""

    MQ = bit(0)
    LOG_SHMFD = bit(1)
    RARP = bit(2)
    REPLY_ACK = bit(3)
    NET_MTU = bit(4)
    BACKEND_REQ = bit(5)
    CROSS_ENDIAN = bit(6)
    CRYPTO_SESSION = bit(7)
    PAGEFAULT = bit(8)
    CONFIG = bit(9)
    BACKEND_SEND_FD = bit(10)
    HOST_NOTIFIER = bit(11)
    INFLIGHT_SHMFD = bit(12)
    RESET_DEVICE = bit(13)
    INBAND_NOTIFICATIONS = bit(14)
    CONFIGURE_MEM_SLOTS = bit(15)
    STATUS = bit(16)
    XEN_MMAP = bit(17)
    SHARED_OBJECT = bit(18)
    DEVICE_STATE = bit(19)


ACKED_BACKEND_CHANNEL = ProtocolFeature.BACKEND_REQ | ProtocolFeature.REPLY_ACK
"""What in-band notifications and an IOMMU both need negotiated with them.

The back-end channel carries the back-end's VRING_CALL / VRING_ERR or IOTLB
misses, and REPLY_ACK lets each side wait until the other processed a
request (QEMU refuses ACCESS_PLATFORM over vhost-user without it).
"""


class IotlbType(IntEnum):
    """Type of an IOTLB message (``VHOST_IOTLB_*``)."""

    MISS = 1
    UPDATE = 2
    INVALIDATE = 3
    ACCESS_FAIL = 4
