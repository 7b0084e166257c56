"""Linux's vhost-vdpa user interface: ioctl numbers, argument structs, IOTLB messages.

Theory of operation (Linux 6.12: ``include/uapi/linux/vhost.h``,
``include/uapi/linux/vhost_types.h``, ``drivers/vhost/vdpa.c``): a vDPA
device bound to the ``vhost_vdpa`` bus driver appears as the character
device ``/dev/vhost-vdpa-N``.  One process at a time opens it (a second
open fails with EBUSY) and becomes its owner with ``VHOST_SET_OWNER``.  The
front-end then drives the device with ioctls: vhost's ring set-up
(``VHOST_SET_VRING_NUM/ADDR/BASE/KICK/CALL``) plus the virtio transport's
own operations (``VHOST_VDPA_*``: device id, status byte, config space,
ring enable, virtqueue groups and address spaces, suspend and resume).
There is no memory table: the front-end maps every range the device may
reach by *writing* IOTLB messages (``struct vhost_msg_v2``) to the same fd;
the kernel pins the pages and programs the device's DMA translation.  Ring
addresses given to ``VHOST_SET_VRING_ADDR`` are I/O virtual addresses in
that translation.

This module is the sans-I/O half.  Request numbers are computed like the
kernel's ``_IO``/``_IOR``/``_IOW``/``_IOWR`` macros from the size of each
argument's layout, so a number cannot drift from its struct.  Each struct is
a frozen, slotted dataclass over a precompiled :class:`struct.Struct` in
native byte order (``=``, explicit ``x`` padding where the C compiler
pads), with three operations:

* ``validate()`` raises :class:`ValueError` naming the field that breaks a
  rule of the interface;
* ``encode()`` validates, then packs; a value that does not fit raises
  :class:`InvalidRequestError`;
* ``decode(data)`` checks the exact size, unpacks and validates; anything
  wrong in bytes the kernel returned raises :class:`KernelDataError`.

Padding is written as zeros and ignored when read.  Scalar arguments (u8 to
u64 and ``int``) go through :func:`encode_scalar` and :func:`decode_scalar`
with the same two errors.

Feature words: ``VHOST_GET/SET_FEATURES`` carry virtio feature bits
(:mod:`pyvdpa.virtio.constants`); ``VHOST_GET/SET_BACKEND_FEATURES`` carry
vhost's own back-end bits, which the header defines as *bit numbers*;
:class:`BackendFeature` holds their masks.

Request numbers use the ioctl encoding of x86, Arm, RISC-V, s390 and
LoongArch (2 direction bits, 14 size bits); Alpha, MIPS, PowerPC and SPARC
encode ioctls differently and are not covered.
"""

from __future__ import annotations

import abc
import struct
from dataclasses import dataclass
from enum import IntEnum, IntFlag
from typing import Any, ClassVar, Self, TypeVar

from pyvdpa.errors import PyvdpaError
from pyvdpa.ioctl import IoctlDirection, ioctl_fields
from pyvdpa.ioctl import ioctl_number as _ioc
from pyvdpa.vhost_user.protocol import IotlbPerm
from pyvdpa.virtio.constants import DeviceStatus, bit

__all__ = [
    "INT",
    "IOTLB_MSG_V2",
    "U8",
    "U16",
    "U32",
    "U64",
    "VHOST_FILE_UNBIND",
    "VHOST_VIRTIO",
    "VRING_AVAIL_ALIGN",
    "VRING_USED_ALIGN",
    "BackendFeature",
    "FeaturesRefusedError",
    "InvalidRequestError",
    "Ioctl",
    "IoctlDir",
    "IotlbMsg",
    "IotlbPerm",
    "IotlbType",
    "IovaRange",
    "KernelDataError",
    "MsgV2",
    "StatusRefusedError",
    "VdpaConfig",
    "VhostVdpaError",
    "VringAddr",
    "VringAddrFlags",
    "VringFile",
    "VringState",
    "check_status",
    "decode_scalar",
    "encode_scalar",
    "ioctl_number",
]

