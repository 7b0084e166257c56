"""Typed errors for every layer of pyvdpa.

The classification follows h11 (local vs. remote protocol errors) and
rust-vmm (whether a connection should be dropped).  Each layer raises a
subclass of :class:`PyvdpaError`; errno values from the operating system are
mapped once, at the transport boundary, into :class:`TransportError`.
"""

from __future__ import annotations

__all__ = [
    "ConfigError",
    "GuestMemoryError",
    "IotlbMissError",
    "IotlbPermissionError",
    "LocalProtocolError",
    "ProtocolError",
    "PyvdpaError",
    "RemoteProtocolError",
    "RingError",
    "TransportError",
]


class PyvdpaError(Exception):
    """Base class of every error pyvdpa raises on purpose."""


class ConfigError(PyvdpaError):
    """A user-supplied setting (CLI argument, device spec, path) is invalid."""


class ProtocolError(PyvdpaError):
    """A vhost-user protocol rule was broken.

    ``drop_connection`` tells the transport whether the connection can go on
    (the request is refused, e.g. with a non-zero REPLY_ACK) or must be
    closed because the byte stream can no longer be trusted.
    """

    def __init__(self, message: str, *, drop_connection: bool = False) -> None:
        super().__init__(message)
        self.drop_connection = drop_connection


class RemoteProtocolError(ProtocolError):
    """The peer sent something the protocol forbids."""


class LocalProtocolError(ProtocolError):
    """We were asked to send something the protocol forbids."""


class TransportError(PyvdpaError):
    """The socket failed: peer gone, short read, OS error."""


class GuestMemoryError(PyvdpaError):
    """An address or length does not lie inside the mapped guest memory."""


class IotlbMissError(GuestMemoryError):
    """An I/O virtual address has no IOTLB translation yet.

    Not the driver's fault: the back-end asks the front-end for the
    translation (an IOTLB MISS) and retries once it arrives.  ``iova`` is the
    first untranslated address, ``write`` whether the device wanted to write.
    """

    def __init__(self, iova: int, *, write: bool) -> None:
        access = "write" if write else "read"
        super().__init__(f"no IOTLB translation for {access} at I/O virtual address {iova:#x}")
        self.iova = iova
        self.write = write


class IotlbPermissionError(GuestMemoryError):
    """An IOTLB entry does not allow the access the device wants.

    The driver handed the device a buffer it may not touch that way: the ring
    breaks as for a buffer outside guest memory.
    """

    def __init__(self, iova: int, *, write: bool) -> None:
        access = "write" if write else "read"
        super().__init__(f"IOTLB entry at I/O virtual address {iova:#x} does not allow {access}")
        self.iova = iova
        self.write = write


class RingError(PyvdpaError):
    """A virtqueue holds something a well-behaved driver never writes.

    The queue at fault is marked broken; nothing is read or written out of
    bounds.  Subclasses in :mod:`pyvdpa.virtio.ring` name the rule broken.
    """
