"""Linux ioctl request numbers, as ``include/uapi/asm-generic/ioctl.h`` builds them.

A request number packs the direction the argument travels (two bits), its
size (14 bits), a driver's type byte and a command number (a byte each):
``_IOC(dir, type, nr, size)``.  VDUSE (type 0x81) and vhost (type 0xAF)
number their ioctls this way.  The encoding is the one of x86, Arm, RISC-V
and s390; Alpha, MIPS, PowerPC and SPARC lay the bits out differently.
"""

from __future__ import annotations

from enum import IntFlag
from typing import NamedTuple

__all__ = ["IoctlDirection", "IoctlFields", "ioctl_fields", "ioctl_number"]

_NR_BITS = 8
_TYPE_BITS = 8
_SIZE_BITS = 14
_TYPE_SHIFT = _NR_BITS
_SIZE_SHIFT = _TYPE_SHIFT + _TYPE_BITS
_DIR_SHIFT = _SIZE_SHIFT + _SIZE_BITS


class IoctlDirection(IntFlag):
    """Which way an ioctl's argument travels, seen from user space."""

    NONE = 0
    WRITE = 1  # _IOW: user space writes it, the kernel reads it
    READ = 2  # _IOR: the kernel writes it, user space reads it


def ioctl_number(direction: IoctlDirection, kind: int, nr: int, size: int) -> int:
    """``_IOC(direction, kind, nr, size)``; ValueError for a field that does not fit."""
    if not 0 <= nr < 1 << _NR_BITS:
        raise ValueError(f"ioctl nr {nr} does not fit in {_NR_BITS} bits")
    if not 0 <= kind < 1 << _TYPE_BITS:
        raise ValueError(f"ioctl type {kind} does not fit in {_TYPE_BITS} bits")
    if not 0 <= size < 1 << _SIZE_BITS:
        raise ValueError(f"ioctl argument size {size} does not fit in {_SIZE_BITS} bits")
    return int(direction) << _DIR_SHIFT | size << _SIZE_SHIFT | kind << _TYPE_SHIFT | nr


class IoctlFields(NamedTuple):
    """The four fields of a request number."""

    direction: IoctlDirection
    kind: int
    nr: int
    size: int


def ioctl_fields(number: int) -> IoctlFields:
    """Split a request number into direction, type, command number and argument size."""
    return IoctlFields(
        IoctlDirection(number >> _DIR_SHIFT & 3),
        number >> _TYPE_SHIFT & ((1 << _TYPE_BITS) - 1),
        number & ((1 << _NR_BITS) - 1),
        number >> _SIZE_SHIFT & ((1 << _SIZE_BITS) - 1),
    )