#: The ioctl type ("magic") of every vhost request.
VHOST_VIRTIO = 0xAF

#: The fd value that unbinds an eventfd (kick, call, config call, log).
VHOST_FILE_UNBIND = -1

#: ``type`` of ``struct vhost_msg_v2`` (``VHOST_IOTLB_MSG_V2``); type 1 is the
#: older ``struct vhost_msg`` without an address space id, not spoken here.
IOTLB_MSG_V2 = 2

#: Alignment the kernel requires of the available ring (driver area) address.
VRING_AVAIL_ALIGN = 2
#: Alignment the kernel requires of the used ring (device area) and log addresses.
VRING_USED_ALIGN = 4

U8 = struct.Struct("=B")
U16 = struct.Struct("=H")
U32 = struct.Struct("=I")
U64 = struct.Struct("=Q")
#: A C ``int`` (a file descriptor).
INT = struct.Struct("=i")

_C_NAMES = {U8.format: "u8", U16.format: "u16", U32.format: "u32", U64.format: "u64", "=i": "int"}


# ------------------------------------------------------------------ errors


class VhostVdpaError(PyvdpaError):
    """Base class of the errors of :mod:`pyvdpa.vhost_vdpa`."""


class InvalidRequestError(VhostVdpaError, ValueError):
    """We were asked to send something the vhost-vdpa interface does not allow.

    A value that does not fit its field or breaks a rule the kernel enforces,
    or a message the back-end features acknowledged so far do not permit.
    Nothing was sent.
    """


class KernelDataError(VhostVdpaError):
    """Bytes the kernel returned do not fit their layout or break one of its rules."""


class StatusRefusedError(VhostVdpaError):
    """The device status read back is not the status the driver wrote."""


class FeaturesRefusedError(StatusRefusedError):
    """The device cleared FEATURES_OK: it does not accept the features written."""


# ------------------------------------------------------------------ helpers

_E = TypeVar("_E", bound=IntEnum)


def _check_uint(value: int, bits: int, what: str) -> None:
    if not 0 <= value < 1 << bits:
        raise ValueError(f"{what} {value} does not fit in {bits} unsigned bits")


def _check_span(start: int, length: int, what: str) -> None:
    # The kernel refuses a range that wraps past 2**64 (EINVAL).
    if start + length > 1 << 64:
        raise ValueError(f"{what} {start:#x} + size {length:#x} wraps past 2**64")


def _member(enum: type[_E], value: int, what: str) -> _E:
    try:
        return enum(value)
    except ValueError:
        allowed = ", ".join(f"{m.value} ({m.name})" for m in enum)
        raise ValueError(f"{what} {value} is not one of {allowed}") from None


def _unpack(layout: struct.Struct, data: bytes) -> tuple[Any, ...]:
    if len(data) != layout.size:
        raise ValueError(f"{len(data)} bytes, expected {layout.size}")
    return layout.unpack(data)


def encode_scalar(layout: struct.Struct, value: int, what: str) -> bytes:
    """Pack ``value`` with one of :data:`U8` ... :data:`U64`, :data:`INT`.

    Raises :class:`InvalidRequestError` naming ``what`` if it does not fit.
    """
    try:
        return layout.pack(value)
    except struct.error:
        ctype = _C_NAMES.get(layout.format, layout.format)
        raise InvalidRequestError(f"{what} {value!r} does not fit a {ctype}") from None


def decode_scalar(layout: struct.Struct, data: bytes | bytearray, what: str) -> int:
    """Unpack the integer the kernel wrote; a wrong size is a :class:`KernelDataError`."""
    if len(data) != layout.size:
        raise KernelDataError(f"{what}: {len(data)} bytes, expected {layout.size}")
    value: int = layout.unpack(data)[0]
    return value


