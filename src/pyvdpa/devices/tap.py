"""TAP interfaces: a simulated NIC's wire into the host network stack.

Theory of operation (Linux ``Documentation/networking/tuntap.rst``): opening
``/dev/net/tun`` and issuing ``TUNSETIFF`` with ``IFF_TAP`` attaches the fd to
a TAP interface, creating it if the name is free (the kernel picks a name
from a ``%d`` template).  With ``IFF_NO_PI`` every ``read`` returns exactly
one Ethernet frame and every ``write`` injects exactly one, with no packet
information prefix.  ``IFF_MULTI_QUEUE`` lets several fds attach to the same
interface, one per queue pair; the kernel spreads the frames it sends to the
TAP over them by flow, among the queues attached at the time: ``TUNSETQUEUE``
detaches a queue (it then neither receives nor sends) and attaches it again,
as QEMU does for the queue pairs a guest disables.  The interface lives as
long as an fd is open on it
(unless it was made persistent with ``ip tuntap add``), in the network
namespace of the thread that created it.

Frames cross the boundary with ``readv``/``writev`` on the non-blocking fds:
the compiled data path (:mod:`pyvdpa.dataplane.kernels`) writes a transmitted
frame straight from the guest's buffers and reads a received one straight
into them, without joining them first.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import struct
from collections.abc import Sequence
from enum import IntFlag

from pyvdpa.errors import ConfigError

__all__ = [
    "DEFAULT_TAP_NAME",
    "IFNAMSIZ",
    "TAP_FRAME_MAX",
    "TUNSETIFF",
    "TUNSETQUEUE",
    "Tap",
    "TunFlag",
]

#: ``_IOW('T', 202, int)``: attach the fd to a TUN/TAP interface.
TUNSETIFF = 0x400454CA

#: ``_IOW('T', 217, int)``: attach or detach one queue of a multi-queue interface.
TUNSETQUEUE = 0x400454D9

#: Interface names are at most 15 bytes plus a NUL.
IFNAMSIZ = 16

#: Largest frame a read can return: the largest MTU, an Ethernet header and an 802.1Q tag.
TAP_FRAME_MAX = 65535 + 14 + 4

#: The name template a TAP gets unless told otherwise; the kernel fills in ``%d``.
DEFAULT_TAP_NAME = "pyvdpa%d"

#: The control device of the TUN/TAP driver.
TUN_DEVICE = "/dev/net/tun"

#: ``struct ifreq``: the name, the flags (a short), padding to 40 bytes.
_IFREQ = struct.Struct("=16sH22x")


class TunFlag(IntFlag):
    """``ifr_flags`` bits of ``TUNSETIFF`` (``linux/if_tun.h``)."""

    TUN = 0x0001
    TAP = 0x0002
    MULTI_QUEUE = 0x0100
    ATTACH_QUEUE = 0x0200
    DETACH_QUEUE = 0x0400
    NO_PI = 0x1000


class Tap:
    """A TAP interface with one fd per queue.

    ``ifname`` may be a name or a template such as ``"pyvdpa%d"``; the name
    the kernel settled on is :attr:`name`.  Creating it needs CAP_NET_ADMIN;
    every failure is a :class:`ConfigError` that says why.
    """

    def __init__(self, ifname: str = DEFAULT_TAP_NAME, *, queues: int = 1) -> None:
        encoded = ifname.encode()
        if not encoded or len(encoded) >= IFNAMSIZ or b"/" in encoded or b" " in encoded:
            raise ConfigError(
                f"invalid TAP interface name {ifname!r}: 1..{IFNAMSIZ - 1} bytes, no '/' or space"
            )
        if queues < 1:
            raise ConfigError(f"a TAP needs at least one queue, not {queues}")
        flags = TunFlag.TAP | TunFlag.NO_PI
        if queues > 1:
            flags |= TunFlag.MULTI_QUEUE
        self.fds: list[int] = []
        #: Whether each queue is attached (see :meth:`set_queue_attached`).
        self.attached = [True] * queues
        name = encoded
        try:
            for _ in range(queues):
                fd = _open_tun()
                self.fds.append(fd)
                name = _attach(fd, name, flags, ifname)
        except BaseException:
            self.close()
            raise
        self.name = name.decode()

    def write(self, queue: int, buffers: Sequence[memoryview | bytes]) -> int:
        """Inject one frame, gathered from ``buffers``, on ``queue``; return its length."""
        return os.writev(self.fds[queue], buffers)

    def set_queue_attached(self, queue: int, attached: bool) -> None:
        """Attach ``queue`` to the interface or detach it (multi-queue TAPs only).

        The kernel sends frames only to attached queues; a detached queue's
        fd reads and writes nothing (and polls as an error) until attached
        again.  Setting the state a queue already has does nothing.
        """
        if self.attached[queue] == attached:
            return
        flag = TunFlag.ATTACH_QUEUE if attached else TunFlag.DETACH_QUEUE
        fcntl.ioctl(self.fds[queue], TUNSETQUEUE, bytearray(_IFREQ.pack(b"", flag)))
        self.attached[queue] = attached

    def close(self) -> None:
        """Detach every fd; a non-persistent interface disappears with the last one."""
        fds, self.fds = self.fds, []
        for fd in fds:
            with contextlib.suppress(OSError):
                os.close(fd)


def _open_tun() -> int:
    try:
        return os.open(TUN_DEVICE, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise ConfigError(
            f"cannot create a TAP: cannot open {TUN_DEVICE}: {os.strerror(exc.errno or 0)}"
        ) from exc


def _attach(fd: int, name: bytes, flags: TunFlag, asked: str) -> bytes:
    request = bytearray(_IFREQ.pack(name, flags))
    try:
        fcntl.ioctl(fd, TUNSETIFF, request)
    except OSError as exc:
        why = os.strerror(exc.errno or 0)
        if exc.errno == errno.EPERM:
            why += " (creating a TAP needs CAP_NET_ADMIN)"
        elif exc.errno in (errno.EBUSY, errno.EINVAL):
            why += " (the name belongs to another interface or a TAP in use)"
        raise ConfigError(f"cannot create TAP {asked!r}: {why}") from exc
    raw, _ = _IFREQ.unpack(request)
    return bytes(raw).rstrip(b"\0")