class _Struct(abc.ABC):
    """An argument struct: validated, encoded for the kernel, decoded from it."""

    __slots__ = ()

    #: The C struct's name, for error messages.
    NAME: ClassVar[str]

    @abc.abstractmethod
    def validate(self) -> None:
        """Raise :class:`ValueError` if a field breaks a rule of the interface."""

    @abc.abstractmethod
    def _pack(self) -> bytes:
        """Pack fields already validated."""

    @classmethod
    @abc.abstractmethod
    def _parse(cls, data: bytes) -> Self:
        """Unpack ``data``; raise :class:`ValueError` on a wrong size or value."""

    def encode(self) -> bytes:
        """Validate and return the bytes the kernel reads."""
        try:
            self.validate()
        except ValueError as exc:
            raise InvalidRequestError(f"{self.NAME}: {exc}") from None
        return self._pack()

    @classmethod
    def decode(cls, data: bytes | bytearray) -> Self:
        """Parse bytes the kernel wrote: exact size, then validity (:class:`KernelDataError`)."""
        try:
            value = cls._parse(bytes(data))
            value.validate()
        except ValueError as exc:
            raise KernelDataError(f"{cls.NAME}: {exc}") from None
        return value


# ------------------------------------------------------------------ structs


@dataclass(frozen=True, slots=True)
class VringState(_Struct):
    """``struct vhost_vring_state``: a virtqueue ``index`` and a 32-bit ``num``.

    ``num`` is the ring size (``VHOST_SET_VRING_NUM``), the ring base
    (``VHOST_SET/GET_VRING_BASE``: for split rings the next available index;
    for packed rings bits 0-14 the available index, bit 15 its wrap counter,
    bits 16-30 the used index and bit 31 its wrap counter), 0 or 1 for
    ``VHOST_VDPA_SET_VRING_ENABLE``, a group or an address space id.  For
    ``VHOST_VDPA_SET_GROUP_ASID`` ``index`` is the group, ``num`` the ASID.
    """

    index: int
    num: int

    NAME: ClassVar[str] = "vhost_vring_state"
    LAYOUT: ClassVar[struct.Struct] = struct.Struct("=II")

    def validate(self) -> None:
        """Both fields are 32-bit."""
        _check_uint(self.index, 32, "index")
        _check_uint(self.num, 32, "num")

    def _pack(self) -> bytes:
        return self.LAYOUT.pack(self.index, self.num)

    @classmethod
    def _parse(cls, data: bytes) -> Self:
        index, num = _unpack(cls.LAYOUT, data)
        return cls(index, num)

    def reply(self, data: bytes | bytearray) -> VringState:
        """Parse what a read-write request filled in; ``index`` must come back unchanged."""
        answer = self.decode(data)
        if answer.index != self.index:
            raise KernelDataError(
                f"{self.NAME}: asked about index {self.index}, the answer is for {answer.index}"
            )
        return answer


class VringAddrFlags(IntFlag):
    """Flags of ``struct vhost_vring_addr``."""

    LOG = bit(0)  # VHOST_VRING_F_LOG (bit 0): log used-ring writes at log_guest_addr


@dataclass(frozen=True, slots=True)
class VringAddr(_Struct):
    """``struct vhost_vring_addr`` (``VHOST_SET_VRING_ADDR``): 40 bytes.

    For vhost-vdpa the three ring addresses are I/O virtual addresses mapped
    by IOTLB updates.  For packed rings ``avail_user_addr`` is the driver
    event area and ``used_user_addr`` the device event area.  The kernel
    refuses an available ring not 2-aligned and a used ring or log address
    not 4-aligned.
    """

    index: int
    flags: VringAddrFlags
    desc_user_addr: int
    used_user_addr: int
    avail_user_addr: int
    log_guest_addr: int = 0

    NAME: ClassVar[str] = "vhost_vring_addr"
    LAYOUT: ClassVar[struct.Struct] = struct.Struct("=IIQQQQ")

    def validate(self) -> None:
        """Only the LOG flag; 64-bit addresses with the kernel's alignment."""
        _check_uint(self.index, 32, "index")
        _check_uint(self.flags, 32, "flags")
        # Plain ints: inverting the IntFlag would drop the unknown bits.
        unknown = int(self.flags) & ~int(VringAddrFlags.LOG)
        if unknown:
            raise ValueError(f"flags {int(self.flags):#x} set unknown bits {unknown:#x}")
        _check_uint(self.desc_user_addr, 64, "desc_user_addr")
        _check_uint(self.used_user_addr, 64, "used_user_addr")
        _check_uint(self.avail_user_addr, 64, "avail_user_addr")
        _check_uint(self.log_guest_addr, 64, "log_guest_addr")
        if self.avail_user_addr % VRING_AVAIL_ALIGN:
            raise ValueError(f"avail_user_addr {self.avail_user_addr:#x} is not 2-aligned")
        if self.used_user_addr % VRING_USED_ALIGN:
            raise ValueError(f"used_user_addr {self.used_user_addr:#x} is not 4-aligned")
        if self.log_guest_addr % VRING_USED_ALIGN:
            raise ValueError(f"log_guest_addr {self.log_guest_addr:#x} is not 4-aligned")

    def _pack(self) -> bytes:
        return self.LAYOUT.pack(
            self.index,
            self.flags,
            self.desc_user_addr,
            self.used_user_addr,
            self.avail_user_addr,
            self.log_guest_addr,
        )

    @classmethod
    def _parse(cls, data: bytes) -> Self:
        index, flags, desc, used, avail, log = _unpack(cls.LAYOUT, data)
        return cls(index, VringAddrFlags(flags), desc, used, avail, log)


@dataclass(frozen=True, slots=True)
class VringFile(_Struct):
    """``struct vhost_vring_file`` (``VHOST_SET_VRING_KICK/CALL``): an index and an fd.

    ``fd`` is an eventfd, or :data:`VHOST_FILE_UNBIND` (-1) to detach the one set.
    """

    index: int
    fd: int

    NAME: ClassVar[str] = "vhost_vring_file"
    LAYOUT: ClassVar[struct.Struct] = struct.Struct("=Ii")

    def validate(self) -> None:
        """A 32-bit index; an fd that is -1 or a non-negative C int."""
        _check_uint(self.index, 32, "index")
        if not VHOST_FILE_UNBIND <= self.fd < 1 << 31:
            raise ValueError(f"fd {self.fd} is neither -1 nor a file descriptor")

    def _pack(self) -> bytes:
        return self.LAYOUT.pack(self.index, self.fd)

    @classmethod
    def _parse(cls, data: bytes) -> Self:
        index, fd = _unpack(cls.LAYOUT, data)
        return cls(index, fd)


@dataclass(frozen=True, slots=True)
class VdpaConfig(_Struct):
    """``struct vhost_vdpa_config``: ``off`` and ``len`` (u32 each), then ``len`` bytes.

    ``VHOST_VDPA_GET_CONFIG`` sends ``len`` placeholder bytes (:meth:`request`)
    that the kernel overwrites; ``VHOST_VDPA_SET_CONFIG`` sends the data.  The
    ioctl numbers count only the 8-byte head; the kernel refuses ``len`` 0
    and a span beyond the device's config size.
    """

    offset: int
    data: bytes

    NAME: ClassVar[str] = "vhost_vdpa_config"
    HEAD: ClassVar[struct.Struct] = struct.Struct("=II")

    @classmethod
    def request(cls, offset: int, length: int) -> VdpaConfig:
        """The ``VHOST_VDPA_GET_CONFIG`` argument for ``length`` bytes at ``offset``."""
        if not 0 < length < 1 << 32:
            raise InvalidRequestError(f"{cls.NAME}: length {length} is not in 1..2**32-1")
        return cls(offset, bytes(length))

    def validate(self) -> None:
        """A 32-bit offset and 1 to 2**32-1 bytes."""
        _check_uint(self.offset, 32, "off")
        if not 0 < len(self.data) < 1 << 32:
            raise ValueError(f"len {len(self.data)} is not in 1..2**32-1")

    def _pack(self) -> bytes:
        return self.HEAD.pack(self.offset, len(self.data)) + bytes(self.data)

    @classmethod
    def _parse(cls, data: bytes) -> Self:
        if len(data) < cls.HEAD.size:
            raise ValueError(f"{len(data)} bytes, expected at least {cls.HEAD.size}")
        offset, length = cls.HEAD.unpack_from(data)
        if len(data) != cls.HEAD.size + length:
            raise ValueError(
                f"{len(data)} bytes, expected {cls.HEAD.size + length} for len {length}"
            )
        return cls(offset, data[cls.HEAD.size :])

    def reply(self, data: bytes | bytearray) -> bytes:
        """The config bytes ``VHOST_VDPA_GET_CONFIG`` wrote for this request.

        The head must come back as sent: same offset, same length.
        """
        answer = self.decode(data)
        if (answer.offset, len(answer.data)) != (self.offset, len(self.data)):
            raise KernelDataError(
                f"{self.NAME}: asked for {len(self.data)} bytes at {self.offset}, the answer "
                f"is {len(answer.data)} bytes at {answer.offset}"
            )
        return answer.data


@dataclass(frozen=True, slots=True)
class IovaRange(_Struct):
    """``struct vhost_vdpa_iova_range``: the inclusive range ``[first, last]`` the device maps."""

    first: int
    last: int

    NAME: ClassVar[str] = "vhost_vdpa_iova_range"
    LAYOUT: ClassVar[struct.Struct] = struct.Struct("=QQ")

    def validate(self) -> None:
        """64-bit bounds with ``first <= last``."""
        _check_uint(self.first, 64, "first")
        _check_uint(self.last, 64, "last")
        if self.last < self.first:
            raise ValueError(f"last {self.last:#x} is below first {self.first:#x}")

    def _pack(self) -> bytes:
        return self.LAYOUT.pack(self.first, self.last)

    @classmethod
    def _parse(cls, data: bytes) -> Self:
        first, last = _unpack(cls.LAYOUT, data)
        return cls(first, last)

    @property
    def size(self) -> int:
        """Bytes in the range (up to 2**64)."""
        return self.last - self.first + 1

    def contains(self, iova: int, size: int) -> bool:
        """Whether ``[iova, iova + size)`` (non-empty) lies inside the range."""
        return size > 0 and self.first <= iova and iova + size - 1 <= self.last


class IotlbType(IntEnum):
    """``type`` of ``struct vhost_iotlb_msg`` (``VHOST_IOTLB_*``).

    The front-end writes UPDATE, INVALIDATE and the batch hints; MISS and
    ACCESS_FAIL travel from the kernel to the front-end on vhost devices
    that translate addresses themselves (vhost_vdpa never sends them).
    BATCH_BEGIN, any number of UPDATEs and INVALIDATEs, BATCH_END lets a
    device apply the changes at once (back-end feature IOTLB_BATCH); the
    other fields of a batch hint are ignored.
    """

    MISS = 1
    UPDATE = 2
    INVALIDATE = 3
    ACCESS_FAIL = 4
    BATCH_BEGIN = 5
    BATCH_END = 6

    @property
    def is_hint(self) -> bool:
        """Whether this is a batch hint (BATCH_BEGIN or BATCH_END)."""
        return self in (IotlbType.BATCH_BEGIN, IotlbType.BATCH_END)


@dataclass(frozen=True, slots=True)
class IotlbMsg(_Struct):
    """``struct vhost_iotlb_msg``: ``iova, size, uaddr`` (u64), ``perm, type`` (u8), 6 pad bytes.

    UPDATE maps ``[iova, iova + size)`` to this process's virtual address
    ``uaddr`` with ``perm``; INVALIDATE drops ``[iova, iova + size)``, and
    ``iova == size == 0`` drops the whole address space; MISS and
    ACCESS_FAIL report ``iova`` and the access wanted.
    """

    iova: int
    size: int
    uaddr: int
    perm: IotlbPerm
    type: IotlbType

    NAME: ClassVar[str] = "vhost_iotlb_msg"
    LAYOUT: ClassVar[struct.Struct] = struct.Struct("=QQQBB6x")

    @classmethod
    def update(cls, iova: int, size: int, uaddr: int, perm: IotlbPerm) -> IotlbMsg:
        """Map ``[iova, iova + size)`` to ``uaddr``."""
        return cls(iova, size, uaddr, perm, IotlbType.UPDATE)

    @classmethod
    def invalidate(cls, iova: int, size: int) -> IotlbMsg:
        """Unmap ``[iova, iova + size)``."""
        return cls(iova, size, 0, IotlbPerm.NONE, IotlbType.INVALIDATE)

    @classmethod
    def hint(cls, kind: IotlbType) -> IotlbMsg:
        """A BATCH_BEGIN or BATCH_END hint."""
        if not kind.is_hint:
            raise InvalidRequestError(f"{cls.NAME}: {kind.name} is not a batch hint")
        return cls(0, 0, 0, IotlbPerm.NONE, kind)

    def validate(self) -> None:
        """Known type and permission; non-empty ranges that do not wrap."""
        _check_uint(self.iova, 64, "iova")
        _check_uint(self.size, 64, "size")
        _check_uint(self.uaddr, 64, "uaddr")
        kind = _member(IotlbType, self.type, "type")
        perm = _member(IotlbPerm, self.perm, "perm")
        if kind.is_hint:
            return
        if kind is IotlbType.INVALIDATE:
            if self.size == 0 and self.iova != 0:
                raise ValueError(f"INVALIDATE of 0 bytes at {self.iova:#x} (only 0, 0 means all)")
            _check_span(self.iova, self.size, "iova")
            return
        if perm is IotlbPerm.NONE:
            raise ValueError(f"{kind.name} without an access permission")
        if kind is IotlbType.UPDATE:
            if self.size == 0:
                raise ValueError("UPDATE of 0 bytes")
            _check_span(self.iova, self.size, "iova")
            _check_span(self.uaddr, self.size, "uaddr")

    def _pack(self) -> bytes:
        return self.LAYOUT.pack(self.iova, self.size, self.uaddr, self.perm, self.type)

    @classmethod
    def _parse(cls, data: bytes) -> Self:
        iova, size, uaddr, perm, kind = _unpack(cls.LAYOUT, data)
        return cls(
            iova, size, uaddr, _member(IotlbPerm, perm, "perm"), _member(IotlbType, kind, "type")
        )


@dataclass(frozen=True, slots=True)
class MsgV2(_Struct):
    """``struct vhost_msg_v2``, written to the device fd: 72 bytes.

    ``u32 type`` (always :data:`IOTLB_MSG_V2`), ``u32 asid``, then a 64-byte
    union whose first 32 bytes are the :class:`IotlbMsg`; the rest is zero.
    The kernel reads ``asid`` only once the back-end feature IOTLB_ASID is
    acknowledged (before that every message goes to address space 0), and
    answers a successful write with the whole size.
    """

    asid: int
    iotlb: IotlbMsg

    NAME: ClassVar[str] = "vhost_msg_v2"
    HEAD: ClassVar[struct.Struct] = struct.Struct("=II")
    UNION_SIZE: ClassVar[int] = 64
    SIZE: ClassVar[int] = 72

    def validate(self) -> None:
        """A 32-bit ASID and a valid IOTLB message."""
        _check_uint(self.asid, 32, "asid")
        self.iotlb.validate()

    def _pack(self) -> bytes:
        body = self.iotlb._pack()
        return self.HEAD.pack(IOTLB_MSG_V2, self.asid) + body + bytes(self.UNION_SIZE - len(body))

    @classmethod
    def _parse(cls, data: bytes) -> Self:
        if len(data) != cls.SIZE:
            raise ValueError(f"{len(data)} bytes, expected {cls.SIZE}")
        kind, asid = cls.HEAD.unpack_from(data)
        if kind != IOTLB_MSG_V2:
            raise ValueError(f"type {kind} is not VHOST_IOTLB_MSG_V2 ({IOTLB_MSG_V2})")
        start = cls.HEAD.size
        return cls(asid, IotlbMsg._parse(data[start : start + IotlbMsg.LAYOUT.size]))

    def check_features(self, acked: BackendFeature) -> None:
        """Refuse what the acknowledged back-end features do not permit.

        A non-zero ASID needs IOTLB_ASID (otherwise the kernel silently
        applies the message to address space 0); batch hints need IOTLB_BATCH.
        """
        if self.asid and not acked & BackendFeature.IOTLB_ASID:
            raise InvalidRequestError(
                f"{self.NAME}: address space {self.asid} needs the back-end feature IOTLB_ASID"
            )
        if self.iotlb.type.is_hint and not acked & BackendFeature.IOTLB_BATCH:
            raise InvalidRequestError(
                f"{self.NAME}: {self.iotlb.type.name} needs the back-end feature IOTLB_BATCH"
            )


# ------------------------------------------------------------------ features and status


class BackendFeature(IntFlag):
    """vhost back-end features (``VHOST_GET/SET_BACKEND_FEATURES``), as masks.

    The header numbers them as bits (``VHOST_BACKEND_F_IOTLB_MSG_V2`` is 1,
    so its mask is ``1 << 1``).
    """

    IOTLB_MSG_V2 = bit(1)  # IOTLB messages are struct vhost_msg_v2
    IOTLB_BATCH = bit(2)  # BATCH_BEGIN / BATCH_END hints
    IOTLB_ASID = bit(3)  # the asid field of vhost_msg_v2 is honoured
    SUSPEND = bit(4)  # VHOST_VDPA_SUSPEND
    RESUME = bit(5)  # VHOST_VDPA_RESUME
    ENABLE_AFTER_DRIVER_OK = bit(6)  # rings may be enabled after DRIVER_OK
    DESC_ASID = bit(7)  # descriptor areas may sit in their own group (needs IOTLB_ASID)
    IOTLB_PERSIST = bit(8)  # mappings survive a device reset


def check_status(
    wanted: DeviceStatus | int, read_back: DeviceStatus | int, *, features: int | None = None
) -> None:
    """Check the status read back after writing ``wanted`` (virtio 1.2, 3.1.1).

    A device that does not accept the features written clears FEATURES_OK
    (:class:`FeaturesRefusedError`, naming ``features`` when given); any
    other bit lost, or a bit the driver never wrote (DEVICE_NEEDS_RESET
    above all), is a :class:`StatusRefusedError`.
    """
    missing = int(wanted) & ~int(read_back)
    extra = int(read_back) & ~int(wanted)
    if missing & DeviceStatus.FEATURES_OK:
        offered = f" {features:#x}" if features is not None else ""
        raise FeaturesRefusedError(
            f"the device refused FEATURES_OK: it does not accept the features{offered}"
        )
    if extra & DeviceStatus.DEVICE_NEEDS_RESET:
        raise StatusRefusedError("the device set DEVICE_NEEDS_RESET: it must be reset")
    if missing or extra:
        raise StatusRefusedError(
            f"status {int(wanted):#04x} written, {int(read_back):#04x} read back"
        )


# ------------------------------------------------------------------ ioctl numbers


#: The direction bits (:class:`pyvdpa.ioctl.IoctlDirection`).
IoctlDir = IoctlDirection


def ioctl_number(direction: IoctlDirection, nr: int, size: int) -> int:
    """The request number of vhost ioctl ``nr`` with an argument of ``size`` bytes."""
    return _ioc(direction, VHOST_VIRTIO, nr, size)


def _io(nr: int) -> int:
    return ioctl_number(IoctlDir.NONE, nr, 0)


def _ior(nr: int, layout: struct.Struct) -> int:
    return ioctl_number(IoctlDir.READ, nr, layout.size)


def _iow(nr: int, layout: struct.Struct) -> int:
    return ioctl_number(IoctlDir.WRITE, nr, layout.size)


def _iowr(nr: int, layout: struct.Struct) -> int:
    return ioctl_number(IoctlDir.READ | IoctlDir.WRITE, nr, layout.size)


_STATE = VringState.LAYOUT


class Ioctl(IntEnum):
    """The vhost and vhost-vdpa ioctls a vhost-vdpa front-end uses (Linux 6.12).

    vhost_vdpa answers ``VHOST_SET_LOG_BASE`` and ``VHOST_SET_LOG_FD`` with
    ENOTTY: it does not log dirty pages.
    """

    VHOST_GET_FEATURES = _ior(0x00, U64)
    VHOST_SET_FEATURES = _iow(0x00, U64)
    VHOST_SET_OWNER = _io(0x01)
    VHOST_RESET_OWNER = _io(0x02)
    VHOST_SET_LOG_BASE = _iow(0x04, U64)
    VHOST_SET_LOG_FD = _iow(0x07, INT)
    VHOST_SET_VRING_NUM = _iow(0x10, _STATE)
    VHOST_SET_VRING_ADDR = _iow(0x11, VringAddr.LAYOUT)
    VHOST_SET_VRING_BASE = _iow(0x12, _STATE)
    VHOST_GET_VRING_BASE = _iowr(0x12, _STATE)
    VHOST_SET_VRING_KICK = _iow(0x20, VringFile.LAYOUT)
    VHOST_SET_VRING_CALL = _iow(0x21, VringFile.LAYOUT)
    VHOST_SET_BACKEND_FEATURES = _iow(0x25, U64)
    VHOST_GET_BACKEND_FEATURES = _ior(0x26, U64)
    VHOST_VDPA_GET_DEVICE_ID = _ior(0x70, U32)
    VHOST_VDPA_GET_STATUS = _ior(0x71, U8)
    VHOST_VDPA_SET_STATUS = _iow(0x72, U8)
    VHOST_VDPA_GET_CONFIG = _ior(0x73, VdpaConfig.HEAD)
    VHOST_VDPA_SET_CONFIG = _iow(0x74, VdpaConfig.HEAD)
    VHOST_VDPA_SET_VRING_ENABLE = _iow(0x75, _STATE)
    VHOST_VDPA_GET_VRING_NUM = _ior(0x76, U16)
    VHOST_VDPA_SET_CONFIG_CALL = _iow(0x77, INT)
    VHOST_VDPA_GET_IOVA_RANGE = _ior(0x78, IovaRange.LAYOUT)
    VHOST_VDPA_GET_CONFIG_SIZE = _ior(0x79, U32)
    VHOST_VDPA_GET_AS_NUM = _ior(0x7A, U32)
    VHOST_VDPA_GET_VRING_GROUP = _iowr(0x7B, _STATE)
    VHOST_VDPA_SET_GROUP_ASID = _iow(0x7C, _STATE)
    VHOST_VDPA_SUSPEND = _io(0x7D)
    VHOST_VDPA_RESUME = _io(0x7E)
    VHOST_VDPA_GET_VRING_DESC_GROUP = _iowr(0x7F, _STATE)
    VHOST_VDPA_GET_VQS_COUNT = _ior(0x80, U32)
    VHOST_VDPA_GET_GROUP_NUM = _ior(0x81, U32)
    VHOST_VDPA_GET_VRING_SIZE = _iowr(0x82, _STATE)

    @property
    def direction(self) -> IoctlDir:
        """Who reads and who writes the argument."""
        return ioctl_fields(self.value).direction

    @property
    def nr(self) -> int:
        """The command number within vhost's ioctl type."""
        return ioctl_fields(self.value).nr

    @property
    def size(self) -> int:
        """The size of the argument the kernel copies (the fixed head for config)."""
        return ioctl_fields(self.value).size
